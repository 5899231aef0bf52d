"""Phase timings of a scenario against a bare boot of the same kernel, in the same run.

The baseline is the scenario's first VM booted with the same kernel, initramfs, machine,
accelerator, vCPUs and memory but no devices, its init powering off at once
(``harness.bare=1``): launch to QEMU exit.  Machines here are noisy, so the figure that
matters is the ratio to that baseline, measured alternately in one process.

Scaling: the scenario is run again with its VMs replicated (2 and 4 copies by default, names
suffixed ``-1``, ``-2``...; each copy keeps its own workloads and expectations), so the table
shows how the total grows with the number of VMs: they boot side by side, their workloads
run one after another.  The harness's own peak memory (``getrusage`` of this process; QEMU,
a child, is counted apart) closes the figures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.config.model import Scenario
from harness.errors import LaunchError
from harness.host.accel import KvmProbe, probe_kvm
from harness.platform import host_platform
from harness.qemu import argv as qargv
from harness.qemu.machine import Machine
from harness.result import RunResult
from harness.runner import run_scenario
from harness.vm import BootTimes, GuestVM

Progress = Callable[[str], None]

# The target for the smoke scenario's whole verdict (boot, SSH, workload, counts, teardown)
# against the bare kernel boot of the same run: closer to it than virtme-ng's single command
# is to its own bare boot.
BUDGET_FACTOR = 1.5
BUDGET_EXTRA_S = 2.0

#: How many copies of the scenario's VMs the scaling table runs by default.
DEFAULT_VM_COUNTS = (1, 2, 4)

# The phases that are the boot: one VM's own (harness.vm.BootTimes), or "boot N VMs".
_BOOT_PHASES = frozenset(name for name, _ in BootTimes().phases())


@dataclass(frozen=True)
class PeakMemory:
    """Peak resident set sizes in KiB (``ru_maxrss``): the harness process's own, and the
    largest of its children that ended (a QEMU, a setpriv, an ssh-keygen...)."""

    harness_kib: int
    largest_child_kib: int

    @classmethod
    def now(cls) -> PeakMemory:
        return cls(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def children_cpu_seconds() -> float:
    """CPU time (user + system) of this process's children that ended: the QEMUs, mostly."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class BenchResult:
    scenario: str
    bare_boots: list[float] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    # copies of the VMs (>1) -> the runs of the scenario so replicated
    scaled: dict[int, list[RunResult]] = field(default_factory=dict)
    counts: tuple[int, ...] = (1,)
    peak_after: dict[int, PeakMemory] = field(default_factory=dict)  # by copies
    scaling_note: str = ""  # why there is no scaling table, if there is none
    memory: PeakMemory | None = None
    probe: KvmProbe | None = None  # the KVM probe run once, uncached
    load: tuple[float, float] | None = None  # 1-minute load average at the start, at the end
    cpu: dict[str, float] = field(default_factory=dict)  # run id -> its children's CPU seconds
    bare_cpu: list[float] = field(default_factory=list)  # each bare boot's QEMU CPU seconds

    @property
    def all_passed(self) -> bool:
        return all(r.passed for r in self.runs + [r for rs in self.scaled.values() for r in rs])

    @property
    def bare(self) -> float:
        return statistics.median(self.bare_boots)

    def runs_of(self, copies: int) -> list[RunResult]:
        return self.runs if copies == 1 else self.scaled.get(copies, [])


def replicate(scenario: Scenario, copies: int) -> Scenario:
    """The scenario with each VM ``copies`` times, named ``<vm>-1`` ... ``<vm>-N``; every
    workload and expectation follows its VM into each copy (copy 1's workloads first).
    Each copy has its own user-mode networks and forwarded ports, as every VM does."""
    if copies == 1:
        return scenario

    def named(vm: str, k: int) -> str:
        return f"{vm}-{k}"

    ks = range(1, copies + 1)
    return dataclasses.replace(
        scenario, name=f"{scenario.name}-x{copies}",
        vms=tuple(dataclasses.replace(vm, name=named(vm.name, k))
                  for k in ks for vm in scenario.vms),
        workloads=tuple(dataclasses.replace(w, vm=named(w.vm, k))
                        for k in ks for w in scenario.workloads),
        expect=tuple(dataclasses.replace(e, vm=named(e.vm, k))
                     for k in ks for e in scenario.expect))


def scaling_refusal(scenario: Scenario) -> str | None:
    """Why the scenario cannot be replicated (None: it can)."""
    assigned = [d.id for vm in scenario.vms for d in vm.devices if d.assigned_host is not None]
    if assigned:
        return (f"not replicated: device {assigned[0]} is a host device, which only one VM "
                "can own")
    return None


def boot_seconds(run: RunResult) -> float:
    return sum(p.seconds for p in run.phases
               if p.name in _BOOT_PHASES or p.name.startswith("boot "))


def workload_seconds(run: RunResult) -> float:
    return sum(p.seconds for p in run.phases if p.name in ("setup", "workload"))


log = logging.getLogger(__name__)

BARE_TIMEOUT_S = 30.0  # a bare boot takes a few seconds even under TCG
BARE_ATTEMPTS = 2


def bare_boot(vm: GuestVM, run_dir: Path) -> float:
    """Seconds from QEMU launch to QEMU exit for a kernel whose init powers off at once."""
    vm.prepare()
    assert vm.image is not None and vm.accel is not None
    spec, image, accel, platform = vm.spec, vm.image, vm.accel.accel, vm.platform
    boot = qargv.Boot(kernel=image.kernel, initrd=image.initrd,
                      append=f"{qargv.base_append(platform)} harness.bare=1")

    def argv_for(qmp_fd: int, console_fd: int) -> list[str]:
        return qargv.bare_boot_argv(platform, spec, accel, boot, qmp_fd, console_fd)

    for attempt in range(1, BARE_ATTEMPTS + 1):
        with Machine(f"{spec.name}-bare" + (f"-try{attempt}" if attempt > 1 else ""),
                     argv_for, run_dir) as machine:
            started = time.monotonic()
            machine.launch()
            try:
                code = machine.wait_exit(BARE_TIMEOUT_S)
            except LaunchError:
                # TCG here now and then hangs a guest before its first console byte (seen
                # on 2 of about 20 bare boots on 2026-12-06); a bare boot is seconds long.
                if attempt == BARE_ATTEMPTS:
                    raise
                log.warning("bare boot %d still running after %g s: booting it again",
                            attempt, BARE_TIMEOUT_S)
                continue
            seconds = time.monotonic() - started
        if code != 0:
            raise LaunchError(machine.name, f"bare boot exited {code}", machine.argv, code)
        return seconds
    raise AssertionError("unreachable")


def run_bench(scenario: Scenario, scenario_file: str, out: Path, repeat: int,
              progress: Progress, counts: Sequence[int] = DEFAULT_VM_COUNTS) -> BenchResult:
    """``repeat`` rounds, each: the bare boot, the scenario, then the scenario with its VMs
    replicated to each of ``counts`` (1 is the scenario itself, run in every round anyway)."""
    refusal = scaling_refusal(scenario) if any(n != 1 for n in counts) else None
    copies = sorted({1, *counts}) if refusal is None else [1]
    result = BenchResult(scenario.name, counts=tuple(copies), scaling_note=refusal or "")
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    result.probe = dataclasses.replace(probe_kvm(host_platform(), None),
                                       seconds=time.monotonic() - started)
    progress(f"KVM probe (uncached): {result.probe.seconds:.2f} s")
    for i in range(repeat):
        cpu = children_cpu_seconds()
        with GuestVM(scenario.vms[0], out, progress) as vm:
            seconds = bare_boot(vm, out / f"bare-{i}")
        result.bare_boots.append(seconds)
        result.bare_cpu.append(children_cpu_seconds() - cpu)
        progress(f"bare kernel boot {i + 1}/{repeat}: {seconds:.2f} s")
        for n in copies:
            folder = f"run-{i}" if n == 1 else f"run-{i}-x{n}"
            cpu = children_cpu_seconds()
            run = run_scenario(replicate(scenario, n), scenario_file, out / folder, progress)
            result.cpu[run.run_id] = children_cpu_seconds() - cpu  # its QEMUs are gone now
            (result.runs if n == 1 else result.scaled.setdefault(n, [])).append(run)
            if i == 0:  # the peak so far, VM counts ascending: how it grows with them
                result.peak_after[n] = PeakMemory.now()
            vms = "" if n == 1 else f" with {n} copies of the VMs"
            progress(f"scenario run {i + 1}/{repeat}{vms}: {run.total_seconds:.2f} s, "
                     f"{'passed' if run.passed else 'FAILED'}")
    result.memory = PeakMemory.now()
    result.load = (load_before, os.getloadavg()[0])
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
    if bench.bare_cpu:
        cpu = statistics.median(bench.bare_cpu)
        busy = statistics.median(c / b for c, b in zip(bench.bare_cpu, bench.bare_boots,
                                                        strict=True) if b > 0)
        lines.append(f"  {'':<{width}}  QEMU CPU {cpu:.2f} s: {busy:.2f} cores busy while "
                     "it boots")
    budget = BUDGET_FACTOR * bench.bare + BUDGET_EXTRA_S
    lines.append(f"  ratio total / bare boot: {total / bench.bare:.2f}x; budget "
                 f"{BUDGET_FACTOR:g} x bare + {BUDGET_EXTRA_S:g} s = {budget:.2f} s: "
                 f"{'within' if total <= budget else 'OVER'}")
    if bench.probe is not None:
        answer = "usable" if bench.probe.usable else "not usable"
        lines.append(f"  KVM probe, uncached: {bench.probe.seconds:.2f} s ({answer}: "
                     f"{bench.probe.reason})")
    lines += format_scaling(bench)
    if bench.memory is not None:
        lines.append(f"  peak memory (RSS): harness process {_mib(bench.memory.harness_kib)}; "
                     f"largest child {_mib(bench.memory.largest_child_kib)} (a QEMU)")
    if bench.load is not None:
        lines.append(f"  host: {os.cpu_count()} CPUs, 1-minute load average {bench.load[0]:.2f} "
                     f"at the start, {bench.load[1]:.2f} at the end (other work on the host "
                     "shows here)")
    if not bench.all_passed:
        lines.append("  some runs FAILED: see their run folders")
    return "\n".join(lines)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def format_scaling(bench: BenchResult) -> list[str]:
    """The table of totals by number of VMs (medians over the rounds)."""
    if bench.scaling_note:
        return [f"  scaling: {bench.scaling_note}"]
    if len(bench.counts) < 2:
        return []
    rows = []
    one = None
    for n in bench.counts:
        runs = bench.runs_of(n)
        if not runs:
            continue
        total = statistics.median(r.total_seconds for r in runs)
        one = total if n == 1 else one
        peak = bench.peak_after.get(n)
        vms = len(runs[0].scenario.vms)
        other = statistics.median(r.total_seconds - boot_seconds(r) - workload_seconds(r)
                                  for r in runs)
        cpu = [bench.cpu[r.run_id] for r in runs if r.run_id in bench.cpu]
        busy = [bench.cpu[r.run_id] / r.total_seconds for r in runs
                if r.run_id in bench.cpu and r.total_seconds > 0]
        rows.append((str(vms),
                     f"{total:.2f}", f"{statistics.median(boot_seconds(r) for r in runs):.2f}",
                     f"{statistics.median(workload_seconds(r) for r in runs):.2f}",
                     f"{other:.2f}", f"{total / vms:.2f}", f"{total / one:.2f}x" if one else "-",
                     f"{statistics.median(cpu):.1f}" if cpu else "-",
                     f"{statistics.median(busy):.2f}" if busy else "-",
                     _mib(peak.harness_kib) if peak else "-",
                     "" if all(r.passed for r in runs) else "FAILED"))
    head = ("VMs", "total s", "boot s", "workload s", "other s", "s per VM", "vs 1 copy",
            "QEMU CPU s", "cores busy", "harness RSS", "")
    widths = [max(len(row[c]) for row in [head, *rows]) for c in range(len(head))]
    out = ["  scaling (VMs boot side by side, workloads run one after another; other: prepare, "
           "snapshots, verdicts, release, teardown; QEMU CPU: the children's user + system "
           "time, and over the total, the cores they kept busy; harness RSS: its peak once "
           "that many ran; medians):"]
    for row in [head, *rows]:
        out.append("    " + "  ".join(cell.rjust(w) if c < len(head) - 1 else cell
                                      for c, (cell, w) in enumerate(zip(row, widths,
                                                                        strict=True))).rstrip())
    return out
