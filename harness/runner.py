"""One scenario end to end: prepare, boot, snapshot, workloads, snapshot, verdicts, teardown.

Teardown always runs (an ExitStack owns every VM); the result carries the phase timings, the
per-vector verdicts with their evidence and the expectation results, and is what every report
format is written from.  Raw captures are saved in the run folder as evidence.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.config.model import EMULATED_KINDS, Scenario
from harness.errors import HarnessError
from harness.guest.agent import GuestSnapshot
from harness.qemu.argv import PlacedDevice
from harness.verdict import ExpectationResult, VectorVerdict, check, classify
from harness.vm import GuestVM

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float


@dataclass(frozen=True)
class WorkloadResult:
    vm: str
    name: str
    argv: tuple[str, ...]
    exit_status: int
    seconds: float
    output_tail: str


@dataclass(frozen=True)
class VMSummary:
    name: str
    accel: str
    accel_reason: str
    kernel_release: str
    image_key: str
    ssh_port: int | None
    devices: tuple[tuple[str, str, str], ...]  # (id, kind, guest BDF)


@dataclass
class RunResult:
    scenario: Scenario
    scenario_file: str
    run_dir: Path
    started: float  # time.time()
    phases: list[Phase] = field(default_factory=list)
    vms: list[VMSummary] = field(default_factory=list)
    workloads: list[WorkloadResult] = field(default_factory=list)
    verdicts: list[VectorVerdict] = field(default_factory=list)
    expectations: list[ExpectationResult] = field(default_factory=list)
    error: HarnessError | None = None
    console_tails: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (self.error is None and all(w.exit_status == 0 for w in self.workloads)
                and all(e.passed for e in self.expectations))

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)


def vector_verdicts(vm: str, placed: tuple[PlacedDevice, ...], before: GuestSnapshot,
                    after: GuestSnapshot) -> list[VectorVerdict]:
    """A verdict for every MSI/MSI-X vector of every scenario device the guest set up."""
    delta = before.interrupts.delta(after.interrupts)
    verdicts = []
    for p in placed:
        func = after.device(p.bdf) or before.device(p.bdf)
        msi_irqs = {irq for irq, _ in func.msi_irqs} if func else set()
        for row in delta.rows:
            line = row.after or row.before
            if line is None:
                continue
            ours = line.label in msi_irqs or (line.vector is not None
                                              and line.vector.bdf == p.bdf)
            if not ours:
                continue
            path, reason = classify(p.device.kind in EMULATED_KINDS, row.total, None, None)
            verdicts.append(VectorVerdict(
                vm=vm, device=p.device.id, bdf=p.bdf,
                entry=line.vector.entry if line.vector else None,
                name=", ".join(line.actions) or line.description, irq=line.label,
                guest_delta=row.total, host_delta=None, wiring=None, path=path, reason=reason,
                per_cpu=row.per_cpu))
    return verdicts


class _Clock:
    def __init__(self, result: RunResult) -> None:
        self._result = result

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield None
        finally:
            self._result.phases.append(Phase(name, time.monotonic() - started))


def run_scenario(scenario: Scenario, scenario_file: str, run_dir: Path,
                 progress: Progress = lambda message: None) -> RunResult:
    """Run the scenario; harness errors end up in ``result.error``, never half-torn-down."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(scenario, scenario_file, run_dir, time.time())
    clock = _Clock(result)
    vms: dict[str, GuestVM] = {}
    try:
        with contextlib.ExitStack() as stack:
            try:
                _run_inside(scenario, result, clock, vms, stack, progress)
            finally:
                for name, vm in vms.items():
                    result.console_tails[name] = vm.console_tail()
                teardown_started = time.monotonic()
                stack.close()
                result.phases.append(Phase("teardown", time.monotonic() - teardown_started))
    except HarnessError as exc:
        result.error = exc
        progress(f"error: {exc}")
    return result


def _run_inside(scenario: Scenario, result: RunResult, clock: _Clock,
                vms: dict[str, GuestVM], stack: contextlib.ExitStack,
                progress: Progress) -> None:
    with clock.phase("prepare (image, accel)"):
        for spec in scenario.vms:
            vm = stack.enter_context(GuestVM(spec, result.run_dir, progress,
                                             scenario.timeouts.boot_s,
                                             scenario.timeouts.shutdown_s))
            vm.prepare()
            vms[spec.name] = vm
    boot_started = time.monotonic()
    for vm in vms.values():
        vm.boot()
    boot_total = time.monotonic() - boot_started
    if len(vms) == 1:
        result.phases += [Phase(n, s) for n, s in next(iter(vms.values())).times.phases()]
    else:
        result.phases.append(Phase(f"boot {len(vms)} VMs", boot_total))
    for vm in vms.values():
        assert vm.accel is not None and vm.ssh is not None
        result.vms.append(VMSummary(vm.name, vm.accel.accel, vm.accel.reason,
                                    vm.kernel_release, vm.image_key, vm.ssh.port,
                                    tuple((p.device.id, p.device.kind, p.bdf)
                                          for p in vm.placed)))
    before = {}
    with clock.phase("snapshot before"):
        for name, vm in vms.items():
            before[name] = vm.snapshot()
            (result.run_dir / f"{name}.before.interrupts").write_text(before[name].raw_interrupts)
    with clock.phase("workload"):
        for workload in scenario.workloads:
            label = workload.name or " ".join(workload.run)
            progress(f"{workload.vm}: running {label}")
            done = vms[workload.vm].run(workload.run, workload.timeout_s)
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            result.workloads.append(WorkloadResult(workload.vm, label, workload.run,
                                                   done.exit_status, done.seconds,
                                                   "\n".join(tail)))
            (result.run_dir / f"{workload.vm}.workload.log").open("a").write(
                f"$ {label}\n{done.stdout}{done.stderr}[exit {done.exit_status}]\n")
    with clock.phase("verdict"):
        for name, vm in vms.items():
            after = vm.snapshot()
            (result.run_dir / f"{name}.after.interrupts").write_text(after.raw_interrupts)
            result.verdicts += vector_verdicts(name, vm.placed, before[name], after)
        result.expectations = [check(e, result.verdicts) for e in scenario.expect]
