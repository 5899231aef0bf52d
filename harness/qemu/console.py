"""The guest's serial console: copied to a log file as it arrives, and waited on.

A reader thread owns the socket; waiters block on a condition (no sleep loops) until a line
matches what they want, a failure pattern shows up (a panic), QEMU closes the console, or
their time runs out.  The console is also the trusted channel the guest's host key comes over.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from harness.errors import GuestError

# Lines that mean the guest will not come up; waiting longer only hides the cause.
FATAL_PATTERNS = (
    re.compile(r"Kernel panic - not syncing"),
    re.compile(r"Attempted to kill init"),
    re.compile(r"VFS: Unable to mount root fs"),
    re.compile(r"^harness-init: fatal: "),  # the guest's init found it cannot go on
)


@dataclass(frozen=True)
class ConsoleLine:
    at: float  # time.monotonic() when the line was complete
    text: str


class Console:
    def __init__(self, name: str, sock: socket.socket, log_path: Path,
                 tail_lines: int = 40) -> None:
        self.name = name
        self._sock = sock
        self._log_path = log_path
        self._lines: list[ConsoleLine] = []
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        partial = b""
        with open(self._log_path, "ab", buffering=0) as log:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                partial += chunk
                *complete, partial = partial.split(b"\n")
                if complete:
                    now = time.monotonic()
                    with self._cond:
                        for raw in complete:
                            text = raw.decode("utf-8", "replace").rstrip("\r")
                            self._lines.append(ConsoleLine(now, text))
                            self._tail.append(text)
                        self._cond.notify_all()
        with self._cond:
            if partial:
                text = partial.decode("utf-8", "replace").rstrip("\r")
                self._lines.append(ConsoleLine(time.monotonic(), text))
                self._tail.append(text)
            self._closed = True
            self._cond.notify_all()

    def tail(self) -> str:
        with self._cond:
            return "\n".join(self._tail)

    def lines(self) -> list[ConsoleLine]:
        with self._cond:
            return list(self._lines)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float,
                 what: str = "") -> re.Match[str]:
        """Block until a console line matches; fail fast on a panic or a closed console."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    match = regex.search(line.text)
                    if match:
                        return match
                    if any(p.search(line.text) for p in FATAL_PATTERNS):
                        raise GuestError(self.name, f"guest failed while waiting for "
                                         f"{what or regex.pattern}: {line.text.strip()}",
                                         "\n".join(self._tail))
                seen = len(self._lines)
                if self._closed:
                    raise GuestError(self.name, f"console closed (QEMU exited) while waiting "
                                     f"for {what or regex.pattern}", "\n".join(self._tail))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(self.name, f"no {what or regex.pattern!r} on the console "
                                     f"within {timeout:g} s", "\n".join(self._tail))
                self._cond.wait(remaining)

    def first_time(self, pattern: str) -> float | None:
        """When the first line matching ``pattern`` arrived (monotonic), if it has."""
        regex = re.compile(pattern)
        return next((line.at for line in self.lines() if regex.search(line.text)), None)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5.0)
        self._sock.close()
