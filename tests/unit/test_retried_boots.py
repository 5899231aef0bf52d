"""A VM booted again because its kernel never reached init: the summary and report.json name
every retried boot, so a run that passed on its second boot is never mistaken for a clean one."""

from __future__ import annotations

import json
from pathlib import Path

from harness.config.model import VM, Scenario, VirtioNet
from harness.report.json_report import to_dict
from harness.report.summary import format_summary
from harness.result import RunResult, VMSummary

WHY = ("the guest's init did not start within 40 s of QEMU's start; vCPU 0: PC ffff8000081c2f34 "
       "in all 3 samples over 1.0 s (l2.attempt1.stuck.txt)")


def _result(retried: tuple[str, ...]) -> RunResult:
    scenario = Scenario(name="s", vms=(VM(name="l2", devices=(
        VirtioNet(kind="virtio-net", id="net0"),)),))
    vm = VMSummary("l2", "arm64", "qemu-system-aarch64", "QEMU 7.2.22", "kvm", "requested",
                   "6.1.0-57-cloud-arm64", "debian-cloud-arm64-1", 2222,
                   (("net0", "virtio-net", "0000:00:03.0"),), retried)
    return RunResult(scenario, "s.yaml", Path("/tmp/runs/s-1"), 0.0, vms=(vm,))


def test_the_summary_names_each_retried_boot() -> None:
    text = format_summary(_result((WHY,)))
    assert f"  l2: boot 1 never reached init, booted again: {WHY}\n" in text
    assert "never reached init" not in format_summary(_result(()))


def test_report_json_lists_the_retried_boots() -> None:
    (vm,) = json.loads(json.dumps(to_dict(_result((WHY, WHY)))))["vms"]
    assert vm["retried_boots"] == [WHY, WHY]
