"""``harness irq watch`` frames from recorded real readings (tests/data/watch/README.md and
tests/data/lab-arm64/README.md say how each was recorded)."""

from __future__ import annotations

from pathlib import Path

from harness.hostside import measure_recorded
from harness.interrupts import InterruptSnapshot, parse_proc_interrupts
from harness.watch import Device, format_frame, make_frame

DATA = Path(__file__).resolve().parents[1] / "data"


def reading(path: Path, at: float) -> InterruptSnapshot:
    return parse_proc_interrupts(path.read_text(), source=path.name, taken_at=at)


EMULATED = [Device("net0", "0000:00:03.0", True, None),
            Device("disk0", "0000:00:04.0", True, None)]


def test_an_emulated_nic_shows_its_rate_per_second_and_per_cpu() -> None:
    before = reading(DATA / "watch" / "guest0.1.interrupts", 100.0)
    after = reading(DATA / "watch" / "guest0.2.interrupts", 102.0)
    frame = make_frame("guest0", EMULATED, before, after)
    rows = {r.name: r for r in frame.rows}
    # 134 -> 181 on CPU1 over 2 s
    inp = rows["virtio0-input.0"]
    assert (inp.device, inp.bdf, inp.entry, inp.count) == ("net0", "0000:00:03.0", 1, 47)
    assert inp.rate == 23.5 and inp.per_cpu == (0.0, 23.5) and inp.total == 181
    assert inp.path == "emulated"
    assert rows["virtio1-req.1"].path == "idle"
    # only PCI vectors by default, in device order then entry
    assert [r.name for r in frame.rows][:3] == ["virtio0-config", "virtio0-input.0",
                                                "virtio0-output.0"]
    assert all(r.bdf != "-" for r in frame.rows)
    text = format_frame(frame)
    assert "virtio0-input.0" in text and "23.5" in text and "CPU1/s" in text


def test_all_rows_adds_the_counting_rows_of_no_device() -> None:
    before = reading(DATA / "watch" / "guest0.1.interrupts", 0.0)
    after = reading(DATA / "watch" / "guest0.2.interrupts", 1.0)
    names = {r.irq for r in make_frame("guest0", EMULATED, before, after, all_rows=True).rows}
    assert "LOC" in names  # the local timer counted between the two readings


def test_an_assigned_vector_shows_the_host_side_and_its_wiring() -> None:
    """The Arm lab's posted case: the guest's count rises, the host's vfio-msix stays, the
    trace shows the vector forwarded as a vLPI: posted, judged on the frame alone."""
    run = DATA / "lab-arm64" / "posted"
    host_before = reading(run / "host.before.interrupts", 10.0)
    host_after = reading(run / "host.after.interrupts", 20.0)
    measured, _ = measure_recorded(host_before, host_after,
                                   (run / "host.bypass.trace").read_text())
    wiring = [w.to_dict() for w in measured.wiring]
    devices = [Device("nic", "0000:00:04.0", False, "0000:00:05.0")]
    frame = make_frame("l2", devices, reading(run / "l2.before.interrupts", 10.0),
                       reading(run / "l2.after.interrupts", 20.0), host_before, host_after,
                       wiring)
    rows = {r.name: r for r in frame.rows if r.device == "nic"}
    inp = rows["virtio1-input.0"]
    assert inp.entry == 1 and inp.count > 100
    assert inp.host is not None and inp.host.count == inp.host.total == 0
    assert inp.host.rate == 0.0
    assert "vLPI" in inp.host.wiring
    assert inp.path == "posted"
    assert rows["virtio1-config"].path == "idle"
    # the emulated NIC of the same guest has no host side
    other = [r for r in frame.rows if r.name == "virtio0-input.0"]
    assert other and other[0].host is None and other[0].device == ""


def test_a_vector_that_appeared_is_marked() -> None:
    before = reading(DATA / "watch" / "guest0.1.interrupts", 0.0)
    text = (DATA / "watch" / "guest0.1.interrupts").read_text()
    kept = "\n".join(ln for ln in text.splitlines() if "virtio1-" not in ln)
    gone = parse_proc_interrupts(kept, taken_at=1.0)
    frame = make_frame("guest0", EMULATED, gone, before)
    disk = [r for r in frame.rows if r.device == "disk0"]
    assert [r.status for r in disk] == ["appeared"] * 3
    back = make_frame("guest0", EMULATED, before, gone)
    assert [r.status for r in back.rows if r.device == "disk0"] == ["vanished"] * 3
