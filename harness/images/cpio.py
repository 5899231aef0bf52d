"""A deterministic cpio "newc" writer for initramfs images.

Entries are written sorted, owned by root, with one fixed mtime, so the same inputs always
give the same bytes (the image cache relies on it); GNU cpio needs several flags and a sorted
``find`` to get there, so the format (a few dozen lines) is written here directly.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: a regular file, a directory or a symlink."""

    path: str  # relative, no leading "/"
    mode: int  # full st_mode, type bits included
    data: bytes = b""  # file content, or the link target for a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def directory(path: str, perm: int = 0o755) -> Entry:
        return Entry(path, stat.S_IFDIR | perm)

    @staticmethod
    def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(path, stat.S_IFCHR | perm, b"", (major, minor))

    @staticmethod
    def symlink(path: str, target: str) -> Entry:
        return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def _header(ino: int, entry: Entry, name: bytes, mtime: int) -> bytes:
    fields = (ino, entry.mode, 0, 0, 1, mtime, len(entry.data), 0, 0, *entry.rdev,
              len(name) + 1, 0)
    return b"070701" + b"".join(b"%08X" % value for value in fields)


def _pad(out: BinaryIO, written: int) -> int:
    padding = (-written) % 4
    out.write(b"\0" * padding)
    return written + padding


def write_newc(out: BinaryIO, entries: Iterable[Entry], mtime: int = 0) -> None:
    """Write ``entries`` (sorted by path, parents implied first by the sort) and the trailer."""
    ordered = sorted(entries, key=lambda e: e.path)
    written = 0
    for ino, entry in enumerate([*ordered, Entry(_TRAILER, 0)], start=1):
        name = entry.path.encode()
        chunk = _header(ino if entry.path != _TRAILER else 0, entry, name, mtime)
        out.write(chunk + name + b"\0")
        written = _pad(out, written + len(chunk) + len(name) + 1)
        out.write(entry.data)
        written = _pad(out, written + len(entry.data))
