"""JUnit XML for CI systems: one test case per expectation and per workload.

Written with the standard library's ElementTree, which escapes text and attributes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from harness.result import RunResult


def to_xml(result: RunResult) -> ET.Element:
    name = result.scenario.name
    suite = ET.Element("testsuite", name=f"harness.{name}")
    cases = 0
    failures = 0
    errors = 0
    if result.error is not None:
        case = ET.SubElement(suite, "testcase", classname=f"harness.{name}", name="run")
        err = ET.SubElement(case, "error", message=str(result.error),
                            type=type(result.error).__name__)
        err.text = "\n".join(result.console_tails.values())
        cases += 1
        errors += 1
    for w in result.workloads:
        case = ET.SubElement(suite, "testcase", classname=f"harness.{name}.workload",
                             name=f"{w.vm}: {w.name}", time=f"{w.seconds:.3f}")
        cases += 1
        if not w.passed:
            fail = ET.SubElement(case, "failure", message=w.message,
                                 type="timeout" if w.timed_out else "exit status")
            fail.text = w.output_tail
            failures += 1
    for e in result.expectations:
        case = ET.SubElement(suite, "testcase", classname=f"harness.{name}.expect",
                             name=f"{e.expectation.vm}/{e.expectation.device} "
                                  f"{e.expectation.path.value}")
        cases += 1
        if not e.passed:
            ET.SubElement(case, "failure", message=e.message)
            failures += 1
        else:
            ET.SubElement(case, "system-out").text = e.message
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("time", f"{result.total_seconds:.3f}")
    return suite


def write_junit(result: RunResult, path: Path) -> Path:
    tree = ET.ElementTree(to_xml(result))
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return path
