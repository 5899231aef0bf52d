"""Phase timings of a scenario against a bare boot of the same kernel, in the same run.

The baseline is the scenario's first VM booted with the same kernel, initramfs, machine,
accelerator, vCPUs and memory but no devices, its init powering off at once
(``harness.bare=1``): launch to QEMU exit.  Machines here are noisy, so the figure that
matters is the ratio to that baseline, measured alternately in one process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.config.model import Scenario
from harness.errors import LaunchError
from harness.qemu import argv as qargv
from harness.qemu.machine import Machine
from harness.result import RunResult
from harness.runner import run_scenario
from harness.vm import GuestVM

Progress = Callable[[str], None]

# The budget for the smoke scenario on a 2-core machine.
BUDGET_FACTOR = 2.0
BUDGET_EXTRA_S = 5.0


@dataclass
class BenchResult:
    scenario: str
    bare_boots: list[float] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return all(r.passed for r in self.runs)

    @property
    def bare(self) -> float:
        return statistics.median(self.bare_boots)


def bare_boot(vm: GuestVM, run_dir: Path) -> float:
    """Seconds from QEMU launch to QEMU exit for a kernel whose init powers off at once."""
    vm.prepare()
    assert vm.image is not None and vm.accel is not None
    spec, image, accel, platform = vm.spec, vm.image, vm.accel.accel, vm.platform
    boot = qargv.Boot(kernel=image.kernel, initrd=image.initrd,
                      append=f"{qargv.base_append(platform)} harness.bare=1")

    def argv_for(qmp_fd: int, console_fd: int) -> list[str]:
        return qargv.bare_boot_argv(platform, spec, accel, boot, qmp_fd, console_fd)

    with Machine(f"{spec.name}-bare", argv_for, run_dir) as machine:
        started = time.monotonic()
        machine.launch()
        code = machine.wait_exit(120.0)
        seconds = time.monotonic() - started
    if code != 0:
        raise LaunchError(machine.name, f"bare boot exited {code}", machine.argv, code)
    return seconds


def run_bench(scenario: Scenario, scenario_file: str, out: Path, repeat: int,
              progress: Progress) -> BenchResult:
    result = BenchResult(scenario.name)
    for i in range(repeat):
        with GuestVM(scenario.vms[0], out, progress) as vm:
            seconds = bare_boot(vm, out / f"bare-{i}")
        result.bare_boots.append(seconds)
        progress(f"bare kernel boot {i + 1}/{repeat}: {seconds:.2f} s")
        run = run_scenario(scenario, scenario_file, out / f"run-{i}", progress)
        result.runs.append(run)
        progress(f"scenario run {i + 1}/{repeat}: {run.total_seconds:.2f} s, "
                 f"{'passed' if run.passed else 'FAILED'}")
    return result


def format_bench(bench: BenchResult) -> str:
    names: list[str] = []
    for run in bench.runs:
        names += [p.name for p in run.phases if p.name not in names]
    width = max(len(n) for n in names + ["bare kernel boot"])
    lines = [f"bench {bench.scenario}: {len(bench.runs)} run(s), median seconds"]
    for name in names:
        values = [p.seconds for r in bench.runs for p in r.phases if p.name == name]
        lines.append(f"  {name:<{width}}  {statistics.median(values):7.2f}")
    totals = [r.total_seconds for r in bench.runs]
    total = statistics.median(totals)
    lines.append(f"  {'total':<{width}}  {total:7.2f}")
    lines.append(f"  {'bare kernel boot':<{width}}  {bench.bare:7.2f}   "
                 f"(each: {', '.join(f'{b:.2f}' for b in bench.bare_boots)})")
    budget = BUDGET_FACTOR * bench.bare + BUDGET_EXTRA_S
    lines.append(f"  ratio total / bare boot: {total / bench.bare:.2f}x; budget "
                 f"{BUDGET_FACTOR:g} x bare + {BUDGET_EXTRA_S:g} s = {budget:.2f} s: "
                 f"{'within' if total <= budget else 'OVER'}")
    if not bench.all_passed:
        lines.append("  some runs FAILED: see their report.json")
    return "\n".join(lines)
