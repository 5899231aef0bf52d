"""An L1 whose kernel reports a locked-up vCPU is recognised from its console.

The lines are copied from a real x86 lab run on this project's CI machine (2026-12-06), where
L1 hung as its harness started L2 under nested SVM; the others are ordinary L1 lines.
"""

from __future__ import annotations

import time

import pytest

from harness.errors import GuestError
from harness.lab import l1
from harness.lab.l1 import _LOCKUP
from harness.qemu.console import ConsoleLine

HUNG = [
    "[   76.722464] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [qemu-system-x86:139]",
    "[  237.450081] rcu: INFO: rcu_preempt self-detected stall on CPU",
    # a clean-clone CI run here, 18:38: L1's CPU 0 went into L2 (2 vCPUs, starting) for good
    "[  104.377657] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:",
]
WELL = [
    "[10:46:32] l2: starting QEMU (kvm, 1 vCPU, 256 MiB)",
    "[    0.518404] kvm [1]: GICv4 support disabled",
    "harness-lab: job end 45.46",
    "[   45.605466] sysrq: Power Off",
]


@pytest.mark.parametrize("line", HUNG)
def test_a_locked_up_l1_is_recognised(line: str) -> None:
    assert _LOCKUP.search(line)


@pytest.mark.parametrize("line", WELL)
def test_ordinary_l1_lines_are_not(line: str) -> None:
    assert not _LOCKUP.search(line)


class _SilentConsole:
    """An L1 console that prints nothing more: what a wholly hung L1 looks like from L0."""

    def wait_for(self, pattern: str, timeout: float, what: str) -> None:
        time.sleep(min(timeout, 0.05))
        raise GuestError("lab-l1", f"no {what}")

    def lines(self, since: int = 0) -> list[ConsoleLine]:
        return []


class _HungMachine:
    name = "lab-l1"
    argv: list[str] = []
    console = _SilentConsole()

    def is_alive(self) -> bool:
        return True


def test_an_l1_that_falls_silent_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested SVM under TCG sometimes hangs L1 without a lockup message (seen here on
    2026-12-06: the inner ping never ended, no line for minutes); the job's heartbeat stops,
    and the silence ends the wait long before the job's own limit."""
    monkeypatch.setattr(l1, "SILENCE_S", 0.3)
    started = time.monotonic()
    with pytest.raises(l1.L1LockedUp, match=r"not a line of the job for \d+ s"):
        l1._follow(_HungMachine(), lambda message: None, 600.0)  # type: ignore[arg-type]
    assert time.monotonic() - started < 5


class _KernelOnlyConsole(_SilentConsole):
    """A console where only L1's kernel still speaks (what the CI run's L1 printed after its
    heartbeat stopped: task-blocked reports, every minute or so)."""

    def __init__(self) -> None:
        self.count = 0

    def lines(self, since: int = 0) -> list[ConsoleLine]:
        self.count += 1
        return [ConsoleLine(time.monotonic(), f"[  {242 + self.count}.850033] INFO: task "
                            "khugepaged:36 blocked for more than 120 seconds.", self.count)]


def test_kernel_lines_alone_are_not_a_live_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(l1, "SILENCE_S", 0.3)
    machine = _HungMachine()
    machine.console = _KernelOnlyConsole()
    with pytest.raises(l1.L1LockedUp, match=r"not a line of the job for \d+ s"):
        l1._follow(machine, lambda message: None, 600.0)  # type: ignore[arg-type]


def test_the_job_prints_its_heartbeat() -> None:
    job = l1.run_job(["true"])
    assert f"while sleep {l1.HEARTBEAT_S}; do echo \"harness-lab: alive" in job
    assert l1.HEARTBEAT_S * 3 < l1.SILENCE_S  # a late beat or two is not a hang
