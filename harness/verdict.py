"""The delivery path of each vector, decided from evidence only, and checked against expectations.

The inputs are what was measured (guest delta, host delta of the matching vfio vector, the
bypass wiring the tracker saw and, on arm64, the VM's vgic-state against it), never which QEMU
option was set; a verdict keeps them all so a failed nightly run explains itself.  The rules
follow the table in ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.bypass.tracker import Wiring
from harness.config.model import DeliveryPath, Expectation, entry_number

# Host/guest ratio bands.  A bounce raises the host count once per guest interrupt (sampling
# while the guest runs can lose a few at either end); posting leaves the host count alone.
BOUNCE_MIN_RATIO = 0.5
POSTED_MAX_RATIO = 0.1


@dataclass(frozen=True)
class VectorVerdict:
    vm: str
    device: str
    bdf: str
    entry: int | None
    name: str  # the guest's IRQ action name, e.g. virtio0-input.0
    irq: str  # the guest IRQ number (label)
    guest_delta: int
    host_delta: int | None
    wiring: Wiring | None
    path: DeliveryPath | None  # None: the evidence does not fit any path
    reason: str
    per_cpu: tuple[int, ...] = ()
    kind: str = ""  # "msix", "msi", "intx" ("msi-or-msix": the guest did not say which)

    @property
    def label(self) -> str:
        entry = f"#{self.entry}" if self.entry is not None else ""
        return f"{self.vm}/{self.device}{entry} {self.name}"


def classify(emulated: bool, guest_delta: int, host_delta: int | None,
             wiring: Wiring | None) -> tuple[DeliveryPath | None, str]:
    """The delivery path the evidence shows, and why; None when it fits no path."""
    if guest_delta <= 0:
        return DeliveryPath.NOT_DELIVERED, "the guest's count did not rise"
    if emulated:
        return DeliveryPath.EMULATED, (f"emulated device: the VMM raised {guest_delta} "
                                       "interrupts, no host device IRQ is involved")
    if host_delta is None:
        return None, "assigned device, but its host vfio vector was not found to compare"
    if wiring is None:
        return None, "assigned device, but no bypass wiring was observed for this vector"
    ratio = host_delta / guest_delta
    numbers = f"host {host_delta} / guest {guest_delta} = {ratio:.2f}"
    if wiring.intx:
        return _classify_intx(ratio, numbers, wiring)
    state = wiring.state
    if state is not None and not state.agrees:
        # Contradicting evidence gives no verdict at all, bounce or posted: never a guess.
        return None, (f"the bypass trace and the kernel's {state.source} disagree, "
                      f"{state.disagreement} ({numbers})")
    if wiring.posted and ratio <= POSTED_MAX_RATIO:
        if wiring.vlpi:
            seen = (f"; vgic-state agrees: {state.summary}" if state is not None
                    else "; vgic-state not read")
            return DeliveryPath.POSTED, ("forwarded as a vLPI (GICv4 direct injection) and the "
                                         f"host did not see the IRQs ({numbers}){seen}")
        seen = (f"; the {state.source} agrees: {state.summary}" if state is not None
                else "")
        return DeliveryPath.POSTED, (f"IRTE posted and the host did not see the IRQs "
                                     f"({numbers}){seen}")
    if ratio < BOUNCE_MIN_RATIO:
        mechanism = "forwarded as a vLPI" if wiring.vlpi else "the IRTE is posted"
        posted = (f"{mechanism}, yet the host saw more IRQs than posting allows"
                  if wiring.posted else "the IRTE is not posted")
        return None, (f"the host saw too few IRQs for a bounce ({numbers}) and {posted}"
                      f"{': ' + wiring.detail if wiring.detail else ''}")
    if wiring.connected:
        return DeliveryPath.IRQFD_BOUNCE, (f"producer connected to a KVM irqfd consumer, "
                                           f"every IRQ went through the host ({numbers})")
    if wiring.producer and not wiring.consumer:
        return DeliveryPath.USERSPACE_BOUNCE, (f"producer without a KVM consumer: QEMU "
                                               f"relays each IRQ ({numbers})")
    return None, (f"host saw the IRQs ({numbers}) but the wiring is inconsistent: "
                  f"producer={wiring.producer} consumer={wiring.consumer} "
                  f"connected={wiring.connected}")


def _classify_intx(ratio: float, numbers: str, wiring: Wiring) -> tuple[DeliveryPath | None, str]:
    """An assigned device's INTx line: vfio-pci masks it in the host and signals an eventfd;
    KVM injects it through an irqfd whose resample fd unmasks it at the guest's EOI, or QEMU
    does both in user space.  vfio registers no bypass producer for INTx: never posted."""
    if ratio < BOUNCE_MIN_RATIO:
        return None, (f"INTx: the host saw too few IRQs for a bounce ({numbers}), and INTx is "
                      "never posted")
    if wiring.resample:
        return DeliveryPath.IRQFD_BOUNCE, (f"INTx through a KVM irqfd with a resample fd, "
                                           f"every IRQ went through the host ({numbers}): "
                                           f"{wiring.detail}")
    return DeliveryPath.USERSPACE_BOUNCE, (f"INTx with no KVM irqfd: QEMU relays each IRQ and "
                                           f"its EOI ({numbers})")


@dataclass(frozen=True)
class ExpectationResult:
    expectation: Expectation
    passed: bool
    message: str
    vectors: tuple[VectorVerdict, ...] = field(default=())


def _selected(expectation: Expectation,
              verdicts: Sequence[VectorVerdict]) -> tuple[list[VectorVerdict], list[str]]:
    mine = [v for v in verdicts if v.vm == expectation.vm and v.device == expectation.device]
    if not expectation.vectors:
        return [v for v in mine if v.guest_delta > 0], []
    chosen: list[VectorVerdict] = []
    unmatched = []
    for pattern in expectation.vectors:
        entry = entry_number(pattern)
        if entry is not None:
            hits = [v for v in mine if v.entry == entry]
        else:
            hits = [v for v in mine if fnmatch.fnmatchcase(v.name, pattern)]
        if not hits:
            unmatched.append(pattern)
        chosen += [v for v in hits if v not in chosen]
    return chosen, unmatched


def check(expectation: Expectation, verdicts: Sequence[VectorVerdict]) -> ExpectationResult:
    what = f"{expectation.vm}/{expectation.device} expects {expectation.path.value}"
    chosen, unmatched = _selected(expectation, verdicts)
    if unmatched:
        names = sorted({v.name for v in verdicts
                        if v.vm == expectation.vm and v.device == expectation.device})
        return ExpectationResult(expectation, False, f"{what}: no vector matches "
                                 f"{', '.join(unmatched)} (the guest has: "
                                 f"{', '.join(names) or 'none'})", tuple(chosen))
    if not chosen:
        return ExpectationResult(expectation, False,
                                 f"{what}: no vector of the device fired", ())
    problems = []
    total = sum(v.guest_delta for v in chosen)
    if not expectation.vectors and total < expectation.min_delta:
        # No vectors named: which queue's vector fires depends on the vCPU the workload
        # ran on, so the minimum applies to the device as a whole.
        problems.append(f"{total} interrupts in all < {expectation.min_delta}")
    for v in chosen:
        if expectation.vectors and v.guest_delta < expectation.min_delta:
            problems.append(f"{v.name}: {v.guest_delta} interrupts < {expectation.min_delta}")
        elif v.path != expectation.path:
            shown = v.path.value if v.path else "no path"
            problems.append(f"{v.name}: {shown} ({v.reason})")
        if expectation.cpu is not None and v.guest_delta > 0:
            problems += _off_cpu(v, expectation.cpu, expectation.cpu_share)
    on_cpu = (f" on CPU{expectation.cpu}" if expectation.cpu is not None else "")
    if problems:
        return ExpectationResult(expectation, False, f"{what}{on_cpu}: " + "; ".join(problems),
                                 tuple(chosen))
    return ExpectationResult(expectation, True, f"{what}{on_cpu}: {len(chosen)} vector(s), "
                             f"{total} interrupts", tuple(chosen))


def per_cpu_text(counts: Sequence[int]) -> str:
    """Per-CPU counts, compact: "0/5/95/0" (CPU0 first)."""
    return "/".join(map(str, counts))


def _off_cpu(v: VectorVerdict, cpu: int, share: float) -> list[str]:
    if cpu >= len(v.per_cpu):
        return [f"{v.name}: the guest has no CPU{cpu} (it counts {len(v.per_cpu)} CPUs)"]
    there = v.per_cpu[cpu]
    if there >= share * v.guest_delta:
        return []
    busiest = max(range(len(v.per_cpu)), key=lambda i: v.per_cpu[i])
    return [f"{v.name}: {there} of {v.guest_delta} interrupts on CPU{cpu}, most on "
            f"CPU{busiest} (per CPU {per_cpu_text(v.per_cpu)})"]


def check_released(result: ExpectationResult, bdf: str | None,
                   left: Sequence[tuple[int, str]], hw_lpis: int | None,
                   notes: Sequence[str]) -> ExpectationResult:
    """``released: true``: after the release-stage workloads nothing of the device may still
    be forwarded to a vCPU.  ``left`` holds (host irq, what mapped it) of every mapping the
    trace leaves in force without its pair; ``hw_lpis`` the VM's LPIs with the hw bit now
    (None: vgic-state unreadable, said in ``notes``)."""
    what = f"{result.expectation.vm}/{result.expectation.device} released"
    problems = []
    if bdf is None:
        problems.append("the device has no host address to join the trace to")
    if left:
        problems.append("still forwarded after the release: " + ", ".join(
            f"host irq {irq} ({cause})" for irq, cause in left))
    if hw_lpis:
        problems.append(f"vgic-state still shows {hw_lpis} LPI(s) with the hw bit")
    state = ("vgic-state: no hw LPI left" if hw_lpis == 0 else
             "vgic-state not read" + (f" ({'; '.join(notes)})" if notes else "")
             if hw_lpis is None else "")
    if problems:
        return dataclasses.replace(result, passed=False, message=(
            f"{result.message}; {what}: " + "; ".join(problems)))
    return dataclasses.replace(result, message=(
        f"{result.message}; {what}: nothing left forwarded (every vLPI mapping the trace saw "
        f"was undone{'; ' + state if state else ''})"))
