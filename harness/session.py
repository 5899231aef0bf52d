"""``harness up``: a scenario's VMs kept up for experiments by hand, and how other commands
(``ssh``, ``qmp``, ``console``, ``irq watch``, ``hotplug``, ``down``) find them.

A session lives in a private folder (0700) under the runtime folder (``/run/harness`` for
root, ``$XDG_RUNTIME_DIR/harness`` otherwise, ``HARNESS_RUNTIME_DIR`` to choose):

    session.json   what another terminal needs: the ``up`` process, the run folder, and per VM
                   its SSH (port, user, key file, known_hosts), QMP socket, console log, devices
    <vm>.qmp       a QMP monitor for people (a 0600 socket QEMU serves; ``qmp-shell`` speaks it)
    control        the ``up`` process's own socket (0600): ``down``, hot-plug, the live wiring

The SSH key of each VM is written 0600 into the run folder, with a known_hosts file holding
the host key the guest printed on its console (the same pinning as the harness's own SSH);
the key goes when the session ends.  A session whose ``up`` process is gone (SIGKILL) is
swept by the next command that looks for sessions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, HostError, UsageError
from harness.hostside import HostEvidence, HostSnapshot
from harness.interrupts import parse_proc_interrupts
from harness.vm import GuestVM

log = logging.getLogger(__name__)

FORMAT = "harness-session/1"
SSH_HOST = "127.0.0.1"
#: The largest request or answer on the control socket.
MAX_MESSAGE = 1 << 20


# --- where sessions live ----------------------------------------------------------------------


def runtime_root() -> Path:
    """The runtime folder of this user's sessions, made private (0700) and checked to be ours:
    a folder another user could write would let them swap sockets under us."""
    env = os.environ.get("HARNESS_RUNTIME_DIR")
    if env:
        root = Path(env)
    elif os.geteuid() == 0:
        root = Path("/run/harness")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        root = Path(os.environ["XDG_RUNTIME_DIR"]) / "harness"
    else:
        root = Path(f"/tmp/harness-{os.geteuid()}")  # noqa: S108 - checked private below
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(root)
    except OSError as exc:
        raise HostError("session", f"cannot make the runtime folder {root}: "
                        f"{exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise HostError("session", f"{root} is not a folder of this user's: refusing to keep "
                        "sockets there (set HARNESS_RUNTIME_DIR)")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(root, 0o700)
    return root


def _proc_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks after boot), None if it is gone (or a
    zombie): a process id alone could be a new process's."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent: gone
            return None
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


# --- what another terminal reads ---------------------------------------------------------------


@dataclass(frozen=True)
class SessionVM:
    name: str
    arch: str
    accel: str
    ssh_port: int
    ssh_user: str
    ssh_key: str
    known_hosts: str
    qmp: str
    console: str
    devices: tuple[Mapping[str, Any], ...]  # id, kind, bdf, host, emulated, hotplug

    def ssh_argv(self, command: list[str] | None = None, tty: bool | None = None) -> list[str]:
        """``ssh`` to this VM with the run's key and the pinned host key, nothing else."""
        argv = ["ssh", "-i", self.ssh_key, "-p", str(self.ssh_port),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "LogLevel=ERROR"]
        if tty is True:
            argv.append("-t")
        elif tty is False:
            argv.append("-T")
        argv.append(f"{self.ssh_user}@{SSH_HOST}")
        if command:
            argv += ["--", shlex.join(command)]  # ssh joins its words for the remote shell
        return argv

    def device(self, device_id: str) -> Mapping[str, Any]:
        for d in self.devices:
            if d["id"] == device_id:
                return d
        raise UsageError(f"VM {self.name} has no device {device_id!r} (it has "
                         f"{', '.join(str(d['id']) for d in self.devices)})")


@dataclass(frozen=True)
class SessionInfo:
    id: str
    folder: Path
    pid: int
    pid_start: int | None
    started: float
    run_dir: Path
    scenario: str
    vms: tuple[SessionVM, ...]

    @property
    def control(self) -> Path:
        return self.folder / "control"

    @property
    def name(self) -> str:
        return self.run_dir.name

    def alive(self) -> bool:
        start = _proc_start(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)

    def vm(self, name: str | None) -> SessionVM:
        if name is None:
            if len(self.vms) == 1:
                return self.vms[0]
            raise UsageError(f"session {self.name} has several VMs "
                             f"({', '.join(v.name for v in self.vms)}): name one")
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise UsageError(f"session {self.name} has no VM {name!r} (it has "
                         f"{', '.join(v.name for v in self.vms)})")

    @staticmethod
    def read(folder: Path) -> SessionInfo:
        try:
            data = json.loads((folder / "session.json").read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            vms = tuple(SessionVM(
                v["name"], v["arch"], v["accel"], int(v["ssh"]["port"]), v["ssh"]["user"],
                v["ssh"]["key"], v["ssh"]["known_hosts"], v["qmp"], v["console"],
                tuple(v["devices"])) for v in data["vms"])
            return SessionInfo(folder.name, folder, int(data["pid"]), data.get("pid_start"),
                               float(data["started"]), Path(data["run_dir"]),
                               str(data["scenario"]), vms)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{folder}/session.json: unreadable session: {exc}") from exc


def live_sessions() -> list[SessionInfo]:
    """Every session whose ``up`` process still runs, oldest first; the folders of sessions
    whose process is gone (killed) are removed on the way."""
    found = []
    root = runtime_root()
    for folder in sorted(root.iterdir()):
        if not folder.name.startswith("s-") or not folder.is_dir():
            continue
        if not (folder / "session.json").exists():
            pid_file = folder / "pid"
            try:
                pid = int(pid_file.read_text().split()[0])
                start = int(pid_file.read_text().split()[1])
            except (OSError, ValueError, IndexError):
                pid, start = -1, -1
            if pid > 0 and _proc_start(pid) == start:
                continue  # an up still booting
            shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            info = SessionInfo.read(folder)
        except UsageError as exc:
            log.warning("%s", exc)
            continue
        if info.alive():
            found.append(info)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return sorted(found, key=lambda s: s.started)


def find_session(run: str | None) -> SessionInfo:
    """The session named by ``run`` (its run folder, the folder's name, or the session id),
    or the latest one."""
    sessions = live_sessions()
    if not sessions:
        raise UsageError("no VMs are up (start some with: harness up SCENARIO)")
    if run is None:
        return sessions[-1]
    for s in reversed(sessions):
        if run in (s.id, s.name, str(s.run_dir)) or (
                Path(run).exists() and Path(run).resolve() == s.run_dir):
            return s
    raise UsageError(f"no live session {run!r}; up now: "
                     f"{', '.join(s.name for s in sessions)}")


def resolve_target(words: list[str]) -> tuple[SessionInfo, SessionVM, list[str]]:
    """``[RUN] [VM] REST...``: a first word that names a live session is RUN (else the latest
    session); the next is the VM if it names one (it may be left out when the session has a
    single VM); the rest is returned."""
    sessions = live_sessions()
    if not sessions:
        raise UsageError("no VMs are up (start some with: harness up SCENARIO)")
    info = None
    if words:
        try:
            info = find_session(words[0])
            words = words[1:]
        except UsageError:
            info = None
    if info is None:
        info = sessions[-1]
    names = {vm.name for vm in info.vms}
    if words and words[0] in names:
        return info, info.vm(words[0]), words[1:]
    if len(info.vms) == 1:
        return info, info.vms[0], words
    raise UsageError(f"session {info.name} has several VMs ({', '.join(sorted(names))}): "
                     f"name one{f' (not {words[0]!r})' if words else ''}")


# --- talking to the up process --------------------------------------------------------------


def request(info: SessionInfo, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """One request to the ``up`` process over its control socket; its JSON answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(info.control))
        sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        answer = _read_line(sock)
    except OSError as exc:
        raise HarnessError(f"session {info.name}: the up process did not answer {op}: "
                           f"{exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        data = json.loads(answer)
    except ValueError as exc:
        raise HarnessError(f"session {info.name}: malformed answer to {op}") from exc
    if not isinstance(data, dict):
        raise HarnessError(f"session {info.name}: malformed answer to {op}")
    if data.get("error"):
        raise RemoteError(str(data["error"]), int(data.get("exit_code") or 1))
    return data


class RemoteError(HarnessError):
    """What the up process answered to a request that failed, with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise OSError("message too long")
    return data


Handler = Callable[[dict[str, Any]], dict[str, Any]]


class _ControlServer:
    """The ``up`` process's control socket: one JSON request per connection, each answered in
    a thread of its own (a hot-plug that takes its time holds up neither ``harness down`` nor
    ``irq watch``; the main thread waits for the session's end)."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self._handlers = handlers
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="session-control",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), name="session-request",
                             daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30.0)
            try:
                message = json.loads(_read_line(conn))
                handler = self._handlers.get(str(message.get("op")))
                if handler is None:
                    answer: dict[str, Any] = {"error": f"unknown op {message.get('op')!r}"}
                else:
                    answer = handler(message)
            except HarnessError as exc:
                answer = {"error": str(exc), "exit_code": exc.exit_code}
            except (OSError, ValueError, AttributeError) as exc:
                answer = {"error": f"bad request: {exc}"}
            except Exception as exc:  # noqa: BLE001 - one request must not end the session
                log.exception("control request failed")
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()


# --- the up side ----------------------------------------------------------------------------


Announce = Callable[[str], None]


class Session:
    """The ``up`` process's session: ``with Session(...) as s: run_scenario(...,
    keep_up=KeepUp(s.folder, s.hold))``.  Leaving it removes the keys, sockets and folder."""

    def __init__(self, scenario: str, run_dir: Path, announce: Announce,
                 handlers: Mapping[str, Handler] | None = None) -> None:
        self.scenario = scenario
        self.run_dir = run_dir.resolve()
        self.announce = announce
        self.id = f"s-{secrets.token_hex(3)}"
        self.folder = runtime_root() / self.id
        self.folder.mkdir(mode=0o700)
        start = _proc_start(os.getpid())
        (self.folder / "pid").write_text(f"{os.getpid()} {start}\n")
        self.started = time.time()
        self.ready_at: float | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()  # one request at a time touches the host's evidence
        self._ended_by = ""
        self._handlers: dict[str, Handler] = {"down": self._down, "status": self._status,
                                              "wiring": self.wiring, **(handlers or {})}
        self.host: HostEvidence | None = None
        self._server: _ControlServer | None = None
        self._keys: list[Path] = []
        self.vms: tuple[GuestVM, ...] = ()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_handler(self, op: str, handler: Handler) -> None:
        self._handlers[op] = handler

    def _down(self, message: dict[str, Any]) -> dict[str, Any]:
        self._ended_by = "harness down"
        self._done.set()
        return {"ok": True, "pid": os.getpid()}

    def _status(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "ready": self.ready_at is not None}

    def wiring(self, message: dict[str, Any]) -> dict[str, Any]:
        """The bypass wiring of every assigned vector now, as the trace shows it so far."""
        if self.host is None:
            return {"ok": True, "wiring": [], "note": "nothing is assigned"}
        text = Path("/proc/interrupts").read_text()
        now = HostSnapshot(text, parse_proc_interrupts(text, source="host:/proc/interrupts"))
        with self._lock:
            measured = self.host.measure(now, now)
        return {"ok": True, "wiring": [w.to_dict() for w in measured.wiring],
                "note": measured.wiring_note}

    # --- hold: the runner calls it with the booted VMs ------------------------------------

    def hold(self, vms: tuple[GuestVM, ...], host: HostEvidence | None = None) -> None:
        """Publish how to reach each VM, then wait for Ctrl-C, ``harness down`` or a VM's end."""
        self.vms = vms
        self.host = host
        entries = [self._publish(vm) for vm in vms]
        data = {"format": FORMAT, "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                "started": self.started, "run_dir": str(self.run_dir),
                "scenario": self.scenario, "vms": entries}
        self._server = _ControlServer(self.folder / "control", self._handlers)
        aside = self.folder / ".session.json"
        aside.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(aside, self.folder / "session.json")
        self.ready_at = time.time()
        info = SessionInfo.read(self.folder)
        self.announce(access_text(info))
        try:
            while not self._done.wait(0.5):
                dead = [vm.name for vm in vms if vm.machine is None or not vm.machine.is_alive()]
                if dead:
                    self._ended_by = f"QEMU of {', '.join(dead)} exited"
                    break
        except KeyboardInterrupt:
            self._ended_by = "Ctrl-C"
        # Ending: no more requests (the run now measures with the host's evidence itself),
        # and no command finds the session any more.
        (self.folder / "session.json").unlink(missing_ok=True)
        if self._server is not None:
            self._server.close()
            self._server = None
        self.announce(f"session {self.run_dir.name}: ending ({self._ended_by}); measuring, "
                      "reporting and tearing down")

    def _publish(self, vm: GuestVM) -> dict[str, Any]:
        assert vm.ssh is not None and vm.client_key is not None and vm.machine is not None
        key = self.run_dir / f"{vm.name}.ssh-key"
        key.unlink(missing_ok=True)
        vm.client_key.write(str(key))
        self._keys.append(key)
        known = self.run_dir / f"{vm.name}.known_hosts"
        host_key = vm.ssh.host_key
        known.write_text(f"[{SSH_HOST}]:{vm.ssh.port} {host_key.get_name()} "
                         f"{host_key.get_base64()}\n")
        assert vm.accel is not None
        return {"name": vm.name, "arch": vm.platform.arch.value, "accel": vm.accel.accel,
                "ssh": {"port": vm.ssh.port, "user": vm.ssh_user, "key": str(key),
                        "known_hosts": str(known)},
                "qmp": str(vm.user_qmp), "console": str(vm.machine.console_path.resolve()),
                "devices": [{"id": p.device.id, "kind": p.device.kind, "bdf": p.bdf,
                             "host": p.device.assigned_host, "emulated": p.device.emulated,
                             "hotplug": bool(getattr(p.device, "hotplug", False))}
                            for p in vm.placed]}

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for key in self._keys:
            key.unlink(missing_ok=True)
        self._keys.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def access_text(info: SessionInfo) -> str:
    """How to reach each VM of a session, from another terminal: the harness's verbs and the
    plain tools' command lines."""
    lines = []
    run = info.name
    for vm in info.vms:
        devices = ", ".join(f"{d['id']} {d['bdf']}" for d in vm.devices)
        lines += [f"{vm.name} is up ({vm.arch}, {vm.accel}; {devices}):",
                  f"  ssh      harness ssh {vm.name}",
                  f"           {shlex.join(vm.ssh_argv())}",
                  f"  qmp      harness qmp {vm.name}     (qmp-shell {vm.qmp})",
                  f"  console  harness console {vm.name} (tail -f {vm.console})",
                  f"  irqs     harness irq watch {vm.name}"]
    lines.append(f"run folder {info.run_dir}; Ctrl-C here or `harness down {run}` ends the "
                 "session (verdicts, report, teardown)")
    return "\n".join(lines)


@contextlib.contextmanager
def user_qmp(vm: SessionVM, timeout: float = 10.0) -> Iterator[Any]:
    """A QMP channel on the VM's people's monitor (the harness keeps its own)."""
    from harness.qemu.qmp import QmpChannel

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(vm.qmp)
    except OSError as exc:
        sock.close()
        raise HarnessError(f"{vm.name}: cannot reach QMP at {vm.qmp}: {exc.strerror}") from exc
    channel = QmpChannel(f"{vm.name}-user", log.getChild(vm.name))
    try:
        channel.connect(sock, timeout)
        yield channel
    finally:
        channel.close()
        sock.close()


def parse_qmp_args(words: list[str]) -> dict[str, Any]:
    """``key=value`` words as ``qmp-shell`` takes them: a value is JSON when it parses as JSON
    (numbers, true, objects), text otherwise."""
    args: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"harness qmp: {word!r}: arguments are key=value")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


def wait_gone(info: SessionInfo, timeout: float) -> bool:
    """Wait until the ``up`` process of ``info`` has exited; whether it did in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not info.alive():
            return True
        time.sleep(0.2)
    return not info.alive()
