"""``harness bench`` end to end on real guests: the smoke scenario once, then with its VM
replicated twice, and every figure ``ci/bench`` promises is printed.  The figures themselves
are not judged here (speed is measured by the benchmark, never asserted in a test)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.cli import main

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def test_bench_prints_phases_ratio_probe_scaling_and_memory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(REPO / "configs" / "smoke.yaml"), "--repeat", "1",
                 "--vms", "1,2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "bench smoke: 1 run(s), median seconds"
    for phase in ("kernel to init", "workload", "total", "bare kernel boot"):
        assert any(ln.strip().startswith(phase) for ln in lines), (phase, out)
    assert any(ln.startswith("  ratio total / bare boot: ") for ln in lines), out
    assert any(re.match(r"  KVM probe, uncached: \d+\.\d\d s \((not )?usable: .+\)$", ln)
               for ln in lines), out
    table = lines.index(next(ln for ln in lines if ln.startswith("  scaling (")))
    assert lines[table + 1].split()[:2] == ["VMs", "total"]
    one, two = (ln.split() for ln in lines[table + 2:table + 4])
    assert (one[0], one[6], two[0]) == ("1", "1.00x", "2"), out
    assert float(two[1]) > 0 and two[-1] == "MiB"  # a total, and the harness's RSS
    assert re.search(r"  peak memory \(RSS\): harness process \d+ MiB; largest child \d+ MiB",
                     out)
    assert re.search(r"  host: \d+ CPUs, 1-minute load average", out)
    # Each copy of the VM ran its own workloads and was judged on its own.
    folders = sorted(p.name for p in next(tmp_path.iterdir()).iterdir())
    assert folders == ["bare-0", "run-0", "run-0-x2"]
    x2 = next(tmp_path.iterdir()) / "run-0-x2"
    assert {p.name for p in x2.glob("*.workload.log")} == {
        "guest0-1.workload.log", "guest0-2.workload.log"}
