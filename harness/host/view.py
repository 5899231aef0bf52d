"""A view of a host's files, live (root ``/``) or a recorded tree, and the evidence read from it.

Every conclusion about a host (preflight, the IOMMU, PCI devices) carries :class:`Evidence`
lines: the file or command, the value seen, and what it means.  :class:`HostView` reads them
the same way from the live host and from a recorded fixture tree.
"""

from __future__ import annotations

import logging
import os
import platform as _pyplatform
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Generic, TypeVar

from harness.interrupts import InterruptSnapshot, InterruptsParseError, parse_proc_interrupts
from harness.platform import PLATFORMS, Platform, platform_of_uname

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A recorded tree stores what a command printed on the real host in a file at its root.
#: Live (root ``/``) the command is run instead.
COMMAND_FILES = {"dmesg": "dmesg.txt", "ip-addr": "ip-addr.json", "ip-route": "ip-route.json"}
#: A recording keeps a folder that was listed, even when it holds nothing else, by this empty
#: file in it (git keeps no empty folders); listings never show it.
FOLDER_MARKER = ".recorded"
#: A recording that could not keep sysfs symlinks lists them here instead.
SYMLINKS_FILE = "symlinks.txt"
_LIVE_COMMANDS = {"dmesg": ["dmesg"],
                  "ip-addr": ["ip", "-j", "addr", "show"],
                  "ip-route": ["ip", "-j", "route", "show", "table", "all"]}
_KERN_LOG_FALLBACK = "/var/log/kern.log"


# --- evidence and the host's files ---------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """One thing read on the host and what it means for a conclusion."""

    source: str  # "/proc/cmdline", "dmesg", "/sys/class/iommu/dmar0/intel-iommu/cap"
    value: str  # the line or value as read; "(absent)" for a missing file
    meaning: str

    def __str__(self) -> str:
        return f"{self.source}: {self.value} => {self.meaning}"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "value": self.value, "meaning": self.meaning}


@dataclass(frozen=True)
class Fact(Generic[T]):
    """A conclusion and the evidence for it."""

    value: T
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class LogLine:
    raw: str  # as printed, with its timestamp
    message: str  # without timestamp / caller / syslog prefixes


# "[    0.299491]", "[    T1]", "[Tue Aug 26 16:02:51 2025]", "[    0.299491][    T1]"
_BRACKETS = re.compile(r"(?:\[[^\]]*\]\s*)+")
# dmesg -x: "kern  :info  : "; syslog: "Nov 21 05:31:00 host kernel: " / ISO time.
_FACILITY = re.compile(r"[a-z]+\s*:[a-z]+\s*:\s")
_SYSLOG = re.compile(r"(?:[A-Za-z]{3}\s+\d+\s+[\d:]+|\d{4}-\d\d-\d\dT\S+)\s+\S+\s+kernel:\s")


def _strip_log_prefix(raw: str) -> str:
    text = raw
    for pattern in (_FACILITY, _SYSLOG):
        m = pattern.match(text)
        if m:
            text = text[m.end():]
    m = _BRACKETS.match(text)
    if m:
        text = text[m.end():]
    return text.rstrip()


@dataclass(frozen=True)
class KernelLog:
    """The kernel log as far as it could be read; ``source`` says from where (or why not)."""

    lines: tuple[LogLine, ...]
    source: str  # "dmesg", "/var/log/kern.log", or "" when nothing was readable
    problem: str | None = None

    @classmethod
    def from_text(cls, text: str, source: str) -> KernelLog:
        lines = tuple(LogLine(raw, _strip_log_prefix(raw)) for raw in text.splitlines()
                      if raw.strip())
        return cls(lines, source)

    def search(self, pattern: re.Pattern[str]) -> Iterator[tuple[LogLine, re.Match[str]]]:
        for line in self.lines:
            m = pattern.search(line.message)
            if m:
                yield line, m

    def first(self, pattern: re.Pattern[str]) -> tuple[LogLine, re.Match[str]] | None:
        return next(self.search(pattern), None)

    @property
    def has_boot(self) -> bool:
        """The log reaches back to early boot, so an absent boot-time line means something."""
        return any(ln.message.startswith(("Linux version", "Command line:",
                                          "Kernel command line:")) for ln in self.lines)

    def evidence(self, line: LogLine, meaning: str) -> Evidence:
        return Evidence(self.source or "kernel log", line.raw.strip(), meaning)


class HostView:
    """The host's files read under ``root``, and the output of the few commands preflight needs.

    ``root`` is ``/`` on a live host.  Any other root is a recorded tree that mirrors the real
    paths; command output is then read from the files in :data:`COMMAND_FILES` at its root
    (``dmesg.txt``, ``ip-addr.json``, ``ip-route.json``), and no command is ever run.
    """

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = Path(root)
        self.live = self.root.resolve() == Path("/")
        self._links = {} if self.live else self._recorded_links()

    def _recorded_links(self) -> dict[str, str]:
        """``symlinks.txt`` (``<host path> -> <target>`` per line): links a recording kept
        as text instead of as symlinks."""
        text = self.read_text(SYMLINKS_FILE)
        links = {}
        for line in (text or "").splitlines():
            path, sep, target = line.partition(" -> ")
            if sep:
                links[path.strip().rstrip("/")] = target.strip()
        return links

    def __repr__(self) -> str:
        return f"<HostView {self.root}{' (live)' if self.live else ''}>"

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def read_text(self, host_path: str) -> str | None:
        try:
            return self.path(host_path).read_text(errors="replace")
        except OSError:
            return None

    def read_value(self, host_path: str) -> str | None:
        text = self.read_text(host_path)
        return None if text is None else text.strip()

    def read_bytes(self, host_path: str) -> bytes | None:
        try:
            return self.path(host_path).read_bytes()
        except OSError:
            return None

    def listdir(self, host_path: str) -> tuple[str, ...]:
        try:
            names = set(os.listdir(self.path(host_path)))
        except OSError:
            names = set()
        prefix = host_path.rstrip("/") + "/"
        names.update(p[len(prefix):] for p in self._links
                     if p.startswith(prefix) and "/" not in p[len(prefix):])
        names.discard(FOLDER_MARKER)
        return tuple(sorted(names))

    def exists(self, host_path: str) -> bool:
        return os.path.lexists(self.path(host_path)) or host_path.rstrip("/") in self._links

    def link_name(self, host_path: str) -> str | None:
        """The last component of a symlink's target (``driver`` -> ``"e1000e"``)."""
        try:
            return os.path.basename(os.readlink(self.path(host_path)))
        except OSError:
            target = self._links.get(host_path.rstrip("/"))
            return os.path.basename(target) if target else None

    def realpath(self, host_path: str) -> str:
        """A path resolved inside the tree (symlinks in a fixture are relative, as in sysfs)."""
        return os.path.realpath(self.path(host_path))

    def command_output(self, name: str) -> tuple[str | None, str]:
        """(text, source) of one of :data:`COMMAND_FILES`; text is None if unavailable."""
        if not self.live:
            filename = COMMAND_FILES[name]
            text = self.read_text(filename)
            return text, filename
        argv = _LIVE_COMMANDS[name]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20,  # noqa: S603
                                  check=False, errors="replace")
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("%s failed: %s", argv, exc)
            return None, " ".join(argv)
        if done.returncode != 0:
            log.debug("%s exited %d: %s", argv, done.returncode, done.stderr.strip())
            return None, " ".join(argv)
        return done.stdout, " ".join(argv)

    @cached_property
    def kernel_log(self) -> KernelLog:
        text, source = self.command_output("dmesg")
        if text is not None and text.strip():
            return KernelLog.from_text(text, "dmesg")
        if self.live:
            fallback = self.read_text(_KERN_LOG_FALLBACK)
            if fallback:
                return KernelLog.from_text(fallback, _KERN_LOG_FALLBACK)
            return KernelLog((), "", f"cannot read the kernel log ({source} failed, "
                                     f"{_KERN_LOG_FALLBACK} unreadable)")
        return KernelLog((), "", f"the recorded tree has no {COMMAND_FILES['dmesg']}")

    @cached_property
    def cmdline(self) -> str | None:
        return self.read_value("/proc/cmdline")

    @cached_property
    def interrupts(self) -> InterruptSnapshot | None:
        text = self.read_text("/proc/interrupts")
        if text is None:
            return None
        try:
            return parse_proc_interrupts(text, source="/proc/interrupts")
        except InterruptsParseError as exc:
            log.warning("cannot parse %s: %s", self.path("/proc/interrupts"), exc)
            return None

    @cached_property
    def platform(self) -> Platform | None:
        """The host's platform: live from uname, recorded from its kernel log's own lines;
        None when it cannot be told (or the harness does not know the architecture)."""
        if self.live:
            return platform_of_uname(_pyplatform.machine())
        return next((p for p in PLATFORMS.values() if self.kernel_log.first(p.boot_log)),
                    None)

    @property
    def arch(self) -> str:
        """What ``uname -m`` prints on the host, or ``unknown``."""
        return self.platform.uname if self.platform else "unknown"


def cmdline_params(cmdline: str | None) -> dict[str, list[str]]:
    """``key=value`` words of the kernel command line, up to ``--`` (init's arguments)."""
    params: dict[str, list[str]] = {}
    for word in (cmdline or "").split():
        if word == "--":
            break
        key, _, value = word.partition("=")
        params.setdefault(key, []).append(value)
    return params


def parse_module_bool(value: str | None) -> bool | None:
    """A bool or int module parameter as sysfs prints it (``Y``/``N``, ``1``/``0``)."""
    if value is None:
        return None
    text = value.strip()
    if text in ("Y", "y", "1"):
        return True
    if text in ("N", "n", "0"):
        return False
    return None


class RecordingHostView(HostView):
    """The live host, read as :class:`HostView` reads it, with every file, folder listing,
    symlink and command output it reads copied into ``dest``: a recorded tree that
    ``HostView(dest)`` reads back the same way (``harness preflight --record``).

    Symlinks are kept as text in ``symlinks.txt`` (sysfs's links loop); a folder that was
    listed gets its entries as empty files or folders, so a listing reads back the same.
    """

    def __init__(self, dest: Path) -> None:
        super().__init__(Path("/"))
        self.dest = dest
        self._recorded_links_text: dict[str, str] = {}
        dest.mkdir(parents=True, exist_ok=True)

    def _copy(self, host_path: str, data: bytes) -> None:
        target = self.dest / host_path.lstrip("/")
        if target.is_dir():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def read_text(self, host_path: str) -> str | None:
        data = self.read_bytes(host_path)
        return None if data is None else data.decode(errors="replace")

    def read_bytes(self, host_path: str) -> bytes | None:
        data = super().read_bytes(host_path)
        if data is not None:
            self._copy(host_path, data)
        return data

    def listdir(self, host_path: str) -> tuple[str, ...]:
        names = super().listdir(host_path)
        for name in names:
            inner = f"{host_path.rstrip('/')}/{name}"
            if os.path.islink(self.path(inner)):
                self._note_link(inner)
            elif os.path.isdir(self.path(inner)):
                folder = self.dest / inner.lstrip("/")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / FOLDER_MARKER).touch()
            elif not (self.dest / inner.lstrip("/")).exists():
                self._copy(inner, b"")
        return names

    def exists(self, host_path: str) -> bool:
        found = super().exists(host_path)
        if found and os.path.isdir(self.path(host_path)):  # a device's folder: a folder
            (self.dest / host_path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif found and not (self.dest / host_path.lstrip("/")).exists():
            self._copy(host_path, b"")  # read elsewhere if it matters; here it exists
        return found

    def link_name(self, host_path: str) -> str | None:
        if os.path.islink(self.path(host_path)):
            self._note_link(host_path)
        return super().link_name(host_path)

    def _note_link(self, host_path: str) -> None:
        key = host_path.rstrip("/")
        if key not in self._recorded_links_text:
            self._recorded_links_text[key] = os.readlink(self.path(host_path))
            (self.dest / SYMLINKS_FILE).write_text("".join(
                f"{p} -> {t}\n" for p, t in sorted(self._recorded_links_text.items())))

    def command_output(self, name: str) -> tuple[str | None, str]:
        text, source = super().command_output(name)
        if text is not None:
            (self.dest / COMMAND_FILES[name]).write_text(text)
        return text, source
