"""Mirror the live kernel's IRQ bypass pairings from trace records into a BypassManager.

Kprobes on ``irq_bypass_(un)register_producer/consumer`` (entry and return) and on KVM's
``kvm_arch_irq_bypass_add/del_producer`` tell what the kernel did; each registration is
replayed into a :class:`BypassManager` when its return record arrives, with the kernel's own
nested ``add_producer`` result, so the model and the kernel can be compared step by step.
Where they differ (a connect the model did not expect, a duplicate token the kernel accepted)
the tracker records an anomaly instead of hiding it.  Producers are keyed by the kernel
object's address, which survives the re-registration churn of a vector whose guest driver
reprograms MSI-X (same irq, new token).

Posting is traced per architecture: on x86 by the ``kvm_pi_irte_update`` tracepoint, on arm64
(GICv4 direct injection) by kprobes on ``kvm_vgic_v4_set_forwarding`` and ``its_map_vlpi``.
Entering set_forwarding is no evidence (it returns 0 early when GICv4 is off in KVM); a host
irq is forwarded as a vLPI only once ``its_map_vlpi`` returned 0 inside it, until an unset,
an unmap or the pair's disconnect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.bypass.manager import BypassError, BypassManager, CallbackError, Consumer, Producer
from harness.host.tracefs import ProbeSpec, TraceRecord
from harness.interrupts import InterruptSnapshot
from harness.platform import PostingModel

log = logging.getLogger(__name__)

GROUP = "harness_irqbp"

# kvm_pi_irte_update: "... is enabled and being updated for irq 25, vcpu 0, gsi: 0x18, gvec: 0x22"
_PI_IRTE = re.compile(r"PI is (?P<state>enabled and being updated|disabled) for (?:this )?irq"
                      r"(?: (?P<irq>\d+))?, vcpu (?P<vcpu>-?\d+), gsi: (?P<gsi>0x[0-9a-f]+), "
                      r"gvec: (?P<gvec>0x[0-9a-f]+)")


def kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    if not match:
        raise ValueError(f"cannot read a kernel version from {release!r}")
    return int(match.group(1)), int(match.group(2))


# arm64 GICv4 direct injection (arch/arm64/kvm/vgic/vgic-v4.c, drivers/irqchip/irq-gic-v4.c):
# kvm_vgic_v4_set_forwarding(struct kvm *, int virq, struct kvm_kernel_irq_routing_entry *),
# kvm_vgic_v4_unset_forwarding(struct kvm *, int virq, ...), its_map_vlpi(int irq,
# struct its_vlpi_map *), its_unmap_vlpi(int irq); the same argument positions in the 5.15
# and 6.4+ sources read (6.1 lies between).  ``virq`` is the host irq of the vfio vector.
# Optional: x86 kernels have none of these functions.
GICV4_PROBES = (
    ProbeSpec("fwd", "kvm_vgic_v4_set_forwarding", "virq=$arg2:u32", optional=True),
    ProbeSpec("fwd_ret", "kvm_vgic_v4_set_forwarding", "ret=$retval:s32", ret=True,
              optional=True),
    ProbeSpec("unfwd", "kvm_vgic_v4_unset_forwarding", "virq=$arg2:u32", optional=True),
    ProbeSpec("mapvlpi", "its_map_vlpi", "irq=$arg1:u32", optional=True),
    ProbeSpec("mapvlpi_ret", "its_map_vlpi", "ret=$retval:s32", ret=True, optional=True),
    # The vITS unmaps a vLPI without unset_forwarding when the guest discards its event.
    ProbeSpec("unmapvlpi", "its_unmap_vlpi", "irq=$arg1:u32", optional=True),
)
GICV4_SYMBOLS = frozenset(p.symbol for p in GICV4_PROBES)


def probe_specs(release: str) -> list[ProbeSpec]:
    """The probe set for a kernel: struct offsets before 6.17, arguments from 6.17 on.

    Before 6.17 the token and irq live in the struct (token at +16, irq at +24 on LP64);
    from 6.17 they are arguments, because ``producer->eventfd`` is written only after a
    successful registration (see the notes, section 2.4).  Offsets are for x86_64/arm64.
    """
    if kernel_version(release) >= (6, 17):
        prod = "prod=$arg1:x64 token=$arg2:x64 irq=$arg3:s32"
        cons = "cons=$arg1:x64 token=$arg2:x64"
        unprod = "prod=$arg1:x64 token=+0($arg1):x64 irq=+16($arg1):s32"
        uncons = "cons=$arg1:x64 token=+0($arg1):x64"
        # In add_producer both sides are registered, so their eventfd fields are valid.
        pair = ("cons=$arg1:x64 ctoken=+0($arg1):x64 prod=$arg2:x64 ptoken=+0($arg2):x64 "
                "irq=+16($arg2):s32")
    else:
        prod = "prod=$arg1:x64 token=+16($arg1):x64 irq=+24($arg1):s32"
        cons = "cons=$arg1:x64 token=+16($arg1):x64"
        unprod = "prod=$arg1:x64 token=+16($arg1):x64 irq=+24($arg1):s32"
        uncons = "cons=$arg1:x64 token=+16($arg1):x64"
        pair = ("cons=$arg1:x64 ctoken=+16($arg1):x64 prod=$arg2:x64 ptoken=+16($arg2):x64 "
                "irq=+24($arg2):s32")
    return [
        ProbeSpec("prod", "irq_bypass_register_producer", prod),
        ProbeSpec("prod_ret", "irq_bypass_register_producer", "ret=$retval:s32", ret=True),
        ProbeSpec("cons", "irq_bypass_register_consumer", cons),
        ProbeSpec("cons_ret", "irq_bypass_register_consumer", "ret=$retval:s32", ret=True),
        ProbeSpec("unprod", "irq_bypass_unregister_producer", unprod),
        ProbeSpec("uncons", "irq_bypass_unregister_consumer", uncons),
        ProbeSpec("connect", "kvm_arch_irq_bypass_add_producer", pair, optional=True),
        ProbeSpec("connect_ret", "kvm_arch_irq_bypass_add_producer", "ret=$retval:s32",
                  ret=True, optional=True),
        ProbeSpec("disconnect", "kvm_arch_irq_bypass_del_producer", pair, optional=True),
        # fd and GSI of each KVM_IRQFD: the next consumer registered by the task is its irqfd.
        ProbeSpec("kvm_irqfd", "kvm_irqfd",
                  "fd=+0($arg2):s32 gsi=+4($arg2):u32 flags=+8($arg2):x32", optional=True),
        *GICV4_PROBES,
    ]


TRACEPOINTS = ("kvm/kvm_pi_irte_update",)

# What witnesses one posting model only: its absence on a host of the other needs no note.
POSTING_ONLY = {**{symbol: PostingModel.VLPI for symbol in GICV4_SYMBOLS},
                **{tp: PostingModel.IRTE for tp in TRACEPOINTS}}


def relevant_skips(skipped: Iterable[str], posting: PostingModel | None) -> list[str]:
    """The session's skip notes that matter on a host posting by ``posting`` (None: not
    known, all of them): an IRTE host lacks the GICv4 functions, a vLPI host the
    posted-IRTE tracepoint."""
    out = []
    for note in skipped:
        subject = note.removeprefix("tracepoint ").split(":", 1)[0]
        if posting is None or POSTING_ONLY.get(subject, posting) is posting:
            out.append(note)
    return out


@dataclass(frozen=True)
class Anomaly:
    timestamp: float
    kind: str
    message: str
    record: str = ""


@dataclass
class _Call:
    """A register call in flight on one task, with the kernel's nested callback results."""

    kind: str  # "producer" | "consumer"
    record: TraceRecord
    addr: int
    token: int
    irq: int = 0
    adds: list[tuple[int, int, int | None]] = field(default_factory=list)  # (cons, prod, ret)


class KernelProducer(Producer):
    """A kernel ``struct irq_bypass_producer`` (a vfio MSI/MSI-X vector), seen by address."""

    def __init__(self, addr: int) -> None:
        self.addr = addr
        self.pid: int | None = None  # the task of its latest registration

    def __repr__(self) -> str:
        return f"<KernelProducer {self.addr:#x} irq={self.irq}>"


class KernelConsumer(Consumer):
    """A kernel ``struct irq_bypass_consumer`` (a KVM irqfd), seen by address.

    Its ``add_producer`` answers with what the kernel's ``kvm_arch_irq_bypass_add_producer``
    returned in the call being replayed, so the model rolls back exactly when the kernel did.
    """

    def __init__(self, addr: int) -> None:
        self.addr = addr
        self.gsi: int | None = None
        self.fd: int | None = None
        self.replay_ret: int | None = None  # set by the tracker around each replay
        self.model_adds = 0

    def __repr__(self) -> str:
        return f"<KernelConsumer {self.addr:#x} gsi={self.gsi}>"

    def add_producer(self, producer: Producer) -> None:
        self.model_adds += 1
        if self.replay_ret:
            raise CallbackError(-self.replay_ret if self.replay_ret < 0 else self.replay_ret,
                                "kvm_arch_irq_bypass_add_producer failed in the kernel")

    def del_producer(self, producer: Producer) -> None:
        pass


@dataclass(frozen=True)
class PostedState:
    host_irq: int
    enabled: bool
    vcpu: int
    gsi: int
    guest_vector: int
    timestamp: float


@dataclass
class _Forwarding:
    """A kvm_vgic_v4_set_forwarding call in flight on one task, with its its_map_vlpi."""

    record: TraceRecord
    virq: int
    map_irq: int | None = None
    map_ret: int | None = None


@dataclass(frozen=True)
class VlpiState:
    """Whether a host irq is forwarded as a vLPI (GICv4), and the record that said so."""

    host_irq: int
    mapped: bool
    pid: int  # the task of that record (a QEMU thread, or a kworker for a teardown)
    timestamp: float
    cause: str


class StateWitness(Protocol):
    """A kernel state source read beside the trace (arm64 vgic-state, x86 IR tables): it
    agrees with the trace or says what contradicts what."""

    @property
    def agrees(self) -> bool: ...

    @property
    def summary(self) -> str: ...

    @property
    def disagreement(self) -> str: ...

    @property
    def source(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Wiring:
    """What the tracker saw for one assigned vector, as the verdict weighs it."""

    producer: bool
    consumer: bool
    connected: bool
    posted: bool = False
    detail: str = ""
    vlpi: bool = False  # posted as a GICv4 vLPI (arm64), not through a posted IRTE
    state: StateWitness | None = None  # a kernel state source against the trace, when read
    intx: bool = False  # the device's INTx line, not an MSI/MSI-X vector
    resample: bool = False  # INTx: a KVM irqfd with a resample fd serves the line


@dataclass(frozen=True)
class VectorWiring:
    """The answer for one host vector of an assigned device."""

    bdf: str
    entry: int
    kind: str
    host_irq: int
    token: int | None
    producer: bool
    consumer: bool
    connected: bool
    gsi: int | None
    posted: bool
    vcpu: int | None
    guest_vector: int | None
    vlpi_mapped: bool = False  # its_map_vlpi's mapping of this host irq is in force
    forwarding_calls: int = 0  # kvm_vgic_v4_set_forwarding entries traced for this host irq
    task: int | None = None  # the task that registered the producer (or forwarded it)
    state: StateWitness | None = None  # filled in by the host side (vgic-state, IR table)
    resample: bool = False  # INTx: a KVM irqfd with a resample fd is assigned (none undone)
    vcpus: tuple[int, ...] = ()  # posted IRTE: each vCPU it was pointed at, in order
    before_trace: bool = False  # the vector existed before the trace started, its producer
    #                              registration unseen: its pairing is unknown, not absent

    @property
    def intx(self) -> bool:
        return self.kind == "intx"

    @property
    def vlpi(self) -> bool:
        """Posted as a vLPI: connected, and the GICv4 mapping in force."""
        return self.connected and self.vlpi_mapped

    def as_verdict_wiring(self) -> Wiring:
        return Wiring(self.producer, self.consumer, self.connected, self.posted,
                      self.describe(), self.vlpi, self.state, self.intx, self.resample)

    def describe(self) -> str:
        if self.intx:
            # vfio-pci registers no bypass producer for INTx: it is never posted.
            return (f"host irq {self.host_irq}: INTx, KVM irqfd with a resample fd (GSI "
                    f"{self.gsi}): the line bounces through the host kernel"
                    if self.resample else f"host irq {self.host_irq}: INTx, no KVM irqfd with "
                    "a resample fd: QEMU relays the line and its EOI")
        if not self.producer:
            if self.before_trace:
                return (f"host irq {self.host_irq}: paired before the trace started: unknown "
                        "(its producer registration was not seen)")
            return f"host irq {self.host_irq}: no bypass producer registered"
        token = f"token {self.token:#x}" if self.token is not None else "unknown token"
        if not self.consumer:
            return f"host irq {self.host_irq}, {token}: no consumer: QEMU handles it"
        gsi = f" GSI {self.gsi}" if self.gsi is not None else ""
        if not self.connected:
            return f"host irq {self.host_irq}, {token}: KVM irqfd{gsi} present but not connected"
        if self.vlpi:
            return (f"host irq {self.host_irq}, {token}: connected to KVM irqfd{gsi}, "
                    "forwarded as a vLPI (GICv4 direct injection)")
        if self.posted:
            moved = (" (moved: vCPU " + " -> ".join(map(str, self.vcpus)) + ")"
                     if len(set(self.vcpus)) > 1 else "")
            return (f"host irq {self.host_irq}, {token}: connected to KVM irqfd{gsi}, "
                    f"posted to vCPU {self.vcpu} vector {self.guest_vector:#x}{moved}"
                    if self.guest_vector is not None else "posted")
        if self.forwarding_calls:
            return (f"host irq {self.host_irq}, {token}: connected to KVM irqfd{gsi}, not "
                    f"posted (kvm_vgic_v4_set_forwarding entered {self.forwarding_calls} "
                    "time(s), no vLPI mapping in force)")
        return f"host irq {self.host_irq}, {token}: connected to KVM irqfd{gsi}, not posted"

    def to_dict(self) -> dict[str, Any]:
        return {"bdf": self.bdf, "entry": self.entry, "kind": self.kind,
                "host_irq": self.host_irq,
                "token": f"{self.token:#x}" if self.token is not None else None,
                "producer": self.producer, "consumer": self.consumer,
                "connected": self.connected, "gsi": self.gsi, "posted": self.posted,
                "vcpu": self.vcpu, "guest_vector": self.guest_vector,
                "vlpi_mapped": self.vlpi_mapped, "forwarding_calls": self.forwarding_calls,
                "task": self.task, "resample": self.resample, "vcpus": list(self.vcpus),
                "before_trace": self.before_trace,
                "state": self.state.to_dict() if self.state is not None else None,
                "summary": self.describe()}


class BypassTracker:
    """Feed it trace records; ask it for the wiring of each host vector and the anomalies."""

    def __init__(self, connect_probes: bool = True) -> None:
        self.manager = BypassManager()
        self.producers: dict[int, KernelProducer] = {}
        self.consumers: dict[int, KernelConsumer] = {}
        self.anomalies: list[Anomaly] = []
        self.posted: dict[int, PostedState] = {}
        self.vlpi: dict[int, VlpiState] = {}  # host irq -> its GICv4 vLPI mapping (arm64)
        self.forwarding_calls: dict[int, int] = {}  # host irq -> set_forwarding entries
        self.counts: dict[str, int] = {}
        # Without the add_producer probes the kernel's connects cannot be compared.
        self.connect_probes = connect_probes
        self._calls: dict[int, list[_Call]] = {}
        self._pending_irqfd: dict[int, tuple[int, int]] = {}  # pid -> (fd, gsi)
        # KVM irqfds with a resample fd now assigned (INTx through KVM): (fd, gsi) -> task
        self.resample_irqfds: dict[tuple[int, int], int] = {}
        self.posted_vcpus: dict[int, list[int]] = {}  # host irq -> vCPUs its IRTE pointed at
        # Producers the model disconnected in an unregister on this task: the kernel's
        # del_producer record for them comes next, nested in the same call.
        self._disconnecting: dict[int, set[int]] = {}
        self._forwarding: dict[int, _Forwarding] = {}  # pid -> set_forwarding in flight
        self._remap: dict[int, TraceRecord] = {}  # pid -> its_map_vlpi outside set_forwarding

    def _anomaly(self, record: TraceRecord, kind: str, message: str) -> None:
        log.info("bypass anomaly %s: %s", kind, message)
        self.anomalies.append(Anomaly(record.timestamp, kind, message, record.body))

    def feed(self, records: Iterable[TraceRecord]) -> None:
        for record in records:
            self.feed_one(record)

    def feed_one(self, record: TraceRecord) -> None:
        name = record.event
        self.counts[name] = self.counts.get(name, 0) + 1
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(record)

    # --- record handlers (event names are the probe names of probe_specs) --------------------

    def _on_prod(self, r: TraceRecord) -> None:
        self._calls.setdefault(r.pid, []).append(
            _Call("producer", r, r.int("prod") or 0, r.int("token") or 0, r.int("irq") or 0))

    def _on_cons(self, r: TraceRecord) -> None:
        call = _Call("consumer", r, r.int("cons") or 0, r.int("token") or 0)
        self._calls.setdefault(r.pid, []).append(call)
        irqfd = self._pending_irqfd.pop(r.pid, None)
        if irqfd is not None:
            consumer = self.consumers.setdefault(call.addr, KernelConsumer(call.addr))
            consumer.fd, consumer.gsi = irqfd

    def _on_kvm_irqfd(self, r: TraceRecord) -> None:
        flags = r.int("flags") or 0
        fd, gsi = r.int("fd") or -1, r.int("gsi") or 0
        if flags & 1:  # KVM_IRQFD_FLAG_DEASSIGN
            self.resample_irqfds.pop((fd, gsi), None)
            return
        self._pending_irqfd[r.pid] = (fd, gsi)
        if flags & 2:  # KVM_IRQFD_FLAG_RESAMPLE: a level line (INTx) with its EOI eventfd
            self.resample_irqfds[(fd, gsi)] = r.pid

    def _on_connect(self, r: TraceRecord) -> None:
        ctoken, ptoken = r.int("ctoken"), r.int("ptoken")
        if ctoken is not None and ptoken is not None and ctoken != ptoken:
            self._anomaly(r, "token-mismatch", f"the kernel connected consumer token "
                          f"{ctoken:#x} to producer token {ptoken:#x}")
        stack = self._calls.get(r.pid)
        if not stack:
            self._anomaly(r, "connect-outside-register",
                          "kvm_arch_irq_bypass_add_producer outside any registration")
            return
        stack[-1].adds.append((r.int("cons") or 0, r.int("prod") or 0, None))

    def _on_connect_ret(self, r: TraceRecord) -> None:
        stack = self._calls.get(r.pid)
        if stack and stack[-1].adds:
            cons, prod, _ = stack[-1].adds[-1]
            stack[-1].adds[-1] = (cons, prod, r.int("ret") or 0)

    def _on_prod_ret(self, r: TraceRecord) -> None:
        self._finish(r, "producer")

    def _on_cons_ret(self, r: TraceRecord) -> None:
        self._finish(r, "consumer")

    def _finish(self, r: TraceRecord, kind: str) -> None:
        stack = self._calls.get(r.pid)
        if not stack or stack[-1].kind != kind:
            return  # the entry happened before tracing started
        call = stack.pop()
        kernel_ret = r.int("ret") or 0
        self._replay(call, kernel_ret)

    def _replay(self, call: _Call, kernel_ret: int) -> None:
        r = call.record
        kernel_add_ret = next((ret for _, _, ret in call.adds if ret is not None), None)
        partner = (self.manager.consumer_for(call.token) if call.kind == "producer"
                   else self.manager.producer_for(call.token))
        if isinstance(partner, KernelConsumer):
            partner.replay_ret = kernel_add_ret
        if call.kind == "producer":
            producer = self.producers.setdefault(call.addr, KernelProducer(call.addr))
            producer.pid = r.pid
            consumer_self = None
        else:
            consumer_self = self.consumers.setdefault(call.addr, KernelConsumer(call.addr))
            consumer_self.replay_ret = kernel_add_ret
        adds_before = sum(c.model_adds for c in self.consumers.values())
        model_error: BypassError | None = None
        try:
            if call.kind == "producer":
                self.manager.register_producer(producer, call.token, call.irq)
            else:
                assert consumer_self is not None
                self.manager.register_consumer(consumer_self, call.token)
        except BypassError as exc:
            model_error = exc
        finally:
            for c in self.consumers.values():
                c.replay_ret = None
        model_connected = sum(c.model_adds for c in self.consumers.values()) > adds_before
        what = f"{call.kind} {call.addr:#x} token {call.token:#x}"
        if model_error is None and kernel_ret != 0:
            self._anomaly(r, "kernel-refused", f"{what}: the kernel returned {kernel_ret} "
                          "where the model accepted")
            self._unregister(call)
        elif model_error is not None and kernel_ret == 0:
            self._anomaly(r, "kernel-accepted", f"{what}: the kernel accepted what the model "
                          f"refuses ({model_error})")
        if self.connect_probes:
            if call.adds and not model_connected:
                self._anomaly(r, "unexpected-connect", f"{what}: the kernel connected "
                              "(kvm_arch_irq_bypass_add_producer) with no matching token in "
                              "the model")
            elif model_connected and not call.adds:
                self._anomaly(r, "missing-connect", f"{what}: tokens match but the kernel "
                              "called no add_producer")

    def _unregister(self, call: _Call) -> None:
        if call.kind == "producer" and call.addr in self.producers:
            self.manager.unregister_producer(self.producers[call.addr])
        elif call.kind == "consumer" and call.addr in self.consumers:
            self.manager.unregister_consumer(self.consumers[call.addr])

    def _on_unprod(self, r: TraceRecord) -> None:
        producer = self.producers.get(r.int("prod") or 0)
        if producer is not None:
            if producer.consumer is not None:
                self._disconnecting.setdefault(r.pid, set()).add(producer.addr)
                self._forget_posting(producer, r)
            self.manager.unregister_producer(producer)

    def _on_uncons(self, r: TraceRecord) -> None:
        consumer = self.consumers.get(r.int("cons") or 0)
        if consumer is not None:
            if isinstance(consumer.producer, KernelProducer):
                self._disconnecting.setdefault(r.pid, set()).add(consumer.producer.addr)
                self._forget_posting(consumer.producer, r)
            self.manager.unregister_consumer(consumer)

    def _irq_of_gsi(self, gsi: int) -> int | None:
        """4.x traced no host irq: the irqfd with this GSI names its producer, connected or
        being connected right now (the IRTE update runs inside the registration)."""
        for consumer in self.consumers.values():
            if consumer.gsi != gsi:
                continue
            if isinstance(consumer.producer, KernelProducer):
                return consumer.producer.irq
            for stack in self._calls.values():
                for call in stack:
                    if call.kind == "producer" and any(c == consumer.addr
                                                       for c, _, _ in call.adds):
                        return call.irq
        return None

    def _forget_posting(self, producer: KernelProducer, r: TraceRecord) -> None:
        # A disconnect ends any posting of the pair, and before 6.17 KVM traces no IRTE update
        # when it does (nor when a reconnect falls back to remapped mode): an "enabled" seen
        # for an earlier connection must not vouch for the next one.  A vLPI mapping is not
        # cleared here: on arm64 the nested del_producer must unset the forwarding itself, and
        # a mapping that outlives its pair is exactly what left_forwarded() reports.
        self.posted.pop(producer.irq, None)

    def _on_disconnect(self, r: TraceRecord) -> None:
        addr = r.int("prod") or 0
        expected = self._disconnecting.get(r.pid, set())
        if addr in expected:
            expected.discard(addr)
            return
        prod = self.producers.get(addr)
        if prod is not None and prod.consumer is None and prod.token is not None:
            self._anomaly(r, "unexpected-disconnect", f"producer {prod.addr:#x}: the kernel "
                          "disconnected a pair the model never connected")

    def _on_kvm_pi_irte_update(self, r: TraceRecord) -> None:
        match = _PI_IRTE.search(r.body)
        if not match:
            return
        if match.group("irq") is not None:
            irq = int(match.group("irq"))
        else:
            found = self._irq_of_gsi(int(match.group("gsi"), 16))
            if found is None:
                return
            irq = found
        state = PostedState(irq, match.group("state").startswith("enabled"),
                            int(match.group("vcpu")), int(match.group("gsi"), 16),
                            int(match.group("gvec"), 16), r.timestamp)
        self.posted[irq] = state
        # KVM updates a posted IRTE again when the guest moves the vector to another vCPU
        # (a new affinity): the history is the re-routing the trace saw.
        if state.enabled:
            route = self.posted_vcpus.setdefault(irq, [])
            if not route or route[-1] != state.vcpu:  # a rewrite to the same vCPU is no move
                route.append(state.vcpu)
        else:
            self.posted_vcpus.pop(irq, None)

    # --- arm64: GICv4 forwarding (vLPI mappings) ---------------------------------------------

    def _set_vlpi(self, r: TraceRecord, irq: int, mapped: bool, cause: str) -> None:
        if not mapped and irq not in self.vlpi:
            return  # nothing was mapped: a teardown of a pair never forwarded
        self.vlpi[irq] = VlpiState(irq, mapped, r.pid, r.timestamp, cause)

    def left_forwarded(self) -> list[VlpiState]:
        """vLPI mappings still in force for a host irq that no connected pair uses any more:
        the device would keep posting to the vCPU after its irqfd or vectors went away."""
        connected = {p.irq for p in self.producers.values() if p.consumer is not None}
        return [v for irq, v in sorted(self.vlpi.items()) if v.mapped and irq not in connected]

    def _vlpi_mapped(self, irq: int) -> bool:
        state = self.vlpi.get(irq)
        return bool(state and state.mapped)

    def _on_fwd(self, r: TraceRecord) -> None:
        virq = r.int("virq")
        if virq is None:
            return
        self.forwarding_calls[virq] = self.forwarding_calls.get(virq, 0) + 1
        self._forwarding[r.pid] = _Forwarding(r, virq)

    def _on_mapvlpi(self, r: TraceRecord) -> None:
        irq = r.int("irq")
        if irq is None:
            return
        call = self._forwarding.get(r.pid)
        if call is None or call.map_irq is not None:
            # Not inside set_forwarding: the vITS moving a mapped vLPI (MOVI, MOVALL).
            self._remap[r.pid] = r
            return
        call.map_irq = irq
        if irq != call.virq:
            self._anomaly(r, "vlpi-irq-mismatch", f"kvm_vgic_v4_set_forwarding of host irq "
                          f"{call.virq} mapped host irq {irq} as a vLPI")

    def _on_mapvlpi_ret(self, r: TraceRecord) -> None:
        ret = r.int("ret")
        call = self._forwarding.get(r.pid)
        if call is not None and call.map_irq is not None and call.map_ret is None:
            call.map_ret = ret
            if ret == 0:
                self._set_vlpi(r, call.map_irq, True, "its_map_vlpi returned 0 in "
                               f"kvm_vgic_v4_set_forwarding of host irq {call.virq}")
            return
        entry = self._remap.pop(r.pid, None)
        if entry is None:
            return  # its entry happened before tracing started
        irq = entry.int("irq") or 0
        if ret != 0:
            self._anomaly(r, "vlpi-remap-failed", f"its_map_vlpi of host irq {irq} outside "
                          f"kvm_vgic_v4_set_forwarding returned {ret}: whether the vLPI is "
                          "still mapped is unknown")
        elif not self._vlpi_mapped(irq):
            self._anomaly(r, "vlpi-remap-unknown", f"its_map_vlpi of host irq {irq} returned "
                          "0 outside kvm_vgic_v4_set_forwarding, for a host irq the trace "
                          "never saw forwarded: not counted as a mapping")

    def _on_fwd_ret(self, r: TraceRecord) -> None:
        call = self._forwarding.pop(r.pid, None)
        if call is None:
            return  # the entry happened before tracing started
        ret = r.int("ret")
        if call.map_irq is None:
            return  # returned before mapping: GICv4 off in KVM, no vITS, or no LPI yet
        if call.map_ret is None:  # no its_map_vlpi return record: set_forwarding's decides
            if ret == 0:
                self._set_vlpi(r, call.map_irq, True, "kvm_vgic_v4_set_forwarding returned 0 "
                               "after its_map_vlpi")
            else:
                self._anomaly(r, "vlpi-map-unknown", f"kvm_vgic_v4_set_forwarding of host irq "
                              f"{call.virq} returned {ret} after its_map_vlpi, whose result "
                              "was not traced: not counted as a mapping")
        elif call.map_ret == 0 and ret != 0:
            # KVM set the vLPI's hw flag before failing on the pending-state transfer.
            self._anomaly(r, "forwarding-failed-after-map", f"its_map_vlpi mapped host irq "
                          f"{call.map_irq} but kvm_vgic_v4_set_forwarding returned {ret}: the "
                          "vLPI stays mapped while the bypass connect fails")
        elif call.map_ret != 0 and ret == 0:
            self._anomaly(r, "forwarding-ret-mismatch", f"its_map_vlpi of host irq "
                          f"{call.map_irq} returned {call.map_ret}, yet "
                          "kvm_vgic_v4_set_forwarding returned 0")

    def _on_unfwd(self, r: TraceRecord) -> None:
        virq = r.int("virq")
        if virq is not None:
            self._set_vlpi(r, virq, False, "kvm_vgic_v4_unset_forwarding")

    def _on_unmapvlpi(self, r: TraceRecord) -> None:
        irq = r.int("irq")
        if irq is not None:
            self._set_vlpi(r, irq, False, "its_unmap_vlpi")

    # --- answers -----------------------------------------------------------------------------

    def producer_for_irq(self, irq: int) -> KernelProducer | None:
        """The registered producer (if any) whose host IRQ is ``irq``."""
        return next((p for p in self.producers.values() if p.irq == irq and p.token is not None),
                    None)

    def wiring(self, interrupts: InterruptSnapshot,
               before_trace: frozenset[str] = frozenset()) -> list[VectorWiring]:
        """One answer per vfio line (MSI/MSI-X vector or INTx) of the host's /proc/interrupts.
        ``before_trace`` holds the labels of vfio lines that existed when the trace started
        (a live trace): a producer registered then was not seen, so its pairing is unknown."""
        answers = []
        for line in interrupts.lines:
            if line.vector is None or not any(a.startswith("vfio-") for a in line.actions):
                continue
            irq = int(line.label)
            if line.vector.kind == "intx":
                # Which resample irqfd serves which line is not in the records (the GSI is
                # the guest's): any one assigned now means KVM handles INTx.
                resample = next(iter(self.resample_irqfds.items()), None)
                answers.append(VectorWiring(
                    bdf=line.vector.bdf, entry=0, kind="intx", host_irq=irq, token=None,
                    producer=False, consumer=False, connected=False,
                    gsi=resample[0][1] if resample else None, posted=False, vcpu=None,
                    guest_vector=None, task=resample[1] if resample else None,
                    resample=resample is not None))
                continue
            producer = self.producer_for_irq(irq)
            token = producer.token if producer else None
            consumer = self.manager.consumer_for(token) if token is not None else None
            connected = token is not None and self.manager.is_connected(token)
            pi = self.posted.get(irq)
            irte_posted = bool(connected and pi and pi.enabled)
            vlpi = self.vlpi.get(irq)
            vlpi_mapped = bool(vlpi and vlpi.mapped)
            gsi = consumer.gsi if isinstance(consumer, KernelConsumer) else None
            answers.append(VectorWiring(
                bdf=line.vector.bdf, entry=line.vector.entry, kind=line.vector.kind,
                host_irq=irq, token=token if isinstance(token, int) else None,
                producer=producer is not None, consumer=consumer is not None,
                connected=connected, gsi=gsi if gsi is not None else (pi.gsi if pi else None),
                posted=irte_posted or (connected and vlpi_mapped),
                vcpu=pi.vcpu if irte_posted and pi else None,
                guest_vector=pi.guest_vector if irte_posted and pi else None,
                vlpi_mapped=vlpi_mapped, forwarding_calls=self.forwarding_calls.get(irq, 0),
                task=vlpi.pid if vlpi_mapped and vlpi else producer.pid if producer else None,
                vcpus=tuple(self.posted_vcpus.get(irq, ())) if irte_posted else (),
                before_trace=producer is None and line.label in before_trace))
        return answers

    def summary(self) -> dict[str, Any]:
        return {"events": dict(sorted(self.counts.items())),
                "tokens": [{"token": f"{s.token:#x}" if isinstance(s.token, int) else s.token,
                            "producer_irq": s.producer_irq, "consumer": s.has_consumer,
                            "connected": s.connected} for s in self.manager.snapshot()],
                "vlpis": {irq: {"mapped": v.mapped, "cause": v.cause, "pid": v.pid}
                          for irq, v in sorted(self.vlpi.items())},
                "anomalies": [a.__dict__ for a in self.anomalies]}
