"""``harness preflight``: what this host can do for device interrupts, and why, in one report.

It combines the accelerator (KVM that really runs a guest, or TCG only), the IOMMU and
interrupt remapping, the posted-interrupt chain, and a one-line verdict per requested device:
``posted possible``, ``bounce only: <reason>``, ``cannot assign: <reason>`` or
``posting unknown: <reason>``.  Any root other than ``/`` is a recorded host tree; the KVM
probe is injectable so that recorded trees never start QEMU.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HostError
from harness.host.accel import KvmProbe, kvm_device_problem, kvm_probe
from harness.host.iommu import (
    Check,
    IommuReport,
    PostingVerdict,
    probe_iommu,
)
from harness.host.pci import PciDevice, check_assignable
from harness.host.view import Evidence, HostView
from harness.interrupts import normalize_bdf

log = logging.getLogger(__name__)

#: Returns whether KVM can really run a guest here.  Called once per live preflight.
AccelProbe = Callable[[], KvmProbe]

_KVM_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")


# --- the report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AccelReport:
    accel: str  # "kvm", "tcg", or "unknown" (a recorded tree probed by nobody)
    kvm_usable: bool | None
    reason: str
    evidence: tuple[Evidence, ...]


class DeviceVerdict(enum.StrEnum):
    POSTED_POSSIBLE = "posted possible"
    BOUNCE_ONLY = "bounce only"
    CANNOT_ASSIGN = "cannot assign"
    UNKNOWN = "posting unknown"


@dataclass(frozen=True)
class DeviceReport:
    bdf: str
    device: PciDevice | None
    group_devices: tuple[PciDevice, ...]
    verdict: DeviceVerdict
    reasons: tuple[str, ...]  # every reason for the verdict; the first one is the headline

    @property
    def line(self) -> str:
        if self.verdict == DeviceVerdict.POSTED_POSSIBLE:
            return self.verdict.value
        return f"{self.verdict.value}: {self.reasons[0]}"


@dataclass(frozen=True)
class PreflightReport:
    root: str
    live: bool
    accel: AccelReport
    iommu: IommuReport
    devices: tuple[DeviceReport, ...]

    @property
    def summary(self) -> str:
        """The host in one line, e.g. ``TCG only: no usable KVM (...); no IOMMU``."""
        parts = []
        if self.accel.kvm_usable is False:
            parts.append(f"TCG only: no usable KVM ({self.accel.reason})")
        elif self.accel.kvm_usable is True:
            parts.append(f"KVM usable ({self.accel.reason})")
        else:
            parts.append(f"KVM not probed ({self.accel.reason})")
        iommu = self.iommu
        if iommu.vendor.value.value == "none":
            parts.append("no IOMMU")
        else:
            state = "on" if iommu.enabled.value else "off"
            parts.append(f"IOMMU {iommu.vendor.value.label} {state}")
            if iommu.remapping.value is True:
                mode = f" ({iommu.remapping_mode.value})" if iommu.remapping_mode.value else ""
                parts.append(f"interrupt remapping on{mode}")
            elif iommu.remapping.value is False:
                parts.append("interrupt remapping off")
        parts.append(f"posting {iommu.posting.verdict.value}")
        return "; ".join(parts)


# --- accelerator ---------------------------------------------------------------------------


def _accel(view: HostView, accel_probe: AccelProbe | None) -> AccelReport:
    evidence: list[Evidence] = []
    loaded = [m for m in _KVM_MODULES if view.exists(f"/sys/module/{m}")]
    for module in loaded:
        meaning = {"kvm_intel": "KVM for Intel VMX", "kvm_amd": "KVM for AMD SVM",
                   "kvm_pvm": "PVM: KVM for a host that is itself a guest (no VMX/SVM "
                              "for guests; no device posting)"}[module]
        evidence.append(Evidence(f"/sys/module/{module}", "(loaded)", meaning))
    vendor_modules = view.platform.kvm_vendor_modules if view.platform else ()
    if vendor_modules and not set(vendor_modules) & set(loaded):
        evidence.append(Evidence(", ".join(f"/sys/module/{m}" for m in vendor_modules),
                                 "(absent)",
                                 "no VMX/SVM KVM module is loaded: no APICv/AVIC, no posting"))
    if view.live:
        problem = kvm_device_problem()
        evidence.append(Evidence("/dev/kvm", problem or "present, read-write",
                                 "KVM cannot be opened" if problem else
                                 "exists; only running guest code shows whether it works"))
    hypervisor = next((ln for ln in view.kernel_log.lines
                       if ln.message.startswith("Hypervisor detected:")), None)
    if hypervisor is not None:
        evidence.append(view.kernel_log.evidence(
            hypervisor, "this host is itself a virtual machine: KVM here is nested"))
    if accel_probe is None:
        if view.live:
            accel_probe = kvm_probe()
        else:
            return AccelReport("unknown", None, "a recorded host: the KVM probe runs guest code "
                               "and only runs on the live host", tuple(evidence))
    probe = accel_probe()
    evidence.append(Evidence("kvm probe", probe.reason,
                             "KVM can run a guest" if probe.usable else "KVM cannot run a guest"))
    if probe.usable:
        return AccelReport("kvm", True, probe.reason, tuple(evidence))
    return AccelReport("tcg", False, probe.reason, tuple(evidence))


# --- devices -------------------------------------------------------------------------------


def _device_report(bdf: str, view: HostView, iommu: IommuReport,
                   accel: AccelReport) -> DeviceReport:
    try:
        assign = check_assignable(bdf, view, iommu_on=iommu.enabled.value)
    except HostError as exc:
        return DeviceReport(bdf, None, (), DeviceVerdict.CANNOT_ASSIGN, (exc.reason,))
    device = assign.device
    if assign.reasons:
        return DeviceReport(device.bdf, device, assign.group_devices, DeviceVerdict.CANNOT_ASSIGN,
                            assign.reasons)
    bounce = []
    if accel.kvm_usable is False:
        bounce.append("no usable KVM: under TCG QEMU delivers every interrupt from user space")
    if device.msi.known and not device.msi.has_msi:
        bounce.append("the device has no MSI or MSI-X (INTx never gets a bypass producer)")
    if iommu.posting.verdict == PostingVerdict.NOT_POSSIBLE:
        bounce.append(f"the host cannot post interrupts: {iommu.posting.reason}")
    if bounce:
        return DeviceReport(device.bdf, device, assign.group_devices, DeviceVerdict.BOUNCE_ONLY,
                            tuple(bounce))
    unknown = []
    if accel.kvm_usable is None:
        unknown.append(f"KVM {accel.reason}")
    if not device.msi.known:
        unknown.append(f"MSI/MSI-X capability unknown: {device.msi.detail}")
    if iommu.posting.verdict == PostingVerdict.UNKNOWN:
        unknown.append(f"posting support unknown: {iommu.posting.reason}")
    if unknown:
        return DeviceReport(device.bdf, device, assign.group_devices, DeviceVerdict.UNKNOWN,
                            tuple(unknown))
    return DeviceReport(device.bdf, device, assign.group_devices, DeviceVerdict.POSTED_POSSIBLE,
                        (f"{device.msi.detail}; {iommu.posting.reason}",))


def preflight(root: Path = Path("/"), devices: Sequence[str] = (),
              accel_probe: AccelProbe | None = None,
              view: HostView | None = None) -> PreflightReport:
    """Everything preflight knows about the host under ``root`` and the given devices.

    ``accel_probe`` defaults to :func:`~harness.host.accel.kvm_probe` (a tiny guest program
    under KVM) on a live host and to no probe on a recorded tree (the accelerator is then
    reported as not probed).
    """
    view = view if view is not None else HostView(root)
    iommu = probe_iommu(view=view)
    accel = _accel(view, accel_probe)
    reports = []
    for bdf in devices:
        try:
            wanted = normalize_bdf(bdf)
        except ValueError as exc:
            reports.append(DeviceReport(bdf, None, (), DeviceVerdict.CANNOT_ASSIGN, (str(exc),)))
            continue
        reports.append(_device_report(wanted, view, iommu, accel))
    return PreflightReport(str(view.root), view.live, accel, iommu, tuple(reports))


# --- presentation --------------------------------------------------------------------------


def _mark(ok: bool | None) -> str:
    return {True: "ok", False: "NO", None: "??"}[ok]


def _evidence_lines(evidence: Sequence[Evidence], indent: str = "      ") -> list[str]:
    return [f"{indent}{e.source}: {e.value}\n{indent}  -> {e.meaning}" for e in evidence]


def _check_lines(check: Check) -> list[str]:
    return [f"    [{_mark(check.ok)}] {check.name}: {check.summary}",
            *_evidence_lines(check.evidence)]


def format_preflight(report: PreflightReport) -> str:
    """The terminal report: host summary, accelerator, IOMMU, posting chain, devices."""
    iommu = report.iommu
    out = [f"host {report.root}{' (live)' if report.live else ' (recorded)'}: arch "
           f"{iommu.arch}, kernel log from {iommu.kernel_log}",
           f"  => {report.summary}", ""]
    label = {"kvm": "KVM", "tcg": "TCG only", "unknown": "not probed"}[report.accel.accel]
    out.append(f"accelerator: {label} - {report.accel.reason}")
    out += _evidence_lines(report.accel.evidence, "    ")
    out.append("")
    state = "on" if iommu.enabled.value else "off"
    out.append(f"iommu: {iommu.vendor.value.label}, {state}, {len(iommu.groups)} groups")
    out += _evidence_lines(iommu.vendor.evidence + iommu.enabled.evidence, "    ")
    for unit in iommu.units:
        capable = {True: "posting capable", False: "NOT posting capable",
                   None: "posting capability unknown"}[unit.posting_capable]
        out.append(f"    unit {unit.name}: {capable}")
    remap = {True: "on", False: "off", None: "unknown"}[iommu.remapping.value]
    mode = f" ({iommu.remapping_mode.value})" if iommu.remapping_mode.value else ""
    out.append(f"interrupt remapping: {remap}{mode}")
    out += _evidence_lines(_unique(iommu.remapping.evidence + iommu.remapping_mode.evidence),
                           "    ")
    if iommu.notes:
        out.append("kernel command line:")
        out += [f"    {e.value}" for e in iommu.notes]
    out.append("")
    out.append(f"posted interrupts: {iommu.posting.verdict.value} - {iommu.posting.reason}")
    for check in iommu.posting.checks:
        out += _check_lines(check)
    if report.devices:
        out.append("")
        out.append("devices:")
        rows = [["BDF", "IDS", "DRIVER", "GROUP", "MSI", "VERDICT"]]
        for d in report.devices:
            dev = d.device
            if dev is None:
                rows.append([d.bdf, "-", "-", "-", "-", d.line])
                continue
            others = ",".join(o.bdf for o in d.group_devices)
            group = "-" if dev.iommu_group is None else dev.iommu_group + (
                f" (+{others})" if others else "")
            msi = dev.msi.detail if dev.msi.known else "unknown"
            rows.append([dev.bdf, dev.ids, dev.driver or "(none)", group, msi, d.line])
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        for row in rows:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True))
                       + "  " + row[5])
        for d in report.devices:
            if len(d.reasons) > 1:
                out.append(f"  {d.bdf}: {d.verdict.value} because:")
                out += [f"    - {r}" for r in d.reasons]
    return "\n".join(out) + "\n"


def _unique(evidence: Sequence[Evidence]) -> tuple[Evidence, ...]:
    return tuple(dict.fromkeys(evidence))


def _facts(evidence: Sequence[Evidence]) -> list[dict[str, str]]:
    return [e.to_dict() for e in evidence]


def preflight_to_dict(report: PreflightReport) -> dict[str, object]:
    """The report as JSON-able data (``harness preflight --json``)."""
    iommu = report.iommu
    return {
        "root": report.root,
        "live": report.live,
        "summary": report.summary,
        "accel": {"accel": report.accel.accel, "kvm_usable": report.accel.kvm_usable,
                  "reason": report.accel.reason, "evidence": _facts(report.accel.evidence)},
        "iommu": {
            "arch": iommu.arch,
            "kernel_log": iommu.kernel_log,
            "vendor": {"value": iommu.vendor.value.value, "label": iommu.vendor.value.label,
                       "evidence": _facts(iommu.vendor.evidence)},
            "enabled": {"value": iommu.enabled.value, "evidence": _facts(iommu.enabled.evidence)},
            "units": [{"name": u.name, "vendor": u.vendor.value,
                       "cap": None if u.cap is None else f"{u.cap:x}",
                       "ecap": None if u.ecap is None else f"{u.ecap:x}",
                       "features": None if u.features is None else f"{u.features:x}",
                       "posting_capable": u.posting_capable, "evidence": _facts(u.evidence)}
                      for u in iommu.units],
            "groups": {g.group: list(g.devices) for g in iommu.groups},
            "remapping": {"value": iommu.remapping.value, "mode": iommu.remapping_mode.value,
                          "evidence": _facts(_unique(iommu.remapping.evidence
                                                     + iommu.remapping_mode.evidence))},
            "cmdline": _facts(iommu.notes),
        },
        "posting": {"verdict": iommu.posting.verdict.value, "reason": iommu.posting.reason,
                    "checks": [{"name": c.name, "ok": c.ok, "summary": c.summary,
                                "evidence": _facts(c.evidence)} for c in iommu.posting.checks]},
        "devices": [{"bdf": d.bdf, "verdict": d.verdict.value, "line": d.line,
                     "reasons": list(d.reasons),
                     "device": None if d.device is None else d.device.to_dict(),
                     "group_devices": [o.to_dict() for o in d.group_devices]}
                    for d in report.devices],
    }


def preflight_json(report: PreflightReport) -> str:
    return json.dumps(preflight_to_dict(report), indent=2)
