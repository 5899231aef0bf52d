"""The Markdown job summary, on recorded reports (tests/data/reports, see its README)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from harness.report import markdown
from harness.report.merge import merge
from harness.report.runs import load_runs

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"


def test_the_summary_names_each_cell_and_folds_the_evidence(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(DATA / "smoke-every-queue.json", tmp_path / "a" / "report.json")
    merged = merge(load_runs([tmp_path, DATA / "night-1"], lab_runner="arm-runner"))
    text = markdown.render(merged, "nightly")
    assert text.startswith("## nightly: ❌ FAILED\n")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| scenario |"))
    assert header == "| scenario | arm-runner (lab) | vm | vm (lab) |"
    row = next(line for line in lines if line.startswith("| lab-arm-posted |"))
    assert row == "| lab-arm-posted | ✅ pass (lab): emulated 2, posted 2 | – | – |"
    assert "- **vm / smoke-every-queue: guest0/disk0 expects emulated" in text
    evidence = text[text.index("<details>"):text.index("</details>")]
    assert "guest0/disk0#1" in evidence and "console of guest0" in evidence


def test_a_pipe_in_a_name_does_not_break_the_table(tmp_path: Path) -> None:
    report = json.loads((DATA / "smoke-every-queue.json").read_text())
    report["scenario"]["name"] = "a|b"
    (tmp_path / "report.json").write_text(json.dumps(report))
    text = markdown.render(merge(load_runs([tmp_path])), "t")
    row = next(line for line in text.splitlines() if line.startswith("| a"))
    assert row.startswith("| a\\|b |") and row.count(" | ") == 1


def test_the_summary_stays_within_its_budget(tmp_path: Path) -> None:
    report = json.loads((DATA / "smoke-every-queue.json").read_text())
    report["console_tails"] = {"guest0": ("x" * 200 + "\n") * 40}
    for i in range(400):  # 400 failing runs, each with its evidence
        r = copy.deepcopy(report)
        r["run_id"] = f"r{i}"
        r["host"]["hostname"] = f"host{i}"
        (tmp_path / f"{i}").mkdir()
        (tmp_path / f"{i}" / "report.json").write_text(json.dumps(r))
    text = markdown.render(merge(load_runs([tmp_path])), "t")
    assert len(text.encode()) < 1024 * 1024  # GitHub's limit for one step's summary
    assert "evidence cut here" in text and text.count("<details>") > 10
