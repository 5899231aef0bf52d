"""Parse Linux ``/proc/interrupts`` text (host or guest, any kernel era or arch) into snapshots.

Two snapshots give an :class:`InterruptDelta`: per-vector, per-CPU counts over a window, with
each device vector named by its PCI function and MSI/MSI-X entry (:class:`VectorId`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from harness.errors import TextParseError

log = logging.getLogger(__name__)

VectorKind = Literal["msi", "msix", "msi-or-msix", "intx"]
DeltaStatus = Literal["both", "appeared", "vanished"]


class InterruptsParseError(TextParseError):
    """``/proc/interrupts`` text that is not what the kernel prints: ``source:line: reason``."""


# --- identities ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorId:
    """One interrupt source of one PCI function: an MSI-X entry, an MSI vector, or its INTx
    line (entry 0).  The identity a delivery check is about."""

    bdf: str  # "0000:00:03.0": lowercase, domain at least 4 hex digits
    entry: int  # MSI-X table entry, the vector index within a multi-MSI block, 0 for INTx
    kind: VectorKind  # "msi-or-msix" when only a shared-domain hwirq told us the entry


_BDF = r"[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]"
_SHORT_BDF = re.compile(r"[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")
_VFIO_ACTION = re.compile(rf"vfio-(?P<kind>msix?)\[(?P<entry>\d+)\]\((?P<bdf>{_BDF})\)")
# vfio-pci's INTx handler (drivers/vfio/pci/vfio_pci_intrs.c: "vfio-intx(%s)", pci_name): a
# line IRQ (IO-APIC, GIC SPI), so the chip says nothing about the device.
_VFIO_INTX_ACTION = re.compile(rf"vfio-intx\((?P<bdf>{_BDF})\)")
# Per-device MSI domains (about 6.2+) are named "<prefix>PCI-MSI[X]-<pci_name>", where the
# prefix is the parent's ("IR-", "ITS-"); their hwirq is the MSI-X entry / MSI index.
_PER_DEVICE_CHIP = re.compile(rf"(?:[\w.]+-)*PCI-MSI(?P<x>X?)-(?P<bdf>{_BDF})")
# Shared PCI/MSI domains built with the default ops print pci_msi_domain_calc_hwirq():
# index | pci_dev_id << 11 | domain << 27 (drivers/pci/msi/irqdomain.c).  ITS-MSI is one of
# them (irq-gic-v3-its-pci-msi.c uses MSI_FLAG_USE_DEF_DOM_OPS): its number is not the LPI.
_SHARED_PCI_MSI_CHIPS = frozenset({"PCI-MSI", "IR-PCI-MSI", "ITS-MSI"})


def kinds_match(guest: str, host: str) -> bool:
    """Whether a guest vector of ``guest`` kind can be the host vector of ``host`` kind: the
    same kind, or an MSI/MSI-X vector whose kind only a shared MSI domain printed (no sysfs)."""
    if guest == host:
        return True
    if "intx" in (guest, host):
        return False
    return "msi-or-msix" in (guest, host)


def normalize_bdf(bdf: str) -> str:
    """``"00:03.0"`` or ``"0000:00:03.0"`` (any case) -> ``"0000:00:03.0"``."""
    text = bdf.strip().lower()
    if _SHORT_BDF.fullmatch(text):
        text = "0000:" + text
    if not re.fullmatch(_BDF, text):
        raise ValueError(f"not a PCI address: {bdf!r}")
    domain, rest = text.split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def decode_pci_msi_hwirq(hwirq: int) -> tuple[str, int]:
    """A shared PCI/MSI domain hwirq -> (BDF, entry), the inverse of the kernel's encoding."""
    entry = hwirq & 0x7FF
    devid = (hwirq >> 11) & 0xFFFF
    domain = hwirq >> 27
    bus, devfn = devid >> 8, devid & 0xFF
    return f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}", entry


def _vector_of(chip: str | None, hwirq: int | None,
               actions: tuple[str, ...]) -> VectorId | None:
    from_action: VectorId | None = None
    for action in actions:
        m = _VFIO_ACTION.fullmatch(action)
        if m:
            kind: VectorKind = "msix" if m["kind"] == "msix" else "msi"
            from_action = VectorId(normalize_bdf(m["bdf"]), int(m["entry"]), kind)
            break
        m = _VFIO_INTX_ACTION.fullmatch(action)
        if m:
            # A shared line may carry other handlers too: the vfio one names the device.
            return VectorId(normalize_bdf(m["bdf"]), 0, "intx")
    from_chip: VectorId | None = None
    if chip is not None and hwirq is not None:
        m = _PER_DEVICE_CHIP.fullmatch(chip)
        if m:
            from_chip = VectorId(normalize_bdf(m["bdf"]), hwirq, "msix" if m["x"] else "msi")
        elif chip in _SHARED_PCI_MSI_CHIPS:
            bdf, entry = decode_pci_msi_hwirq(hwirq)
            from_chip = VectorId(bdf, entry, "msi-or-msix")
    if from_action and from_chip and (from_action.bdf, from_action.entry) != (
            from_chip.bdf, from_chip.entry):
        # The kernel's own numbering wins over a name a driver chose.
        log.warning("vector name %s disagrees with its chip %s %s", actions, chip, hwirq)
        return from_chip
    return from_action or from_chip


# --- one line and one snapshot -------------------------------------------------------------


@dataclass(frozen=True)
class IrqLine:
    """One row: a numbered IRQ ("25") or an arch counter ("PIN", "ERR", "IPI0")."""

    label: str
    counts: tuple[int, ...]  # one per CPU column; arch rows such as ERR/MIS hold one total
    chip: str | None  # "IR-PCI-MSI", "PCI-MSIX-0000:00:04.0", "GICv3"; None on arch rows
    hwirq: int | None
    trigger: str | None  # the Level/Edge word if printed, else the flow name ("edge", ...)
    actions: tuple[str, ...]  # request_irq() names, in the kernel's order
    description: str  # everything after the counts, as printed
    vector: VectorId | None

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def is_arch(self) -> bool:
        return not self.label.isdigit()

    @property
    def irq(self) -> int | None:
        return None if self.is_arch else int(self.label)

    @property
    def is_remapped(self) -> bool:
        """The source goes through the IOMMU's interrupt remapping (``IR-`` chips)."""
        return self.chip is not None and self.chip.startswith("IR-")

    @property
    def name(self) -> str:
        """Actions joined as the kernel prints them; the description for arch rows."""
        return self.description if self.is_arch else ", ".join(self.actions)


@dataclass(frozen=True)
class InterruptSnapshot:
    """One reading of ``/proc/interrupts``; ``source`` names where it came from."""

    cpus: tuple[str, ...]
    lines: tuple[IrqLine, ...]
    source: str = ""
    taken_at: float | None = None  # time.monotonic() of the reading, when the caller knows it
    _by_label: dict[str, IrqLine] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, IrqLine] = {}
        for line in self.lines:
            index.setdefault(line.label, line)  # ppc64 prints two LOC rows: keep the first
        object.__setattr__(self, "_by_label", index)

    def by_label(self, label: str) -> IrqLine | None:
        return self._by_label.get(label.strip().rstrip(":"))

    def irq(self, number: int) -> IrqLine | None:
        return self._by_label.get(str(number))

    def arch_row(self, name: str) -> IrqLine | None:
        line = self.by_label(name)
        return line if line is not None and line.is_arch else None

    def for_device(self, bdf: str) -> tuple[IrqLine, ...]:
        wanted = normalize_bdf(bdf)
        return tuple(ln for ln in self.lines if ln.vector is not None and ln.vector.bdf == wanted)

    def device_lines(self) -> tuple[IrqLine, ...]:
        return tuple(ln for ln in self.lines if ln.vector is not None)

    def delta(self, later: InterruptSnapshot) -> InterruptDelta:
        return compute_delta(self, later)


# --- parsing -------------------------------------------------------------------------------

_HEADER_CPU = re.compile(r"CPU\d+")
_ROW = re.compile(r"\s*(?P<label>[^\s:]+):(?P<rest>.*)")
_ARCH_LABEL = re.compile(r"[A-Za-z][A-Za-z0-9/_-]{0,15}")
_COUNT = re.compile(r"\s+(\d+)(?=\s|$)")
# Flow handler names seen joined to the chip in kernels before hwirqs were printed (3.x/4.x):
# "IR-PCI-MSI-edge", "IO-APIC-fasteoi", "DMAR_MSI-edge".
_OLD_FLOWS = "edge|level|fasteoi|simple|percpu|percpu_devid|edge_eoi|XT-PIC"
_DESC_JOINED = re.compile(rf"(?P<chip>\S+)-(?P<flow>{_OLD_FLOWS})(?:\s+(?P<actions>.*\S))?\s*")
# "<chip> <hwirq>[ Level|Edge][-flow]  actions": x86 "IR-PCI-MSI 1572865-edge", arm64
# "GICv3  27 Level", or a hwirq with neither "amd_gpio   89  ELAN06FA:00".  Chip names may
# hold spaces ("RISC-V INTC"), hence the lazy chip.
_DESC_HWIRQ = re.compile(
    r"(?P<chip>.+?)\s+(?P<hwirq>\d+)(?:\s+(?P<level>Level|Edge))?(?:\s*-(?P<flow>[A-Za-z_]\w*))?"
    r"(?:\s+(?P<actions>.*\S))?\s*")
# No hwirq (no irq domain): "xen-dyn     Edge    -event     xenbus", "XT-PIC  cascade".
_DESC_PLAIN = re.compile(
    r"(?P<chip>\S+)(?:\s+(?P<level>Level|Edge))?(?:\s*-(?P<flow>[A-Za-z_]\w*))?"
    r"(?:\s+(?P<actions>.*\S))?\s*")


@dataclass(frozen=True)
class _Desc:
    chip: str
    hwirq: int | None
    trigger: str | None
    actions: tuple[str, ...]


def _parse_description(desc: str) -> _Desc | None:
    for pattern in (_DESC_JOINED, _DESC_HWIRQ, _DESC_PLAIN):
        m = pattern.fullmatch(desc)
        if m is None:
            continue
        groups = m.groupdict()
        hwirq = int(groups["hwirq"]) if groups.get("hwirq") else None
        trigger = groups.get("level") or groups.get("flow")
        actions_text = groups.get("actions") or ""
        actions = tuple(a.strip() for a in actions_text.split(", ") if a.strip())
        return _Desc(groups["chip"], hwirq, trigger, actions)
    return None


def _split_counts(rest: str, limit: int) -> tuple[tuple[int, ...], str]:
    counts: list[int] = []
    pos = 0
    while len(counts) < limit:
        m = _COUNT.match(rest, pos)
        if m is None:
            break
        counts.append(int(m.group(1)))
        pos = m.end()
    return tuple(counts), rest[pos:].strip()


def _parse_row(label: str, rest: str, ncpus: int, source: str, lineno: int) -> IrqLine:
    counts, desc = _split_counts(rest, ncpus)
    if not label.isdigit():
        if not _ARCH_LABEL.fullmatch(label):
            raise InterruptsParseError(source, lineno, f"not an IRQ number or arch row: {label!r}")
        if not counts:
            raise InterruptsParseError(source, lineno, f"arch row {label} has no counts")
        return IrqLine(label, counts, None, None, None, (), desc, None)
    if len(counts) != ncpus:
        raise InterruptsParseError(
            source, lineno, f"IRQ {label}: expected {ncpus} per-CPU counts, found {len(counts)}")
    if desc[:1].isdigit():
        # A chip name never starts with a digit: the row has more columns than the header.
        raise InterruptsParseError(
            source, lineno, f"IRQ {label}: more count columns than the {ncpus} CPUs in the header")
    parsed = _parse_description(desc) if desc else None
    if parsed is None:
        raise InterruptsParseError(source, lineno, f"IRQ {label}: no irq chip after the counts")
    vector = _vector_of(parsed.chip, parsed.hwirq, parsed.actions)
    return IrqLine(label, counts, parsed.chip, parsed.hwirq, parsed.trigger, parsed.actions,
                   desc, vector)


def parse_proc_interrupts(text: str, source: str = "", *,
                          taken_at: float | None = None) -> InterruptSnapshot:
    """Parse the whole text of one ``/proc/interrupts`` read.

    Raises :class:`InterruptsParseError` (``source:line: reason``) on anything the kernel
    would not have printed: a missing CPU header, a row without ``LABEL:``, an IRQ row whose
    count columns do not match the header, a repeated IRQ number.  Blank lines are skipped
    (pasted captures often carry them).
    """
    cpus: tuple[str, ...] | None = None
    lines: list[IrqLine] = []
    seen_irqs: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if cpus is None:
            names = tuple(raw.split())
            if not all(_HEADER_CPU.fullmatch(n) for n in names):
                raise InterruptsParseError(source, lineno,
                                           "expected the CPU header line (CPU0 CPU1 ...)")
            cpus = names
            continue
        m = _ROW.match(raw)
        if m is None:
            raise InterruptsParseError(source, lineno, f"expected 'LABEL: counts ...': {raw!r}")
        label = m["label"]
        line = _parse_row(label, m["rest"], len(cpus), source, lineno)
        if not line.is_arch:
            if label in seen_irqs:
                raise InterruptsParseError(source, lineno, f"IRQ {label} appears twice")
            seen_irqs.add(label)
        lines.append(line)
    if cpus is None:
        raise InterruptsParseError(source, 1, "empty: no CPU header line")
    log.debug("parsed %s: %d CPUs, %d rows", source or "<text>", len(cpus), len(lines))
    return InterruptSnapshot(cpus, tuple(lines), source, taken_at)


# --- deltas --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineKey:
    """What makes two rows in two readings the same interrupt source.

    The IRQ number alone is not enough: a freed number is handed to the next request, so
    the chip, hwirq and actions must match too.  Arch rows are told apart by their text
    because ppc64 prints two ``LOC`` rows.
    """

    label: str
    chip: str | None
    hwirq: int | None
    actions: tuple[str, ...]
    arch_text: str = ""

    @classmethod
    def of(cls, line: IrqLine) -> LineKey:
        return cls(line.label, line.chip, line.hwirq, line.actions,
                   line.description if line.is_arch else "")

    def __str__(self) -> str:
        if self.chip is None:
            return self.label
        hw = "" if self.hwirq is None else f" {self.hwirq}"
        return f"{self.label} {self.chip}{hw} {', '.join(self.actions)}".rstrip()


@dataclass(frozen=True)
class VectorDelta:
    """How one row moved between two readings."""

    key: LineKey
    before: IrqLine | None
    after: IrqLine | None
    per_cpu: tuple[int, ...]
    total: int
    status: DeltaStatus
    reset: bool = False  # counts went down: freed and reallocated (or a 32-bit wrap)

    @property
    def line(self) -> IrqLine:
        line = self.after or self.before
        assert line is not None  # one of the two always exists
        return line

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def vector(self) -> VectorId | None:
        return self.line.vector

    def to_dict(self) -> dict[str, object]:
        vec = self.vector
        return {
            "label": self.key.label,
            "chip": self.key.chip,
            "hwirq": self.key.hwirq,
            "actions": list(self.key.actions),
            "name": self.line.name,
            "vector": None if vec is None else {"bdf": vec.bdf, "entry": vec.entry,
                                                "kind": vec.kind},
            "status": self.status,
            "reset": self.reset,
            "per_cpu": list(self.per_cpu),
            "total": self.total,
        }


@dataclass(frozen=True)
class InterruptDelta:
    """Rows of ``after - before``, in the order of ``after`` with vanished rows where they were."""

    before: InterruptSnapshot
    after: InterruptSnapshot
    rows: tuple[VectorDelta, ...]

    @property
    def cpus(self) -> tuple[str, ...]:
        return self.after.cpus

    @property
    def cpus_changed(self) -> bool:
        return self.before.cpus != self.after.cpus

    @property
    def elapsed(self) -> float | None:
        if self.before.taken_at is None or self.after.taken_at is None:
            return None
        return self.after.taken_at - self.before.taken_at

    def __iter__(self) -> Iterator[VectorDelta]:
        return iter(self.rows)

    def changed(self) -> tuple[VectorDelta, ...]:
        """Rows that counted something, appeared, vanished or were reset."""
        return tuple(r for r in self.rows if r.total or r.status != "both" or r.reset)

    def for_device(self, bdf: str) -> tuple[VectorDelta, ...]:
        wanted = normalize_bdf(bdf)
        return tuple(r for r in self.rows if r.vector is not None and r.vector.bdf == wanted)

    def by_label(self, label: str) -> tuple[VectorDelta, ...]:
        return tuple(r for r in self.rows if r.label == label)

    def to_dict(self) -> dict[str, object]:
        return {
            "before": self.before.source,
            "after": self.after.source,
            "elapsed": self.elapsed,
            "cpus": list(self.cpus),
            "cpus_changed": self.cpus_changed,
            "rows": [r.to_dict() for r in self.rows],
        }


def _aligned_before(before: InterruptSnapshot, after: InterruptSnapshot,
                    old: IrqLine, new: IrqLine) -> tuple[int, ...]:
    per_cpu = len(old.counts) == len(before.cpus) and len(new.counts) == len(after.cpus)
    if per_cpu and before.cpus != after.cpus:
        # CPUs went on/offline: line counts up by CPU name.  A CPU that came online shows
        # its whole history, which the harness cannot separate from the window.
        by_cpu = dict(zip(before.cpus, old.counts, strict=True))
        return tuple(by_cpu.get(cpu, 0) for cpu in after.cpus)
    return tuple(old.counts[i] if i < len(old.counts) else 0 for i in range(len(new.counts)))


def _both(before: InterruptSnapshot, after: InterruptSnapshot, key: LineKey,
          old: IrqLine, new: IrqLine) -> VectorDelta:
    base = _aligned_before(before, after, old, new)
    diff = tuple(n - b for n, b in zip(new.counts, base, strict=True))
    if any(d < 0 for d in diff):
        log.debug("%s counted down: treating as freed and reallocated", key)
        return VectorDelta(key, old, new, new.counts, new.total, "both", reset=True)
    return VectorDelta(key, old, new, diff, sum(diff), "both")


def compute_delta(before: InterruptSnapshot, after: InterruptSnapshot) -> InterruptDelta:
    """Match rows by :class:`LineKey`; a reused IRQ number gives a vanished and an appeared row."""
    pending: dict[LineKey, list[IrqLine]] = {}
    for line in before.lines:
        pending.setdefault(LineKey.of(line), []).append(line)
    matched: dict[int, VectorDelta] = {}  # id(before line) -> row, to place it in order
    rows: list[VectorDelta] = []
    for new in after.lines:
        key = LineKey.of(new)
        olds = pending.get(key)
        if olds:
            old = olds.pop(0)
            row = _both(before, after, key, old, new)
            matched[id(old)] = row
        else:
            row = VectorDelta(key, None, new, new.counts, new.total, "appeared")
        rows.append(row)
    vanished = [ln for lns in pending.values() for ln in lns]
    if vanished:
        rows = _insert_vanished(before, rows, matched, vanished)
    return InterruptDelta(before, after, tuple(rows))


def _insert_vanished(before: InterruptSnapshot, rows: list[VectorDelta],
                     matched: dict[int, VectorDelta], vanished: list[IrqLine]) -> list[VectorDelta]:
    # Put each vanished row after the row that preceded it in `before`, so a reused
    # number reads "vanished, appeared" next to each other in a table.
    gone = {id(ln) for ln in vanished}
    follows: dict[int, list[VectorDelta]] = {}
    anchor: int | None = None
    head: list[VectorDelta] = []
    for line in before.lines:
        if id(line) in gone:
            row = VectorDelta(LineKey.of(line), line, None, tuple(0 for _ in line.counts), 0,
                              "vanished")
            (follows.setdefault(anchor, []) if anchor is not None else head).append(row)
        else:
            anchor = id(matched[id(line)])
    out = list(head)
    for row in rows:
        out.append(row)
        out.extend(follows.get(id(row), ()))
    return out


# --- presentation --------------------------------------------------------------------------


def format_table(delta: InterruptDelta, *, changed_only: bool = True,
                 rows: Iterable[VectorDelta] | None = None) -> str:
    """A fixed-width table for ``harness irq diff BEFORE AFTER``.

    Columns: IRQ label, device BDF, MSI/MSI-X entry, name, the delta per CPU, the total and
    a note (appeared, vanished, reset).  Single-count rows (ERR, MIS) leave the CPU cells empty.
    """
    chosen = list(rows) if rows is not None else list(
        delta.changed() if changed_only else delta.rows)
    cpus = list(delta.cpus)
    header = ["IRQ", "DEVICE", "ENTRY", "NAME", *cpus, "TOTAL", "NOTE"]
    body: list[list[str]] = []
    for r in chosen:
        vec = r.vector
        cells = (list(map(str, r.per_cpu)) if len(r.per_cpu) == len(cpus)
                 else [""] * len(cpus))
        note = r.status if r.status != "both" else ("reset" if r.reset else "")
        body.append([r.label, vec.bdf if vec else "-", str(vec.entry) if vec else "-",
                     r.line.name, *cells, str(r.total), note])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    numeric = set(range(4, 4 + len(cpus) + 1)) | {2}

    def render(row: list[str]) -> str:
        parts = [cell.rjust(w) if i in numeric else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(parts).rstrip()

    out = [render(header), render(["-" * w for w in widths])]
    out.extend(render(row) for row in body)
    return "\n".join(out) + "\n"
