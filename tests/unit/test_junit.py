"""JUnit that carries the evidence, read back with a real JUnit parser (junitparser).

On recorded real reports (tests/data/reports, see its README): a smoke run whose disk
expectation failed, a run that expected posting where the devices are emulated, and the
Arm lab's runs.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

import junitparser
import pytest

from harness.report import junit
from harness.report.json_report import to_dict
from harness.report.runs import normalise

DATA = Path(__file__).resolve().parents[1] / "data"
REPORTS = DATA / "reports"


def parsed(report: dict[str, Any], tmp_path: Path, **kw: Any) -> junitparser.TestSuite:
    tree = ET.ElementTree(junit.suite(normalise(report), **kw))
    path = tmp_path / "junit.xml"
    tree.write(path, encoding="utf-8", xml_declaration=True)
    xml = junitparser.JUnitXml.fromfile(str(path))
    return xml if isinstance(xml, junitparser.TestSuite) else next(iter(xml))


def properties(suite: junitparser.TestSuite) -> dict[str, str]:
    return {p.name: p.value for p in suite.properties()}  # type: ignore[no-untyped-call]


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPORTS / name).read_text())
    return data


def test_a_failed_expectation_carries_its_vector_table_reason_and_console(tmp_path: Path
                                                                          ) -> None:
    report = load("smoke-every-queue.json")
    suite = parsed(report, tmp_path)
    failed = [c for c in suite if c.result and isinstance(c.result[0], junitparser.Failure)]
    assert len(failed) == 1
    (case,) = failed
    body = case.result[0].text or ""
    message = case.result[0].message or ""
    assert "0 interrupts < 10" in message
    # The table of the vectors judged, each with its numbers and its verdict's reason.
    wrong = next(e for e in report["expectations"] if not e["passed"])
    for key in wrong["selected"]:
        v = next(v for v in report["vectors"] if v["key"] == key)
        row = next(line for line in body.splitlines() if line.startswith(key + " "))
        assert str(v["evidence"]["guest_delta"]) in row and v["path"] in row
        assert v["reason"] in row
    assert "vectors judged:" in body
    # The console's last lines (the run failed, so the report kept them).
    tail = next(iter(report["console_tails"].values())).splitlines()[-1]
    assert tail.strip() and tail in body


def test_preflight_lines_are_in_the_evidence(tmp_path: Path) -> None:
    report = json.loads((DATA / "lab-arm64" / "irqfd" / "report.json").read_text())
    report["expectations"][0]["passed"] = False  # the evidence is the same either way
    suite = parsed(report, tmp_path)
    case = next(c for c in suite if c.classname.endswith(".expect"))
    body = case.result[0].text or ""
    assert "preflight 0000:00:05.0: bounce only" in body
    nic = [v for v in report["vectors"] if v["device"] == "nic" and v["path"] == "irqfd-bounce"]
    assert nic and all(v["reason"] in body for v in nic)  # the numbers: host / guest = ratio


def test_suite_has_hostname_timestamp_and_every_case_a_time(tmp_path: Path) -> None:
    report = load("smoke-every-queue.json")
    suite = parsed(report, tmp_path)
    assert suite.hostname == report["host"]["hostname"]
    stamp = datetime.fromisoformat(suite.timestamp)
    assert stamp.replace(microsecond=0) == datetime.fromisoformat(
        report["started"]).replace(tzinfo=None, microsecond=0)
    assert suite.time == pytest.approx(report["total_seconds"])
    cases = list(suite)
    assert len(cases) == len(report["workloads"]) + len(report["expectations"])
    assert all(c.time is not None and c.time >= 0 for c in cases)
    expect_times = [c.time for c in cases if c.classname.endswith(".expect")]
    verdict = next(p["seconds"] for p in report["phases"] if p["name"] == "verdict")
    assert sum(expect_times) == pytest.approx(verdict, abs=0.01)
    assert properties(suite)["run_id"] == report["run_id"]


def test_two_expectations_on_one_device_get_distinct_stable_names(tmp_path: Path) -> None:
    report = load("smoke-every-queue.json")
    twin = dict(report["expectations"][0])
    twin.pop("name", None)
    twin["index"] = len(report["expectations"])
    for e in report["expectations"]:
        e.pop("name", None)
    report["expectations"].append(twin)
    first = [c.name for c in parsed(report, tmp_path)]
    assert len(first) == len(set(first))
    again = [c.name for c in parsed(report, tmp_path)]
    assert first == again
    assert any(name.endswith(f"#{twin['index']}") for name in first)


def test_an_older_report_gets_names_and_evidence_too(tmp_path: Path) -> None:
    report = load("l0-smoke-failed.json")
    assert "run_id" not in report and "selected" not in report["expectations"][1]
    suite = parsed(report, tmp_path)
    case = next(c for c in suite if c.result)
    body = case.result[0].text or ""
    assert "guest0/disk0#1" in body and "the guest's count did not rise" in body


def test_a_lab_run_credited_to_its_runner(tmp_path: Path) -> None:
    report = json.loads((DATA / "lab-arm64" / "posted" / "report.json").read_text())
    suite = parsed(report, tmp_path, runner="ci-arm-7", lab="lab-l1")
    assert suite.hostname == "ci-arm-7"
    props = properties(suite)
    assert "virtual lab" in props["lab"] and "lab-l1" in props["lab"]


def test_the_run_writes_the_same_run_id_into_json_and_junit(tmp_path: Path) -> None:
    from harness.config import load_scenarios
    from harness.result import RunResult

    (scenario,) = load_scenarios(Path(__file__).resolve().parents[2] / "configs"
                                 / "smoke.yaml")
    result = RunResult(scenario, "configs/smoke.yaml", tmp_path, 1_700_000_000.0)
    other = RunResult(scenario, "configs/smoke.yaml", tmp_path, 1_700_000_000.0)
    assert result.run_id != other.run_id
    junit.write_junit(result, tmp_path / "junit.xml")
    xml = junitparser.JUnitXml.fromfile(str(tmp_path / "junit.xml"))
    suite = xml if isinstance(xml, junitparser.TestSuite) else next(iter(xml))
    assert properties(suite)["run_id"] == to_dict(result)["run_id"] == result.run_id


def test_a_run_inside_the_lab_names_its_runner(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.config import load_scenarios
    from harness.report.json_report import LAB_RUNNER_ENV
    from harness.report.runs import load_runs
    from harness.result import RunResult

    (scenario,) = load_scenarios(Path(__file__).resolve().parents[2] / "configs"
                                 / "smoke.yaml")
    result = RunResult(scenario, "configs/smoke.yaml", tmp_path, 1_700_000_000.0)
    assert to_dict(result)["lab"] is None
    monkeypatch.setenv(LAB_RUNNER_ENV, "gicv4-box")
    report = to_dict(result)
    assert report["lab"]["runner"] == "gicv4-box"
    (tmp_path / "report.json").write_text(json.dumps(report))
    (run,) = load_runs([tmp_path])
    assert (run.runner, run.column) == ("gicv4-box", "gicv4-box (lab)")
    suite = parsed(report, tmp_path)  # the run's own junit.xml, written inside the lab
    assert suite.hostname == "gicv4-box" and "virtual lab" in properties(suite)["lab"]


def test_a_run_that_errored_is_an_error_case_with_its_console(tmp_path: Path) -> None:
    report = load("smoke-every-queue.json")
    # As a run that QEMU failed would write it: an error, what was measured until then.
    report["error"] = {"type": "GuestError", "message": "guest0: the guest did not boot"}
    suite = parsed(report, tmp_path)
    case = next(c for c in suite if c.name == "run")
    assert isinstance(case.result[0], junitparser.Error)
    assert case.result[0].message == "guest0: the guest did not boot"
    tail = next(iter(report["console_tails"].values())).splitlines()[-1]
    assert tail in (case.result[0].text or "")
    from harness.report import page
    from harness.report.merge import merge
    from harness.report.runs import load_runs

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    html = page.render(merge(load_runs([tmp_path / "r"])), "t")
    assert "error: guest0: the guest did not boot" in html
