"""The lab bench's figures from a recorded run (tests/data/lab-x86-matrix/two-nics: both
paths in one L2 boot, one ping workload per NIC)."""

from __future__ import annotations

from pathlib import Path

from harness.lab.bench import format_lab_bench, path_figures, workload_latencies
from harness.lab.l1 import LabRun

RUN = Path(__file__).resolve().parents[1] / "data" / "lab-x86-matrix" / "two-nics"


def test_each_workload_gets_its_own_latency() -> None:
    found = workload_latencies((RUN / "l2.workload.log").read_text())
    assert [f.workload for f in found] == ["ping over the irqfd NIC",
                                           "ping over the user-space NIC"]
    assert [len(f.rtts_ms) for f in found] == [200, 200]
    irqfd, user = found
    assert irqfd.rtts_ms[0] == 21.335  # the first reply, as printed
    p50 = irqfd.percentile(50)
    assert p50 is not None and min(irqfd.rtts_ms) <= p50 <= max(irqfd.rtts_ms)


def test_the_bench_prints_each_path_and_the_ratio_to_the_first() -> None:
    figures = path_figures(RUN)
    assert figures.paths == ("irqfd-bounce", "userspace-bounce")
    lab = LabRun(RUN.parent, phases=[("L1 boot", 5.0), ("job in L1", 40.0)],
                 inner_runs=[RUN])
    text = format_lab_bench(lab)
    assert "ping over the irqfd NIC: ping RTT p50" in text
    assert ("ratio lab-vfio: ping over the user-space NIC / lab-vfio: ping over the irqfd NIC: "
            "p50 ") in text
    assert "\n  total" in text and text.split("\n  total", 1)[1].split()[0] == "45.00"
    assert "\n  total / L1 boot                 9.00x (L1's boot" in text
