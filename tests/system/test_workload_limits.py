"""System tests: a workload's time limit holds in a real guest (TCG here), over real SSH.

A flooding workload and a silent one, each with ``timeout_s: 3``, are stopped at their limit
with every process they started; the run fails (exit 1) naming the workload and its limit,
the next workloads still run, and the expectations on the measured window still get their
verdicts.  Each test boots one guest.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main

pytestmark = pytest.mark.system


def left_running(name: str) -> list[str]:
    """A workload that fails if a process called ``name`` still runs in the guest."""
    return ["sh", "-c", f'for c in /proc/[0-9]*/comm; do [ "$(cat $c 2>/dev/null)" != {name} ]'
            " || exit 1; done"]


def scenario(tmp_path: Path, name: str, first: list[str]) -> Path:
    """One guest; ``first`` with a 3 s limit, then a ping (the measured traffic) and a check
    that nothing of ``first`` is left; net0's input vector must have fired."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        "vms:\n  - name: g\n    memory_mib: 256\n    devices:\n"
        "      - {kind: virtio-net, id: net0}\n"
        "workloads:\n"
        f"  - {{vm: g, name: {name}, run: {json.dumps(first)}, timeout_s: 3}}\n"
        '  - {vm: g, run: [ping, -q, -c, "20", -i, "0.01", 10.0.2.2], timeout_s: 30}\n'
        f"  - {{vm: g, name: nothing left, run: {json.dumps(left_running(first[0]))}, "
        "timeout_s: 30}\n"
        "expect:\n"
        '  - {vm: g, device: net0, path: emulated, vectors: ["*-input.*"], min_delta: 10}\n')
    return path


def run(tmp_path: Path, name: str, first: list[str],
        capsys: pytest.CaptureFixture[str]) -> tuple[str, Path, dict[str, Any]]:
    code = main(["run", str(scenario(tmp_path, name, first)), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 1, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    limited, ping, left = report["workloads"]
    assert (limited["name"], limited["timed_out"], limited["timeout_s"],
            limited["exit_status"]) == (name, True, 3, -1)
    assert 3 <= limited["seconds"] < 8, "the limit is on the workload's wall clock"
    assert ping["exit_status"] == 0 and not ping["timed_out"]
    assert left["exit_status"] == 0, f"something of {name} was left running in the guest"
    # What was measured still got its verdict.
    assert report["error"] is None and report["passed"] is False
    assert report["vectors"] and [e["passed"] for e in report["expectations"]] == [True]
    message = (f"workload g: {name}: timed out: still running at its limit of 3 s, stopped")
    assert f"[FAIL] {message}" in out and "[PASS] g/net0 expects emulated" in out
    assert "\nFAILED\n" in out
    failure = ET.parse(run_dir / "junit.xml").getroot().find(
        f"testcase[@name='g: {name}']/failure")
    assert failure is not None and failure.get("message", "").startswith(message)
    return out, run_dir, limited


def test_a_flooding_workload_is_stopped_at_its_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir, flood = run(tmp_path, "flood", ["yes"], capsys)
    log = (run_dir / "g.workload.log").read_bytes()
    assert log.startswith(b"$ flood\ny\ny\ny\n")
    assert b"y\n[timed out: still running at its limit of 3 s, stopped]\n$ ping" in log
    assert flood["output_bytes"] > 100_000
    assert len(log) > flood["output_bytes"], "the log holds the whole flood, streamed"


def test_a_silent_hang_is_stopped_at_its_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir, hang = run(tmp_path, "hang", ["sleep", "600"], capsys)
    assert hang["output_bytes"] == 0
    log = (run_dir / "g.workload.log").read_text()
    assert log.startswith("$ hang\n[timed out: still running at its limit of 3 s, stopped]\n")
