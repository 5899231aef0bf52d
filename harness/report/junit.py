"""JUnit XML for CI systems: one test case per expectation and per workload, with evidence.

Written from the JSON report (the source of truth), so a run's ``junit.xml`` and a merge's
carry the same cases.  A failing expectation's body holds what an on-call engineer needs
without opening report.json: the verdict's reason with its numbers and the table of the
vectors it judged, the host's preflight lines, the failed workloads and the console tails.
Test names are stable from night to night and unique within a suite (see
``json_report.expectation_names``); each suite has ``hostname``, ``timestamp`` and ``time``.
Written with the standard library's ElementTree, which escapes text and attributes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.report.summary import table
from harness.result import RunResult

MAX_BODY = 64 * 1024  # characters of one failure body; the report keeps the rest


def vector_rows(vectors: list[dict[str, Any]]) -> list[list[object]]:
    return [[v["key"], v["bdf"], v["name"], v["irq"], v["evidence"]["guest_delta"],
             "/".join(str(c) for c in v["evidence"].get("guest_per_cpu", [])) or "-",
             "-" if v["evidence"]["host_delta"] is None else v["evidence"]["host_delta"],
             v["path"] or "no path", v["reason"]] for v in vectors]


VECTOR_HEADERS = ["vector", "bdf", "name", "irq", "guest delta", "per cpu", "host delta",
                  "path", "reason"]


def preflight_lines(report: dict[str, Any]) -> list[str]:
    return [n for n in report.get("host_notes", []) if n.startswith("preflight")]


def evidence(report: dict[str, Any], expectation: dict[str, Any]) -> str:
    """The text behind an expectation's verdict."""
    chosen = set(expectation.get("selected", []))
    vectors = [v for v in report["vectors"] if v["key"] in chosen]
    device = [v for v in report["vectors"]
              if v["vm"] == expectation["vm"] and v["device"] == expectation["device"]]
    out = [expectation["message"], ""]
    if vectors:
        out += ["vectors judged:", table(VECTOR_HEADERS, vector_rows(vectors)), ""]
    elif device:
        out += ["no vector was selected; the device's vectors:",
                table(VECTOR_HEADERS, vector_rows(device)), ""]
    else:
        out += [f"the guest showed no vector of {expectation['vm']}/{expectation['device']}",
                ""]
    out += tail_lines(report)
    return _bounded("\n".join(out).rstrip() + "\n")


def tail_lines(report: dict[str, Any]) -> list[str]:
    """Preflight, host notes, failed workloads, the run's error and the console tails."""
    out = []
    notes = report.get("host_notes", [])
    if notes:
        out += ["host:", *(f"  {n}" for n in notes), ""]
    failed = [w for w in report["workloads"] if not w.get("passed", w["exit_status"] == 0)]
    for w in failed:
        out += [f"failed: {w.get('message') or w['name']}",
                *(f"  | {line}" for line in str(w.get("output_tail", "")).splitlines()[-10:]),
                ""]
    if report.get("error"):
        out += [f"error: {report['error']['type']}: {report['error']['message']}", ""]
    for vm, tail in report.get("console_tails", {}).items():
        if tail:
            out += [f"console of {vm} (last lines):",
                    *(f"  | {line}" for line in tail.splitlines()[-40:]), ""]
    return out


def _bounded(text: str) -> str:
    if len(text) <= MAX_BODY:
        return text
    return text[:MAX_BODY // 2] + "\n[... cut: see report.json ...]\n" + text[-MAX_BODY // 2:]


def _timestamp(started: str | None) -> str | None:
    """JUnit's timestamp: ISO 8601 without a zone (the schema's), in UTC."""
    if not started:
        return None
    try:
        return datetime.fromisoformat(started).replace(tzinfo=None).isoformat(
            timespec="seconds")
    except ValueError:
        return None


def suite(report: dict[str, Any], runner: str | None = None, lab: str | None = None,
          name: str | None = None) -> ET.Element:
    """One testsuite for one run (a normalised report, see ``runs.normalise``)."""
    scenario = report["scenario"]["name"]
    inside = report.get("lab") or {}  # a run in the virtual lab that names its runner
    hostname = runner or inside.get("runner") or report["host"]["hostname"]
    lab = lab or inside.get("l1")
    classname = f"harness.{scenario}"
    el = ET.Element("testsuite", name=name or classname, hostname=hostname)
    stamp = _timestamp(report.get("started"))
    if stamp:
        el.set("timestamp", stamp)
    props = ET.SubElement(el, "properties")
    for key, value in [("run_id", report.get("run_id")), ("scenario_file",
                                                          report["scenario"].get("file")),
                       ("harness", report.get("harness")), ("kernel",
                                                            report["host"].get("kernel")),
                       ("lab", f"run inside the virtual lab (L1 {lab}) on {hostname}"
                        if lab else None),
                       *(("qemu", v) for v in report["host"].get("qemu", {}).values())]:
        if value:
            ET.SubElement(props, "property", name=key, value=str(value))
    counts = {"tests": 0, "failures": 0, "errors": 0}
    phases = {p["name"]: p["seconds"] for p in report.get("phases", [])}
    if report.get("error"):
        case = ET.SubElement(el, "testcase", classname=classname, name="run",
                             time=f"{report.get('total_seconds', 0.0):.3f}")
        err = ET.SubElement(case, "error", message=report["error"]["message"],
                            type=report["error"]["type"])
        err.text = _bounded("\n".join(tail_lines(report)))
        counts["tests"] += 1
        counts["errors"] += 1
    seen: set[str] = set()
    for w in report["workloads"]:
        case_name = f"{w['vm']}: {w['name']}"
        if case_name in seen:
            case_name += f" #{len(seen)}"
        seen.add(case_name)
        case = ET.SubElement(el, "testcase", classname=f"{classname}.workload", name=case_name,
                             time=f"{w['seconds']:.3f}")
        counts["tests"] += 1
        if not w.get("passed", w["exit_status"] == 0):
            fail = ET.SubElement(case, "failure", message=w.get("message") or case_name,
                                 type="timeout" if w.get("timed_out") else "exit status")
            fail.text = _bounded(str(w.get("output_tail", "")))
            counts["failures"] += 1
        elif w.get("output_tail"):
            ET.SubElement(case, "system-out").text = _bounded(str(w["output_tail"]))
    # The verdicts are judged in the verdict phase: each expectation's share of it.
    share = phases.get("verdict", 0.0) / max(len(report["expectations"]), 1)
    for e in report["expectations"]:
        case = ET.SubElement(el, "testcase", classname=f"{classname}.expect", name=e["name"],
                             time=f"{share:.3f}")
        counts["tests"] += 1
        if not e["passed"]:
            fail = ET.SubElement(case, "failure", message=e["message"],
                                 type=f"expected {e['path']}")
            fail.text = evidence(report, e)
            counts["failures"] += 1
        else:
            ET.SubElement(case, "system-out").text = evidence(report, e)
    for key, value in counts.items():
        el.set(key, str(value))
    el.set("time", f"{report.get('total_seconds', 0.0):.3f}")
    return el


def to_xml(result: RunResult) -> ET.Element:
    from harness.report.json_report import to_dict
    from harness.report.runs import normalise

    return suite(normalise(to_dict(result)))


def write_junit(result: RunResult, path: Path) -> Path:
    tree = ET.ElementTree(to_xml(result))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path
