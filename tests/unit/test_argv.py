"""QEMU argv builders: exact lists, slot placement, MACs, each kind's own arguments, both
platforms, the KVM probe and the lab's emulated host, and the refusal of commas in values.

Pure functions, so every test compares whole argv lists; nothing here starts QEMU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import typing
from pathlib import Path

import pytest

from harness.config.devices import Device, E1000e, VfioPci, VirtioBlk, VirtioNet
from harness.config.model import VM, Accel, LabDevice
from harness.errors import HarnessError
from harness.platform import ARM64, PLATFORMS, X86_64, Platform
from harness.qemu.argv import (
    Boot,
    LabShare,
    PlacedDevice,
    bare_boot_argv,
    boot_args,
    build_argv,
    channel_args,
    device_args,
    device_mac,
    entropy_args,
    kvm_probe_argv,
    lab_host_argv,
    lab_network,
    machine_args,
    place_devices,
)

BOTH = pytest.mark.parametrize("platform", list(PLATFORMS.values()), ids=lambda p: p.arch.value)


def net(id: str = "net0", addr: int | None = None, ssh: bool = True) -> VirtioNet:
    return VirtioNet(kind="virtio-net", id=id, addr=addr, ssh=ssh)


def blk(id: str = "disk0", addr: int | None = None) -> VirtioBlk:
    return VirtioBlk(kind="virtio-blk", id=id, addr=addr)


def placed(device: Device, slot: int, platform: Platform = X86_64) -> PlacedDevice:
    return PlacedDevice(device, slot, platform)


def all_str(argv: list[str]) -> bool:
    return all(type(a) is str for a in argv)


# --- placement -------------------------------------------------------------------------------


@BOTH
def test_devices_without_addr_get_slots_from_0x03_in_order(platform: Platform) -> None:
    out = place_devices([net("a"), blk("b"), blk("c")], platform)
    assert [(p.device.id, p.slot) for p in out] == [("a", 3), ("b", 4), ("c", 5)]
    assert all(p.platform is platform for p in out)


def test_explicit_addr_is_kept_and_skipped_by_the_others() -> None:
    # The explicit slot is taken out of the pool before any automatic one is handed out,
    # even when the explicit device comes later in the list.
    out = place_devices([net("a"), blk("b"), blk("c", addr=0x04), blk("d", addr=0x03)], X86_64)
    assert [(p.device.id, p.slot) for p in out] == [("a", 5), ("b", 6), ("c", 4), ("d", 3)]


def test_explicit_addr_below_first_slot_is_allowed() -> None:
    out = place_devices([blk("a", addr=0x01), blk("b")], X86_64)
    assert [p.slot for p in out] == [0x01, 0x03]


def test_placement_keeps_input_order_and_devices() -> None:
    devices: list[Device] = [blk("x", addr=0x10), net("y"), blk("z")]
    assert [p.device for p in place_devices(devices, X86_64)] == devices


def test_bdf_and_addr_are_the_slot_on_the_root_bus() -> None:
    assert placed(blk(), 0x03).bdf == "0000:00:03.0"
    assert placed(blk(), 0x1e).bdf == "0000:00:1e.0"
    assert placed(blk(), 0x1e).addr == "0x1e"


def test_automatic_slots_never_reach_the_ich9_slot_on_q35() -> None:
    out = place_devices([blk(f"d{i}") for i in range(28)], X86_64)  # 0x03..0x1e
    assert max(p.slot for p in out) == 0x1e
    with pytest.raises(HarnessError, match=r"0x03\.\.0x1e"):
        place_devices([blk(f"d{i}") for i in range(29)], X86_64)


def test_arm64_virt_has_slot_0x1f_too() -> None:
    out = place_devices([blk(f"d{i}") for i in range(29)], ARM64)
    assert max(p.slot for p in out) == 0x1f
    with pytest.raises(HarnessError, match=r"0x03\.\.0x1f"):
        place_devices([blk(f"d{i}") for i in range(30)], ARM64)


@BOTH
def test_a_hotplug_device_sits_behind_a_root_port_of_its_own(platform: Platform) -> None:
    """The k-th root port by slot gets bus k (depth-first numbering in slot order, checked on
    both machines by tests/system/test_manual.py); the device is 00.0 on it."""
    devices: list[Device] = [net("n0"), VirtioBlk(kind="virtio-blk", id="d1", hotplug=True),
                             VirtioNet(kind="virtio-net", id="n1", ssh=False, hotplug=True,
                                       addr=0x10),
                             VirtioBlk(kind="virtio-blk", id="d2", hotplug=True, addr=0x08)]
    out = {p.device.id: p for p in place_devices(devices, platform)}
    assert {k: (p.slot, p.bus, p.bdf) for k, p in out.items()} == {
        "n0": (0x03, 0, "0000:00:03.0"), "d1": (0x04, 1, "0000:01:00.0"),
        "n1": (0x10, 3, "0000:03:00.0"), "d2": (0x08, 2, "0000:02:00.0")}
    assert out["n0"].port is None and out["n0"].port_args() == []
    assert device_args(out["d1"], {"d1": Path("/s/d1.img")}) == [
        "-device", "pcie-root-port,id=port-d1,chassis=1,slot=1,addr=0x04",
        "-blockdev", "driver=file,node-name=d1-file,filename=/s/d1.img",
        "-blockdev", "driver=raw,node-name=d1-fmt,file=d1-file",
        "-device", "virtio-blk-pci,drive=d1-fmt,id=d1,bus=port-d1,addr=0x00"]
    n1 = device_args(out["n1"], {})
    assert n1[:2] == ["-device", "pcie-root-port,id=port-n1,chassis=3,slot=3,addr=0x10"]
    assert ",bus=port-n1,addr=0x00" in n1[-1]
    # the MAC stays the one of the slot, so a NIC keeps it across a replug
    assert out["n1"].mac == device_mac("n1", 0x10)


def test_an_assigned_device_behind_a_root_port() -> None:
    dev = VfioPci(kind="vfio-pci", id="nic", host="0000:00:05.0", addr=0x04, hotplug=True)
    (p,) = place_devices([dev], X86_64)
    assert device_args(p, {}) == [
        "-device", "pcie-root-port,id=port-nic,chassis=1,slot=1,addr=0x04",
        "-device", "vfio-pci,host=0000:00:05.0,id=nic,bus=port-nic,addr=0x00"]
    assert p.bdf == "0000:01:00.0"


# --- MAC addresses -------------------------------------------------------------------------------


def test_mac_is_pinned_for_id_and_slot() -> None:
    # Pinned: a changed MAC changes the guest's interface names and DHCP leases between runs.
    assert device_mac("net0", 3) == "52:54:00:c4:49:1b"
    digest = hashlib.sha256(b"net0/3").digest()
    assert device_mac("net0", 3).split(":")[3:] == [f"{b:02x}" for b in digest[:3]]


def test_mac_is_stable_and_distinct() -> None:
    macs = {device_mac(i, s) for i in ("net0", "net1", "lan") for s in (3, 4, 0x1e)}
    assert len(macs) == 9
    for mac in macs:
        assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast


def test_placed_device_mac_uses_its_slot() -> None:
    assert placed(net(), 4).mac == device_mac("net0", 4)


# --- each kind builds its own arguments -------------------------------------------------------


def test_virtio_net_with_ssh_forwards_port_0_on_loopback() -> None:
    assert device_args(placed(net(), 3), {}) == [
        "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22",
        "-device", "virtio-net-pci,netdev=net0,id=net0,mac=52:54:00:c4:49:1b,addr=0x03"]


def test_virtio_net_without_ssh_has_no_forward_and_a_subnet_is_passed() -> None:
    dev = VirtioNet(kind="virtio-net", id="net0", ssh=False, network="10.0.3.0/24")
    (one,) = place_devices([dev], X86_64)
    assert device_args(one, {})[:2] == ["-netdev", "user,id=net0,net=10.0.3.0/24"]


def test_each_nic_gets_its_own_network_and_its_guest_address_from_it() -> None:
    lan = E1000e(kind="e1000e", id="lan0")
    mine = VirtioNet(kind="virtio-net", id="net2", ssh=False, network="10.0.3.0/24")
    out = place_devices([net(), blk(), lan, mine, E1000e(kind="e1000e", id="lan1")], X86_64)
    assert [p.network for p in out] == ["10.0.2.0/24", None, "10.0.4.0/24", "10.0.3.0/24",
                                        "10.0.5.0/24"]
    assert out[0].guest_address() == ("10.0.2.15/24", "10.0.2.2")
    assert out[2].guest_address() == ("10.0.4.15/24", "10.0.4.2")
    assert device_args(out[0], {})[1] == "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22"
    assert device_args(out[2], {})[1] == "user,id=lan0,net=10.0.4.0/24"


def test_nics_on_arm64_ask_for_no_option_rom() -> None:
    # No firmware on arm64 virt loads option ROMs; QEMU must not go looking for one.
    assert device_args(placed(net(), 3, ARM64), {})[3].endswith(",addr=0x03,romfile=")
    assert "romfile" not in device_args(placed(net(), 3, X86_64), {})[3]


def test_e1000e_without_and_with_ssh() -> None:
    dev = E1000e(kind="e1000e", id="lan0")
    mac = device_mac("lan0", 5)
    assert device_args(placed(dev, 5), {}) == [
        "-netdev", "user,id=lan0",
        "-device", f"e1000e,netdev=lan0,id=lan0,mac={mac},addr=0x05"]
    with_ssh = E1000e(kind="e1000e", id="lan0", ssh=True)
    assert device_args(placed(with_ssh, 5), {})[:2] == [
        "-netdev", "user,id=lan0,hostfwd=tcp:127.0.0.1:0-:22"]


def test_virtio_blk_is_a_file_raw_device_chain_on_its_scratch_file() -> None:
    dev = blk()
    assert dev.scratch_size() == 8 << 20
    argv = device_args(placed(dev, 4), {"disk0": Path("/run/x/disk0.img")})
    assert argv == [
        "-blockdev", "driver=file,node-name=disk0-file,filename=/run/x/disk0.img",
        "-blockdev", "driver=raw,node-name=disk0-fmt,file=disk0-file",
        "-device", "virtio-blk-pci,drive=disk0-fmt,id=disk0,addr=0x04"]
    assert all_str(argv)
    with pytest.raises(ValueError, match="no scratch disk"):
        device_args(placed(dev, 4), {})


def test_vfio_pci_plain_and_user_space_msix() -> None:
    plain = VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0")
    assert device_args(placed(plain, 6), {}) == [
        "-device", "vfio-pci,host=0000:00:05.0,id=nvme0,addr=0x06"]
    msix = dataclasses.replace(plain, no_kvm_msix=True)
    assert device_args(placed(msix, 6), {})[1].endswith(",addr=0x06,x-no-kvm-msix=on")
    both = dataclasses.replace(plain, no_kvm_msix=True, no_kvm_msi=True)
    assert device_args(placed(both, 6), {})[1].endswith(",x-no-kvm-msix=on,x-no-kvm-msi=on")


def test_each_kind_answers_for_itself() -> None:
    kinds = typing.get_args(Device)
    assert {k.__name__ for k in kinds} == {"VirtioNet", "E1000e", "VirtioBlk", "VfioPci"}
    vfio = VfioPci(kind="vfio-pci", id="v", host="0000:00:05.0")
    assert (vfio.emulated, vfio.assigned_host, vfio.guest_modules) == (False, "0000:00:05.0", ())
    assert (net().emulated, net().assigned_host, net().ssh_nic()) == (True, None, True)
    assert net(ssh=False).ssh_nic() is False
    assert E1000e(kind="e1000e", id="e").guest_modules == ("e1000e",)
    assert blk().ssh_nic() is False and blk().guest_modules == ("virtio_pci", "virtio_blk")


# --- commas ---------------------------------------------------------------------------------------


def test_comma_in_disk_path_is_refused() -> None:
    with pytest.raises(ValueError, match="contains a comma"):
        device_args(placed(blk(), 4), {"disk0": Path("/tmp/a,b.img")})


def test_comma_in_boot_disk_is_refused() -> None:
    with pytest.raises(ValueError, match="comma"):
        boot_args(Boot(disk=Path("/img/a,b.qcow2")))


# --- machine, channels, boot, whole argv ----------------------------------------------------------


def test_x86_machine_args_under_kvm_use_the_host_cpu() -> None:
    vm = VM(name="guest0", cpus=4, memory_mib=1024)
    assert machine_args(X86_64, vm, "kvm") == [
        "qemu-system-x86_64", "-name", "guest0,debug-threads=on",
        "-machine", "q35,accel=kvm", "-cpu", "host",
        "-smp", "4", "-m", "1024M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]


def test_x86_machine_args_under_tcg_leave_the_cpu_model_alone() -> None:
    vm = VM(name="guest0", accel=Accel.TCG, qemu="/opt/qemu/bin/qemu-system-x86_64")
    argv = machine_args(X86_64, vm, "tcg")
    assert "-cpu" not in argv
    assert argv[:5] == ["/opt/qemu/bin/qemu-system-x86_64", "-name", "guest0,debug-threads=on",
                        "-machine", "q35,accel=tcg"]
    assert argv[5:9] == ["-smp", "2", "-m", "512M"]


def test_arm64_machine_is_virt_with_a_gicv3_its_and_a_cheap_tcg_cpu() -> None:
    vm = VM(name="guest0")
    assert machine_args(ARM64, vm, "tcg")[:7] == [
        "qemu-system-aarch64", "-name", "guest0,debug-threads=on",
        "-machine", "virt,gic-version=3,its=on,accel=tcg", "-cpu", "max,pauth-impdef=on"]


def test_a_machine_named_by_the_scenario_gets_none_of_the_platform_options() -> None:
    vm = VM(name="guest0", machine="virt-7.2")
    assert machine_args(ARM64, vm, "tcg")[3:5] == ["-machine", "virt-7.2,accel=tcg"]


def test_channel_args_use_the_inherited_fds() -> None:
    assert channel_args(7, 9) == [
        "-chardev", "socket,id=qmp,fd=7", "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=console,fd=9", "-serial", "chardev:console"]


def test_boot_args_kernel_initrd_append_and_cloud_disks() -> None:
    boot = Boot(kernel=Path("/i/vmlinuz"), initrd=Path("/i/initrd.cpio"), append="quiet")
    assert boot_args(boot) == ["-kernel", "/i/vmlinuz", "-initrd", "/i/initrd.cpio",
                               "-append", "quiet"]
    assert boot_args(Boot()) == []
    assert boot_args(Boot(disk=Path("/r/overlay.qcow2"), seed=Path("/r/seed.iso"))) == [
        "-drive", "if=virtio,file=/r/overlay.qcow2,format=qcow2",
        "-drive", "if=virtio,file=/r/seed.iso,format=raw,readonly=on"]


@BOTH
def test_build_argv_order_and_extra_args_last(platform: Platform) -> None:
    vfio = VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0", no_kvm_msix=True)
    vm = VM(name="guest0", devices=(net(), blk(), vfio), extra_args=("-trace", "vfio_*", "-S"))
    out = place_devices(vm.devices, platform)
    scratch = {"disk0": Path("/r/disk0.img")}
    boot = Boot(kernel=Path("/i/vmlinuz"), initrd=Path("/i/initrd"), append="x")
    argv = build_argv(platform, vm, "tcg", boot, out, scratch, qmp_fd=5, console_fd=6)

    expected = (machine_args(platform, vm, "tcg") + channel_args(5, 6) + boot_args(boot)
                + device_args(out[0], scratch) + device_args(out[1], scratch)
                + device_args(out[2], scratch) + entropy_args(platform, out)
                + ["-trace", "vfio_*", "-S"])
    assert argv == expected
    assert all_str(argv)
    assert argv[0] == platform.qemu
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    # The scenario's devices, then the guest's entropy source at the highest free slot.
    assert [re.search(r"addr=(0x\w+)", d).group(1) for d in devices  # type: ignore[union-attr]
            ] == ["0x03", "0x04", "0x05", f"0x{platform.slots[-1]:02x}"]
    assert devices[-1].startswith("virtio-rng-pci,id=harness-rng,")
    bare = bare_boot_argv(platform, vm, "tcg", boot, 5, 6)
    assert bare == argv[:len(bare)] and "-device" not in bare



@BOTH
def test_the_entropy_source_keeps_out_of_every_slot_a_device_takes(platform: Platform) -> None:
    top = platform.slots[-1]
    vm = VM(name="g", devices=(net(), VirtioBlk(kind="virtio-blk", id="d", addr=top)),
            extra_args=("-device", f"virtio-balloon-pci,id=b,addr=0x{top - 1:x}"))
    args = entropy_args(platform, place_devices(vm.devices, platform), vm.extra_args)
    assert args == ["-device", f"virtio-rng-pci,id=harness-rng,addr=0x{top - 2:02x}"]

# --- the KVM probe and the lab's L1 go through the same builder -------------------------------


@BOTH
def test_kvm_probe_runs_the_platform_program_alone_on_the_serial_port(
        platform: Platform) -> None:
    argv = kvm_probe_argv(platform, None, "/proc/self/fd/5", 7)
    assert argv[0] == platform.qemu
    assert argv[argv.index("-cpu") + 1] == "host"
    assert ",accel=kvm" in argv[argv.index("-machine") + 1]
    assert argv[-2:] == [platform.kvm_probe.option, "/proc/self/fd/5"]
    assert "-device" not in argv and "-append" not in argv and "-initrd" not in argv
    assert argv[argv.index("-serial") + 1] == "stdio" and "-no-reboot" in argv
    # paused, QMP on the given descriptor: the caller times the program from its "cont"
    assert "-S" in argv and argv[argv.index("-chardev") + 1] == "socket,id=qmp,fd=7"
    assert argv[argv.index("-mon") + 1] == "chardev=qmp,mode=control"
    assert kvm_probe_argv(platform, "/opt/q", "/p", 7)[0] == "/opt/q"
    # Under TCG (to check the program itself) only the accelerator and CPU differ.
    tcg = kvm_probe_argv(platform, None, "/proc/self/fd/5", 7, "tcg")
    assert ",accel=tcg" in tcg[tcg.index("-machine") + 1]
    strip = {"-cpu", "host", platform.tcg_cpu}
    assert [a for a in argv if a not in strip and "accel=" not in a] == [
        a for a in tcg if a not in strip and "accel=" not in a]


def test_x86_lab_host_has_svm_vtd_first_and_the_nic_behind_the_iommu() -> None:
    shares = [LabShare("hostroot", Path("/"), True, 3), LabShare("lab", Path("/r"), False, 4)]
    argv = lab_host_argv(X86_64, Path("/k"), Path("/i"), shares, 5, 2048, 2)
    assert argv[:8] == ["qemu-system-x86_64", "-name", "lab-l1", "-machine",
                        "q35,kernel-irqchip=split,accel=tcg", "-cpu", "qemu64,+svm,+npt", "-smp"]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "intel-iommu,intremap=on,device-iotlb=on"
    assert "intel_iommu=on" in argv[argv.index("-append") + 1]
    assert ("local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
            in argv)
    assert "local,id=lab,path=/r,security_model=none,multidevs=remap" in argv
    assert devices[-1] == (f"virtio-net-pci,netdev=labnet,mac={device_mac('lab', 5)},"
                           "romfile=,iommu_platform=on,ats=on,disable-legacy=on,addr=0x05")


def test_lab_device_kinds_each_sit_behind_the_iommu_with_their_own_options() -> None:
    def lab_args(device: LabDevice) -> list[str]:
        argv = lab_host_argv(X86_64, Path("/k"), Path("/i"), [], 5, 2048, 2, devices=[device])
        return argv[argv.index("-append") + 2:]  # no shares: only the device follows

    # e1000e is no virtio device: only the options every PCI device takes.
    assert lab_args(LabDevice(kind="e1000e")) == [
        "-netdev", "user,id=labnet", "-device",
        f"e1000e,netdev=labnet,mac={device_mac('lab', 5)},romfile=,addr=0x05"]
    blk = lab_args(LabDevice(kind="virtio-blk", vectors=3, queues=2))
    assert blk[-1] == ("virtio-blk-pci,drive=labdisk,num-queues=2,romfile=,iommu_platform=on,"
                       "ats=on,disable-legacy=on,vectors=3,addr=0x05")
    argv = lab_host_argv(X86_64, Path("/k"), Path("/i"), [], 5, 2048, 2,
                         devices=[LabDevice(kind="virtio-blk")])
    assert "driver=null-co,node-name=labdisk,size=16777216,read-zeroes=on" in argv
    net = lab_args(LabDevice(vectors=2))
    assert net[-1].startswith("virtio-net-pci,") and ",vectors=2," in net[-1]


def test_several_lab_devices_take_the_next_slots_and_nics_their_own_networks() -> None:
    argv = lab_host_argv(X86_64, Path("/k"), Path("/i"), [], 5, 2048, 2, devices=[
        LabDevice(), LabDevice(kind="ahci"), LabDevice(kind="e1000e"), LabDevice()])
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"][1:]  # after the IOMMU
    assert [d.split(",")[0] for d in devices] == ["virtio-net-pci", "ich9-ahci",
                                                  "ide-hd", "e1000e", "virtio-net-pci"]
    assert [re.search(r"addr=(0x\w+)", d)[1] for d in devices  # type: ignore[index]
            if "addr=" in d] == ["0x05", "0x06", "0x07", "0x08"]
    netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    # The first NIC on QEMU's default network, the next ones on their own: ping-able apart.
    assert netdevs == ["user,id=labnet", "user,id=labnet2,net=10.0.4.0/24",
                       "user,id=labnet3,net=10.0.5.0/24"]
    assert "ide-hd,drive=labdisk1,bus=labahci1.0" in devices
    assert lab_network(0) == "10.0.2.0/24" and lab_network(1) == "10.0.4.0/24"


def test_arm64_lab_host_is_virt_at_el2_with_gicv4_and_smmuv3() -> None:
    argv = lab_host_argv(ARM64, Path("/k"), Path("/i"), [], 2, 2048, 2)
    machine = argv[argv.index("-machine") + 1]
    assert machine == "virt,gic-version=4,its=on,virtualization=on,iommu=smmuv3,accel=tcg"
    assert "kvm-arm.vgic_v4_enable=1" in argv[argv.index("-append") + 1]
    assert "console=ttyAMA0" in argv[argv.index("-append") + 1]


def test_a_scenarios_qemu_must_be_a_qemu_before_anything_runs_it(tmp_path: Path) -> None:
    from harness.errors import UsageError
    from harness.qemu.machine import check_qemu_binary

    script = tmp_path / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    script.chmod(0o755)
    with pytest.raises(UsageError, match="is not an executable ELF file"):
        check_qemu_binary(str(script), X86_64)
    other = tmp_path / "mytool"
    other.write_bytes(b"\x7fELF" + b"\0" * 60)
    other.chmod(0o755)
    with pytest.raises(UsageError, match="expected qemu-system-\\*, e.g. qemu-system-x86_64"):
        check_qemu_binary(str(other), X86_64)
    with pytest.raises(UsageError, match="not found or not executable"):
        check_qemu_binary(str(tmp_path / "absent"), X86_64)
    real = shutil.which(X86_64.qemu)
    if real is not None:  # this host's own QEMU passes, and is not run to tell
        assert check_qemu_binary(X86_64.qemu, X86_64).name.startswith("qemu-system-")
