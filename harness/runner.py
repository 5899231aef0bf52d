"""One scenario end to end, as phases: prepare, boot, snapshot, workloads, snapshot, verdicts.

Each phase is a function that takes frozen values and returns one (:class:`Booted`,
:class:`Window`, a tuple of :class:`~harness.result.WorkloadResult`, the verdicts), so new
phases (hotplug, a second measurement window) slot in between without reaching into the
others.  :func:`run_scenario` composes them; the :class:`~harness.result.RunResult` grows by
``dataclasses.replace`` after each phase, so a run that fails half-way still reports what it
measured.  Teardown always runs (an ExitStack owns every VM, binding and probe), and the raw
captures are saved in the run folder as evidence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType

from harness.config.model import Scenario, Stage
from harness.errors import GuestError, HarnessError, Interrupted, OutputError
from harness.guest.agent import GuestSnapshot, functions_to_json
from harness.host.binding import VfioBinding
from harness.hostside import HostEvidence, HostMeasurement, HostSnapshot, ReleaseState
from harness.join import join
from harness.logs import run_log
from harness.qemu.console import FATAL_PATTERNS
from harness.result import HostFindings, Phase, RunResult, VMSummary, WorkloadResult
from harness.scratch import sweep, tidy
from harness.verdict import ExpectationResult, VectorVerdict, check, check_released
from harness.vm import GuestVM

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Booted:
    vms: tuple[VMSummary, ...]
    phases: tuple[Phase, ...]  # the boot's own phases (one VM) or its total (several)


@dataclass(frozen=True)
class Window:
    """One side of the measurement window: every guest's counters and the host's."""

    guests: Mapping[str, GuestSnapshot]
    host: HostSnapshot | None


# --- the phases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeepUp:
    """``harness up``: each VM gets a QMP monitor for people at ``<qmp_dir>/<vm>.qmp``, and
    ``hold`` is called once the measurement window is open (after the measure workloads), with
    the host's evidence (None when nothing is assigned), so it can answer with the live wiring; it
    returns when the user is done (Ctrl-C, ``harness down``), and the run then closes the
    window, judges what was measured and tears down as ``run`` does."""

    qmp_dir: Path
    hold: Callable[[tuple[GuestVM, ...], HostEvidence | None], None]


def prepare_vms(scenario: Scenario, run_dir: Path, progress: Progress,
                stack: contextlib.ExitStack, qmp_dir: Path | None = None
                ) -> tuple[GuestVM, ...]:
    """Image, accelerator and placement of every VM; each VM's teardown goes on ``stack``."""
    vms = []
    for spec in scenario.vms:
        vm = stack.enter_context(GuestVM(spec, run_dir, progress, scenario.timeouts.boot_s,
                                         scenario.timeouts.shutdown_s,
                                         scenario.timeouts.init_s,
                                         user_qmp=qmp_dir / f"{spec.name}.qmp"
                                         if qmp_dir is not None else None))
        vm.prepare()
        vms.append(vm)
    return tuple(vms)


def boot(vms: tuple[GuestVM, ...], attempts: int = 1,
         progress: Progress = lambda message: None) -> Booted:
    """Every QEMU first, then every wait: the guests boot side by side.  A VM whose kernel
    never reaches init (it hangs, panics or resets) is booted again, up to ``attempts`` boots
    in all: every VM is waited for first, each within its own limits, then those that
    failed so are launched again together.  With one VM, the time its failed boots took is a
    phase of its own; with several, they are in the boot's total."""
    started = time.monotonic()
    for vm in vms:
        vm.launch()
    waiting = list(vms)
    while waiting:
        again = []
        for vm in waiting:
            try:
                vm.wait_ready()
            except GuestError as exc:
                done = len(vm.retried_boots) + 1
                if not exc.before_init or done >= attempts:
                    if not vm.retried_boots:
                        raise
                    raise type(exc)(vm.name, f"{exc.reason} (boot {done} of {attempts}; the "
                                    f"earlier: {'; '.join(vm.retried_boots)})",
                                    exc.console_tail, exc.before_init) from None
                progress(f"{vm.name}: {exc.reason}; booting it again (boot {done + 1} of "
                         f"{attempts})")
                again.append((vm, exc))
        for vm, failure in again:
            vm.relaunch(failure)
        waiting = [vm for vm, _ in again]
    if len(vms) == 1:
        phases = tuple(Phase(n, s) for n, s in vms[0].times.phases())
        if vms[0].retried_seconds:
            phases = (Phase("retried boots", vms[0].retried_seconds), *phases)
    else:
        phases = (Phase(f"boot {len(vms)} VMs", time.monotonic() - started),)
    return Booted(tuple(_summary(vm) for vm in vms), phases)


def _summary(vm: GuestVM) -> VMSummary:
    assert vm.accel is not None and vm.ssh is not None
    return VMSummary(vm.name, vm.platform.arch.value, vm.spec.qemu or vm.platform.qemu,
                     vm.machine.version if vm.machine else "", vm.accel.accel, vm.accel.reason,
                     vm.kernel_release, vm.image_key, vm.ssh.port,
                     tuple((p.device.id, p.device.kind, p.bdf) for p in vm.placed),
                     tuple(vm.retried_boots))


def snapshot(vms: tuple[GuestVM, ...], host: HostEvidence | None, label: str,
             run_dir: Path) -> Window:
    """Every guest's counters (saved as ``<vm>.<label>.interrupts`` and ``.devices.json``)
    and the host's."""
    guests = {}
    for vm in vms:
        guests[vm.name] = vm.snapshot()
        save(run_dir / f"{vm.name}.{label}.interrupts", guests[vm.name].raw_interrupts)
        # The PCI functions (MSI IRQs and INTx line from sysfs): what the join reads.
        save(run_dir / f"{vm.name}.{label}.devices.json",
             functions_to_json(guests[vm.name].devices))
    return Window(MappingProxyType(guests), host.snapshot(label) if host else None)


def save(path: Path, text: str) -> None:
    """One piece of the run's evidence into the run folder; a full disk is the run's error
    (exit 4, the file named), not a traceback."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def run_workloads(scenario: Scenario, vms: tuple[GuestVM, ...], run_dir: Path,
                  progress: Progress, stage: Stage = Stage.MEASURE
                  ) -> tuple[WorkloadResult, ...]:
    """The scenario's workloads of ``stage`` in order, each for at most its ``timeout_s`` of
    wall clock.  Their output is streamed to ``<vm>.workload.log`` as it arrives (only a tail
    stays in memory).  A workload that fails or outlives its limit is a failed result, not an
    error: the next workloads and the verdicts still run."""
    by_name = {vm.name: vm for vm in vms}
    results = []
    for workload in (w for w in scenario.workloads if w.stage is stage):
        if workload.hotplug is not None:  # a device step, not a command (harness.hotplug)
            from harness.hotplug import run_workload

            results.append(run_workload(workload, by_name[workload.vm], progress))
            if not results[-1].passed:
                progress(results[-1].message)
            continue
        label = workload.name or " ".join(workload.run)
        progress(f"{workload.vm}: running {label}")
        # Unbuffered: each chunk is in the file as soon as it arrived (tail -f shows it).
        path = run_dir / f"{workload.vm}.workload.log"
        try:
            with path.open("ab+", buffering=0) as log_file:
                log_file.write(f"$ {label}\n".encode())
                done = by_name[workload.vm].run(workload.run, workload.timeout_s,
                                                output=log_file.write)
                log_file.seek(-1, os.SEEK_END)
                newline = b"" if log_file.read(1) == b"\n" else b"\n"
                stop = "could not be stopped" if done.left_running else "stopped"
                footer = (f"[timed out: still running at its limit of {workload.timeout_s:g} "
                          f"s, {stop}]" if done.timed_out else f"[exit {done.exit_status}]")
                log_file.write(newline + footer.encode() + b"\n")
        except OSError as exc:  # a full disk: the run's error, the file named
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])[-2000:]
        result = WorkloadResult(workload.vm, label, workload.run, done.exit_status,
                                done.seconds, tail, workload.timeout_s, done.timed_out,
                                done.stdout_bytes + done.stderr_bytes, done.left_running)
        if not result.passed:
            progress(result.message)
        results.append(result)
    return tuple(results)


def check_release(scenario: Scenario, vms: tuple[GuestVM, ...],
                  expectations: tuple[ExpectationResult, ...],
                  state: ReleaseState | None) -> tuple[ExpectationResult, ...]:
    """Each ``released: true`` expectation, judged on what the release stage left behind."""
    out = []
    pids = {vm.name: vm.machine.pid if vm.machine else None for vm in vms}
    devices = {(vm.name, p.device.id): p.device.assigned_host for vm in vms for p in vm.placed}
    for result in expectations:
        e = result.expectation
        if not e.released:
            out.append(result)
            continue
        bdf = devices.get((e.vm, e.device))
        if state is None:
            out.append(check_released(result, bdf, [(0, "no host evidence")], None, ()))
            continue
        pid = pids.get(e.vm)
        left = [(v.host_irq, v.cause) for v in state.left_for(bdf or "")]
        out.append(check_released(result, bdf, left,
                                  state.hw_lpis.get(pid) if pid is not None else None,
                                  state.notes))
    return tuple(out)


def judge(scenario: Scenario, vms: tuple[GuestVM, ...], before: Window, after: Window,
          host: HostMeasurement | None
          ) -> tuple[tuple[VectorVerdict, ...], tuple[ExpectationResult, ...]]:
    """A verdict per vector of every VM, and each expectation checked against them."""
    verdicts: list[VectorVerdict] = []
    for vm in vms:
        verdicts += join(vm.name, vm.placed, before.guests[vm.name], after.guests[vm.name],
                         host)
    return tuple(verdicts), tuple(check(e, verdicts) for e in scenario.expect)


# --- the run --------------------------------------------------------------------------------


class _Progress:
    """The run's frozen result so far, and a clock that adds a phase to it."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.current: str | None = None  # the phase running now

    def update(self, **changes: object) -> None:
        self.result = dataclasses.replace(self.result, **changes)  # type: ignore[arg-type]

    def add_phases(self, *phases: Phase) -> None:
        self.update(phases=self.result.phases + phases)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.current = name
        try:
            yield None
        finally:
            self.add_phases(Phase(name, time.monotonic() - started))


def run_scenario(scenario: Scenario, scenario_file: str, run_dir: Path,
                 progress: Progress = lambda message: None,
                 force_bind: bool = False, keep_up: KeepUp | None = None) -> RunResult:
    """Run the scenario; harness errors end up in ``result.error``, never half-torn-down.

    A SIGINT or SIGTERM (KeyboardInterrupt) ends the phases: teardown then runs with further
    signals held (recorded, not raised), and the result carries :class:`Interrupted` with what
    was measured up to then.  A QEMU that died on its own is named as the cause, with how it
    died and its console tail, instead of whatever failed next because of it.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep()  # scratch files of harnesses that were killed
    try:
        with run_log(run_dir / "harness.log"):
            return _run(scenario, scenario_file, run_dir, progress, force_bind, keep_up)
    finally:
        tidy()


def _run(scenario: Scenario, scenario_file: str, run_dir: Path, progress: Progress,
         force_bind: bool, keep_up: KeepUp | None = None) -> RunResult:
    run = _Progress(RunResult(scenario, scenario_file, run_dir, time.time()))
    vms: list[GuestVM] = []
    interrupted: str | None = None
    try:
        with contextlib.ExitStack() as stack:
            try:
                _phases(scenario, run, vms, stack, progress, force_bind, keep_up)
            except KeyboardInterrupt:
                interrupted = f"interrupted during {run.current or 'the run'}"
            except Exception as exc:  # whatever broke because a QEMU died, that is the cause
                died = _qemu_death(vms, run.current, exc)
                if died is None:
                    raise
                raise died from exc
            finally:
                run.update(console_tails=MappingProxyType(
                    {vm.name: _console_evidence(vm) for vm in vms}))
                teardown_started = time.monotonic()
                with _signals_held() as held:
                    stack.close()
                if held and interrupted is None:
                    interrupted = f"interrupted ({held[0].name}) during teardown"
                run.add_phases(Phase("teardown", time.monotonic() - teardown_started))
    except HarnessError as exc:
        run.update(error=exc)
        progress(f"error: {exc}")
    if interrupted is not None:
        run.update(error=Interrupted(f"{interrupted}; what was measured is reported"))
        progress(f"error: {interrupted}; everything started was torn down")
    return run.result


def _phases(scenario: Scenario, run: _Progress, vms: list[GuestVM],
            stack: contextlib.ExitStack, progress: Progress, force_bind: bool,
            keep_up: KeepUp | None = None) -> None:
    """The phases in order, each result added to ``run``; ``vms`` is filled as they are made
    (the caller reads their console tails and tears them down through ``stack``)."""
    run_dir = run.result.run_dir
    # The VMs' own stack is entered after the bindings and probes, so on the way out every
    # QEMU is gone before any device goes back to its host driver.
    vm_stack = contextlib.ExitStack()
    try:
        with run.phase("prepare (image, accel)"):
            vms += prepare_vms(scenario, run_dir, progress, vm_stack,
                               keep_up.qmp_dir if keep_up is not None else None)
        host = _host_evidence(scenario, tuple(vms), run, stack, progress, force_bind)
    except BaseException:
        vm_stack.close()
        raise
    stack.enter_context(vm_stack)
    ready = tuple(vms)
    with run.phase("boot"):
        booted = boot(ready, scenario.timeouts.boot_attempts, progress)
    run.update(vms=booted.vms, phases=run.result.phases[:-1] + booted.phases)
    if any(w.stage is Stage.SETUP for w in scenario.workloads):
        with run.phase("setup"):
            run.update(workloads=run_workloads(scenario, ready, run_dir, progress, Stage.SETUP))
    with run.phase("snapshot before"):
        before = snapshot(ready, host, "before", run_dir)
    with run.phase("workload"):
        run.update(workloads=run.result.workloads
                   + run_workloads(scenario, ready, run_dir, progress))
    if keep_up is not None:
        with run.phase("up (by hand)"):
            keep_up.hold(ready, host)
    with run.phase("verdict"):
        after = snapshot(ready, host, "after", run_dir)
        measured = None
        if host is not None:
            assert before.host is not None and after.host is not None
            measured = host.measure(before.host, after.host)
            run.update(host=HostFindings(tuple(w.to_dict() for w in measured.wiring),
                                         run.result.host.notes + measured.notes()))
        verdicts, expectations = judge(scenario, ready, before, after, measured)
        run.update(verdicts=verdicts, expectations=expectations)
    if any(w.stage is Stage.RELEASE for w in scenario.workloads):
        with run.phase("release"):
            released = run_workloads(scenario, ready, run_dir, progress, Stage.RELEASE)
            run.update(workloads=run.result.workloads + released)
            state = None
            if host is not None:
                assert after.host is not None
                state = host.release_state(after.host, [
                    pid for vm in ready if vm.machine and (pid := vm.machine.pid) is not None])
                run.update(host=dataclasses.replace(
                    run.result.host, notes=run.result.host.notes + state.notes))
            run.update(expectations=check_release(scenario, ready, run.result.expectations,
                                                  state))


def _qemu_death(vms: list[GuestVM], phase: str | None, cause: Exception,
                settle_s: float = 3.0) -> GuestError | None:
    """The first VM whose QEMU died on its own or whose guest kernel died (a fatal console
    line: a panic), as the error to report; None if every guest is well.  A panicking guest
    takes a moment to print and exit, so this looks for ``settle_s`` before saying None."""
    then = str(cause) or type(cause).__name__
    deadline = time.monotonic() + settle_s
    while True:
        for vm in vms:
            how = vm.machine.death() if vm.machine else None
            fatal = _fatal_console_line(vm)
            if how is None and fatal is None:
                continue
            what = "; ".join(filter(None, [f"QEMU {how}" if how else None,
                                           f"the guest printed {fatal!r}" if fatal else None]))
            return GuestError(vm.name, f"{what} during {phase or 'the run'} (then: {then})",
                              vm.console_tail())
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _console_evidence(vm: GuestVM) -> str:
    """The console's last lines for the report, led by its fatal line (a panic) when that has
    scrolled out of them under its stack trace."""
    tail = vm.console_tail()
    fatal = _fatal_console_line(vm)
    if fatal is None or fatal in tail:
        return tail
    return f"{fatal}\n[... the console log in the run folder has the lines between]\n{tail}"


def _fatal_console_line(vm: GuestVM, window: int = 256 << 10) -> str | None:
    """The first fatal line (a panic) of the last ``window`` bytes of the VM's console log:
    the tail alone may already have scrolled past it, under the stack trace."""
    if vm.machine is None:
        return None
    try:
        with open(vm.machine.console_path, "rb") as fh:
            fh.seek(max(fh.seek(0, os.SEEK_END) - window, 0))
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    return next((ln.strip() for ln in text.splitlines()
                 if any(p.search(ln.split("] ", 1)[-1]) for p in FATAL_PATTERNS)), None)


@contextlib.contextmanager
def _signals_held() -> Iterator[list[signal.Signals]]:
    """SIGINT and SIGTERM recorded, not raised, inside: teardown must finish whatever comes.
    Only the main thread can set handlers; elsewhere nothing changes."""
    held: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def record(signum: int, frame: FrameType | None) -> None:
        held.append(signal.Signals(signum))

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _host_evidence(scenario: Scenario, vms: tuple[GuestVM, ...], run: _Progress,
                   stack: contextlib.ExitStack, progress: Progress,
                   force_bind: bool) -> HostEvidence | None:
    """For assigned devices: preflight, the journaled binding and the bypass probes, all
    before any QEMU starts; None when the scenario assigns nothing."""
    assigned = [d.assigned_host for spec in scenario.vms for d in spec.devices
                if d.assigned_host is not None]
    if not assigned:
        return None
    host = stack.enter_context(HostEvidence(run.result.run_dir, assigned, vms[0].accel))
    run.update(host=HostFindings(notes=host.device_notes))
    for note in host.device_notes:
        progress(note)
    with run.phase("bind to vfio-pci"):
        binding = stack.enter_context(VfioBinding(assigned, force=force_bind))
    if binding.bound:
        progress(f"bound {', '.join(binding.bound)} to vfio-pci (journaled; restored at "
                 "the end)")
    if host.wiring_note:
        progress(host.wiring_note)
    return host
