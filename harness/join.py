"""The central join: each guest vector of a scenario device, its host vector, and the wiring.

For every device the guest set up, its interrupt sources are found in the guest's
``/proc/interrupts`` window: MSI-X entries and MSI vectors (by the function's ``msi_irqs`` in
sysfs, or by the PCI address and entry the IRQ domain prints), or, when it uses neither, its
INTx line (the function's sysfs ``irq``: an IO-APIC pin on x86, an SPI on arm64).  For an
assigned device each one is joined to the host's vfio line of the host function with the same
kind and index (vfio maps the MSI-X table and the MSI block one to one; ``vfio-intx(BDF)`` is
the line), which gives the host count and the traced wiring.  :func:`join` hands the three to
:func:`~harness.verdict.classify` and keeps them in the verdict.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.interrupts import VectorDelta, VectorKind
from harness.verdict import VectorVerdict, classify

if TYPE_CHECKING:
    from harness.guest.agent import GuestSnapshot, PciFunction
    from harness.hostside import HostMeasurement
    from harness.qemu.argv import PlacedDevice


@dataclass(frozen=True)
class GuestVector:
    """One interrupt source of a scenario device, as the guest counted it in the window."""

    device: PlacedDevice
    row: VectorDelta
    kind: VectorKind
    entry: int | None  # MSI-X entry / MSI index / 0 for INTx; None: the guest did not say
    shared_with: tuple[str, ...] = ()  # INTx: the other handlers on the same line


def _functions(bdf: str, before: GuestSnapshot, after: GuestSnapshot
               ) -> tuple[PciFunction, ...]:
    return tuple(f for f in (after.device(bdf), before.device(bdf)) if f is not None)


def guest_vectors(placed: tuple[PlacedDevice, ...], before: GuestSnapshot,
                  after: GuestSnapshot) -> Iterator[GuestVector]:
    """Every interrupt source of each placed device that the window saw, in table order."""
    delta = before.interrupts.delta(after.interrupts)
    for p in placed:
        funcs = _functions(p.bdf, before, after)
        intx = {irq for f in funcs if (irq := f.intx_irq) is not None}
        for row in delta.rows:
            line = row.line
            sysfs_kind = next((k for f in funcs if (k := f.msi_kind(line.label))), None)
            own = line.vector is not None and line.vector.bdf == p.bdf
            if sysfs_kind is not None or (own and line.vector is not None
                                          and line.vector.kind != "intx"):
                entry = line.vector.entry if line.vector else None
                kind: VectorKind = ("msix" if sysfs_kind == "msix" else "msi" if sysfs_kind
                                    else line.vector.kind if line.vector else "msi-or-msix")
                yield GuestVector(p, row, kind, entry)
            elif line.label in intx and line.chip is not None:
                yield GuestVector(p, row, "intx", 0, line.actions[1:] if len(line.actions) > 1
                                  else ())


def join(vm: str, placed: tuple[PlacedDevice, ...], before: GuestSnapshot,
         after: GuestSnapshot, host: HostMeasurement | None = None) -> list[VectorVerdict]:
    """A verdict for every interrupt source of every scenario device the guest set up."""
    verdicts = []
    for gv in guest_vectors(placed, before, after):
        line = gv.row.line
        assigned = gv.device.device.assigned_host
        host_delta = wiring = None
        if assigned is not None and host is not None:
            host_delta = host.host_delta(assigned, gv.entry, gv.kind)
            found = host.wiring_for(assigned, gv.entry, gv.kind)
            wiring = found.as_verdict_wiring() if found else None
        path, reason = classify(gv.device.device.emulated, gv.row.total, host_delta, wiring)
        if assigned is not None and host is not None and host.wiring_note and wiring is None:
            reason += f" ({host.wiring_note})"
        if gv.shared_with:
            reason += (f"; the INTx line is shared with {', '.join(gv.shared_with)}: the "
                       "guest's count is theirs too")
        verdicts.append(VectorVerdict(
            vm=vm, device=gv.device.device.id, bdf=gv.device.bdf, entry=gv.entry,
            name=", ".join(line.actions) or line.description, irq=line.label,
            guest_delta=gv.row.total, host_delta=host_delta, wiring=wiring, path=path,
            reason=reason, per_cpu=gv.row.per_cpu, kind=gv.kind))
    return verdicts
