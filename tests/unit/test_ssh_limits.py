"""GuestSSH.run's limits against a fake guest: a real paramiko SSH server over a real
127.0.0.1 socket, in this process.  No guest is booted.

The fake serves exec requests the way the guest's dropbear does (stdout, stderr, an exit
status, then EOF and close) with scripted commands: a flood, a slow trickle, a stderr flood
beside a few stdout lines, a silent hang.  Like dropbear, it keeps a command running when
the client closes the channel; only the harness's stop (which names the command's mark)
ends it, so the tests see that the harness stops what it timed out.
"""

from __future__ import annotations

import re
import shlex
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import paramiko
import pytest
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from harness.config.model import VM, Scenario, VirtioNet, Workload
from harness.errors import GuestError
from harness.guest.agent import GuestAgent
from harness.guest.ssh import MARK, TAIL_BYTES, ClientKey, CommandResult, GuestSSH, _Tail
from harness.runner import run_workloads
from harness.vm import GuestVM

_MARKED = re.compile(rf"^export {MARK}=([0-9a-f]+); exec sh -c (.*)$", re.S)
_STOP = re.compile(rf"^t={MARK}=([0-9a-f]+); ")
_CHUNK = b"y\n" * 16384  # 32 KiB, what `yes` writes at a time


@dataclass
class Command:
    argv: list[str]
    token: str
    stopped: threading.Event = field(default_factory=threading.Event)


Script = Callable[[paramiko.Channel, Command], None]


def _flood(channel: paramiko.Channel, command: Command) -> None:
    """`yes`: stdout as fast as the client takes it, until stopped."""
    while not command.stopped.is_set():
        channel.sendall(_CHUNK)


def _trickle(channel: paramiko.Channel, command: Command) -> None:
    """One line every 0.3 s, forever: never idle long enough for a per-read timeout."""
    n = 0
    while not command.stopped.wait(0.3 if n else 0):
        channel.sendall(b"tick %d\n" % n)
        n += 1


def _hang(channel: paramiko.Channel, command: Command) -> None:
    """`sleep 600`: silent until stopped."""
    command.stopped.wait(600)


def _stderr_flood(channel: paramiko.Channel, command: Command) -> None:
    """10 MiB on stderr, five times the channel's window, with a stdout line after each
    half MiB: a client that reads stdout to its end before stderr never sees line 1."""
    for n in range(20):
        for _ in range(16):
            channel.sendall_stderr(_CHUNK)
        channel.sendall(b"line %d\n" % n)
    _exit(channel, 0)


def _count(channel: paramiko.Channel, command: Command) -> None:
    """Numbered lines on stdout, every 100th on stderr too, then exit 0."""
    for n in range(20_000):
        channel.sendall(b"%d\n" % n)
        if n % 100 == 0:
            channel.sendall_stderr(b"e%d\n" % n)
    _exit(channel, 0)


def _status(channel: paramiko.Channel, command: Command) -> None:
    channel.sendall(b"out\n")
    channel.sendall_stderr(b"err\n")
    _exit(channel, int(command.argv[1]))


def _json(channel: paramiko.Channel, command: Command) -> None:
    channel.sendall(b'{"agent": "harness-agent", "protocol": 1}\n')
    _exit(channel, 0)


def _exit(channel: paramiko.Channel, status: int) -> None:
    channel.send_exit_status(status)
    channel.shutdown_write()
    channel.close()


SCRIPTS: dict[str, Script] = {
    "flood": _flood, "trickle": _trickle, "hang": _hang, "stderr-flood": _stderr_flood,
    "count": _count, "status": _status, "harness-agent": _json}


class FakeGuest(paramiko.ServerInterface):
    """A dropbear stand-in on 127.0.0.1: public-key auth with the run's key, exec only."""

    def __init__(self, client_key: ClientKey, host_key: paramiko.PKey) -> None:
        self.client_key = client_key
        self.host_key = host_key
        self.commands: list[Command] = []
        self.stops: list[str] = []  # the tokens the harness asked to stop
        self.stop_status = 0  # 1: a stop that finds processes it cannot kill
        self.transports: list[paramiko.Transport] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(self.host_key)
            transport.start_server(server=self)
            self.transports.append(transport)

    def close(self) -> None:
        for command in self.commands:
            command.stopped.set()
        self._listener.close()
        for transport in self.transports:
            transport.close()

    # --- paramiko.ServerInterface ------------------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = key.get_base64() == self.client_key.public_b64
        return AUTH_SUCCESSFUL if ok else AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode()
        stop = _STOP.match(text)
        if stop:
            self.stops.append(stop.group(1))
            for running in self.commands:
                if running.token == stop.group(1) and self.stop_status == 0:
                    running.stopped.set()
            status = self.stop_status
            threading.Thread(target=self._serve, args=(lambda: _exit(channel, status),),
                             daemon=True).start()
            return True
        marked = _MARKED.match(text)
        if not marked:
            return False
        (inner,) = shlex.split(marked.group(2))
        running = Command(shlex.split(inner), marked.group(1))
        script = SCRIPTS.get(running.argv[0])
        if script is None:
            return False
        self.commands.append(running)
        threading.Thread(target=self._serve, args=(lambda: script(channel, running),),
                         daemon=True).start()
        return True

    @staticmethod
    def _serve(script: Callable[[], None]) -> None:
        # paramiko sends the exec request's reply after check_channel_exec_request returns;
        # dropbear's reply precedes any output, so let paramiko's go first.
        time.sleep(0.05)
        try:
            script()
        except OSError:
            pass  # the client closed the channel: like dropbear, keep quiet


@pytest.fixture
def fake() -> Iterator[FakeGuest]:
    guest = FakeGuest(ClientKey.generate(), ClientKey.generate().private)
    try:
        yield guest
    finally:
        guest.close()


@pytest.fixture
def ssh(fake: FakeGuest) -> Iterator[GuestSSH]:
    client = GuestSSH("guest0", fake.port, fake.host_key, fake.client_key)
    client.connect(10, lambda: True, lambda: "")
    try:
        yield client
    finally:
        client.close()


def _stopped(fake: FakeGuest, argv0: str) -> bool:
    """Whether the harness asked the guest to stop the (one) command named ``argv0``."""
    (command,) = [c for c in fake.commands if c.argv[0] == argv0]
    return command.token in fake.stops


# --- the wall-clock limit ---------------------------------------------------------------------


def test_a_flood_is_stopped_at_its_limit(fake: FakeGuest, ssh: GuestSSH) -> None:
    streamed = bytearray()
    started = time.monotonic()
    result = ssh.run(["flood"], 1.0, output=streamed.extend)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 2.0
    assert result.timed_out and result.exit_status == -1
    assert result.stdout_bytes == len(streamed) > 1 << 20
    assert len(result.stdout) == TAIL_BYTES and streamed.endswith(result.stdout.encode())
    assert _stopped(fake, "flood")


def test_a_slow_trickle_is_stopped_at_its_limit(fake: FakeGuest, ssh: GuestSSH) -> None:
    """One line every 0.3 s keeps every read busy: the limit is on the whole command."""
    started = time.monotonic()
    result = ssh.run(["trickle"], 1.0)
    assert 1.0 <= time.monotonic() - started < 2.0
    assert result.timed_out
    assert result.stdout.splitlines()[:3] == ["tick 0", "tick 1", "tick 2"]
    assert _stopped(fake, "trickle")


def test_a_silent_hang_is_stopped_at_its_limit(fake: FakeGuest, ssh: GuestSSH) -> None:
    started = time.monotonic()
    result = ssh.run(["hang"], 0.5)
    assert 0.5 <= time.monotonic() - started < 1.5
    assert result.timed_out and result.stdout == result.stderr == ""
    assert _stopped(fake, "hang")


def test_the_connection_stays_usable_after_a_timeout(fake: FakeGuest, ssh: GuestSSH) -> None:
    assert ssh.run(["flood"], 0.3).timed_out
    result = ssh.run(["status", "0"], 5)
    assert (result.exit_status, result.stdout, result.timed_out) == (0, "out\n", False)


def test_a_stop_that_fails_says_the_command_may_still_run(fake: FakeGuest,
                                                          ssh: GuestSSH) -> None:
    fake.stop_status = 1
    result = ssh.run(["hang"], 0.3)
    assert result.timed_out and result.left_running
    fake.stop_status = 0
    assert not ssh.run(["hang"], 0.3).left_running


def test_check_raises_on_a_timeout_with_the_limit(ssh: GuestSSH) -> None:
    with pytest.raises(GuestError, match=r"hang: still running after its limit of 0.3 s"):
        ssh.run(["hang"], 0.3, check=True)


# --- memory, the log, both streams --------------------------------------------------------


def test_memory_stays_bounded_while_a_flood_streams_to_the_log(
        ssh: GuestSSH, tmp_path: Path) -> None:
    log = tmp_path / "guest0.workload.log"
    tracemalloc.start()
    try:
        with log.open("ab", buffering=0) as sink:
            result = ssh.run(["flood"], 1.5, output=sink.write)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = log.stat().st_size
    assert size == result.stdout_bytes
    # What the old run() held is all of it; now the channel's window (2 MiB) and the tails.
    assert peak < 8 << 20, f"peak {peak} bytes while {size} bytes streamed"
    assert size > 2 * peak, f"the flood was too slow to show anything ({size} bytes)"


def test_the_log_holds_all_the_output_and_memory_its_tail(ssh: GuestSSH) -> None:
    streamed = bytearray()
    result = ssh.run(["count"], 30, output=streamed.extend, keep=4096)
    assert result.exit_status == 0 and not result.timed_out
    stdout = b"".join(b"%d\n" % n for n in range(20_000))
    stderr = b"".join(b"e%d\n" % n for n in range(0, 20_000, 100))
    assert result.stdout_bytes == len(stdout) and result.stderr_bytes == len(stderr)
    assert result.stdout == stdout[-4096:].decode()
    assert result.stderr == stderr[-4096:].decode()
    # In arrival order: the streams interleave, each in its own order, nothing lost.
    assert len(streamed) == len(stdout) + len(stderr)
    lines = bytes(streamed).split(b"\n")
    assert b"".join(ln + b"\n" for ln in lines if ln and not ln.startswith(b"e")) == stdout
    assert b"".join(ln + b"\n" for ln in lines if ln.startswith(b"e")) == stderr


def test_a_stderr_flood_does_not_stall_stdout(ssh: GuestSSH) -> None:
    started = time.monotonic()
    result = ssh.run(["stderr-flood"], 20)
    assert time.monotonic() - started < 10
    assert result.exit_status == 0 and not result.timed_out
    assert result.stdout.splitlines() == [f"line {n}" for n in range(20)]
    assert result.stderr_bytes == 20 * 16 * len(_CHUNK) and len(result.stderr) == TAIL_BYTES


def test_exit_status_and_both_streams(ssh: GuestSSH) -> None:
    result = ssh.run(["status", "3"], 5)
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(GuestError, match="status 3 exited 3: err"):
        ssh.run(["status", "3"], 5, check=True)


def test_a_lost_connection_is_an_error_not_an_exit_status(fake: FakeGuest,
                                                          ssh: GuestSSH) -> None:
    threading.Timer(0.3, fake.close).start()
    with pytest.raises(GuestError, match="connection closed before the command ended"):
        ssh.run(["hang"], 10)


def test_the_agent_says_when_it_got_no_answer(fake: FakeGuest, ssh: GuestSSH) -> None:
    SCRIPTS["harness-agent"] = _hang
    try:
        with pytest.raises(GuestError, match=r"harness-agent version: no answer within 0.5 s"):
            GuestAgent(ssh, timeout=0.5).check_version()
    finally:
        SCRIPTS["harness-agent"] = _json
    GuestAgent(ssh, timeout=5).check_version()


# --- the tail itself ------------------------------------------------------------------------


def test_tail_keeps_the_last_bytes_in_bounded_memory() -> None:
    tail = _Tail(10)
    for n in range(1000):
        tail.add(b"%04d," % n)
        assert len(tail._buf) <= 2 * 10 + 5
    assert tail.text() == "0998,0999," and tail.total == 5000
    empty = _Tail(0)
    empty.add(b"abc")
    assert empty.text() == "" and empty.total == 3 and not empty._buf


# --- the runner: streamed log, failed results, and the run goes on ------------------------


class FakeVM:
    """What run_workloads uses of a GuestVM: its name and run()."""

    def __init__(self, ssh: GuestSSH) -> None:
        self.name = "guest0"
        self._ssh = ssh

    def run(self, argv: tuple[str, ...], timeout: float,
            output: Callable[[bytes], object] | None = None) -> CommandResult:
        return self._ssh.run(argv, timeout, output=output)


def test_run_workloads_streams_the_log_and_goes_on_after_a_timeout(
        ssh: GuestSSH, tmp_path: Path) -> None:
    scenario = Scenario(
        name="limits", vms=(VM(name="guest0", devices=(VirtioNet(kind="virtio-net", id="net0"),)),),
        workloads=(Workload(vm="guest0", run=("trickle",), timeout_s=1.0),
                   Workload(vm="guest0", name="fails", run=("status", "2")),
                   Workload(vm="guest0", run=("status", "0"))))
    log = tmp_path / "guest0.workload.log"
    seen_while_running: list[str] = []
    threading.Timer(0.5, lambda: seen_while_running.append(log.read_text())).start()
    progress: list[str] = []
    vms = cast("tuple[GuestVM, ...]", (FakeVM(ssh),))
    started = time.monotonic()
    trickle, fails, ok = run_workloads(scenario, vms, tmp_path, progress.append)
    assert time.monotonic() - started < 3
    assert seen_while_running == ["$ trickle\ntick 0\ntick 1\n"]  # streamed, not at the end
    assert (trickle.timed_out, trickle.exit_status, trickle.timeout_s) == (True, -1, 1.0)
    assert not trickle.passed
    assert trickle.message.startswith("workload guest0: trickle: timed out: still running at "
                                      "its limit of 1 s, stopped")
    assert (fails.exit_status, fails.passed, fails.output_tail) == (2, False, "out\nerr")
    assert fails.message == f"workload guest0: fails: exit status 2 after {fails.seconds:.1f} s"
    assert ok.passed
    assert trickle.message in progress and fails.message in progress
    text = log.read_text()
    ticks = text.split("\n[timed out")[0].removeprefix("$ trickle\n") + "\n"
    assert ticks.startswith("tick 0\ntick 1\ntick 2\n") and len(ticks) == trickle.output_bytes
    assert trickle.output_tail == "\n".join(ticks.splitlines()[-3:])
    assert text.endswith("[timed out: still running at its limit of 1 s, stopped]\n"
                         "$ fails\nout\nerr\n[exit 2]\n$ status 0\nout\nerr\n[exit 0]\n")
