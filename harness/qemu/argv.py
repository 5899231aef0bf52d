"""QEMU command lines, built as argv lists by pure functions (one per device kind).

Nothing here touches the host: the caller supplies paths, file descriptor numbers and the
accelerator decision; the result is a list of strings that is safe to log with shlex.join.
Devices sit on the root bus at fixed slots, so every vector's guest PCI address is known
before boot and vector identities can be checked, not guessed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.config.model import VM, Device, E1000e, IvshmemDoorbell, VfioPci, VirtioBlk, VirtioNet
from harness.errors import UsageError

FIRST_SLOT = 0x03  # automatic placement starts here; 0x01-0x02 stay free for explicit addr
LAST_SLOT = 0x1E  # q35's ICH9 functions (LPC, SATA, SMBus) sit at 0x1f
SSH_GUEST_PORT = 22


@dataclass(frozen=True)
class PlacedDevice:
    """A scenario device with the guest PCI address it will have."""

    device: Device
    slot: int

    @property
    def bdf(self) -> str:
        return f"0000:00:{self.slot:02x}.0"

    @property
    def mac(self) -> str:
        return device_mac(self.device.id, self.slot)

    def guest_address(self) -> tuple[str, str]:
        """(address/prefix, gateway) of the guest on this NIC's user-mode network."""
        prefix = getattr(self.device, "network", "10.0.2.0/24").rsplit(".", 1)[0]
        return f"{prefix}.15/24", f"{prefix}.2"


@dataclass(frozen=True)
class DeviceResources:
    """Host-side things some devices need, made by the Machine before argv is built."""

    disks: Mapping[str, Path]  # device id -> scratch disk (virtio-blk)
    ivshmem_sockets: Mapping[str, Path]  # device id -> ivshmem server socket


def place_devices(devices: Sequence[Device]) -> tuple[PlacedDevice, ...]:
    """Give each device its slot: explicit ``addr`` values first, then the lowest free slots."""
    taken = {d.addr for d in devices if d.addr is not None}
    free = iter([slot for slot in range(FIRST_SLOT, LAST_SLOT + 1) if slot not in taken])
    placed = []
    for d in devices:
        slot = d.addr if d.addr is not None else next(free, None)
        if slot is None:
            raise UsageError(f"device {d.id}: no free slot on the root bus "
                             f"({FIRST_SLOT:#04x}..{LAST_SLOT:#04x}); give fewer devices")
        placed.append(PlacedDevice(d, slot))
    return tuple(placed)


def device_mac(device_id: str, slot: int) -> str:
    """A stable locally administered MAC (QEMU's 52:54:00 prefix) for a NIC."""
    digest = hashlib.sha256(f"{device_id}/{slot}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _props(head: str, props: Mapping[str, object]) -> str:
    parts = [head]
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        text = str(value)
        if "," in text:
            raise ValueError(f"QEMU option value {text!r} for {key} contains a comma")
        parts.append(f"{key}={text}")
    return ",".join(parts)


def _user_netdev(placed: PlacedDevice) -> list[str]:
    # hostfwd to port 0: slirp binds an ephemeral port on 127.0.0.1 and reports it through
    # "info usernet", so the port is chosen by the kernel, not raced for by the harness.
    dev = placed.device
    assert isinstance(dev, VirtioNet | E1000e)
    fwd = f",hostfwd=tcp:127.0.0.1:0-:{SSH_GUEST_PORT}" if dev.ssh else ""
    net = f",net={dev.network}" if dev.network != "10.0.2.0/24" else ""
    return ["-netdev", f"user,id={dev.id}{net}{fwd}"]


def virtio_net_args(placed: PlacedDevice) -> list[str]:
    dev = placed.device
    assert isinstance(dev, VirtioNet)
    props: dict[str, object] = {"netdev": dev.id, "id": dev.id, "mac": placed.mac,
                                "addr": f"0x{placed.slot:02x}"}
    return [*_user_netdev(placed), "-device", _props("virtio-net-pci", props)]


def e1000e_args(placed: PlacedDevice) -> list[str]:
    dev = placed.device
    assert isinstance(dev, E1000e)
    return [*_user_netdev(placed), "-device", _props("e1000e", {
        "netdev": dev.id, "id": dev.id, "mac": placed.mac, "addr": f"0x{placed.slot:02x}"})]


def virtio_blk_args(placed: PlacedDevice, disk: Path) -> list[str]:
    dev = placed.device
    assert isinstance(dev, VirtioBlk)
    return ["-blockdev", _props("driver=file", {"node-name": f"{dev.id}-file",
                                                "filename": disk}),
            "-blockdev", _props("driver=raw", {"node-name": f"{dev.id}-fmt",
                                               "file": f"{dev.id}-file"}),
            "-device", _props("virtio-blk-pci", {"drive": f"{dev.id}-fmt", "id": dev.id,
                                                  "addr": f"0x{placed.slot:02x}"})]


def ivshmem_doorbell_args(placed: PlacedDevice, server_socket: Path) -> list[str]:
    dev = placed.device
    assert isinstance(dev, IvshmemDoorbell)
    return ["-chardev", _props("socket", {"id": f"{dev.id}-chr", "path": server_socket}),
            "-device", _props("ivshmem-doorbell", {"chardev": f"{dev.id}-chr", "id": dev.id,
                                                    "vectors": dev.vectors,
                                                    "addr": f"0x{placed.slot:02x}"})]


def vfio_pci_args(placed: PlacedDevice) -> list[str]:
    dev = placed.device
    assert isinstance(dev, VfioPci)
    return ["-device", _props("vfio-pci", {
        "host": dev.host, "id": dev.id, "addr": f"0x{placed.slot:02x}",
        "x-no-kvm-msix": True if dev.no_kvm_msix else None,
        "x-no-kvm-msi": True if dev.no_kvm_msi else None})]


def device_args(placed: PlacedDevice, resources: DeviceResources) -> list[str]:
    dev = placed.device
    if isinstance(dev, VirtioNet):
        return virtio_net_args(placed)
    if isinstance(dev, E1000e):
        return e1000e_args(placed)
    if isinstance(dev, VirtioBlk):
        return virtio_blk_args(placed, resources.disks[dev.id])
    if isinstance(dev, IvshmemDoorbell):
        return ivshmem_doorbell_args(placed, resources.ivshmem_sockets[dev.id])
    return vfio_pci_args(placed)


@dataclass(frozen=True)
class Boot:
    """What to boot: a kernel (+ initramfs) directly, or a disk image with a seed."""

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disk: Path | None = None  # a qcow2 overlay of a cloud image
    seed: Path | None = None  # cloud-init NoCloud seed (ISO)


def machine_args(vm: VM, accel: str) -> list[str]:
    """Machine, accelerator, CPU and memory; no devices (-nodefaults) and no display."""
    cpu = ["-cpu", "host"] if accel == "kvm" else []
    return [vm.qemu, "-name", _props(vm.name, {"debug-threads": True}),
            "-machine", _props(vm.machine, {"accel": accel}), *cpu,
            "-smp", str(vm.cpus), "-m", f"{vm.memory_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]


def boot_args(boot: Boot) -> list[str]:
    args: list[str] = []
    if boot.kernel is not None:
        args += ["-kernel", str(boot.kernel)]
        if boot.initrd is not None:
            args += ["-initrd", str(boot.initrd)]
        args += ["-append", boot.append]
    if boot.disk is not None:
        args += ["-drive", _props("if=virtio", {"file": boot.disk, "format": "qcow2"})]
    if boot.seed is not None:
        args += ["-drive", _props("if=virtio", {"file": boot.seed, "format": "raw",
                                                "readonly": True})]
    return args


def channel_args(qmp_fd: int, console_fd: int) -> list[str]:
    """QMP and the serial console over inherited socketpair ends: nothing on the filesystem."""
    return ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=console,fd={console_fd}", "-serial", "chardev:console"]


def build_argv(vm: VM, accel: str, boot: Boot, placed: Sequence[PlacedDevice],
               resources: DeviceResources, qmp_fd: int, console_fd: int) -> list[str]:
    argv = machine_args(vm, accel) + channel_args(qmp_fd, console_fd) + boot_args(boot)
    for p in placed:
        argv += device_args(p, resources)
    return argv + list(vm.extra_args)
