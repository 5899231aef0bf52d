"""A failed or timed-out workload in the reports: the summary, JUnit and report.json name it
and its limit, and the run fails (exit 1) while its verdicts stand."""

from __future__ import annotations

import json
from pathlib import Path

from harness.config.model import VM, Scenario, VirtioNet, Workload
from harness.report.json_report import to_dict
from harness.report.junit import to_xml
from harness.report.summary import format_summary
from harness.result import RunResult, WorkloadResult

SCENARIO = Scenario(
    name="limits", vms=(VM(name="guest0", devices=(VirtioNet(kind="virtio-net", id="net0"),)),),
    workloads=(Workload(vm="guest0", run=("yes",), timeout_s=3),
               Workload(vm="guest0", name="fails", run=("false",)),
               Workload(vm="guest0", run=("true",))))

TIMED_OUT = WorkloadResult("guest0", "yes", ("yes",), -1, 3.42, "y\ny\ny", 3.0, True, 18_874_368)
FAILED = WorkloadResult("guest0", "fails", ("false",), 1, 0.05, "", 60.0)
PASSED = WorkloadResult("guest0", "true", ("true",), 0, 0.04, "", 60.0)


def _result(*workloads: WorkloadResult) -> RunResult:
    return RunResult(SCENARIO, "limits.yaml", Path("/tmp/runs/limits-1"), 0.0,
                     workloads=workloads)


def test_the_messages_name_the_workload_and_its_limit() -> None:
    assert TIMED_OUT.message == ("workload guest0: yes: timed out: still running at its limit "
                                 "of 3 s, stopped (18874368 bytes of output) after 3.4 s")
    assert FAILED.message == "workload guest0: fails: exit status 1 after 0.1 s"
    left = WorkloadResult("guest0", "yes", ("yes",), -1, 8.5, "", 3.0, True, 10, True)
    assert left.message.startswith("workload guest0: yes: timed out: still running at its "
                                   "limit of 3 s, and could not be stopped: it may still run "
                                   "in the guest")
    killed = WorkloadResult("guest0", "k", ("k",), -1, 1.0, "", 60.0)
    assert "without an exit status" in killed.message and not killed.passed
    assert PASSED.passed and not TIMED_OUT.passed and not FAILED.passed


def test_a_timed_out_or_failed_workload_fails_the_run() -> None:
    assert not _result(TIMED_OUT, PASSED).passed
    assert not _result(FAILED, PASSED).passed
    assert _result(PASSED).passed


def test_the_summary_says_which_workload_and_its_limit() -> None:
    text = format_summary(_result(TIMED_OUT, FAILED, PASSED))
    assert f"  [FAIL] {TIMED_OUT.message}\n  | y\n  | y\n  | y\n" in text
    assert f"  [FAIL] {FAILED.message}\n" in text
    assert "  [ok ] workload guest0: true (0.0 s, exit 0)\n" in text
    assert text.endswith("\nFAILED")


def test_junit_fails_the_workload_cases_with_the_message() -> None:
    suite = to_xml(_result(TIMED_OUT, FAILED, PASSED))
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    timed_out = cases["guest0: yes"].find("failure")
    assert timed_out is not None and timed_out.get("type") == "timeout"
    assert timed_out.get("message") == TIMED_OUT.message and timed_out.text == "y\ny\ny"
    failed = cases["guest0: fails"].find("failure")
    assert failed is not None and failed.get("message") == FAILED.message
    assert cases["guest0: true"].find("failure") is None


def test_report_json_carries_the_limit_and_the_timeout() -> None:
    report = json.loads(json.dumps(to_dict(_result(TIMED_OUT))))
    (workload,) = report["workloads"]
    assert (workload["timed_out"], workload["timeout_s"], workload["exit_status"],
            workload["output_bytes"]) == (True, 3.0, -1, 18_874_368)
    assert report["passed"] is False
