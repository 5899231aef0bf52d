"""The scenario format as frozen dataclasses: the only shape the core ever sees.

The YAML loader (:mod:`harness.config.loader`) builds these from a file and rejects unknown
keys and wrong types with ``file:line: key.path: reason``; the JSON Schema published for
editors (:mod:`harness.config.schema`) is generated from the same classes.  Field docs live in
``metadata["doc"]`` so both the schema and the docs say the same thing.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Literal

_ENTRY = re.compile(r"[-+]?[0-9]+")  # ASCII digits only: "²".isdigit() is True


def entry_number(vector: str) -> int | None:
    """An expectation's vector given as an MSI-X entry number, or None for a name pattern."""
    return int(vector) if _ENTRY.fullmatch(vector) else None


def doc(text: str, **kwargs: object) -> dict[str, object]:
    """Field metadata carrying the one-line documentation used by the schema."""
    return {"doc": text, **kwargs}


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DeliveryPath(enum.StrEnum):
    """How one vector's interrupts reached the guest (see ARCHITECTURE.md)."""

    POSTED = "posted"
    IRQFD_BOUNCE = "irqfd-bounce"
    USERSPACE_BOUNCE = "userspace-bounce"
    EMULATED = "emulated"
    NOT_DELIVERED = "not-delivered"


# --- devices -------------------------------------------------------------------------------
# A device is one of these classes, chosen by its ``kind`` key.  ``addr`` is the slot on the
# root bus (pcie.0 on q35); when omitted the harness assigns slots from 0x03 upward in order,
# so a device's PCI address, and with it every vector's identity, is known before boot.

# QEMU's rule for ids (id_wellformed); anything else, a comma above all, breaks -device options.
DEVICE_ID = r"^[A-Za-z][A-Za-z0-9._-]*$"
# A /24 is all slirp's guest (.15) and gateway (.2) addresses need.
NETWORK = r"^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){2}\.0/24$"


@dataclass(frozen=True)
class VirtioNet:
    kind: Literal["virtio-net"]
    id: str = field(metadata=doc("device id, unique in the VM; used by expectations",
                                  pattern=DEVICE_ID))
    addr: int | None = field(default=None, metadata=doc("PCI slot on the root bus"))
    ssh: bool = field(default=True, metadata=doc(
        "forward the guest's SSH port over this NIC (user-mode network, 127.0.0.1 only)"))
    network: str = field(default="10.0.2.0/24", metadata=doc(
        "the user-mode network's IPv4 subnet (the guest is .15, the gateway .2); change it "
        "when a second NIC of the guest sits on another 10.0.2.0/24", pattern=NETWORK))


@dataclass(frozen=True)
class E1000e:
    kind: Literal["e1000e"]
    id: str = field(metadata=doc("device id, unique in the VM", pattern=DEVICE_ID))
    addr: int | None = field(default=None, metadata=doc("PCI slot on the root bus"))
    ssh: bool = field(default=False, metadata=doc("forward the guest's SSH port over this NIC"))
    network: str = field(default="10.0.2.0/24", metadata=doc(
        "the user-mode network's IPv4 subnet (the guest is .15, the gateway .2)",
        pattern=NETWORK))


@dataclass(frozen=True)
class VirtioBlk:
    kind: Literal["virtio-blk"]
    id: str = field(metadata=doc("device id, unique in the VM", pattern=DEVICE_ID))
    addr: int | None = field(default=None, metadata=doc("PCI slot on the root bus"))
    size_mib: int = field(default=8, metadata=doc("size of the scratch disk (a sparse raw file)",
                                                  minimum=1, maximum=65536))


@dataclass(frozen=True)
class IvshmemDoorbell:
    kind: Literal["ivshmem-doorbell"]
    id: str = field(metadata=doc("device id, unique in the VM", pattern=DEVICE_ID))
    addr: int | None = field(default=None, metadata=doc("PCI slot on the root bus"))
    vectors: int = field(default=2, metadata=doc("MSI-X vectors", minimum=1, maximum=64))
    size_mib: int = field(default=1, metadata=doc("shared memory size", minimum=1,
                                                  maximum=1024))


@dataclass(frozen=True)
class VfioPci:
    kind: Literal["vfio-pci"]
    id: str = field(metadata=doc("device id, unique in the VM", pattern=DEVICE_ID))
    host: str = field(metadata=doc("host PCI address, e.g. 0000:00:05.0",
                                   pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$"))
    addr: int | None = field(default=None, metadata=doc("PCI slot on the guest's root bus"))
    no_kvm_msix: bool = field(default=False, metadata=doc(
        "x-no-kvm-msix=on: QEMU handles MSI-X in user space (no KVM irqfd)"))
    no_kvm_msi: bool = field(default=False, metadata=doc("x-no-kvm-msi=on"))


Device = VirtioNet | E1000e | VirtioBlk | IvshmemDoorbell | VfioPci

EMULATED_KINDS = frozenset({"virtio-net", "e1000e", "virtio-blk", "ivshmem-doorbell"})


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinImage:
    """The harness's own guest: a Debian kernel + busybox/dropbear/agent initramfs."""

    kind: Literal["builtin"]
    recipe: str = field(default="debian-cloud", metadata=doc(
        "recipe folder under guest-images/"))


@dataclass(frozen=True)
class KernelImage:
    """A user's own kernel booted with the harness's initramfs (agent + SSH)."""

    kind: Literal["kernel"]
    kernel: str = field(metadata=doc("path to a bzImage/vmlinuz (relative to the scenario file)"))
    modules: str | None = field(default=None, metadata=doc(
        "path to the kernel's /lib/modules/<version> tree; omit if virtio drivers are built in"))


@dataclass(frozen=True)
class CloudImage:
    """A user's own cloud image, configured through a cloud-init NoCloud seed."""

    kind: Literal["cloud"]
    disk: str = field(metadata=doc("path to a qcow2/raw cloud image; it is never written to"))
    format: Literal["qcow2", "raw"] = field(default="qcow2", metadata=doc("disk format"))
    user: str = field(default="root", metadata=doc("login user the seed authorizes"))


Image = BuiltinImage | KernelImage | CloudImage


# --- the rest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VM:
    name: str = field(metadata=doc("VM name, unique in the scenario", pattern=r"^[a-z][a-z0-9-]*$"))
    machine: str = field(default="q35", metadata=doc("QEMU machine type"))
    accel: Accel = field(default=Accel.AUTO, metadata=doc(
        "auto boot-tests KVM (cached per host boot) and falls back to TCG; kvm uses it "
        "untested (an error if /dev/kvm cannot be opened); tcg never uses it"))
    cpus: int = field(default=2, metadata=doc("vCPUs", minimum=1, maximum=64))
    memory_mib: int = field(default=512, metadata=doc("guest memory", minimum=128,
                                                      maximum=1048576))
    image: Image = field(default=BuiltinImage(kind="builtin"), metadata=doc("what to boot"))
    devices: tuple[Device, ...] = field(default=(), metadata=doc("PCI devices of the guest"))
    append: str = field(default="", metadata=doc("extra kernel command line"))
    qemu: str = field(default="qemu-system-x86_64", metadata=doc("QEMU binary"))
    extra_args: tuple[str, ...] = field(default=(), metadata=doc(
        "extra QEMU arguments, appended as given (an argv list, never a shell string)"))


@dataclass(frozen=True)
class Workload:
    vm: str = field(metadata=doc("VM that runs it"))
    run: tuple[str, ...] = field(metadata=doc("argv run in the guest over SSH", minItems=1))
    name: str = field(default="", metadata=doc("label in reports (default: the argv)"))
    timeout_s: float = field(default=60.0, metadata=doc("time limit", exclusiveMinimum=0))


@dataclass(frozen=True)
class Expectation:
    vm: str = field(metadata=doc("VM the device belongs to"))
    device: str = field(metadata=doc("device id"))
    path: DeliveryPath = field(metadata=doc("delivery path every selected vector must show"))
    vectors: tuple[str, ...] = field(default=(), metadata=doc(
        "vectors to check: guest IRQ names as shell patterns (\"*-input.*\") or MSI-X entry "
        "numbers (\"1\"); empty = the device's vectors that fired, at least one"))
    min_delta: int = field(default=1, metadata=doc(
        "each named vector must deliver at least this many interrupts; with no vectors "
        "named, the device's vectors together", minimum=0))


@dataclass(frozen=True)
class Timeouts:
    boot_s: float = field(default=120.0, metadata=doc("QEMU start to SSH ready",
                                                      exclusiveMinimum=0))
    shutdown_s: float = field(default=10.0, metadata=doc("quit -> SIGTERM -> SIGKILL budget",
                                                         exclusiveMinimum=0))


@dataclass(frozen=True)
class Scenario:
    name: str = field(metadata=doc("scenario name", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))
    vms: tuple[VM, ...] = field(metadata=doc("guests to boot", minItems=1))
    description: str = field(default="", metadata=doc("free text"))
    workloads: tuple[Workload, ...] = field(default=(), metadata=doc("run in order"))
    expect: tuple[Expectation, ...] = field(default=(), metadata=doc("what must hold"))
    timeouts: Timeouts = field(default=Timeouts(), metadata=doc("time limits"))
