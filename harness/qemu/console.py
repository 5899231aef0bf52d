"""The guest's serial console: copied to a log file as it arrives, and waited on.

A reader thread owns the socket; waiters block on a condition (no sleep loops) until a line
matches what they want, a failure pattern shows up (a panic), QEMU closes the console, or
their time runs out.  The console is also the trusted channel the guest's host key comes over.
The log file keeps everything; memory keeps only the latest lines (a guest that floods its
console cannot grow the harness), each numbered from the first so a follower knows what it
has not seen.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from harness.errors import GuestError, GuestTimeout

# Lines that mean the guest will not come up; waiting longer only hides the cause.
FATAL_PATTERNS = (
    re.compile(r"Kernel panic - not syncing"),
    re.compile(r"Attempted to kill init"),
    re.compile(r"VFS: Unable to mount root fs"),
    re.compile(r"^harness-init: fatal: "),  # the guest's init found it cannot go on
)


@dataclass(frozen=True, slots=True)
class ConsoleLine:
    at: float  # time.monotonic() when the line was complete
    text: str
    number: int = 0  # 0 for the console's first line, counting every line since


class Console:
    """``keep_lines`` and ``keep_bytes`` bound the lines kept in memory (the oldest go
    first); a line longer than ``max_line_bytes`` is cut there into several."""

    def __init__(self, name: str, sock: socket.socket, log_path: Path,
                 tail_lines: int = 40, keep_lines: int = 10_000, keep_bytes: int = 1 << 20,
                 max_line_bytes: int = 16 << 10) -> None:
        self.name = name
        self._sock = sock
        self._log_path = log_path
        self._keep_lines = keep_lines
        self._keep_bytes = keep_bytes
        self._max_line = max_line_bytes
        self._lines: deque[ConsoleLine] = deque()
        self._kept_bytes = 0
        self._count = 0  # lines since the console opened, kept or not
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
                while len(partial) > self._max_line:  # no newline for that long: cut it
                    complete.append(partial[:self._max_line])
                    partial = partial[self._max_line:]
                if complete:
                    now = time.monotonic()
                    with self._cond:
                        for raw in complete:
                            for start in range(0, max(len(raw), 1), self._max_line):
                                self._add(now, raw[start:start + self._max_line])
                        self._cond.notify_all()
        with self._cond:
            if partial:
                self._add(time.monotonic(), partial)
            self._closed = True
            self._cond.notify_all()

    def _add(self, now: float, raw: bytes) -> None:
        """Keep one line, dropping the oldest past the bounds (the caller holds the lock)."""
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self._lines.append(ConsoleLine(now, text, self._count))
        self._count += 1
        self._kept_bytes += len(text)
        self._tail.append(text)
        while self._lines and (len(self._lines) > self._keep_lines
                               or self._kept_bytes > self._keep_bytes):
            self._kept_bytes -= len(self._lines.popleft().text)

    def tail(self) -> str:
        with self._cond:
            return "\n".join(self._tail)

    def lines(self, since: int = 0) -> list[ConsoleLine]:
        """The lines still in memory whose ``number`` is ``since`` or more, oldest first.

        Memory keeps the latest lines only (``keep_lines``, ``keep_bytes``; the log file has
        them all), so a follower asks for the lines after the last number it saw:
        ``new = console.lines(since=seen); seen = new[-1].number + 1 if new else seen``.
        """
        with self._cond:
            return list(self._since(since))

    @property
    def line_count(self) -> int:
        """How many lines the console has had since it opened, kept in memory or not."""
        with self._cond:
            return self._count

    def _since(self, number: int) -> itertools.islice[ConsoleLine]:
        """The kept lines numbered ``number`` or more (the caller holds the lock)."""
        first = self._count - len(self._lines)
        return itertools.islice(self._lines, max(number - first, 0), None)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float,
                 what: str = "") -> re.Match[str]:
        """Block until a console line matches (a line still in memory, or a new one); fail
        fast on a panic or a closed console."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._since(seen):
                    match = regex.search(line.text)
                    if match:
                        return match
                    if any(p.search(line.text) for p in FATAL_PATTERNS):
                        raise GuestError(self.name, f"guest failed while waiting for "
                                         f"{what or regex.pattern}: {line.text.strip()}",
                                         "\n".join(self._tail))
                seen = self._count
                if self._closed:
                    raise GuestError(self.name, f"console closed (QEMU exited) while waiting "
                                     f"for {what or regex.pattern}", "\n".join(self._tail))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(self.name, f"no {what or regex.pattern!r} on the "
                                       f"console within {timeout:g} s", "\n".join(self._tail))
                self._cond.wait(remaining)

    def first_time(self, pattern: str) -> float | None:
        """When the first line matching ``pattern`` arrived (monotonic), if it has and is
        still in memory."""
        regex = re.compile(pattern)
        return next((line.at for line in self.lines() if regex.search(line.text)), None)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5.0)
        self._sock.close()
