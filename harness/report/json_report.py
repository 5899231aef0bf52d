"""The run report as JSON: the source of truth every other format is derived from.

The format is versioned (``format``) so reports from many hosts can be merged by tools that
check it; every verdict carries its evidence (counts per CPU, host delta, wiring, reason).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import __version__
from harness.result import RunResult
from harness.verdict import VectorVerdict

FORMAT = "harness-run/1"


def verdict_dict(v: VectorVerdict) -> dict[str, Any]:
    return {"vm": v.vm, "device": v.device, "bdf": v.bdf, "entry": v.entry, "name": v.name,
            "irq": v.irq, "path": v.path.value if v.path else None, "reason": v.reason,
            "evidence": {"guest_delta": v.guest_delta, "guest_per_cpu": list(v.per_cpu),
                         "host_delta": v.host_delta,
                         "wiring": asdict(v.wiring) if v.wiring else None}}


def to_dict(result: RunResult) -> dict[str, Any]:
    qemus = {vm.qemu: vm.qemu_version for vm in sorted(result.vms, key=lambda v: v.qemu)}
    return {
        "format": FORMAT,
        "harness": __version__,
        "scenario": {"name": result.scenario.name, "file": result.scenario_file},
        "started": datetime.fromtimestamp(result.started, UTC).isoformat(),
        "host": {"hostname": platform.node(), "kernel": platform.release(),
                 "machine": platform.machine(), "cpus": os.cpu_count(),
                 "qemu": qemus},
        "passed": result.passed,
        "error": ({"type": type(result.error).__name__, "message": str(result.error)}
                  if result.error else None),
        "phases": [{"name": p.name, "seconds": round(p.seconds, 3)} for p in result.phases],
        "total_seconds": round(result.total_seconds, 3),
        "vms": [{**asdict(vm), "devices": [{"id": i, "kind": k, "bdf": b}
                                           for i, k, b in vm.devices]} for vm in result.vms],
        "workloads": [{**asdict(w), "passed": w.passed, "message": w.message}
                      for w in result.workloads],
        "vectors": [verdict_dict(v) for v in result.verdicts],
        "host_wiring": [dict(w) for w in result.host.wiring],
        "host_notes": list(result.host.notes),
        "expectations": [{"vm": e.expectation.vm, "device": e.expectation.device,
                          "path": e.expectation.path.value, "passed": e.passed,
                          "message": e.message} for e in result.expectations],
        "console_tails": dict(result.console_tails) if not result.passed else {},
    }


def write_json(result: RunResult, path: Path) -> Path:
    path.write_text(json.dumps(to_dict(result), indent=2) + "\n")
    return path
