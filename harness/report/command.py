"""``harness report ...``: merge, page, diff, store.  The parsers and handlers of the report
commands, kept here so that harness/cli.py only wires them in.

Exit codes: merge and page 0 when every run passed (flaky cells pass) and, with
``--against``, the diff found no regression, 1 otherwise; diff 1
when a regression is found (a path changed for the worse, a new failure or error, a host
gone), 0 when the nights are the same or only improved; every command 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UsageError


@dataclass(frozen=True)
class ReportRequest:
    action: str  # merge | page | diff | store
    paths: tuple[Path, ...] = ()
    json_out: Path | None = None
    junit_out: Path | None = None
    html_out: Path | None = None
    markdown_out: Path | None = None
    lab_runner: str | None = None
    title: str | None = None
    against: Path | None = None  # merge/page: also diff against this (last night)
    history: Path | None = None  # diff: a result store for the flakiness policy
    window: int = 14
    store: Path | None = None
    night: str | None = None


def add_parsers(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    report = sub.add_parser("report", help="merge, render and compare run reports")
    report_sub = report.add_subparsers(dest="report_command", required=True,
                                       parser_class=parser_class)

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", type=Path, dest="json_out", help="write the merged JSON here")
        p.add_argument("--junit", type=Path, dest="junit_out",
                       help="write JUnit XML here (one suite per run, evidence in failures)")
        p.add_argument("--html", type=Path, dest="html_out",
                       help="write the self-contained HTML page here")
        p.add_argument("--markdown", type=Path, dest="markdown_out",
                       help="write the Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
        p.add_argument("--title", help="the page's title (default: the scenario, or "
                       "'interrupt delivery')")
        p.add_argument("--lab-runner", metavar="NAME",
                       help="credit lab runs whose runner is not known otherwise to NAME")
        p.add_argument("--against", type=Path, metavar="OLD",
                       help="also compare with OLD (last night: reports, a merged report or "
                       "a result store) and put the diff on the page and in the summary")

    p = report_sub.add_parser("merge", help="merge run reports of many hosts into one")
    p.add_argument("paths", type=Path, nargs="+",
                   help="report.json files, merged reports, or folders of them")
    outputs(p)
    p = report_sub.add_parser("page", help="the HTML page (and Markdown summary) of runs")
    p.add_argument("paths", type=Path, nargs="+",
                   help="run folders, report.json files, merged reports, folders of them")
    outputs(p)
    p = report_sub.add_parser("diff", help="night to night: what changed, regressions first")
    p.add_argument("old", type=Path, help="last night: reports, a merged report, folders, or "
                   "a result store (its last night)")
    p.add_argument("new", type=Path, help="tonight: the same kinds")
    p.add_argument("--history", type=Path, metavar="STORE",
                   help="a result store whose nights decide what is flaky (default: OLD, "
                   "when it is a store)")
    p.add_argument("--window", type=int, default=14,
                   help="nights of the history to look at (default 14)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the changes as JSON")
    p.add_argument("--markdown", type=Path, dest="markdown_out",
                   help="write the changes as Markdown")
    p = report_sub.add_parser("store", help="keep a night in a result store (SQLite file "
                              "or folder)")
    p.add_argument("store", type=Path, help="*.sqlite / *.db file, or a folder")
    p.add_argument("paths", type=Path, nargs="+", help="tonight's reports or merged report")
    p.add_argument("--night", help="the night's name (default: the date of its first run)")
    p.add_argument("--lab-runner", metavar="NAME")


def request(ns: argparse.Namespace) -> ReportRequest:
    action = ns.report_command
    if action == "diff":
        if ns.window < 1:
            raise UsageError("harness report diff: --window must be at least 1")
        return ReportRequest("diff", (ns.old, ns.new), json_out=ns.json_out,
                             markdown_out=ns.markdown_out, history=ns.history,
                             window=ns.window)
    if action == "store":
        return ReportRequest("store", tuple(ns.paths), store=ns.store, night=ns.night,
                             lab_runner=ns.lab_runner)
    return ReportRequest(action, tuple(ns.paths), ns.json_out, ns.junit_out, ns.html_out,
                         ns.markdown_out, ns.lab_runner, ns.title, ns.against)


def _write(path: Path, text: str) -> None:
    """Complete or absent: written aside, then renamed into place.  ``-`` is stdout."""
    if str(path) == "-":
        sys.stdout.write(text)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _night(path: Path, lab_runner: str | None, window: int = 1,
           exclude: frozenset[str] = frozenset()) -> tuple[list[Any], list[list[Any]], str]:
    """The runs of a night (a store: its last night whose runs are not ``exclude``), the
    nights of the history before it, and a label."""
    from harness.report.runs import load_runs, run_from_merged
    from harness.report.store import Store, is_store

    if is_store(path):
        nights = [(name, [run_from_merged(r, path) for r in merged["runs"]])
                  for name, merged in Store(path).nights()]
        nights = [(n, runs) for n, runs in nights if not {r.run_id for r in runs} <= exclude]
        if not nights:
            raise UsageError(f"{path}: the result store holds no earlier night")
        name, runs = nights[-1]
        return runs, [r for _, r in nights[-window:]], f"{path} night {name}"
    return load_runs([path], lab_runner), [], str(path)


def _diff(old: Path, new: Path, history: Path | None, window: int,
          lab_runner: str | None = None) -> tuple[list[Any], str]:
    from harness.report.diff import History, compare, format_diff
    from harness.report.store import Store, is_store

    new_runs, _, new_label = _night(new, lab_runner)
    ids = frozenset(r.run_id for r in new_runs)
    old_runs, nights, old_label = _night(old, lab_runner, window, ids)
    if history is not None:
        from harness.report.runs import run_from_merged

        if not is_store(history):
            raise UsageError(f"{history}: not a result store (*.sqlite, *.db, or a folder "
                             "with a HARNESS-STORE file)")
        nights = [[run_from_merged(r, history) for r in m["runs"]]
                  for _, m in Store(history).nights()[-window:]]
        nights = [n for n in nights if not {r.run_id for r in n} <= ids]
    changes = compare(old_runs, new_runs, History.of(nights))
    return changes, format_diff(changes, old_label, new_label)


def handle(req: ReportRequest) -> int:
    if req.action == "diff":
        return _handle_diff(req)
    from harness.report import markdown, page
    from harness.report.merge import format_merged, merge, merged_junit
    from harness.report.runs import load_runs

    runs = load_runs(req.paths, req.lab_runner)
    merged = merge(runs)
    if req.action == "store":
        from harness.report.store import Store, night_name

        assert req.store is not None
        name = req.night or night_name(merged)
        store = Store(req.store)
        store.add(name, merged)
        print(f"{req.store}: night {name} kept ({len(runs)} run(s)); "
              f"{len(store.nights())} night(s) in the store")
        return 0
    print(format_merged(merged))
    diff_text = None
    regressions = 0
    marks: dict[tuple[str, str, str], str] = {}
    if req.against is not None:
        changes, diff_text = _diff_runs(req.against, runs, req.lab_runner)
        regressions = sum(c.regression for c in changes)
        marks = {(c.scenario, c.host, c.vector): c.what for c in changes if c.vector}
        print("\n" + diff_text)
    scenarios = merged["scenarios"]
    title = req.title or (scenarios[0] if len(scenarios) == 1 and len(runs) == 1
                          else "interrupt delivery")
    if req.json_out is not None:
        _write(req.json_out, json.dumps(merged, indent=2) + "\n")
    if req.junit_out is not None:
        tree = merged_junit(merged)
        tmp = req.junit_out.with_name(f".{req.junit_out.name}.tmp")
        tree.write(tmp, encoding="utf-8", xml_declaration=True)
        tmp.replace(req.junit_out)
    if req.html_out is not None:
        _write(req.html_out, page.render(merged, title, diff_text, regressions, marks))
        print(f"page: {req.html_out}")
    if req.markdown_out is not None:
        _write(req.markdown_out, markdown.render(merged, title, diff_text, regressions))
    return 0 if merged["passed"] and not regressions else 1


def _diff_runs(old: Path, new_runs: list[Any], lab_runner: str | None) -> tuple[list[Any], str]:
    from harness.report.diff import History, compare, format_diff

    ids = frozenset(r.run_id for r in new_runs)
    old_runs, nights, old_label = _night(old, lab_runner, 14, ids)
    changes = compare(old_runs, new_runs, History.of(nights))
    return changes, format_diff(changes, old_label, "tonight")


def _handle_diff(req: ReportRequest) -> int:
    from harness.report.diff import to_json

    old, new = req.paths
    changes, text = _diff(old, new, req.history, req.window)
    print(text)
    if req.json_out is not None:
        _write(req.json_out, json.dumps(to_json(changes), indent=2) + "\n")
    if req.markdown_out is not None:
        _write(req.markdown_out, "### Night to night\n\n```\n" + text + "\n```\n")
    return 1 if any(c.regression for c in changes) else 0
