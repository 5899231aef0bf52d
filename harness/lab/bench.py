"""Figures of one lab run: its phases, and the workload's latency over each delivery path.

The paths run one after the other (in one L2 boot where the scenario puts them side by side,
else in one L1 boot), so the ratio of each workload's latency to the first's is the figure to
read; absolute numbers under nested TCG say little about real hardware.
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
class Latency:
    """The ping RTTs one workload printed: one delivery path when the workload loads one
    assigned device (configs/lab-vfio.yaml: one workload per NIC, in one L2 boot)."""

    workload: str
    rtts_ms: tuple[float, ...]

    def percentile(self, q: float) -> float | None:
        if len(self.rtts_ms) < 2:
            return None
        cuts = statistics.quantiles(self.rtts_ms, n=100, method="inclusive")
        return cuts[min(max(int(q) - 1, 0), 98)]


@dataclass(frozen=True)
class PathFigures:
    scenario: str
    paths: tuple[str, ...]  # the verdicts of the assigned devices' vectors
    phases: tuple[tuple[str, float], ...]
    latencies: tuple[Latency, ...]  # per workload that printed RTTs, in order


def workload_latencies(log_text: str) -> list[Latency]:
    """Split a ``<vm>.workload.log`` at its ``$ <workload>`` headers; RTTs per workload."""
    found: list[Latency] = []
    name, rtts = "", list[float]()
    for line in log_text.splitlines():
        if line.startswith("$ "):
            if rtts:
                found.append(Latency(name, tuple(rtts)))
            name, rtts = line[2:], []
        rtts += [float(m.group(1)) for m in _RTT.finditer(line)]
    if rtts:
        found.append(Latency(name, tuple(rtts)))
    return found


def path_figures(run_dir: Path) -> PathFigures:
    report = json.loads((run_dir / "report.json").read_text())
    latencies: list[Latency] = []
    for log in sorted(run_dir.glob("*.workload.log")):
        latencies += workload_latencies(log.read_text())
    paths = tuple(sorted({v["path"] or "?" for v in report["vectors"]
                          if v["evidence"]["host_delta"] is not None and v["path"]
                          != "not-delivered"}))
    return PathFigures(report["scenario"]["name"], paths,
                       tuple((p["name"], p["seconds"]) for p in report["phases"]),
                       tuple(latencies))


def format_lab_bench(lab: LabRun) -> str:
    runs = [path_figures(d) for d in lab.inner_runs]
    boots = sum(1 for name, _ in lab.phases if name.startswith("L1") and name.endswith("boot"))
    lines = [f"lab bench: {boots} L1 boot(s), the scenarios in order"]
    lines += [f"  {name:<28} {seconds:7.2f} s" for name, seconds in lab.phases]
    lines.append(f"  {'total':<28} {lab.total_seconds:7.2f} s")
    l1_boots = [seconds for name, seconds in lab.phases
                if name.startswith("L1") and name.endswith("boot")]
    if l1_boots and min(l1_boots) > 0:
        # L1's own boot is a bare kernel boot measured in the same run: how fast this host
        # emulates right now, so the ratio holds when a busy host slows everything down.
        lines.append(f"  {'total / L1 boot':<28} {lab.total_seconds / min(l1_boots):7.2f}x "
                     "(L1's boot: this run's baseline for the host's speed)")
    measured: list[tuple[str, Latency]] = []
    for run in runs:
        phases = dict(run.phases)
        l2_boot = sum(phases.get(k, 0.0) for k in ("QEMU start", "kernel to init",
                                                    "init to sshd", "SSH ready"))
        lines.append(f"  {run.scenario} ({', '.join(run.paths) or 'no verdict'}): run "
                     f"{sum(phases.values()):.2f} s: L2 boot {l2_boot:.2f} s, workload "
                     f"{phases.get('workload', 0.0):.2f} s, verdict "
                     f"{phases.get('verdict', 0.0):.2f} s, teardown "
                     f"{phases.get('teardown', 0.0):.2f} s")
        for latency in run.latencies:
            p50, p99 = latency.percentile(50), latency.percentile(99)
            if p50 is None or p99 is None:
                continue
            lines.append(f"    {latency.workload}: ping RTT p50 {p50:.3f} ms, p99 {p99:.3f} ms "
                         f"over {len(latency.rtts_ms)}")
            measured.append((run.scenario, latency))
    if not measured:
        lines.append("  no ping RTTs in the workload logs")
    for scenario, other in measured[1:]:
        base_scenario, base = measured[0]
        b50, o50 = base.percentile(50), other.percentile(50)
        b99, o99 = base.percentile(99), other.percentile(99)
        assert b50 and o50 and b99 and o99
        lines.append(f"  ratio {scenario}: {other.workload} / {base_scenario}: "
                     f"{base.workload}: p50 {o50 / b50:.2f}x, p99 {o99 / b99:.2f}x")
    return "\n".join(lines)
