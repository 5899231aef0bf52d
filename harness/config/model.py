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

from harness.config.devices import Device as Device
from harness.config.devices import E1000e, VfioPci, VirtioBlk, VirtioNet
from harness.config.fields import doc
from harness.platform import Accel, Arch

__all__ = ["RECIPE_NAME", "VM", "Accel", "Arch", "BuiltinImage", "CloudImage", "DeliveryPath",
           "Device", "E1000e", "Expectation", "Hotplug", "HotplugAction", "Image", "KernelImage",
           "LabDevice", "LabSettings",
           "Scenario", "Stage", "Timeouts", "VfioPci", "VirtioBlk", "VirtioNet", "Workload", "doc",
           "entry_number"]

# A folder of guest-images/, never a path: no separator and no "..", so a scenario names one
# of the harness's own recipes and nothing else on the host.
RECIPE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
# Run folders are named <scenario>-<YYYYmmdd-HHMMSS>[-N] (bench-<scenario>-... for the bench),
# and a VM's logs <vm>.qemu.log and the like: short names keep them far below NAME_MAX (255).
SCENARIO_NAME_MAX = 64
VM_NAME_MAX = 32
# The kernel's command line holds 2048 bytes (x86 and arm64), the harness's own arguments
# included; a longer one is cut without a word.
APPEND_MAX = 1024

_ENTRY = re.compile(r"[-+]?[0-9]+")  # ASCII digits only: "²".isdigit() is True


def entry_number(vector: str) -> int | None:
    """An expectation's vector given as an MSI-X entry number, or None for a name pattern."""
    return int(vector) if _ENTRY.fullmatch(vector) else None


class DeliveryPath(enum.StrEnum):
    """How one vector's interrupts reached the guest (see ARCHITECTURE.md)."""

    POSTED = "posted"
    IRQFD_BOUNCE = "irqfd-bounce"
    USERSPACE_BOUNCE = "userspace-bounce"
    EMULATED = "emulated"
    NOT_DELIVERED = "not-delivered"


# --- devices -------------------------------------------------------------------------------
# Each kind is one class in harness.config.devices (its keys, QEMU arguments, guest drivers).
# ``addr`` is the slot on the root bus; when omitted the harness assigns slots in order, so a
# device's PCI address, and with it every vector's identity, is known before boot.

# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinImage:
    """The harness's own guest: a Debian kernel + busybox/dropbear/agent initramfs."""

    kind: Literal["builtin"]
    recipe: str | None = field(default=None, metadata=doc(
        "recipe folder under guest-images/ (a plain name, never a path); default: the "
        "architecture's cheapest recipe whose kernel has every driver the VM's devices need",
        pattern=RECIPE_NAME))


@dataclass(frozen=True)
class KernelImage:
    """A user's own kernel booted with the harness's initramfs (agent + SSH)."""

    kind: Literal["kernel"]
    kernel: str = field(metadata=doc("path to the kernel image in the architecture's boot "
                                     "format (relative to the scenario file)"))
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
    name: str = field(metadata=doc("VM name, unique in the scenario", pattern=r"^[a-z][a-z0-9-]*$",
                                   maxLength=VM_NAME_MAX))
    arch: Arch | None = field(default=None, metadata=doc(
        "guest architecture; default: this host's (another one runs under TCG)"))
    machine: str | None = field(default=None, metadata=doc(
        "QEMU machine type and its options (TYPE[,key=value...]); default: the "
        "architecture's (with its required options); accel= (the accel key says it), the "
        "boot options (kernel=, initrd=, append=, dtb=, firmware=) and dumpdtb= are refused"))
    accel: Accel = field(default=Accel.AUTO, metadata=doc(
        "auto tests KVM with a tiny guest program (cached per host boot) and falls back to "
        "TCG; kvm uses it untested (an error if /dev/kvm cannot be opened); tcg never uses it"))
    cpus: int = field(default=2, metadata=doc("vCPUs", minimum=1, maximum=64))
    memory_mib: int = field(default=512, metadata=doc("guest memory", minimum=128,
                                                      maximum=1048576))
    image: Image = field(default=BuiltinImage(kind="builtin"), metadata=doc("what to boot"))
    devices: tuple[Device, ...] = field(default=(), metadata=doc("PCI devices of the guest"))
    append: str = field(default="", metadata=doc("extra kernel command line",
                                                 maxLength=APPEND_MAX))
    qemu: str | None = field(default=None, metadata=doc(
        "QEMU binary, run as root: named as the architecture's system emulator (the default's "
        "name, or that name with a -SUFFIX), on PATH or as a path (relative to the scenario "
        "file); default: the architecture's, on PATH; refused on a shared host "
        "(HARNESS_SHARED_HOST=1)"))
    extra_args: tuple[str, ...] = field(default=(), metadata=doc(
        "extra QEMU arguments, appended as given (an argv list, never a shell string); only "
        "-device, -object, -global, -trace, -d, -icount, -rtc, -overcommit and -msg, and none "
        "that names a host file or contradicts what the harness sets; refused on a shared "
        "host (HARNESS_SHARED_HOST=1)"))

    @property
    def guest_modules(self) -> tuple[str, ...]:
        """The drivers the VM's devices need in the guest kernel."""
        return tuple(dict.fromkeys(m for d in self.devices for m in d.guest_modules))


class Stage(enum.StrEnum):
    """When a workload runs, relative to the measurement window."""

    SETUP = "setup"
    MEASURE = "measure"
    RELEASE = "release"


class HotplugAction(enum.StrEnum):
    """What a workload's hotplug step does to a device behind its root port."""

    UNPLUG = "unplug"
    PLUG = "plug"
    REPLUG = "replug"


@dataclass(frozen=True)
class Hotplug:
    """A hot-plug step: QMP device_del / device_add of a device with hotplug: true."""

    device: str = field(metadata=doc("the device's id (it must have hotplug: true)"))
    action: HotplugAction = field(default=HotplugAction.REPLUG, metadata=doc(
        "unplug: device_del, and wait until QEMU says the guest let the device go; plug: "
        "device_add it back as it was booted, and wait until its guest driver holds its "
        "vectors again (a NIC gets its address back); replug: both, pause_s apart"))
    pause_s: float = field(default=1.0, metadata=doc(
        "replug: seconds between the unplug and the plug", minimum=0, maximum=3600))


@dataclass(frozen=True)
class Workload:
    vm: str = field(metadata=doc("VM that runs it"))
    run: tuple[str, ...] = field(default=(), metadata=doc(
        "argv run in the guest over SSH (a workload has run or hotplug)", minItems=1))
    hotplug: Hotplug | None = field(default=None, metadata=doc(
        "instead of run: unplug and/or plug back one of the VM's devices (its vectors go "
        "and come back; the run's hotplug.jsonl and the workload's result say which)"))
    name: str = field(default="", metadata=doc("label in reports (default: the argv)",
                                               maxLength=200))
    timeout_s: float = field(default=60.0, metadata=doc(
        "wall-clock limit on the whole workload, however much it prints; on expiry the "
        "command and everything it started in the guest are killed and the workload fails",
        exclusiveMinimum=0, maximum=86400))
    stage: Stage = field(default=Stage.MEASURE, metadata=doc(
        "setup: once the VMs are up, before the measurement window opens (load a module, "
        "configure an address; harness up runs these before it hands the VMs over); "
        "measure: inside the measurement window (between the two snapshots); release: after "
        "the window closed, for steps that take a device's vectors away (unbind its guest "
        "driver, hot-unplug), whose aftermath expectations with released: true check"))


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
        "named, the device's vectors together", minimum=0, maximum=10**12))
    cpu: int | None = field(default=None, metadata=doc(
        "guest CPU that must take the selected vectors' interrupts (at least "
        "cpu_share of each vector's count, the per-CPU counts of the window), e.g. after a "
        "setup workload pinned them with harness-agent pin PATTERN CPU", minimum=0,
        maximum=4095))
    cpu_share: float = field(default=0.9, metadata=doc(
        "with cpu: the least share of each vector's interrupts on that CPU (interrupts "
        "already in flight when the affinity changed land on the old one)", minimum=0,
        maximum=1))
    released: bool = field(default=False, metadata=doc(
        "an assigned device whose vectors the release-stage workloads take away: after them, "
        "none may be left forwarded to a vCPU (every posting mapping the trace saw undone, "
        "and no hw LPI left in vgic-state where it is readable)"))


@dataclass(frozen=True)
class Timeouts:
    boot_s: float = field(default=120.0, metadata=doc("QEMU start to SSH ready",
                                                      exclusiveMinimum=0, maximum=3600))
    shutdown_s: float = field(default=10.0, metadata=doc("quit -> SIGTERM -> SIGKILL budget",
                                                         exclusiveMinimum=0, maximum=600))
    init_s: float | None = field(default=None, metadata=doc(
        "QEMU start to the guest's init starting (a cloud image: cloud-init's bootcmd; "
        "default: boot_s); past it the boot is taken as hung and the vCPUs are sampled "
        "into <vm>.stuck.txt",
        exclusiveMinimum=0, maximum=3600))
    boot_attempts: int = field(default=1, metadata=doc(
        "boots of a VM whose kernel never reaches init (it hangs past init_s, or resets): "
        "the failed attempts are kept (<vm>.attemptN.*) and named in the report and the "
        "summary; a boot that fails after init is never retried", minimum=1, maximum=5))


@dataclass(frozen=True)
class LabDevice:
    """An emulated device L1 offers its guests for assignment, behind its IOMMU."""

    kind: Literal["virtio-net", "e1000e", "virtio-blk", "ahci"] = field(
        default="virtio-net", metadata=doc(
        "virtio-net (MSI-X: config, one vector per queue), e1000e (MSI-X: rx, tx, other; or "
        "INTx with e1000e.IntMode=0 on L2's command line), virtio-blk (MSI-X, a vector per "
        "request queue) or ahci (ICH9 AHCI: plain MSI, one vector; L2 needs the "
        "debian-generic recipe); a disk reads zeroes from a 16 MiB null device"))
    vectors: int | None = field(default=None, metadata=doc(
        "virtio: the MSI-X table size (vectors=); fewer than the queues need makes the "
        "driver share one vector among the queues", minimum=1, maximum=64))
    queues: int | None = field(default=None, metadata=doc(
        "virtio-blk: request queues (num-queues=); L2 uses as many as it has vCPUs",
        minimum=1, maximum=16))


#: The lab's usual device: a virtio-net NIC.
DEFAULT_LAB_DEVICE = LabDevice()
#: L1's slots 0x05.. hold its devices for assignment.
LAB_DEVICES_MAX = 8


@dataclass(frozen=True)
class LabSettings:
    """How ``harness lab run`` boots the emulated host (L1) for this scenario."""

    append: str = field(default="", metadata=doc(
        "extra kernel arguments for L1, after the lab's own (the last of a kind wins: "
        "kvm-arm.vgic_v4_enable=0 turns GICv4 off in L1's KVM); scenarios of a file that "
        "differ here get an L1 boot each", maxLength=APPEND_MAX))
    devices: tuple[LabDevice, ...] = field(default=(DEFAULT_LAB_DEVICE,), metadata=doc(
        "the emulated devices L1 offers its guests for assignment, at 0000:00:05.0, "
        "0000:00:06.0, ... in order; the first NIC is on L0's user-mode network 10.0.2.0/24, "
        "the n-th after it on 10.0.(3+n).0/24 (gateway .2)", minItems=1,
        maxItems=LAB_DEVICES_MAX))


@dataclass(frozen=True)
class Scenario:
    name: str = field(metadata=doc("scenario name; the run folder is <name>-<time>",
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                   maxLength=SCENARIO_NAME_MAX))
    vms: tuple[VM, ...] = field(metadata=doc("guests to boot", minItems=1))
    description: str = field(default="", metadata=doc("free text"))
    workloads: tuple[Workload, ...] = field(default=(), metadata=doc("run in order"))
    expect: tuple[Expectation, ...] = field(default=(), metadata=doc("what must hold"))
    timeouts: Timeouts = field(default=Timeouts(), metadata=doc("time limits"))
    lab: LabSettings = field(default=LabSettings(), metadata=doc(
        "the emulated host, when the scenario runs in the lab (ignored by harness run)"))
