"""The Arm lab's recorded runs (tests/data/lab-arm64, real data: see its README): the tracker,
the vgic-state parser and the verdict rules reach the lab's own conclusions from the files."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bypass.tracker import BypassTracker, VectorWiring
from harness.config.model import DeliveryPath
from harness.host.tracefs import parse_trace
from harness.host.vgic import parse_vgic_state
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts
from harness.verdict import classify

DATA = Path(__file__).resolve().parents[1] / "data" / "lab-arm64"
BDF = "0000:00:05.0"


def interrupts(case: str, name: str) -> InterruptSnapshot:
    return parse_proc_interrupts((DATA / case / f"{name}.interrupts").read_text(), source=name)


def replay(case: str, trace: str = "host.bypass.trace") -> BypassTracker:
    tracker = BypassTracker()
    tracker.feed(parse_trace((DATA / case / trace).read_text().splitlines()))
    return tracker


def wiring(case: str) -> dict[int, VectorWiring]:
    found = replay(case).wiring(interrupts(case, "host.after"))
    return {w.entry: w for w in found if w.bdf == BDF}


def deltas(case: str, who: str) -> dict[int, int]:
    """Per MSI-X entry of the assigned device: L1's (vfio-msix) or L2's count delta."""
    delta = interrupts(case, f"{who}.before").delta(interrupts(case, f"{who}.after"))
    bdf = BDF if who == "host" else "0000:00:04.0"
    out = {}
    for row in delta.rows:
        line = row.after or row.before
        if line is not None and line.vector is not None and line.vector.bdf == bdf:
            out[line.vector.entry] = row.total
    return out


def vgic(case: str, label: str = "") -> tuple[int, int]:
    (path,) = (DATA / case).glob(f"host.vgic-state.{label + '.' if label else ''}[0-9]*")
    state = parse_vgic_state(path.read_text(), path.name)
    return len(state.lpis), len(state.hw_lpis)


@pytest.mark.parametrize(("case", "path"), [
    ("posted", DeliveryPath.POSTED), ("userspace", DeliveryPath.USERSPACE_BOUNCE),
    ("irqfd", DeliveryPath.IRQFD_BOUNCE)])
def test_each_recorded_case_gets_its_verdict_from_the_evidence(case: str,
                                                               path: DeliveryPath) -> None:
    wires, guest, host = wiring(case), deltas(case, "l2"), deltas(case, "host")
    assert sorted(wires) == [0, 1, 2]  # config, input, output
    for entry in (1, 2):  # the vectors the pings raised
        assert guest[entry] >= 200
        found, reason = classify(False, guest[entry], host[entry],
                                 wires[entry].as_verdict_wiring())
        assert found is path, reason


def test_posted_every_vector_is_forwarded_and_vgic_state_agrees() -> None:
    wires = wiring("posted")
    assert all(w.connected and w.vlpi_mapped and w.posted for w in wires.values())
    assert {w.host_irq for w in wires.values()} == {34, 35, 36}
    assert "forwarded as a vLPI" in wires[1].describe()
    assert deltas("posted", "host") == {0: 0, 1: 0, 2: 0}
    lpis, hw = vgic("posted")
    assert (lpis, hw) == (6, 3)  # the SSH NIC's three LPIs, and the assigned NIC's, hw set
    assert replay("posted").anomalies == []


def test_posted_release_leaves_nothing_forwarded() -> None:
    """The regression check: after L2 unbound the driver, every mapping was undone."""
    before = replay("posted")
    assert len(before.left_forwarded()) == 0 and sum(v.mapped for v in before.vlpi.values()) == 3
    after = replay("posted", "host.bypass.release.trace")
    assert after.left_forwarded() == []
    assert not any(v.mapped for v in after.vlpi.values() if v.host_irq in (34, 35, 36))
    assert vgic("posted", "release") == (3, 0)


def test_without_the_unset_records_the_release_would_be_caught() -> None:
    text = (DATA / "posted" / "host.bypass.release.trace").read_text().splitlines()
    tracker = BypassTracker()
    tracker.feed(parse_trace([ln for ln in text if " unfwd: " not in ln
                              and " unmapvlpi: " not in ln]))
    assert {v.host_irq for v in tracker.left_forwarded()} >= {34, 35, 36}


def test_irqfd_with_gicv4_off_enters_set_forwarding_but_maps_no_vlpi() -> None:
    wires = wiring("irqfd")
    assert all(w.connected and not w.vlpi_mapped and not w.posted for w in wires.values())
    assert all(w.forwarding_calls >= 1 for w in wires.values())
    assert "its_map_vlpi" not in (DATA / "irqfd" / "host.bypass.trace").read_text()
    assert vgic("irqfd")[1] == 0


def test_userspace_producers_have_no_consumer_and_no_forwarding() -> None:
    wires = wiring("userspace")
    assert all(w.producer and not w.consumer and not w.posted for w in wires.values())
    assert "kvm_vgic_v4_set_forwarding" not in (DATA / "userspace" /
                                                "host.bypass.trace").read_text()
