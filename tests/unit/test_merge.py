"""Merging run reports of many hosts, on real reports (tests/data/reports, see its README)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import UsageError
from harness.report.merge import format_merged, load_runs, merge, merged_junit

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"


def fleet(tmp_path: Path, names: list[str]) -> Path:
    """The reports laid out as CI artifacts: one folder per runner."""
    for i, name in enumerate(names):
        folder = tmp_path / f"runner-{i}" / name.removesuffix(".json")
        folder.mkdir(parents=True)
        shutil.copy(DATA / name, folder / "report.json")
    return tmp_path


def test_merge_builds_the_scenario_by_host_matrix(tmp_path: Path) -> None:
    root = fleet(tmp_path, ["l0-smoke-passed.json", "lab-l1-vfio-irqfd.json",
                            "lab-l1-vfio-userspace.json"])
    merged = merge(load_runs([root]))
    assert merged["format"] == "harness-merged/1"
    assert merged["passed"] is True
    assert merged["scenarios"] == ["lab-vfio-irqfd", "lab-vfio-userspace", "smoke"]
    assert len(merged["hosts"]) == 2
    lab_host = next(h for h in merged["hosts"] if merged["matrix"]["lab-vfio-irqfd"][h])
    assert merged["matrix"]["lab-vfio-irqfd"][lab_host] == ["pass"]
    assert merged["matrix"]["smoke"][lab_host] == []
    assert merged["vector_paths"]["irqfd-bounce"] == 2
    assert merged["vector_paths"]["userspace-bounce"] == 2
    assert merged["vector_paths"]["emulated"] >= 2


def test_one_failed_run_fails_the_merge_and_is_named(tmp_path: Path) -> None:
    root = fleet(tmp_path, ["l0-smoke-passed.json", "l0-smoke-failed.json"])
    merged = merge(load_runs([root]))
    assert merged["passed"] is False
    (host,) = merged["hosts"]
    assert sorted(merged["matrix"]["smoke"][host]) == ["fail", "pass"]
    text = format_merged(merged)
    assert "FAIL" in text and "guest0/disk0 expects emulated" in text
    assert text.endswith("FAILED")
    suites = merged_junit(merged).getroot()
    assert suites is not None
    assert sum(int(suite.get("failures") or "0") for suite in list(suites)) == 1


def test_cli_writes_json_and_junit_and_exits_by_the_result(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    root = fleet(tmp_path / "fleet", ["lab-l1-vfio-irqfd.json", "lab-l1-vfio-userspace.json"])
    out_json, out_xml = tmp_path / "merged.json", tmp_path / "merged.xml"
    code = main(["report", "merge", str(root), "--json", str(out_json), "--junit",
                 str(out_xml)])
    assert code == 0, capsys.readouterr()
    assert json.loads(out_json.read_text())["passed"] is True
    assert len(ET.parse(out_xml).getroot()) == 2


def test_a_report_of_another_format_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(UsageError, match="format 'something-else/9', expected 'harness-run/1'"):
        load_runs([bad])


def test_no_reports_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no report.json"):
        load_runs([tmp_path])
