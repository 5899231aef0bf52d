"""Merging run reports of many hosts, on real reports (tests/data/reports, see its README)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import junitparser
import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.report import markdown, page
from harness.report.merge import format_merged, load_runs, merge, merged_junit

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"
NIGHT = DATA / "night-1"


def fleet(tmp_path: Path, names: list[str]) -> Path:
    """The reports laid out as CI artifacts: one folder per runner."""
    for i, name in enumerate(names):
        folder = tmp_path / f"runner-{i}" / name.removesuffix(".json")
        folder.mkdir(parents=True)
        shutil.copy(DATA / name, folder / "report.json")
    return tmp_path


def test_merge_builds_the_scenario_by_host_matrix_with_the_path_of_each_vector() -> None:
    merged = merge(load_runs([NIGHT], lab_runner="arm-runner"))
    assert merged["format"] == "harness-merged/2"
    assert merged["passed"] is True
    assert merged["scenarios"] == ["lab-arm-irqfd", "lab-arm-posted", "lab-arm-userspace",
                                   "lab-vfio-irqfd", "lab-vfio-userspace", "smoke"]
    posted = merged["matrix"]["lab-arm-posted"]["arm-runner (lab)"]
    assert posted["outcome"] == "pass" and posted["lab"] == "lab-l1"
    assert posted["vectors"]["l2/nic#1"] == "posted"
    assert posted["vectors"]["l2/nic#0"] == "not-delivered"
    assert merged["matrix"]["smoke"]["arm-runner (lab)"] is None
    assert merged["vector_paths"]["posted"] == 2
    assert merged["vector_paths"]["irqfd-bounce"] == 4


def test_lab_runs_are_credited_to_the_runner_that_ran_the_lab() -> None:
    runs = load_runs([NIGHT], lab_runner="arm-runner")
    smoke = next(r for r in runs if r.scenario == "smoke")
    x86_lab = [r for r in runs if r.scenario.startswith("lab-vfio")]
    # The x86 lab ran in the same job (artifact folder) as the smoke run: its runner.
    assert {r.runner for r in x86_lab} == {smoke.runner}
    assert all(r.lab == "lab-l1" and r.column == f"{smoke.runner} (lab)" for r in x86_lab)
    # The Arm lab's artifact holds no run of its host's own: the runner named for it.
    arm = [r for r in runs if r.scenario.startswith("lab-arm")]
    assert {r.runner for r in arm} == {"arm-runner"}
    assert not any(r.lab for r in runs if r.scenario == "smoke")
    # Without a name: said so, never the L1's hostname.
    unnamed = load_runs([NIGHT / "arm-lab"])
    assert {r.runner for r in unnamed} == {"unknown runner"}


def test_a_report_named_by_its_lab_field_is_credited_to_that_runner(tmp_path: Path) -> None:
    report = json.loads((NIGHT / "arm-lab/lab-arm-gicv4/posted/report.json").read_text())
    report["lab"] = {"l1": "lab-l1", "runner": "gicv4-box"}
    (tmp_path / "report.json").write_text(json.dumps(report))
    (run,) = load_runs([tmp_path], lab_runner="ignored")
    assert (run.runner, run.lab, run.column) == ("gicv4-box", "lab-l1", "gicv4-box (lab)")


def test_the_same_report_given_twice_counts_once(tmp_path: Path) -> None:
    root = fleet(tmp_path, ["smoke-every-queue.json", "smoke-every-queue.json",
                            "l0-smoke-passed.json"])
    runs = load_runs([root])
    assert len(runs) == 2
    twice = next(r for r in runs if r.scenario == "smoke-every-queue")
    assert len(twice.duplicates) == 1
    merged = merge(runs)
    cell = merged["matrix"]["smoke-every-queue"][twice.column]
    assert cell["runs"] == [twice.run_id] and cell["outcome"] == "fail"
    assert "counted once" in format_merged(merged)
    # An older report with no run id: identified by host, scenario and start time.
    again = load_runs([DATA / "l0-smoke-passed.json", DATA / "l0-smoke-passed.json"])
    assert len(again) == 1


def test_merge_keeps_workloads_times_and_output() -> None:
    merged = merge(load_runs([NIGHT], lab_runner="arm-runner"))
    run = next(r for r in merged["runs"] if r["scenario"] == "lab-vfio-irqfd")
    report = json.loads(Path(DATA.parent.parent.parent / run["source"]).read_text()
                        if not Path(run["source"]).is_absolute()
                        else Path(run["source"]).read_text())
    assert run["report"]["workloads"] == report["workloads"]
    assert run["report"]["phases"] == report["phases"]
    assert len(run["latency_ms"]) == 200  # every ping round trip of its workload log
    assert run["latency_path"] == "irqfd-bounce"


def test_one_failed_run_fails_the_merge_and_is_named(tmp_path: Path) -> None:
    root = fleet(tmp_path, ["l0-smoke-passed.json", "smoke-every-queue.json"])
    merged = merge(load_runs([root]))
    assert merged["passed"] is False
    text = format_merged(merged)
    assert "FAIL" in text and "guest0/disk0 expects emulated" in text
    assert text.endswith("FAILED")


def test_a_retry_that_disagrees_is_flaky_not_failed(tmp_path: Path) -> None:
    passed = json.loads((DATA / "l0-smoke-passed.json").read_text())
    failed = json.loads((DATA / "l0-smoke-failed.json").read_text())
    assert passed["host"]["hostname"] == failed["host"]["hostname"]
    root = fleet(tmp_path, ["l0-smoke-passed.json", "l0-smoke-failed.json"])
    merged = merge(load_runs([root]))
    (host,) = merged["hosts"]
    assert merged["matrix"]["smoke"][host]["outcome"] == "flaky"
    assert merged["passed"] is True and merged["flaky"] == [f"smoke on {host}"]
    assert "FLAKY smoke" in format_merged(merged)


def test_merged_junit_keeps_every_case_with_its_evidence(tmp_path: Path) -> None:
    fleet(tmp_path / "fleet", ["smoke-every-queue.json"])
    for job in ("emulated", "arm-lab"):  # each CI job's artifact a folder of its own
        shutil.copytree(NIGHT / job, tmp_path / "fleet" / job)
    merged = merge(load_runs([tmp_path / "fleet"], lab_runner="arm-runner"))
    out = tmp_path / "merged.xml"
    merged_junit(merged).write(out, encoding="utf-8", xml_declaration=True)
    xml = junitparser.JUnitXml.fromfile(str(out))
    suites = list(xml)
    assert len(suites) == len(merged["runs"])
    assert all(s.hostname and s.timestamp for s in suites)
    arm = next(s for s in suites if s.name == "arm-runner (lab).lab-arm-posted")
    assert arm.hostname == "arm-runner"
    workloads = [c for s in suites for c in s if c.classname.endswith(".workload")]
    assert len(workloads) == sum(len(r["report"]["workloads"]) for r in merged["runs"])
    failed = [c for s in suites for c in s if c.result
              and isinstance(c.result[0], junitparser.Failure)]
    assert len(failed) == 1
    assert "guest0/disk0#1" in (failed[0].result[0].text or "")
    assert xml.failures == 1 and xml.tests == sum(s.tests for s in suites)


def test_cli_writes_json_junit_page_and_summary_and_exits_by_the_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outs = {k: tmp_path / f"merged.{k}" for k in ("json", "xml", "html", "md")}
    code = main(["report", "merge", str(NIGHT), "--lab-runner", "arm-runner",
                 "--json", str(outs["json"]), "--junit", str(outs["xml"]),
                 "--html", str(outs["html"]), "--markdown", str(outs["md"])])
    assert code == 0, capsys.readouterr()
    assert json.loads(outs["json"].read_text())["passed"] is True
    assert len(list(junitparser.JUnitXml.fromfile(str(outs["xml"])))) == 6
    assert "<svg" in outs["html"].read_text()
    assert "| lab-arm-posted |" in outs["md"].read_text()
    bad = fleet(tmp_path / "bad", ["smoke-every-queue.json"])
    assert main(["report", "merge", str(bad)]) == 1


def test_a_merged_report_merges_again_without_loss(tmp_path: Path) -> None:
    once = merge(load_runs([NIGHT], lab_runner="arm-runner"))
    path = tmp_path / "merged.json"
    path.write_text(json.dumps(once))
    twice = merge(load_runs([path, NIGHT], lab_runner="arm-runner"))  # and the same again
    assert twice["matrix"] == once["matrix"]
    assert [r["run_id"] for r in twice["runs"]] == [r["run_id"] for r in once["runs"]]


def test_a_report_of_another_format_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(UsageError, match="format 'something-else/9', expected 'harness-run/1'"):
        load_runs([bad])


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.json").write_text("{not json")
    assert main(["report", "merge", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a readable JSON report" in err
    assert main(["report", "merge", str(tmp_path / "nowhere")]) == 2


def test_no_reports_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no report.json"):
        load_runs([tmp_path])


def test_a_retried_boot_is_named_but_does_not_fail_the_merge(tmp_path: Path) -> None:
    """A recorded passing run whose VM (as the harness now writes it) needed a second boot."""
    report = json.loads((DATA / "l0-smoke-passed.json").read_text())
    (vm, *_) = report["vms"]
    why = "the guest's init did not start within 40 s of QEMU's start; vCPU 0 (thread 9): R"
    vm["retried_boots"] = [why]
    folder = tmp_path / "runner-0" / "retried"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    merged = merge(load_runs([tmp_path]))
    assert merged["passed"] is True
    (host,) = merged["hosts"]
    assert merged["retried_boots"] == [f"{report['scenario']['name']} on {host}: {vm['name']}"]
    text = format_merged(merged)
    assert f"{vm['name']}'s boot 1 never reached init: {why}" in text
    assert text.endswith("PASSED")
    item = f"{report['scenario']['name']} on {host}: {vm['name']}"
    assert f"<h2>Retried boots (never reached init, booted again)</h2><ul><li>{item}</li>" \
        in page.render(merged, "night")
    assert f"⚠️ boots that never reached init and were booted again: {item}\n" \
        in markdown.render(merged, "night")
    plain = merge(load_runs([fleet(tmp_path / "plain", ["l0-smoke-passed.json"])]))
    assert plain["retried_boots"] == [] and "RETRIED" not in format_merged(plain)
