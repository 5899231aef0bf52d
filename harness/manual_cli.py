"""The ``harness`` verbs for experiments by hand: ``up``, ``down``, ``ssh``, ``qmp``,
``console``, ``irq watch`` and ``hotplug``.

Part of the command line (like :mod:`harness.cli`, it prints and returns exit codes): each
verb is a typed request, parsed by :func:`add_parsers` / :func:`request_of` and run by its
handler in :data:`HANDLERS`.  ``harness ssh`` and ``harness qmp`` (interactive) hand the
terminal to the real tools, OpenSSH's ``ssh`` and qemu.qmp's ``qmp-shell``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, HostError, UsageError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class UpRequest:
    scenario: Path
    out: Path | None
    force_bind: bool = False
    only: str | None = None


@dataclass(frozen=True)
class DownRequest:
    run: str | None
    timeout: float = 600.0


@dataclass(frozen=True)
class SshRequest:
    words: tuple[str, ...]  # [RUN] [VM]
    command: tuple[str, ...]  # after "--"


@dataclass(frozen=True)
class QmpRequest:
    words: tuple[str, ...]  # [RUN] [VM] [COMMAND [key=value...]]
    hmp: bool = False


@dataclass(frozen=True)
class ConsoleRequest:
    words: tuple[str, ...]
    lines: int = 40
    follow: bool = True


@dataclass(frozen=True)
class WatchRequest:
    words: tuple[str, ...]  # [RUN] [VM]
    interval: float = 1.0
    count: int | None = None  # None: until Ctrl-C
    as_json: bool = False
    all_rows: bool = False


@dataclass(frozen=True)
class HotplugRequest:
    words: tuple[str, ...]  # [RUN] [VM] ACTION DEVICE
    pause_s: float = 1.0


@dataclass(frozen=True)
class LabUpRequest:
    scenario: Path
    out: Path | None
    only: str | None = None


Request = (UpRequest | DownRequest | SshRequest | QmpRequest | ConsoleRequest | WatchRequest
           | HotplugRequest | LabUpRequest)


def split_command(argv: Sequence[str]) -> tuple[list[str], tuple[str, ...]]:
    """``harness ssh ... -- CMD``: the words before the first ``--`` and the command after."""
    argv = list(argv)
    if "ssh" in argv and "--" in argv and argv.index("ssh") < argv.index("--"):
        cut = argv.index("--")
        return argv[:cut], tuple(argv[cut + 1:])
    return argv, ()


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("up", help="boot a scenario's VMs and keep them up for experiments by "
                       "hand (Ctrl-C or harness down ends it: report, teardown)")
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path, help="parent folder of the run folder (default ./runs)")
    p.add_argument("--force-bind", action="store_true",
                   help="bind assigned devices to vfio-pci even if the host uses them")
    p.add_argument("--only", metavar="NAME",
                   help="the scenario of this name, in a file of several (default: the first)")

    p = sub.add_parser("down", help="end a session of harness up (default: the latest)")
    p.add_argument("run", nargs="?", help="the run folder, its name, or the session id")

    p = sub.add_parser("ssh", help="ssh into a VM of harness up: harness ssh [RUN] [VM] "
                       "[-- CMD...]")
    p.add_argument("words", nargs="*", metavar="RUN|VM")

    p = sub.add_parser("qmp", help="QMP of a VM of harness up: qmp-shell, or one command: "
                       "harness qmp [RUN] [VM] [COMMAND [key=value...]]")
    p.add_argument("words", nargs="*", metavar="WORD")
    p.add_argument("-H", "--hmp", action="store_true",
                   help="the human monitor (qmp-shell -H; with a COMMAND, an HMP command line)")

    _add_hotplug_parser(sub)

    p = sub.add_parser("console", help="follow the serial console of a VM of harness up")
    p.add_argument("words", nargs="*", metavar="RUN|VM")
    p.add_argument("-n", "--lines", type=int, default=40, help="lines of history (default 40)")
    p.add_argument("--no-follow", action="store_false", dest="follow",
                   help="print the history and stop")


def _add_hotplug_parser(sub: Any) -> None:
    p = sub.add_parser("hotplug", help="unplug / plug back a device (hotplug: true) of a VM "
                       "of harness up: harness hotplug [RUN] [VM] unplug|plug|replug DEVICE")
    p.add_argument("words", nargs="+", metavar="WORD")
    p.add_argument("--pause", type=float, default=1.0, dest="pause_s",
                   help="replug: seconds between unplug and plug (default 1)")


def add_lab_parsers(lab_sub: Any) -> None:
    p = lab_sub.add_parser("up", help="keep a scenario's VMs (L2) up in the emulated host (L1) "
                           "and get a shell there, where harness ssh, qmp, console and irq "
                           "watch reach them")
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path, help="parent folder of the run folder (default ./runs)")
    p.add_argument("--only", metavar="NAME", help="the scenario of this name, in a file of "
                   "several (default: the first)")


def add_irq_parsers(irq_sub: Any) -> None:
    p = irq_sub.add_parser("watch", help="live per-vector interrupt rates of a VM of harness "
                           "up (like irqtop), the host's side beside an assigned device's")
    p.add_argument("words", nargs="*", metavar="RUN|VM")
    p.add_argument("--interval", type=float, default=1.0, help="seconds per frame (default 1)")
    p.add_argument("--count", type=int, help="print this many frames and stop (default: "
                   "redraw until Ctrl-C)")
    p.add_argument("--json", action="store_true", dest="as_json",
                   help="one JSON object per frame (a line each)")
    p.add_argument("--all", action="store_true", dest="all_rows",
                   help="also the rows of no PCI vector that counted (timers, IPIs)")


def request_of(ns: argparse.Namespace, command: tuple[str, ...]) -> Request | None:
    if ns.command == "lab" and ns.lab_command == "up":
        return LabUpRequest(ns.scenario, ns.out, ns.only)
    if ns.command == "irq" and ns.irq_command == "watch":
        if not 0.1 <= ns.interval <= 3600:
            raise UsageError("harness irq watch: --interval must be 0.1 to 3600 seconds")
        if ns.count is not None and ns.count < 1:
            raise UsageError("harness irq watch: --count must be at least 1")
        return WatchRequest(tuple(ns.words), ns.interval, ns.count, ns.as_json, ns.all_rows)
    if ns.command == "up":
        return UpRequest(ns.scenario, ns.out, ns.force_bind, ns.only)
    if ns.command == "down":
        return DownRequest(ns.run)
    if ns.command == "hotplug":
        if not 0 <= ns.pause_s <= 3600:
            raise UsageError("harness hotplug: --pause must be 0 to 3600 seconds")
        return HotplugRequest(tuple(ns.words), ns.pause_s)
    if ns.command == "ssh":
        return SshRequest(tuple(ns.words), command)
    if ns.command == "qmp":
        return QmpRequest(tuple(ns.words), ns.hmp)
    if ns.command == "console":
        if ns.lines < 0:
            raise UsageError("harness console: --lines must be 0 or more")
        return ConsoleRequest(tuple(ns.words), ns.lines, ns.follow)
    return None


# --- handlers --------------------------------------------------------------------------------


def handle_up(req: UpRequest, progress: Progress, make_run_dir: Callable[[Path | None, str],
              Path], write_reports: Callable[[Any, Path], Path]) -> int:
    from harness.config import load_scenarios
    from harness.runner import KeepUp, run_scenario
    from harness.session import Session

    scenarios = load_scenarios(req.scenario)
    if req.only is not None:
        chosen = [s for s in scenarios if s.name == req.only]
        if not chosen:
            raise UsageError(f"{req.scenario}: no scenario named {req.only} (it has "
                             f"{', '.join(s.name for s in scenarios)})")
        scenario = chosen[0]
    else:
        scenario = scenarios[0]
        if len(scenarios) > 1:
            progress(f"{req.scenario} holds {len(scenarios)} scenarios: up takes the first, "
                     f"{scenario.name} (--only NAME for another)")
    run_dir = make_run_dir(req.out, scenario.name)
    progress(f"scenario {scenario.name}: run folder {run_dir}")

    def announce(text: str) -> None:
        print(text, flush=True)

    from harness.hotplug import session_handlers

    with Session(scenario.name, run_dir, announce) as session:
        for op, handler in session_handlers(session).items():
            session.add_handler(op, handler)
        result = run_scenario(scenario, str(req.scenario), run_dir, progress,
                              force_bind=req.force_bind,
                              keep_up=KeepUp(session.folder, session.hold))
    report = write_reports(result, run_dir)
    print(f"report: {report}\n", flush=True)
    return (result.error.exit_code if result.error is not None
            else 0 if result.passed else 1)


def handle_down(req: DownRequest) -> int:
    from harness.session import find_session, request, wait_gone

    info = find_session(req.run)
    request(info, "down")
    print(f"session {info.name}: ending (the up process measures, reports and tears down)",
          file=sys.stderr, flush=True)
    if not wait_gone(info, req.timeout):
        raise HarnessError(f"session {info.name}: the up process (pid {info.pid}) still runs "
                           f"after {req.timeout:g} s")
    report = info.run_dir / "report.json"
    summary = info.run_dir / "summary.txt"
    if summary.exists():
        print(summary.read_text().rstrip())
    print(f"report: {report}" if report.exists() else f"{info.run_dir}: no report written "
          "(see its harness.log)")
    return 0


def handle_ssh(req: SshRequest) -> int:
    from harness.session import resolve_target

    info, vm, rest = resolve_target(list(req.words))
    if rest:
        raise UsageError(f"harness ssh: unexpected {rest[0]!r} (a command goes after --: "
                         f"harness ssh {vm.name} -- {' '.join(rest)})")
    if shutil.which("ssh") is None:
        raise HostError("ssh", "OpenSSH's client is not installed (Debian: openssh-client)")
    argv = vm.ssh_argv(list(req.command) or None)
    sys.stdout.flush()
    os.execvp("ssh", argv)  # noqa: S606 - argv list, no shell: the terminal goes to ssh


def handle_qmp(req: QmpRequest) -> int:
    from harness.session import parse_qmp_args, resolve_target, user_qmp

    info, vm, rest = resolve_target(list(req.words))
    if not rest:
        argv = [sys.executable, "-m", "qemu.qmp.qmp_shell", *(["-H"] if req.hmp else []),
                vm.qmp]
        sys.stdout.flush()
        os.execv(sys.executable, argv)  # noqa: S606 - qmp-shell as qemu.qmp ships it
    with user_qmp(vm) as qmp:
        if req.hmp:
            print(qmp.hmp(" ".join(rest), timeout=60.0).rstrip())
        else:
            answer = qmp.execute(rest[0], parse_qmp_args(rest[1:]) or None, timeout=60.0)
            print(json.dumps(answer, indent=2))
    return 0


def handle_console(req: ConsoleRequest) -> int:
    from harness.session import resolve_target

    info, vm, rest = resolve_target(list(req.words))
    if rest:
        raise UsageError(f"harness console: unexpected {rest[0]!r}")
    path = Path(vm.console)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open while following
    except OSError as exc:
        raise HarnessError(f"{path}: {exc.strerror}") from exc
    out = sys.stdout.buffer
    with fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(size - (256 << 10), 0))
        history = fh.read().splitlines(keepends=True)
        out.write(b"".join(history[-req.lines:] if req.lines else []))
        out.flush()
        while req.follow:
            chunk = fh.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not info.alive():
                break
            time.sleep(0.2)
    return 0


def handle_watch(req: WatchRequest) -> int:
    from harness.session import request, resolve_target
    from harness.watch import Device, format_frame, frames, guest_reader, guest_ssh, host_reader

    info, vm, rest = resolve_target(list(req.words))
    if rest:
        raise UsageError(f"harness irq watch: unexpected {rest[0]!r}")
    devices = [Device.of(d) for d in vm.devices]
    assigned = any(d.host is not None for d in devices)

    def wiring() -> tuple[list[Any], str]:
        try:
            answer = request(info, "wiring", timeout=20.0)
        except HarnessError as exc:
            return [], f"wiring unknown: {exc}"
        return list(answer.get("wiring", [])), str(answer.get("note", ""))

    ssh = guest_ssh(vm.name, vm.ssh_port, vm.ssh_user, vm.ssh_key, vm.known_hosts)
    live = req.count is None and not req.as_json and sys.stdout.isatty()
    try:
        for frame in frames(vm.name, devices, guest_reader(ssh), req.interval,
                            host_reader() if assigned else None,
                            wiring if assigned else None, req.all_rows, req.count):
            if req.as_json:
                print(json.dumps(frame.to_dict()), flush=True)
            elif live:
                print("\x1b[H\x1b[2J" + format_frame(frame), flush=True)
            else:
                print(format_frame(frame) + "\n", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        ssh.close()
    return 0


def handle_hotplug(req: HotplugRequest) -> int:
    """Through the up process, which owns the VM's QMP and agent; one line per step."""
    from harness.session import request, resolve_target

    info, vm, rest = resolve_target(list(req.words))
    if len(rest) != 2 or rest[0] not in ("unplug", "plug", "replug"):
        raise UsageError("harness hotplug: expected [RUN] [VM] unplug|plug|replug DEVICE")
    vm.device(rest[1])  # a device of the VM, or a one-line error
    answer = request(info, "hotplug", timeout=300.0, vm=vm.name, action=rest[0],
                     device=rest[1], pause_s=req.pause_s)
    for event in answer.get("events", []):
        what = "went" if event["action"] == "unplug" else "came"
        wiring = event.get("wiring")
        host = ("" if wiring is None else "; host wiring now: "
                + ("; ".join(wiring) or "none (no vfio vector of it on the host)"))
        print(f"{event['action']} {event['vm']}/{event['device']} ({event['bdf']}) in "
              f"{event['seconds']:.1f} s; vectors that {what}: "
              f"{', '.join(event['vectors']) or 'none'}{host}", flush=True)
    return 0


def handle_lab_up(req: LabUpRequest, progress: Progress,
                  run_dir_for: Callable[[Path | None, str], Path]) -> int:
    """L1 keeps the scenario's VMs up (harness up inside it); this terminal is a shell in L1."""
    from harness.config import load_scenarios
    from harness.lab.l1 import lab_platform, shell

    scenarios = load_scenarios(req.scenario)  # bad input fails here, before L1 boots
    names = [s.name for s in scenarios]
    if req.only is not None and req.only not in names:
        raise UsageError(f"{req.scenario}: no scenario named {req.only} (it has "
                         f"{', '.join(names)})")
    chosen = [s for s in scenarios if s.name == (req.only or names[0])]
    platform = lab_platform(req.scenario, chosen)
    run_dir = run_dir_for(req.out, f"lab-up-{chosen[0].name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    progress(f"lab: run folder {run_dir}")
    # L1 sees the file where it is here, or (an L1 on a root of its own) in the run folder.
    scenario_file = str(req.scenario.resolve())
    if platform.lab.userland is not None:
        shutil.copyfile(req.scenario, run_dir / "scenario.yaml")
        scenario_file = "/lab/scenario.yaml"
    status = shell(progress, run_dir, platform, scenario_file, req.only)
    for summary in sorted(run_dir.glob("*/summary.txt")):
        print(summary.read_text().rstrip())
        print(f"report: {summary.parent / 'report.json'}")
    return status


HANDLERS: dict[type, Callable[..., int]] = {
    WatchRequest: handle_watch, HotplugRequest: handle_hotplug,
    DownRequest: handle_down, SshRequest: handle_ssh, QmpRequest: handle_qmp,
    ConsoleRequest: handle_console,
}
