"""QEMU argv builders: exact lists, slot placement, MACs, and the refusal of commas in values.

Pure functions, so every test compares whole argv lists; nothing here starts QEMU.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from harness.config.model import (
    VM,
    Accel,
    Device,
    E1000e,
    IvshmemDoorbell,
    VfioPci,
    VirtioBlk,
    VirtioNet,
)
from harness.errors import HarnessError
from harness.qemu.argv import (
    FIRST_SLOT,
    Boot,
    DeviceResources,
    PlacedDevice,
    boot_args,
    build_argv,
    channel_args,
    device_args,
    device_mac,
    e1000e_args,
    ivshmem_doorbell_args,
    machine_args,
    place_devices,
    vfio_pci_args,
    virtio_blk_args,
    virtio_net_args,
)

NO_RESOURCES = DeviceResources(disks={}, ivshmem_sockets={})


def net(id: str = "net0", addr: int | None = None, ssh: bool = True) -> VirtioNet:
    return VirtioNet(kind="virtio-net", id=id, addr=addr, ssh=ssh)


def blk(id: str = "disk0", addr: int | None = None) -> VirtioBlk:
    return VirtioBlk(kind="virtio-blk", id=id, addr=addr)


def all_str(argv: list[str]) -> bool:
    return all(type(a) is str for a in argv)


# --- placement -------------------------------------------------------------------------------


def test_first_free_slot_is_three() -> None:
    assert FIRST_SLOT == 0x03


def test_devices_without_addr_get_slots_from_0x03_in_order() -> None:
    placed = place_devices([net("a"), blk("b"), blk("c")])
    assert [(p.device.id, p.slot) for p in placed] == [("a", 3), ("b", 4), ("c", 5)]


def test_explicit_addr_is_kept_and_skipped_by_the_others() -> None:
    # The explicit slot is taken out of the pool before any automatic one is handed out,
    # even when the explicit device comes later in the list.
    placed = place_devices([net("a"), blk("b"), blk("c", addr=0x04), blk("d", addr=0x03)])
    assert [(p.device.id, p.slot) for p in placed] == [("a", 5), ("b", 6), ("c", 4), ("d", 3)]


def test_explicit_addr_below_first_slot_is_allowed() -> None:
    placed = place_devices([blk("a", addr=0x01), blk("b")])
    assert [p.slot for p in placed] == [0x01, 0x03]


def test_placement_keeps_input_order_and_devices() -> None:
    devices: list[Device] = [blk("x", addr=0x10), net("y"), blk("z")]
    placed = place_devices(devices)
    assert [p.device for p in placed] == devices


def test_bdf_is_the_slot_on_the_root_bus() -> None:
    assert PlacedDevice(blk(), 0x03).bdf == "0000:00:03.0"
    assert PlacedDevice(blk(), 0x1e).bdf == "0000:00:1e.0"


def test_automatic_slots_never_reach_the_ich9_slot() -> None:
    placed = place_devices([blk(f"d{i}") for i in range(28)])  # 0x03..0x1e
    assert max(p.slot for p in placed) <= 0x1e


def test_too_many_devices_is_a_harness_error() -> None:
    with pytest.raises(HarnessError):
        place_devices([blk(f"d{i}") for i in range(31)])


# --- MAC addresses -------------------------------------------------------------------------------


def test_mac_is_pinned_for_id_and_slot() -> None:
    # Pinned: a changed MAC changes the guest's interface names and DHCP leases between runs.
    assert device_mac("net0", 3) == "52:54:00:c4:49:1b"
    digest = hashlib.sha256(b"net0/3").digest()
    assert device_mac("net0", 3).split(":")[3:] == [f"{b:02x}" for b in digest[:3]]


def test_mac_is_stable_and_distinct() -> None:
    assert device_mac("net0", 3) == device_mac("net0", 3)
    macs = {device_mac(i, s) for i in ("net0", "net1", "lan") for s in (3, 4, 0x1e)}
    assert len(macs) == 9
    for mac in macs:
        assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast


def test_placed_device_mac_uses_its_slot() -> None:
    assert PlacedDevice(net(), 4).mac == device_mac("net0", 4)


# --- one builder per kind -------------------------------------------------------------------------


def test_virtio_net_with_ssh_forwards_port_0_on_loopback() -> None:
    placed = PlacedDevice(net(), 3)
    assert virtio_net_args(placed) == [
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22",
        "-device", "virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:c4:49:1b,addr=0x03"]


def test_virtio_net_without_ssh_has_no_forward() -> None:
    placed = PlacedDevice(net(ssh=False), 3)
    assert virtio_net_args(placed) == [
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:c4:49:1b,addr=0x03"]


def test_e1000e_without_and_with_ssh() -> None:
    dev = E1000e(kind="e1000e", id="lan0")
    mac = device_mac("lan0", 5)
    assert e1000e_args(PlacedDevice(dev, 5)) == [
        "-netdev", "user,id=lan0",
        "-device", f"e1000e,netdev=lan0,id=lan0,mac={mac},addr=0x05"]
    with_ssh = E1000e(kind="e1000e", id="lan0", ssh=True)
    assert e1000e_args(PlacedDevice(with_ssh, 5))[:2] == [
        "-netdev", "user,id=lan0,hostfwd=tcp:127.0.0.1:0-:22"]


def test_virtio_blk_is_a_file_raw_device_chain() -> None:
    argv = virtio_blk_args(PlacedDevice(blk(), 4), Path("/run/x/disk0.img"))
    assert argv == [
        "-blockdev", "driver=file,node-name=disk0-file,filename=/run/x/disk0.img",
        "-blockdev", "driver=raw,node-name=disk0-fmt,file=disk0-file",
        "-device", "virtio-blk-pci,drive=disk0-fmt,id=disk0,addr=0x04"]
    assert all_str(argv)


def test_ivshmem_doorbell_uses_a_socket_chardev() -> None:
    dev = IvshmemDoorbell(kind="ivshmem-doorbell", id="shm0", vectors=4)
    argv = ivshmem_doorbell_args(PlacedDevice(dev, 0x0a), Path("/run/x/ivshmem.sock"))
    assert argv == [
        "-chardev", "socket,id=shm0-chr,path=/run/x/ivshmem.sock",
        "-device", "ivshmem-doorbell,chardev=shm0-chr,id=shm0,vectors=4,addr=0x0a"]
    assert all_str(argv)


def test_vfio_pci_plain_and_user_space_msix() -> None:
    plain = VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0")
    assert vfio_pci_args(PlacedDevice(plain, 6)) == [
        "-device", "vfio-pci,host=0000:00:05.0,id=nvme0,addr=0x06"]
    msix = VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0", no_kvm_msix=True)
    assert vfio_pci_args(PlacedDevice(msix, 6)) == [
        "-device", "vfio-pci,host=0000:00:05.0,id=nvme0,addr=0x06,x-no-kvm-msix=on"]
    both = VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0", no_kvm_msix=True,
                   no_kvm_msi=True)
    assert vfio_pci_args(PlacedDevice(both, 6))[1].endswith(",x-no-kvm-msix=on,x-no-kvm-msi=on")


def test_device_args_dispatches_with_resources() -> None:
    resources = DeviceResources(disks={"disk0": Path("/d/disk0.img")},
                                ivshmem_sockets={"shm0": Path("/d/shm0.sock")})
    shm = IvshmemDoorbell(kind="ivshmem-doorbell", id="shm0")
    assert device_args(PlacedDevice(blk(), 4), resources) == virtio_blk_args(
        PlacedDevice(blk(), 4), Path("/d/disk0.img"))
    assert device_args(PlacedDevice(shm, 5), resources) == ivshmem_doorbell_args(
        PlacedDevice(shm, 5), Path("/d/shm0.sock"))
    assert device_args(PlacedDevice(net(), 3), NO_RESOURCES) == virtio_net_args(
        PlacedDevice(net(), 3))


# --- commas ---------------------------------------------------------------------------------------


def test_comma_in_disk_path_is_refused() -> None:
    with pytest.raises(ValueError, match="contains a comma"):
        virtio_blk_args(PlacedDevice(blk(), 4), Path("/tmp/a,b.img"))


def test_comma_in_ivshmem_socket_is_refused() -> None:
    dev = IvshmemDoorbell(kind="ivshmem-doorbell", id="shm0")
    with pytest.raises(ValueError, match=r"'/tmp/x,y\.sock' for path contains a comma"):
        ivshmem_doorbell_args(PlacedDevice(dev, 5), Path("/tmp/x,y.sock"))


def test_comma_in_boot_disk_is_refused() -> None:
    with pytest.raises(ValueError, match="comma"):
        boot_args(Boot(disk=Path("/img/a,b.qcow2")))


# --- machine, channels, boot, whole argv ----------------------------------------------------------


def test_machine_args_under_kvm_use_the_host_cpu() -> None:
    vm = VM(name="guest0", cpus=4, memory_mib=1024)
    assert machine_args(vm, "kvm") == [
        "qemu-system-x86_64", "-name", "guest0,debug-threads=on",
        "-machine", "q35,accel=kvm", "-cpu", "host",
        "-smp", "4", "-m", "1024M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]


def test_machine_args_under_tcg_leave_the_cpu_model_alone() -> None:
    vm = VM(name="guest0", accel=Accel.TCG, qemu="/opt/qemu/bin/qemu-system-x86_64")
    argv = machine_args(vm, "tcg")
    assert "-cpu" not in argv
    assert argv[:5] == ["/opt/qemu/bin/qemu-system-x86_64", "-name", "guest0,debug-threads=on",
                        "-machine", "q35,accel=tcg"]
    assert argv[5:9] == ["-smp", "2", "-m", "512M"]


def test_channel_args_use_the_inherited_fds() -> None:
    assert channel_args(7, 9) == [
        "-chardev", "socket,id=qmp,fd=7", "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=console,fd=9", "-serial", "chardev:console"]


def test_boot_args_kernel_initrd_append() -> None:
    boot = Boot(kernel=Path("/i/vmlinuz"), initrd=Path("/i/initrd.cpio"),
                append="console=ttyS0 quiet")
    assert boot_args(boot) == ["-kernel", "/i/vmlinuz", "-initrd", "/i/initrd.cpio",
                               "-append", "console=ttyS0 quiet"]
    assert boot_args(Boot()) == []


def test_boot_args_cloud_disk_and_seed() -> None:
    boot = Boot(disk=Path("/r/overlay.qcow2"), seed=Path("/r/seed.iso"))
    assert boot_args(boot) == [
        "-drive", "if=virtio,file=/r/overlay.qcow2,format=qcow2",
        "-drive", "if=virtio,file=/r/seed.iso,format=raw,readonly=on"]


def test_build_argv_order_and_extra_args_last() -> None:
    shm = IvshmemDoorbell(kind="ivshmem-doorbell", id="shm0")
    vfio = VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0", no_kvm_msix=True)
    vm = VM(name="guest0", devices=(net(), blk(), shm, vfio),
            extra_args=("-trace", "vfio_msix_*", "-S"))
    placed = place_devices(vm.devices)
    resources = DeviceResources(disks={"disk0": Path("/r/disk0.img")},
                                ivshmem_sockets={"shm0": Path("/r/shm.sock")})
    boot = Boot(kernel=Path("/i/vmlinuz"), initrd=Path("/i/initrd"), append="console=ttyS0")
    argv = build_argv(vm, "tcg", boot, placed, resources, qmp_fd=5, console_fd=6)

    expected = (machine_args(vm, "tcg") + channel_args(5, 6) + boot_args(boot)
                + virtio_net_args(placed[0])
                + virtio_blk_args(placed[1], Path("/r/disk0.img"))
                + ivshmem_doorbell_args(placed[2], Path("/r/shm.sock"))
                + vfio_pci_args(placed[3])
                + ["-trace", "vfio_msix_*", "-S"])
    assert argv == expected
    assert argv[-3:] == ["-trace", "vfio_msix_*", "-S"]
    assert all_str(argv)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert [re.search(r"addr=(0x\w+)", d).group(1) for d in devices  # type: ignore[union-attr]
            ] == ["0x03", "0x04", "0x05", "0x06"]
