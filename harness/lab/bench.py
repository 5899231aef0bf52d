"""Figures of one lab run: its phases, and the workload's latency over each delivery path.

The paths run one after the other (in one L1 boot where they can), so the ratio of each to
the first is the figure to read; absolute numbers under nested TCG say little about real
hardware.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.lab.l1 import LabRun

_RTT = re.compile(r"time=([0-9.]+) ms")


@dataclass(frozen=True)
class PathFigures:
    scenario: str
    paths: tuple[str, ...]  # the verdicts of the assigned device's vectors
    phases: tuple[tuple[str, float], ...]
    rtts_ms: tuple[float, ...]

    def percentile(self, q: float) -> float | None:
        if len(self.rtts_ms) < 2:
            return None
        cuts = statistics.quantiles(self.rtts_ms, n=100, method="inclusive")
        return cuts[min(max(int(q) - 1, 0), 98)]


def path_figures(run_dir: Path) -> PathFigures:
    report = json.loads((run_dir / "report.json").read_text())
    rtts: list[float] = []
    for log in sorted(run_dir.glob("*.workload.log")):
        rtts += [float(m.group(1)) for m in _RTT.finditer(log.read_text())]
    paths = tuple(sorted({v["path"] or "?" for v in report["vectors"]
                          if v["evidence"]["host_delta"] is not None and v["path"]
                          != "not-delivered"}))
    return PathFigures(report["scenario"]["name"], paths,
                       tuple((p["name"], p["seconds"]) for p in report["phases"]), tuple(rtts))


def format_lab_bench(lab: LabRun) -> str:
    runs = [path_figures(d) for d in lab.inner_runs]
    boots = sum(1 for name, _ in lab.phases if name.startswith("L1") and name.endswith("boot"))
    lines = [f"lab bench: {boots} L1 boot(s), the scenarios in order"]
    lines += [f"  {name:<28} {seconds:7.2f} s" for name, seconds in lab.phases]
    lines.append(f"  {'total':<28} {lab.total_seconds:7.2f} s")
    for run in runs:
        phases = dict(run.phases)
        l2_boot = sum(phases.get(k, 0.0) for k in ("QEMU start", "kernel to init",
                                                    "init to sshd", "SSH ready"))
        p50, p99 = run.percentile(50), run.percentile(99)
        latency = (f"ping RTT p50 {p50:.3f} ms, p99 {p99:.3f} ms over {len(run.rtts_ms)}"
                   if p50 is not None and p99 is not None else "no ping RTTs in its log")
        lines.append(f"  {run.scenario} ({', '.join(run.paths) or 'no verdict'}): L2 boot "
                     f"{l2_boot:.2f} s, workload {phases.get('workload', 0.0):.2f} s, "
                     f"verdict {phases.get('verdict', 0.0):.2f} s; {latency}")
    measured = [r for r in runs if r.percentile(50) is not None]
    for other in measured[1:]:
        base = measured[0]
        b50, o50 = base.percentile(50), other.percentile(50)
        b99, o99 = base.percentile(99), other.percentile(99)
        assert b50 and o50 and b99 and o99
        lines.append(f"  ratio {other.scenario} / {base.scenario}: p50 {o50 / b50:.2f}x, "
                     f"p99 {o99 / b99:.2f}x")
    return "\n".join(lines)
