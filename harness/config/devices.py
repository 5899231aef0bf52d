"""Device kinds: each one class carrying its scenario keys and everything dispatched on it.

A kind says, in one place: its fields (the scenario format; the loader and the JSON Schema
read them), its QEMU arguments, whether QEMU emulates it or the host assigns it, the guest
driver modules it needs, and whether it is a NIC the harness can reach the guest through.
Adding a kind is a class here and its entry in :data:`Device`; nothing else dispatches on
kinds, and no kind can reach another kind's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from harness.config.fields import doc
from harness.platform import Platform
from harness.qemu_options import qemu_options

# QEMU's rule for ids (id_wellformed); anything else, a comma above all, breaks -device options.
DEVICE_ID = r"^[A-Za-z][A-Za-z0-9._-]*$"
# A virtio-blk disk's block nodes are "<id>-file" and "<id>-fmt"; QEMU's node names hold 31.
DEVICE_ID_MAX = 24
# A slot on the root bus: 5 bits of the PCI address (each platform allows a range of them).
SLOT_MAX = 0x1F
# A /24 is all slirp's guest (.15) and gateway (.2) addresses need.
NETWORK = r"^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){2}\.0/24$"
DEFAULT_NETWORK = "10.0.2.0/24"
SSH_GUEST_PORT = 22

_ADDR_DOC = ("PCI slot on the root bus (of its root port, with hotplug: true); default: the "
             "lowest free one from 0x03")
_NETWORK_DOC = ("this NIC's own user-mode network, an IPv4 /24 (the guest is .15, the gateway "
                ".2); default: 10.0.2.0/24 for the VM's first NIC, 10.0.3.0/24 for its second, "
                "and so on (the lowest one no NIC of the VM names)")


def _id_doc(text: str = "device id, unique in the VM") -> dict[str, object]:
    """The ``id`` key every kind has (QEMU's id rules, short enough for block node names);
    a metadata helper, not a field one, so that dataclasses still see a key without default."""
    return doc(text, pattern=DEVICE_ID, maxLength=DEVICE_ID_MAX)


def _addr_field(text: str = _ADDR_DOC) -> Any:
    """The ``addr`` key every kind has: a slot on the root bus, or None for the next free."""
    return field(default=None, metadata=doc(text, minimum=0, maximum=SLOT_MAX))


_HOTPLUG_DOC = ("plug the device behind a PCIe root port of its own (at its addr), so that it "
                "can be unplugged and plugged back while the guest runs (QMP device_del / "
                "device_add, a workload's hotplug step); its guest address is then "
                "0000:BB:00.0, BB the k-th such port by slot (1, 2, ...)")


def _hotplug_field() -> Any:
    """The ``hotplug`` key every kind has (the root bus of q35 and virt cannot hot-plug)."""
    return field(default=False, metadata=doc(_HOTPLUG_DOC))


class Placement(Protocol):
    """Where a device sits in its VM, as its QEMU arguments need it (harness.qemu.argv's
    PlacedDevice is one)."""

    @property
    def addr(self) -> str: ...  # the slot as QEMU's addr= takes it
    @property
    def location(self) -> dict[str, str]: ...  # addr= on the root bus, or bus= a root port
    @property
    def mac(self) -> str: ...
    @property
    def network(self) -> str | None: ...
    @property
    def platform(self) -> Platform: ...


class _Kind:
    """What every kind answers; the defaults are those of an emulated non-NIC device."""

    kind: str
    id: str
    addr: int | None
    hotplug: bool
    emulated: ClassVar[bool] = True  # QEMU raises its interrupts (no host device IRQ)
    guest_modules: ClassVar[tuple[str, ...]] = ()  # drivers the guest kernel must have
    nic: ClassVar[bool] = False

    def ssh_nic(self) -> bool:
        """The harness reaches the guest through this device."""
        return False

    @property
    def assigned_host(self) -> str | None:
        """The host PCI address of an assigned device."""
        return None

    def scratch_size(self) -> int | None:
        """Bytes of a scratch file QEMU backs the device with, if it needs one."""
        return None

    def qemu_args(self, placed: Placement, scratch: Path | None) -> list[str]:
        raise NotImplementedError


class _UserNic(_Kind):
    """A NIC on QEMU's user-mode network; the SSH NIC forwards the guest's port 22."""

    nic: ClassVar[bool] = True
    ssh: bool
    network: str | None
    qemu_model: ClassVar[str]

    def ssh_nic(self) -> bool:
        return self.ssh

    def qemu_args(self, placed: Placement, scratch: Path | None) -> list[str]:
        # hostfwd to port 0: slirp binds an ephemeral port on 127.0.0.1 and reports it
        # through "info usernet", so the port is chosen by the kernel, not raced for.
        fwd = f",hostfwd=tcp:127.0.0.1:0-:{SSH_GUEST_PORT}" if self.ssh else ""
        network = placed.network or DEFAULT_NETWORK
        net = f",net={network}" if network != DEFAULT_NETWORK else ""
        return ["-netdev", f"user,id={self.id}{net}{fwd}",
                "-device", qemu_options(self.qemu_model, {
                    "netdev": self.id, "id": self.id, "mac": placed.mac,
                    **placed.location, **placed.platform.nic_options})]


@dataclass(frozen=True)
class VirtioNet(_UserNic):
    kind: Literal["virtio-net"]
    id: str = field(metadata=_id_doc("device id, unique in the VM; used by expectations"))
    addr: int | None = _addr_field()
    ssh: bool = field(default=True, metadata=doc(
        "forward the guest's SSH port over this NIC (user-mode network, 127.0.0.1 only)"))
    network: str | None = field(default=None, metadata=doc(_NETWORK_DOC, pattern=NETWORK))
    hotplug: bool = _hotplug_field()

    qemu_model: ClassVar[str] = "virtio-net-pci"
    guest_modules: ClassVar[tuple[str, ...]] = ("virtio_pci", "virtio_net")


@dataclass(frozen=True)
class E1000e(_UserNic):
    kind: Literal["e1000e"]
    id: str = field(metadata=_id_doc())
    addr: int | None = _addr_field()
    ssh: bool = field(default=False, metadata=doc(
        "forward the guest's SSH port over this NIC"))
    network: str | None = field(default=None, metadata=doc(_NETWORK_DOC, pattern=NETWORK))
    hotplug: bool = _hotplug_field()

    qemu_model: ClassVar[str] = "e1000e"
    guest_modules: ClassVar[tuple[str, ...]] = ("e1000e",)


@dataclass(frozen=True)
class VirtioBlk(_Kind):
    kind: Literal["virtio-blk"]
    id: str = field(metadata=_id_doc())
    addr: int | None = _addr_field()
    size_mib: int = field(default=8, metadata=doc("size of the scratch disk (a sparse raw file)",
                                                  minimum=1, maximum=65536))
    hotplug: bool = _hotplug_field()

    guest_modules: ClassVar[tuple[str, ...]] = ("virtio_pci", "virtio_blk")

    def scratch_size(self) -> int | None:
        return self.size_mib << 20

    def qemu_args(self, placed: Placement, scratch: Path | None) -> list[str]:
        if scratch is None:
            raise ValueError(f"virtio-blk {self.id}: no scratch disk given")
        return ["-blockdev", qemu_options("driver=file", {"node-name": f"{self.id}-file",
                                                          "filename": scratch}),
                "-blockdev", qemu_options("driver=raw", {"node-name": f"{self.id}-fmt",
                                                         "file": f"{self.id}-file"}),
                "-device", qemu_options("virtio-blk-pci", {"drive": f"{self.id}-fmt",
                                                            "id": self.id,
                                                            **placed.location})]


@dataclass(frozen=True)
class VfioPci(_Kind):
    kind: Literal["vfio-pci"]
    id: str = field(metadata=_id_doc())
    host: str = field(metadata=doc("host PCI address, e.g. 0000:00:05.0",
                                   pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$"))
    addr: int | None = _addr_field("PCI slot on the guest's root bus")
    no_kvm_msix: bool = field(default=False, metadata=doc(
        "x-no-kvm-msix=on: QEMU handles MSI-X in user space (no KVM irqfd)"))
    no_kvm_msi: bool = field(default=False, metadata=doc(
        "x-no-kvm-msi=on: QEMU handles plain MSI in user space (no KVM irqfd)"))
    no_kvm_intx: bool = field(default=False, metadata=doc(
        "x-no-kvm-intx=on: QEMU handles the INTx line and its EOI in user space (no KVM "
        "irqfd with a resample fd)"))
    hotplug: bool = _hotplug_field()

    emulated: ClassVar[bool] = False

    @property
    def assigned_host(self) -> str | None:
        return self.host

    def qemu_args(self, placed: Placement, scratch: Path | None) -> list[str]:
        return ["-device", qemu_options("vfio-pci", {
            "host": self.host, "id": self.id, **placed.location,
            "x-no-kvm-msix": True if self.no_kvm_msix else None,
            "x-no-kvm-msi": True if self.no_kvm_msi else None,
            "x-no-kvm-intx": True if self.no_kvm_intx else None})]


Device = VirtioNet | E1000e | VirtioBlk | VfioPci
