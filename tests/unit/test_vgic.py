"""vgic-state, GICv4 doorbells, and their join with the bypass trace on the host side.

The vgic-state texts in tests/data/vgic/ are one real excerpt (quoted on linux-pci in 2024)
and texts CONSTRUCTED, not recorded, in the exact 6.1 vgic-debug.c format from the values of
shared/notes/arm-lab-facts.md (tests/data/vgic/README.md).  The traces and /proc/interrupts
samples are the constructed arm64 lab runs of tests/data/trace/arm64-gicv4/ (README there).
The debugfs and /proc trees are directories made in tmp_path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.bypass.tracker import BypassTracker, VlpiState
from harness.config.model import DeliveryPath
from harness.host.tracefs import KprobeSession, parse_trace
from harness.host.vgic import (
    VgicAgreement,
    VgicStateParseError,
    VmVgic,
    agreement,
    doorbell_deltas,
    kvm_debugfs_dirs,
    kvm_vm_dirs,
    parse_vgic_state,
    read_vgic_state,
    task_tgid,
)
from harness.hostside import HostEvidence, HostSnapshot, join_vgic_state
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts
from harness.platform import ARM64, X86_64
from harness.verdict import classify

DATA = Path(__file__).resolve().parents[1] / "data"
VGIC = DATA / "vgic"
ARM = DATA / "trace" / "arm64-gicv4"
BDF = "0000:00:02.0"


def text(name: str) -> str:
    """A file of tests/data/vgic without its '#' header (the kernel prints none)."""
    return "".join(ln for ln in (VGIC / name).read_text().splitlines(keepends=True)
                   if not ln.startswith("#"))


DEFAULT = text("constructed-default-3-hw-lpis.txt")
NO_HW = text("constructed-no-kvm-msix-3-lpis.txt")

# Constructed per print_dist_state(): a GICv2 VM whose vgic is not initialized yet prints
# the distributor block and the legend only (no nr_lpis line: GICv3 only).
GICV2_UNINITIALIZED = ("Distributor\n===========\nvgic_model:\tGICv2\nnr_spis:\t0\n"
                       "enabled:\t0\n\nP=pending_latch, L=line_level, A=active\n"
                       "E=enabled, H=hw, C=config (level=1, edge=0)\nG=group\n")


# --- the parser ----------------------------------------------------------------------------


def test_constructed_default_state_has_three_hw_lpis() -> None:
    state = parse_vgic_state(DEFAULT, "default")
    assert (state.model, state.nr_spis, state.nr_lpis, state.enabled) == ("GICv3", 256, 3, True)
    assert len(state.irqs) == 32 + 256 + 3
    assert [i.intid for i in state.hw_lpis] == [8192, 8193, 8194]
    lpi = state.lpis[0]
    assert (lpi.pending, lpi.line_level, lpi.active, lpi.enabled, lpi.hw, lpi.level,
            lpi.group) == (False, False, False, True, True, False, True)
    assert (lpi.hwintid, lpi.priority, lpi.vcpu, lpi.target_vcpu, lpi.section) == (
        0, 160, -1, 0, "SPI")
    timer = next(i for i in state.irqs if i.intid == 27)
    assert (timer.kind, timer.hw, timer.hwintid, timer.section) == ("PPI", True, 27, "VCPU 0")
    assert state.freed_lpis == ()


def test_constructed_no_kvm_msix_state_has_enabled_lpis_without_hw() -> None:
    state = parse_vgic_state(NO_HW)
    assert len(state.lpis) == 3 and state.hw_lpis == ()
    assert all(i.enabled and not i.hw for i in state.lpis)


def test_recorded_lkml_excerpt() -> None:
    """Real output: 7 LPIs, 8192 and 8321 pending, none enabled ("never unmasked")."""
    state = parse_vgic_state(text("recorded-lkml-2024-06-29-lpis-excerpt.txt"))
    assert (state.nr_spis, state.nr_lpis) == (32, 7)
    assert [i.intid for i in state.lpis] == [8192, 8193, 8194, 8256, 8257, 8320, 8321]
    assert [i.intid for i in state.lpis if i.pending] == [8192, 8321]
    assert not any(i.enabled or i.hw for i in state.lpis)
    assert [i.target_vcpu for i in state.lpis] == list(range(7))


def test_an_uninitialized_gicv2_vgic_lists_no_irqs() -> None:
    state = parse_vgic_state(GICV2_UNINITIALIZED)
    assert (state.model, state.nr_lpis, state.enabled, state.irqs) == ("GICv2", None, False, ())


def test_a_freed_lpi_is_noted() -> None:
    state = parse_vgic_state(DEFAULT.replace(
        "       LPI 8193      0 0001101        0        0   0 160      -1 ",
        "       LPI 8193 freed"))
    assert state.freed_lpis == (8193,) and [i.intid for i in state.hw_lpis] == [8192, 8194]


@pytest.mark.parametrize(("edit", "line", "message"), [
    (lambda t: t.replace("Distributor", "Distributer"), 1, "'Distributor' heading"),
    (lambda t: t.replace("nr_spis:\t256\n", ""), 5, "no nr_spis"),
    (lambda t: t.replace("nr_spis:\t256", "nr_spis 256"), 4, "key:<tab>value"),
    (lambda t: t.replace("PLAEHCG", "PLAEHCX"), 12, "unknown flag columns"),
    (lambda t: t.replace("VCPU 0 TYP", "VCPU 0 TPY"), 12, "not an irq row"),
    (lambda t: t.replace("SGI    0      0 0001001", "SGI    0      0 001001"), 14, "6 flags"),
    (lambda t: t.replace("       SGI    1 ", "       XYZ    1 "), 15, "not an irq row"),
])
def test_text_the_kernel_would_not_print_is_refused_with_its_line(
        edit: Callable[[str], str], line: int, message: str) -> None:
    with pytest.raises(VgicStateParseError, match=re.escape(message)) as caught:
        parse_vgic_state(edit(DEFAULT), "vgic-state")
    assert caught.value.line == line, caught.value


def test_a_row_before_any_header_is_refused() -> None:
    broken = DEFAULT.replace("VCPU 0 TYP   ID TGT_ID PLAEHCG     HWID   TARGET SRC PRI VCPU_ID\n",
                             "")
    with pytest.raises(VgicStateParseError, match="before any table header"):
        parse_vgic_state(broken)


# --- finding and reading the files ---------------------------------------------------------


def fake_debugfs(tmp_path: Path, states: dict[str, str | None]) -> Path:
    """``kvm/<pid>-<fd>/vgic-state`` per entry (None: the directory without the file)."""
    root = tmp_path / "kvm"
    root.mkdir()
    for name, content in states.items():
        (root / name).mkdir()
        if content is not None:
            (root / name / "vgic-state").write_text(content)
    return root


def fake_proc(tmp_path: Path, tasks: dict[int, int]) -> Path:
    proc = tmp_path / "proc"
    for tid, tgid in tasks.items():
        (proc / str(tid)).mkdir(parents=True)
        (proc / str(tid) / "status").write_text(f"Name:\tqemu-system-aar\nTgid:\t{tgid}\n"
                                                f"Pid:\t{tid}\n")
    return proc


def test_the_kvm_debugfs_dirs_of_a_qemu_pid(tmp_path: Path) -> None:
    root = fake_debugfs(tmp_path, {"301-11": DEFAULT, "301-14": None, "455-9": NO_HW})
    (root / "vcpu0").mkdir()  # not a VM directory
    (root / "301-15").write_text("")  # not a directory
    assert [(p, f) for p, f, _ in kvm_vm_dirs(root)] == [(301, 11), (301, 14), (455, 9)]
    assert [d.name for d in kvm_debugfs_dirs(301, root)] == ["301-11", "301-14"]
    assert kvm_debugfs_dirs(999, root) == ()
    with pytest.raises(OSError):
        kvm_vm_dirs(tmp_path / "absent")


def test_reading_gives_a_state_or_a_note(tmp_path: Path) -> None:
    root = fake_debugfs(tmp_path, {"301-11": DEFAULT, "301-14": None, "455-9": "garbage\n"})
    good = read_vgic_state(root / "301-11")
    assert (good.pid, good.fd, good.note) == (301, 11, "") and good.state is not None
    assert good.text == DEFAULT
    missing = read_vgic_state(root / "301-14")
    assert missing.state is None and "does not exist" in missing.note
    bad = read_vgic_state(root / "455-9")
    assert bad.state is None and "unexpected vgic-state format" in bad.note
    assert bad.text == "garbage\n"  # kept as evidence


def test_task_tgid(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {306: 301, 301: 301})
    assert task_tgid(306, proc) == 301 and task_tgid(301, proc) == 301
    assert task_tgid(307, proc) is None


# --- doorbells -------------------------------------------------------------------------------


def samples(run: str) -> list[tuple[float, InterruptSnapshot]]:
    body = (ARM / run / "l1-interrupts-during.txt").read_text()
    parts = re.split(r"^# sample \d+ t=([\d.]+)\n", body, flags=re.M)[1:]
    return [(float(t), parse_proc_interrupts(b, f"{run}:{t}"))
            for t, b in zip(parts[0::2], parts[1::2], strict=True)]


def test_doorbells_are_the_vcpu_lines_of_the_vpe_chip() -> None:
    """The doorbell row of the constructed samples is invented (README): the parse is tested."""
    (_, first), (_, last) = samples("default")
    (bell,) = doorbell_deltas(first.delta(last))
    assert (bell.irq, bell.chip, bell.hwirq, bell.total, bell.status) == (
        "25", "GICv4-vpe", 0, 71, "both")
    assert bell.describe() == "irq 25 (GICv4-vpe 0) +71"
    (_, first), (_, last) = samples("gicv4-off")
    assert doorbell_deltas(first.delta(last)) == ()  # no vPE doorbells without GICv4


# --- the trace against the state -------------------------------------------------------------


def vm(pid: int, fd: int, content: str) -> VmVgic:
    return VmVgic(pid, fd, f"/kvm/{pid}-{fd}/vgic-state", parse_vgic_state(content))


def test_agreement_counts_hw_lpis_of_every_dir_of_the_vm() -> None:
    vms = [vm(301, 11, DEFAULT), vm(301, 14, GICV2_UNINITIALIZED), vm(455, 9, NO_HW)]
    check = agreement(301, vms, (28, 26, 27), "by hand")
    assert check is not None and check.agrees and check.traced_vlpis == (26, 27, 28)
    assert (check.lpis, check.hw_lpis, len(check.sources)) == (3, 3, 2)
    other = agreement(455, vms, (26,), "by hand")
    assert other is not None and not other.agrees
    assert other.disagreement.startswith("forwarded in the trace but no H LPIs")
    assert agreement(999, vms, (), "by hand") is None


def default_tracker() -> BypassTracker:
    """The constructed default run up to its last sample: 26, 27, 28 forwarded by task 306."""
    t, _ = samples("default")[-1]
    tracker = BypassTracker()
    trace = (ARM / "default" / "trace.txt").read_text().splitlines()
    tracker.feed(r for r in parse_trace(trace) if r.timestamp <= t)
    return tracker


def test_join_by_the_forwarding_tasks_process() -> None:
    tracker = default_tracker()
    wiring = tracker.wiring(samples("default")[-1][1])
    joined = join_vgic_state(wiring, tracker.vlpi, [vm(301, 11, DEFAULT), vm(455, 9, NO_HW)],
                             {306: 301}.get)
    assert joined.anomalies == () and joined.notes == ()
    for w in joined.wiring:
        assert isinstance(w.state, VgicAgreement)
        assert w.state.agrees and w.state.vm_pid == 301
        assert w.state.joined_by == "task 306 belongs to process 301"


def test_join_falls_back_to_the_only_vm_when_the_task_is_gone() -> None:
    tracker = default_tracker()
    wiring = tracker.wiring(samples("default")[-1][1])
    joined = join_vgic_state(wiring, tracker.vlpi, [vm(301, 11, DEFAULT)], lambda tid: None)
    assert all(w.state is not None and w.state.agrees for w in joined.wiring)
    state = joined.wiring[0].state
    assert isinstance(state, VgicAgreement)
    assert "the only VM with a vgic-state" in state.joined_by
    # With two VMs and no process for the task there is no guessing.
    two = join_vgic_state(wiring, tracker.vlpi, [vm(301, 11, DEFAULT), vm(455, 9, NO_HW)],
                          lambda tid: None)
    assert all(w.state is None for w in two.wiring)
    assert len(two.notes) == 4  # each of the 3 vectors, and the unjoined vLPI mappings
    assert "task 306 is in none of the VMs with a readable vgic-state [301, 455]" in two.notes[0]


def test_join_never_lends_another_vms_state_to_a_known_process() -> None:
    """Task 306 is alive in process 301, whose vgic-state could not be read; 455's could."""
    tracker = default_tracker()
    wiring = tracker.wiring(samples("default")[-1][1])
    unreadable = VmVgic(301, 11, "/kvm/301-11/vgic-state", None, "EBUSY")
    joined = join_vgic_state(wiring, tracker.vlpi, [unreadable, vm(455, 9, NO_HW)],
                             {306: 301}.get)
    assert all(w.state is None for w in joined.wiring) and joined.anomalies == ()
    assert len(joined.notes) == 4


def test_join_records_a_disagreement_once_per_vm() -> None:
    tracker = default_tracker()
    wiring = tracker.wiring(samples("default")[-1][1])
    joined = join_vgic_state(wiring, tracker.vlpi, [vm(301, 11, NO_HW)], {306: 301}.get)
    assert joined.anomalies == ("anomaly vgic-state-disagrees: forwarded in the trace but no "
                                "H LPIs: VM of pid 301: 0 of 3 LPIs with H (hw) set in "
                                "vgic-state, 3 vLPI mapping(s) in force in the trace (host "
                                "irqs 26, 27, 28)",)
    assert all(w.state is not None and not w.state.agrees for w in joined.wiring)


def test_join_without_any_readable_state_changes_nothing() -> None:
    tracker = default_tracker()
    wiring = tracker.wiring(samples("default")[-1][1])
    unreadable = [VmVgic(301, 11, "/kvm/301-11/vgic-state", None, "gone")]
    joined = join_vgic_state(wiring, tracker.vlpi, unreadable, {306: 301}.get)
    assert joined.wiring == tuple(wiring) and joined.anomalies == () and joined.notes == ()


def test_vlpis_unmapped_in_the_trace_are_not_counted() -> None:
    vlpis = {26: VlpiState(26, True, 306, 1.0, "x"), 27: VlpiState(27, False, 98, 2.0, "y")}
    tracker = default_tracker()
    wiring = tracker.wiring(samples("default")[-1][1])
    joined = join_vgic_state(wiring, vlpis, [vm(301, 11, DEFAULT)], {306: 301, 98: 2}.get)
    state = joined.wiring[0].state
    assert isinstance(state, VgicAgreement)
    assert state.traced_vlpis == (26,) and not state.agrees


# --- HostEvidence.measure, end to end ----------------------------------------------------------


class RecordedSession(KprobeSession):
    """A session whose buffer is a recorded (here: constructed) trace."""

    def __init__(self, trace: str) -> None:
        super().__init__("recorded", [])
        self.trace = trace

    def read(self) -> str:
        return self.trace


def evidence(tmp_path: Path, run: str, machine: str, debugfs: Path) -> HostEvidence:
    t = samples(run)[-1][0]
    trace = "".join(ln for ln in (ARM / run / "trace.txt").read_text().splitlines(True)
                    if (r := next(parse_trace([ln]), None)) is None or r.timestamp <= t)
    (tmp_path / "run").mkdir()
    host = HostEvidence(tmp_path / "run", [BDF], None, machine=machine, kvm_debugfs=debugfs,
                        proc=fake_proc(tmp_path, {306: 301, 301: 301}))
    host._session = RecordedSession(trace)
    return host


def test_measure_on_arm64_joins_vgic_state_and_counts_doorbells(tmp_path: Path) -> None:
    root = fake_debugfs(tmp_path, {"301-11": DEFAULT})
    host = evidence(tmp_path, "default", ARM64.uname, root)
    (_, first), (_, last) = samples("default")
    m = host.measure(HostSnapshot("", first), HostSnapshot("", last))
    assert m.anomalies == () and m.vgic_notes == ()
    assert [d.describe() for d in m.doorbells] == ["irq 25 (GICv4-vpe 0) +71"]
    assert 'GICv4 doorbells ("vcpu" on the vPE irqchip): irq 25 (GICv4-vpe 0) +71' in m.notes()
    assert (tmp_path / "run" / "host.vgic-state.301-11").read_text() == DEFAULT
    assert (tmp_path / "run" / "host.bypass.trace").is_file()
    w = m.wiring_for(BDF, 1)
    assert w is not None and w.state is not None and w.state.agrees
    assert w.to_dict()["state"]["summary"].startswith("VM of pid 301: 3 of 3 LPIs")
    path, reason = classify(False, 102, m.host_delta(BDF, 1), w.as_verdict_wiring())
    assert path is DeliveryPath.POSTED, reason


def test_measure_on_arm64_with_a_contradicting_state_gives_no_verdict(tmp_path: Path) -> None:
    root = fake_debugfs(tmp_path, {"301-11": NO_HW})
    host = evidence(tmp_path, "default", ARM64.uname, root)
    (_, first), (_, last) = samples("default")
    m = host.measure(HostSnapshot("", first), HostSnapshot("", last))
    assert [a.split(":")[0] for a in m.anomalies] == ["anomaly vgic-state-disagrees"]
    w = m.wiring_for(BDF, 1)
    assert w is not None
    path, reason = classify(False, 102, m.host_delta(BDF, 1), w.as_verdict_wiring())
    assert path is None and "disagree" in reason


def test_measure_on_arm64_without_debugfs_explains_and_still_judges(tmp_path: Path) -> None:
    host = evidence(tmp_path, "default", ARM64.uname, tmp_path / "no-debugfs" / "kvm")
    (_, first), (_, last) = samples("default")
    m = host.measure(HostSnapshot("", first), HostSnapshot("", last))
    assert m.vgic == () and len(m.vgic_notes) == 1
    assert m.vgic_notes[0].startswith("vgic-state not read: ")
    assert "does not exist (debugfs not mounted" in m.vgic_notes[0]
    w = m.wiring_for(BDF, 1)
    assert w is not None and w.state is None
    path, reason = classify(False, 102, m.host_delta(BDF, 1), w.as_verdict_wiring())
    assert path is DeliveryPath.POSTED and reason.endswith("vgic-state not read")


def test_measure_on_arm64_with_a_vm_without_the_file_explains(tmp_path: Path) -> None:
    root = fake_debugfs(tmp_path, {"301-11": None})
    host = evidence(tmp_path, "gicv4-off", ARM64.uname, root)
    (_, first), (_, last) = samples("gicv4-off")
    m = host.measure(HostSnapshot("", first), HostSnapshot("", last))
    assert len(m.vgic_notes) == 1 and "vgic-state does not exist" in m.vgic_notes[0]
    w = m.wiring_for(BDF, 1)
    assert w is not None and w.state is None and not w.posted
    path, _ = classify(False, 102, m.host_delta(BDF, 1), w.as_verdict_wiring())
    assert path is DeliveryPath.IRQFD_BOUNCE


def test_measure_on_x86_reads_no_vgic_state(tmp_path: Path) -> None:
    root = fake_debugfs(tmp_path, {"301-11": DEFAULT})  # would be read, were the host arm64
    host = evidence(tmp_path, "no-kvm-msix", X86_64.uname, root)
    (_, first), (_, last) = samples("no-kvm-msix")
    m = host.measure(HostSnapshot("", first), HostSnapshot("", last))
    assert (m.vgic, m.doorbells) == ((), ())
    assert not (tmp_path / "run" / "host.vgic-state.301-11").exists()
    # An IRTE host's state witness is its IR table instead; this host has no IOMMU debugfs.
    assert [n.split(": ")[0] for n in m.notes()] == ["IR table not read for 0000:00:02.0"]
