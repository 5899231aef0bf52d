"""Night to night: what changed between two runs or merged reports, regressions first.

Compared per scenario and host (a lab run's host is its runner, marked "(lab)"):

- **path**: a vector (``vm/device#entry``) whose delivery path changed, e.g. posted last
  night and irqfd-bounce tonight.  A regression, unless the new path is the better one
  (posted < irqfd-bounce < userspace-bounce; delivered < not delivered), or the change is
  between delivered and not delivered on a vector no expectation judges (a config vector
  that fired once is noise);
- **new failure** / **fixed**: an expectation, a workload or the run itself (its error);
- **vanished**: a host, or a scenario on a host, that ran last night and not tonight;
- **latency**: ping round trips over a path that moved beyond the noise of the runs
  themselves: each night's median lies outside the other night's interquartile range
  (at least 20 samples a side).  Reported, never failing (timing is the noisiest figure);
- **retried**: tonight's boots that never reached init and were booted again (the scenario's
  ``boot_attempts``), every night they happen: the host's health, never failing.

Flakiness policy: a case is *flaky*, reported as such and not as a regression, when tonight's
runs of it disagree (the CI templates retry a failed scenario once), or when, in the nights
of the history (a result store, the last ``window`` nights), it was seen both ways.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from harness.report.runs import Run

# Lower is better: where both paths are ranked, moving down the list is an improvement.
_RANK = {"posted": 0, "irqfd-bounce": 1, "userspace-bounce": 2, "emulated": 2,
         "not-delivered": 3, "no path": 4}
MIN_SAMPLES = 20
ORDER = ("path", "new failure", "error", "vanished", "flaky", "retried", "fixed",
         "path improved", "latency", "new")


@dataclass(frozen=True)
class Change:
    kind: str  # one of ORDER
    where: str  # "scenario on host"
    what: str
    regression: bool
    scenario: str = ""  # path changes: where the vector is, for the page to mark it
    host: str = ""
    vector: str = ""

    def line(self) -> str:
        tag = {"path": "PATH", "new failure": "NEW FAIL", "error": "ERROR",
               "vanished": "VANISHED", "flaky": "FLAKY", "retried": "RETRIED", "fixed": "FIXED",
               "path improved": "PATH+", "latency": "LATENCY", "new": "NEW"}[self.kind]
        return f"{tag:<9} {self.where}: {self.what}"


Cells = dict[tuple[str, str], list[Run]]


def cells(runs: Sequence[Run]) -> Cells:
    out: Cells = {}
    for run in runs:
        out.setdefault((run.scenario, run.column), []).append(run)
    return out


def _vector_paths(runs: list[Run]) -> dict[str, list[str]]:
    paths: dict[str, list[str]] = {}
    for run in runs:
        for v in run.report["vectors"]:
            seen = paths.setdefault(v["key"], [])
            if (v["path"] or "no path") not in seen:
                seen.append(v["path"] or "no path")
    return paths


def _numbers(runs: list[Run]) -> dict[str, str]:
    """Each vector's counts in the cell's last run: the evidence behind its path."""
    out = {}
    for run in runs:
        for v in run.report["vectors"]:
            host = v["evidence"]["host_delta"]
            out[v["key"]] = f"guest {v['evidence']['guest_delta']}" + (
                f", host {host}" if host is not None else "")
    return out


def _judged(runs: list[Run]) -> set[str]:
    return {k for run in runs for e in run.report["expectations"] for k in e["selected"]}


def _cases(runs: list[Run]) -> dict[str, str]:
    """Each case of the cell (run, expectations, workloads): pass, fail or flaky."""
    seen: dict[str, set[bool]] = {}
    for run in runs:
        r = run.report
        seen.setdefault("run", set()).add(r["error"] is None)
        for e in r["expectations"]:
            seen.setdefault(f"expectation {e['name']}", set()).add(bool(e["passed"]))
        for w in r["workloads"]:
            ok = w.get("passed", w["exit_status"] == 0)
            seen.setdefault(f"workload {w['vm']}: {w['name']}", set()).add(bool(ok))
    return {k: "flaky" if len(v) > 1 else "pass" if True in v else "fail"
            for k, v in seen.items()}


def _messages(runs: list[Run]) -> dict[str, str]:
    out = {}
    for run in runs:
        r = run.report
        if r["error"]:
            out["run"] = r["error"]["message"]
        for e in r["expectations"]:
            if not e["passed"]:
                out[f"expectation {e['name']}"] = e["message"]
        for w in r["workloads"]:
            if not w.get("passed", w["exit_status"] == 0):
                out[f"workload {w['vm']}: {w['name']}"] = w.get("message") or w["name"]
    return out


def _better(old: str, new: str) -> bool:
    return old in _RANK and new in _RANK and _RANK[new] < _RANK[old]


@dataclass(frozen=True)
class History:
    """What the nights before said of each case and vector: the outcomes seen."""

    cases: dict[tuple[str, str, str], set[str]]
    paths: dict[tuple[str, str, str], set[str]]

    @classmethod
    def of(cls, nights: Sequence[Sequence[Run]]) -> History:
        cases: dict[tuple[str, str, str], set[str]] = {}
        paths: dict[tuple[str, str, str], set[str]] = {}
        for runs in nights:
            for (s, h), mine in cells(runs).items():
                for case, outcome in _cases(mine).items():
                    cases.setdefault((s, h, case), set()).add(outcome)
                for key, ps in _vector_paths(mine).items():
                    paths.setdefault((s, h, key), set()).update(ps)
        return cls(cases, paths)

    def flaky_case(self, s: str, h: str, case: str) -> bool:
        seen = self.cases.get((s, h, case), set())
        return "flaky" in seen or {"pass", "fail"} <= seen

    def flaky_path(self, s: str, h: str, key: str) -> bool:
        return len(self.paths.get((s, h, key), set())) > 1


def _latency(old: list[float], new: list[float]) -> str | None:
    if len(old) < MIN_SAMPLES or len(new) < MIN_SAMPLES:
        return None
    qo = statistics.quantiles(old, n=4, method="inclusive")
    qn = statistics.quantiles(new, n=4, method="inclusive")
    mo, mn = statistics.median(old), statistics.median(new)
    if qo[0] <= mn <= qo[2] or qn[0] <= mo <= qn[2]:
        return None
    return (f"median {mo:.3f} -> {mn:.3f} ms ({(mn - mo) / mo * 100:+.0f}%; interquartile "
            f"{qo[0]:.3f}-{qo[2]:.3f} -> {qn[0]:.3f}-{qn[2]:.3f} ms, {len(old)} -> "
            f"{len(new)} samples)")


def compare(old: Sequence[Run], new: Sequence[Run],
            history: History | None = None) -> list[Change]:
    history = history or History({}, {})
    before, after = cells(old), cells(new)
    changes: list[Change] = []
    old_hosts = {h for _, h in before}
    new_hosts = {h for _, h in after}
    for h in sorted(old_hosts - new_hosts):
        lost = sorted(s for s, hh in before if hh == h)
        changes.append(Change("vanished", h, f"host ran {len(lost)} scenario(s) last night "
                              f"({', '.join(lost)}), none tonight", True))
    for h in sorted(new_hosts - old_hosts):
        changes.append(Change("new", h, "host new tonight", False))
    for (s, h), mine in sorted(after.items()):
        where = f"{s} on {h}"
        theirs = before.get((s, h))
        new_cases, messages = _cases(mine), _messages(mine)
        old_cases = _cases(theirs) if theirs else {}
        for case, outcome in sorted(new_cases.items()):
            was = old_cases.get(case)
            what = f"{case}: {messages.get(case, '')}".rstrip(": ")
            if outcome == "flaky" and was != "flaky":
                said = f"; {messages[case]}" if case in messages else ""
                changes.append(Change("flaky", where, f"{case}: its runs tonight disagree "
                                      f"(a retry passed){said}", False))
            elif outcome == "fail" and was != "fail":
                known = history.flaky_case(s, h, case)
                kind = "flaky" if known else "error" if case == "run" else "new failure"
                note = " (seen both ways in the history: flaky)" if known else (
                    "" if was else " (new tonight)")
                changes.append(Change(kind, where, what + note, not known))
            elif outcome == "pass" and was in ("fail", "flaky"):
                changes.append(Change("fixed", where, f"{case} passes (it was {was})", False))
        retried = [f"{vm['name']}: {why}" for r in mine for vm in r.report["vms"]
                   for why in vm.get("retried_boots") or ()]
        if retried:
            changes.append(Change("retried", where, f"{len(retried)} boot(s) never reached "
                                  f"init and were booted again ({'; '.join(retried)})", False))
        if theirs is None:
            if h in old_hosts:
                changes.append(Change("new", where, "scenario new on this host tonight", False))
            continue
        judged = _judged(mine) | _judged(theirs)
        old_paths, new_paths = _vector_paths(theirs), _vector_paths(mine)
        old_numbers, new_numbers = _numbers(theirs), _numbers(mine)
        for key in sorted(set(old_paths) | set(new_paths)):
            a, b = old_paths.get(key), new_paths.get(key)
            if a == b:
                continue
            was, now = " / ".join(a or ["absent"]), " / ".join(b or ["absent"])
            text = f"{key} {was} -> {now}"
            counts = (old_numbers.get(key, "absent"), new_numbers.get(key, "absent"))
            text += f" ({counts[0]} -> {counts[1]})"
            if b is not None and len(b) > 1:
                changes.append(Change("flaky", where, f"{text} (tonight's runs disagree)",
                                      False, s, h, key))
            elif history.flaky_path(s, h, key):
                changes.append(Change("flaky", where, f"{text} (seen both ways in the "
                                      "history)", False, s, h, key))
            elif a and b and len(a) == 1 and _better(a[0], b[0]):
                changes.append(Change("path improved", where, text, False, s, h, key))
            elif (key not in judged and a and b
                  and "not-delivered" in (a[0], b[0])):
                changes.append(Change("path improved", where, f"{text} (no expectation "
                                      "judges this vector)", False, s, h, key))
            else:
                changes.append(Change("path", where, text, True, s, h, key))
        lat_old = [x for r in theirs for x in r.latency_ms]
        lat_new = [x for r in mine for x in r.latency_ms]
        moved = _latency(lat_old, lat_new)
        if moved:
            path = next((r.latency_path for r in mine if r.latency_path), "?")
            changes.append(Change("latency", where, f"ping over {path}: {moved}", False))
    for (s, h) in sorted(set(before) - set(after)):
        if h in new_hosts:
            changes.append(Change("vanished", f"{s} on {h}", "ran last night, not tonight",
                                  True))
    return sorted(changes, key=lambda c: (ORDER.index(c.kind), c.where, c.what))


def format_diff(changes: Sequence[Change], old_label: str, new_label: str) -> str:
    lines = [f"{c.line()}" for c in changes]
    regressions = sum(c.regression for c in changes)
    if not changes:
        lines.append("no change")
    lines.append(f"{'REGRESSION' if regressions else 'OK'}: {regressions} regression(s), "
                 f"{len(changes) - regressions} other change(s) ({old_label} -> {new_label})")
    return "\n".join(lines)


def to_json(changes: Sequence[Change]) -> dict[str, Any]:
    return {"format": "harness-diff/1", "regressions": sum(c.regression for c in changes),
            "changes": [asdict(c) for c in changes]}
