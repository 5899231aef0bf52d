"""The central join (harness.join) on recorded lab runs: every delivery path the labs can show.

Each case is a real run folder of `harness lab run` (tests/data/lab-x86-matrix, see its
README; tests/data/lab-arm64 for the Arm lab's three cases): the guest's and the host's
/proc/interrupts at both ends of the window, the guest's PCI functions from sysfs, and the
bypass trace.  The scenario is the one that ran (configs/), placed as the run placed it.  The
test rebuilds the verdicts from those files alone and compares them with the case's label and
with the verdicts the run itself wrote, so a change to the join that would change a recorded
verdict fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import load_scenarios
from harness.config.model import DeliveryPath, Scenario
from harness.guest.agent import GuestSnapshot, functions_from_json
from harness.hostside import measure_recorded
from harness.interrupts import kinds_match, parse_proc_interrupts
from harness.join import GuestVector, guest_vectors, join
from harness.platform import platform_for
from harness.qemu.argv import PlacedDevice, place_devices
from harness.verdict import VectorVerdict

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


def scenario(data: str) -> Scenario:
    """The scenario a recorded case ran (its folder's scenario.yaml)."""
    (found,) = load_scenarios(DATA / data / "scenario.yaml")
    return found


def guest(folder: Path, vm: str, label: str) -> GuestSnapshot:
    raw = (folder / f"{vm}.{label}.interrupts").read_text()
    devices_file = folder / f"{vm}.{label}.devices.json"
    devices = (functions_from_json(json.loads(devices_file.read_text()))
               if devices_file.exists() else ())
    return GuestSnapshot(0.0, 0.0, "", parse_proc_interrupts(raw, f"{vm}.{label}"), devices, raw)


def rejoin(folder: Path, spec: Scenario) -> tuple[list[VectorVerdict], tuple[PlacedDevice, ...]]:
    (vm,) = spec.vms
    placed = place_devices(vm.devices, platform_for(vm.arch))
    host, _ = measure_recorded(
        parse_proc_interrupts((folder / "host.before.interrupts").read_text()),
        parse_proc_interrupts((folder / "host.after.interrupts").read_text()),
        (folder / "host.bypass.trace").read_text())
    return join(vm.name, placed, guest(folder, vm.name, "before"),
                guest(folder, vm.name, "after"), host), placed


#: (data folder, device, path, kind, vectors that must carry it)
CASES = [
    ("lab-x86-matrix/msix-irqfd", "nic", DeliveryPath.IRQFD_BOUNCE, "msix", 2),
    ("lab-x86-matrix/msix-userspace", "nic", DeliveryPath.USERSPACE_BOUNCE, "msix", 2),
    ("lab-x86-matrix/two-nics", "nic", DeliveryPath.IRQFD_BOUNCE, "msix", 2),
    ("lab-x86-matrix/two-nics", "nic_user", DeliveryPath.USERSPACE_BOUNCE, "msix", 2),
    ("lab-x86-matrix/intx-irqfd", "nic", DeliveryPath.IRQFD_BOUNCE, "intx", 1),
    ("lab-x86-matrix/intx-userspace", "nic", DeliveryPath.USERSPACE_BOUNCE, "intx", 1),
    ("lab-x86-matrix/msi-irqfd", "ahci", DeliveryPath.IRQFD_BOUNCE, "msi", 1),
    ("lab-x86-matrix/msix-shared-vector", "nic", DeliveryPath.IRQFD_BOUNCE, "msix", 1),
    ("lab-x86-matrix/msix-multiqueue", "disk", DeliveryPath.IRQFD_BOUNCE, "msix", 2),
    ("lab-arm64/posted", "nic", DeliveryPath.POSTED, "msi-or-msix", 2),
    ("lab-arm64/userspace", "nic", DeliveryPath.USERSPACE_BOUNCE, "msi-or-msix", 2),
    ("lab-arm64/irqfd", "nic", DeliveryPath.IRQFD_BOUNCE, "msi-or-msix", 2),
    ("lab-arm64/intx", "nic", DeliveryPath.IRQFD_BOUNCE, "intx", 1),
]


@pytest.mark.parametrize(("data", "device", "path", "kind", "fired"), CASES,
                         ids=[c[0].split("/", 1)[1] + ("-arm64" if "arm64" in c[0] else "")
                              + ("-" + c[1] if c[0].endswith("two-nics") else "")
                              for c in CASES])
def test_each_recorded_case_joins_to_its_labelled_path(
        data: str, device: str, path: DeliveryPath, kind: str, fired: int) -> None:
    folder = DATA / data  # the Arm recordings predate the kept sysfs: the IRQ domain names them
    verdicts, _ = rejoin(folder, scenario(data))
    mine = [v for v in verdicts if v.device == device and v.guest_delta > 0]
    assert len(mine) == fired, [(v.name, v.guest_delta) for v in mine]
    for v in mine:
        assert v.kind == kind
        assert v.path is path, v.reason
        assert v.host_delta is not None and v.wiring is not None
    # The run's own verdicts, as it wrote them, are the ones rebuilt from its files.
    written = {(v["device"], v["irq"]): v["path"]
               for v in json.loads((folder / "report.json").read_text())["vectors"]}
    assert {(v.device, v.irq): v.path.value if v.path else None for v in verdicts} == written


def test_intx_joins_by_the_guest_sysfs_line_not_by_a_name() -> None:
    folder = DATA / "lab-x86-matrix" / "intx-irqfd"
    spec = scenario("lab-x86-matrix/intx-irqfd")
    placed = place_devices(spec.vms[0].devices, platform_for(spec.vms[0].arch))
    before, after = guest(folder, "l2", "before"), guest(folder, "l2", "after")
    found: list[GuestVector] = list(guest_vectors(placed, before, after))
    nic = [g for g in found if g.device.device.id == "nic"]
    (line,) = nic
    func = after.device(placed[1].bdf)
    assert func is not None and func.msi_irqs == () and line.row.label == str(func.irq)
    assert line.kind == "intx" and line.row.line.chip is not None
    assert "IO-APIC" in line.row.line.chip
    # Without the guest's sysfs the INTx line cannot be told apart from any other.
    blind = GuestSnapshot(0.0, 0.0, "", after.interrupts, (), after.raw_interrupts)
    assert [g for g in guest_vectors(placed, blind, blind) if g.device.device.id == "nic"] == []


def test_intx_wiring_is_the_resample_irqfd_and_never_a_bypass_producer() -> None:
    for case, resample in (("intx-irqfd", True), ("intx-userspace", False)):
        folder = DATA / "lab-x86-matrix" / case
        verdicts, _ = rejoin(folder, scenario(f"lab-x86-matrix/{case}"))
        (nic,) = [v for v in verdicts if v.device == "nic"]
        assert nic.wiring is not None and nic.wiring.intx
        assert nic.wiring.resample is resample
        assert not nic.wiring.producer and not nic.wiring.posted


@pytest.mark.parametrize(("guest_kind", "host_kind", "joins"), [
    ("msix", "msix", True), ("msi", "msi", True), ("intx", "intx", True),
    ("msix", "msi", False), ("msi-or-msix", "msix", True), ("msi-or-msix", "msi", True),
    ("intx", "msi-or-msix", False), ("msix", "intx", False)])
def test_kinds_join_only_to_their_own(guest_kind: str, host_kind: str, joins: bool) -> None:
    assert kinds_match(guest_kind, host_kind) is joins


def test_the_host_vector_of_another_kind_is_never_borrowed() -> None:
    """An MSI-X guest vector must not take the host count of an INTx line with the same
    index: the kinds keep them apart even on one device."""
    folder = DATA / "lab-x86-matrix" / "intx-irqfd"
    host, _ = measure_recorded(
        parse_proc_interrupts((folder / "host.before.interrupts").read_text()),
        parse_proc_interrupts((folder / "host.after.interrupts").read_text()),
        (folder / "host.bypass.trace").read_text())
    assert host.host_delta("0000:00:05.0", 0, "intx") is not None
    assert host.host_delta("0000:00:05.0", 0, "msix") is None
    assert host.wiring_for("0000:00:05.0", 0, "msix") is None
