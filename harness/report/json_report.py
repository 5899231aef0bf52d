"""The run report as JSON: the source of truth every other format is derived from.

The format is versioned (``format``) so reports from many hosts can be merged by tools that
check it; every verdict carries its evidence (counts per CPU, host delta, wiring, reason).
Fields added within ``harness-run/1`` (readers take their absence as "older report"):
``run_id`` (names the run: a merge counts a report given twice once), per vector ``key``
(``vm/device#entry``, stable from night to night), per expectation ``index``, ``name`` (its
stable, unique test name), ``vectors``/``min_delta``/``released`` (what it asked) and
``selected`` (the keys of the vectors it judged), and ``lab`` (set inside the virtual lab:
L1's hostname and the runner that ran the lab, from ``HARNESS_LAB_RUNNER``).
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
from harness.verdict import ExpectationResult, VectorVerdict

FORMAT = "harness-run/1"
LAB_RUNNER_ENV = "HARNESS_LAB_RUNNER"  # set by the lab's job in L1: the host that runs L1


def vector_key(vm: str, device: str, entry: int | None, name: str) -> str:
    """A vector's identity from night to night: its device and MSI-X entry (fixed before
    boot), or its guest IRQ name where it has no entry (INTx)."""
    return f"{vm}/{device}#{entry}" if entry is not None else f"{vm}/{device} {name}"


def expectation_names(expectations: list[dict[str, Any]]) -> list[str]:
    """Stable, unique test names: ``vm/device path`` with the vector patterns if any, and the
    expectation's index only where two would otherwise share a name."""
    names = []
    for i, e in enumerate(expectations):
        name = f"{e['vm']}/{e['device']} expects {e['path']}"
        if e.get("vectors"):
            name += f" [{', '.join(e['vectors'])}]"
        if e.get("released"):
            name += " released"
        if name in names:
            name += f" #{e.get('index', i)}"
        names.append(name)
    return names


def _lab() -> dict[str, str] | None:
    runner = os.environ.get(LAB_RUNNER_ENV, "").strip()
    return {"l1": platform.node(), "runner": runner} if runner else None


def expectation_dict(index: int, e: ExpectationResult) -> dict[str, Any]:
    x = e.expectation
    return {"index": index, "vm": x.vm, "device": x.device, "path": x.path.value,
            "vectors": list(x.vectors), "min_delta": x.min_delta, "released": x.released,
            "passed": e.passed, "message": e.message,
            "selected": [vector_key(v.vm, v.device, v.entry, v.name) for v in e.vectors]}


def verdict_dict(v: VectorVerdict) -> dict[str, Any]:
    return {"key": vector_key(v.vm, v.device, v.entry, v.name),
            "vm": v.vm, "device": v.device, "bdf": v.bdf, "entry": v.entry, "kind": v.kind,
            "name": v.name, "irq": v.irq, "path": v.path.value if v.path else None,
            "reason": v.reason,
            "evidence": {"guest_delta": v.guest_delta, "guest_per_cpu": list(v.per_cpu),
                         "host_delta": v.host_delta,
                         "wiring": asdict(v.wiring) if v.wiring else None}}


def to_dict(result: RunResult) -> dict[str, Any]:
    qemus = {vm.qemu: vm.qemu_version for vm in sorted(result.vms, key=lambda v: v.qemu)}
    return {
        "format": FORMAT,
        "harness": __version__,
        "run_id": result.run_id,
        "scenario": {"name": result.scenario.name, "file": result.scenario_file},
        "started": datetime.fromtimestamp(result.started, UTC).isoformat(),
        "host": {"hostname": platform.node(), "kernel": platform.release(),
                 "machine": platform.machine(), "cpus": os.cpu_count(),
                 "qemu": qemus},
        "lab": _lab(),
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
        "expectations": _named([expectation_dict(i, e)
                                for i, e in enumerate(result.expectations)]),
        "console_tails": dict(result.console_tails) if not result.passed else {},
    }


def _named(expectations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**e, "name": name} for e, name in zip(expectations,
                                                   expectation_names(expectations), strict=True)]


def write_json(result: RunResult, path: Path) -> Path:
    path.write_text(json.dumps(to_dict(result), indent=2) + "\n")
    return path
