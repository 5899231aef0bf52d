"""The host's side of the evidence for assigned devices: its vfio vector counts and the bypass
wiring, gathered while the guests run.

``HostEvidence`` is a context manager: entering it preflights the assigned devices and puts
the bypass probes in (before QEMU starts, so every producer and consumer registration is
seen); leaving it removes them.  Inside, :meth:`HostEvidence.snapshot` reads the host's
/proc/interrupts (while the guests still run: vfio lines vanish when QEMU exits) and
:meth:`HostEvidence.measure` turns two snapshots and the trace into a frozen
:class:`HostMeasurement`, which answers, per host vector, the count delta and the wiring.
Without kprobe events the counts are still taken and the measurement says why the wiring is
unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from harness.bypass.live import bypass_session
from harness.bypass.tracker import BypassTracker, VectorWiring
from harness.errors import HostError
from harness.host.accel import AccelDecision, KvmProbe
from harness.host.preflight import PreflightReport, preflight
from harness.host.tracefs import KprobeSession, parse_trace
from harness.interrupts import InterruptDelta, InterruptSnapshot, parse_proc_interrupts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSnapshot:
    raw: str
    interrupts: InterruptSnapshot


@dataclass(frozen=True)
class HostMeasurement:
    """The host's counts between two snapshots and the wiring the trace showed."""

    delta: InterruptDelta
    wiring: tuple[VectorWiring, ...]
    wiring_note: str  # why the wiring is unknown or partial ("" when fully traced)
    anomalies: tuple[str, ...]

    def host_delta(self, bdf: str, entry: int | None) -> int | None:
        if entry is None:
            return None
        rows = [r for r in self.delta.for_device(bdf) if r.vector is not None
                and r.vector.entry == entry]
        return sum(r.total for r in rows) if rows else None

    def wiring_for(self, bdf: str, entry: int | None) -> VectorWiring | None:
        return next((w for w in self.wiring if w.bdf == bdf and w.entry == entry), None)

    def notes(self) -> tuple[str, ...]:
        return ((self.wiring_note,) if self.wiring_note else ()) + self.anomalies


class HostEvidence:
    """Preflight and bypass tracing of the host for the given assigned devices."""

    def __init__(self, run_dir: Path, devices: list[str], accel: AccelDecision | None) -> None:
        self.run_dir = run_dir
        self.devices = devices
        self.accel = accel
        self.preflight: PreflightReport | None = None
        self.device_notes: tuple[str, ...] = ()
        self.wiring_note = ""
        self._session: KprobeSession | None = None
        self._connect_probes = True

    def __enter__(self) -> HostEvidence:
        self._check_devices()
        self._start_tracing()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._session is not None:
            self._session.stop()
            self._session = None

    def _check_devices(self) -> None:
        """Preflight the assigned devices: can they be assigned, can their IRQs be posted?"""
        accel = self.accel

        def probe() -> KvmProbe:  # the VM's own decision; no second boot test
            return KvmProbe(bool(accel and accel.kvm_usable),
                            accel.reason if accel else "not decided", 0.0)

        report = preflight(devices=self.devices, accel_probe=probe)
        self.preflight = report
        self.device_notes = (*(f"preflight {d.bdf}: {d.line}" for d in report.devices),
                             f"preflight host: {report.summary}")

    def _start_tracing(self) -> None:
        """Probes in before QEMU starts; a host that cannot trace still gets counts."""
        session = bypass_session()
        try:
            session.start()
        except HostError as exc:
            self.wiring_note = f"bypass wiring not traced: {exc}"
            log.warning("%s", self.wiring_note)
            return
        self._session = session
        self._connect_probes = not any(
            "kvm_arch_irq_bypass_add_producer" in note for note in session.skipped)
        if session.skipped:
            self.wiring_note = "not traced: " + "; ".join(session.skipped)

    def snapshot(self, label: str) -> HostSnapshot:
        """The host's /proc/interrupts, saved in the run folder as ``host.<label>.interrupts``."""
        text = Path("/proc/interrupts").read_text()
        (self.run_dir / f"host.{label}.interrupts").write_text(text)
        return HostSnapshot(text, parse_proc_interrupts(text, source="host:/proc/interrupts"))

    def measure(self, before: HostSnapshot, after: HostSnapshot) -> HostMeasurement:
        """Counts and wiring; call while the guests still run (the trace is read here)."""
        tracker = BypassTracker(connect_probes=self._connect_probes)
        wiring: list[VectorWiring] = []
        if self._session is not None:
            trace = self._session.read()
            (self.run_dir / "host.bypass.trace").write_text(trace)
            tracker.feed(parse_trace(trace.splitlines()))
            wiring = tracker.wiring(after.interrupts)
        return HostMeasurement(
            before.interrupts.delta(after.interrupts), tuple(wiring), self.wiring_note,
            tuple(f"anomaly {a.kind}: {a.message}" for a in tracker.anomalies))
