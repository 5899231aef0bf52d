"""SSH into a guest with paramiko: per-run keys, a pinned host key, bounded retries.

The client key is made fresh for every run.  The guest's host key is never learned from the
network: the guest prints it on its serial console (a socketpair only the harness reads) and
the harness pins it, so the SSH connection is verified against it and any other key is refused.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import logging
import os
import secrets
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from harness.errors import GuestError

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

_preloading = threading.Lock()
_preloader: threading.Thread | None = None


def paramiko_lib() -> ModuleType:
    """paramiko, imported on first use.

    Importing it (with cryptography and PyNaCl) is the largest part of the harness's start:
    0.3 s here, 3-5 s for the harness inside the lab's emulated host.  :func:`preload` starts
    it on a thread while QEMU starts, so that the wait for the guest hides it.  paramiko's
    ``config`` module imports invoke (and with it unittest.mock and more) only to run an
    ssh_config ``Match exec`` line; the harness never reads an ssh_config, so invoke is
    declared absent, which paramiko handles (it imports invoke in a ``try``)."""
    if "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # type: ignore[assignment]
    import paramiko
    return paramiko


def preload() -> None:
    """Start importing paramiko on a thread, once; whoever needs it first waits for it (the
    import lock).  The caller holds no import lock: call it from running code, never from a
    module's top level."""
    global _preloader
    with _preloading:
        if _preloader is None and "paramiko" not in sys.modules:
            _preloader = threading.Thread(target=paramiko_lib, name="import-paramiko",
                                          daemon=True)
            _preloader.start()


@dataclass(frozen=True)
class ClientKey:
    """An ed25519 key pair made for one run; written to disk only for ``harness up`` (its
    ``pem``, 0600 in the run folder, removed at teardown), so that ``ssh`` reaches the VM."""

    public_line: str  # "ssh-ed25519 AAAA..."
    pem: str = field(repr=False)  # the private key, OpenSSH format

    @functools.cached_property
    def private(self) -> paramiko.PKey:
        """The key as paramiko signs with it (read from ``pem`` on first use)."""
        key: paramiko.PKey = paramiko_lib().Ed25519Key.from_private_key(io.StringIO(self.pem))
        return key

    @property
    def public_b64(self) -> str:
        return self.public_line.split()[1]

    @staticmethod
    def generate() -> ClientKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        return ClientKey(public, pem)

    @staticmethod
    def load(path: str) -> ClientKey:
        """A key :meth:`write` wrote (``harness irq watch`` reaches a VM of ``up`` with it)."""
        lib = paramiko_lib()
        try:
            with open(path) as fh:
                pem = fh.read()
            key = lib.Ed25519Key.from_private_key(io.StringIO(pem))
        except (OSError, lib.SSHException, ValueError) as exc:
            raise GuestError("ssh", f"{path}: cannot read the run's SSH key: {exc}") from exc
        loaded = ClientKey(f"{key.get_name()} {key.get_base64()}", pem)
        loaded.__dict__["private"] = key  # the cached property, already known
        return loaded

    def write(self, path: str) -> None:
        """The private key in a new file readable by its owner only (0600 from creation)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.pem)


def parse_host_key(line: str) -> paramiko.PKey:
    """A public key line ("ssh-ed25519 AAAA... [comment]") as a paramiko key."""
    parts = line.split()
    if len(parts) < 2:
        raise GuestError("ssh", f"malformed host key line {line!r}")
    lib = paramiko_lib()
    try:
        key: paramiko.PKey = lib.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
        return key
    except (lib.SSHException, ValueError, binascii.Error) as exc:
        raise GuestError("ssh", f"unusable host key {parts[0]}: {exc}") from exc


#: How much of each output stream :meth:`GuestSSH.run` keeps in memory by default: its tail.
TAIL_BYTES = 64 << 10

#: How long stopping a command that outlived its limit may take (one more SSH exec).
STOP_TIMEOUT_S = 5.0

#: The environment variable that marks every process a command starts, so that a command
#: that outlives its limit is stopped with all its children (see :func:`_stop_script`).
MARK = "HARNESS_COMMAND"

_READ_CHUNK = 64 << 10


@dataclass(frozen=True)
class CommandResult:
    """A command's end.  ``stdout`` and ``stderr`` are the last ``keep`` bytes of each (the
    whole stream went to ``output``); ``exit_status`` is -1 when there is none: stopped at
    its time limit (``timed_out``), or killed by a signal.  ``left_running``: timed out and
    the stop could not confirm that none of its processes is left in the guest."""

    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    left_running: bool = False


class _Tail:
    """The last ``keep`` bytes of a stream, and how many bytes it had in all."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if self._keep <= 0:
            return
        self._buf += data
        if len(self._buf) > 2 * self._keep:  # trim in batches: amortized O(1) per byte
            del self._buf[:-self._keep]

    def text(self) -> str:
        return bytes(self._buf[-self._keep:]).decode("utf-8", "replace") if self._keep else ""


def _marked(command: str, token: str) -> str:
    """``command`` with every process it runs carrying ``MARK=token`` in its environment.

    The ``exec sh`` makes the session's first process start afresh with the mark in the
    environment the kernel shows (``/proc/PID/environ``): busybox's shell may run an applet
    such as ``yes`` inside its own process, whose environ is still the one sshd gave it.
    """
    return f"export {MARK}={token}; exec sh -c {shlex.quote(command)}"


def _stop_script(token: str) -> str:
    """Kill every process whose environment carries the command's mark, until none is left.

    Closing the channel is not enough: dropbear leaves a session's command running when the
    client goes away (``yes`` with nobody reading, ``sleep 600``), and killing only the pid
    it started would leave that shell's children.  The mark is inherited by every child,
    grandchild and daemonized descendant; only this command's processes have this token.
    ``grep -z`` reads ``environ`` as the NUL-separated records it is (busybox's grep would
    otherwise stop at the first NUL), and busybox and GNU grep both have it.
    """
    return (f"t={MARK}={token}; for i in 1 2 3 4 5; do "
            "p=$(grep -lszxF \"$t\" /proc/[0-9]*/environ | cut -d/ -f3); "
            "[ -n \"$p\" ] || exit 0; kill -KILL $p 2>/dev/null; done; exit 1")


class GuestSSH:
    """One SSH connection to a guest on a forwarded 127.0.0.1 port."""

    def __init__(self, name: str, port: int, host_key: paramiko.PKey, client_key: ClientKey,
                 user: str = "root") -> None:
        self.name = name
        self.port = port
        self.user = user
        self._host_key = host_key
        self._client_key = client_key
        self._client: paramiko.SSHClient | None = None

    def __repr__(self) -> str:
        return f"<GuestSSH {self.name} 127.0.0.1:{self.port} {'up' if self._client else 'down'}>"

    @property
    def host_key(self) -> paramiko.PKey:
        """The guest's host key, as pinned from its console."""
        return self._host_key

    @property
    def client_key(self) -> ClientKey:
        return self._client_key

    def connect(self, timeout: float, alive: Callable[[], bool],
                console_tail: Callable[[], str]) -> None:
        """Connect, retrying while the guest's sshd is not up yet; fail fast if QEMU died."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last: Exception | None = None
        lib = paramiko_lib()
        while True:
            client = lib.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{self.port}", self._host_key.get_name(),
                                       self._host_key)
            client.set_missing_host_key_policy(lib.RejectPolicy())
            remaining = deadline - time.monotonic()
            try:
                client.connect("127.0.0.1", self.port, username=self.user,
                               pkey=self._client_key.private, timeout=max(remaining, 0.5),
                               banner_timeout=max(remaining, 0.5), auth_timeout=10,
                               allow_agent=False, look_for_keys=False)
                self._client = client
                return
            except lib.BadHostKeyException as exc:
                client.close()
                raise GuestError(self.name, "the SSH server's host key differs from the key "
                                 "the guest printed on its console: refusing to connect",
                                 console_tail()) from exc
            except lib.AuthenticationException as exc:
                client.close()
                raise GuestError(self.name, f"SSH authentication failed: {exc}",
                                 console_tail()) from exc
            except (lib.SSHException, OSError, EOFError) as exc:
                client.close()
                last = exc
            if not alive():
                raise GuestError(self.name, "QEMU exited before SSH came up", console_tail())
            if time.monotonic() + delay >= deadline:
                raise GuestError(self.name, f"SSH on 127.0.0.1:{self.port} not ready within "
                                 f"{timeout:g} s: {last}", console_tail())
            # The guest's sshd is starting; slirp accepts and then resets until it listens.
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def run(self, argv: Sequence[str], timeout: float, check: bool = False,
            output: Callable[[bytes], object] | None = None,
            keep: int = TAIL_BYTES) -> CommandResult:
        """Run ``argv`` for at most ``timeout`` seconds of wall clock, however much or little
        it prints.  Both streams are read as they arrive (neither can stall the other), each
        chunk goes to ``output`` in arrival order, and the last ``keep`` bytes of each are
        kept.  A command still running at the limit is killed with every process it started,
        and the result says ``timed_out``.  The command's stdin is closed (it reads EOF)."""
        if self._client is None:
            raise GuestError(self.name, "SSH is not connected")
        command = shlex.join(argv)
        started = time.monotonic()
        token = secrets.token_hex(8)
        out, err = _Tail(keep), _Tail(keep)
        status = self._exec(_marked(command, token), started + timeout, out, err, output,
                            what=command)
        timed_out = status is None
        left_running = timed_out and not self._stop(token, command)
        result = CommandResult(tuple(argv), -1 if status is None else status, out.text(),
                               err.text(), time.monotonic() - started, timed_out, out.total,
                               err.total, left_running)
        log.debug("%s: %s -> %s in %.2f s (%d + %d bytes of output)", self.name, command,
                  "timed out" if timed_out else status, result.seconds, out.total, err.total)
        if check and timed_out:
            raise GuestError(self.name, f"{command}: still running after its limit of "
                             f"{timeout:g} s ({'not ' if left_running else ''}stopped)")
        if check and result.exit_status != 0:
            raise GuestError(self.name, f"{command} exited {result.exit_status}: "
                             f"{(result.stderr or result.stdout).strip()[-300:]}")
        return result

    def _exec(self, command: str, deadline: float, out: _Tail, err: _Tail,
              output: Callable[[bytes], object] | None, what: str) -> int | None:
        """Run ``command`` on a channel of its own; its exit status, or None at ``deadline``.

        A watchdog closes the channel at the deadline so that no paramiko call (the exec
        request's reply included) can wait past it.  The sink's own errors (a full disk)
        pass through untranslated: they are not the guest's.
        """
        assert self._client is not None
        lib = paramiko_lib()
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise GuestError(self.name, f"{what}: the SSH connection is closed")
        try:
            channel = transport.open_session(timeout=max(deadline - time.monotonic(), 0.1))
        except (lib.SSHException, OSError, EOFError) as exc:
            raise GuestError(self.name, f"{what}: cannot open an SSH channel: "
                             f"{type(exc).__name__}: {exc}") from exc
        # Only the exec request can wait without a timeout of its own (for its reply): a
        # watchdog closes the channel at the deadline, which ends that wait.
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            channel.close()

        watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                channel.exec_command(command)
                channel.shutdown_write()
            except (lib.SSHException, OSError, EOFError) as exc:
                if fired.is_set():
                    return None
                raise GuestError(self.name, f"{what}: {type(exc).__name__}: {exc}") from exc
            finally:
                watchdog.cancel()
            if fired.is_set():
                return None
            try:
                return self._pump(channel, deadline, out, err, output, what)
            except (lib.SSHException, EOFError) as exc:  # not OSError: the sink's own
                raise GuestError(self.name, f"{what}: {type(exc).__name__}: {exc}") from exc
        finally:
            channel.close()

    def _pump(self, channel: paramiko.Channel, deadline: float, out: _Tail, err: _Tail,
              output: Callable[[bytes], object] | None, what: str) -> int | None:
        """Read both streams until the command's end, or None at ``deadline``.

        Each pass reads at most one chunk of each stream, so a flood on one neither starves
        the other nor the deadline.  Both of the channel's buffers signal one event (on data,
        EOF and close), so the wait is for either.  Not ``select`` on ``Channel.fileno()``:
        paramiko's ``Channel.close()`` closes that pipe while its transport thread may still
        write to it as data arrives, and a flood cut short at its limit then writes into a
        closed, or reused, file descriptor (seen here: the SSH connection's socket).
        """
        arrived = threading.Event()
        channel.in_buffer.set_event(arrived)
        channel.in_stderr_buffer.set_event(arrived)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            arrived.clear()  # whatever arrives after the checks below sets it again
            got = False
            for ready, recv, tail in ((channel.recv_ready, channel.recv, out),
                                      (channel.recv_stderr_ready, channel.recv_stderr, err)):
                if ready():
                    data = recv(_READ_CHUNK)
                    if data:
                        got = True
                        tail.add(data)
                        if output is not None:
                            output(data)
            if got:
                continue
            if channel.eof_received or channel.closed:
                if channel.recv_ready() or channel.recv_stderr_ready():
                    continue  # arrived between the reads above and the EOF
                # Every byte is in; the exit status comes with or just after the EOF.
                if not channel.status_event.wait(remaining):
                    return None
                status: int = channel.recv_exit_status()
                transport = channel.get_transport()
                if status == -1 and not (transport is not None and transport.is_active()):
                    raise GuestError(self.name, f"{what}: the SSH connection closed before "
                                     "the command ended")
                return status
            arrived.wait(remaining)

    def _stop(self, token: str, what: str) -> bool:
        """Kill whatever the timed-out command left running, within ``STOP_TIMEOUT_S``;
        whether the guest confirmed that nothing of it is left."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        out, err = _Tail(4096), _Tail(4096)
        try:
            status = self._exec(_stop_script(token), deadline, out, err, None,
                                what=f"stopping {what}")
        except GuestError as exc:
            log.warning("%s: could not stop %s: %s", self.name, what, exc.reason)
            return False
        if status != 0:
            log.warning("%s: %s may still be running in the guest (stop: %s %s)", self.name,
                        what, "no answer" if status is None else f"exit {status}",
                        err.text().strip()[-200:])
        return status == 0

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
