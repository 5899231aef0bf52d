"""Bind PCI devices to vfio-pci and always give them back, even after a crash.

Before the first write to sysfs, a journal entry (device, original driver, original
``driver_override``, owning process) is written and fsync'd.  The binding is undone when the
context exits (normally, on error, on Ctrl-C), and ``restore_all`` undoes whatever a killed
run left behind (``harness restore``).  An entry leaves the journal only once its device is
back on its original driver, so restoring twice is harmless.

The sysfs writes sit behind :class:`DriverControl`; :class:`SysfsDriverControl` is the real
one.  Restoring unbinds vfio-pci, which blocks while a process (QEMU) still holds the device:
stop the VM first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from harness.errors import HostError
from harness.host.iommu import group_members
from harness.host.pci import read_pci_device
from harness.host.view import HostView
from harness.interrupts import normalize_bdf

log = logging.getLogger(__name__)

DEFAULT_JOURNAL = Path("/var/lib/harness/bindings.json")
VFIO_PCI = "vfio-pci"
_JOURNAL_VERSION = 1


# --- the seam: who writes to sysfs ---------------------------------------------------------


class DriverControl(Protocol):
    """The few sysfs operations binding needs."""

    def exists(self, bdf: str) -> bool: ...

    def driver(self, bdf: str) -> str | None: ...

    def driver_override(self, bdf: str) -> str | None: ...

    def set_driver_override(self, bdf: str, driver: str | None) -> None: ...

    def unbind(self, bdf: str) -> None: ...

    def probe(self, bdf: str) -> None: ...

    def ensure_driver(self, driver: str) -> None: ...


class SysfsDriverControl:
    """The real thing: ``driver_override``, ``driver/unbind`` and ``drivers_probe``."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root

    def __repr__(self) -> str:
        return f"<SysfsDriverControl {self.root}>"

    def _dev(self, bdf: str) -> Path:
        return self.root / "sys/bus/pci/devices" / bdf

    def _write(self, path: Path, text: str, bdf: str) -> None:
        try:
            with open(path, "w") as fh:
                fh.write(text)
        except OSError as exc:
            raise HostError(bdf, f"writing {text.strip()!r} to {path}: "
                                 f"{exc.strerror or exc}") from exc

    def exists(self, bdf: str) -> bool:
        return self._dev(bdf).exists()

    def driver(self, bdf: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self._dev(bdf) / "driver"))
        except OSError:
            return None

    def driver_override(self, bdf: str) -> str | None:
        try:
            value = (self._dev(bdf) / "driver_override").read_text().strip()
        except OSError:
            return None
        return None if value in ("", "(null)") else value

    def set_driver_override(self, bdf: str, driver: str | None) -> None:
        # An empty write (a lone newline) clears the override.
        self._write(self._dev(bdf) / "driver_override", f"{driver or ''}\n", bdf)

    def unbind(self, bdf: str) -> None:
        self._write(self._dev(bdf) / "driver" / "unbind", bdf, bdf)

    def probe(self, bdf: str) -> None:
        self._write(self.root / "sys/bus/pci/drivers_probe", bdf, bdf)

    def ensure_driver(self, driver: str) -> None:
        if (self.root / "sys/bus/pci/drivers" / driver).is_dir():
            return
        module = driver.replace("-", "_")
        done = subprocess.run(["modprobe", module], capture_output=True, text=True,  # noqa: S603
                              check=False)
        if not (self.root / "sys/bus/pci/drivers" / driver).is_dir():
            raise HostError(driver, f"driver not available: modprobe {module} said "
                                    f"{done.stderr.strip() or done.returncode}")


# --- the journal ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalEntry:
    bdf: str
    original_driver: str | None
    original_override: str | None
    owner_pid: int
    owner_start: str  # /proc/<pid>/stat start time: tells a live owner from a reused pid
    created: str


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after "pid (comm)"


def owner_alive(entry: JournalEntry) -> bool:
    return _proc_start(entry.owner_pid) == entry.owner_start


class Journal:
    """A JSON list of bindings to undo, rewritten atomically and fsync'd on every change."""

    def __init__(self, path: Path = DEFAULT_JOURNAL) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<Journal {self.path}>"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write cycles between harness processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> list[JournalEntry]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise HostError(str(self.path), f"unreadable binding journal: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != _JOURNAL_VERSION:
            raise HostError(str(self.path), "not a binding journal of version "
                                            f"{_JOURNAL_VERSION}")
        try:
            return [JournalEntry(**entry) for entry in data.get("entries", [])]
        except TypeError as exc:
            raise HostError(str(self.path), f"malformed journal entry: {exc}") from exc

    def write(self, entries: Sequence[JournalEntry]) -> None:
        payload = json.dumps({"version": _JOURNAL_VERSION,
                              "entries": [asdict(e) for e in entries]}, indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def add(self, entry: JournalEntry) -> None:
        with self.locked():
            entries = [e for e in self.read() if e.bdf != entry.bdf]
            self.write([*entries, entry])

    def remove(self, bdf: str) -> None:
        with self.locked():
            entries = self.read()
            if any(e.bdf == bdf for e in entries):
                self.write([e for e in entries if e.bdf != bdf])

    def get(self, bdf: str) -> JournalEntry | None:
        return next((e for e in self.read() if e.bdf == bdf), None)


# --- restore -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    bdf: str
    outcome: str  # "restored", "skipped", "failed"
    detail: str

    @property
    def ok(self) -> bool:
        return self.outcome == "restored"


def restore_entry(entry: JournalEntry, control: DriverControl, journal: Journal) -> RestoreResult:
    """Put one device back on its original driver; drop the entry only if that worked."""
    bdf, original = entry.bdf, entry.original_driver
    if not control.exists(bdf):
        return RestoreResult(bdf, "failed", "the device is gone (hot-unplugged?); the entry "
                             "is kept")
    try:
        current = control.driver(bdf)
        if current != original and current is not None:
            control.unbind(bdf)
        control.set_driver_override(bdf, entry.original_override)
        if original is not None and control.driver(bdf) != original:
            control.probe(bdf)
    except HostError as exc:
        return RestoreResult(bdf, "failed", exc.reason)
    now = control.driver(bdf)
    if now != original:
        return RestoreResult(bdf, "failed", f"still on {now or 'no driver'} after probing, "
                             f"expected {original or 'no driver'}; the entry is kept")
    journal.remove(bdf)
    return RestoreResult(bdf, "restored", f"back on {original or 'no driver'}")


def restore_all(journal: Journal | Path = DEFAULT_JOURNAL, *, control: DriverControl | None = None,
                force: bool = False,
                alive: Callable[[JournalEntry], bool] = owner_alive) -> tuple[RestoreResult, ...]:
    """``harness restore``: undo every journalled binding whose owner is gone.

    An entry whose owning harness process still runs is skipped (it will restore it itself,
    and unbinding under a running QEMU would block) unless ``force``.
    """
    journal = journal if isinstance(journal, Journal) else Journal(journal)
    control = control if control is not None else SysfsDriverControl()
    results = []
    for entry in journal.read():
        if not force and alive(entry):
            results.append(RestoreResult(entry.bdf, "skipped", f"bound by harness process "
                                         f"{entry.owner_pid}, which is still running"))
            continue
        results.append(restore_entry(entry, control, journal))
    return tuple(results)


# --- binding -------------------------------------------------------------------------------


def refusal_reason(bdf: str, view: HostView) -> str | None:
    """Why binding ``bdf`` would hurt the host: it, or a device of its group, is in use."""
    device = read_pci_device(bdf, view)
    if device.in_use:
        return f"in use by the host: {device.in_use[0].reason}"
    if device.iommu_group is not None:
        for member in group_members(view, device.iommu_group):
            if member == bdf:
                continue
            try:
                other = read_pci_device(member, view)
            except HostError:
                continue
            if other.in_use:
                return (f"IOMMU group {device.iommu_group} also holds {member}, in use by the "
                        f"host: {other.in_use[0].reason}")
    return None


class VfioBinding:
    """Bind devices to vfio-pci for the life of a ``with`` block.

    ``with VfioBinding(["0000:00:05.0"]) as binding: ...`` refuses (:class:`HostError`) a
    device the host uses, or whose IOMMU group holds one, unless ``force``.  Pass every
    non-bridge member of an IOMMU group for VFIO to be able to open it.
    """

    def __init__(self, devices: Sequence[str], *, journal: Journal | Path = DEFAULT_JOURNAL,
                 force: bool = False, root: Path = Path("/"),
                 control: DriverControl | None = None,
                 alive: Callable[[JournalEntry], bool] = owner_alive) -> None:
        self.devices = tuple(normalize_bdf(d) for d in devices)
        self.journal = journal if isinstance(journal, Journal) else Journal(journal)
        self.force = force
        self.view = HostView(root)
        self.control = control if control is not None else SysfsDriverControl(root)
        self._alive = alive
        self.bound: list[str] = []  # devices this object changed, in order

    def __repr__(self) -> str:
        return f"<VfioBinding {' '.join(self.devices)} bound={self.bound}>"

    def __enter__(self) -> VfioBinding:
        try:
            for bdf in self.devices:
                self._bind_one(bdf)
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        results = self.restore()
        failed = [r for r in results if not r.ok]
        if failed and exc is None:
            raise HostError(failed[0].bdf, f"could not restore the original driver: "
                                           f"{failed[0].detail}; run 'harness restore'")
        for r in failed:
            log.error("%s: restore failed: %s (run 'harness restore')", r.bdf, r.detail)

    def _bind_one(self, bdf: str) -> None:
        control = self.control
        if not control.exists(bdf):
            raise HostError(bdf, "no such PCI device")
        existing = self.journal.get(bdf)
        if existing is not None and self._alive(existing) and existing.owner_pid != os.getpid():
            raise HostError(bdf, f"already bound by harness process {existing.owner_pid}")
        if not self.force:
            reason = refusal_reason(bdf, self.view)
            if reason:
                raise HostError(bdf, f"refusing to take it from the host: {reason} "
                                     "(force to override)")
        current = control.driver(bdf)
        if current == VFIO_PCI and existing is None:
            log.info("%s: already on vfio-pci; nothing to bind or restore", bdf)
            return
        start = _proc_start(os.getpid()) or ""
        if existing is not None:
            # A crashed run bound it: keep its record of the true original driver.
            entry = JournalEntry(bdf, existing.original_driver, existing.original_override,
                                 os.getpid(), start, existing.created)
        else:
            entry = JournalEntry(bdf, current, control.driver_override(bdf), os.getpid(), start,
                                 time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.bound.append(bdf)  # first: an interrupt after the journal write is still undone
        self.journal.add(entry)  # written and fsync'd before any change to the device
        control.ensure_driver(VFIO_PCI)
        control.set_driver_override(bdf, VFIO_PCI)
        if current is not None and current != VFIO_PCI:
            control.unbind(bdf)
        if control.driver(bdf) != VFIO_PCI:
            control.probe(bdf)
        now = control.driver(bdf)
        if now != VFIO_PCI:
            raise HostError(bdf, f"vfio-pci did not bind (driver now {now or 'none'}); is the "
                                 "IOMMU on and the device in an IOMMU group?")
        log.info("%s: bound to vfio-pci (was %s)", bdf, entry.original_driver or "unbound")

    def restore(self) -> tuple[RestoreResult, ...]:
        """Undo this object's bindings, last first.  Safe to call more than once."""
        results = []
        for bdf in reversed(self.bound):
            entry = self.journal.get(bdf)
            if entry is None:
                continue
            results.append(restore_entry(entry, self.control, self.journal))
        self.bound = [r.bdf for r in results if not r.ok][::-1]
        return tuple(results)
