"""One frozen description per guest architecture; the only place that names one.

A :class:`Platform` says everything that differs between architectures: the QEMU binary and
machine, the console, the kernel image format and how its release is read, the PCI slots,
the Debian package architecture of the image recipes, the firmware, the emulated host of the
lab, and which host evidence sources apply.  It is chosen once per VM (the scenario's
``arch``, default: this host's) and passed down; code elsewhere asks the platform instead of
testing for an architecture.  Adding one is a new entry in :data:`PLATFORMS` plus a recipe.
"""

from __future__ import annotations

import enum
import gzip
import os
import platform as _pyplatform
import re
import stat
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from harness.errors import HostError, ImageError


class Arch(enum.StrEnum):
    """A guest architecture, as scenarios name it (Debian's names)."""

    X86_64 = "x86_64"
    ARM64 = "arm64"


class PostingModel(enum.StrEnum):
    """How a host of the architecture posts a device's MSI straight to a vCPU."""

    IRTE = "irte"  # the IOMMU's interrupt remapping entry in posted mode (VT-d PI, AMD GA)
    VLPI = "vlpi"  # the GICv4 ITS maps the MSI as a virtual LPI (direct injection)


class Accel(enum.StrEnum):
    """How QEMU runs the guest's CPUs."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


# --- kernel image formats ------------------------------------------------------------------

_BANNER = re.compile(rb"Linux version (\S+) \(")
_MAX_KERNEL_BYTES = 256 << 20  # a decompressed kernel image is far below this


def bzimage_release(path: Path) -> str:
    """The release from an x86 bzImage's setup header (the ``kernel_version`` field)."""
    head = _read_head(path, 0x8000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise ImageError(f"{path}: not a bzImage (no 'HdrS' setup header)")
    offset = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    text = head[offset:offset + 256].split(b"\0")[0].decode(errors="replace")
    if not text:
        raise ImageError(f"{path}: the bzImage carries no version string")
    return text.split()[0]


def arm64_image_release(path: Path) -> str:
    """The release from an arm64 ``Image`` (raw, or gzip-compressed as Debian ships it).

    The Image header carries no version, so the kernel's banner is searched for; a gzip
    stream is inflated in bounded steps, never whole into memory beyond the image's size.
    """
    head = _read_head(path, 64)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read(_MAX_KERNEL_BYTES)
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageError(f"{path}: not a readable gzip-compressed Image: {exc}") from exc
    elif len(head) >= 0x3C and head[0x38:0x3C] == b"ARM\x64":
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KERNEL_BYTES)
    else:
        raise ImageError(f"{path}: not an arm64 Image (no 'ARM\\x64' magic, not gzip)")
    found = _BANNER.search(data)
    if found is None:
        raise ImageError(f"{path}: the Image carries no 'Linux version' banner")
    return found.group(1).decode(errors="replace")


def _read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of a kernel file; a FIFO, a device or a folder is refused
    without blocking on it (opened non-blocking, its kind checked on the open file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the kernel: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{path}: not a regular file, so not a kernel image")
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read(size)
        except OSError as exc:
            raise ImageError(f"{path}: cannot read the kernel: {exc.strerror}") from exc


@dataclass(frozen=True)
class KernelFormat:
    name: str  # as users know it: "bzImage", "Image"
    release: Callable[[Path], str]


# --- the lab's emulated host ----------------------------------------------------------------


@dataclass(frozen=True)
class LabHost:
    """How L0 emulates a host with KVM, an IOMMU and VFIO on this architecture (TCG)."""

    cpu: str
    machine_options: Mapping[str, str]
    pre_devices: tuple[str, ...]  # -device values that must come before any PCI device
    append: str  # kernel arguments that switch on the IOMMU / KVM features
    device_options: Mapping[str, str]  # for the assigned device, whatever its kind
    virtio_options: Mapping[str, str]  # and if it is virtio: its DMA and MSIs via the IOMMU
    what: str  # one line for progress output
    recipe: str  # the image recipe of L1's kernel and initramfs
    # L1's user space: None for the outer machine's own root (same architecture only), else
    # the recipe of a root filesystem built for it (harness.images.userland)
    userland: str | None = None


# --- the KVM probe's guest program -------------------------------------------------------------


@dataclass(frozen=True)
class ProbePayload:
    """A guest program of a few instructions that proves KVM runs guest code on this host.

    It writes a marker to the platform's serial port, then powers the VM off, so QEMU exits 0
    on its own.  It is assembled here by hand (each instruction documented beside its bytes):
    no toolchain, no firmware, no kernel, so the probe answers in milliseconds.
    """

    option: str  # how QEMU loads the file: "-bios" (x86's reset vector) or "-kernel"
    build: Callable[[bytes], bytes]  # marker -> the file's bytes


def _rel(target: int, end: int, size: int) -> bytes:
    """A relative jump's displacement: ``target`` minus the address after the instruction."""
    return (target - end).to_bytes(size, "little", signed=True)


_X86_ROM_SIZE = 0x10000  # QEMU's -bios takes whole 64 KiB units; this one is mapped at the top
_X86_CODE = 0xFF00  # of 4 GiB, so file offset N is address 0xFFFF0000+N, i.e. CS:N at reset
_X86_TEXT = 0xFF80  # the marker, read through CS (DS is 0 at reset)
_X86_RESET = 0xFFF0  # the reset vector: CS base 0xFFFF0000, IP 0xFFF0, real mode


def x86_probe_image(marker: bytes) -> bytes:
    """16-bit real-mode code at the reset vector, as a 64 KiB -bios image.

    No firmware runs: the vCPU's first instruction is ours.  It copies the marker to COM1's
    data register (QEMU's 16550 sends a byte written there whatever the line settings),
    then asks ICH9 for a hard reset, which ``-no-reboot`` turns into QEMU exiting 0.
    """
    if len(marker) + 1 > _X86_RESET - _X86_TEXT or 0 in marker:
        raise ValueError("the probe marker must be short and hold no NUL byte")
    loop = _X86_CODE + 8  # after cli, cld, mov dx and mov si (1 + 1 + 3 + 3 bytes)
    done = loop + 9
    halt = done + 6
    code = bytes([
        0xFA,                                   # cli             no interrupts, ever
        0xFC,                                   # cld             lodsb counts upwards
        0xBA, 0xF8, 0x03,                       # mov dx, 0x3f8   COM1's data register
        0xBE, *_X86_TEXT.to_bytes(2, "little"),  # mov si, TEXT   the marker's offset
        # loop:
        0x2E, 0xAC,                             # cs lodsb        al = cs:[si], si += 1
        0x84, 0xC0,                             # test al, al
        0x74, *_rel(done, loop + 6, 1),         # jz done         NUL: the marker is out
        0xEE,                                   # out dx, al      one byte to the UART
        0xEB, *_rel(loop, loop + 9, 1),         # jmp loop
        # done:
        0xBA, 0xF9, 0x0C,                       # mov dx, 0xcf9   ICH9's reset control
        0xB0, 0x06,                             # mov al, 6       hard reset (bit 2)
        0xEE,                                   # out dx, al      -no-reboot: QEMU exits 0
        # halt:
        0xF4,                                   # hlt             (if the reset were late)
        0xEB, *_rel(halt, halt + 3, 1),         # jmp halt
    ])
    assert _X86_CODE + len(code) <= _X86_TEXT and halt + 3 == _X86_CODE + len(code)
    image = bytearray(_X86_ROM_SIZE)
    image[_X86_CODE:_X86_CODE + len(code)] = code
    image[_X86_TEXT:_X86_TEXT + len(marker)] = marker  # NUL-terminated by the zeroes after
    # reset vector: jmp near CODE (E9 rel16), within the 16 bytes below 4 GiB
    image[_X86_RESET:_X86_RESET + 3] = bytes([0xE9, *_rel(_X86_CODE, _X86_RESET + 3, 2)])
    return bytes(image)


def _a64_movz(rd: int, imm16: int, shift: int = 0, wide: bool = True) -> int:
    """MOVZ Xd/Wd, #imm16, LSL #shift."""
    return (0xD2800000 if wide else 0x52800000) | (shift // 16) << 21 | imm16 << 5 | rd


def _a64_movk(rd: int, imm16: int, shift: int = 0, wide: bool = True) -> int:
    """MOVK Xd/Wd, #imm16, LSL #shift."""
    return (0xF2800000 if wide else 0x72800000) | (shift // 16) << 21 | imm16 << 5 | rd


def _a64_adr(rd: int, offset: int) -> int:
    """ADR Xd, pc+offset."""
    return 0x10000000 | (offset & 3) << 29 | ((offset >> 2) & 0x7FFFF) << 5 | rd


def _a64_b(offset: int) -> int:
    """B pc+offset."""
    return 0x14000000 | (offset >> 2) & 0x3FFFFFF


def _a64_cbz(rt: int, offset: int) -> int:
    """CBZ Wt, pc+offset."""
    return 0x34000000 | ((offset >> 2) & 0x7FFFF) << 5 | rt


_PL011 = 0x09000000  # the virt machine's PL011 UART (QEMU's memory map)
_PSCI_SYSTEM_OFF = 0x84000008


def arm64_probe_image(marker: bytes) -> bytes:
    """AArch64 code loaded raw by ``-kernel`` and entered at EL1 with the MMU off.

    It enables the PL011 and copies the marker to its data register, then calls PSCI
    SYSTEM_OFF through HVC (the conduit of QEMU's own PSCI and of KVM's), so QEMU exits 0.
    """
    if 0 in marker:
        raise ValueError("the probe marker must hold no NUL byte")
    words = [
        _a64_movz(1, _PL011 >> 16, 16),          # 0x00 movz x1, #0x0900, lsl 16  the UART
        _a64_movz(4, 0x301, wide=False),         # 0x04 movz w4, #0x301   UARTEN|TXE|RXE
        0xB9003024,                              # 0x08 str w4, [x1, #0x30]  UARTCR
        _a64_adr(2, 0x34 - 0x0C),                # 0x0c adr x2, text      the marker
        0x38401443,                              # 0x10 loop: ldrb w3, [x2], #1
        _a64_cbz(3, 0x20 - 0x14),                # 0x14 cbz w3, done      NUL: all out
        0x39000023,                              # 0x18 strb w3, [x1]     UARTDR: one byte
        _a64_b(0x10 - 0x1C),                     # 0x1c b loop
        _a64_movz(0, _PSCI_SYSTEM_OFF & 0xFFFF, wide=False),        # 0x20 done: w0 = ...
        _a64_movk(0, _PSCI_SYSTEM_OFF >> 16, 16, wide=False),       # 0x24 ... SYSTEM_OFF
        0xD4000002,                              # 0x28 hvc #0            power off
        0xD503207F,                              # 0x2c halt: wfi         (if it returned)
        _a64_b(-4),                              # 0x30 b halt
    ]
    return b"".join(w.to_bytes(4, "little") for w in words) + marker + b"\0"


# --- platforms ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """Everything architecture-specific about booting and observing a guest."""

    arch: Arch
    uname: str  # what ``uname -m`` prints on such a host
    qemu: str  # the QEMU system emulator binary
    qemu_package: str  # the Debian package that brings it
    machine: str  # QEMU machine type
    machine_options: Mapping[str, str]  # always set on that machine type
    tcg_cpu: str | None  # CPU model under TCG (None: QEMU's default)
    console: str  # the guest kernel's console device
    early_console: str  # kernel arguments that print the banner as early as possible
    kernel_format: KernelFormat
    slots: range  # PCI slots on the root bus a device may take
    first_auto_slot: int  # automatic placement starts here
    package_arch: str  # Debian's name, for the image recipes' packages
    multiarch: str  # the Debian multiarch triplet (library paths)
    recipes: tuple[str, ...]  # builtin recipes, cheapest first
    firmware: str  # what runs before the kernel (for the report)
    disk_boot: bool  # can boot a disk image (cloud images) with the installed firmware
    tracepoints: tuple[str, ...]  # host tracepoints that witness the posted path
    posting: str  # the posted-interrupt mechanism, for messages
    posting_model: PostingModel
    kvm_vendor_modules: tuple[str, ...]  # KVM needs one of these loaded (none: KVM itself)
    boot_log: re.Pattern[str]  # kernel log lines only a host of this architecture prints
    lab: LabHost
    kvm_probe: ProbePayload  # the guest program that tests whether KVM runs guest code
    nic_options: Mapping[str, str] = field(default_factory=dict)  # on every emulated NIC
    kernel_args: str = ""  # on every harness guest's kernel command line (L1's too)
    # HMP ``info registers``: the program counter's names (by CPU mode), and the flag (if
    # any) that says a vCPU is halted, waiting for an interrupt
    pc_registers: tuple[str, ...] = ("PC",)
    halt_flag: str | None = None

    def __repr__(self) -> str:
        return f"<Platform {self.arch.value}>"

    def kernel_release(self, path: Path) -> str:
        return self.kernel_format.release(path)


#: Every QEMU system emulator's file name starts so ("qemu-system-x86_64", ...).
QEMU_SYSTEM_PREFIX = "qemu-system-"


def _frozen(**values: str) -> Mapping[str, str]:
    return MappingProxyType(dict(values))


X86_64 = Platform(
    arch=Arch.X86_64, uname="x86_64", qemu="qemu-system-x86_64",
    qemu_package="qemu-system-x86", machine="q35", machine_options=_frozen(),
    tcg_cpu=None, console="ttyS0", early_console="earlyprintk=serial,ttyS0",
    kernel_format=KernelFormat("bzImage", bzimage_release),
    # q35: 0x00 is the host bridge; ICH9's LPC, SATA and SMBus functions sit at 0x1f.
    slots=range(0x01, 0x1F), first_auto_slot=0x03,
    package_arch="amd64", multiarch="x86_64-linux-gnu",
    recipes=("debian-cloud", "debian-generic"),
    firmware="SeaBIOS (QEMU's default)", disk_boot=True,
    tracepoints=("kvm/kvm_pi_irte_update",),
    posting="Intel VT-d posted interrupts / AMD AVIC", posting_model=PostingModel.IRTE,
    kvm_vendor_modules=("kvm_intel", "kvm_amd"),
    boot_log=re.compile(r"^(?:x86/|DMAR|AMD-Vi|smpboot: CPU0: (?:Intel|AMD)|x2apic)"),
    lab=LabHost(
        # SVM on the vCPU model gives L1 a KVM (kvm_amd, nested under TCG); QEMU's
        # intel-iommu needs the split irqchip for interrupt remapping.  no_timer_check: on a
        # busy TCG host the kernel's boot-time check of the timer through the remapped
        # IO-APIC can miss its window and panic ("timer doesn't work through
        # Interrupt-remapped IO-APIC", seen here).
        cpu="qemu64,+svm,+npt", machine_options=_frozen(**{"kernel-irqchip": "split"}),
        pre_devices=("intel-iommu,intremap=on,device-iotlb=on",),
        append="intel_iommu=on no_timer_check",
        device_options=_frozen(romfile=""),
        virtio_options=_frozen(iommu_platform="on", ats="on", **{"disable-legacy": "on"}),
        what="TCG, SVM, VT-d with IRQ remapping", recipe="lab-host"),
    # 26 bytes of real-mode code reached from the reset vector (a 64 KiB -bios image): the
    # marker to COM1, then a reset through port 0xcf9 that -no-reboot makes QEMU's exit.
    kvm_probe=ProbePayload("-bios", x86_probe_image),
    # q35's MMCONFIG spans 256 buses, so the kernel's peer-host-bridge scan reads the vendor
    # ID of 32 slots on each of 255 buses nothing is on: 8,000 config reads, each an exit
    # to QEMU.  Under KVM in the lab's L1 that was 1.1 s of L2's 3.2 s to init
    # (pci_subsys_init, initcall_debug).  Buses behind root ports (hotplug) and bridges are
    # still found, by walking down from the root bus.
    kernel_args="pci=lastbus=0",
    pc_registers=("RIP", "EIP"), halt_flag="HLT",
)

ARM64 = Platform(
    arch=Arch.ARM64, uname="aarch64", qemu="qemu-system-aarch64",
    qemu_package="qemu-system-arm", machine="virt",
    # GICv3 with an ITS: MSIs are LPIs, as on Arm servers.
    machine_options=_frozen(**{"gic-version": "3", "its": "on"}),
    # pauth-impdef: QEMU's cheap pointer-authentication hash; the architected one costs
    # TCG a large share of its time.
    tcg_cpu="max,pauth-impdef=on", console="ttyAMA0", early_console="earlycon",
    kernel_format=KernelFormat("Image", arm64_image_release),
    slots=range(0x01, 0x20), first_auto_slot=0x03,
    package_arch="arm64", multiarch="aarch64-linux-gnu",
    recipes=("debian-cloud-arm64",),
    firmware="none: QEMU loads the kernel directly", disk_boot=False,
    tracepoints=(), posting="GICv4 direct injection (vLPIs)", posting_model=PostingModel.VLPI,
    kvm_vendor_modules=(),
    boot_log=re.compile(r"^(?:Booting Linux on physical CPU|GICv3:|ITS[ @]"
                        r"|kvm \[\d+\]: (?:GIC|VHE|Hyp|nVHE|IPA))"),
    lab=LabHost(
        cpu="max,pauth-impdef=on",
        machine_options=_frozen(**{"gic-version": "4", "its": "on", "virtualization": "on",
                                   "iommu": "smmuv3"}),
        pre_devices=(), append="kvm-arm.vgic_v4_enable=1",
        device_options=_frozen(romfile=""),
        virtio_options=_frozen(iommu_platform="on", **{"disable-legacy": "on"}),
        what="TCG at EL2, GICv4, SMMUv3", recipe="lab-host-arm64",
        userland="lab-host-arm64"),
    # 13 AArch64 instructions loaded raw by -kernel: the marker to the PL011, then PSCI
    # SYSTEM_OFF through HVC.
    kvm_probe=ProbePayload("-kernel", arm64_probe_image),
    # No firmware loads option ROMs on this machine: do not ask QEMU to find one.
    nic_options=_frozen(romfile=""),
)

PLATFORMS: Mapping[Arch, Platform] = MappingProxyType({p.arch: p for p in (X86_64, ARM64)})


def platform_for(arch: Arch | str | None) -> Platform:
    """The platform of a scenario's ``arch`` (None: this host's own)."""
    if arch is None:
        return host_platform()
    return PLATFORMS[Arch(arch)]


def recipe_platform(recipe: str) -> Platform:
    """The platform whose packages an image recipe is made of (this host's if none names it:
    a user's own recipe)."""
    for candidate in PLATFORMS.values():
        if recipe in candidate.recipes or recipe == candidate.lab.recipe:
            return candidate
    return host_platform()


def platform_of_uname(machine: str) -> Platform | None:
    """The platform whose hosts' ``uname -m`` prints ``machine``, if the harness knows it."""
    return next((p for p in PLATFORMS.values() if p.uname == machine), None)


def host_platform(machine: str | None = None) -> Platform:
    """This host's platform (from ``uname -m``, or the given machine name)."""
    name = machine or _pyplatform.machine()
    for candidate in PLATFORMS.values():
        if candidate.uname == name:
            return candidate
    raise HostError("host", f"architecture {name!r} is not supported; the harness knows "
                    f"{', '.join(p.uname for p in PLATFORMS.values())}")
