"""Every QEMU command line the harness runs, built as argv lists by pure functions.

Nothing here touches the host: the caller supplies the platform, paths, file descriptor
numbers and the accelerator decision; the result is a list of strings that is safe to log
with shlex.join.  Scenario VMs, the KVM probe and the lab's emulated host are all built
here, from the :class:`~harness.platform.Platform` they run on.  Devices sit on the root
bus at fixed slots (a hot-pluggable one behind a root port of its own there), so every
vector's guest PCI address is known before boot, and each device kind builds its own
arguments (:mod:`harness.config.devices`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.config.devices import DEFAULT_NETWORK, Device
from harness.config.model import DEFAULT_LAB_DEVICE, VM, LabDevice
from harness.errors import UsageError
from harness.platform import Platform
from harness.qemu_options import qemu_options

# Prefix for every QEMU the harness starts: the kernel sends it SIGKILL when the thread that
# started it dies, however the harness dies.
DIE_WITH_HARNESS = ("setpriv", "--pdeathsig", "KILL", "--")


def die_with_harness(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that the kernel kills it when the harness process dies."""
    return [*DIE_WITH_HARNESS, *argv]


#: The id of a hot-pluggable device's root port is this prefix and the device's id.
PORT_PREFIX = "port-"


@dataclass(frozen=True)
class PlacedDevice:
    """A scenario device with the guest PCI address it will have on its platform.

    A device with ``hotplug: true`` sits alone behind a PCIe root port of its own at
    ``slot`` (the root bus of q35 and virt cannot hot-plug); it is then function 0 of slot 0
    on the port's secondary bus, which the firmware (SeaBIOS) or the kernel (virt) numbers
    depth first in slot order: the k-th such port by slot gets bus k.  No other device kind
    is a bridge, so that order is the whole story.
    """

    device: Device
    slot: int
    platform: Platform
    network: str | None = None  # a NIC's user-mode network (a /24), None for other devices
    bus: int = 0  # the guest bus behind the device's root port; 0: on the root bus

    @property
    def bdf(self) -> str:
        if self.bus:
            return f"0000:{self.bus:02x}:00.0"
        return f"0000:00:{self.slot:02x}.0"

    @property
    def addr(self) -> str:
        """The slot as QEMU's ``addr=`` takes it (of the root port, for a device behind one)."""
        return f"0x{self.slot:02x}"

    @property
    def port(self) -> str | None:
        """The id of the device's root port, None on the root bus."""
        return f"{PORT_PREFIX}{self.device.id}" if self.bus else None

    @property
    def location(self) -> dict[str, str]:
        """Where the device's ``-device`` puts it: ``addr=`` on the root bus, or the port."""
        if self.port is not None:
            return {"bus": self.port, "addr": "0x00"}
        return {"addr": self.addr}

    def port_args(self) -> list[str]:
        """The root port's ``-device`` (none for a device on the root bus)."""
        if self.port is None:
            return []
        return ["-device", qemu_options("pcie-root-port", {
            "id": self.port, "chassis": self.bus, "slot": self.bus, "addr": self.addr})]


    @property
    def mac(self) -> str:
        return device_mac(self.device.id, self.slot)

    def guest_address(self) -> tuple[str, str]:
        """(address/prefix, gateway) of the guest on this NIC's user-mode network."""
        prefix = (self.network or DEFAULT_NETWORK).rsplit(".", 1)[0]
        return f"{prefix}.15/24", f"{prefix}.2"


def place_devices(devices: Sequence[Device], platform: Platform) -> tuple[PlacedDevice, ...]:
    """Give each device its slot: explicit ``addr`` values first, then the lowest free slots."""
    taken = {d.addr for d in devices if d.addr is not None}
    auto = range(platform.first_auto_slot, platform.slots.stop)
    free = iter([slot for slot in auto if slot not in taken])
    networks = iter(_free_networks(devices))
    slots = []
    for d in devices:
        slot = d.addr if d.addr is not None else next(free, None)
        if slot is None:
            raise UsageError(f"device {d.id}: no free slot on the root bus "
                             f"({auto.start:#04x}..{auto.stop - 1:#04x}); give fewer devices")
        slots.append(slot)
    ports = sorted(slot for d, slot in zip(devices, slots, strict=True) if d.hotplug)
    placed = []
    for d, slot in zip(devices, slots, strict=True):
        network = (getattr(d, "network", None) or next(networks)) if d.nic else None
        bus = ports.index(slot) + 1 if d.hotplug else 0
        placed.append(PlacedDevice(d, slot, platform, network, bus))
    return tuple(placed)


def _free_networks(devices: Sequence[Device]) -> list[str]:
    """The /24s a NIC without its own ``network`` gets, in order: 10.0.2.0, 10.0.3.0, ...
    skipping those another NIC of the VM names."""
    taken = {getattr(d, "network", None) for d in devices}
    return [net for net in (f"10.0.{n}.0/24" for n in range(2, 256)) if net not in taken]


def device_mac(device_id: str, slot: int) -> str:
    """A stable locally administered MAC (QEMU's 52:54:00 prefix) for a NIC."""
    digest = hashlib.sha256(f"{device_id}/{slot}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def device_args(placed: PlacedDevice, scratch: Mapping[str, Path]) -> list[str]:
    """The device's own arguments (after its root port's, if it has one); ``scratch`` maps
    device ids to their scratch files."""
    return placed.port_args() + placed.device.qemu_args(placed, scratch.get(placed.device.id))


@dataclass(frozen=True)
class Boot:
    """What to boot: a kernel (+ initramfs) directly, or a disk image with a seed."""

    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disk: Path | None = None  # a qcow2 overlay of a cloud image
    seed: Path | None = None  # cloud-init NoCloud seed (ISO)


def base_append(platform: Platform) -> str:
    """The kernel arguments every harness guest (the lab's L1 and the bench's bare boot
    too) boots with.  ``cryptomgr.notests``: the kernel's self-tests of its crypto
    algorithms say nothing about interrupt delivery and took 0.24 s of an L2 boot in the
    lab (``crypto_algapi_init``, nested under TCG).  Then the platform's own arguments."""
    return " ".join(filter(None, [f"console={platform.console} panic=-1 loglevel=4 "
                                  "cryptomgr.notests", platform.kernel_args]))


def machine_args(platform: Platform, vm: VM, accel: str) -> list[str]:
    """Machine, accelerator, CPU and memory; no devices (-nodefaults) and no display."""
    return [vm.qemu or platform.qemu, "-name", qemu_options(vm.name, {"debug-threads": True}),
            *_machine(platform, vm.machine, accel),
            "-smp", str(vm.cpus), "-m", f"{vm.memory_mib}M", *_quiet()]


def _machine(platform: Platform, machine: str | None, accel: str,
             cpu: str | None = None, options: Mapping[str, str] | None = None) -> list[str]:
    """``-machine`` (the platform's options unless the scenario names its own machine) and
    ``-cpu`` (the host's under KVM, the platform's TCG model otherwise)."""
    if machine is None:
        head, props = platform.machine, {**platform.machine_options, **(options or {})}
    else:
        head, props = machine, dict(options or {})
    cpu = cpu or ("host" if accel == "kvm" else platform.tcg_cpu)
    return ["-machine", qemu_options(head, {**props, "accel": accel}),
            *(["-cpu", cpu] if cpu else [])]


def _quiet() -> list[str]:
    return ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]


def boot_args(boot: Boot) -> list[str]:
    args: list[str] = []
    if boot.kernel is not None:
        args += ["-kernel", str(boot.kernel)]
        if boot.initrd is not None:
            args += ["-initrd", str(boot.initrd)]
        args += ["-append", boot.append]
    if boot.disk is not None:
        args += ["-drive", qemu_options("if=virtio", {"file": boot.disk, "format": "qcow2"})]
    if boot.seed is not None:
        args += ["-drive", qemu_options("if=virtio", {"file": boot.seed, "format": "raw",
                                                      "readonly": True})]
    return args


def channel_args(qmp_fd: int, console_fd: int) -> list[str]:
    """QMP and the serial console over inherited socketpair ends: nothing on the filesystem."""
    return ["-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=console,fd={console_fd}", "-serial", "chardev:console"]


def user_monitor_args(listen_fd: int) -> list[str]:
    """A second QMP monitor for people (``harness qmp``, ``qmp-shell``): QEMU serves it on a
    Unix socket the harness bound and listens on (created 0600, in a private 0700 folder), so
    the socket's permissions never depend on QEMU's umask."""
    return ["-chardev", f"socket,id=qmp-user,fd={listen_fd},server=on,wait=off",
            "-mon", "chardev=qmp-user,mode=control"]


def build_argv(platform: Platform, vm: VM, accel: str, boot: Boot,
               placed: Sequence[PlacedDevice], scratch: Mapping[str, Path], qmp_fd: int,
               console_fd: int, user_qmp_fd: int | None = None) -> list[str]:
    argv = (machine_args(platform, vm, accel) + channel_args(qmp_fd, console_fd)
            + (user_monitor_args(user_qmp_fd) if user_qmp_fd is not None else [])
            + boot_args(boot))
    for p in placed:
        argv += device_args(p, scratch)
    return argv + entropy_args(platform, placed, vm.extra_args) + list(vm.extra_args)


_ADDR = re.compile(r"(?:^|,)addr=(0x[0-9a-fA-F]+|\d+)")


def entropy_args(platform: Platform, placed: Sequence[PlacedDevice],
                 extra_args: Sequence[str] = ()) -> list[str]:
    """A virtio RNG at the highest slot nobody else takes: with no entropy source, a guest
    kernel under TCG waits about a second for its CRNG before the first getrandom() (the
    guest's SSH host key) returns.  It is not a scenario device: its IRQ is nobody's vector."""
    taken = {p.slot for p in placed}
    taken |= {int(m.group(1), 0) for arg in extra_args for m in _ADDR.finditer(arg)}
    free = [slot for slot in platform.slots if slot not in taken]
    if not free:
        return []
    return ["-device", qemu_options("virtio-rng-pci", {"id": "harness-rng",
                                                       "addr": f"0x{free[-1]:02x}"})]


def bare_boot_argv(platform: Platform, vm: VM, accel: str, boot: Boot, qmp_fd: int,
                   console_fd: int) -> list[str]:
    """The VM's machine, CPUs and memory with no devices: the bench's baseline boot."""
    return (machine_args(platform, vm, accel) + channel_args(qmp_fd, console_fd)
            + boot_args(boot))


def kvm_probe_argv(platform: Platform, qemu: str | None, payload: str | Path, qmp_fd: int,
                   accel: str = "kvm") -> list[str]:
    """The platform's probe program (:attr:`~harness.platform.Platform.kvm_probe`, in the
    file ``payload``) alone on the machine, its serial port on stdout: does KVM really run
    guest code here?  QEMU starts paused (``-S``) with QMP on ``qmp_fd``, so the caller can
    time the program from the moment it lets the vCPUs run (``cont``) rather than from QEMU's
    own start.  ``accel`` is "tcg" only to check the program itself."""
    return [qemu or platform.qemu, *_machine(platform, None, accel), "-m", "64", *_quiet(),
            "-S", "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            "-serial", "stdio", platform.kvm_probe.option, str(payload)]


# --- the lab's emulated host (L1) -----------------------------------------------------------


@dataclass(frozen=True)
class LabShare:
    """A host folder L1 mounts over 9p."""

    tag: str
    path: Path
    readonly: bool
    slot: int


def lab_host_argv(platform: Platform, kernel: Path, initrd: Path, shares: Sequence[LabShare],
                  device_slot: int, memory_mib: int, cpus: int, append: str = "",
                  devices: Sequence[LabDevice] = (DEFAULT_LAB_DEVICE,)) -> list[str]:
    """L0's command line for L1 without its console/QMP channels (the caller adds those).

    The vCPU, machine options and IOMMU come from the platform's :class:`LabHost`; the
    devices L1 assigns to its guests (NICs on user-mode networks of L0, disks that read
    zeroes), one per slot from ``device_slot`` on, have their DMA and MSIs go through the
    emulated IOMMU.
    """
    lab = platform.lab
    argv = [platform.qemu, "-name", "lab-l1",
            *_machine(platform, None, "tcg", cpu=lab.cpu, options=lab.machine_options),
            "-smp", str(cpus), "-m", f"{memory_mib}M", *_quiet()]
    for pre in lab.pre_devices:  # the IOMMU first: devices created before it bypass it
        argv += ["-device", pre]
    argv += ["-kernel", str(kernel), "-initrd", str(initrd),
             "-append", " ".join(filter(None, [base_append(platform), lab.append, append]))]
    for share in shares:
        argv += ["-fsdev", qemu_options("local", {
                     "id": share.tag, "path": share.path, "security_model": "none",
                     "readonly": True if share.readonly else None, "multidevs": "remap"}),
                 "-device", qemu_options("virtio-9p-pci", {
                     "fsdev": share.tag, "mount_tag": share.tag, "addr": f"0x{share.slot:02x}"})]
    nics = 0
    for n, device in enumerate(devices):
        argv += _lab_device(platform, device, device_slot + n, "" if n == 0 else str(n), nics)
        nics += device.kind in _LAB_NICS
    return argv


_LAB_NICS = {"virtio-net": "virtio-net-pci", "e1000e": "e1000e"}


def lab_network(nic: int) -> str:
    """The user-mode network of L1's ``nic``-th NIC (from 0): 10.0.2.0/24, then 10.0.4.0/24
    and on (10.0.3.0/24 is where the lab's guests put their SSH NIC)."""
    return "10.0.2.0/24" if nic == 0 else f"10.0.{3 + nic}.0/24"


def _lab_device(platform: Platform, device: LabDevice, slot: int, suffix: str,
                nic: int) -> list[str]:
    lab = platform.lab
    options: dict[str, object] = dict(lab.device_options)
    if device.kind.startswith("virtio"):
        options.update(lab.virtio_options)
        options["vectors"] = device.vectors
    options["addr"] = f"0x{slot:02x}"
    # A disk has no file behind it: the null driver reads zeroes, so L2's reads cost no I/O.
    drive, ahci, netdev = f"labdisk{suffix}", f"labahci{suffix}", f"labnet{suffix}"
    disk = ["-blockdev", f"driver=null-co,node-name={drive},size=16777216,read-zeroes=on"]
    if device.kind == "virtio-blk":
        return disk + ["-device", qemu_options("virtio-blk-pci", {
            "drive": drive, "num-queues": device.queues, **options})]
    if device.kind == "ahci":
        # ICH9's AHCI has plain MSI only (one vector): the lab's MSI case.
        return disk + ["-device", qemu_options("ich9-ahci", {"id": ahci, **options}),
                       "-device", f"ide-hd,drive={drive},bus={ahci}.0"]
    network = qemu_options("user", {"id": netdev,
                                    "net": lab_network(nic) if nic else None})
    return ["-netdev", network,
            "-device", qemu_options(_LAB_NICS[device.kind], {
                "netdev": netdev, "mac": device_mac("lab", slot), **options})]
