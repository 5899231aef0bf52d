"""The hot-plug helper's pure parts: a device's -device options as QMP device_add arguments,
from the argv the harness built, and the event log of a run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config.devices import VfioPci, VirtioBlk, VirtioNet
from harness.config.model import VM
from harness.errors import HarnessError
from harness.hotplug import LOG, HotplugEvent, device_options, log_event, read_log
from harness.platform import X86_64
from harness.qemu.argv import Boot, build_argv, place_devices


def _argv() -> list[str]:
    devices = (VirtioNet(kind="virtio-net", id="net0"),
               VirtioNet(kind="virtio-net", id="net1", ssh=False, hotplug=True),
               VirtioBlk(kind="virtio-blk", id="disk0", hotplug=True),
               VfioPci(kind="vfio-pci", id="nic", host="0000:00:05.0", no_kvm_msix=True,
                       hotplug=True))
    vm = VM(name="g", devices=devices)
    placed = place_devices(devices, X86_64)
    return build_argv(X86_64, vm, "tcg", Boot(kernel=Path("/k")), placed,
                      {"disk0": Path("/s/disk0.img")}, 3, 4)


def test_device_add_takes_the_options_the_device_was_booted_with() -> None:
    argv = _argv()
    net1 = device_options(argv, "net1")
    assert net1["driver"] == "virtio-net-pci" and net1["netdev"] == "net1"
    assert (net1["bus"], net1["addr"]) == ("port-net1", "0x00")
    assert device_options(argv, "disk0") == {
        "driver": "virtio-blk-pci", "drive": "disk0-fmt", "id": "disk0", "bus": "port-disk0",
        "addr": "0x00"}
    assert device_options(argv, "nic") == {
        "driver": "vfio-pci", "host": "0000:00:05.0", "id": "nic", "bus": "port-nic",
        "addr": "0x00", "x-no-kvm-msix": "on"}
    # the root port is not the device, though its id names it
    assert device_options(argv, "port-nic")["driver"] == "pcie-root-port"
    with pytest.raises(HarnessError, match="nope: not in QEMU's command line"):
        device_options(argv, "nope")


def test_events_are_logged_one_json_line_each(tmp_path: Path) -> None:
    assert read_log(tmp_path) == []
    event = HotplugEvent("g", "net1", "unplug", "0000:01:00.0", 1.0, 0.5,
                         ("29 virtio2-config", "30 virtio2-input.0"))
    log_event(tmp_path, event)
    log_event(tmp_path, HotplugEvent("g", "net1", "plug", "0000:01:00.0", 2.0, 1.5, ()))
    assert (tmp_path / LOG).read_text().count("\n") == 2
    unplugged, plugged = read_log(tmp_path)
    assert unplugged["vectors"] == ["29 virtio2-config", "30 virtio2-input.0"]
    assert (plugged["action"], plugged["vectors"]) == ("plug", [])
    assert event.describe() == ("unplug g/net1 (0000:01:00.0) in 0.5 s; vectors that went: "
                                "29 virtio2-config, 30 virtio2-input.0")
