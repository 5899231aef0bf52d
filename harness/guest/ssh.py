"""SSH into a guest with paramiko: per-run keys, a pinned host key, bounded retries.

The client key is made fresh for every run.  The guest's host key is never learned from the
network: the guest prints it on its serial console (a socketpair only the harness reads) and
the harness pins it, so the SSH connection is verified against it and any other key is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import GuestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientKey:
    """An ed25519 key pair made for one run; never written to disk."""

    private: paramiko.PKey
    public_line: str  # "ssh-ed25519 AAAA..."

    @property
    def public_b64(self) -> str:
        return self.public_line.split()[1]

    @staticmethod
    def generate() -> ClientKey:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
        return ClientKey(paramiko.Ed25519Key.from_private_key(io.StringIO(pem)), public)


def parse_host_key(line: str) -> paramiko.PKey:
    """A public key line ("ssh-ed25519 AAAA... [comment]") as a paramiko key."""
    parts = line.split()
    if len(parts) < 2:
        raise GuestError("ssh", f"malformed host key line {line!r}")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except (paramiko.SSHException, ValueError, binascii.Error) as exc:
        raise GuestError("ssh", f"unusable host key {parts[0]}: {exc}") from exc


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str
    seconds: float


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

    def connect(self, timeout: float, alive: Callable[[], bool],
                console_tail: Callable[[], str]) -> None:
        """Connect, retrying while the guest's sshd is not up yet; fail fast if QEMU died."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last: Exception | None = None
        while True:
            client = paramiko.SSHClient()
            client.get_host_keys().add(f"[127.0.0.1]:{self.port}", self._host_key.get_name(),
                                       self._host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            remaining = deadline - time.monotonic()
            try:
                client.connect("127.0.0.1", self.port, username=self.user,
                               pkey=self._client_key.private, timeout=max(remaining, 0.5),
                               banner_timeout=max(remaining, 0.5), auth_timeout=10,
                               allow_agent=False, look_for_keys=False)
                self._client = client
                return
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise GuestError(self.name, "the SSH server's host key differs from the key "
                                 "the guest printed on its console: refusing to connect",
                                 console_tail()) from exc
            except paramiko.AuthenticationException as exc:
                client.close()
                raise GuestError(self.name, f"SSH authentication failed: {exc}",
                                 console_tail()) from exc
            except (paramiko.SSHException, OSError, EOFError) as exc:
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

    def run(self, argv: Sequence[str], timeout: float, check: bool = False) -> CommandResult:
        if self._client is None:
            raise GuestError(self.name, "SSH is not connected")
        command = shlex.join(argv)
        started = time.monotonic()
        try:
            _, out, err = self._client.exec_command(command, timeout=timeout)
            stdout = out.read().decode("utf-8", "replace")
            stderr = err.read().decode("utf-8", "replace")
            status = out.channel.recv_exit_status()
        except (TimeoutError, paramiko.SSHException, OSError) as exc:
            raise GuestError(self.name, f"{command}: {type(exc).__name__}: {exc}") from exc
        result = CommandResult(tuple(argv), status, stdout, stderr, time.monotonic() - started)
        log.debug("%s: %s -> %d in %.2f s", self.name, command, status, result.seconds)
        if check and status != 0:
            raise GuestError(self.name, f"{command} exited {status}: "
                             f"{(stderr or stdout).strip()[-300:]}")
        return result

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
