"""What a run produced, as frozen values: every report format is written from a RunResult.

It lives apart from the runner so that ``report/`` depends on the values, not on the code
that makes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from harness.config.model import Scenario
from harness.errors import HarnessError
from harness.verdict import ExpectationResult, VectorVerdict


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float


@dataclass(frozen=True)
class WorkloadResult:
    """One workload's end.  ``exit_status`` is -1 when there is none: stopped at its limit
    (``timed_out``; ``left_running`` if the guest could not confirm the stop) or killed by a
    signal.  The whole output is in ``<vm>.workload.log``; ``output_tail`` is its last lines,
    ``output_bytes`` how much there was."""

    vm: str
    name: str
    argv: tuple[str, ...]
    exit_status: int
    seconds: float
    output_tail: str
    timeout_s: float = 0.0  # the limit on its wall clock
    timed_out: bool = False
    output_bytes: int = 0
    left_running: bool = False

    @property
    def passed(self) -> bool:
        return self.exit_status == 0 and not self.timed_out

    @property
    def message(self) -> str:
        """One line: the workload's VM, name and what became of it (with its limit)."""
        if self.timed_out:
            stop = ("and could not be stopped: it may still run in the guest"
                    if self.left_running else "stopped")
            what = (f"timed out: still running at its limit of {self.timeout_s:g} s, {stop} "
                    f"({self.output_bytes} bytes of output)")
        elif self.exit_status == -1:
            what = "ended without an exit status (killed by a signal)"
        else:
            what = f"exit status {self.exit_status}"
        return f"workload {self.vm}: {self.name}: {what} after {self.seconds:.1f} s"


@dataclass(frozen=True)
class VMSummary:
    name: str
    arch: str
    qemu: str
    qemu_version: str  # what the running QEMU said it is (QMP query-version)
    accel: str
    accel_reason: str
    kernel_release: str
    image_key: str
    ssh_port: int | None
    devices: tuple[tuple[str, str, str], ...]  # (id, kind, guest BDF)
    retried_boots: tuple[str, ...] = ()  # earlier boots that never reached init, why


@dataclass(frozen=True)
class HostFindings:
    """The host's side of an assigned-device run: bypass wiring per vector and notes."""

    wiring: tuple[Mapping[str, Any], ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunResult:
    scenario: Scenario
    scenario_file: str
    run_dir: Path
    started: float  # time.time()
    phases: tuple[Phase, ...] = ()
    vms: tuple[VMSummary, ...] = ()
    workloads: tuple[WorkloadResult, ...] = ()
    verdicts: tuple[VectorVerdict, ...] = ()
    expectations: tuple[ExpectationResult, ...] = ()
    error: HarnessError | None = None
    console_tails: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    host: HostFindings = HostFindings()
    # Names this run in every report written of it (JSON, JUnit), so a merge that is given the
    # same report twice counts it once.  ``dataclasses.replace`` keeps it.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def passed(self) -> bool:
        return (self.error is None and all(w.exit_status == 0 for w in self.workloads)
                and all(e.passed for e in self.expectations))

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases)
