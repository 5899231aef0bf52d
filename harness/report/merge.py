"""Merge run reports from many hosts (CI artifacts of a fleet of runners) into one.

Input: report.json files (format ``harness-run/1``), merged reports, or folders holding them
(see ``runs.load_runs``: duplicates by run id, lab runs credited to their runner).  Output:
one JSON document (format ``harness-merged/2``) that keeps every run whole (workloads, times,
console tails, latency samples), a scenario x host matrix whose cells name the path of each
vector, per delivery path how many vectors showed it; a terminal table; a JUnit file with one
suite per run, its cases and evidence as in the run's own junit.xml.

Retry policy: a scenario run twice on one runner (the CI templates run a failed scenario
once more) whose runs disagree is *flaky*: listed as such, and it does not fail the merge.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from typing import Any

from harness.report import junit
from harness.report.runs import MERGED_FORMAT, Run, load_runs
from harness.report.summary import table

FORMAT = MERGED_FORMAT
__all__ = ["FORMAT", "format_merged", "load_runs", "merge", "merged_junit"]


def outcome(runs: list[Run]) -> str:
    """pass, fail (every run failed or errored), flaky (they disagree), or error."""
    results = {r.passed for r in runs}
    if len(results) > 1:
        return "flaky"
    if True in results:
        return "pass"
    return "error" if all(r.report["error"] for r in runs) else "fail"


def cell(runs: list[Run]) -> dict[str, Any]:
    """A matrix cell: the runs of one scenario on one runner, and each vector's path (paths
    that differ between the runs are all named, in run order)."""
    vectors: dict[str, list[str]] = {}
    for run in runs:
        for v in run.report["vectors"]:
            seen = vectors.setdefault(v["key"], [])
            path = v["path"] or "no path"
            if path not in seen:
                seen.append(path)
    return {"outcome": outcome(runs), "runs": [r.run_id for r in runs],
            "lab": next((r.lab for r in runs if r.lab), None),
            "vectors": {k: " / ".join(p) for k, p in sorted(vectors.items())}}


def merge(runs: list[Run]) -> dict[str, Any]:
    hosts = sorted({r.column for r in runs})
    scenarios = sorted({r.scenario for r in runs})
    matrix: dict[str, dict[str, dict[str, Any] | None]] = {}
    for s in scenarios:
        matrix[s] = {}
        for h in hosts:
            mine = [r for r in runs if r.scenario == s and r.column == h]
            matrix[s][h] = cell(mine) if mine else None
    paths: Counter[str] = Counter()
    for run in runs:
        paths.update(v["path"] or "no path" for v in run.report["vectors"])
    outcomes = [c["outcome"] for row in matrix.values() for c in row.values() if c]
    return {
        "format": FORMAT,
        "hosts": hosts,
        "scenarios": scenarios,
        "passed": not any(o in ("fail", "error") for o in outcomes),
        "flaky": sorted(f"{s} on {h}" for s, row in matrix.items() for h, c in row.items()
                        if c and c["outcome"] == "flaky"),
        # boots that never reached init and were booted again: the host's health, not a
        # failure of the scenario, but never hidden
        "retried_boots": sorted(f"{r.scenario} on {r.column}: {vm['name']}" for r in runs
                                for vm in r.report["vms"] for _ in vm.get("retried_boots")
                                or ()),
        "matrix": matrix,
        "vector_paths": dict(sorted(paths.items())),
        "runs": [r.to_dict() for r in runs],
    }


def _cell_text(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    paths = Counter(p for p in c["vectors"].values())
    what = ", ".join(f"{p} {n}" for p, n in sorted(paths.items()))
    return f"{c['outcome']}{' x' + str(len(c['runs'])) if len(c['runs']) > 1 else ''}" + (
        f" ({what})" if what else "")


def format_merged(merged: dict[str, Any]) -> str:
    hosts = merged["hosts"]
    rows = [[s] + [_cell_text(merged["matrix"][s][h]) for h in hosts]
            for s in merged["scenarios"]]
    lines = [table(["scenario", *hosts], rows), ""]
    lines.append("vectors by path: " + ", ".join(f"{path} {count}" for path, count
                                                  in merged["vector_paths"].items()))
    for run in merged["runs"]:
        where = f"{run['runner']}{' (lab)' if run['lab'] else ''} {run['scenario']}"
        report = run["report"]
        for e in report["expectations"]:
            if not e["passed"]:
                lines.append(f"FAIL {where}: {e['message']}")
        for w in report["workloads"]:
            if not w.get("passed", w["exit_status"] == 0):
                lines.append(f"FAIL {where}: {w.get('message') or w['name']}")
        if report["error"]:
            lines.append(f"ERROR {where}: {report['error']['message']}")
        for vm in report["vms"]:
            lines += [f"RETRIED {where}: {vm['name']}'s boot {i} never reached init: {why}"
                      for i, why in enumerate(vm.get("retried_boots") or (), 1)]
        if run["duplicates"]:
            lines.append(f"note: {run['source']} given again as {', '.join(run['duplicates'])}"
                         f" (run {run['run_id']}): counted once")
    for flaky in merged["flaky"]:
        lines.append(f"FLAKY {flaky}: its runs disagree (a retry passed); not counted as failed")
    lines.append("PASSED" if merged["passed"] else "FAILED")
    return "\n".join(lines)


def merged_junit(merged: dict[str, Any]) -> ET.ElementTree:
    suites = ET.Element("testsuites", name="harness")
    totals = Counter[str]()
    seconds = 0.0
    for run in merged["runs"]:
        lab = " (lab)" if run["lab"] else ""
        el = junit.suite(run["report"], runner=run["runner"], lab=run["lab"],
                         name=f"{run['runner']}{lab}.{run['scenario']}")
        for key in ("tests", "failures", "errors"):
            totals[key] += int(el.get(key) or 0)
        seconds += float(el.get("time") or 0)
        suites.append(el)
    for key in ("tests", "failures", "errors"):
        suites.set(key, str(totals[key]))
    suites.set("time", f"{seconds:.3f}")
    tree = ET.ElementTree(suites)
    ET.indent(tree)
    return tree
