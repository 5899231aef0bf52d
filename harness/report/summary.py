"""The human summary: a per-vector table, the expectations, and the phase timings."""

from __future__ import annotations

from collections.abc import Sequence

from harness.result import RunResult
from harness.verdict import per_cpu_text


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def source_text(kind: str, entry: int | None) -> str:
    """A vector's source, compact: "msix 1", "msi 0", "intx" ("-": not known)."""
    if kind == "intx":
        return "intx"
    name = {"msi-or-msix": "msi(x)"}.get(kind, kind)
    if entry is None:
        return name or "-"
    return f"{name} {entry}" if name else str(entry)


def format_summary(result: RunResult) -> str:
    out = [f"scenario {result.scenario.name}  ({result.run_dir})"]
    for vm in result.vms:
        out.append(f"  {vm.name}: {vm.accel} - {vm.accel_reason}; kernel {vm.kernel_release}")
        out += [f"  {vm.name}: boot {i} never reached init, booted again: {why}"
                for i, why in enumerate(vm.retried_boots, 1)]
    if result.verdicts:
        out.append("")
        out.append(table(
            ["vm", "device", "bdf", "source", "vector", "irq", "guest delta", "per cpu",
             "host delta", "path"],
            [[v.vm, v.device, v.bdf, source_text(v.kind, v.entry), v.name, v.irq,
              v.guest_delta, per_cpu_text(v.per_cpu) if v.guest_delta else "-",
              "-" if v.host_delta is None else v.host_delta,
              v.path.value if v.path else "?"] for v in result.verdicts]))
    if result.host.wiring or result.host.notes:
        out.append("")
        for wire in result.host.wiring:
            where = source_text(str(wire.get("kind", "")), wire.get("entry"))
            out.append(f"  host {wire['bdf']} {where}: {wire['summary']}")
        for note in result.host.notes:
            out.append(f"  host: {note}")
    if result.workloads:
        out.append("")
        for w in result.workloads:
            if w.passed:
                out.append(f"  [ok ] workload {w.vm}: {w.name} ({w.seconds:.1f} s, exit 0)")
                continue
            out.append(f"  [FAIL] {w.message}")
            out += [f"  | {line[:200]}" for line in w.output_tail.splitlines()[-3:]]
    if result.expectations:
        out.append("")
        for e in result.expectations:
            out.append(f"  [{'PASS' if e.passed else 'FAIL'}] {e.message}")
    if result.phases:
        out.append("")
        out.append("  phases: " + ", ".join(f"{p.name} {p.seconds:.2f}s" for p in result.phases)
                   + f"; total {result.total_seconds:.2f}s")
    if result.error is not None:
        out.append("")
        out.append(f"  ERROR: {result.error}")
        for name, tail in result.console_tails.items():
            if tail:
                out.append(f"  --- {name} console (last lines) ---")
                out += [f"  | {line}" for line in tail.splitlines()[-15:]]
    out.append("")
    out.append("PASSED" if result.passed else "FAILED")
    return "\n".join(out)
