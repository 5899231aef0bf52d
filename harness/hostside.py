"""The host's side of the evidence for assigned devices: its vfio vector counts and the bypass
wiring, gathered while the guests run.

``HostEvidence`` is a context manager: entering it preflights the assigned devices and puts
the bypass probes in (before QEMU starts, so every producer and consumer registration is
seen); leaving it removes them.  Inside, :meth:`HostEvidence.snapshot` reads the host's
/proc/interrupts (while the guests still run: vfio lines vanish when QEMU exits) and
:meth:`HostEvidence.measure` turns two snapshots and the trace into a frozen
:class:`HostMeasurement`, which answers, per host vector, the count delta and the wiring.
Without kprobe events the counts are still taken and the measurement says why the wiring is
unknown.  On arm64 the measurement also reads each VM's ``vgic-state`` from KVM's debugfs (LPIs
with the hw flag are the vLPIs KVM forwarded) and joins it to the traced forwarding, and it
reports the GICv4 doorbell deltas; a host without debugfs gets a note, never an error.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType

from harness.bypass.live import bypass_session
from harness.bypass.tracker import (
    BypassTracker,
    VectorWiring,
    VlpiState,
    relevant_skips,
)
from harness.errors import HostError
from harness.host.accel import AccelDecision, KvmProbe
from harness.host.irtable import (
    DEBUGFS_IOMMU,
    IrTableRead,
    IrteAgreement,
    irte_agreement,
    read_ir_table,
)
from harness.host.preflight import PreflightReport, preflight
from harness.host.tracefs import KprobeSession, parse_trace
from harness.host.vgic import (
    KVM_DEBUGFS,
    PROC,
    DoorbellDelta,
    VgicAgreement,
    VmVgic,
    agreement,
    doorbell_deltas,
    kvm_vm_dirs,
    read_vgic_state,
    task_tgid,
)
from harness.interrupts import (
    InterruptDelta,
    InterruptSnapshot,
    kinds_match,
    parse_proc_interrupts,
)
from harness.platform import PostingModel, platform_of_uname

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSnapshot:
    raw: str
    interrupts: InterruptSnapshot


@dataclass(frozen=True)
class HostMeasurement:
    """The host's counts between two snapshots and the wiring the trace showed."""

    delta: InterruptDelta
    wiring: tuple[VectorWiring, ...]
    wiring_note: str  # why the wiring is unknown or partial ("" when fully traced)
    anomalies: tuple[str, ...]
    vgic: tuple[VmVgic, ...] = ()  # every KVM VM's vgic-state read during the run (arm64)
    vgic_notes: tuple[str, ...] = ()  # why vgic-state was not read or not joined
    doorbells: tuple[DoorbellDelta, ...] = ()  # GICv4 vPE doorbells of the window

    def host_delta(self, bdf: str, entry: int | None, kind: str = "msix") -> int | None:
        """The host count of the device's vfio line of that kind and index (None: no line)."""
        if entry is None:
            return None
        rows = [r for r in self.delta.for_device(bdf) if r.vector is not None
                and r.vector.entry == entry and kinds_match(kind, r.vector.kind)]
        return sum(r.total for r in rows) if rows else None

    def wiring_for(self, bdf: str, entry: int | None, kind: str = "msix"
                   ) -> VectorWiring | None:
        return next((w for w in self.wiring if w.bdf == bdf and w.entry == entry
                     and kinds_match(kind, w.kind)), None)

    def notes(self) -> tuple[str, ...]:
        doorbells = (("GICv4 doorbells (\"vcpu\" on the vPE irqchip): "
                      + ", ".join(d.describe() for d in self.doorbells),)
                     if self.doorbells else ())
        return (((self.wiring_note,) if self.wiring_note else ()) + self.vgic_notes
                + doorbells + self.anomalies)


@dataclass(frozen=True)
class VgicJoin:
    """The wiring with each vector's vgic-state agreement, and what the join found."""

    wiring: tuple[VectorWiring, ...]
    anomalies: tuple[str, ...]
    notes: tuple[str, ...]


def join_vgic_state(wiring: Sequence[VectorWiring], vlpis: Mapping[int, VlpiState],
                    vms: Sequence[VmVgic], tgid_of: Callable[[int], int | None],
                    forwarding_probes: bool = True) -> VgicJoin:
    """Give each traced vector the agreement of its VM's vgic-state with the trace.

    A vector's VM is the process of the task that forwarded (or registered) it; only when that
    task is gone, the only VM on the host with a readable vgic-state, if there is exactly one.
    Each VM is checked once; a disagreement is an anomaly with the numbers.
    """
    readable = sorted({vm.pid for vm in vms if vm.state is not None})
    if not readable:
        return VgicJoin(tuple(wiring), (), ())

    def vm_of(task: int | None) -> tuple[int, str] | None:
        if task is None:
            return None
        tgid = tgid_of(task)
        if tgid is not None:  # known: its own VM or none, never another one
            return (tgid, f"task {task} belongs to process {tgid}") if tgid in readable else None
        if len(readable) == 1:
            return readable[0], (f"task {task} is not a live process's thread any more; "
                                 f"{readable[0]} is the only VM with a vgic-state")
        return None

    traced: dict[int, list[int]] = {}
    unjoined_vlpis = []
    for irq, state in vlpis.items():
        if state.mapped:
            found = vm_of(state.pid)
            if found is None:
                unjoined_vlpis.append(irq)
            else:
                traced.setdefault(found[0], []).append(irq)
    checks: dict[int, VgicAgreement | None] = {}
    anomalies: list[str] = []
    notes: list[str] = []
    joined: list[VectorWiring] = []
    for w in wiring:
        found = vm_of(w.task)
        if found is None:
            if w.producer:
                notes.append(f"vgic-state not joined for host irq {w.host_irq}: task "
                             f"{w.task} is in none of the VMs with a readable vgic-state "
                             f"{readable}")
            joined.append(w)
            continue
        pid, how = found
        if pid not in checks:
            checks[pid] = agreement(pid, vms, traced.get(pid, ()), how, forwarding_probes)
            check = checks[pid]
            if check is not None and not check.agrees:
                anomalies.append(f"anomaly vgic-state-disagrees: {check.disagreement}")
        joined.append(dataclasses.replace(w, state=checks[pid]))
    if unjoined_vlpis:
        notes.append(f"vLPI mappings of host irqs {sorted(unjoined_vlpis)} belong to no VM "
                     f"with a readable vgic-state {readable}")
    return VgicJoin(tuple(joined), tuple(anomalies), tuple(notes))


def join_ir_tables(wiring: Sequence[VectorWiring], reads: Mapping[str, IrTableRead]) -> VgicJoin:
    """Give each traced MSI/MSI-X vector of a device the agreement of the device's IR table
    entries with the trace: by source id (the device) and guest vector (the one KVM wrote
    into each posted IRTE, from ``kvm_pi_irte_update``).  A device whose table could not be
    read keeps its wiring as traced, with a note; a disagreement is an anomaly."""
    anomalies: list[str] = []
    notes: list[str] = []
    checks: dict[str, IrteAgreement] = {}
    for bdf, read in reads.items():
        if read.table is None:
            notes.append(read.note)
            continue
        traced = [w.guest_vector for w in wiring if w.bdf == bdf and w.posted
                  and w.guest_vector is not None]
        check = irte_agreement(read.table, read.where, bdf, traced)
        checks[bdf] = check
        if not check.agrees:
            anomalies.append(f"anomaly ir-table-disagrees: {check.disagreement}")
    joined = tuple(dataclasses.replace(w, state=checks[w.bdf])
                   if w.bdf in checks and not w.intx else w for w in wiring)
    return VgicJoin(joined, tuple(anomalies), tuple(notes))


@dataclass(frozen=True)
class ReleaseState:
    """What the release-stage workloads left behind: posting that outlived its vectors."""

    left: tuple[tuple[str | None, VlpiState], ...]  # (device BDF if known, mapping in force)
    hw_lpis: Mapping[int, int | None]  # QEMU pid -> its VM's LPIs with the hw bit (None: unread)
    notes: tuple[str, ...]

    def left_for(self, bdf: str) -> tuple[VlpiState, ...]:
        """Mappings of the device's host irqs that are still in force (and, when the device
        cannot be told, those of no known device)."""
        return tuple(v for dev, v in self.left if dev in (bdf, None))


class HostEvidence:
    """Preflight and bypass tracing of the host for the given assigned devices."""

    def __init__(self, run_dir: Path, devices: list[str], accel: AccelDecision | None, *,
                 machine: str | None = None, kvm_debugfs: Path = KVM_DEBUGFS,
                 proc: Path = PROC, iommu_debugfs: Path = DEBUGFS_IOMMU) -> None:
        self.run_dir = run_dir
        self.devices = devices
        self.accel = accel
        host = platform_of_uname(machine or platform.machine())
        self.posting: PostingModel | None = host.posting_model if host else None
        self.kvm_debugfs = kvm_debugfs
        self.iommu_debugfs = iommu_debugfs
        self.proc = proc
        self.preflight: PreflightReport | None = None
        self.device_notes: tuple[str, ...] = ()
        self.wiring_note = ""
        self._session: KprobeSession | None = None
        self._connect_probes = True
        self._forwarding_probes = True

    def __enter__(self) -> HostEvidence:
        self._check_devices()
        self._start_tracing()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._session is not None:
            self._session.stop()
            self._session = None

    def _check_devices(self) -> None:
        """Preflight the assigned devices: can they be assigned, can their IRQs be posted?"""
        accel = self.accel

        def probe() -> KvmProbe:  # the VM's own decision; no second boot test
            return KvmProbe(bool(accel and accel.kvm_usable),
                            accel.reason if accel else "not decided", 0.0)

        report = preflight(devices=self.devices, accel_probe=probe)
        self.preflight = report
        self.device_notes = (*(f"preflight {d.bdf}: {d.line}" for d in report.devices),
                             f"preflight host: {report.summary}")

    def _start_tracing(self) -> None:
        """Probes in before QEMU starts; a host that cannot trace still gets counts."""
        session = bypass_session()
        try:
            session.start()
        except HostError as exc:
            self.wiring_note = f"bypass wiring not traced: {exc}"
            log.warning("%s", self.wiring_note)
            return
        self._session = session
        self._connect_probes = not any(
            "kvm_arch_irq_bypass_add_producer" in note for note in session.skipped)
        # Without these two a vLPI mapping cannot be seen (its_unmap_vlpi only refines it).
        self._forwarding_probes = not any(
            note.startswith(f"{symbol}:") for note in session.skipped
            for symbol in ("kvm_vgic_v4_set_forwarding", "its_map_vlpi"))
        skipped = relevant_skips(session.skipped, self.posting)
        if skipped:
            self.wiring_note = "not traced: " + "; ".join(skipped)

    def snapshot(self, label: str) -> HostSnapshot:
        """The host's /proc/interrupts, saved in the run folder as ``host.<label>.interrupts``."""
        text = Path("/proc/interrupts").read_text()
        (self.run_dir / f"host.{label}.interrupts").write_text(text)
        return HostSnapshot(text, parse_proc_interrupts(text, source="host:/proc/interrupts"))

    def read_vgic(self, label: str = "") -> tuple[tuple[VmVgic, ...], tuple[str, ...]]:
        """Every KVM VM's vgic-state, saved as ``host.vgic-state.<pid>-<fd>``; call while the
        guests run (a VM's directory goes with it).  No debugfs, no KVM or no file: a note."""
        try:
            dirs = kvm_vm_dirs(self.kvm_debugfs)
        except OSError as exc:
            why = ("does not exist (debugfs not mounted at /sys/kernel/debug, or KVM not "
                   "loaded)" if isinstance(exc, FileNotFoundError)
                   else f"cannot be listed: {exc.strerror or exc}")
            return (), (f"vgic-state not read: {self.kvm_debugfs} {why}",)
        if not dirs:
            return (), (f"vgic-state not read: no VM directory under {self.kvm_debugfs}",)
        vms = tuple(read_vgic_state(path) for _, _, path in dirs)
        for vm in vms:
            if vm.text:
                name = f"host.vgic-state{'.' + label if label else ''}.{vm.pid}-{vm.fd}"
                (self.run_dir / name).write_text(vm.text)
        return vms, tuple(f"vgic-state not read: {vm.note}" for vm in vms if vm.state is None)

    def release_state(self, window_end: HostSnapshot, qemu_pids: Sequence[int]) -> ReleaseState:
        """After the release-stage workloads, while the guests still run: every vLPI mapping
        the whole trace leaves in force without its pair (joined to its device through the
        host irq's vfio line at the window's end), and each of ``qemu_pids``' VMs' hw LPIs."""
        notes: list[str] = []
        left: list[tuple[str | None, VlpiState]] = []
        if self._session is None or not self._forwarding_probes:
            notes.append("release not traced: " + (self.wiring_note or "no forwarding probes"))
        else:
            trace = self._session.read()
            (self.run_dir / "host.bypass.release.trace").write_text(trace)
            tracker = BypassTracker(connect_probes=self._connect_probes)
            tracker.feed(parse_trace(trace.splitlines()))
            by_irq = {line.label: line.vector.bdf for line in window_end.interrupts.lines
                      if line.vector is not None}
            left = [(by_irq.get(str(v.host_irq)), v) for v in tracker.left_forwarded()]
        hw: dict[int, int | None] = {pid: None for pid in qemu_pids}
        if self.posting is PostingModel.VLPI:
            vms, vgic_notes = self.read_vgic("release")
            notes += vgic_notes
            for vm in vms:
                if vm.pid in hw and vm.state is not None:
                    hw[vm.pid] = len(vm.state.hw_lpis)
        return ReleaseState(tuple(left), MappingProxyType(hw), tuple(notes))

    def _with_ir_tables(self, counted: HostMeasurement) -> HostMeasurement:
        """Each assigned device's IR table entries (saved as ``host.ir-table.<bdf>``) joined
        to its traced vectors; a host without the IOMMU debugfs gets a note."""
        reads = {}
        for bdf in self.devices:
            read = read_ir_table(bdf, self.iommu_debugfs)
            if read.text:
                (self.run_dir / f"host.ir-table.{bdf}").write_text(read.text)
            reads[bdf] = read
        joined = join_ir_tables(counted.wiring, reads)
        return dataclasses.replace(counted, wiring=joined.wiring,
                                   anomalies=counted.anomalies + joined.anomalies,
                                   vgic_notes=counted.vgic_notes + joined.notes)

    def measure(self, before: HostSnapshot, after: HostSnapshot) -> HostMeasurement:
        """Counts, wiring and (arm64) vgic-state; call while the guests still run (the trace
        and the VMs' debugfs files are read here)."""
        trace = None
        if self._session is not None:
            trace = self._session.read()
            (self.run_dir / "host.bypass.trace").write_text(trace)
        counted, tracker = measure_recorded(before.interrupts, after.interrupts, trace,
                                            self.wiring_note, self._connect_probes)
        wiring, delta, anomalies = counted.wiring, counted.delta, counted.anomalies
        if self.posting is not PostingModel.VLPI and not tracker.counts.get("fwd"):
            # A host posting through IRTEs has no vgic; its IOMMU's IR table is the witness.
            return self._with_ir_tables(counted)
        vms, vgic_notes = self.read_vgic()
        joined = join_vgic_state(wiring, tracker.vlpi, vms,
                                 lambda tid: task_tgid(tid, self.proc),
                                 self._forwarding_probes)
        return HostMeasurement(delta, joined.wiring, self.wiring_note,
                               anomalies + joined.anomalies, vms, vgic_notes + joined.notes,
                               doorbell_deltas(delta))


def measure_recorded(before: InterruptSnapshot, after: InterruptSnapshot, trace: str | None,
                     wiring_note: str = "", connect_probes: bool = True
                     ) -> tuple[HostMeasurement, BypassTracker]:
    """Counts and traced wiring from two host readings and the bypass trace text (None: not
    traced): the part of a measurement that reads nothing but its inputs, so a run folder's
    files give the same answer as the run did."""
    tracker = BypassTracker(connect_probes=connect_probes)
    wiring: list[VectorWiring] = []
    if trace is not None:
        tracker.feed(parse_trace(trace.splitlines()))
        wiring = tracker.wiring(after)
    anomalies = tuple(f"anomaly {a.kind}: {a.message}" for a in tracker.anomalies)
    return HostMeasurement(before.delta(after), tuple(wiring), wiring_note, anomalies), tracker
