"""tracefs: kprobe events that are always removed again, and a parser for trace records.

``KprobeSession`` owns a group of probe events and a tracefs instance of its own: it checks
each target function against ``available_filter_functions``, adds the definitions, enables the
group and extra tracepoints in its instance only, and on exit (error or Ctrl-C included)
disables and deletes exactly what it added.  Its own instance means its own buffer: several
sessions (harness runs side by side) never see, clear or disable each other's records.
``parse_trace_line`` turns the default ftrace text format into typed records.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.errors import HostError

log = logging.getLogger(__name__)

TRACEFS_PATHS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))

# "  qemu-system-x86-1234  [001] d..1.  123.456789: prod: (irq_bypass_register_producer+0x0/0x1c0
#   [irqbypass]) prod=0x... token=0x... irq=25" (one line)
_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+(?:\(\s*[-\d]+\)\s+)?\[(?P<cpu>\d+)\]\s+"
    r"(?:(?P<flags>[^\s]{4,5})\s+)?(?P<ts>\d+\.\d+):\s+(?P<event>[\w.-]+):\s?(?P<body>.*)$")
_PROBE_SITE = re.compile(r"^\((?P<site>[^)]*)\)\s*")
_FIELD = re.compile(r"(?P<key>[A-Za-z_]\w*)=(?P<value>\"[^\"]*\"|\S+)")


@dataclass(frozen=True)
class TraceRecord:
    task: str
    pid: int
    cpu: int
    timestamp: float
    event: str
    body: str  # everything after "event: "
    site: str = ""  # "(func+0x0/0x1c0 [mod])" of a kprobe, "(caller <- func)" of a kretprobe
    fields: tuple[tuple[str, str], ...] = field(default=())

    def get(self, key: str, default: str | None = None) -> str | None:
        return next((v for k, v in self.fields if k == key), default)

    def int(self, key: str) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        try:
            return int(value, 0)
        except ValueError:
            return None


def parse_trace_line(line: str) -> TraceRecord | None:
    """One record of the default ftrace output; None for comments and lost-event notes."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    match = _LINE.match(line.rstrip("\n"))
    if not match:
        return None
    body = match.group("body")
    site = ""
    site_match = _PROBE_SITE.match(body)
    if site_match:
        site = site_match.group("site")
    fields = tuple((m.group("key"), m.group("value").strip('"'))
                   for m in _FIELD.finditer(body[site_match.end():] if site_match else body))
    return TraceRecord(match.group("task").strip(), int(match.group("pid")),
                       int(match.group("cpu")), float(match.group("ts")),
                       match.group("event"), body, site, fields)


def parse_trace(lines: Iterable[str]) -> Iterator[TraceRecord]:
    for line in lines:
        record = parse_trace_line(line)
        if record is not None:
            yield record


def find_tracefs(root: Path = Path("/")) -> Path:
    """The tracefs mount with kprobe events, mounting it at /sys/kernel/tracing if needed.

    Once mounted it stays mounted, as systemd mounts it on most hosts: other tracers, another
    harness run among them, may be using it, so it is never unmounted from under them.  A
    mounted tracefs without ``kprobe_events`` means a kernel without CONFIG_KPROBE_EVENTS.
    """
    for candidate in TRACEFS_PATHS:
        path = root / candidate.relative_to("/")
        if (path / "kprobe_events").exists():
            return path
    path = root / TRACEFS_PATHS[0].relative_to("/")
    mounted = False
    if path.is_dir() and not (path / "trace").exists():
        done = subprocess.run(["mount", "-t", "tracefs", "nodev", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise HostError("tracefs", f"not mounted, and mounting it at {path} failed: "
                            f"{done.stderr.strip() or done.returncode}")
        mounted = True
        log.info("mounted tracefs at %s", path)
    if (path / "kprobe_events").exists():
        return path
    if mounted:  # of no use, and nobody else can be using what was just mounted
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
    if (path / "trace").exists() or mounted:
        raise HostError("tracefs", f"{path} has no kprobe_events: this kernel was built "
                        "without CONFIG_KPROBE_EVENTS, so its IRQ bypass cannot be traced")
    raise HostError("tracefs", f"no tracefs at {path}: the kernel lacks CONFIG_TRACING")


@dataclass(frozen=True)
class ProbeSpec:
    """One kprobe/kretprobe event: ``p:GROUP/NAME SYMBOL FETCHARGS`` (or ``r:``)."""

    name: str
    symbol: str
    fetchargs: str = ""
    ret: bool = False
    optional: bool = False  # absent symbol: skip with a note instead of failing

    def definition(self, group: str, module: str | None = None) -> str:
        """The kprobe_events line; a symbol in a module is written MOD:SYM, as 6.1 requires."""
        kind = "r" if self.ret else "p"
        target = f"{module}:{self.symbol}" if module else self.symbol
        return f"{kind}:{group}/{self.name} {target} {self.fetchargs}".rstrip()


class KprobeSession:
    """Add probe events and tracepoints, read their records, and always remove them."""

    def __init__(self, group: str, probes: Sequence[ProbeSpec],
                 tracepoints: Sequence[str] = (), tracefs: Path | None = None,
                 instance: str | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", group):
            raise ValueError(f"bad kprobe group name {group!r}")
        self.group = group
        self.instance = instance or group
        self._made_instance = False
        self.probes = tuple(probes)
        self.tracepoints = tuple(tracepoints)
        self._tracefs = tracefs
        self.added: list[ProbeSpec] = []
        self.enabled_tracepoints: list[str] = []
        self.skipped: list[str] = []  # human-readable notes: what could not be probed and why

    @classmethod
    def left_behind(cls, group: str, probe_names: Sequence[str], tracefs: Path) -> KprobeSession:
        """A session standing for probes and an instance a dead process left, so that
        :meth:`stop` removes them as it would have."""
        session = cls(group, [ProbeSpec(name, "") for name in probe_names], (), tracefs, group)
        session.added = list(session.probes)
        session._made_instance = (tracefs / session._inst).is_dir()
        return session

    @property
    def tracefs(self) -> Path:
        if self._tracefs is None:
            self._tracefs = find_tracefs()
        return self._tracefs

    def _available(self, symbols: Iterable[str]) -> dict[str, str | None]:
        """Those of ``symbols`` that can be probed, each with its module ("func [mod]") or
        None if built in.  The file has a line per function (some 50,000): only the lines
        of the wanted names are looked at (splitting every line cost the harness inside the
        lab, under TCG, about half a second of each run)."""
        path = self.tracefs / "available_filter_functions"
        try:
            text = path.read_text()
        except OSError as exc:
            raise HostError("tracefs", f"cannot read {path}: {exc.strerror}") from exc
        found: dict[str, str | None] = {}
        for symbol in dict.fromkeys(symbols):
            at = text.find(symbol)
            while at != -1:
                end = text.find("\n", at)
                parts = text[at:end if end != -1 else len(text)].split()
                if (at == 0 or text[at - 1] == "\n") and parts[0] == symbol:
                    found[symbol] = parts[1].strip("[]") if len(parts) > 1 else None
                    break
                at = text.find(symbol, at + 1)
        return found

    def _write(self, name: str, text: str, append: bool = True) -> None:
        # One write(2) per line with O_APPEND and no seek: Python's buffered "a" mode also
        # seeks to the end, which the kernel's kprobe_events refuses (EINVAL).
        path = self.tracefs / name
        flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
        try:
            fd = os.open(path, flags)
            try:
                os.write(fd, (text + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise HostError("tracefs", f"writing {text!r} to {path}: {exc.strerror}") from exc

    @property
    def _inst(self) -> str:
        return f"instances/{self.instance}"

    def start(self) -> None:
        """Make the instance, add the probes, enable them and the tracepoints in it."""
        available = self._available(probe.symbol for probe in self.probes)
        try:
            (self.tracefs / self._inst).mkdir()
            self._made_instance = True
        except FileExistsError:
            pass  # a crashed session of a process with the same name: take it over
        except OSError as exc:
            raise HostError("tracefs", f"cannot make the instance {self._inst}: "
                            f"{exc.strerror}") from exc
        try:
            for probe in self.probes:
                if probe.symbol not in available:
                    note = (f"{probe.symbol}: not in available_filter_functions (inlined, "
                            "static, or its module is not loaded)")
                    if not probe.optional:
                        raise HostError("kprobe", note)
                    self.skipped.append(note)
                    continue
                self._write("kprobe_events", probe.definition(self.group,
                                                              available[probe.symbol]))
                self.added.append(probe)
            if self.added:
                self._write(f"{self._inst}/events/{self.group}/enable", "1", append=False)
            for tp in self.tracepoints:
                enable = self.tracefs / self._inst / "events" / tp / "enable"
                if not enable.exists():
                    self.skipped.append(f"tracepoint {tp}: not in this kernel")
                    continue
                self._write(f"{self._inst}/events/{tp}/enable", "1", append=False)
                self.enabled_tracepoints.append(tp)
        except BaseException:
            self.stop()
            raise

    def read(self) -> str:
        """The trace buffer's current text (records from every enabled event)."""
        return (self.tracefs / self._inst / "trace").read_text(errors="replace")

    def pipe(self) -> Iterator[str]:
        """Consuming, blocking reader of new records (``trace_pipe``)."""
        with open(self.tracefs / self._inst / "trace_pipe", errors="replace") as fh:
            yield from fh

    def stop(self) -> None:
        """Disable and delete exactly what was added; safe to call twice."""
        for tp in self.enabled_tracepoints:
            try:
                self._write(f"{self._inst}/events/{tp}/enable", "0", append=False)
            except HostError as exc:
                log.warning("%s", exc)
        self.enabled_tracepoints.clear()
        if self.added:
            try:
                self._write(f"{self._inst}/events/{self.group}/enable", "0", append=False)
            except HostError as exc:
                log.warning("%s", exc)
        for probe in reversed(self.added):
            try:
                self._write("kprobe_events", f"-:{self.group}/{probe.name}")
            except HostError as exc:
                log.warning("%s", exc)
        self.added.clear()
        if self._made_instance and self._tracefs is not None:
            try:
                (self._tracefs / self._inst).rmdir()
            except OSError as exc:
                log.warning("removing %s: %s", self._inst, exc.strerror)
            self._made_instance = False

    def __enter__(self) -> KprobeSession:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def remove_stale_sessions(prefix: str, tracefs: Path | None = None) -> list[str]:
    """Remove probe groups and instances named ``<prefix>_<pid>`` whose process is gone.

    A harness killed with SIGKILL cannot remove its own probes; its group and instance carry
    its pid, so a later ``harness restore`` can tell them from a live harness's and remove
    them.  Returns the groups removed; a kernel without kprobe events has none.
    """
    try:
        root = tracefs if tracefs is not None else find_tracefs()
    except HostError:
        return []
    pattern = re.compile(rf"^[pr]\d*:({re.escape(prefix)}_(\d+))/(\S+) ")
    stale: dict[str, list[str]] = {}
    for line in (root / "kprobe_events").read_text().splitlines():
        match = pattern.match(line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            stale.setdefault(match.group(1), []).append(match.group(3))
    instances = root / "instances"
    for inst in (instances.iterdir() if instances.is_dir() else []):
        match = re.fullmatch(rf"{re.escape(prefix)}_(\d+)", inst.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            stale.setdefault(inst.name, [])
    for group, names in stale.items():
        KprobeSession.left_behind(group, names, root).stop()
    return sorted(stale)
