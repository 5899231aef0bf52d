"""One self-contained HTML page per run or per merge: what an on-call engineer opens first.

The page needs nothing but itself: styles inline, plots as inline SVG drawn by matplotlib
(no script, no font, no image is fetched; the one script is a few lines that open the
evidence a link points at).  It shows, in order: the failures with links to their evidence;
the scenario x host matrix, each cell's vectors coloured by delivery path; the latency
distribution per path where workloads measured round trips; then one section per run with
the guest's and the host's counts per vector side by side (plot and table), each
expectation with the evidence behind its verdict, the workloads, the host's notes and the
console tails.
"""

from __future__ import annotations

import html
import io
import re
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from harness.report import junit

# One colour per delivery path (ColorBrewer's diverging RdYlBu and friends: distinct for the
# common kinds of colour blindness); text on each stays readable.
PATH_COLOURS = {
    "posted": "#1a9850",
    "irqfd-bounce": "#fdae61",
    "userspace-bounce": "#d73027",
    "emulated": "#4575b4",
    "not-delivered": "#bdbdbd",
    "no path": "#7b3294",
}
OUTCOME_COLOURS = {"pass": "#1a9850", "fail": "#d73027", "error": "#d73027",
                   "flaky": "#fdae61"}
GUEST_COLOUR, HOST_COLOUR = "#4575b4", "#f46d43"

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#222}
header{padding:12px 20px;color:#fff} header h1{margin:0;font-size:20px}
main{padding:0 20px 40px} h2{border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 6px;
vertical-align:top;text-align:left} th{background:#f3f3f3}
.chip{display:inline-block;margin:1px;padding:0 5px;border-radius:3px;font-size:12px;
color:#000;white-space:nowrap;text-decoration:none}
.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-weight:bold}
pre{background:#f7f7f7;border:1px solid #ddd;padding:6px;overflow-x:auto;font-size:12px;
white-space:pre}
details{margin:4px 0} summary{cursor:pointer}
.side{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.legend .chip{font-size:13px} .fail{color:#b2182b;font-weight:bold}
section.run{border:1px solid #ccc;border-radius:4px;padding:0 12px;margin:12px 0}
"""

# Following a link to evidence opens the <details> it is in, or that it is (a run's section:
# its first), and shows it.  Nothing else runs.
_SCRIPT = """
function openTarget(){var t=document.getElementById(decodeURIComponent(location.hash.slice(1)));
if(!t){return;}var d=t.tagName==='DETAILS'?t:t.querySelector('details');if(d){d.open=true;}
for(var e=t;e;e=e.parentElement){if(e.tagName==='DETAILS'){e.open=true;}}t.scrollIntoView();}
window.addEventListener('hashchange',openTarget);window.addEventListener('load',openTarget);
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def anchor(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(str(p) for p in parts)).strip("-")


def chip(path: str | None, text: str, href: str | None = None, title: str = "",
         changed: bool = False) -> str:
    colour = PATH_COLOURS.get(path or "no path", "#eeeeee")
    style = f"background:{colour}" + (";outline:3px solid #000;font-weight:bold"
                                      if changed else "")
    if href:
        return (f'<a class="chip" style="{style}" href="#{esc(href)}" '
                f'title="{esc(title)}">{esc(text)}</a>')
    return f'<span class="chip" style="{style}" title="{esc(title)}">{esc(text)}</span>'


def badge(outcome: str) -> str:
    return (f'<span class="badge" style="background:{OUTCOME_COLOURS.get(outcome, "#777")}">'
            f"{esc(outcome.upper())}</span>")


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=96)


def counts_svg(vectors: Sequence[dict[str, Any]]) -> str:
    """Guest and host interrupts per vector, side by side (horizontal bars)."""
    import matplotlib

    rows = list(vectors)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "harness",
                                "font.size": 9}):
        fig = _figure(5.2, 0.45 * len(rows) + 0.9)
        ax = fig.add_subplot()
        ys = range(len(rows))
        guest = [v["evidence"]["guest_delta"] for v in rows]
        host = [v["evidence"]["host_delta"] or 0 for v in rows]
        ax.barh([y - 0.2 for y in ys], guest, height=0.4, color=GUEST_COLOUR, label="guest")
        ax.barh([y + 0.2 for y in ys], host, height=0.4, color=HOST_COLOUR, label="host")
        for y, v in zip(ys, rows, strict=True):
            if v["evidence"]["host_delta"] is None:
                ax.text(0, y + 0.2, " host: -", va="center", fontsize=8, color="#555")
        ax.set_yticks(list(ys), [f"{v['key']} ({v['path'] or 'no path'})" for v in rows])
        for label, v in zip(ax.get_yticklabels(), rows, strict=True):
            label.set_color("#000")
            label.set_bbox({"facecolor": PATH_COLOURS.get(v["path"] or "no path"),
                            "edgecolor": "none", "pad": 1.5})
        ax.invert_yaxis()
        ax.set_xlabel("interrupts in the measurement window")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, fontsize=8,
                  frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        return _svg(fig)


def latency_svg(samples: dict[str, list[float]]) -> str:
    """Round-trip distributions per delivery path: box plots over every sample."""
    import matplotlib

    labels = sorted(samples)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "harness",
                                "font.size": 9}):
        fig = _figure(6.5, 0.6 * len(labels) + 1.0)
        ax = fig.add_subplot()
        box = ax.boxplot([samples[k] for k in labels], orientation="horizontal",
                         patch_artist=True, showfliers=True, widths=0.5,
                         flierprops={"markersize": 2, "alpha": 0.5})
        for patch, label in zip(box["boxes"], labels, strict=True):
            patch.set_facecolor(PATH_COLOURS.get(label.split(" ")[0].split("+")[0], "#ccc"))
        ax.set_yticks(range(1, len(labels) + 1), labels)
        ax.set_xscale("log")
        ax.set_xlabel("ping round trip, ms (log scale)")
        ax.spines[["top", "right"]].set_visible(False)
        return _svg(fig)


def latency_groups(runs: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for run in runs:
        if run.get("latency_ms") and run.get("latency_path"):
            label = f"{run['latency_path']} ({run['scenario']} on {run['runner']})"
            groups.setdefault(label, []).extend(run["latency_ms"])
    return groups


def _stats(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{len(xs)} sample(s)"
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return (f"n={len(xs)}, p50 {statistics.median(xs):.3f} ms, p90 {q[89]:.3f} ms, "
            f"p99 {q[98]:.3f} ms, max {max(xs):.3f} ms")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def run_anchor(run: dict[str, Any]) -> str:
    return anchor("run", run["run_id"])


def expectation_anchor(run: dict[str, Any], e: dict[str, Any]) -> str:
    return anchor("run", run["run_id"], "expect", e["index"])


def _failures(runs: Sequence[dict[str, Any]]) -> list[str]:
    items = []
    for run in runs:
        r = run["report"]
        where = f"{run['runner']}{' (lab)' if run['lab'] else ''} / {run['scenario']}"
        for e in r["expectations"]:
            if not e["passed"]:
                items.append(f'<li class="fail"><a href="#{expectation_anchor(run, e)}">'
                             f"{esc(where)}: {esc(e['message'])}</a></li>")
        for w in r["workloads"]:
            if not w.get("passed", w["exit_status"] == 0):
                items.append(f'<li class="fail"><a href="#{run_anchor(run)}">{esc(where)}: '
                             f"{esc(w.get('message') or w['name'])}</a></li>")
        if r["error"]:
            items.append(f'<li class="fail"><a href="#{run_anchor(run)}">{esc(where)}: '
                         f"error: {esc(r['error']['message'])}</a></li>")
    return items


def _matrix(merged: dict[str, Any], marks: dict[tuple[str, str, str], str]) -> str:
    by_id = {run["run_id"]: run for run in merged["runs"]}
    rows = []
    for s in merged["scenarios"]:
        cells = [f"<th>{esc(s)}</th>"]
        for h in merged["hosts"]:
            c = merged["matrix"][s][h]
            if c is None:
                cells.append('<td style="color:#999">not run</td>')
                continue
            first = by_id[c["runs"][0]]
            links = " ".join(f'<a href="#{run_anchor(by_id[i])}">run {n}</a>'
                             for n, i in enumerate(c["runs"], start=1))
            chips = "".join(chip(p if " / " not in p else "no path",
                                 f"{k} {p}" + (" (changed)" if (s, h, k) in marks else ""),
                                 anchor("run", first["run_id"], "vector", k),
                                 marks.get((s, h, k), p), changed=(s, h, k) in marks)
                            for k, p in c["vectors"].items())
            lab = " <small>lab</small>" if c["lab"] else ""
            cells.append(f"<td>{badge(c['outcome'])}{lab} <small>{links}</small><br>{chips}"
                         "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>scenario \\ host</th>" + "".join(f"<th>{esc(h)}</th>"
                                                    for h in merged["hosts"]) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _run_section(run: dict[str, Any]) -> str:
    r = run["report"]
    ok = run["passed"]
    where = f"{run['runner']}{' (lab: L1 ' + run['lab'] + ')' if run['lab'] else ''}"
    out = [f'<section class="run" id="{run_anchor(run)}"><details{" open" if not ok else ""}>',
           f"<summary><h3 style=\"display:inline\">{badge('pass' if ok else 'fail')} "
           f"{esc(r['scenario']['name'])} on {esc(where)}</h3> <small>started "
           f"{esc(r.get('started'))}, {r.get('total_seconds', 0):.1f} s, run "
           f"{esc(run['run_id'])}</small></summary>"]
    if r["vms"]:
        out.append("<p>" + "<br>".join(
            f"{esc(vm.get('name'))}: {esc(vm.get('arch', '?'))}, {esc(vm.get('accel'))} "
            f"({esc(vm.get('accel_reason'))}), kernel {esc(vm.get('kernel_release'))}"
            + "".join(f"<br>boot {i} never reached init, booted again: {esc(why)}"
                      for i, why in enumerate(vm.get("retried_boots") or (), 1))
            for vm in r["vms"]) + "</p>")
    if r["vectors"]:
        rows = []
        for v in r["vectors"]:
            vid = anchor("run", run["run_id"], "vector", v["key"])
            cells = [esc(c) for c in junit.vector_rows([v])[0]]
            cells[7] = chip(v["path"], v["path"] or "no path")
            rows.append([f'<span id="{vid}">{cells[0]}</span>', *cells[1:]])
        out.append('<div class="side"><div>' + counts_svg(r["vectors"]) + "</div><div>"
                   + _table(junit.VECTOR_HEADERS, rows) + "</div></div>")
    for e in r["expectations"]:
        eid = expectation_anchor(run, e)
        out.append(f'<details id="{eid}"{" open" if not e["passed"] else ""}><summary>'
                   f"{badge('pass' if e['passed'] else 'fail')} {esc(e['name'])}</summary>"
                   f"<pre>{esc(junit.evidence(r, e))}</pre></details>")
    if r["workloads"]:
        out.append(_table(["workload", "vm", "seconds", "result"], [
            [esc(w["name"]), esc(w["vm"]), f"{w['seconds']:.2f}",
             esc(w.get("message", "")) if not w.get("passed", w["exit_status"] == 0)
             else "exit 0"] for w in r["workloads"]]))
    if run.get("latency_ms"):
        out.append(f"<p>ping round trips over {esc(run['latency_path'])}: "
                   f"{esc(_stats(run['latency_ms']))}</p>")
    if r["phases"]:
        out.append("<p><small>phases: " + esc(", ".join(
            f"{p['name']} {p['seconds']:.2f} s" for p in r["phases"])) + "</small></p>")
    tail = junit.tail_lines(r)
    if tail:
        out.append(f"<details{' open' if not ok else ''}><summary>host, workloads, "
                   f"console</summary><pre>{esc(chr(10).join(tail))}</pre></details>")
    out.append("</details></section>")
    return "\n".join(out)


def render(merged: dict[str, Any], title: str, diff_text: str | None = None,
           regressions: int = 0, marks: dict[tuple[str, str, str], str] | None = None) -> str:
    """The page; ``marks``: vectors whose path changed since the last night (scenario, host
    column, vector key -> what changed), outlined in the matrix."""
    runs = merged["runs"]
    failed = _failures(runs)
    ok = merged["passed"]
    colour = OUTCOME_COLOURS["pass" if ok and not regressions else "fail"]
    flaky = len(merged.get("flaky", []))
    verdict = ("PASSED" if ok else "FAILED") + (f" ({flaky} flaky)" if flaky else "") + (
        f", {regressions} regression(s) since the last night" if regressions else "")
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    legend = " ".join(chip(p, p) for p in PATH_COLOURS)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script>",
        f'</head><body><header style="background:{colour}"><h1 id="verdict">{esc(title)}: '
        f"{verdict}</h1><div>{len(runs)} run(s) of "
        f"{len(merged['scenarios'])} scenario(s) on {len(merged['hosts'])} host(s); "
        f"generated {esc(generated)}</div></header><main>",
    ]
    if failed:
        parts.append('<h2 id="failures">Failures</h2><ul>' + "".join(failed) + "</ul>")
    if merged.get("flaky"):
        parts.append("<h2>Flaky (a retry disagreed)</h2><ul>" + "".join(
            f"<li>{esc(f)}</li>" for f in merged["flaky"]) + "</ul>")
    if merged.get("retried_boots"):
        parts.append("<h2>Retried boots (never reached init, booted again)</h2><ul>" + "".join(
            f"<li>{esc(f)}</li>" for f in merged["retried_boots"]) + "</ul>")
    if diff_text:
        parts.append(f'<h2 id="diff">Since the last night</h2><pre>{esc(diff_text)}</pre>')
    parts.append(f'<h2 id="matrix">Scenario x host</h2><p class="legend">{legend}</p>'
                 + _matrix(merged, marks or {}))
    parts.append("<p>vectors by path: " + " ".join(
        chip(p, f"{p} {n}") for p, n in merged["vector_paths"].items()) + "</p>")
    groups = latency_groups(runs)
    if groups:
        parts.append('<h2 id="latency">Latency per delivery path</h2>' + latency_svg(groups)
                     + "<ul>" + "".join(f"<li>{esc(k)}: {esc(_stats(v))}</li>"
                                        for k, v in sorted(groups.items())) + "</ul>")
    parts.append('<h2 id="runs">Runs</h2>')
    parts += [_run_section(run) for run in runs]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
