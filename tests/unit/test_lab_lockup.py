"""An L1 whose kernel reports a locked-up vCPU is recognised from its console.

The lines are copied from a real x86 lab run on this project's CI machine (2026-12-06), where
L1 hung as its harness started L2 under nested SVM; the others are ordinary L1 lines.
"""

from __future__ import annotations

import pytest

from harness.lab.l1 import _LOCKUP

HUNG = [
    "[   76.722464] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [qemu-system-x86:139]",
    "[  237.450081] rcu: INFO: rcu_preempt self-detected stall on CPU",
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
