"""The bypass tracker and the trace parser on real traces recorded in the virtual lab.

tests/data/lab/ holds what a real Debian 6.1 L1 kernel traced while L2 used an assigned
virtio-net over KVM irqfd (``irqfd/``) and with ``x-no-kvm-msix=on`` (``no-kvm-msix/``);
see its README.  Host /proc/interrupts samples taken during the run are joined with the
trace records up to the sample's time, as the runner does while a guest runs.  The anomaly
tests edit one real line each, and say which.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.bypass.tracker import GICV4_SYMBOLS, BypassTracker, VectorWiring, probe_specs
from harness.config.model import DeliveryPath
from harness.host.tracefs import TraceRecord, parse_trace, parse_trace_line
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts
from harness.verdict import classify

LAB = Path(__file__).resolve().parents[1] / "data" / "lab"
BDF = "0000:00:05.0"


def records(run: str) -> list[TraceRecord]:
    return list(parse_trace((LAB / run / "trace.txt").read_text().splitlines()))


def samples(run: str) -> list[tuple[float, InterruptSnapshot]]:
    """The host's /proc/interrupts samples taken while L2 ran, with L1's uptime."""
    text = (LAB / run / "l1-interrupts-during.txt").read_text()
    parts = re.split(r"^# sample \d+ t=([\d.]+)\n", text, flags=re.M)[1:]
    return [(float(t), parse_proc_interrupts(body, f"{run}:{t}"))
            for t, body in zip(parts[0::2], parts[1::2], strict=True)]


def last_sample_with_msix(run: str) -> tuple[float, InterruptSnapshot]:
    with_msix = [(t, s) for t, s in samples(run)
                 if any(a.startswith("vfio-msix") for ln in s.lines for a in ln.actions)]
    return with_msix[-1]


def wiring_during(run: str) -> dict[int, VectorWiring]:
    t, snapshot = last_sample_with_msix(run)
    tracker = BypassTracker()
    tracker.feed(r for r in records(run) if r.timestamp <= t)
    return {w.entry: w for w in tracker.wiring(snapshot) if w.bdf == BDF}


# --- the acceptance: every vfio-msix vector, both paths -------------------------------


def test_irqfd_run_every_vfio_msix_vector_is_connected_to_a_kvm_irqfd() -> None:
    wiring = wiring_during("irqfd")
    assert sorted(wiring) == [0, 1, 2]  # config, rx, tx of the assigned virtio-net
    for entry, w in wiring.items():
        assert (w.producer, w.consumer, w.connected) == (True, True, True), (entry, w)
        assert w.kind == "msix"
        assert w.gsi is not None, "the irqfd's GSI comes from the kvm_irqfd probe"
        assert not w.posted, "no AVIC in the lab: connected is not posted"
        assert "connected to KVM irqfd GSI" in w.describe()
    assert len({w.token for w in wiring.values()}) == 3
    assert sorted(w.host_irq for w in wiring.values()) == [29, 30, 31]


def test_userspace_run_every_vfio_msix_vector_has_a_producer_but_no_consumer() -> None:
    wiring = wiring_during("no-kvm-msix")
    assert sorted(wiring) == [0, 1, 2]
    for entry, w in wiring.items():
        assert (w.producer, w.consumer, w.connected) == (True, False, False), (entry, w)
        assert w.describe().endswith("no consumer: QEMU handles it")


@pytest.mark.parametrize("run", ["irqfd", "no-kvm-msix"])
def test_whole_runs_replay_without_anomaly_and_end_empty(run: str) -> None:
    tracker = BypassTracker()
    tracker.feed(records(run))
    assert tracker.anomalies == []
    assert tracker.manager.snapshot() == ()  # L2 exited: everything unregistered


def test_irqfd_run_churn_reuses_producer_objects_with_new_tokens() -> None:
    """The guest reprograms MSI-X (1, 2, then 3 vectors): vfio re-registers every vector."""
    prods = [r for r in records("irqfd") if r.event == "prod"]
    by_irq: dict[int, set[tuple[str | None, str | None]]] = {}
    for r in prods:
        by_irq.setdefault(r.int("irq") or 0, set()).add((r.get("prod"), r.get("token")))
    assert len(prods) == 11
    assert all(len(v) >= 2 for v in by_irq.values()), by_irq
    tracker = BypassTracker()
    tracker.feed(records("irqfd"))
    assert tracker.counts["connect"] == tracker.counts["disconnect"] == 8


# --- verdicts from the recorded evidence ---------------------------------------------------


def guest_delta(run: str, name: str) -> int:
    before = parse_proc_interrupts((LAB / run / "l2-interrupts-before.txt").read_text())
    after = parse_proc_interrupts((LAB / run / "l2-interrupts-after.txt").read_text())
    (row,) = [r for r in before.delta(after).rows if r.after and name in r.after.actions]
    return row.total


def host_delta(run: str, entry: int) -> int:
    with_msix = [s for _, s in samples(run)
                 if any(a.startswith("vfio-msix") for ln in s.lines for a in ln.actions)]
    rows = [r for r in with_msix[0].delta(with_msix[-1]).for_device(BDF)
            if r.vector is not None and r.vector.entry == entry]
    return sum(r.total for r in rows)


@pytest.mark.parametrize(("run", "path"), [("irqfd", DeliveryPath.IRQFD_BOUNCE),
                                           ("no-kvm-msix", DeliveryPath.USERSPACE_BOUNCE)])
def test_recorded_evidence_gives_each_run_its_verdict(run: str, path: DeliveryPath) -> None:
    wiring = wiring_during(run)
    for entry, name in ((1, "virtio0-input.0"), (2, "virtio0-output.0")):
        guest = guest_delta(run, name)
        assert guest >= 195  # 200 pings
        verdict, reason = classify(False, guest, host_delta(run, entry),
                                   wiring[entry].as_verdict_wiring())
        assert verdict is path, reason


# --- anomalies: one real line edited each ---------------------------------------------------


def edited(run: str, pattern: str, replace: str | None) -> list[TraceRecord]:
    """The run's records with the first line matching ``pattern`` replaced (or removed)."""
    lines = (LAB / run / "trace.txt").read_text().splitlines()
    index = next(i for i, ln in enumerate(lines) if re.search(pattern, ln))
    if replace is None:
        del lines[index]
    else:
        lines[index] = re.sub(pattern, replace, lines[index])
    return list(parse_trace(lines))


def test_a_missing_kernel_connect_is_an_anomaly() -> None:
    tracker = BypassTracker()
    tracker.feed(edited("irqfd", r" connect: ", None))
    assert [a.kind for a in tracker.anomalies][:1] == ["missing-connect"]


def test_a_kernel_refusal_the_model_did_not_predict_is_an_anomaly() -> None:
    tracker = BypassTracker()
    tracker.feed(edited("no-kvm-msix", r"prod_ret: (.*) ret=0", r"prod_ret: \1 ret=-16"))
    assert tracker.anomalies and tracker.anomalies[0].kind == "kernel-refused"


def test_a_connect_between_different_tokens_is_an_anomaly() -> None:
    tracker = BypassTracker()
    tracker.feed(edited("irqfd", r"(connect: .* ctoken=0x)[0-9a-f]+", r"\g<1>dead"))
    assert "token-mismatch" in [a.kind for a in tracker.anomalies]


def test_a_duplicate_token_the_kernel_accepted_is_an_anomaly() -> None:
    """Two producers registered with one token and both accepted: the model says EBUSY."""
    lines = (LAB / "no-kvm-msix" / "trace.txt").read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if " prod: " in ln)
    twin = lines[first].replace("prod=0x", "prod=0x1")  # another object, same token
    lines[first + 2:first + 2] = [twin, lines[first + 1]]  # its prod_ret (ret=0) follows
    tracker = BypassTracker()
    tracker.feed(parse_trace(lines))
    assert "kernel-accepted" in [a.kind for a in tracker.anomalies]


# --- the trace parser and the probe definitions ----------------------------------------------


def test_parse_kprobe_kretprobe_and_tracepoint_lines() -> None:
    text = (LAB / "irqfd" / "trace.txt").read_text().splitlines()
    parsed = list(parse_trace(text))
    assert len(parsed) == len([ln for ln in text if ln.strip() and not ln.startswith("#")])
    prod = next(r for r in parsed if r.event == "prod")
    assert prod.task == "qemu-system-x86" and prod.site.startswith("irq_bypass_register_producer")
    assert prod.int("irq") == 29 and prod.int("token") is not None
    ret = next(r for r in parsed if r.event == "prod_ret")
    assert "<- irq_bypass_register_producer" in ret.site and ret.int("ret") == 0
    handler = next(r for r in parsed if r.event == "irq_handler_entry")
    assert (handler.get("name") or "").startswith("vfio-msix")
    assert parse_trace_line("# tracer: nop") is None
    assert parse_trace_line("") is None


def test_probe_definitions_for_6_1_are_the_ones_the_lab_kernel_accepted() -> None:
    """Every probe but the arm64 GICv4 ones, which this x86 kernel has no function for (they
    are optional; test_tracker_gicv4.py checks them against their kernel signatures)."""
    accepted = (LAB / "kprobe_events.txt").read_text()
    probeable = (LAB / "probeable.txt").read_text()
    for spec in probe_specs("6.1.0-56-amd64"):
        if spec.symbol in GICV4_SYMBOLS:
            assert spec.optional and spec.symbol not in probeable
            continue
        kind = "r" if spec.ret else "p"  # the kernel lists kretprobes as r<maxactive>:
        assert re.search(rf"^{kind}\d*:irqbp/{spec.name} \S*{spec.symbol} ", accepted,
                         re.M), spec
        if spec.fetchargs and not spec.ret:
            for arg in spec.fetchargs.split():
                assert arg in accepted, (spec.name, arg)


def test_probe_definitions_switch_to_arguments_from_6_17() -> None:
    old = {s.name: s.fetchargs for s in probe_specs("6.16.3")}
    new = {s.name: s.fetchargs for s in probe_specs("6.17.0-rc1")}
    assert "token=+16($arg1)" in old["prod"] and "irq=+24($arg1)" in old["prod"]
    assert new["prod"] == "prod=$arg1:x64 token=$arg2:x64 irq=$arg3:s32"
    assert new["cons"] == "cons=$arg1:x64 token=$arg2:x64"
    assert "token=+0($arg1)" in new["unprod"]
