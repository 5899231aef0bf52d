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
from typing import Any

from harness.config.model import EMULATED_KINDS, Scenario, VfioPci
from harness.errors import HarnessError
from harness.guest.agent import GuestSnapshot
from harness.host.binding import VfioBinding
from harness.hostside import HostEvidence
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
    host_wiring: list[dict[str, Any]] = field(default_factory=list)
    host_notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.error is None and all(w.exit_status == 0 for w in self.workloads)
                and all(e.passed for e in self.expectations))

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)


def vector_verdicts(vm: str, placed: tuple[PlacedDevice, ...], before: GuestSnapshot,
                    after: GuestSnapshot, host: HostEvidence | None = None) -> list[VectorVerdict]:
    """A verdict for every MSI/MSI-X vector of every scenario device the guest set up.

    For an assigned device the guest vector (guest BDF, MSI-X entry) is joined to the host's
    vfio vector (host BDF, same entry: vfio maps the MSI-X table one to one) for the host
    count and the bypass wiring.
    """
    delta = before.interrupts.delta(after.interrupts)
    verdicts = []
    for p in placed:
        func = after.device(p.bdf) or before.device(p.bdf)
        msi_irqs = {irq for irq, _ in func.msi_irqs} if func else set()
        assigned = p.device if isinstance(p.device, VfioPci) else None
        for row in delta.rows:
            line = row.after or row.before
            if line is None:
                continue
            ours = line.label in msi_irqs or (line.vector is not None
                                              and line.vector.bdf == p.bdf)
            if not ours:
                continue
            entry = line.vector.entry if line.vector else None
            host_delta = wiring = None
            if assigned is not None and host is not None:
                host_delta = host.host_delta(assigned.host, entry)
                found = host.wiring_for(assigned.host, entry)
                wiring = found.as_verdict_wiring() if found else None
            path, reason = classify(p.device.kind in EMULATED_KINDS, row.total, host_delta,
                                    wiring)
            if assigned is not None and host is not None and host.wiring_note and wiring is None:
                reason += f" ({host.wiring_note})"
            verdicts.append(VectorVerdict(
                vm=vm, device=p.device.id, bdf=p.bdf, entry=entry,
                name=", ".join(line.actions) or line.description, irq=line.label,
                guest_delta=row.total, host_delta=host_delta, wiring=wiring, path=path,
                reason=reason, per_cpu=row.per_cpu))
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
                 progress: Progress = lambda message: None,
                 force_bind: bool = False) -> RunResult:
    """Run the scenario; harness errors end up in ``result.error``, never half-torn-down."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(scenario, scenario_file, run_dir, time.time())
    clock = _Clock(result)
    vms: dict[str, GuestVM] = {}
    try:
        with contextlib.ExitStack() as stack:
            try:
                _run_inside(scenario, result, clock, vms, stack, progress, force_bind)
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
                progress: Progress, force_bind: bool) -> None:
    # The VMs' own stack is pushed after the device bindings, so on the way out every QEMU
    # is gone before any device goes back to its host driver.
    vm_stack = contextlib.ExitStack()
    try:
        with clock.phase("prepare (image, accel)"):
            for spec in scenario.vms:
                vm = vm_stack.enter_context(GuestVM(spec, result.run_dir, progress,
                                                    scenario.timeouts.boot_s,
                                                    scenario.timeouts.shutdown_s))
                vm.prepare()
                vms[spec.name] = vm
    except BaseException:
        vm_stack.close()
        raise
    assigned = [d.host for spec in scenario.vms for d in spec.devices if isinstance(d, VfioPci)]
    host: HostEvidence | None = None
    if assigned:
        host = HostEvidence(result.run_dir)
        host.check_devices(assigned, next(iter(vms.values())).accel)
        result.host_notes += host.device_notes
        for note in host.device_notes:
            progress(note)
        with clock.phase("bind to vfio-pci"):
            binding = stack.enter_context(VfioBinding(assigned, force=force_bind))
        if binding.bound:
            progress(f"bound {', '.join(binding.bound)} to vfio-pci (journaled; restored at "
                     "the end)")
        host.start_tracing()  # before QEMU: every registration must be seen
        stack.callback(host.stop)
        if host.wiring_note:
            progress(host.wiring_note)
    stack.enter_context(vm_stack)
    boot_started = time.monotonic()
    for vm in vms.values():  # all QEMUs first: the guests boot side by side
        vm.launch()
    for vm in vms.values():
        vm.wait_ready()
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
        if host is not None:
            host.snapshot_before()
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
        afters = {}
        for name, vm in vms.items():
            afters[name] = vm.snapshot()
            (result.run_dir / f"{name}.after.interrupts").write_text(afters[name].raw_interrupts)
        if host is not None:
            host.snapshot_after()  # while the guests run: vfio lines vanish with QEMU
            result.host_wiring = [w.to_dict() for w in host.wiring]
            result.host_notes += ([host.wiring_note] if host.wiring_note else []) + [
                f"anomaly {a.kind}: {a.message}" for a in host.tracker.anomalies]
        for name, vm in vms.items():
            result.verdicts += vector_verdicts(name, vm.placed, before[name], afters[name],
                                               host)
        result.expectations = [check(e, result.verdicts) for e in scenario.expect]
