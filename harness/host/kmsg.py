"""The host kernel's log from a moment on: what KVM, VFIO or the IOMMU said while a guest
booted (read when a boot is stuck, beside the vCPUs' state).

``/dev/kmsg`` is opened and moved to its end when the guest starts; reading the same
descriptor later yields only the records logged since (the kernel keeps a read position per
open file).  Records are ``LEVEL,SEQ,USEC,FLAGS;text`` (Documentation/ABI/testing/dev-kmsg);
their time is the kernel's own clock, not one Python reads, so the position, not a time,
marks the start.  Reading needs CAP_SYSLOG where ``kernel.dmesg_restrict`` is set; without it
there is simply no host log.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


@dataclass(frozen=True)
class KernelRecord:
    level: int  # 0 emerg .. 7 debug
    seconds: float  # the kernel's timestamp
    text: str

    def __str__(self) -> str:
        name = _LEVELS[self.level] if 0 <= self.level < len(_LEVELS) else str(self.level)
        return f"[{self.seconds:12.6f}] {name}: {self.text}"


class KernelLog:
    """The host's kernel log from the moment of :meth:`open`; None if it cannot be read."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def open(cls, path: str = "/dev/kmsg") -> KernelLog | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            return None
        return cls(fd)

    def read(self, limit: int = 400) -> tuple[list[KernelRecord], int]:
        """The records since :meth:`open` (or the last read), the latest ``limit`` of them,
        and how many older ones were dropped (by this limit, or overwritten in the kernel's
        ring before they were read)."""
        records: list[KernelRecord] = []
        dropped = 0
        while True:
            try:
                raw = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten in the ring: the read goes on
                    dropped += 1
                    continue
                break
            if not raw:
                break
            record = parse_record(raw.decode("utf-8", "replace"))
            if record is not None:
                records.append(record)
                if len(records) > limit:
                    del records[0]
                    dropped += 1
        return records, dropped

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parse_record(raw: str) -> KernelRecord | None:
    """One ``/dev/kmsg`` record; its continuation lines (`` KEY=value``) are dropped."""
    head, sep, rest = raw.partition(";")
    if not sep:
        return None
    fields = head.split(",")
    try:
        level = int(fields[0]) & 7  # the facility is in the bits above
        usec = int(fields[2])
    except (IndexError, ValueError):
        return None
    text = rest.split("\n", 1)[0]
    return KernelRecord(level, usec / 1e6, text)
