"""Journal and ordering logic of vfio-pci binding.

The sysfs side is ``FakeSysfsForJournalTests``: an in-memory stand-in for the
:class:`DriverControl` seam that only checks *when* things are written relative to the
journal.  It proves nothing about the kernel; the real bind/unbind/probe round trip runs in
the virtual lab.  Refusals read real recorded host trees (tests/data/hosts) through
``root=``, and the fake takes the writes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.errors import HostError
from harness.host.binding import (
    Journal,
    JournalEntry,
    VfioBinding,
    owner_alive,
    restore_all,
)

HOSTS = Path(__file__).resolve().parents[1] / "data" / "hosts"
BDF = "0000:00:05.0"


class FakeSysfsForJournalTests:
    """Drivers as a dict; every write first checks that the journal already covers it."""

    def __init__(self, journal: Journal, drivers: dict[str, str | None],
                 binds_to: dict[str, str] | None = None) -> None:
        self.journal = journal
        self.drivers = dict(drivers)
        self.overrides: dict[str, str | None] = {bdf: None for bdf in drivers}
        self.binds_to = binds_to or {}  # the driver drivers_probe picks with no override
        self.ops: list[tuple[str, str, str | None]] = []
        self.fail_on: str | None = None  # raise KeyboardInterrupt at this operation
        self.broken_probe = False  # drivers_probe binds nothing

    def _write(self, op: str, bdf: str, value: str | None = None) -> None:
        on_disk = json.loads(self.journal.path.read_text())["entries"]
        assert any(e["bdf"] == bdf for e in on_disk), f"{op} {bdf} before the journal entry"
        self.ops.append((op, bdf, value))
        if self.fail_on == op:
            self.fail_on = None  # one Ctrl-C
            raise KeyboardInterrupt

    def exists(self, bdf: str) -> bool:
        return bdf in self.drivers

    def driver(self, bdf: str) -> str | None:
        return self.drivers[bdf]

    def driver_override(self, bdf: str) -> str | None:
        return self.overrides[bdf]

    def set_driver_override(self, bdf: str, driver: str | None) -> None:
        self._write("override", bdf, driver)
        self.overrides[bdf] = driver

    def unbind(self, bdf: str) -> None:
        self._write("unbind", bdf, self.drivers[bdf])
        self.drivers[bdf] = None

    def probe(self, bdf: str) -> None:
        self._write("probe", bdf)
        if self.broken_probe or self.drivers[bdf] is not None:
            return
        self.drivers[bdf] = self.overrides[bdf] or self.binds_to.get(bdf)

    def ensure_driver(self, driver: str) -> None:
        self.ops.append(("ensure", driver, None))


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state" / "bindings.json")


def fake(journal: Journal, driver: str | None = "virtio-pci") -> FakeSysfsForJournalTests:
    return FakeSysfsForJournalTests(journal, {BDF: driver},
                                    binds_to={BDF: driver} if driver else {})


def binding(journal: Journal, control: FakeSysfsForJournalTests,
            alive: Callable[[JournalEntry], bool] = owner_alive) -> VfioBinding:
    # 0000:00:05.0 on the recorded no-iommu host: virtio-pci, not used by the host.
    return VfioBinding([BDF], journal=journal, control=control, root=HOSTS / "no-iommu",
                       alive=alive)


def test_bind_and_restore_on_exit(journal: Journal) -> None:
    control = fake(journal)
    with binding(journal, control) as bound:
        assert control.drivers[BDF] == "vfio-pci"
        (entry,) = journal.read()
        assert (entry.bdf, entry.original_driver, entry.original_override) == (
            BDF, "virtio-pci", None)
        assert entry.owner_pid == os.getpid() and owner_alive(entry)
        assert bound.bound == [BDF]
    assert control.drivers[BDF] == "virtio-pci"
    assert control.overrides[BDF] is None
    assert journal.read() == []
    assert control.ops == [
        ("ensure", "vfio-pci", None),
        ("override", BDF, "vfio-pci"), ("unbind", BDF, "virtio-pci"), ("probe", BDF, None),
        ("unbind", BDF, "vfio-pci"), ("override", BDF, None), ("probe", BDF, None)]


def test_journal_is_fsynced_before_the_first_write(journal: Journal,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    control = fake(journal)
    original_write = control._write

    def write(op: str, bdf: str, value: str | None = None) -> None:
        events.append(op)
        original_write(op, bdf, value)

    monkeypatch.setattr(control, "_write", write)
    with binding(journal, control):
        pass
    first_change = events.index("override")
    assert events[:first_change] == ["fsync", "fsync"]  # the file, then its directory


def test_error_inside_the_block_restores(journal: Journal) -> None:
    control = fake(journal)
    with pytest.raises(RuntimeError, match="guest failed"), binding(journal, control):
        raise RuntimeError("guest failed")
    assert control.drivers[BDF] == "virtio-pci"
    assert journal.read() == []


@pytest.mark.parametrize("step", ["override", "unbind", "probe"])
def test_ctrl_c_mid_bind_restores(journal: Journal, step: str) -> None:
    control = fake(journal)
    control.fail_on = step
    with pytest.raises(KeyboardInterrupt), binding(journal, control):
        pytest.fail("the block must not run")
    assert control.drivers[BDF] == "virtio-pci"
    assert control.overrides[BDF] is None
    assert journal.read() == []


def test_restore_after_a_crash_is_idempotent(journal: Journal) -> None:
    control = fake(journal)
    crashed = binding(journal, control, alive=lambda e: False)
    crashed.__enter__()  # and then the process "dies": no __exit__
    assert control.drivers[BDF] == "vfio-pci"
    (entry,) = journal.read()

    results = restore_all(journal, control=control, alive=lambda e: False)
    assert [(r.bdf, r.outcome, r.detail) for r in results] == [
        (BDF, "restored", "back on virtio-pci")]
    assert control.drivers[BDF] == "virtio-pci"
    assert journal.read() == []
    assert restore_all(journal, control=control, alive=lambda e: False) == ()
    assert entry.original_driver == "virtio-pci"


def test_restore_all_leaves_a_running_owner_alone(journal: Journal) -> None:
    control = fake(journal)
    with binding(journal, control):
        (skipped,) = restore_all(journal, control=control)  # the owner (this process) runs
        assert skipped.outcome == "skipped"
        assert str(os.getpid()) in skipped.detail
        assert control.drivers[BDF] == "vfio-pci"
        (forced,) = restore_all(journal, control=control, force=True)
        assert forced.outcome == "restored"
    assert journal.read() == []  # the context exit found nothing left to do


def test_failed_restore_keeps_the_entry(journal: Journal) -> None:
    control = fake(journal)
    with pytest.raises(HostError, match="run 'harness restore'"), binding(journal, control):
        control.broken_probe = True
    assert control.drivers[BDF] is None
    (entry,) = journal.read()
    assert entry.original_driver == "virtio-pci"
    control.broken_probe = False
    (result,) = restore_all(journal, control=control, alive=lambda e: False)
    assert result.ok and control.drivers[BDF] == "virtio-pci"
    assert journal.read() == []


def test_vanished_device_keeps_the_entry(journal: Journal) -> None:
    control = fake(journal)
    crashed = binding(journal, control, alive=lambda e: False)
    crashed.__enter__()
    del control.drivers[BDF]
    (result,) = restore_all(journal, control=control, alive=lambda e: False)
    assert result.outcome == "failed" and "gone" in result.detail
    assert [e.bdf for e in journal.read()] == [BDF]


def test_unbound_device_goes_back_to_no_driver(journal: Journal) -> None:
    control = fake(journal, driver=None)
    control.binds_to[BDF] = "virtio-pci"  # probing would bind it: restore must not probe
    with binding(journal, control):
        assert control.drivers[BDF] == "vfio-pci"
    assert control.drivers[BDF] is None
    assert ("probe", BDF, None) not in control.ops[-2:]


def test_original_override_is_put_back(journal: Journal) -> None:
    control = fake(journal)
    control.overrides[BDF] = "virtio-pci"
    with binding(journal, control):
        pass
    assert control.overrides[BDF] == "virtio-pci"


def test_device_already_on_vfio_is_left_alone(journal: Journal) -> None:
    control = fake(journal, driver="vfio-pci")
    control.drivers[BDF] = "vfio-pci"
    with binding(journal, control) as bound:
        assert bound.bound == []
    assert control.ops == []
    assert not journal.path.exists() or journal.read() == []


def test_entry_of_a_dead_run_keeps_the_true_original(journal: Journal) -> None:
    control = fake(journal)
    control.drivers[BDF] = "vfio-pci"  # a killed run left it bound
    journal.add(JournalEntry(BDF, "virtio-pci", None, 999999, "0", "earlier"))
    with binding(journal, control, alive=lambda e: e.owner_pid == os.getpid()):
        (entry,) = journal.read()
        assert (entry.original_driver, entry.owner_pid) == ("virtio-pci", os.getpid())
    assert control.drivers[BDF] == "virtio-pci"


def test_device_bound_by_a_running_harness_is_refused(journal: Journal) -> None:
    control = fake(journal)
    journal.add(JournalEntry(BDF, "virtio-pci", None, 4242, "1", "earlier"))
    with pytest.raises(HostError, match="already bound by harness process 4242"):
        with binding(journal, control, alive=lambda e: True):
            pass


# --- refusals, read from recorded hosts -----------------------------------------------------


def test_device_in_use_is_refused(journal: Journal) -> None:
    bdf = "0000:00:03.0"  # no-iommu: virtio-net, eth0 up with 192.0.2.2/24
    control = FakeSysfsForJournalTests(journal, {bdf: "virtio-pci"})
    with pytest.raises(HostError) as err:
        with VfioBinding([bdf], journal=journal, control=control, root=HOSTS / "no-iommu"):
            pass
    assert err.value.subject == bdf
    assert err.value.reason.startswith("refusing to take it from the host: in use by the "
                                       "host: eth0 is up with addresses 192.0.2.2/24")
    assert control.ops == [] and not journal.path.exists()


def test_force_overrides_the_refusal(journal: Journal) -> None:
    bdf = "0000:00:02.0"  # no-iommu: virtio-blk, vda mounted on /
    control = FakeSysfsForJournalTests(journal, {bdf: "virtio-pci"},
                                       binds_to={bdf: "virtio-pci"})
    with VfioBinding([bdf], journal=journal, control=control, root=HOSTS / "no-iommu",
                     force=True):
        assert control.drivers[bdf] == "vfio-pci"
    assert control.drivers[bdf] == "virtio-pci"


def test_group_member_in_use_is_refused(journal: Journal, tmp_path: Path) -> None:
    # intel-posting with eth0 (00:1f.6) given an address: every function of group 17 is
    # then refused, since VFIO takes the group.
    root = tmp_path / "intel-posting"
    shutil.copytree(HOSTS / "intel-posting", root, symlinks=True)
    addrs = json.loads((root / "ip-addr.json").read_text())
    addrs[1]["addr_info"] = [{"family": "inet", "local": "10.1.2.3", "prefixlen": 24,
                              "scope": "global"}]
    (root / "ip-addr.json").write_text(json.dumps(addrs))
    bdf = "0000:00:1f.4"
    control = FakeSysfsForJournalTests(journal, {bdf: "i801_smbus"})
    with pytest.raises(HostError) as err:
        with VfioBinding([bdf], journal=journal, control=control, root=root):
            pass
    assert err.value.reason == (
        "refusing to take it from the host: IOMMU group 17 also holds 0000:00:1f.6, in use "
        "by the host: eth0 is up with addresses 10.1.2.3/24 (force to override)")


def test_several_devices_restore_in_reverse_order(journal: Journal) -> None:
    a, b = "0000:00:1f.0", "0000:00:1f.5"
    control = FakeSysfsForJournalTests(journal, {a: None, b: "intel-spi"},
                                       binds_to={b: "intel-spi"})
    with VfioBinding([a, b], journal=journal, control=control,
                     root=HOSTS / "intel-posting"):
        assert [e.bdf for e in journal.read()] == [a, b]
    unbinds = [(op, bdf) for op, bdf, _ in control.ops if op == "unbind"]
    assert unbinds == [("unbind", b), ("unbind", b), ("unbind", a)]
    assert control.drivers == {a: None, b: "intel-spi"}


def test_unreadable_journal_is_an_error(journal: Journal) -> None:
    journal.path.parent.mkdir(parents=True)
    journal.path.write_text('{"version": 99, "entries": []}')
    with pytest.raises(HostError, match="not a binding journal of version 1"):
        restore_all(journal, control=fake(journal))
