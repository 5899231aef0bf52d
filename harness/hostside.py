"""The host's side of the evidence for assigned devices: its vfio vector counts and the bypass
wiring, gathered while the guests run.

``HostEvidence`` traces the kernel's IRQ bypass from before QEMU starts (so every producer and
consumer registration is seen), snapshots the host's /proc/interrupts while the guests still
run (vfio lines vanish when QEMU exits), and then answers, per host vector, the count delta
and the wiring.  Without kprobe events the counts are still taken and the report says why the
wiring is unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from harness.bypass.live import bypass_session
from harness.bypass.tracker import BypassTracker, VectorWiring
from harness.errors import HostError
from harness.host.accel import AccelDecision, KvmProbe
from harness.host.preflight import PreflightReport, preflight
from harness.host.tracefs import KprobeSession, parse_trace
from harness.interrupts import InterruptDelta, InterruptSnapshot, parse_proc_interrupts

log = logging.getLogger(__name__)


@dataclass
class HostEvidence:
    run_dir: Path
    session: KprobeSession | None = None
    tracker: BypassTracker = field(default_factory=BypassTracker)
    wiring_note: str = ""
    before: InterruptSnapshot | None = None
    after: InterruptSnapshot | None = None
    wiring: list[VectorWiring] = field(default_factory=list)
    preflight: PreflightReport | None = None
    device_notes: list[str] = field(default_factory=list)

    def check_devices(self, devices: list[str], accel: AccelDecision | None) -> None:
        """Preflight the assigned devices: can they be assigned, can their IRQs be posted?"""
        def probe() -> KvmProbe:  # the VM's own decision; no second boot test
            return KvmProbe(bool(accel and accel.kvm_usable),
                            accel.reason if accel else "not decided", 0.0)

        report = preflight(devices=devices, accel_probe=probe)
        self.preflight = report
        self.device_notes = [f"preflight {d.bdf}: {d.line}" for d in report.devices]
        self.device_notes.append(f"preflight host: {report.summary}")

    def start_tracing(self) -> None:
        """Probes in before QEMU starts; a host that cannot trace still gets counts."""
        session = bypass_session()
        try:
            session.start()
        except HostError as exc:
            self.wiring_note = f"bypass wiring not traced: {exc}"
            log.warning("%s", self.wiring_note)
            return
        self.session = session
        self.tracker.connect_probes = not any(
            "kvm_arch_irq_bypass_add_producer" in note for note in session.skipped)
        if session.skipped:
            self.wiring_note = "not traced: " + "; ".join(session.skipped)

    def snapshot_before(self) -> None:
        text = Path("/proc/interrupts").read_text()
        self.before = parse_proc_interrupts(text, source="host:/proc/interrupts")
        (self.run_dir / "host.before.interrupts").write_text(text)

    def snapshot_after(self) -> None:
        """While the guests still run: the host's vfio counters die with QEMU."""
        text = Path("/proc/interrupts").read_text()
        self.after = parse_proc_interrupts(text, source="host:/proc/interrupts")
        (self.run_dir / "host.after.interrupts").write_text(text)
        if self.session is not None:
            trace = self.session.read()
            (self.run_dir / "host.bypass.trace").write_text(trace)
            self.tracker.feed(parse_trace(trace.splitlines()))
            self.wiring = self.tracker.wiring(self.after)

    def stop(self) -> None:
        if self.session is not None:
            self.session.stop()
            self.session = None

    def delta(self) -> InterruptDelta | None:
        if self.before is None or self.after is None:
            return None
        return self.before.delta(self.after)

    def host_delta(self, bdf: str, entry: int | None) -> int | None:
        delta = self.delta()
        if delta is None or entry is None:
            return None
        rows = [r for r in delta.for_device(bdf) if r.vector is not None
                and r.vector.entry == entry]
        return sum(r.total for r in rows) if rows else None

    def wiring_for(self, bdf: str, entry: int | None) -> VectorWiring | None:
        return next((w for w in self.wiring if w.bdf == bdf and w.entry == entry), None)
