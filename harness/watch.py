"""``harness irq watch``: a live per-vector view of a VM's interrupts, like ``irqtop``.

Each frame is the difference of two readings of the guest's ``/proc/interrupts`` (over the
session's SSH, parsed by :mod:`harness.interrupts`): per vector its rate per second, in all
and per CPU, its device (the scenario's id, from the guest PCI address), its MSI/MSI-X entry
and its delivery path.  For an assigned device the host's side is read beside it: the
``vfio-msix[N]`` (or ``vfio-msi``) line of the same entry in the host's ``/proc/interrupts``,
its rate, and the bypass wiring the ``up`` process's tracker has seen; the path is then judged
by the same rules as a run's verdicts (:func:`harness.verdict.classify`), on this frame alone.
A vector that appears (a device plugged back) or vanishes shows as such.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.bypass.tracker import Wiring
from harness.errors import GuestError
from harness.guest.ssh import ClientKey, GuestSSH, parse_host_key
from harness.interrupts import InterruptSnapshot, VectorDelta, parse_proc_interrupts
from harness.verdict import classify


@dataclass(frozen=True)
class HostSide:
    """The host vector of an assigned device's guest vector, over the same frame."""

    irq: str
    count: int  # the host vector's interrupts in the frame
    total: int  # its count since it was set up
    rate: float
    wiring: str  # the tracker's one-line description, "" when unknown


@dataclass(frozen=True)
class Row:
    irq: str
    device: str  # the scenario's device id, "" for a vector of no scenario device
    bdf: str
    entry: int | None
    name: str
    rate: float  # interrupts per second over the frame
    per_cpu: tuple[float, ...]
    count: int  # interrupts in the frame
    total: int  # the guest's count since boot
    path: str  # emulated, posted, irqfd-bounce, ..., "idle" (nothing in this frame), "?"
    status: str  # "", "appeared", "vanished"
    host: HostSide | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"irq": self.irq, "device": self.device, "bdf": self.bdf, "entry": self.entry,
                "name": self.name, "rate": round(self.rate, 2),
                "per_cpu": [round(r, 2) for r in self.per_cpu], "count": self.count,
                "total": self.total, "path": self.path, "status": self.status,
                "host": None if self.host is None else {
                    "irq": self.host.irq, "count": self.host.count, "total": self.host.total,
                    "rate": round(self.host.rate, 2), "wiring": self.host.wiring}}


@dataclass(frozen=True)
class Frame:
    vm: str
    at: float  # time.time() at the frame's end
    seconds: float
    cpus: tuple[str, ...]
    rows: tuple[Row, ...]
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "at": self.at, "seconds": round(self.seconds, 3),
                "cpus": list(self.cpus), "rows": [r.to_dict() for r in self.rows],
                "note": self.note}


@dataclass(frozen=True)
class Device:
    """A scenario device as the session describes it."""

    id: str
    bdf: str
    emulated: bool
    host: str | None  # the host PCI address of an assigned device

    @staticmethod
    def of(entry: Mapping[str, Any]) -> Device:
        return Device(str(entry["id"]), str(entry["bdf"]), bool(entry["emulated"]),
                      str(entry["host"]) if entry.get("host") else None)


def _wiring_of(found: Mapping[str, Any]) -> Wiring:
    """A tracker wiring, as the up process sent it (``VectorWiring.to_dict``), for classify."""
    connected = bool(found.get("connected"))
    return Wiring(bool(found.get("producer")), bool(found.get("consumer")), connected,
                  bool(found.get("posted")), str(found.get("summary", "")),
                  connected and bool(found.get("vlpi_mapped")), None,
                  found.get("kind") == "intx", bool(found.get("resample")))


def make_frame(vm: str, devices: Sequence[Device], before: InterruptSnapshot,
               after: InterruptSnapshot, host_before: InterruptSnapshot | None = None,
               host_after: InterruptSnapshot | None = None,
               wiring: Sequence[Mapping[str, Any]] = (), all_rows: bool = False,
               note: str = "") -> Frame:
    """One frame from two guest readings (and two host readings for assigned devices)."""
    seconds = ((after.taken_at - before.taken_at)
               if after.taken_at is not None and before.taken_at is not None else 0.0)
    per_s = 1.0 / seconds if seconds > 0 else 0.0
    by_bdf = {d.bdf: d for d in devices}
    host_rows: dict[tuple[str, int], VectorDelta] = {}
    if host_before is not None and host_after is not None:
        for r in host_before.delta(host_after).rows:
            if r.vector is not None and any(a.startswith("vfio-") for a in r.line.actions):
                host_rows[(r.vector.bdf, r.vector.entry)] = r
    wired = {(str(w.get("bdf")), int(w.get("entry", -1))): w for w in wiring}
    rows = []
    for r in before.delta(after).rows:
        vector = r.vector
        device = by_bdf.get(vector.bdf) if vector is not None else None
        if vector is None and not (all_rows and r.total):
            continue
        line = r.line
        entry = vector.entry if vector is not None else None
        host = None
        path = "idle" if r.total == 0 else "?"
        if device is not None and device.host is not None and entry is not None:
            h = host_rows.get((device.host, entry))
            w = wired.get((device.host, entry))
            if h is not None:
                host = HostSide(h.label, h.total, h.line.total, h.total * per_s,
                                str(w.get("summary", "")) if w else "")
            if r.total:
                found, _ = classify(False, r.total, h.total if h is not None else None,
                                    _wiring_of(w) if w else None)
                path = found.value if found is not None else "?"
        elif r.total and (device is None or device.emulated):
            path = "emulated" if device is not None else "-"
        rows.append(Row(r.label, device.id if device else "", vector.bdf if vector else "-",
                        entry, line.name, r.total * per_s,
                        tuple(c * per_s for c in r.per_cpu), r.total, line.total, path,
                        "" if r.status == "both" else r.status, host))
    order = {d.bdf: i for i, d in enumerate(devices)}
    rows.sort(key=lambda row: (order.get(row.bdf, len(order)), row.bdf,
                               row.entry if row.entry is not None else -1, row.irq))
    return Frame(vm, time.time(), seconds, after.cpus, tuple(rows), note)


def format_frame(frame: Frame) -> str:
    """A fixed-width table: one row per vector, rates per second."""
    cpus = list(frame.cpus)
    header = ["IRQ", "DEVICE", "BDF", "ENTRY", "NAME", "RATE/s", *[f"{c}/s" for c in cpus],
              "TOTAL", "PATH", "HOST IRQ", "HOST/s", "HOST TOTAL", "WIRING"]
    body = []
    for r in frame.rows:
        cells = ([f"{x:.0f}" for x in r.per_cpu] if len(r.per_cpu) == len(cpus)
                 else [""] * len(cpus))
        h = r.host
        path = r.path + (f" ({r.status})" if r.status else "")
        body.append([r.irq, r.device or "-", r.bdf, "-" if r.entry is None else str(r.entry),
                     r.name, f"{r.rate:.1f}", *cells, str(r.total), path,
                     h.irq if h else "", f"{h.rate:.1f}" if h else "", str(h.total) if h else "",
                     h.wiring if h else ""])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    numeric = {3, 5, *range(6, 6 + len(cpus)), 6 + len(cpus), 9 + len(cpus), 10 + len(cpus)}

    def render(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    stamp = time.strftime("%H:%M:%S", time.localtime(frame.at))
    head = f"{frame.vm}  {stamp}  over {frame.seconds:.2f} s" + (
        f"  ({frame.note})" if frame.note else "")
    return "\n".join([head, render(header), *(render(row) for row in body)])


# --- reading a VM of harness up ---------------------------------------------------------------


def guest_ssh(name: str, port: int, user: str, key_file: str, known_hosts: str,
              timeout: float = 30.0) -> GuestSSH:
    """An SSH connection to a VM of ``up`` with the run's key and its pinned host key."""
    try:
        fields = Path(known_hosts).read_text().split()
    except OSError as exc:
        raise GuestError(name, f"{known_hosts}: {exc.strerror}") from exc
    if len(fields) < 3:
        raise GuestError(name, f"{known_hosts}: no host key in it")
    ssh = GuestSSH(name, port, parse_host_key(" ".join(fields[1:3])),
                   ClientKey.load(key_file), user)
    ssh.connect(timeout, lambda: True, lambda: "")
    return ssh


def guest_reader(ssh: GuestSSH) -> Callable[[], InterruptSnapshot]:
    def read() -> InterruptSnapshot:
        done = ssh.run(["cat", "/proc/interrupts"], 30.0, check=True)
        return parse_proc_interrupts(done.stdout, source=f"{ssh.name}:/proc/interrupts",
                                     taken_at=time.monotonic())
    return read


def host_reader(proc: Path = Path("/proc/interrupts")) -> Callable[[], InterruptSnapshot]:
    def read() -> InterruptSnapshot:
        return parse_proc_interrupts(proc.read_text(), source=str(proc),
                                     taken_at=time.monotonic())
    return read


def frames(vm: str, devices: Sequence[Device], guest: Callable[[], InterruptSnapshot],
           interval: float, host: Callable[[], InterruptSnapshot] | None = None,
           wiring: Callable[[], tuple[Sequence[Mapping[str, Any]], str]] | None = None,
           all_rows: bool = False, count: int | None = None) -> Iterator[Frame]:
    """Frames every ``interval`` seconds (``count`` of them, or until the caller stops)."""
    before = guest()
    host_before = host() if host is not None else None
    made = 0
    while count is None or made < count:
        next_at = (before.taken_at or time.monotonic()) + interval
        time.sleep(max(next_at - time.monotonic(), 0.0))
        after = guest()
        host_after = host() if host is not None else None
        found, note = wiring() if wiring is not None else ((), "")
        yield make_frame(vm, devices, before, after, host_before, host_after, found,
                         all_rows, note)
        before, host_before = after, host_after
        made += 1
