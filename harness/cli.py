"""The ``harness`` command: argv -> a typed request -> a library call -> an exit code.

This is the only module that prints or exits.  Exit codes: 0 passed, 1 a run failed its
expectations or workloads, 2 bad input (config, usage), 3 the host cannot do it, 4 the guest or
QEMU failed, 130 interrupted.  Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from harness import manual_cli
from harness.errors import HarnessError, Interrupted, OutputError, UsageError
from harness.platform import Arch
from harness.report.command import ReportRequest
from harness.report.command import add_parsers as add_report_parsers
from harness.report.command import handle as handle_report
from harness.report.command import request as report_request


@dataclass(frozen=True)
class RunRequest:
    scenario: Path
    out: Path | None
    verbose: bool
    force_bind: bool = False
    only: tuple[str, ...] = ()  # scenario names of the file to run (empty: all)


@dataclass(frozen=True)
class ValidateRequest:
    files: tuple[Path, ...]


@dataclass(frozen=True)
class SchemaRequest:
    pass


@dataclass(frozen=True)
class IrqDiffRequest:
    before: Path
    after: Path
    as_json: bool
    all_rows: bool


@dataclass(frozen=True)
class ImageBuildRequest:
    recipe: str | None
    arch: str | None
    refresh: bool = False


@dataclass(frozen=True)
class BenchRequest:
    scenario: Path
    out: Path | None
    repeat: int
    vms: tuple[int, ...] = (1, 2, 4)  # copies of the scenario's VMs in the scaling table


@dataclass(frozen=True)
class PreflightRequest:
    devices: tuple[str, ...]
    as_json: bool
    root: Path
    record: Path | None = None


@dataclass(frozen=True)
class RestoreRequest:
    journal: Path | None
    force: bool


@dataclass(frozen=True)
class LabRunRequest:
    scenario: Path
    out: Path | None
    bench: bool = False


@dataclass(frozen=True)
class LabShellRequest:
    out: Path | None
    arch: str | None = None


@dataclass(frozen=True)
class TraceRequest:
    duration: float | None
    json_out: Path | None
    quiet: bool


Request = (RunRequest | ValidateRequest | SchemaRequest | IrqDiffRequest | ImageBuildRequest
           | BenchRequest | TraceRequest | LabRunRequest | LabShellRequest | PreflightRequest
           | RestoreRequest | ReportRequest)


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run_dir(out: Path | None, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out if out is not None else Path("runs")
    path = base / f"{name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{name}-{stamp}-{suffix}"
    return path


def handle_run(req: RunRequest) -> int:
    """Every scenario of the file, in order; the exit code is the worst of them."""
    from harness.config import load_scenarios
    from harness.report.json_report import write_json
    from harness.report.junit import write_junit
    from harness.report.summary import format_summary
    from harness.runner import run_scenario

    codes = []
    scenarios = load_scenarios(req.scenario)
    unknown = sorted(set(req.only) - {s.name for s in scenarios})
    if unknown:
        raise UsageError(f"{req.scenario}: no scenario named {', '.join(unknown)} (it has "
                         f"{', '.join(s.name for s in scenarios)})")
    for scenario in scenarios:
        if req.only and scenario.name not in req.only:
            continue
        run_dir = _make_run_dir(req.out, scenario.name)
        _progress(f"scenario {scenario.name}: run folder {run_dir}")
        result = run_scenario(scenario, str(req.scenario), run_dir, _progress,
                              force_bind=req.force_bind)
        summary = format_summary(result)
        # Each report is complete or absent: written aside, then renamed into place.
        report = _write_aside(run_dir / "report.json", functools.partial(write_json, result))
        _write_aside(run_dir / "junit.xml", functools.partial(write_junit, result))
        _write_aside(run_dir / "summary.txt", functools.partial(_write_text, summary + "\n"))
        print(summary)
        print(f"report: {report}\n", flush=True)
        codes.append(result.error.exit_code if result.error is not None
                     else 0 if result.passed else 1)
        if isinstance(result.error, Interrupted):
            break  # the scenarios after it are not started
    return max(codes)


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)


def _make_run_dir(out: Path | None, name: str) -> Path:
    """A new run folder under ``out``; an --out that cannot hold one is bad input."""
    path = _run_dir(out, name)
    try:
        path.mkdir(parents=True)
        (path / ".writable").write_bytes(b"")
        (path / ".writable").unlink()
    except OSError as exc:
        raise UsageError(f"--out {out or Path('runs')}: cannot write a run folder there: "
                         f"{exc.strerror}") from exc
    return path


def _write_aside(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` into a temporary name beside ``path``, then rename it into place; a failure
    (a full disk) leaves no partial file and is one line, exit 4."""
    aside = path.with_name(f".{path.name}.part")
    try:
        write(aside)
        os.replace(aside, path)
    except OSError as exc:
        aside.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
    return path


def handle_validate(req: ValidateRequest) -> int:
    from harness.config import load_scenarios

    for path in req.files:
        for scenario in load_scenarios(path):
            print(f"{path}: ok ({scenario.name}: {len(scenario.vms)} VM(s), "
                  f"{len(scenario.workloads)} workload(s), {len(scenario.expect)} "
                  "expectation(s))")
    return 0


def handle_schema(req: SchemaRequest) -> int:
    from harness.config import scenario_json_schema

    print(json.dumps(scenario_json_schema(), indent=2, sort_keys=True))
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from exc


def handle_irq_diff(req: IrqDiffRequest) -> int:
    from harness.interrupts import format_table, parse_proc_interrupts

    before = parse_proc_interrupts(_read(req.before), source=str(req.before))
    after = parse_proc_interrupts(_read(req.after), source=str(req.after))
    delta = before.delta(after)
    if req.as_json:
        print(json.dumps(delta.to_dict(), indent=2))
    else:
        print(format_table(delta, changed_only=not req.all_rows))
    return 0


def handle_image_build(req: ImageBuildRequest) -> int:
    from harness.images.builder import ensure_image, guest_images_dir
    from harness.platform import platform_for, recipe_platform

    if req.recipe is not None:
        known = sorted(p.parent.name for p in guest_images_dir().glob("*/packages.txt"))
        if req.recipe not in known:
            raise UsageError(f"no image recipe {req.recipe!r}; the recipes are "
                             f"{', '.join(known)}")
    if req.recipe is None:
        platform = platform_for(req.arch)
        recipe = platform.recipes[0]
    else:
        recipe, platform = req.recipe, recipe_platform(req.recipe)
        if req.arch is not None and platform is not platform_for(req.arch):
            raise UsageError(f"recipe {recipe} is made of {platform.arch} packages, "
                             f"not {req.arch}")
    image = ensure_image(recipe, platform, progress=_progress, refresh=req.refresh)
    print(f"kernel {image.kernel}\ninitrd {image.initrd}\nrelease {image.kernel_release}")
    if platform.lab.recipe == recipe and platform.lab.userland is not None:
        from harness.images.userland import ensure_userland

        userland = ensure_userland(platform.lab.userland, platform, _progress,
                                   refresh=req.refresh)
        print(f"root {userland.root}")
    return 0


def handle_bench(req: BenchRequest) -> int:
    from harness.bench import format_bench, run_bench
    from harness.config import load_scenario

    scenario = load_scenario(req.scenario)
    bench = run_bench(scenario, str(req.scenario), _run_dir(req.out, f"bench-{scenario.name}"),
                      req.repeat, _progress, req.vms)
    print(format_bench(bench))
    return 0 if bench.all_passed else 1


def handle_trace(req: TraceRequest) -> int:
    from harness.bypass.live import bypass_session, describe, watch
    from harness.bypass.tracker import BypassTracker
    from harness.interrupts import parse_proc_interrupts
    from harness.report.summary import table

    tracker = BypassTracker()
    session = bypass_session()
    until = None if req.duration is None else time.monotonic() + req.duration
    with session:
        # vfio vectors that exist now were registered before the probes: their pairing was
        # not seen, and is reported as unknown rather than as absent.
        start = parse_proc_interrupts(Path("/proc/interrupts").read_text(), "/proc/interrupts")
        preexisting = frozenset(line.label for line in start.lines if line.vector is not None
                                and any(a.startswith("vfio-") for a in line.actions))
        for note in session.skipped:
            _progress(f"not traced: {note}")
        _progress(f"tracing {len(session.added)} probes and "
                  f"{len(session.enabled_tracepoints)} tracepoints; Ctrl-C to stop")
        try:
            watch(session, tracker, until,
                  on_record=(lambda r: None) if req.quiet
                  else (lambda r: print(describe(r), flush=True)))
        except KeyboardInterrupt:
            pass
    _progress("probes removed")
    interrupts = parse_proc_interrupts(Path("/proc/interrupts").read_text(), "/proc/interrupts")
    wiring = tracker.wiring(interrupts, before_trace=preexisting)
    if wiring:
        print(table(["device", "entry", "host irq", "wiring"],
                    [[w.bdf, w.entry, w.host_irq, w.describe()] for w in wiring]))
    else:
        print("no vfio vectors in /proc/interrupts now")
    for anomaly in tracker.anomalies:
        print(f"ANOMALY {anomaly.kind}: {anomaly.message}")
    if req.json_out is not None:
        req.json_out.write_text(json.dumps(
            {"wiring": [w.to_dict() for w in wiring], **tracker.summary()}, indent=2) + "\n")
        print(f"wiring: {req.json_out}")
    return 0


def handle_lab_run(req: LabRunRequest) -> int:
    from harness.config import load_scenarios
    from harness.lab.l1 import LabBoot, lab_platform, run_in_lab, scenario_recipes

    scenarios = load_scenarios(req.scenario)  # bad input fails here, before L1 boots
    platform = lab_platform(req.scenario, scenarios)
    run_dir = _run_dir(req.out, f"lab-{scenarios[0].name}")
    _progress(f"lab: run folder {run_dir}")
    # L1 sees the file where it is here, or (an L1 on a root of its own) in the run folder.
    scenario_file = str(req.scenario.resolve())
    if platform.lab.userland is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(req.scenario, run_dir / "scenario.yaml")
        scenario_file = "/lab/scenario.yaml"
    # One L1 boot per run of consecutive scenarios that want the same L1.
    boots: list[LabBoot] = []
    for scenario in scenarios:
        wanted, recipes = scenario.lab, scenario_recipes(scenario, platform)
        if boots and (boots[-1].append, boots[-1].devices) == (wanted.append, wanted.devices):
            boots[-1] = dataclasses.replace(
                boots[-1], args=(*boots[-1].args, "--only", scenario.name),
                recipes=tuple(dict.fromkeys((*boots[-1].recipes, *recipes))))
        else:
            boots.append(LabBoot(("run", scenario_file, "--out", "/lab", "--only",
                                  scenario.name), wanted.append, devices=wanted.devices,
                                 recipes=recipes))
    lab = run_in_lab(platform, boots, run_dir, _progress)
    for folder in lab.inner_runs:
        print((folder / "summary.txt").read_text() if (folder / "summary.txt").exists()
              else f"{folder}: no summary")
    if req.bench:
        from harness.lab.bench import format_lab_bench

        print(format_lab_bench(lab))
    for note in lab.notes:
        print(f"lab: {note}")
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in lab.phases)
    print(f"lab: {phases}; total {lab.total_seconds:.1f}s; L1 console {run_dir}/"
          f"lab-l1.console.log")
    if len(lab.inner_runs) != len(scenarios):
        print(f"lab: {len(scenarios)} scenario(s) but {len(lab.inner_runs)} report(s): see "
              f"{run_dir}/l1-job.log", file=sys.stderr)
        return max(lab.exit_status or 1, 1)
    return lab.exit_status if lab.exit_status is not None else 1


def handle_lab_shell(req: LabShellRequest) -> int:
    from harness.lab.l1 import shell
    from harness.platform import platform_for

    run_dir = _run_dir(req.out, "lab-shell")
    return shell(_progress, run_dir, platform_for(req.arch))


def handle_preflight(req: PreflightRequest) -> int:
    """Exit 0 when every named device can be assigned; 3 when one cannot."""
    from harness.host.preflight import DeviceVerdict, format_preflight, preflight, preflight_json
    from harness.interrupts import normalize_bdf

    for bdf in req.devices:
        try:
            normalize_bdf(bdf)
        except ValueError as exc:
            raise UsageError(f"--device {bdf}: {exc}") from exc
    if not req.root.is_dir():
        raise UsageError(f"--root {req.root}: not a folder (a recorded host tree is one)")

    probe = None
    if req.root == Path("/"):  # boot the cached guest kernel: it prints its banner first
        from harness.host.accel import kvm_probe
        from harness.images.builder import cache_root, cached_kernel
        from harness.platform import host_platform

        probe = kvm_probe(cached_kernel(host_platform()), cache_root())
    view = None
    if req.record is not None:
        from harness.host.view import RecordingHostView

        if req.root != Path("/"):
            raise UsageError("--record records this host: it cannot be used with --root")
        view = RecordingHostView(req.record)
    report = preflight(req.root, req.devices, accel_probe=probe, view=view)
    if req.record is not None:
        _progress(f"recorded what preflight read into {req.record} (read it back with "
                  f"--root {req.record})")
    print(preflight_json(report) if req.as_json else format_preflight(report))
    return 3 if any(d.verdict == DeviceVerdict.CANNOT_ASSIGN for d in report.devices) else 0


def handle_restore(req: RestoreRequest) -> int:
    """Bindings of crashed runs back to their drivers; their leftover kprobes removed."""
    from harness.bypass.tracker import GROUP
    from harness.host.binding import DEFAULT_JOURNAL, restore_all
    from harness.host.tracefs import remove_stale_sessions

    journal = req.journal or DEFAULT_JOURNAL
    results = restore_all(journal, force=req.force)
    for group in remove_stale_sessions(GROUP):
        print(f"removed the kprobes and trace instance {group} of a harness that is gone")
    from harness.images.builder import sweep_builds
    from harness.scratch import sweep

    for path in sweep() + sweep_builds():
        print(f"removed {path}, left by a harness or an image build that was killed")
    if not results:
        print(f"nothing to restore ({journal} lists no binding)")
    for r in results:
        print(f"{r.bdf}: {r.outcome}{': ' + r.detail if r.detail else ''}")
    return 0 if all(r.ok for r in results) else 3


HANDLERS: dict[type, Callable[..., int]] = {
    RunRequest: handle_run, ValidateRequest: handle_validate, SchemaRequest: handle_schema,
    IrqDiffRequest: handle_irq_diff, ImageBuildRequest: handle_image_build,
    BenchRequest: handle_bench, TraceRequest: handle_trace, LabRunRequest: handle_lab_run,
    LabShellRequest: handle_lab_shell, PreflightRequest: handle_preflight,
    RestoreRequest: handle_restore, ReportRequest: handle_report,
}


# --- experiments by hand (harness.manual_cli): up, down, ssh, qmp, console -------------------


def _write_reports(result: Any, run_dir: Path) -> Path:
    """report.json, junit.xml and summary.txt of a run, as ``harness run`` writes them; the
    summary printed."""
    from harness.report.json_report import write_json
    from harness.report.junit import write_junit
    from harness.report.summary import format_summary

    summary = format_summary(result)
    report = _write_aside(run_dir / "report.json", functools.partial(write_json, result))
    _write_aside(run_dir / "junit.xml", functools.partial(write_junit, result))
    _write_aside(run_dir / "summary.txt", functools.partial(_write_text, summary + "\n"))
    print(summary)
    return report


def handle_up(req: manual_cli.UpRequest) -> int:
    return manual_cli.handle_up(req, _progress, _make_run_dir, _write_reports)


HANDLERS.update(manual_cli.HANDLERS)
HANDLERS[manual_cli.UpRequest] = handle_up
HANDLERS[manual_cli.LabUpRequest] = functools.partial(manual_cli.handle_lab_up,
                                                      progress=_progress, run_dir_for=_run_dir)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def parse_args(argv: Sequence[str]) -> tuple[Request | manual_cli.Request, bool]:
    parser = _Parser(prog="harness", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging to stderr")
    parser.add_argument("--shared-host", action="store_true",
                        help="refuse scenarios that name their own qemu: or extra_args: (for "
                             "CI on hosts shared between users; also HARNESS_SHARED_HOST=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run a scenario and report per-vector verdicts")
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path, help="parent folder of the run folder (default ./runs)")
    p.add_argument("--force-bind", action="store_true",
                   help="bind assigned devices to vfio-pci even if the host uses them (or a "
                        "member of their IOMMU group)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only the scenario of this name (repeatable; default: all)")

    p = sub.add_parser("validate", help="check scenario files without running them")
    p.add_argument("files", type=Path, nargs="+")

    sub.add_parser("schema", help="print the scenario format's JSON Schema")

    irq = sub.add_parser("irq", help="/proc/interrupts tools")
    irq_sub = irq.add_subparsers(dest="irq_command", required=True, parser_class=_Parser)
    p = irq_sub.add_parser("diff", help="per-vector deltas between two saved captures")
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--json", action="store_true", dest="as_json")
    p.add_argument("--all", action="store_true", dest="all_rows", help="also unchanged rows")
    manual_cli.add_irq_parsers(irq_sub)

    image = sub.add_parser("image", help="guest images")
    image_sub = image.add_subparsers(dest="image_command", required=True, parser_class=_Parser)
    p = image_sub.add_parser("build", help="build (or find cached) a guest image")
    p.add_argument("recipe", nargs="?", default=None,
                   help="a folder under guest-images/ (default: the architecture's first)")
    p.add_argument("--arch", choices=[a.value for a in Arch], default=None,
                   help="guest architecture (default: this host's)")
    p.add_argument("--refresh", action="store_true",
                   help="resolve the packages again even if apt's index has not changed")

    p = sub.add_parser("bench", help="time each phase of a scenario against a bare kernel boot")
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--vms", default="1,2,4", metavar="N,N,...",
                   help="copies of the scenario's VMs to time side by side (default: 1,2,4)")

    p = sub.add_parser("trace", help="live view of the kernel's IRQ bypass events (kprobes)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--json", type=Path, dest="json_out", help="write the final wiring here")
    p.add_argument("--quiet", action="store_true", help="no per-event lines")

    p = sub.add_parser("preflight", help="what this host can do: KVM, IOMMU, interrupt "
                       "remapping, posting; per device: can it be assigned, can it post")
    p.add_argument("--device", action="append", default=[], metavar="BDF",
                   help="a PCI device to judge (repeatable)")
    p.add_argument("--json", action="store_true", dest="as_json")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="read a recorded host tree instead of this host")
    p.add_argument("--record", type=Path, metavar="DIR",
                   help="also copy every file and command output preflight reads into DIR: "
                        "a recorded tree for --root")

    p = sub.add_parser("restore", help="give devices a crashed run bound to vfio-pci back "
                       "to their drivers")
    p.add_argument("--journal", type=Path)
    p.add_argument("--force", action="store_true",
                   help="also restore devices whose owning harness still runs")

    add_report_parsers(sub, _Parser)  # merge, page, diff, store: harness/report/command.py

    lab = sub.add_parser("lab", help="the virtual lab: VFIO assignment with no hardware")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    p = lab_sub.add_parser("run", help="run a scenario inside the emulated host (L1)")
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path, help="parent folder of the run folder (default ./runs)")
    p.add_argument("--bench", action="store_true", help="also print the phase and ping "
                   "latency figures of each path, and their ratio")
    manual_cli.add_lab_parsers(lab_sub)
    p = lab_sub.add_parser("shell", help="a root shell in the emulated host (L1)")
    p.add_argument("--out", type=Path)
    p.add_argument("--arch", choices=[a.value for a in Arch], default=None,
                   help="the emulated host's architecture (default: this machine's)")

    manual_cli.add_parsers(sub)

    words, command = manual_cli.split_command(argv)
    ns = parser.parse_args(words)
    manual = manual_cli.request_of(ns, command)
    if manual is not None:
        return manual, ns.verbose
    request: Request
    if ns.command == "run":
        request = RunRequest(ns.scenario, ns.out, ns.verbose, ns.force_bind, tuple(ns.only))
    elif ns.command == "validate":
        request = ValidateRequest(tuple(ns.files))
    elif ns.command == "schema":
        request = SchemaRequest()
    elif ns.command == "irq":
        request = IrqDiffRequest(ns.before, ns.after, ns.as_json, ns.all_rows)
    elif ns.command == "image":
        request = ImageBuildRequest(ns.recipe, ns.arch, ns.refresh)
    elif ns.command == "report":
        request = report_request(ns)
    elif ns.command == "preflight":
        request = PreflightRequest(tuple(ns.device), ns.as_json, ns.root, ns.record)
    elif ns.command == "restore":
        request = RestoreRequest(ns.journal, ns.force)
    elif ns.command == "lab":
        request = (LabRunRequest(ns.scenario, ns.out, ns.bench) if ns.lab_command == "run"
                   else LabShellRequest(ns.out, ns.arch))
    elif ns.command == "trace":
        request = TraceRequest(ns.duration, ns.json_out, ns.quiet)
    else:
        if ns.repeat < 1:
            raise UsageError("harness bench: --repeat must be at least 1")
        request = BenchRequest(ns.scenario, ns.out, ns.repeat, _vm_counts(ns.vms))
    return request, ns.verbose


def _vm_counts(text: str) -> tuple[int, ...]:
    """``--vms 1,2,4``: distinct counts from 1 to 16, ascending."""
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1 or counts[-1] > 16:
        raise UsageError(f"harness bench: --vms {text[:40]!r}: give counts from 1 to 16, "
                         "comma-separated (1,2,4)")
    return tuple(counts)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (CI cancelling a job) unwinds like Ctrl-C, so every teardown runs.
    raise KeyboardInterrupt


def _shared_host_flag(argv: Sequence[str]) -> bool:
    return "--shared-host" in argv[:next((i for i, a in enumerate(argv)
                                          if not a.startswith("-")), len(argv))]


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        request, verbose = parse_args(sys.argv[1:] if argv is None else argv)
        if _shared_host_flag(sys.argv[1:] if argv is None else argv):
            # The loader reads it from the environment, and so does the harness inside the lab.
            os.environ["HARNESS_SHARED_HOST"] = "1"
        # stderr: the harness's own warnings (all its records with -v); the libraries' records
        # go to each run's harness.log only (harness.logs).
        level = logging.DEBUG if verbose else logging.WARNING
        logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s",
                            stream=sys.stderr)
        for handler in logging.getLogger().handlers:  # a run's log lowers its loggers' level:
            handler.setLevel(level)  # stderr keeps its own
        return HANDLERS[type(request)](request)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted; everything started was torn down", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the host's own I/O failed where nothing more specific caught it
        where = f": {exc.filename}" if exc.filename else ""
        print(f"harness: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return OutputError.exit_code


if __name__ == "__main__":
    sys.exit(main())
