"""Merge run reports from many hosts (CI artifacts of a fleet of runners) into one.

Input: report.json files (format ``harness-run/1``) or folders holding them.  Output: one JSON
document (format ``harness-merged/1``) with every run, a scenario x host matrix, and per
delivery path how many vectors showed it; a terminal table; a JUnit file with one suite per
host and scenario.  Reports of another format are refused, never guessed at.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.report.json_report import FORMAT as RUN_FORMAT
from harness.report.summary import table

FORMAT = "harness-merged/1"


@dataclass(frozen=True)
class Run:
    path: Path
    report: dict[str, Any]

    @property
    def host(self) -> str:
        return str(self.report["host"]["hostname"])

    @property
    def scenario(self) -> str:
        return str(self.report["scenario"]["name"])


def find_reports(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(path.rglob("report.json"))
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    if not found:
        raise UsageError("no report.json among the paths given")
    return found


def load_runs(paths: Iterable[Path]) -> list[Run]:
    runs = []
    for path in find_reports(paths):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: not a readable JSON report: {exc}") from exc
        if not isinstance(report, dict) or report.get("format") != RUN_FORMAT:
            got = report.get("format") if isinstance(report, dict) else type(report).__name__
            raise UsageError(f"{path}: format {got!r}, expected {RUN_FORMAT!r}")
        runs.append(Run(path, report))
    return runs


def merge(runs: list[Run]) -> dict[str, Any]:
    hosts = sorted({r.host for r in runs})
    scenarios = sorted({r.scenario for r in runs})
    matrix: dict[str, dict[str, list[str]]] = {s: {h: [] for h in hosts} for s in scenarios}
    paths: Counter[str] = Counter()
    for run in runs:
        matrix[run.scenario][run.host].append("pass" if run.report["passed"] else "fail")
        paths.update(v["path"] or "no path" for v in run.report["vectors"])
    return {
        "format": FORMAT,
        "hosts": hosts,
        "scenarios": scenarios,
        "passed": all(r.report["passed"] for r in runs),
        "matrix": matrix,
        "vector_paths": dict(sorted(paths.items())),
        "runs": [{"source": str(r.path), "host": r.report["host"],
                  "scenario": r.report["scenario"], "started": r.report["started"],
                  "passed": r.report["passed"], "error": r.report["error"],
                  "expectations": r.report["expectations"], "vectors": r.report["vectors"],
                  "host_notes": r.report.get("host_notes", [])} for r in runs],
    }


def format_merged(merged: dict[str, Any]) -> str:
    hosts = merged["hosts"]
    rows = []
    for scenario in merged["scenarios"]:
        cells = merged["matrix"][scenario]
        rows.append([scenario] + [" ".join(cells[h]) or "-" for h in hosts])
    lines = [table(["scenario", *hosts], rows), ""]
    lines.append("vectors by path: " + ", ".join(f"{path} {count}" for path, count
                                                  in merged["vector_paths"].items()))
    for run in merged["runs"]:
        for e in run["expectations"]:
            if not e["passed"]:
                lines.append(f"FAIL {run['host']['hostname']} {run['scenario']['name']}: "
                             f"{e['message']}")
        if run["error"]:
            lines.append(f"ERROR {run['host']['hostname']} {run['scenario']['name']}: "
                         f"{run['error']['message']}")
    lines.append("PASSED" if merged["passed"] else "FAILED")
    return "\n".join(lines)


def merged_junit(merged: dict[str, Any]) -> ET.ElementTree:
    suites = ET.Element("testsuites", name="harness")
    for run in merged["runs"]:
        host = run["host"]["hostname"]
        suite = ET.SubElement(suites, "testsuite",
                              name=f"{host}.{run['scenario']['name']}")
        failures = 0
        for e in run["expectations"]:
            case = ET.SubElement(suite, "testcase", classname=f"{host}.{run['scenario']['name']}",
                                 name=f"{e['vm']}/{e['device']} {e['path']}")
            if not e["passed"]:
                ET.SubElement(case, "failure", message=e["message"])
                failures += 1
        if run["error"]:
            case = ET.SubElement(suite, "testcase", classname=f"{host}.{run['scenario']['name']}",
                                 name="run")
            ET.SubElement(case, "error", message=run["error"]["message"],
                          type=run["error"]["type"])
        suite.set("tests", str(len(suite)))
        suite.set("failures", str(failures))
        suite.set("errors", "1" if run["error"] else "0")
    tree = ET.ElementTree(suites)
    ET.indent(tree)
    return tree
