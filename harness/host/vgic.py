"""arm64 KVM's own view of a guest's interrupts: ``vgic-state`` in debugfs, and GICv4 doorbells.

``/sys/kernel/debug/kvm/<pid>-<fd>/vgic-state`` (arch/arm64/kvm/vgic/vgic-debug.c) lists a
VM's distributor settings and every SGI, PPI, SPI and LPI with its flags; an LPI whose ``H``
(hw) flag is set is a vLPI that KVM forwarded to the GICv4 ITS (``its_map_vlpi``).  The file
prints no host irq for an LPI (its HWID column is ``hwintid``, 0 for a vLPI), so an LPI cannot
be joined to one host vector: the evidence is per VM, the number of LPIs with H set, which
:class:`VgicAgreement` compares with the vLPI mappings the trace showed for that VM.  GICv4
doorbells (request_irq "vcpu" on the ``GICv4-vpe`` chip) are read from /proc/interrupts.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import TextParseError
from harness.interrupts import InterruptDelta

log = logging.getLogger(__name__)

KVM_DEBUGFS = Path("/sys/kernel/debug/kvm")
PROC = Path("/proc")

# The flag columns of 6.1's print_irq_state(), in the header's order "PLAEHCG".
FLAG_LETTERS = frozenset("PLAEHCG")
# irq-gic-v3-its.c names the vPE irqchips; vgic-v4.c requests each doorbell as "vcpu".
DOORBELL_CHIPS = frozenset({"GICv4-vpe", "GICv4.1-vpe"})
DOORBELL_ACTION = "vcpu"


class VgicStateParseError(TextParseError):
    """``vgic-state`` text that is not what vgic-debug.c prints: ``source:line: reason``."""


# --- the file's values ---------------------------------------------------------------------


@dataclass(frozen=True)
class VgicIrq:
    """One row of the irq table: ``TYP ID TGT_ID PLAEHCG HWID TARGET SRC PRI VCPU_ID``."""

    kind: str  # SGI | PPI | SPI | LPI
    intid: int
    target_vcpu: int  # -1: none
    pending: bool  # P (pending_latch, or the vSGI's pending state)
    line_level: bool  # L
    active: bool  # A
    enabled: bool  # E
    hw: bool  # H: backed by a host interrupt (for an LPI: a vLPI mapped by its_map_vlpi)
    level: bool  # C: config, level=1 edge=0
    group: bool  # G
    hwintid: int  # HWID: the physical INTID of a hw SPI/PPI; 0 for a vLPI
    mpidr: int  # TARGET (hex)
    source: int  # SRC (hex, SGI sources)
    priority: int  # PRI
    vcpu: int  # VCPU_ID: the vCPU whose list holds it, -1 when on none
    section: str  # the table header it is under: "VCPU 0" or "SPI"


@dataclass(frozen=True)
class VgicState:
    """One read of one VM's ``vgic-state``."""

    source: str
    model: str  # "GICv3" | "GICv2"
    nr_spis: int
    nr_lpis: int | None  # printed for GICv3 only
    enabled: bool
    irqs: tuple[VgicIrq, ...]  # empty when the vgic was not initialized yet
    freed_lpis: tuple[int, ...] = ()  # "LPI n freed": gone between listing and printing

    @property
    def lpis(self) -> tuple[VgicIrq, ...]:
        return tuple(i for i in self.irqs if i.kind == "LPI")

    @property
    def hw_lpis(self) -> tuple[VgicIrq, ...]:
        """LPIs with H set: vLPIs forwarded to the GICv4 ITS."""
        return tuple(i for i in self.lpis if i.hw)


# --- parsing -------------------------------------------------------------------------------

_HEADER = re.compile(
    r"(?P<section>VCPU|SPI)\s*(?P<id>\d+) TYP\s+ID\s+TGT_ID\s+(?P<flags>[A-Z]+)\s+HWID\s+"
    r"TARGET\s+SRC\s+PRI\s+VCPU_ID")
_ROW = re.compile(
    r"\s*(?P<kind>SGI|PPI|SPI|LPI)\s+(?P<intid>\d+)\s+(?P<tgt>-?\d+)\s+(?P<flags>[01]+)\s+"
    r"(?P<hwid>-?\d+)\s+(?P<mpidr>[0-9a-f]+)\s+(?P<src>[0-9a-f]+)\s+(?P<pri>\d+)\s+"
    r"(?P<vcpu>-?\d+)\s*")
_FREED = re.compile(r"\s*LPI\s+(?P<intid>\d+) freed\s*")
_SETTING = re.compile(r"(?P<key>[a-z_]+):\s*(?P<value>\S+)\s*")
_LEGEND = ("P=", "E=", "G=")


def _settings(lines: list[str], source: str) -> tuple[dict[str, str], int]:
    """The distributor block; returns the settings and the index of the line after them."""
    if len(lines) < 2 or lines[0].strip() != "Distributor" or not re.fullmatch(
            r"=+", lines[1].strip()):
        raise VgicStateParseError(source, 1, "expected the 'Distributor' heading")
    settings: dict[str, str] = {}
    index = 2
    while index < len(lines) and lines[index].strip():
        m = _SETTING.fullmatch(lines[index])
        if m is None:
            raise VgicStateParseError(source, index + 1,
                                      f"expected 'key:<tab>value': {lines[index]!r}")
        settings[m["key"]] = m["value"]
        index += 1
    for key in ("vgic_model", "nr_spis", "enabled"):
        if key not in settings:
            raise VgicStateParseError(source, index, f"the distributor block has no {key}")
    return settings, index


def _irq(m: re.Match[str], letters: str, section: str) -> VgicIrq:
    flags = dict(zip(letters, (c == "1" for c in m["flags"]), strict=True))
    return VgicIrq(m["kind"], int(m["intid"]), int(m["tgt"]), flags["P"], flags["L"],
                   flags["A"], flags["E"], flags["H"], flags["C"], flags["G"],
                   int(m["hwid"]), int(m["mpidr"], 16), int(m["src"], 16), int(m["pri"]),
                   int(m["vcpu"]), section)


def parse_vgic_state(text: str, source: str = "") -> VgicState:
    """Parse one whole read of ``vgic-state`` (6.1 format, unchanged to at least 6.12).

    Raises :class:`VgicStateParseError` on anything vgic-debug.c would not print: no
    distributor block, a row before any table header, a flag column other than the seven
    letters PLAEHCG, a row whose flags do not match its header.
    """
    lines = text.splitlines()
    settings, index = _settings(lines, source)
    irqs: list[VgicIrq] = []
    freed: list[int] = []
    letters: str | None = None
    section = ""
    for lineno in range(index + 1, len(lines) + 1):
        raw = lines[lineno - 1]
        stripped = raw.strip()
        if not stripped or stripped.startswith(_LEGEND) or re.fullmatch(r"-+", stripped):
            continue
        header = _HEADER.fullmatch(stripped)
        if header is not None:
            if set(header["flags"]) != FLAG_LETTERS or len(header["flags"]) != 7:
                raise VgicStateParseError(source, lineno, "unknown flag columns "
                                          f"{header['flags']!r} (expected the letters PLAEHCG)")
            letters = header["flags"]
            section = ("VCPU " + header["id"]) if header["section"] == "VCPU" else "SPI"
            continue
        freed_row = _FREED.fullmatch(raw)
        if freed_row is not None:
            freed.append(int(freed_row["intid"]))
            continue
        row = _ROW.fullmatch(raw)
        if row is None:
            raise VgicStateParseError(source, lineno, f"not an irq row: {raw!r}")
        if letters is None:
            raise VgicStateParseError(source, lineno, "an irq row before any table header")
        if len(row["flags"]) != len(letters):
            raise VgicStateParseError(source, lineno, f"{len(row['flags'])} flags under the "
                                      f"{len(letters)} columns {letters}")
        irqs.append(_irq(row, letters, section))
    nr_lpis = settings.get("nr_lpis")
    return VgicState(source, settings["vgic_model"], int(settings["nr_spis"]),
                     int(nr_lpis) if nr_lpis is not None else None,
                     settings["enabled"] == "1", tuple(irqs), tuple(freed))


# --- finding and reading the files ---------------------------------------------------------


@dataclass(frozen=True)
class VmVgic:
    """One KVM VM's debugfs directory and its vgic-state, or why it could not be read."""

    pid: int  # the task that created the VM (QEMU's main thread: the process id)
    fd: int  # the VM's fd in that process
    path: str
    state: VgicState | None
    note: str = ""  # why ``state`` is None
    text: str = field(default="", repr=False, compare=False)  # the raw read, kept as evidence


def kvm_vm_dirs(root: Path = KVM_DEBUGFS) -> tuple[tuple[int, int, Path], ...]:
    """Every VM directory ``<pid>-<fd>`` under KVM's debugfs, as (pid, fd, path).

    Raises OSError when ``root`` cannot be listed (debugfs not mounted, KVM not loaded, not
    root); the caller explains it.
    """
    found = []
    for entry in root.iterdir():
        m = re.fullmatch(r"(\d+)-(\d+)", entry.name)
        if m and entry.is_dir():
            found.append((int(m[1]), int(m[2]), entry))
    return tuple(sorted(found, key=lambda f: (f[0], f[1])))


def kvm_debugfs_dirs(pid: int, root: Path = KVM_DEBUGFS) -> tuple[Path, ...]:
    """The KVM debugfs directories of the VMs a QEMU process created (one, in practice;
    QEMU's short-lived scratch VMs for probing host CPU features are gone once it runs)."""
    return tuple(path for owner, _, path in kvm_vm_dirs(root) if owner == pid)


def read_vgic_state(vm_dir: Path) -> VmVgic:
    """Read and parse ``vm_dir/vgic-state``; a missing or unreadable file gives a note."""
    m = re.fullmatch(r"(\d+)-(\d+)", vm_dir.name)
    pid, fd = (int(m[1]), int(m[2])) if m else (-1, -1)
    path = vm_dir / "vgic-state"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return VmVgic(pid, fd, str(path), None, f"{path} does not exist (no vgic: not a GIC "
                      "KVM VM, or its vgic was never created)")
    except OSError as exc:
        why = ("another reader holds it (EBUSY)" if exc.errno == errno.EBUSY
               else exc.strerror or str(exc))
        return VmVgic(pid, fd, str(path), None, f"cannot read {path}: {why}")
    try:
        return VmVgic(pid, fd, str(path), parse_vgic_state(text, str(path)), text=text)
    except VgicStateParseError as exc:
        return VmVgic(pid, fd, str(path), None, f"unexpected vgic-state format: {exc}",
                      text=text)


def task_tgid(tid: int, proc: Path = PROC) -> int | None:
    """The process (thread group) of a task id from a trace record; None once it is gone.

    A trace record carries the thread's id: QEMU registers vfio producers from a vCPU
    thread, while the KVM debugfs directory is named for the main thread that made the VM.
    """
    try:
        status = (proc / str(tid) / "status").read_text()
    except OSError:
        return None
    m = re.search(r"^Tgid:\s*(\d+)$", status, re.M)
    return int(m[1]) if m else None


# --- the trace against the state ---------------------------------------------------------------


@dataclass(frozen=True)
class VgicAgreement:
    """One VM's vgic-state against the vLPI mappings in force in the trace for that VM.

    vgic-state names no host irq for an LPI, so the check is by count: every vLPI the trace
    shows mapped (its_map_vlpi returned 0, no unset/unmap since) is one LPI with H set, and
    no LPI has H set that the trace did not map.
    """

    vm_pid: int
    sources: tuple[str, ...]
    lpis: int
    hw_lpis: int
    traced_vlpis: tuple[int, ...]  # host irqs with a vLPI mapping in force in the trace
    joined_by: str  # how the vector's task was joined to this VM
    forwarding_probes: bool = True  # False: the GICv4 probes were skipped on this host

    source = "vgic-state"

    @property
    def agrees(self) -> bool:
        return self.hw_lpis == len(self.traced_vlpis)

    @property
    def summary(self) -> str:
        irqs = ", ".join(str(i) for i in self.traced_vlpis)
        traced = (f"{len(self.traced_vlpis)} vLPI mapping(s) in force in the trace"
                  + (f" (host irqs {irqs})" if irqs else ""))
        if not self.forwarding_probes:
            traced += " (the GICv4 forwarding probes were not in place)"
        return (f"VM of pid {self.vm_pid}: {self.hw_lpis} of {self.lpis} LPIs with H (hw) set "
                f"in vgic-state, {traced}")

    @property
    def disagreement(self) -> str:
        """What contradicts what, or "" when they agree."""
        traced = len(self.traced_vlpis)
        if self.hw_lpis < traced:
            return (f"forwarded in the trace but {'no' if self.hw_lpis == 0 else 'too few'} "
                    f"H LPIs: {self.summary}")
        if self.hw_lpis > traced:
            return f"H LPIs without traced forwarding: {self.summary}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"vm_pid": self.vm_pid, "sources": list(self.sources), "lpis": self.lpis,
                "hw_lpis": self.hw_lpis, "traced_vlpis": list(self.traced_vlpis),
                "joined_by": self.joined_by, "agrees": self.agrees, "summary": self.summary,
                "source": self.source}


def agreement(vm_pid: int, vms: Sequence[VmVgic], traced_vlpis: Sequence[int],
              joined_by: str, forwarding_probes: bool = True) -> VgicAgreement | None:
    """Compare the readable vgic-states of one VM (all its debugfs dirs) with the trace; None
    when none of them could be read."""
    states = [vm.state for vm in vms if vm.pid == vm_pid and vm.state is not None]
    if not states:
        return None
    return VgicAgreement(vm_pid, tuple(s.source for s in states),
                         sum(len(s.lpis) for s in states),
                         sum(len(s.hw_lpis) for s in states),
                         tuple(sorted(traced_vlpis)), joined_by, forwarding_probes)


# --- GICv4 doorbells -------------------------------------------------------------------------


@dataclass(frozen=True)
class DoorbellDelta:
    """One vPE doorbell between two /proc/interrupts reads.

    A GICv4.0 doorbell fires when a vLPI becomes pending for a vCPU that is not running
    (blocked in WFI): the host sees the doorbell, never the device's own vector, so doorbells
    are part of direct injection, not a bounce.
    """

    irq: str
    chip: str
    hwirq: int | None  # the vPE's index in its VM's vPE domain
    per_cpu: tuple[int, ...]
    total: int
    status: str  # "both" | "appeared" | "vanished"

    def describe(self) -> str:
        seen = "" if self.status == "both" else f" ({self.status})"
        return f"irq {self.irq} ({self.chip} {self.hwirq}) +{self.total}{seen}"


def doorbell_deltas(delta: InterruptDelta) -> tuple[DoorbellDelta, ...]:
    """The GICv4 vPE doorbell rows of a host delta: action "vcpu" on a GICv4(.1)-vpe chip."""
    return tuple(DoorbellDelta(row.label, row.line.chip or "", row.line.hwirq, row.per_cpu,
                               row.total, row.status)
                 for row in delta.rows
                 if row.line.chip in DOORBELL_CHIPS and DOORBELL_ACTION in row.line.actions)
