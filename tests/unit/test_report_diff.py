"""Night to night, on recorded nights (tests/data/reports, see its README): night-2 is night-1
with one vector bounced instead of posted."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.report.diff import History, compare
from harness.report.runs import load_runs, run_from_merged
from harness.report.store import Store

DATA = Path(__file__).resolve().parents[1] / "data" / "reports"
N1, N2 = DATA / "night-1.merged.json", DATA / "night-2.merged.json"


def night(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def write(tmp_path: Path, name: str, merged: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(merged))
    return path


def renamed(merged: dict[str, Any], suffix: str) -> dict[str, Any]:
    """The same night again, as if run again (new run ids)."""
    out = copy.deepcopy(merged)
    for run in out["runs"]:
        run["run_id"] = run["report"]["run_id"] = run["run_id"] + suffix
    return out


def test_a_changed_path_is_printed_first_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "diff", str(N1), str(N2)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("PATH      lab-arm-posted on arm-runner (lab): l2/nic#1 posted -> "
                        "irqfd-bounce (guest 202, host 0 -> guest 202, host 202)")
    assert lines[-1].startswith("REGRESSION: 1 regression(s)")


def test_identical_nights_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "diff", str(N1), str(N1)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "no change"


def test_the_way_back_is_an_improvement_not_a_regression(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "diff", str(N2), str(N1)]) == 0
    assert "PATH+" in capsys.readouterr().out


def test_new_failure_fixed_and_vanished_host(tmp_path: Path) -> None:
    old = night(N1)
    new = renamed(old, "-b")
    smoke = next(r for r in new["runs"] if r["scenario"] == "smoke")
    e = smoke["report"]["expectations"][1]
    e["passed"], e["message"] = False, e["message"] + " (made to fail for this test)"
    new["runs"] = [r for r in new["runs"] if r["runner"] != "arm-runner"]
    changes = compare([run_from_merged(r, N1) for r in old["runs"]],
                      [run_from_merged(r, N1) for r in new["runs"]])
    kinds = [c.kind for c in changes]
    assert kinds[0] == "new failure" and "made to fail" in changes[0].what
    assert "vanished" in kinds and all(c.regression for c in changes
                                       if c.kind in ("new failure", "vanished"))
    back = compare([run_from_merged(r, N1) for r in new["runs"]],
                   [run_from_merged(r, N1) for r in old["runs"]])
    fixed = [c for c in back if c.kind == "fixed"]
    assert len(fixed) == 1 and not any(c.regression for c in back)


def test_a_case_seen_both_ways_in_the_history_is_flaky_not_a_regression(tmp_path: Path
                                                                       ) -> None:
    store = Store(tmp_path / "history.sqlite")
    one = night(N1)
    bounced = night(N2)
    store.add("2026-12-01", renamed(one, "-a"))
    store.add("2026-12-02", renamed(bounced, "-b"))  # bounced once already
    store.add("2026-12-03", renamed(one, "-c"))
    assert [n for n, _ in store.nights()] == ["2026-12-01", "2026-12-02", "2026-12-03"]
    history = History.of([[run_from_merged(r, N1) for r in m["runs"]]
                          for _, m in store.nights()])
    changes = compare(load_runs([N1]), load_runs([N2]), history)
    (change,) = changes
    assert change.kind == "flaky" and not change.regression
    # From the command line: the store is both last night and the history.
    assert main(["report", "diff", str(store.path), str(N2)]) == 0
    # A window that no longer sees the bounced night: a regression again.
    assert main(["report", "diff", str(store.path), str(N2), "--window", "1"]) == 1


def test_a_retry_that_disagrees_tonight_is_flaky(tmp_path: Path) -> None:
    tonight = night(N2)
    posted = next(r for r in night(N1)["runs"] if r["scenario"] == "lab-arm-posted")
    retry = copy.deepcopy(posted)
    retry["run_id"] = retry["report"]["run_id"] = "retry"
    tonight["runs"].append(retry)
    path = write(tmp_path, "tonight.json", tonight)
    changes = compare(load_runs([N1]), load_runs([path]))
    (change,) = changes
    assert change.kind == "flaky" and "tonight's runs disagree" in change.what


def test_latency_beyond_the_noise_is_reported_never_failing(tmp_path: Path) -> None:
    slow = renamed(night(N1), "-slow")
    for run in slow["runs"]:
        run["latency_ms"] = [x * 3 for x in run["latency_ms"]]
    same = renamed(night(N1), "-same")
    moved = compare(load_runs([N1]), load_runs([write(tmp_path, "slow.json", slow)]))
    assert {c.kind for c in moved} == {"latency"}
    assert len(moved) == 2 and not any(c.regression for c in moved)
    assert "+200%" in moved[0].what
    assert compare(load_runs([N1]), load_runs([write(tmp_path, "same.json", same)])) == []


def test_the_folder_store_and_the_sqlite_store_agree(tmp_path: Path) -> None:
    for target in (tmp_path / "nights", tmp_path / "h.db"):
        assert main(["report", "store", str(target), str(N1), "--night", "n1"]) == 0
        assert main(["report", "store", str(target), str(N2)]) == 0  # named by its date
        names = [n for n, _ in Store(target).nights()]
        assert names == ["2026-12-07", "n1"]
    assert (tmp_path / "nights" / "HARNESS-STORE").is_file()


def test_diff_against_a_store_takes_its_last_night_not_tonight(tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    assert main(["report", "store", str(db), str(N1), "--night", "2026-12-06"]) == 0
    assert main(["report", "store", str(db), str(N2), "--night", "2026-12-07"]) == 0
    # Tonight is already kept: last night is the one before it.
    assert main(["report", "diff", str(db), str(N2)]) == 1


def test_page_and_summary_carry_the_diff(tmp_path: Path) -> None:
    html, md = tmp_path / "p.html", tmp_path / "s.md"
    assert main(["report", "page", str(N2), "--against", str(N1), "--html", str(html),
                 "--markdown", str(md)]) == 1
    assert "1 regression(s) since the last night" in html.read_text()
    assert "l2/nic#1 posted -&gt; irqfd-bounce" in html.read_text()
    assert "l2/nic#1 posted -> irqfd-bounce" in md.read_text()


@pytest.mark.parametrize("args", [["nowhere.json", str(N1)], [str(N1), "--window", "0"]])
def test_bad_input_is_exit_2_in_one_line(args: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(tmp_path / a) if a == "nowhere.json" else a for a in args]
    if args[1] == "--window":
        args = [args[0], args[0], *args[1:]]
    assert main(["report", "diff", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: ") and err.count("\n") == 1


def test_a_store_that_is_not_one_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "h.sqlite"
    bogus.write_text("not a database at all " * 100)
    assert main(["report", "diff", str(bogus), str(N2)]) == 2
    assert "not a result store" in capsys.readouterr().err
    shutil.rmtree(tmp_path)


def test_a_store_path_of_another_kind_is_refused(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "store", str(tmp_path / "history.txt"), str(N1)]) == 2
    assert "a result store is a file named *.sqlite" in capsys.readouterr().err
    assert not (tmp_path / "history.txt").exists()


def test_a_retried_boot_tonight_is_reported_never_failing(tmp_path: Path) -> None:
    tonight = night(N1)
    posted = next(r for r in tonight["runs"] if r["scenario"] == "lab-arm-posted")
    why = "the guest's init did not start within 40 s of QEMU's start; vCPU 0 (thread 150): R"
    posted["report"]["vms"][0]["retried_boots"] = [why]
    path = write(tmp_path, "tonight.json", tonight)
    (change,) = compare(load_runs([N1]), load_runs([path]))
    assert (change.kind, change.regression) == ("retried", False)
    assert change.what == f"1 boot(s) never reached init and were booted again (l2: {why})"
    assert change.line().startswith("RETRIED   lab-arm-posted on ")
