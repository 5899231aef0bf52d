"""The IOMMU's interrupt remapping tables, read from debugfs: a state witness for posted IRTEs.

The trace says KVM pointed a vector's IRTE at a vCPU (``kvm_pi_irte_update``); the table says
what the IOMMU will do with the next interrupt.  A vector counts as posted only where both
agree.  Two sources, both needing a kernel built with ``CONFIG_IOMMU_DEBUGFS`` (Debian's is
not), read as root:

* Intel: ``/sys/kernel/debug/iommu/intel/ir_translation_struct`` lists every present IRTE of
  every DMAR unit, remapped entries ("Entry SrcID DstID Vct ...") and posted ones ("Entry SrcID
  PDA_high PDA_low Vct ...") in two sections (drivers/iommu/intel/debugfs.c).  SrcID is the
  requester's bus:dev.fn; a posted entry's Vct is the guest vector.
* AMD: write the device to ``/sys/kernel/debug/iommu/amd/devid``, then read
  ``irqtbl``: the device's table, one raw IRTE per line, ``IRT[index] <hi><lo>`` in 128-bit
  (GA) mode; guest mode (posted to a vAPIC) is bit 7 of the low quadword, the vector the low
  byte of the high one (drivers/iommu/amd/debugfs.c, amd_iommu_types.h ``struct irte_ga``).

Entries join to vectors by source id and vector: the device's host BDF and, for posted ones,
the guest vector the trace saw KVM write.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import TextParseError

DEBUGFS_IOMMU = Path("/sys/kernel/debug/iommu")
INTEL_TABLE = "intel/ir_translation_struct"
AMD_DEVID = "amd/devid"
AMD_TABLE = "amd/irqtbl"


class IrTableParseError(TextParseError):
    """Text that is not what the kernel prints for an IR table: ``source:line: reason``."""


@dataclass(frozen=True)
class Irte:
    """One present interrupt remapping table entry."""

    iommu: str  # "dmar0" / "amd"
    index: int
    source: str  # requester "bb:dd.f" (Intel SrcID, or the AMD device asked for)
    posted: bool  # posted (Intel PI) / guest mode (AMD vAPIC)
    vector: int  # posted: the guest's vector; remapped: the host's
    destination: int | None = None  # remapped: the APIC id (Intel DstID, AMD destination)


@dataclass(frozen=True)
class IrTable:
    entries: tuple[Irte, ...]
    notes: tuple[str, ...] = ()  # units with remapping disabled, and the like

    def for_source(self, bdf: str) -> tuple[Irte, ...]:
        """Entries whose requester is the PCI function ``bdf`` ("0000:00:05.0" or "00:05.0")."""
        short = bdf.lower().split(":", 1)[1] if bdf.count(":") == 2 else bdf.lower()
        return tuple(e for e in self.entries if e.source == short)


_INTEL_UNIT = re.compile(r"(?P<what>Remapped|Posted) Interrupt supported on IOMMU: (?P<name>\S+)")
_INTEL_REMAP = re.compile(
    r"\s*(?P<idx>\d+)\s+(?P<sid>[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s+(?P<dst>[0-9a-f]{8})\s+"
    r"(?P<vct>[0-9a-f]{2})\s+[0-9a-f]{16}\s+[0-9a-f]{16}\s*")
_INTEL_POSTED = re.compile(
    r"\s*(?P<idx>\d+)\s+(?P<sid>[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\s+[0-9a-f]{8}\s+[0-9a-f]{8}\s+"
    r"(?P<vct>[0-9a-f]{2})\s+[0-9a-f]{16}\s+[0-9a-f]{16}\s*")


def parse_intel_ir_table(text: str, source: str = INTEL_TABLE) -> IrTable:
    """``ir_translation_struct`` as printed by drivers/iommu/intel/debugfs.c."""
    entries: list[Irte] = []
    notes: list[str] = []
    unit: str | None = None
    posted = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line == "****" or line.startswith("IR table address"):
            continue
        m = _INTEL_UNIT.fullmatch(line)
        if m:
            unit, posted = m["name"], m["what"] == "Posted"
            continue
        if line.startswith("Entry SrcID"):
            if unit is None:
                raise IrTableParseError(source, lineno, "a table header before any IOMMU line")
            continue
        if line == "Interrupt Remapping is not enabled":
            notes.append(f"{unit}: interrupt remapping is not enabled")
            continue
        m = (_INTEL_POSTED if posted else _INTEL_REMAP).fullmatch(raw)
        if m is None or unit is None:
            raise IrTableParseError(source, lineno, f"not an IRTE line: {line[:80]!r}")
        entries.append(Irte(unit, int(m["idx"]), m["sid"], posted, int(m["vct"], 16),
                            None if posted else int(m["dst"], 16)))
    return IrTable(tuple(entries), tuple(notes))


_AMD_DEVICE = re.compile(r"DeviceId (?P<seg>[0-9a-f]{4}):(?P<bus>[0-9a-f]{2}):(?P<dev>[0-9a-f]{2})"
                         r"[:.](?P<fn>[0-7])")
_AMD_IRTE = re.compile(r"IRT\[(?P<idx>\d+)\]\s+(?P<hi>[0-9a-f]{16})\s*(?P<lo>[0-9a-f]{16})")
_AMD_IRTE32 = re.compile(r"IRT\[(?P<idx>\d+)\]\s+(?P<val>[0-9a-f]{8})")


def parse_amd_irq_table(text: str, source: str = AMD_TABLE) -> IrTable:
    """``irqtbl`` for the device last written to ``devid`` (drivers/iommu/amd/debugfs.c)."""
    entries: list[Irte] = []
    notes: list[str] = []
    device: str | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        m = _AMD_DEVICE.fullmatch(line)
        if m:
            device = f"{m['bus']}:{m['dev']}.{m['fn']}"
            continue
        if line.startswith(("Interrupt remapping is disabled", "IRQ lookup table not set",
                            "Please provide")):
            notes.append(line)
            continue
        if device is None:
            raise IrTableParseError(source, lineno, "an IRTE before the DeviceId line")
        m = _AMD_IRTE.fullmatch(line)
        if m:
            hi, lo = int(m["hi"], 16), int(m["lo"], 16)
            guest_mode = bool(lo >> 7 & 1)
            entries.append(Irte("amd", int(m["idx"]), device, guest_mode, hi & 0xFF,
                                None if guest_mode else (lo >> 8 & 0xFFFFFF)))
            continue
        m = _AMD_IRTE32.fullmatch(line)
        if m:  # legacy 32-bit IRTEs: remapping only, no guest mode
            val = int(m["val"], 16)
            entries.append(Irte("amd", int(m["idx"]), device, False, val >> 16 & 0xFF,
                                val >> 8 & 0xFF))
            continue
        raise IrTableParseError(source, lineno, f"not an IRTE line: {line[:80]!r}")
    return IrTable(tuple(entries), tuple(notes))


@dataclass(frozen=True)
class IrteAgreement:
    """A device's posted IRTEs in the IR table against the vectors the trace says are posted.

    Each vector traced as posted (with its guest vector) must have a posted entry of the
    device with that vector; a posted entry of the device that no traced vector explains is a
    disagreement too.
    """

    device: str
    table: str  # where the table was read
    posted_entries: tuple[int, ...]  # guest vectors of the device's posted IRTEs
    traced: tuple[int, ...]  # guest vectors the trace says are posted
    remapped_entries: int

    source = "IR table"

    @property
    def agrees(self) -> bool:
        return sorted(self.posted_entries) == sorted(self.traced)

    @property
    def summary(self) -> str:
        def vectors(values: Sequence[int]) -> str:
            return ", ".join(f"{v:#x}" for v in sorted(values)) or "none"

        return (f"{self.device} in {self.table}: {len(self.posted_entries)} posted IRTE(s) "
                f"(guest vectors {vectors(self.posted_entries)}), {self.remapped_entries} "
                f"remapped; the trace posted guest vectors {vectors(self.traced)}")

    @property
    def disagreement(self) -> str:
        missing = sorted(set(self.traced) - set(self.posted_entries))
        extra = sorted(set(self.posted_entries) - set(self.traced))
        parts = []
        if missing:
            parts.append("posted in the trace but no posted IRTE for guest vector(s) "
                         + ", ".join(f"{v:#x}" for v in missing))
        if extra:
            parts.append("posted IRTE(s) the trace never posted, guest vector(s) "
                         + ", ".join(f"{v:#x}" for v in extra))
        return "; ".join(parts) + (f": {self.summary}" if parts else "")

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "table": self.table,
                "posted_entries": list(self.posted_entries), "traced": list(self.traced),
                "remapped_entries": self.remapped_entries, "agrees": self.agrees,
                "summary": self.summary, "source": self.source}


def irte_agreement(table: IrTable, where: str, bdf: str,
                   traced_guest_vectors: Sequence[int]) -> IrteAgreement:
    mine = table.for_source(bdf)
    return IrteAgreement(bdf, where, tuple(e.vector for e in mine if e.posted),
                         tuple(traced_guest_vectors), sum(1 for e in mine if not e.posted))


@dataclass(frozen=True)
class IrTableRead:
    """One reading of the host's IR table for a device: the text as the kernel printed it
    (kept as evidence), the parsed entries, and where it was read; ``table`` is None when
    nothing could be read and ``note`` says why."""

    text: str
    table: IrTable | None
    where: str
    note: str = ""


def read_ir_table(bdf: str, root: Path = DEBUGFS_IOMMU) -> IrTableRead:
    """The IR table from whichever vendor's debugfs this host has.  On AMD this writes the
    device to ``devid``: the debugfs's own way to choose a device, which changes nothing but
    that selector."""
    intel = root / INTEL_TABLE
    amd = root / AMD_TABLE
    text = ""
    try:
        if intel.exists():
            text = intel.read_text()
            return IrTableRead(text, parse_intel_ir_table(text, str(intel)), str(intel))
        if amd.exists():
            (root / AMD_DEVID).write_text(bdf)
            text = amd.read_text()
            return IrTableRead(text, parse_amd_irq_table(text, str(amd)), str(amd))
    except OSError as exc:
        return IrTableRead(text, None, str(root), f"IR table not read: {exc.strerror or exc}")
    except IrTableParseError as exc:
        return IrTableRead(text, None, str(root), f"IR table not read: {exc}")
    why = ("the kernel has no IOMMU debugfs (CONFIG_IOMMU_DEBUGFS, and debugfs mounted at "
           "/sys/kernel/debug)" if not root.exists() else f"neither {intel} nor {amd} exists")
    return IrTableRead("", None, str(root), f"IR table not read for {bdf}: {why}")
