"""System tests of vectors that move: a guest pins an IRQ to a CPU and an expectation checks
the window's per-CPU counts (real TCG guest, real /proc/interrupts, the guest agent's pin)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.cli import main

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def test_a_vector_pinned_to_cpu_2_is_expected_there(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(REPO / "configs" / "affinity.yaml"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (report_file,) = tmp_path.glob("*/report.json")
    report = json.loads(report_file.read_text())
    (rx,) = [v for v in report["vectors"] if v["name"].endswith("-input.0")]
    per_cpu = rx["evidence"]["guest_per_cpu"]
    assert len(per_cpu) == 4 and per_cpu[2] >= 0.9 * sum(per_cpu) > 0, rx
    assert "expects emulated on CPU2" in out
    (setup,) = [w for w in report["workloads"] if w["name"].startswith("pin the")]
    assert setup["passed"], setup


def test_a_vector_pinned_elsewhere_fails_naming_the_cpu_that_took_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "configs" / "affinity.yaml").read_text()
    assert '"virtio0-input.*", "2"]' in text
    scenario = tmp_path / "pinned-to-1.yaml"
    scenario.write_text(text.replace('"virtio0-input.*", "2"]', '"virtio0-input.*", "1"]'))
    code = main(["run", str(scenario), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 1, out
    line = next(ln for ln in out.splitlines() if "[FAIL]" in ln)
    assert re.search(r"expects emulated on CPU2: virtio0-input\.0: \d+ of \d+ interrupts on "
                     r"CPU2, most on CPU1 \(per CPU \d+/\d+/\d+/\d+\)", line), line
