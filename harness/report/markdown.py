"""A Markdown summary of a run or a merge, for CI job summaries (GitHub's
``$GITHUB_STEP_SUMMARY``; on GitLab, an artifact exposed on the merge request): the verdict,
the scenario x host matrix with each cell's paths, every failure with its evidence folded
under it, and the night-to-night diff when there is one.  Bounded (GitHub takes 1 MiB per
step): evidence past the budget is cut, with a pointer to the page and report.json.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from harness.report import junit

BUDGET = 512 * 1024
_MARK = {"pass": "✅ pass", "fail": "❌ fail", "error": "❌ error", "flaky": "⚠️ flaky"}


def _cell(c: dict[str, Any] | None) -> str:
    if c is None:
        return "–"
    paths = Counter(c["vectors"].values())
    what = ", ".join(f"{p} {n}" for p, n in sorted(paths.items()) if p != "not-delivered")
    lab = " (lab)" if c["lab"] else ""
    return f"{_MARK.get(c['outcome'], c['outcome'])}{lab}" + (f": {what}" if what else "")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(merged: dict[str, Any], title: str, diff_text: str | None = None,
           regressions: int = 0) -> str:
    ok = merged["passed"]
    flaky = merged.get("flaky", [])
    out = [f"## {title}: {'✅ PASSED' if ok else '❌ FAILED'}"
           f"{f' ({len(flaky)} flaky)' if flaky else ''}"
           f"{f', ❌ {regressions} regression(s) since the last night' if regressions else ''}",
           "",
           f"{len(merged['runs'])} run(s) of {len(merged['scenarios'])} scenario(s) on "
           f"{len(merged['hosts'])} host(s).", ""]
    if merged.get("retried_boots"):
        out += ["⚠️ boots that never reached init and were booted again: "
                + ", ".join(_md(b) for b in merged["retried_boots"]), ""]
    if diff_text:
        out += ["### Since the last night", "", "```", diff_text.rstrip(), "```", ""]
    hosts = merged["hosts"]
    out += ["| scenario | " + " | ".join(_md(h) for h in hosts) + " |",
            "| --- |" + " --- |" * len(hosts)]
    for s in merged["scenarios"]:
        out.append(f"| {_md(s)} | " + " | ".join(_md(_cell(merged["matrix"][s][h]))
                                                 for h in hosts) + " |")
    out += ["", "Vectors by path: " + ", ".join(f"{p} {n}" for p, n
                                                 in merged["vector_paths"].items()), ""]
    failures = []
    for run in merged["runs"]:
        r = run["report"]
        where = f"{run['runner']}{' (lab)' if run['lab'] else ''} / {run['scenario']}"
        for e in r["expectations"]:
            if not e["passed"]:
                failures.append((f"{where}: {e['message']}", junit.evidence(r, e)))
        for w in r["workloads"]:
            if not w.get("passed", w["exit_status"] == 0):
                failures.append((f"{where}: {w.get('message') or w['name']}",
                                 str(w.get("output_tail", ""))))
        if r["error"]:
            failures.append((f"{where}: error: {r['error']['message']}",
                             "\n".join(junit.tail_lines(r))))
    if failures:
        out += ["### Failures", ""]
        used = sum(len(line.encode()) + 1 for line in out)
        for n, (headline, body) in enumerate(failures):
            line = f"- **{_md(headline)}**"
            if used + len(line.encode()) > BUDGET:
                out.append(f"- ... and {len(failures) - n} more: see the page")
                break
            out.append(line)
            used += len(line.encode()) + 1
            block = ["  <details><summary>evidence</summary>", "", "  ```",
                     *(f"  {line}" for line in body.rstrip().splitlines()), "  ```",
                     "  </details>"]
            size = sum(len(line.encode()) + 1 for line in block)
            if used + size < BUDGET * 3 // 4:  # the rest keeps room for more headlines
                out += block
                used += size
            else:
                out.append("  (evidence cut here: see the page and report.json)")
        out.append("")
    if flaky:
        out += ["### Flaky (a retry disagreed)", "", *(f"- {f}" for f in flaky), ""]
    return "\n".join(out) + "\n"
