"""The tracker's arm64 posted path: GICv4 direct injection (vLPIs), and its verdicts.

READ THIS FIRST.  Every trace, /proc/interrupts and vgic-state text used here is
CONSTRUCTED from shared/notes/arm-lab-facts.md, NOT RECORDED: no arm64 lab recording exists
yet (tests/data/trace/arm64-gicv4/README.md lists what comes from the notes and what is
invented; each file says so in its first lines).  The lines are rendered in the exact text a
6.1 kernel prints for the harness's kprobe events; the order of the events, the host irqs and
the counts are the notes'.  The anomaly tests edit one constructed line each, and say which.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from harness.bypass.tracker import (
    GICV4_PROBES,
    GICV4_SYMBOLS,
    BypassTracker,
    VectorWiring,
    probe_specs,
    relevant_skips,
)
from harness.config.model import DeliveryPath
from harness.host.tracefs import TraceRecord, parse_trace, parse_trace_line
from harness.host.vgic import VgicAgreement, parse_vgic_state
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts
from harness.platform import PostingModel
from harness.verdict import classify

DATA = Path(__file__).resolve().parents[1] / "data"
ARM = DATA / "trace" / "arm64-gicv4"
VGIC = DATA / "vgic"
BDF = "0000:00:02.0"
RUNS = ("default", "no-kvm-msix", "gicv4-off")
GROUP = "g"


def lines(run: str) -> list[str]:
    return (ARM / run / "trace.txt").read_text().splitlines()


def uncommented(text: str) -> str:
    """A constructed file without its '#' header (the kernel prints none)."""
    return "\n".join(ln for ln in text.splitlines() if not ln.startswith("#")) + "\n"


def samples(run: str) -> list[tuple[float, InterruptSnapshot]]:
    text = (ARM / run / "l1-interrupts-during.txt").read_text()
    parts = re.split(r"^# sample \d+ t=([\d.]+)\n", text, flags=re.M)[1:]
    return [(float(t), parse_proc_interrupts(body, f"{run}:{t}"))
            for t, body in zip(parts[0::2], parts[1::2], strict=True)]


def replay(trace: list[str], run: str = "default", whole: bool = False,
           until: float | None = None) -> tuple[BypassTracker, dict[int, VectorWiring]]:
    """Feed the records up to the last sample taken while L2 ran (or all, or up to
    ``until``); the wiring at that sample."""
    t, snapshot = samples(run)[-1]
    cut = until if until is not None else t
    tracker = BypassTracker()
    tracker.feed(r for r in parse_trace(trace) if whole or r.timestamp <= cut)
    return tracker, {w.entry: w for w in tracker.wiring(snapshot) if w.bdf == BDF}


def guest_delta(run: str, name: str) -> int:
    before = parse_proc_interrupts(uncommented(
        (ARM / run / "l2-interrupts-before.txt").read_text()))
    after = parse_proc_interrupts(uncommented((ARM / run / "l2-interrupts-after.txt").read_text()))
    (row,) = [r for r in before.delta(after).rows if r.after and name in r.after.actions]
    return row.total


def host_delta(run: str, entry: int) -> int:
    (_, first), (_, last) = samples(run)[0], samples(run)[-1]
    rows = [r for r in first.delta(last).for_device(BDF)
            if r.vector is not None and r.vector.entry == entry]
    return sum(r.total for r in rows)


def state(name: str, traced: tuple[int, ...]) -> VgicAgreement:
    """The VM's agreement as the host side builds it: a constructed vgic-state, the vLPIs."""
    parsed = parse_vgic_state(uncommented((VGIC / name).read_text()), name)
    return VgicAgreement(301, (name,), len(parsed.lpis), len(parsed.hw_lpis), traced,
                         "task 306 belongs to process 301")


def edited(run: str | list[str], pattern: str, replace: str | None,
           count: int = 1) -> list[str]:
    """The run's lines (or these lines) with the first ``count`` lines matching ``pattern``
    replaced (or removed)."""
    out, done = [], 0
    for ln in lines(run) if isinstance(run, str) else run:
        if done < count and re.search(pattern, ln):
            done += 1
            if replace is not None:
                out.append(re.sub(pattern, replace, ln))
            continue
        out.append(ln)
    assert done == count, (pattern, done)
    return out


# --- the constructed inputs are what they say ------------------------------------------------


def test_every_constructed_file_says_it_was_constructed() -> None:
    files = [*ARM.glob("*/*.txt"), *VGIC.glob("constructed-*.txt")]
    assert len(files) == 14
    for path in files:
        assert path.read_text().startswith("# CONSTRUCTED"), path
    assert "NOT RECORDED" in (ARM / "README.md").read_text()


def test_the_constructed_traces_hold_the_notes_sequences() -> None:
    def events(run: str) -> list[tuple[str, int | None]]:
        return [(r.event, r.int("virq") if r.event in ("fwd", "unfwd") else r.int("irq"))
                for r in parse_trace(lines(run))
                if r.event in ("prod", "fwd", "mapvlpi", "unfwd")]
    default = events("default")
    # each producer of a vfio-msix vector is followed by set_forwarding and its_map_vlpi
    assert default[:3] == [("prod", 26), ("fwd", 26), ("mapvlpi", 26)]
    assert ("unfwd", 26) in default  # the churn undoes the mapping ...
    churn = default.index(("unfwd", 26))
    assert default[churn + 1:churn + 3] == [("fwd", 26), ("mapvlpi", 26)]  # ... and remakes it
    assert [irq for e, irq in default if e == "mapvlpi"][:4] == [26, 26, 27, 28]
    assert {e for e, _ in events("no-kvm-msix")} == {"prod"}
    off = events("gicv4-off")
    assert [irq for e, irq in off if e == "fwd"][:4] == [25, 25, 26, 27]
    assert not [e for e, _ in off if e == "mapvlpi"]


# --- the probes ----------------------------------------------------------------------------------


def test_gicv4_probe_definitions() -> None:
    """Arguments per the kernel signatures (6.1 vgic-v4.c, irq-gic-v4.c):
    kvm_vgic_v4_set_forwarding(struct kvm *, int virq, ...), unset likewise, its_map_vlpi(int
    irq, struct its_vlpi_map *), its_unmap_vlpi(int irq).  The notes' lab wrote the same with
    arm64 registers (virq=%x1, irq=%x0: AAPCS64 passes argument N in x(N-1))."""
    assert [p.definition(GROUP) for p in GICV4_PROBES] == [
        "p:g/fwd kvm_vgic_v4_set_forwarding virq=$arg2:u32",
        "r:g/fwd_ret kvm_vgic_v4_set_forwarding ret=$retval:s32",
        "p:g/unfwd kvm_vgic_v4_unset_forwarding virq=$arg2:u32",
        "p:g/mapvlpi its_map_vlpi irq=$arg1:u32",
        "r:g/mapvlpi_ret its_map_vlpi ret=$retval:s32",
        "p:g/unmapvlpi its_unmap_vlpi irq=$arg1:u32",
    ]
    assert all(p.optional for p in GICV4_PROBES)
    for release in ("6.1.0-28-arm64", "6.17.0"):
        assert [p for p in probe_specs(release) if p.symbol in GICV4_SYMBOLS] == list(GICV4_PROBES)


def test_gicv4_records_parse_into_their_fields() -> None:
    by_event: dict[str, TraceRecord] = {}
    for r in parse_trace(lines("default")):
        by_event.setdefault(r.event, r)  # the first of each
    fwd = by_event["fwd"]
    assert fwd.task == "qemu-system-aar" and fwd.pid == 306
    assert fwd.site.startswith("kvm_vgic_v4_set_forwarding+0x0/") and fwd.int("virq") == 26
    assert by_event["mapvlpi"].int("irq") == 26
    ret = by_event["mapvlpi_ret"]
    assert "<- its_map_vlpi" in ret.site and ret.int("ret") == 0
    assert "<- kvm_vgic_v4_set_forwarding" in by_event["fwd_ret"].site
    assert by_event["unfwd"].task == "kworker/1:2" and by_event["unfwd"].int("virq") == 26


def test_skip_notes_of_the_other_posting_model_are_dropped() -> None:
    notes = ["kvm_vgic_v4_set_forwarding: not in available_filter_functions (inlined, ...)",
             "its_map_vlpi: not in available_filter_functions (inlined, ...)",
             "kvm_irqfd: not in available_filter_functions (inlined, ...)",
             "tracepoint kvm/kvm_pi_irte_update: not in this kernel"]
    assert relevant_skips(notes, PostingModel.IRTE) == [notes[2], notes[3]]
    assert relevant_skips(notes, PostingModel.VLPI) == notes[:3]
    assert relevant_skips(notes, None) == notes


# --- the three runs of the notes -----------------------------------------------------------------


def test_default_run_every_vector_is_forwarded_as_a_vlpi() -> None:
    tracker, wiring = replay(lines("default"))
    assert tracker.anomalies == []
    assert sorted(wiring) == [0, 1, 2]
    for entry, irq in ((0, 26), (1, 27), (2, 28)):
        w = wiring[entry]
        assert (w.host_irq, w.connected, w.vlpi_mapped, w.posted, w.vlpi) == (
            irq, True, True, True, True), w
        assert w.describe().endswith("forwarded as a vLPI (GICv4 direct injection)")
        assert w.task == 306  # the vCPU thread that forwarded it
        assert (w.vcpu, w.guest_vector) == (None, None)  # the IRTE fields stay x86's
        verdict = w.as_verdict_wiring()
        assert verdict.posted and verdict.vlpi and verdict.state is None
    assert tracker.forwarding_calls == {26: 2, 27: 1, 28: 1}
    assert tracker.vlpi[26].cause.startswith("its_map_vlpi returned 0")


def test_default_run_churn_unsets_the_forwarding_until_it_is_made_again() -> None:
    records = list(parse_trace(lines("default")))
    unset = next(r for r in records if r.event == "unfwd")
    remade = next(r for r in records if r.event == "mapvlpi_ret" and r.timestamp > unset.timestamp)
    registered = next(r for r in records if r.event == "cons_ret"
                      and r.timestamp > remade.timestamp)
    tracker, wiring = replay(lines("default"), until=unset.timestamp)
    assert not tracker.vlpi[26].mapped and tracker.vlpi[26].cause == "kvm_vgic_v4_unset_forwarding"
    assert (wiring[0].connected, wiring[0].posted) == (False, False)
    # Mapped again inside the consumer's registration, which the model replays at its return.
    tracker, wiring = replay(lines("default"), until=remade.timestamp)
    assert tracker.vlpi[26].mapped and (wiring[0].connected, wiring[0].posted) == (False, False)
    tracker, wiring = replay(lines("default"), until=registered.timestamp)
    assert wiring[0].posted and wiring[0].vlpi


def test_default_run_ends_with_no_mapping_in_force() -> None:
    tracker, wiring = replay(lines("default"), whole=True)
    assert tracker.anomalies == []
    assert tracker.manager.snapshot() == ()
    assert {irq: v.mapped for irq, v in tracker.vlpi.items()} == {26: False, 27: False,
                                                                    28: False}
    assert not any(w.posted or w.vlpi_mapped for w in wiring.values())


def test_no_kvm_msix_run_producers_without_forwarding() -> None:
    tracker, wiring = replay(lines("no-kvm-msix"), run="no-kvm-msix")
    assert tracker.anomalies == [] and tracker.vlpi == {} and "fwd" not in tracker.counts
    for w in wiring.values():
        assert (w.producer, w.consumer, w.connected, w.posted) == (True, False, False, False)
        assert w.describe().endswith("no consumer: QEMU handles it")


def test_gicv4_off_run_entering_set_forwarding_is_not_posting() -> None:
    tracker, wiring = replay(lines("gicv4-off"), run="gicv4-off")
    assert tracker.anomalies == [] and tracker.vlpi == {}
    assert tracker.counts["fwd"] == tracker.counts["fwd_ret"] == 4
    assert sorted(w.host_irq for w in wiring.values()) == [25, 26, 27]
    for w in wiring.values():
        assert (w.connected, w.vlpi_mapped, w.posted) == (True, False, False), w
        assert w.forwarding_calls >= 1
        assert "kvm_vgic_v4_set_forwarding entered" in w.describe()
        assert w.describe().endswith("no vLPI mapping in force)")


# --- verdicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "name"), [(1, "virtio0-input.0"), (2, "virtio0-output.0")])
def test_default_run_with_agreeing_vgic_state_is_posted(entry: int, name: str) -> None:
    _, wiring = replay(lines("default"))
    guest, host = guest_delta("default", name), host_delta("default", entry)
    assert (guest, host) == ((102, 0) if entry == 1 else (107, 0))
    agreeing = state("constructed-default-3-hw-lpis.txt", (26, 27, 28))
    assert agreeing.agrees
    w = dataclasses.replace(wiring[entry], state=agreeing)
    path, reason = classify(False, guest, host, w.as_verdict_wiring())
    assert path is DeliveryPath.POSTED, reason
    assert reason.startswith("forwarded as a vLPI (GICv4 direct injection) and the host did "
                             "not see the IRQs (host 0 / guest")
    assert "3 of 3 LPIs with H (hw) set" in reason and "host irqs 26, 27, 28" in reason


def test_default_run_without_vgic_state_is_posted_and_says_so() -> None:
    _, wiring = replay(lines("default"))
    path, reason = classify(False, guest_delta("default", "virtio0-input.0"),
                            host_delta("default", 1), wiring[1].as_verdict_wiring())
    assert path is DeliveryPath.POSTED and reason.endswith("vgic-state not read")


@pytest.mark.parametrize(("run", "path"), [("no-kvm-msix", DeliveryPath.USERSPACE_BOUNCE),
                                           ("gicv4-off", DeliveryPath.IRQFD_BOUNCE)])
def test_the_bounce_runs_get_their_verdicts(run: str, path: DeliveryPath) -> None:
    _, wiring = replay(lines(run), run=run)
    lpis = state("constructed-no-kvm-msix-3-lpis.txt", ())  # 3 LPIs, none hw: agrees with 0
    for entry, name in ((1, "virtio0-input.0"), (2, "virtio0-output.0")):
        guest, host = guest_delta(run, name), host_delta(run, entry)
        assert host == guest  # the notes: 101/108 and 102/108 on both sides
        w = dataclasses.replace(wiring[entry], state=lpis)
        verdict, reason = classify(False, guest, host, w.as_verdict_wiring())
        assert verdict is path, reason


def test_forwarded_in_the_trace_but_no_hw_lpi_gives_no_verdict() -> None:
    """The default trace against the vgic-state of the x-no-kvm-msix run (no H)."""
    _, wiring = replay(lines("default"))
    check = state("constructed-no-kvm-msix-3-lpis.txt", (26, 27, 28))
    assert not check.agrees
    w = dataclasses.replace(wiring[1], state=check)
    path, reason = classify(False, 102, 0, w.as_verdict_wiring())
    assert path is None
    assert "forwarded in the trace but no H LPIs" in reason
    assert "0 of 3 LPIs with H (hw) set" in reason and "3 vLPI mapping(s)" in reason
    assert "host 0 / guest 102 = 0.00" in reason


def test_hw_lpis_without_traced_forwarding_gives_no_verdict_even_for_a_bounce() -> None:
    """The GICv4-off trace (no mapping) against the default run's vgic-state (3 H)."""
    _, wiring = replay(lines("gicv4-off"), run="gicv4-off")
    check = state("constructed-default-3-hw-lpis.txt", ())
    w = dataclasses.replace(wiring[1], state=check)
    path, reason = classify(False, 102, 102, w.as_verdict_wiring())
    assert path is None
    assert "H LPIs without traced forwarding" in reason and "3 of 3 LPIs" in reason


def test_forwarded_but_the_host_saw_the_irqs_is_no_posted_verdict() -> None:
    _, wiring = replay(lines("default"))
    w = wiring[1].as_verdict_wiring()
    assert classify(False, 102, 102, w)[0] is DeliveryPath.IRQFD_BOUNCE  # the counts decide
    path, reason = classify(False, 102, 30, w)
    assert path is None
    assert "forwarded as a vLPI, yet the host saw more IRQs than posting allows" in reason


# --- anomalies and edge cases: one constructed line edited each -----------------------------------


def test_a_failed_its_map_vlpi_is_no_mapping() -> None:
    """The first mapvlpi_ret (irq 26) returns -22, and so does its set_forwarding."""
    trace = edited("default", r"(mapvlpi_ret: .*) ret=0", r"\1 ret=-22")
    tracker, _ = replay(edited(trace, r"(fwd_ret: .*) ret=0", r"\1 ret=-22"), until=41.5)
    assert 26 not in tracker.vlpi
    assert tracker.anomalies == []  # a refusal the kernel reported consistently


def test_set_forwarding_failing_after_a_successful_map_is_an_anomaly() -> None:
    """The first fwd_ret (irq 26) returns -16 after its_map_vlpi returned 0."""
    tracker, _ = replay(edited("default", r"(fwd_ret: .*) ret=0", r"\1 ret=-16"), until=41.5)
    assert [a.kind for a in tracker.anomalies][:1] == ["forwarding-failed-after-map"]
    assert "returned -16" in tracker.anomalies[0].message
    assert tracker.vlpi[26].mapped  # KVM set the hw flag before failing


def test_without_the_its_map_vlpi_return_probe_set_forwarding_decides() -> None:
    tracker, wiring = replay(edited("default", r" mapvlpi_ret: ", None, count=4))
    assert "mapvlpi_ret" not in tracker.counts and tracker.anomalies == []
    assert all(w.posted and w.vlpi for w in wiring.values())
    assert tracker.vlpi[28].cause == "kvm_vgic_v4_set_forwarding returned 0 after its_map_vlpi"


def test_a_mapping_of_another_irq_than_the_forwarded_one_is_an_anomaly() -> None:
    tracker, _ = replay(edited("default", r"(mapvlpi: .*) irq=26", r"\1 irq=99"), until=41.5)
    assert [a.kind for a in tracker.anomalies] == ["vlpi-irq-mismatch"]
    assert tracker.vlpi[99].mapped and 26 not in tracker.vlpi


def test_a_remap_outside_set_forwarding_of_an_unknown_irq_is_an_anomaly() -> None:
    """An its_map_vlpi pair (irq 40) appended after the sample's last record, as the vITS
    would issue for a MOVI: the trace never saw irq 40 forwarded."""
    t, _ = samples("default")[-1]
    trace = lines("default")
    last = max(i for i, ln in enumerate(trace)
               if (r := parse_trace_line(ln)) is not None and r.timestamp <= t)
    prefix = trace[last].split(": ", 1)[0].rsplit(" ", 1)[0]
    trace[last + 1:last + 1] = [
        f"{prefix} 43.000001: mapvlpi: (its_map_vlpi+0x0/0x78) irq=40",
        f"{prefix} 43.000002: mapvlpi_ret: (vgic_its_cmd_handle_movi+0x90/0x1c0 <- its_map_vlpi)"
        " ret=0"]
    tracker, wiring = replay(trace)
    assert [a.kind for a in tracker.anomalies] == ["vlpi-remap-unknown"]
    assert 40 not in tracker.vlpi and all(w.posted for w in wiring.values())


def test_a_mapping_that_outlives_its_pair_is_left_forwarded() -> None:
    """The regression the kernel needed (early 2026): the pair went away and nothing undid the
    forwarding, so the device kept posting to the vCPU.  With the unset records taken out,
    the mappings outlive their pairs and are reported; with them, nothing is left."""
    trace = [ln for ln in lines("default") if " unfwd: " not in ln and " unmapvlpi: " not in ln]
    tracker, _ = replay(trace, whole=True)
    left = tracker.left_forwarded()
    assert left and all(v.mapped for v in left)
    tracker, _ = replay(lines("default"), whole=True)
    assert tracker.left_forwarded() == []


def test_the_recorded_x86_lab_trace_knows_nothing_of_vlpis() -> None:
    trace = (DATA / "lab" / "irqfd" / "trace.txt").read_text().splitlines()
    tracker = BypassTracker()
    tracker.feed(parse_trace(trace))
    assert tracker.vlpi == {} and tracker.forwarding_calls == {}
    assert not any(isinstance(r, TraceRecord) and r.event.startswith(("fwd", "mapvlpi"))
                   for r in parse_trace(trace))
