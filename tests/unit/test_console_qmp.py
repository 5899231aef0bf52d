"""Console, QmpChannel and Machine against fake peers over real sockets; no guest is booted.

The console peer and the QMP peer are the other ends of real ``socket.socketpair()`` pairs.
The QMP peer speaks the wire protocol QEMU speaks (greeting, ``qmp_capabilities``, ``return``
/ ``error`` replies carrying the request's ``id``, asynchronous events).  For Machine, the
"QEMU" is ``python3 -c`` speaking the same protocol over the file descriptors QEMU would
inherit, so launch, ``info usernet`` and the quit -> SIGTERM -> SIGKILL ladder run for real
against a process that is not QEMU.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import GuestError, LaunchError, StateError
from harness.qemu.console import Console
from harness.qemu.machine import Machine, MachineState
from harness.qemu.qmp import QmpChannel, QmpError

# --- Console ------------------------------------------------------------------------------------


@pytest.fixture
def console_pair(tmp_path: Path) -> Iterator[tuple[Console, socket.socket, Path]]:
    ours, peer = socket.socketpair()
    log = tmp_path / "guest0.console.log"
    console = Console("guest0", ours, log, tail_lines=5)
    try:
        yield console, peer, log
    finally:
        console.close()
        peer.close()


def send_later(peer: socket.socket, data: bytes, delay: float = 0.1) -> threading.Timer:
    timer = threading.Timer(delay, peer.sendall, (data,))
    timer.start()
    return timer


def test_console_writes_the_log_and_returns_the_match(
        console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, log = console_pair
    raw = b"SeaBIOS (version 1.16.2-debian-1.16.2-1)\r\n\r\nBooting from ROM..\r\nLinux version 6.1"
    peer.sendall(raw)
    peer.sendall(b".0-28-cloud-amd64\r\nharness-agent ready port=22\r\n")
    match = console.wait_for(r"agent ready port=(\d+)", timeout=5)
    assert match.group(1) == "22"
    assert [line.text for line in console.lines()] == [
        "SeaBIOS (version 1.16.2-debian-1.16.2-1)", "", "Booting from ROM..",
        "Linux version 6.1.0-28-cloud-amd64", "harness-agent ready port=22"]
    console.close()
    assert log.read_bytes() == raw + b".0-28-cloud-amd64\r\nharness-agent ready port=22\r\n"


def test_console_wakes_a_waiter_when_the_line_arrives(
        console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = console_pair
    send_later(peer, b"login: ")  # no newline yet: not a line
    send_later(peer, b"\nWelcome\n", delay=0.2)
    started = time.monotonic()
    match = console.wait_for("Welcome", timeout=5)
    assert match.group(0) == "Welcome"
    assert time.monotonic() - started < 2


def test_console_fails_fast_on_a_kernel_panic(
        console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = console_pair
    peer.sendall(b"[    1.234] VFS: Cannot open root device\r\n"
                 b"[    1.235] Kernel panic - not syncing: VFS: Unable to mount root fs on "
                 b"unknown-block(0,0)\r\n")
    started = time.monotonic()
    with pytest.raises(GuestError) as info:
        console.wait_for("login:", timeout=30, what="the login prompt")
    assert time.monotonic() - started < 2
    err = info.value
    assert err.name == "guest0"
    assert "guest failed while waiting for the login prompt" in str(err)
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in err.reason
    assert "Kernel panic" in err.console_tail


def test_console_fails_fast_when_the_peer_closes(
        console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = console_pair
    peer.sendall(b"early boot\n")
    threading.Timer(0.1, peer.close).start()
    started = time.monotonic()
    with pytest.raises(GuestError) as info:
        console.wait_for("never printed", timeout=30)
    assert time.monotonic() - started < 2
    assert "console closed (QEMU exited) while waiting for never printed" in str(info.value)
    assert info.value.console_tail == "early boot"


def test_console_times_out_with_the_tail(
        console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = console_pair
    peer.sendall(b"".join(b"line %d\n" % i for i in range(8)))
    console.wait_for("line 7", timeout=5)
    started = time.monotonic()
    with pytest.raises(GuestError) as info:
        console.wait_for("login:", timeout=0.3, what="the login prompt")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2
    assert "no 'the login prompt' on the console" in str(info.value)
    assert info.value.console_tail == "line 3\nline 4\nline 5\nline 6\nline 7"  # tail_lines=5
    assert console.tail() == info.value.console_tail


def test_console_tail_keeps_an_unterminated_last_line(
        console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = console_pair
    peer.sendall(b"booting\nKernel panic - not syncing: Attempted to kill init!")
    peer.close()
    with pytest.raises(GuestError) as info:
        console.wait_for("login:", timeout=5)
    assert "Attempted to kill init" in info.value.reason
    assert "Attempted to kill init" in info.value.console_tail


def test_console_first_time(console_pair: tuple[Console, socket.socket, Path]) -> None:
    console, peer, _ = console_pair
    before = time.monotonic()
    peer.sendall(b"Run /init as init process\nharness-agent ready\nharness-agent ready\n")
    console.wait_for("agent ready", timeout=5)
    first = console.first_time("agent ready")
    assert first is not None and before <= first <= time.monotonic()
    assert first == console.lines()[1].at
    assert console.first_time("login:") is None


def test_console_close_is_prompt_with_a_silent_peer(tmp_path: Path) -> None:
    ours, peer = socket.socketpair()
    console = Console("guest0", ours, tmp_path / "c.log")
    started = time.monotonic()
    console.close()
    assert time.monotonic() - started < 2
    assert not [t for t in threading.enumerate() if t.name == "console-guest0"]
    peer.close()


# --- QMP: a fake monitor --------------------------------------------------------------------------

GREETING = {"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7},
                                "package": "Debian 1:7.2+dfsg-7+deb12u18"},
                    "capabilities": []}}

# `info usernet` as QEMU 7.2.22 (Debian 12) printed it through human-monitor-command for
# "-netdev user,id=net0,hostfwd=tcp:127.0.0.1:0-:22", recorded on this project's machine.
INFO_USERNET = (
    "Hub -1 (net0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]   3       127.0.0.1 46343       10.0.2.15    22     0     0\r\n")


def json_stream(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """Messages as QEMU's streaming JSON parser sees them: not lines (qemu.qmp sends no
    newline after a command), just one JSON value after another."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := sock.recv(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                message, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buffer = buffer.lstrip()[end:]
            yield message


def timestamp() -> dict[str, int]:
    now = time.time()
    return {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}


class FakeMonitor:
    """A QMP server on one end of a socketpair, in a thread."""

    def __init__(self, sock: socket.socket, greet: bool = True) -> None:
        self.sock = sock
        self.greet = greet
        self.received: list[dict[str, Any]] = []
        self.eof = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fake-qmp", daemon=True)
        self.thread.start()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")

    def reply(self, request: dict[str, Any], **body: Any) -> None:
        if "id" in request:
            body["id"] = request["id"]
        self.send(body)

    def _serve(self) -> None:
        try:
            if self.greet:
                self.send(GREETING)
            for request in json_stream(self.sock):
                self.received.append(request)
                self.answer(request)
        except OSError:
            pass
        finally:
            self.eof.set()

    def answer(self, request: dict[str, Any]) -> None:
        command = request["execute"]
        args = request.get("arguments", {})
        if command in ("qmp_capabilities", "cont"):
            self.reply(request, **{"return": {}})
        elif command == "query-status":
            self.reply(request, **{"return": {"status": "running", "singlestep": False,
                                             "running": True}})
        elif command == "stop":
            self.reply(request, **{"return": {}})
            self.send({"event": "STOP", "timestamp": timestamp()})
        elif command == "human-monitor-command":
            text = INFO_USERNET if args["command-line"] == "info usernet" else ""
            self.reply(request, **{"return": text})
        elif command == "device_del":
            self.reply(request, error={"class": "GenericError",
                                       "desc": f"Device '{args['id']}' not found"})
        elif command == "hang":
            pass
        else:
            self.reply(request, error={"class": "CommandNotFound",
                                       "desc": f"The command {command} has not been found"})


@pytest.fixture
def monitor() -> Iterator[tuple[QmpChannel, FakeMonitor]]:
    ours, theirs = socket.socketpair()
    fake = FakeMonitor(theirs)
    channel = QmpChannel("guest0", logging.getLogger("test.qmp"))
    try:
        channel.connect(ours, timeout=5)
        yield channel, fake
    finally:
        channel.close()
        theirs.close()
        ours.close()


def test_qmp_negotiates_and_executes(monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, fake = monitor
    assert channel.execute("query-status") == {"status": "running", "singlestep": False,
                                               "running": True}
    assert channel.execute("cont") == {}
    assert [r["execute"] for r in fake.received] == ["qmp_capabilities", "query-status", "cont"]
    assert "arguments" not in fake.received[1] or fake.received[1]["arguments"] == {}


def test_qmp_error_reply_is_a_qmp_error_with_its_class(
        monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, fake = monitor
    with pytest.raises(QmpError) as info:
        channel.execute("device_del", {"id": "nope"})
    assert info.value.command == "device_del"
    assert info.value.error_class == "GenericError"
    assert "Device 'nope' not found" in str(info.value)
    assert info.value.exit_code == 4
    assert fake.received[-1]["arguments"] == {"id": "nope"}
    with pytest.raises(QmpError) as unknown:
        channel.execute("x-frobnicate")
    assert unknown.value.error_class == "CommandNotFound"
    # The channel still works after an error reply.
    assert channel.execute("cont") == {}


def test_qmp_hmp_goes_through_human_monitor_command(
        monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, fake = monitor
    assert channel.hmp("info usernet") == INFO_USERNET
    assert fake.received[-1] == {"execute": "human-monitor-command",
                                 "arguments": {"command-line": "info usernet"},
                                 "id": fake.received[-1]["id"]}


def test_qmp_events_are_recorded(monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, _ = monitor
    channel.execute("stop")
    channel.execute("query-status")
    deadline = time.monotonic() + 5
    while not channel.events and time.monotonic() < deadline:  # the pump is its own task
        time.sleep(0.01)
    assert [e["event"] for e in channel.events] == ["STOP"]
    assert set(channel.events[0]["timestamp"]) == {"seconds", "microseconds"}


def test_qmp_unanswered_command_times_out(monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, _ = monitor
    started = time.monotonic()
    with pytest.raises(QmpError) as info:
        channel.execute("hang", timeout=0.3)
    assert time.monotonic() - started < 2
    assert info.value.command == "hang" and info.value.error_class is None
    assert channel.execute("cont") == {}  # a late answer must not confuse the next command


def test_qmp_timeout_message_says_what_happened(monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, _ = monitor
    with pytest.raises(QmpError, match="QMP hang: no answer within"):
        channel.execute("hang", timeout=0.3)


def test_qmp_peer_hangup_is_a_qmp_error(monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, fake = monitor
    fake.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(QmpError) as info:
        channel.execute("query-status", timeout=5)
    assert info.value.command == "query-status"


def test_qmp_connect_without_greeting_fails() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()  # the "QEMU" died before greeting
    channel = QmpChannel("guest0", logging.getLogger("test.qmp"))
    try:
        with pytest.raises(QmpError, match="QMP connect: no QMP greeting") as info:
            channel.connect(ours, timeout=5)
        assert info.value.command == "connect"
    finally:
        channel.close()
        ours.close()


def test_qmp_connect_times_out_on_a_silent_peer() -> None:
    ours, theirs = socket.socketpair()
    FakeMonitor(theirs, greet=False)
    channel = QmpChannel("guest0", logging.getLogger("test.qmp"))
    started = time.monotonic()
    try:
        with pytest.raises(QmpError, match="no QMP greeting"):
            channel.connect(ours, timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        channel.close()
        theirs.close()
        ours.close()


def test_qmp_close_is_idempotent_and_leaves_nothing_pending(
        caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = socket.socketpair()
    fake = FakeMonitor(theirs)
    channel = QmpChannel("closer", logging.getLogger("test.qmp"))
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        channel.connect(ours, timeout=5)
        channel.execute("stop")
        channel.close()
        channel.close()
        assert fake.eof.wait(5), "the monitor did not see the channel hang up"
        assert not [t for t in threading.enumerate() if t.name == "qmp-closer"]
        del channel
        gc.collect()
    theirs.close()
    ours.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert not [m for m in messages if "pending" in m or "never retrieved" in m], messages
    assert not [w for w in caught if issubclass(w.category, (RuntimeWarning, ResourceWarning))
                ], [str(w.message) for w in caught]


def test_qmp_close_without_connect() -> None:
    channel = QmpChannel("idle", logging.getLogger("test.qmp"))
    channel.close()
    channel.close()
    assert not [t for t in threading.enumerate() if t.name == "qmp-idle"]


def test_qmp_execute_after_close_is_a_qmp_error(
        monitor: tuple[QmpChannel, FakeMonitor]) -> None:
    channel, _ = monitor
    channel.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        failure = ""
        try:
            channel.execute("query-status")
        except QmpError:
            return
        except RuntimeError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        gc.collect()  # the orphaned coroutine's warning, here rather than in a later test
    pytest.fail(f"execute after close raised {failure or 'nothing'}")


def test_no_asyncio_tasks_leak_into_the_callers_loop() -> None:
    # The channel runs its own loop; a caller's loop must be untouched by it.
    async def caller() -> int:
        ours, theirs = socket.socketpair()
        FakeMonitor(theirs)
        channel = QmpChannel("nested", logging.getLogger("test.qmp"))
        channel.connect(ours, timeout=5)
        channel.execute("cont")
        channel.close()
        theirs.close()
        ours.close()
        return len(asyncio.all_tasks())

    assert asyncio.run(caller()) == 1  # only caller() itself


# --- Machine, with a fake QEMU process ------------------------------------------------------------

FAKE_QEMU = r"""
import json, signal, socket, sys, time
qmp_fd, console_fd, mode, usernet = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode != "obedient":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
console = socket.socket(fileno=console_fd)
console.sendall(b"SeaBIOS (fake)\r\nfake guest up\r\n")
qmp = socket.socket(fileno=qmp_fd)
def send(message):
    qmp.sendall(json.dumps(message).encode() + b"\r\n")
def requests():
    decoder, buffer = json.JSONDecoder(), ""
    while chunk := qmp.recv(65536):
        buffer += chunk.decode()
        while buffer.strip():
            try:
                message, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                break
            buffer = buffer.lstrip()[end:]
            yield message
send(GREETING)
for request in requests():
    command = request["execute"]
    if command == "quit" and mode == "deaf":
        continue
    value = usernet if command == "human-monitor-command" else {}
    send({"return": value, **({"id": request["id"]} if "id" in request else {})})
    if command == "quit" and mode == "obedient":
        send({"event": "SHUTDOWN", "timestamp": {"seconds": 0, "microseconds": 0},
              "data": {"guest": False, "reason": "host-qmp-quit"}})
        sys.exit(0)
if mode == "obedient":
    sys.exit(0)
while True:
    time.sleep(3600)
""".replace("GREETING", json.dumps(GREETING))


def fake_qemu(mode: str) -> Callable[[int, int], list[str]]:
    """An argv factory whose "QEMU" is python: obedient, stubborn (answers quit but stays and
    ignores SIGTERM) or deaf (never answers quit, ignores SIGTERM)."""
    def factory(qmp_fd: int, console_fd: int) -> list[str]:
        return [sys.executable, "-c", FAKE_QEMU, str(qmp_fd), str(console_fd), mode,
                INFO_USERNET]
    return factory


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def state(machine: Machine) -> MachineState:
    """The state, read through a call so the type checker does not keep an earlier narrowing."""
    return machine.state


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_machine_runs_a_fake_qemu_and_reads_the_ssh_port(tmp_path: Path) -> None:
    fds = open_fds()
    machine = Machine("guest0", fake_qemu("obedient"), tmp_path)
    with machine:
        machine.launch()
        assert machine.state is MachineState.RUNNING
        assert machine.ssh_port() == 46343
        assert machine.console is not None
        assert machine.console.wait_for("fake guest up", timeout=5)
        assert machine.launched_at is not None and machine.qmp_ready_at is not None
        assert machine.qmp_ready_at >= machine.launched_at
        pid = machine.pid
        assert pid is not None and machine.is_alive()
        assert repr(machine) == f"<Machine guest0 running pid={pid}>"
    assert state(machine) is MachineState.STOPPED
    assert machine.exit_code == 0
    assert gone(pid)
    assert (tmp_path / "guest0.argv").read_text().startswith(sys.executable)
    assert b"fake guest up" in machine.console_path.read_bytes()
    assert open_fds() == fds


def test_launch_of_a_missing_binary_fails_and_rolls_back(tmp_path: Path) -> None:
    fds = open_fds()
    machine = Machine("guest0", lambda q, c: ["/nonexistent/qemu-system-x86_64", "-S"],
                      tmp_path)
    with pytest.raises(LaunchError) as info:
        machine.launch()
    err = info.value
    assert machine.state is MachineState.STOPPED
    assert err.argv == ("/nonexistent/qemu-system-x86_64", "-S")
    assert "/nonexistent/qemu-system-x86_64" in str(err)
    assert "No such file or directory" in str(err)
    assert err.returncode == 127  # setpriv's "command not found"
    assert "\n" not in str(err)
    assert open_fds() == fds
    machine.shutdown()
    assert machine.state is MachineState.STOPPED


def test_launch_of_a_qemu_that_exits_reports_its_exit_code(tmp_path: Path) -> None:
    fds = open_fds()
    machine = Machine("guest0", lambda q, c: ["/bin/false"], tmp_path)
    with pytest.raises(LaunchError) as info:
        machine.launch()
    assert str(info.value) == "guest0: QEMU did not answer on QMP; exit code 1"
    assert info.value.returncode == 1
    assert info.value.exit_code == 4
    assert machine.state is MachineState.STOPPED
    assert machine.exit_code == 1
    assert open_fds() == fds


def test_launch_of_a_qemu_that_never_greets_is_killed(tmp_path: Path) -> None:
    fds = open_fds()
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    machine = Machine("guest0", lambda q, c: silent, tmp_path, qmp_timeout=0.3)
    with pytest.raises(LaunchError, match="QEMU did not answer on QMP"):
        machine.launch()
    assert machine.state is MachineState.STOPPED
    assert machine.pid is not None and gone(machine.pid)
    assert open_fds() == fds


def test_illegal_calls_raise_state_errors(tmp_path: Path) -> None:
    machine = Machine("guest0", fake_qemu("obedient"), tmp_path)
    with pytest.raises(StateError, match="guest0: not allowed while created"):
        machine.ssh_port()
    with pytest.raises(StateError):
        machine.wait_exit(1)
    machine.shutdown()
    assert machine.state is MachineState.STOPPED
    with pytest.raises(StateError, match="not allowed while stopped"):
        machine.launch()
    with pytest.raises(StateError):
        machine.ssh_port()


def test_launch_twice_is_a_state_error_and_shutdown_is_idempotent(tmp_path: Path) -> None:
    machine = Machine("guest0", fake_qemu("obedient"), tmp_path)
    try:
        machine.launch()
        with pytest.raises(StateError, match="not allowed while running"):
            machine.launch()
    finally:
        machine.shutdown(timeout=2)
    machine.shutdown(timeout=2)
    machine.shutdown()
    assert machine.state is MachineState.STOPPED
    assert machine.exit_code == 0


def test_stubborn_qemu_is_killed_within_the_budget(tmp_path: Path) -> None:
    machine = Machine("guest0", fake_qemu("stubborn"), tmp_path)
    machine.launch()
    pid = machine.pid
    assert pid is not None
    started = time.monotonic()
    machine.shutdown(timeout=1.0)
    elapsed = time.monotonic() - started
    assert machine.state is MachineState.STOPPED
    assert machine.exit_code == -9  # SIGTERM was ignored; SIGKILL ended it
    assert gone(pid)
    assert elapsed < 1.0 + 0.5


def test_deaf_qemu_is_killed_within_the_budget(tmp_path: Path) -> None:
    machine = Machine("guest0", fake_qemu("deaf"), tmp_path)
    machine.launch()
    pid = machine.pid
    assert pid is not None
    started = time.monotonic()
    machine.shutdown(timeout=1.0)
    elapsed = time.monotonic() - started
    assert machine.state is MachineState.STOPPED
    assert machine.exit_code == -9
    assert gone(pid)
    assert elapsed < 1.0 + 0.5, f"shutdown took {elapsed:.2f} s"
