"""What the host's IOMMU is, whether it remaps interrupts, and whether a guest can be posted to.

Everything is read through a :class:`HostView` rooted at ``/`` or at a recorded fixture tree,
and every conclusion carries the :class:`Evidence` lines it rests on (shared notes §3).
Posting needs the whole chain: remapping, the IOMMU's posting capability (Intel DMAR cap bit
59 on every DRHD, AMD GA/vAPIC, Arm GICv4), nothing on the command line turning it off, and
KVM willing to use it (``enable_apicv`` / ``avic`` / ``enable_device_posted_irqs``,
``kvm-arm.vgic_v4_enable``).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from harness.host.view import (
    Evidence,
    Fact,
    HostView,
    LogLine,
    cmdline_params,
    parse_module_bool,
)
from harness.platform import PostingModel

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- the report ----------------------------------------------------------------------------


class IommuVendor(enum.StrEnum):
    INTEL = "intel"
    AMD = "amd"
    ARM_SMMU = "arm-smmu"
    OTHER = "other"
    NONE = "none"

    @property
    def label(self) -> str:
        return {"intel": "Intel VT-d (DMAR)", "amd": "AMD-Vi", "arm-smmu": "Arm SMMU",
                "other": "other IOMMU", "none": "none"}[self.value]


class PostingVerdict(enum.StrEnum):
    POSSIBLE = "possible"
    NOT_POSSIBLE = "not possible"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class IommuUnit:
    """One hardware IOMMU: an Intel DRHD (``dmar0``), an AMD IVHD (``ivhd0``), an SMMU."""

    name: str
    vendor: IommuVendor
    cap: int | None = None  # Intel: capability register; AMD: PCI capability header
    ecap: int | None = None  # Intel: extended capability register
    features: int | None = None  # AMD: extended feature register (EFR)
    evidence: tuple[Evidence, ...] = ()

    @property
    def posting_capable(self) -> bool | None:
        """Intel ``cap_pi_support`` (cap bit 59); AMD ``FEATURE_GAM_VAPIC`` (EFR bit 21)."""
        if self.vendor == IommuVendor.INTEL and self.cap is not None:
            return bool((self.cap >> 59) & 1)
        if self.vendor == IommuVendor.AMD and self.features is not None:
            return bool((self.features >> AMD_EFR_GAM_VAPIC) & 1)
        return None


@dataclass(frozen=True)
class IommuGroup:
    group: str
    devices: tuple[str, ...]


@dataclass(frozen=True)
class Check:
    """One link of the posting chain: ok True, False, or None when it could not be told."""

    name: str
    ok: bool | None
    summary: str
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True)
class Posting:
    verdict: PostingVerdict
    reason: str
    checks: tuple[Check, ...]

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        return tuple(e for c in self.checks for e in c.evidence)

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


@dataclass(frozen=True)
class IommuReport:
    vendor: Fact[IommuVendor]
    enabled: Fact[bool]
    units: tuple[IommuUnit, ...]
    groups: tuple[IommuGroup, ...]
    remapping: Fact[bool | None]
    remapping_mode: Fact[str | None]  # "xapic", "x2apic", "its"
    posting: Posting
    arch: str
    kernel_log: str  # where the kernel log was read from, or why it could not be
    notes: tuple[Evidence, ...] = field(default=())  # command-line and other context

    def group_of(self, bdf: str) -> IommuGroup | None:
        return next((g for g in self.groups if bdf in g.devices), None)


# --- vendor, units, groups -----------------------------------------------------------------

_DMAR_UNIT = re.compile(r"DMAR: (?P<name>dmar\d+): reg_base_addr (?P<base>[0-9a-fA-F]+) "
                        r"ver (?P<ver>\S+) cap (?P<cap>[0-9a-fA-F]+) ecap (?P<ecap>[0-9a-fA-F]+)")
_AMD_EFR = re.compile(r"AMD-Vi: (?:Extended features \((?P<efr>0x[0-9a-fA-F]+)"
                      r"|Using global IVHD EFR:(?P<ivhd>0x[0-9a-fA-F]+))")
_SMMU_LINE = re.compile(r"^arm-smmu(?:-v3)? (?P<dev>\S+?):")
_GROUP_ADD = re.compile(r"^(?:pci|platform) (?P<dev>\S+): Adding to iommu group (?P<g>\d+)")

#: AMD EFR bits as ``drivers/iommu/amd/amd_iommu_types.h`` names them.
AMD_EFR_X2APIC = 2
AMD_EFR_GA = 7
AMD_EFR_GAM_VAPIC = 21


def _read_hex(view: HostView, path: str) -> tuple[int | None, str | None]:
    value = view.read_value(path)
    if not value:
        return None, value
    try:
        return int(value.split(":")[0], 16), value
    except ValueError:
        return None, value


def _units(view: HostView) -> tuple[IommuUnit, ...]:
    units: dict[str, IommuUnit] = {}
    kernel_log = view.kernel_log
    for line, m in kernel_log.search(_DMAR_UNIT):
        logged_cap = int(m["cap"], 16)
        ev = kernel_log.evidence(line, f"{m['name']}: cap {m['cap']}, bit 59 (posted "
                                       f"interrupts) = {(logged_cap >> 59) & 1}")
        units[m["name"]] = IommuUnit(m["name"], IommuVendor.INTEL, logged_cap,
                                     int(m["ecap"], 16), evidence=(ev,))
    for name in view.listdir("/sys/class/iommu"):
        base = f"/sys/class/iommu/{name}"
        if view.exists(f"{base}/intel-iommu"):
            cap, raw = _read_hex(view, f"{base}/intel-iommu/cap")
            ecap, _ = _read_hex(view, f"{base}/intel-iommu/ecap")
            evidence: tuple[Evidence, ...] = ()
            if cap is not None:
                evidence = (Evidence(f"{base}/intel-iommu/cap", raw or "",
                                     f"{name}: bit 59 (posted interrupts) = {(cap >> 59) & 1}"),)
            elif name in units:
                cap, ecap, evidence = units[name].cap, units[name].ecap, units[name].evidence
            else:
                evidence = (Evidence(f"{base}/intel-iommu/cap", raw or "(absent)",
                                     f"{name} is an Intel DRHD; its capability register could "
                                     "not be read"),)
            units[name] = IommuUnit(name, IommuVendor.INTEL, cap, ecap, evidence=evidence)
        elif view.exists(f"{base}/amd-iommu"):
            cap, _ = _read_hex(view, f"{base}/amd-iommu/cap")
            features, raw = _read_hex(view, f"{base}/amd-iommu/features")
            evidence = (Evidence(f"{base}/amd-iommu/features", raw or "(absent)",
                                 _amd_efr_meaning(features) if features is not None else
                                 f"{name} is an AMD IOMMU; its feature register could not be "
                                 "read"),)
            units[name] = IommuUnit(name, IommuVendor.AMD, cap, features=features,
                                    evidence=evidence)
        else:
            vendor = IommuVendor.ARM_SMMU if name.startswith("smmu") else IommuVendor.OTHER
            units[name] = IommuUnit(name, vendor, evidence=(
                Evidence(base, "(present)", f"IOMMU unit {name} registered"),))
    if not any(u.vendor == IommuVendor.AMD for u in units.values()):
        hit = kernel_log.first(_AMD_EFR)
        if hit:
            line, m = hit
            efr = int(m["efr"] or m["ivhd"], 16)
            ev_efr = kernel_log.evidence(line, _amd_efr_meaning(efr))
            units["AMD-Vi"] = IommuUnit("AMD-Vi", IommuVendor.AMD, features=efr, evidence=(ev_efr,))
    if not units:
        seen: dict[str, LogLine] = {}
        for line, m in kernel_log.search(_SMMU_LINE):
            seen.setdefault(m["dev"], line)
        for dev, line in seen.items():
            units[dev] = IommuUnit(dev, IommuVendor.ARM_SMMU, evidence=(
                kernel_log.evidence(line, f"Arm SMMU {dev} probed"),))
    return tuple(units[k] for k in sorted(units))


def _amd_efr_meaning(efr: int) -> str:
    def bit(n: int) -> int:
        return (efr >> n) & 1
    return (f"EFR {efr:#x}: GA (bit {AMD_EFR_GA}) = {bit(AMD_EFR_GA)}, GA_vAPIC "
            f"(bit {AMD_EFR_GAM_VAPIC}) = {bit(AMD_EFR_GAM_VAPIC)}, X2APIC (bit "
            f"{AMD_EFR_X2APIC}) = {bit(AMD_EFR_X2APIC)}")


def group_members(view: HostView, group: str) -> tuple[str, ...]:
    """Devices of an IOMMU group; from each device's ``iommu_group`` link if the group's
    ``devices`` directory was not recorded."""
    members = view.listdir(f"/sys/kernel/iommu_groups/{group}/devices")
    if members:
        return members
    return tuple(bdf for bdf in view.listdir("/sys/bus/pci/devices")
                 if view.link_name(f"/sys/bus/pci/devices/{bdf}/iommu_group") == group)


def _groups(view: HostView) -> tuple[IommuGroup, ...]:
    groups = [IommuGroup(g, group_members(view, g))
              for g in view.listdir("/sys/kernel/iommu_groups")]
    return tuple(sorted(groups, key=lambda g: (len(g.group), g.group)))


def _vendor(units: tuple[IommuUnit, ...], view: HostView) -> Fact[IommuVendor]:
    vendors = {u.vendor for u in units}
    for vendor in (IommuVendor.INTEL, IommuVendor.AMD, IommuVendor.ARM_SMMU, IommuVendor.OTHER):
        if vendor in vendors:
            ev = tuple(e for u in units if u.vendor == vendor for e in u.evidence[:1])
            return Fact(vendor, ev)
    listed = view.listdir("/sys/class/iommu")
    none_ev = [Evidence("/sys/class/iommu", "(empty)" if not listed else " ".join(listed),
                        "no IOMMU unit is registered")]
    if view.kernel_log.source:
        none_ev.append(Evidence(view.kernel_log.source, "(no DMAR, AMD-Vi or arm-smmu lines)",
                                "the kernel log names no IOMMU"))
    return Fact(IommuVendor.NONE, tuple(none_ev))


def _enabled(groups: tuple[IommuGroup, ...], units: tuple[IommuUnit, ...],
             view: HostView) -> Fact[bool]:
    if groups:
        members = sum(len(g.devices) for g in groups)
        return Fact(True, (Evidence("/sys/kernel/iommu_groups",
                                    f"{len(groups)} groups, {members} devices",
                                    "DMA remapping is on: devices sit in IOMMU groups"),))
    ev = [Evidence("/sys/kernel/iommu_groups", "(empty)",
                   "no IOMMU groups: DMA remapping is off, no device can be assigned")]
    if units:
        ev.append(Evidence("/sys/class/iommu", " ".join(u.name for u in units),
                           "IOMMU hardware exists but translates no device "
                           "(e.g. intel_iommu=off, or off in the firmware)"))
    return Fact(False, tuple(ev))


def _cmdline_notes(view: HostView) -> tuple[Evidence, ...]:
    params = cmdline_params(view.cmdline)
    wanted = ("intel_iommu", "amd_iommu", "amd_iommu_intr", "iommu", "iommu.passthrough",
              "intremap", "kvm-arm.vgic_v4_enable", "kvm_intel.enable_apicv", "kvm_amd.avic",
              "kvm-amd.avic", "kvm.enable_device_posted_irqs")
    notes = []
    for key in wanted:
        for value in params.get(key, []):
            notes.append(Evidence("/proc/cmdline", f"{key}={value}" if value else key,
                                  "set on the kernel command line"))
    return tuple(notes)


# --- interrupt remapping -------------------------------------------------------------------

_DMAR_IR = re.compile(r"DMAR-IR: Enabled IRQ remapping in (?P<mode>x2apic|xapic) mode")
_AMD_IR = re.compile(r"AMD-Vi: Interrupt remapping enabled")
_AMD_X2APIC = re.compile(r"AMD-Vi: X2APIC enabled")
_ITS = re.compile(r"^ITS(?: \[mem |@0x)")
_VFIO_NO_IR = re.compile(r"vfio_iommu_type1_attach_group: No interrupt remapping support")


def _interrupt_rows(view: HostView) -> tuple[Evidence | None, Evidence | None, Evidence | None]:
    """(an IR- device row, a device row without IR, an ITS row) from /proc/interrupts."""
    snap = view.interrupts
    if snap is None:
        return None, None, None
    remapped = plain = its = None
    for line in snap.lines:
        if line.chip is None:
            continue
        raw = f"{line.label}: {line.description}"  # the row as printed, without the counts
        if line.vector is not None and line.is_remapped and remapped is None:
            remapped = Evidence("/proc/interrupts", raw,
                                "this device's MSI goes through the IOMMU's interrupt remapping "
                                "(IR- chip)")
        elif line.vector is not None and not line.is_remapped and plain is None \
                and not line.chip.startswith("ITS"):
            plain = Evidence("/proc/interrupts", raw,
                             "this device's MSI is not remapped (no IR- prefix)")
        if line.chip.startswith("ITS") and its is None:
            its = Evidence("/proc/interrupts", raw, "MSIs are translated by a GIC ITS")
    return remapped, plain, its


def _remapping(vendor: IommuVendor, view: HostView) -> tuple[Fact[bool | None], Fact[str | None]]:
    remapping, mode = _remapping_facts(vendor, view)
    if not mode.evidence:  # no mode because no remapping (or unknown): same evidence
        mode = Fact(mode.value, remapping.evidence)
    return remapping, mode


def _remapping_facts(vendor: IommuVendor,
                     view: HostView) -> tuple[Fact[bool | None], Fact[str | None]]:
    kernel_log = view.kernel_log
    ir_row, plain_row, its_row = _interrupt_rows(view)
    intremap = cmdline_params(view.cmdline).get("intremap", [])
    if _gic_posting(view) or vendor == IommuVendor.ARM_SMMU:
        hit = kernel_log.first(_ITS)
        ev = [kernel_log.evidence(hit[0], "the GIC has an ITS: MSIs are translated per device")
              ] if hit else []
        if its_row:
            ev.append(its_row)
        if ev:
            return Fact(True, tuple(ev)), Fact("its", tuple(ev))
        return (Fact(None, (Evidence(kernel_log.source or "kernel log", "(no ITS line)",
                                     "cannot tell whether the GIC has an ITS"),)),
                Fact(None, ()))
    hit_intel = kernel_log.first(_DMAR_IR)
    if hit_intel:
        line, m = hit_intel
        ev_ir = kernel_log.evidence(line, f"interrupt remapping is on, in {m['mode']} mode")
        return Fact(True, (ev_ir, ir_row) if ir_row else (ev_ir,)), Fact(m["mode"], (ev_ir,))
    hit_amd = kernel_log.first(_AMD_IR)
    if hit_amd:
        ev_ir = kernel_log.evidence(hit_amd[0], "interrupt remapping is on")
        on: Fact[bool | None] = Fact(True, (ev_ir, ir_row) if ir_row else (ev_ir,))
        x2 = kernel_log.first(_AMD_X2APIC)
        if x2:
            return on, Fact("x2apic", (kernel_log.evidence(
                x2[0], "the IOMMU remaps in x2APIC (XT) mode"),))
        return on, Fact("xapic", (Evidence(
            kernel_log.source, "(no 'AMD-Vi: X2APIC enabled' line)",
            "the driver prints it right after 'Interrupt remapping enabled' when the IRTEs "
            "use x2APIC format; without it the mode is xAPIC"),))
    vfio_no_ir = kernel_log.first(_VFIO_NO_IR)
    if vfio_no_ir:
        return Fact(False, (kernel_log.evidence(
            vfio_no_ir[0], "VFIO found no interrupt remapping on this host"),)), Fact(None, ())
    if "off" in _split_values(intremap):
        ev_off = Evidence("/proc/cmdline", "intremap=" + ",".join(intremap),
                          "interrupt remapping is switched off on the command line")
        return Fact(False, (ev_off,)), Fact(None, ())
    if ir_row:
        return Fact(True, (ir_row,)), Fact(None, (Evidence(
            "/proc/interrupts", ir_row.value, "the IR- chip does not tell xapic from x2apic"),))
    if plain_row:
        return Fact(False, (plain_row,)), Fact(None, ())
    if vendor == IommuVendor.NONE:
        return Fact(False, (Evidence("/sys/class/iommu", "(empty)",
                                     "no IOMMU, so no interrupt remapping"),)), Fact(None, ())
    why = kernel_log.problem or "the kernel log has no remapping line (rotated out?)"
    return Fact(None, (Evidence(kernel_log.source or "kernel log", "(no line)", why),)), \
        Fact(None, ())


def _split_values(values: Iterable[str]) -> set[str]:
    return {part for value in values for part in value.split(",") if part}


# --- posting -------------------------------------------------------------------------------

_PI_INCONSISTENT = re.compile(r"DMAR: IOMMU feature pi_support inconsistent")
_AMD_VAPIC = re.compile(r"AMD-Vi: Virtual APIC enabled")
_AMD_SNP = re.compile(r"Force to disable Virtual APIC due to SNP")
_KVM_AMD_AVIC = re.compile(r"^kvm_amd: AVIC enabled")
_GICV4_KVM = re.compile(r"^kvm \[\d+\]: GICv4(?P<v41>\.1)? support (?P<state>enabled|disabled)")
_GICV4_HW = re.compile(r"^(?:GICv3: GICv4 features:|ITS: Enabling GICv4 support"
                       r"|ITS@0x[0-9a-fA-F]+: Using GICv4\.1 mode)")
_KVM_ARM_UP = re.compile(r"^kvm \[\d+\]: (?:VHE|Hyp|nVHE|Protected nVHE) mode initialized")


def _module_param(view: HostView, module: str, name: str) -> tuple[str | None, str]:
    path = f"/sys/module/{module}/parameters/{name}"
    return view.read_value(path), path


def _module_loaded(view: HostView, module: str) -> bool:
    return view.exists(f"/sys/module/{module}")


def _check_remapping(remapping: Fact[bool | None]) -> Check:
    if remapping.value is True:
        return Check("remapping", True, "interrupt remapping is on", remapping.evidence)
    if remapping.value is False:
        return Check("remapping", False, "interrupt remapping is off", remapping.evidence)
    return Check("remapping", None, "cannot tell whether interrupt remapping is on",
                 remapping.evidence)


def _check_device_posted(view: HostView, module: str) -> Check:
    for mod in (module, "kvm"):  # the param moved to the vendor modules before 6.16 shipped
        value, path = _module_param(view, mod, "enable_device_posted_irqs")
        if value is None:
            continue
        flag = parse_module_bool(value)
        if flag is True:
            return Check("kvm-device-posted-irqs", True, "KVM will post device interrupts",
                         (Evidence(path, value, "KVM found posting capability and will use it "
                                   "(6.16+: enable_apicv && IRQ_POSTING_CAP)"),))
        if flag is False:
            return Check("kvm-device-posted-irqs", False,
                         f"{mod}.enable_device_posted_irqs=N: KVM will not post device "
                         "interrupts (off, or no posting capability when KVM loaded)",
                         (Evidence(path, value, "KVM will not post device interrupts"),))
        return Check("kvm-device-posted-irqs", None, f"unexpected value {value!r}",
                     (Evidence(path, value, "not a bool"),))
    path = f"/sys/module/{module}/parameters/enable_device_posted_irqs"
    if not _module_loaded(view, module):
        return Check("kvm-device-posted-irqs", None, f"{module} is not loaded",
                     (Evidence(path, "(absent)", f"{module} is not loaded"),))
    return Check("kvm-device-posted-irqs", True,
                 "no enable_device_posted_irqs parameter (kernel before 6.16): no extra switch",
                 (Evidence(path, "(absent)", "kernel before 6.16: no separate switch"),))


def _intel_checks(view: HostView, units: tuple[IommuUnit, ...],
                  remapping: Fact[bool | None]) -> list[Check]:
    checks = [_check_remapping(remapping)]
    drhds = [u for u in units if u.vendor == IommuVendor.INTEL]
    missing = [u.name for u in drhds if u.posting_capable is False]
    unknown = [u.name for u in drhds if u.posting_capable is None]
    ev = tuple(e for u in drhds for e in u.evidence)
    inconsistent = view.kernel_log.first(_PI_INCONSISTENT)
    if inconsistent:
        ev += (view.kernel_log.evidence(inconsistent[0],
                                        "some DRHDs support posting and some do not"),)
    if not drhds:
        checks.append(Check("iommu-posting-capability", None,
                            "no DRHD capability register found (no sysfs cap, no dmesg line)",
                            (Evidence("/sys/class/iommu", "(no dmar*)", "cannot read cap"),)))
    elif missing:
        checks.append(Check("iommu-posting-capability", False,
                            f"DMAR cap bit 59 (posted interrupts) is clear on "
                            f"{', '.join(missing)}; posting needs it on every DRHD", ev))
    elif unknown:
        checks.append(Check("iommu-posting-capability", None,
                            f"no cap register for {', '.join(unknown)}", ev))
    else:
        checks.append(Check("iommu-posting-capability", True,
                            f"DMAR cap bit 59 is set on all {len(drhds)} DRHDs", ev))
    checks.append(_check_cmdline_flag(view, "intremap", "nopost",
                                      "intremap=nopost disables interrupt posting"))
    if not _module_loaded(view, "kvm_intel"):
        ev_mod = [Evidence("/sys/module/kvm_intel", "(absent)", "kvm_intel is not loaded")]
        summary = "kvm_intel is not loaded"
        if _module_loaded(view, "kvm_amd"):
            ev_mod.append(Evidence("/sys/module/kvm_amd", "(loaded)", "KVM runs on SVM"))
            summary = ("KVM runs on SVM (kvm_amd) but the IOMMU is Intel VT-d: AVIC cannot "
                       "post through VT-d")
        checks.append(Check("kvm-apicv", False, summary, tuple(ev_mod)))
    else:
        value, path = _module_param(view, "kvm_intel", "enable_apicv")
        flag = parse_module_bool(value)
        ev_apicv = (Evidence(path, value or "(absent)",
                             {True: "APICv is on", False: "APICv is off",
                              None: "cannot tell"}[flag]),)
        summary = {True: "kvm_intel.enable_apicv=Y",
                   False: "kvm_intel.enable_apicv=N: KVM never posts without APICv",
                   None: "cannot read kvm_intel.enable_apicv"}[flag]
        checks.append(Check("kvm-apicv", flag, summary, ev_apicv))
    checks.append(_check_device_posted(view, "kvm_intel"))
    return checks


def _check_cmdline_flag(view: HostView, key: str, bad: str, meaning: str) -> Check:
    name = f"cmdline-{key}-{bad}"
    if view.cmdline is None:
        return Check(name, None, "cannot read /proc/cmdline",
                     (Evidence("/proc/cmdline", "(absent)", "cannot read"),))
    values = cmdline_params(view.cmdline).get(key, [])
    if bad in _split_values(values):
        return Check(name, False, meaning, (Evidence(
            "/proc/cmdline", f"{key}=" + ",".join(values), meaning),))
    return Check(name, True, f"no {key}={bad} on the command line",
                 (Evidence("/proc/cmdline", view.cmdline, f"no {key}={bad}"),))


def _amd_checks(view: HostView, units: tuple[IommuUnit, ...],
                remapping: Fact[bool | None]) -> list[Check]:
    kernel_log = view.kernel_log
    checks = [_check_remapping(remapping)]
    ev: list[Evidence] = [e for u in units if u.vendor == IommuVendor.AMD for e in u.evidence]
    vapic = kernel_log.first(_AMD_VAPIC)
    snp = kernel_log.first(_AMD_SNP)
    hw = [u.posting_capable for u in units if u.vendor == IommuVendor.AMD]
    if vapic:
        ev.append(kernel_log.evidence(vapic[0], "the IOMMU runs in GA/vAPIC mode: it can post "
                                                "(IRQ_POSTING_CAP set)"))
        checks.append(Check("iommu-posting-capability", True, "AMD-Vi: Virtual APIC enabled",
                            tuple(ev)))
    elif snp:
        ev.append(kernel_log.evidence(snp[0], "SNP host without SNPAVICSUP: vAPIC forced off"))
        checks.append(Check("iommu-posting-capability", False,
                            "Virtual APIC forced off because of SEV-SNP", tuple(ev)))
    elif False in hw:
        checks.append(Check("iommu-posting-capability", False,
                            "the IOMMU lacks GA_vAPIC (EFR bit 21)", tuple(ev)))
    elif kernel_log.first(_AMD_IR) and kernel_log.has_boot:
        ev.append(Evidence(kernel_log.source, "(no 'AMD-Vi: Virtual APIC enabled' line)",
                           "the boot log shows remapping but not vAPIC: legacy (non-GA) mode"))
        checks.append(Check("iommu-posting-capability", False,
                            "AMD-Vi did not enable Virtual APIC (legacy interrupt remapping)",
                            tuple(ev)))
    else:
        checks.append(Check("iommu-posting-capability", None,
                            "no 'AMD-Vi: Virtual APIC enabled' line in the kernel log",
                            tuple(ev) or (Evidence(kernel_log.source or "kernel log",
                                                   "(no line)", "cannot tell"),)))
    checks.append(_check_cmdline_flag(view, "amd_iommu_intr", "legacy",
                                      "amd_iommu_intr=legacy turns GA (posting) mode off"))
    if not _module_loaded(view, "kvm_amd"):
        checks.append(Check("kvm-avic", False, "kvm_amd is not loaded",
                            (Evidence("/sys/module/kvm_amd", "(absent)",
                                      "kvm_amd is not loaded"),)))
    else:
        value, path = _module_param(view, "kvm_amd", "avic")
        flag = parse_module_bool(value)
        ev_avic = [Evidence(path, value or "(absent)",
                            {True: "AVIC is on", False: "AVIC is off (the default before "
                             "Zen4 support landed)", None: "cannot tell"}[flag])]
        line = kernel_log.first(_KVM_AMD_AVIC)
        if line:
            ev_avic.append(kernel_log.evidence(line[0], "kvm_amd enabled AVIC at load"))
            flag = True if flag is None else flag
        summary = {True: "kvm_amd AVIC is on",
                   False: "kvm_amd.avic is off: KVM never posts without AVIC",
                   None: "cannot read kvm_amd.avic"}[flag]
        checks.append(Check("kvm-avic", flag, summary, tuple(ev_avic)))
    checks.append(_check_device_posted(view, "kvm_amd"))
    return checks


def _arm_checks(view: HostView, remapping: Fact[bool | None]) -> list[Check]:
    kernel_log = view.kernel_log
    checks = []
    if remapping.value is True:
        checks.append(Check("its", True, "the GIC has an ITS", remapping.evidence))
    else:
        checks.append(Check("its", remapping.value, "cannot tell whether the GIC has an ITS"
                            if remapping.value is None else "no GIC ITS", remapping.evidence))
    hw = list(kernel_log.search(_GICV4_HW))
    kvm_line = kernel_log.first(_GICV4_KVM)
    if hw:
        checks.append(Check("gicv4-hardware", True, "the GIC implements GICv4 (vLPI injection)",
                            tuple(kernel_log.evidence(line, "the GIC implements GICv4")
                                  for line, _ in hw)))
    elif kvm_line:
        checks.append(Check("gicv4-hardware", True, "KVM found a GICv4",
                            (kernel_log.evidence(kvm_line[0], "KVM only prints this line on a "
                                                 "GICv4-capable GIC"),)))
    else:
        checks.append(Check("gicv4-hardware", None, "no GICv4 line in the kernel log",
                            (Evidence(kernel_log.source or "kernel log", "(no line)",
                                      "cannot tell"),)))
    vgic = cmdline_params(view.cmdline).get("kvm-arm.vgic_v4_enable", [])
    # Each occurrence is applied in turn at boot: the last one is the one in force.
    cmd_ev = tuple(Evidence("/proc/cmdline", f"kvm-arm.vgic_v4_enable={v}",
                            ("asks KVM to use GICv4 direct injection" if parse_module_bool(v)
                             else "keeps GICv4 direct injection off in KVM")
                            + (" (overridden by a later one)" if i < len(vgic) - 1 else ""))
                   for i, v in enumerate(vgic))
    if kvm_line:
        line, m = kvm_line
        version = "GICv4.1" if m["v41"] else "GICv4"
        if m["state"] == "enabled":
            checks.append(Check("kvm-gicv4", True, f"KVM uses {version} direct injection",
                                (kernel_log.evidence(line, "vLPIs are injected directly"),)
                                + cmd_ev))
        else:
            checks.append(Check("kvm-gicv4", False, f"KVM has {version} direct injection "
                                "disabled (it is off by default: boot with "
                                "kvm-arm.vgic_v4_enable=1)",
                                (kernel_log.evidence(line, "vLPIs go through KVM's software "
                                                     "injection"),) + cmd_ev))
    elif kernel_log.first(_KVM_ARM_UP):
        up = kernel_log.first(_KVM_ARM_UP)
        assert up is not None
        checks.append(Check("kvm-gicv4", False, "KVM initialised without GICv4 support",
                            (kernel_log.evidence(up[0], "KVM is up and printed no GICv4 line: "
                                                 "the GIC has no v4"),)))
    else:
        checks.append(Check("kvm-gicv4", None, "no KVM GICv4 line in the kernel log",
                            (Evidence(kernel_log.source or "kernel log", "(no line)",
                                      "cannot tell"),) + cmd_ev))
    return checks


def _decide(checks: list[Check]) -> Posting:
    failed = [c for c in checks if c.ok is False]
    unknown = [c for c in checks if c.ok is None]
    if failed:
        return Posting(PostingVerdict.NOT_POSSIBLE, "; ".join(c.summary for c in failed),
                       tuple(checks))
    if unknown:
        return Posting(PostingVerdict.UNKNOWN, "; ".join(c.summary for c in unknown),
                       tuple(checks))
    return Posting(PostingVerdict.POSSIBLE,
                   "every link of the posting chain is in place", tuple(checks))


def _imply_from_device_posted(checks: list[Check]) -> list[Check]:
    """``enable_device_posted_irqs=Y`` proves remapping and the capability at KVM load time."""
    device_posted = next((c for c in checks if c.name == "kvm-device-posted-irqs"), None)
    if device_posted is None or device_posted.ok is not True or \
            device_posted.evidence[0].value == "(absent)":
        return checks
    out = []
    for check in checks:
        if check.ok is None and check.name in ("remapping", "iommu-posting-capability"):
            check = Check(check.name, True, check.summary + " (implied by "
                          "enable_device_posted_irqs=Y)", check.evidence + device_posted.evidence)
        out.append(check)
    return out


def _gic_posting(view: HostView) -> bool:
    """MSIs go through a GIC ITS and post as vLPIs (not through an IOMMU's IRTEs)."""
    return view.platform is not None and view.platform.posting_model is PostingModel.VLPI


def _posting(vendor: IommuVendor, view: HostView, units: tuple[IommuUnit, ...],
             remapping: Fact[bool | None]) -> Posting:
    if _gic_posting(view):
        return _decide(_arm_checks(view, remapping))
    if vendor == IommuVendor.INTEL:
        return _decide(_imply_from_device_posted(_intel_checks(view, units, remapping)))
    if vendor == IommuVendor.AMD:
        return _decide(_imply_from_device_posted(_amd_checks(view, units, remapping)))
    if vendor == IommuVendor.NONE:
        return _decide([Check("iommu", False, "no IOMMU: posting needs an IOMMU that remaps "
                              "interrupts", _vendor(units, view).evidence)])
    return _decide([Check("iommu", None, "this IOMMU's posting support is not modelled",
                          tuple(e for u in units for e in u.evidence))])


def probe_iommu(root: Path = Path("/"), *, view: HostView | None = None) -> IommuReport:
    """Read the host under ``root`` (or through ``view``) and conclude, with evidence."""
    view = view if view is not None else HostView(root)
    units = _units(view)
    groups = _groups(view)
    vendor = _vendor(units, view)
    remapping, mode = _remapping(vendor.value, view)
    posting = _posting(vendor.value, view, units, remapping)
    kernel_log = view.kernel_log
    return IommuReport(vendor=vendor, enabled=_enabled(groups, units, view), units=units,
                       groups=groups, remapping=remapping, remapping_mode=mode, posting=posting,
                       arch=view.arch,
                       kernel_log=kernel_log.source or (kernel_log.problem or "unreadable"),
                       notes=_cmdline_notes(view))
