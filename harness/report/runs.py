"""Run reports as read back from disk: the one model that merge, JUnit, the page, the Markdown
summary and the night-to-night diff are written from.

A report is read from ``report.json`` (format ``harness-run/1``, older ones too: fields added
since are filled in here), or out of a merged report (``harness-merged/2``).  Each run is
credited to a *runner*: the host that ran it, or for a run inside the virtual lab (whose
hostname is L1's, the same on every machine) the host that ran the lab, marked as a lab run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.report.json_report import FORMAT as RUN_FORMAT
from harness.report.json_report import expectation_names, vector_key

MERGED_FORMAT = "harness-merged/2"
# The hostname the lab's job gives L1 ("(none)": an L1 of before it set one).
L1_HOSTNAME = re.compile(r"lab-l1(-\d+)?|\(none\)")
LAB_CONSOLE = "lab-l1.console.log"  # in a lab run folder, beside its inner run folders
_RTT = re.compile(rb"time=([0-9]+(?:\.[0-9]+)?) ms")
MAX_SAMPLES = 100_000  # latency samples kept per run
MAX_REPORT_BYTES = 64 << 20
UNKNOWN_RUNNER = "unknown runner"


@dataclass(frozen=True)
class Run:
    source: str
    report: dict[str, Any]  # normalised: every field of the current harness-run/1
    runner: str  # the host credited with the run
    lab: str | None = None  # L1's hostname when the run was inside the virtual lab
    latency_ms: tuple[float, ...] = ()  # ping round trips in its workloads' logs
    duplicates: tuple[str, ...] = field(default=())  # other sources of the same run id

    @property
    def run_id(self) -> str:
        return str(self.report["run_id"])

    @property
    def scenario(self) -> str:
        return str(self.report["scenario"]["name"])

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    @property
    def column(self) -> str:
        """The host column of the matrix: the runner, marked when the run was in the lab."""
        return f"{self.runner} (lab)" if self.lab else self.runner

    @property
    def latency_path(self) -> str | None:
        """The delivery path the workload's round trips went over: that of the assigned
        devices' vectors (or, with none assigned, of every vector that fired)."""
        vectors = [v for v in self.report["vectors"] if v["path"] != "not-delivered"]
        assigned = [v for v in vectors if v["evidence"]["host_delta"] is not None]
        paths = sorted({v["path"] or "no path" for v in (assigned or vectors)})
        return "+".join(paths) if paths and self.latency_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "run_id": self.run_id, "runner": self.runner,
                "lab": self.lab, "scenario": self.scenario, "passed": self.passed,
                "duplicates": list(self.duplicates), "latency_path": self.latency_path,
                "latency_ms": list(self.latency_ms), "report": self.report}


def normalise(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of a harness-run/1 report with the fields added since its version filled in."""
    r = copy.deepcopy(report)
    host = r.setdefault("host", {})
    host.setdefault("hostname", "unknown")
    r.setdefault("run_id", "legacy-" + hashlib.sha256(
        f"{host['hostname']}|{r['scenario']['name']}|{r.get('started')}".encode()
    ).hexdigest()[:16])
    r.setdefault("lab", None)
    r.setdefault("error", None)
    for key in ("phases", "vms", "workloads", "vectors", "host_wiring", "host_notes",
                "expectations"):
        r.setdefault(key, [])
    r.setdefault("console_tails", {})
    for v in r["vectors"]:
        v.setdefault("key", vector_key(v["vm"], v["device"], v.get("entry"), v["name"]))
    for i, e in enumerate(r["expectations"]):
        e.setdefault("index", i)
        e.setdefault("vectors", [])
        if "selected" not in e:  # older reports: every vector of the device is evidence
            e["selected"] = [v["key"] for v in r["vectors"]
                             if v["vm"] == e["vm"] and v["device"] == e["device"]]
    for e, name in zip(r["expectations"], expectation_names(r["expectations"]), strict=True):
        e.setdefault("name", name)
    return r


def find_reports(paths: Iterable[Path]) -> list[tuple[Path, Path]]:
    """(report file, the argument it was found under) for every report under the paths."""
    found: list[tuple[Path, Path]] = []
    for path in paths:
        if path.is_dir():
            found += [(p, path) for p in sorted(path.rglob("report.json"))]
        elif path.is_file():
            found.append((path, path))
        else:
            raise UsageError(f"{path}: no such file or folder")
    if not found:
        raise UsageError("no report.json among the paths given")
    return found


def read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise UsageError(f"{path}: larger than {MAX_REPORT_BYTES >> 20} MiB, not a report")
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable JSON report: {exc}") from exc


def latencies(run_folder: Path) -> tuple[float, ...]:
    """Ping round trips (``time=X ms``) in the run folder's workload logs."""
    samples: list[float] = []
    for log in sorted(run_folder.glob("*.workload.log")):
        try:
            data = log.read_bytes()
        except OSError:
            continue
        samples += [float(m.group(1)) for m in _RTT.finditer(data)]
    return tuple(samples[:MAX_SAMPLES])


def _is_lab(report: dict[str, Any], path: Path) -> str | None:
    """L1's hostname if the run was inside the virtual lab, else None."""
    if report.get("lab"):
        return str(report["lab"].get("l1") or report["host"]["hostname"])
    hostname = str(report["host"]["hostname"])
    if L1_HOSTNAME.fullmatch(hostname) or (path.parent.parent / LAB_CONSOLE).exists():
        return hostname
    return None


def _group(path: Path, root: Path) -> Path:
    """The folder of the argument a report lies in: one CI job's artifact."""
    if root.is_dir():
        rel = path.relative_to(root).parts
        return root / rel[0] if len(rel) > 1 else root
    return path.parent


def load_runs(paths: Sequence[Path], lab_runner: str | None = None) -> list[Run]:
    """Every run under the paths: run reports, or merged reports (their runs, as merged).

    A lab run is credited to the runner its report names (``lab.runner``), else to the one
    host whose own runs lie in the same artifact folder (the first folder below the argument),
    else to ``lab_runner``, else to "unknown runner".  A run id seen twice is one run.
    """
    runs: list[Run] = []
    pending: list[tuple[Path, Path, dict[str, Any], str]] = []  # lab runs: path, group, ...
    group_hosts: dict[Path, set[str]] = {}
    for path, root in find_reports(paths):
        data = read_json(path)
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        if fmt == MERGED_FORMAT:
            runs += [run_from_merged(r, path) for r in data["runs"]]
            continue
        if fmt != RUN_FORMAT:
            raise UsageError(f"{path}: format {fmt!r}, expected {RUN_FORMAT!r} or "
                             f"{MERGED_FORMAT!r}")
        try:
            report = normalise(data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{path}: not a complete {RUN_FORMAT} report (missing {exc})"
                             ) from exc
        group = _group(path, root)
        l1 = _is_lab(report, path)
        if l1 is None:
            group_hosts.setdefault(group, set()).add(str(report["host"]["hostname"]))
            runs.append(Run(str(path), report, str(report["host"]["hostname"]),
                            latency_ms=latencies(path.parent)))
        else:
            pending.append((path, group, report, l1))
    for path, group, report, l1 in pending:
        named = (report.get("lab") or {}).get("runner")
        hosts = group_hosts.get(group, set())
        runner = (named or (next(iter(hosts)) if len(hosts) == 1 else None) or lab_runner
                  or UNKNOWN_RUNNER)
        runs.append(Run(str(path), report, str(runner), lab=l1,
                        latency_ms=latencies(path.parent)))
    return dedupe(runs)


def run_from_merged(entry: dict[str, Any], path: Path) -> Run:
    try:
        return Run(str(entry["source"]), normalise(entry["report"]), str(entry["runner"]),
                   entry.get("lab"), tuple(float(x) for x in entry.get("latency_ms", ())),
                   tuple(entry.get("duplicates", ())))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{path}: a run of this merged report is incomplete ({exc})") from exc


def dedupe(runs: list[Run]) -> list[Run]:
    """One run per run id (the first source read), the others named as its duplicates."""
    first: dict[str, int] = {}
    kept: list[Run] = []
    for run in runs:
        if run.run_id in first:
            i = first[run.run_id]
            kept[i] = Run(kept[i].source, kept[i].report, kept[i].runner, kept[i].lab,
                          kept[i].latency_ms, (*kept[i].duplicates, run.source))
            continue
        first[run.run_id] = len(kept)
        kept.append(run)
    return sorted(kept, key=lambda r: (r.scenario, r.column, str(r.report.get("started"))))
