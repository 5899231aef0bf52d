"""Every preflight rule on recorded hosts (tests/data/hosts), and the real machine.

The recorded trees and where each file came from are described in
tests/data/hosts/*/PROVENANCE.md.  Tests named ``*_variant`` copy a recorded tree and change
one thing, to show the rule that thing drives.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from harness.host.accel import KvmProbe, kvm_probe
from harness.host.iommu import (
    IommuVendor,
    PostingVerdict,
    probe_iommu,
)
from harness.host.pci import check_assignable, parse_msi_capability, read_pci_device
from harness.host.preflight import (
    DeviceVerdict,
    format_preflight,
    preflight,
    preflight_to_dict,
)
from harness.host.view import HostView, KernelLog, parse_module_bool

DATA = Path(__file__).resolve().parents[1] / "data"
HOSTS = DATA / "hosts"
LAB_L1_HOST = DATA / "lab" / "l1-host"
LAB_L1_CAPTURE = DATA / "lab" / "irqfd"


def kvm_usable() -> KvmProbe:
    return KvmProbe(True, "test: KVM assumed usable", 0.0)


def kvm_unusable() -> KvmProbe:
    return KvmProbe(False, "test: KVM cannot run a guest", 0.0)


def copy_host(name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(HOSTS / name, dest, symlinks=True)
    return dest


def append_cmdline(root: Path, words: str) -> None:
    path = root / "proc/cmdline"
    path.write_text(path.read_text().strip() + " " + words + "\n")


def values(evidence: object) -> list[str]:
    return [e.value for e in evidence]  # type: ignore[attr-defined]


# --- the kernel log ------------------------------------------------------------------------


def test_kernel_log_prefixes_are_stripped() -> None:
    # Real lines, as published: dmesg -T (strongtz/i915-sriov-dkms#339), a journal export
    # with a lower-case month, dmesg -x -T (utcs-scea/LAKE#10, a 7-DRHD server), the
    # printk caller id (an LKML boot log) and a caller id without a time.
    text = "\n".join([
        "[Tue Aug 26 16:02:51 2025] DMAR-IR: Enabled IRQ remapping in x2apic mode",
        "jan 13 14:17:13 localhost kernel: DMAR-IR: Enabled IRQ remapping in x2apic mode",
        "kern  :info  : [Fri Apr  7 00:04:33 2023] DMAR: dmar0: reg_base_addr d37fc000 "
        "ver 1:0 cap 8d2078c106f0466 ecap f020df",
        "[    0.299673][    T1] AMD-Vi: Virtual APIC enabled",
        "[    T1] AMD-Vi: X2APIC enabled",
    ])
    log = KernelLog.from_text(text, "dmesg")
    assert [ln.message for ln in log.lines] == [
        "DMAR-IR: Enabled IRQ remapping in x2apic mode",
        "DMAR-IR: Enabled IRQ remapping in x2apic mode",
        "DMAR: dmar0: reg_base_addr d37fc000 ver 1:0 cap 8d2078c106f0466 ecap f020df",
        "AMD-Vi: Virtual APIC enabled",
        "AMD-Vi: X2APIC enabled",
    ]
    assert log.lines[0].raw.startswith("[Tue Aug 26")  # evidence keeps the line as printed
    assert not log.has_boot


def test_module_parameter_values() -> None:
    # bool parameters print Y/N; kvm_amd.avic was an int (0/1) in older kernels
    assert [parse_module_bool(v) for v in ("Y", "N", "1", "0", "-1", None)] == [
        True, False, True, False, None, None]


# --- Intel: posting possible ----------------------------------------------------------------


def test_intel_posting_host() -> None:
    report = probe_iommu(HOSTS / "intel-posting")
    assert report.arch == "x86_64"
    assert report.vendor.value == IommuVendor.INTEL
    assert report.enabled.value is True
    assert report.enabled.evidence[0].value == "19 groups, 28 devices"
    assert [(u.name, u.cap, u.posting_capable) for u in report.units] == [
        ("dmar0", 0xC9DE008CEE690462, True), ("dmar1", 0xC9DE008CEE690462, True)]
    assert report.remapping.value is True
    assert report.remapping_mode.value == "x2apic"
    assert report.remapping.evidence[0].source == "dmesg"
    assert report.remapping.evidence[0].value == (
        "[    1.449527] DMAR-IR: Enabled IRQ remapping in x2apic mode")

    posting = report.posting
    assert posting.verdict == PostingVerdict.POSSIBLE
    assert [(c.name, c.ok) for c in posting.checks] == [
        ("remapping", True), ("iommu-posting-capability", True),
        ("cmdline-intremap-nopost", True), ("kvm-apicv", True),
        ("kvm-device-posted-irqs", True)]
    cap = posting.check("iommu-posting-capability")
    assert cap is not None
    assert [(e.source, e.value) for e in cap.evidence] == [
        ("/sys/class/iommu/dmar0/intel-iommu/cap", "c9de008cee690462"),
        ("/sys/class/iommu/dmar1/intel-iommu/cap", "c9de008cee690462")]
    assert all("bit 59 (posted interrupts) = 1" in e.meaning for e in cap.evidence)
    apicv = posting.check("kvm-apicv")
    assert apicv is not None
    assert (apicv.evidence[0].source, apicv.evidence[0].value) == (
        "/sys/module/kvm_intel/parameters/enable_apicv", "Y")
    device_posted = posting.check("kvm-device-posted-irqs")
    assert device_posted is not None
    assert device_posted.evidence[0].value == "(absent)"  # 6.12 predates the parameter
    assert "before 6.16" in device_posted.summary


def test_intel_posting_devices() -> None:
    report = preflight(HOSTS / "intel-posting", ["0000:55:00.0", "00:1f.6"], kvm_usable)
    reader, nic = report.devices
    assert reader.verdict == DeviceVerdict.POSTED_POSSIBLE
    assert reader.line == "posted possible"
    assert reader.device is not None
    assert reader.device.ids == "10ec:525a"
    assert reader.device.driver == "rtsx_pci"
    assert reader.device.iommu_group == "18"
    assert reader.group_devices == ()
    assert (reader.device.msi.msi_vectors, reader.device.msi.msix_vectors) == (1, None)

    assert nic.bdf == "0000:00:1f.6"
    assert nic.verdict == DeviceVerdict.CANNOT_ASSIGN
    assert nic.device is not None and nic.device.in_use == ()  # up, but no address or route
    assert [o.bdf for o in nic.group_devices] == ["0000:00:1f.0", "0000:00:1f.4",
                                                   "0000:00:1f.5"]
    assert nic.reasons == (
        "IOMMU group 17 also holds 0000:00:1f.4 bound to i801_smbus; VFIO needs every group "
        "member on vfio-pci, unbound, or a bridge on pcieport",
        "IOMMU group 17 also holds 0000:00:1f.5 bound to intel-spi; VFIO needs every group "
        "member on vfio-pci, unbound, or a bridge on pcieport")
    assert nic.line.startswith("cannot assign: IOMMU group 17 also holds 0000:00:1f.4")


def test_intremap_nopost_variant(tmp_path: Path) -> None:
    root = copy_host("intel-posting", tmp_path)
    append_cmdline(root, "intremap=nosid,nopost")
    posting = probe_iommu(root).posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    check = posting.check("cmdline-intremap-nopost")
    assert check is not None and check.ok is False
    assert values(check.evidence) == ["intremap=nosid,nopost"]
    assert posting.reason == "intremap=nopost disables interrupt posting"
    device = preflight(root, ["0000:55:00.0"], kvm_usable).devices[0]
    assert device.line == ("bounce only: the host cannot post interrupts: "
                           "intremap=nopost disables interrupt posting")


def test_apicv_off_variant(tmp_path: Path) -> None:
    root = copy_host("intel-posting", tmp_path)
    (root / "sys/module/kvm_intel/parameters/enable_apicv").write_text("N\n")
    check = probe_iommu(root).posting.check("kvm-apicv")
    assert check is not None and check.ok is False
    assert check.summary == "kvm_intel.enable_apicv=N: KVM never posts without APICv"


def test_kvm_intel_not_loaded_variant(tmp_path: Path) -> None:
    root = copy_host("intel-posting", tmp_path)
    shutil.rmtree(root / "sys/module/kvm_intel")
    posting = probe_iommu(root).posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    assert "kvm_intel is not loaded" in posting.reason


def test_enable_device_posted_irqs_variant(tmp_path: Path) -> None:
    root = copy_host("intel-posting", tmp_path)
    param = root / "sys/module/kvm_intel/parameters/enable_device_posted_irqs"
    param.write_text("N\n")
    posting = probe_iommu(root).posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    check = posting.check("kvm-device-posted-irqs")
    assert check is not None and check.ok is False
    assert (check.evidence[0].source, check.evidence[0].value) == (
        "/sys/module/kvm_intel/parameters/enable_device_posted_irqs", "N")

    # 6.16+: Y means KVM found IRQ_POSTING_CAP when it loaded, even if the boot lines that
    # would show remapping and cap bit 59 have left the kernel log.
    param.write_text("Y\n")
    (root / "dmesg.txt").write_text("")
    for unit in ("dmar0", "dmar1"):
        (root / f"sys/class/iommu/{unit}/intel-iommu/cap").unlink()
    posting = probe_iommu(root).posting
    assert posting.verdict == PostingVerdict.POSSIBLE
    remap = posting.check("remapping")
    assert remap is not None and "implied by enable_device_posted_irqs=Y" in remap.summary


def test_dmar_caps_from_the_kernel_log_variant(tmp_path: Path) -> None:
    root = copy_host("intel-posting", tmp_path)
    shutil.rmtree(root / "sys/class/iommu")
    report = probe_iommu(root)
    cap = report.posting.check("iommu-posting-capability")
    assert cap is not None and cap.ok is True
    assert [(e.source, e.value) for e in cap.evidence] == [
        ("dmesg", "[    1.448242] DMAR: dmar0: reg_base_addr fc800000 ver 7:0 "
                  "cap c9de008cee690462 ecap 12ca9a00f0ef5e"),
        ("dmesg", "[    1.448249] DMAR: dmar1: reg_base_addr fc801000 ver 7:0 "
                  "cap c9de008cee690462 ecap 12ca9a00f0efde")]


# --- Intel: no posting ----------------------------------------------------------------------


def test_intel_nopost_host() -> None:
    report = probe_iommu(HOSTS / "intel-nopost")
    assert report.vendor.value == IommuVendor.INTEL
    assert report.enabled.value is True
    assert [(u.name, u.posting_capable) for u in report.units] == [
        ("dmar0", False), ("dmar1", False)]
    assert report.remapping.value is False
    assert report.remapping.evidence[0].value.endswith(
        "vfio_iommu_type1_attach_group: No interrupt remapping support.  Use the module "
        "param \"allow_unsafe_interrupts\" to enable VFIO IOMMU support on this platform")
    posting = report.posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    cap = posting.check("iommu-posting-capability")
    assert cap is not None and cap.ok is False
    assert values(cap.evidence) == ["1c0000c40660462", "d2008c40660462"]
    assert all("bit 59 (posted interrupts) = 0" in e.meaning for e in cap.evidence)
    assert posting.reason == (
        "interrupt remapping is off; DMAR cap bit 59 (posted interrupts) is clear on dmar0, "
        "dmar1; posting needs it on every DRHD")
    assert [(e.value, e.meaning) for e in report.notes] == [
        ("intel_iommu=on", "set on the kernel command line"),
        ("iommu=pt", "set on the kernel command line")]


def test_intel_nopost_device() -> None:
    device = preflight(HOSTS / "intel-nopost", ["0000:00:02.0"], kvm_usable).devices[0]
    assert device.verdict == DeviceVerdict.BOUNCE_ONLY
    assert device.line.startswith("bounce only: the host cannot post interrupts: "
                                  "interrupt remapping is off")
    assert device.device is not None
    assert device.device.ids == "8086:????"  # the source does not give the device ID
    assert not device.device.msi.known


# --- AMD ------------------------------------------------------------------------------------


def test_amd_avic_host() -> None:
    report = probe_iommu(HOSTS / "amd-avic")
    assert report.vendor.value == IommuVendor.AMD
    assert report.enabled.value is True
    (unit,) = report.units
    assert (unit.name, unit.features, unit.posting_capable) == (
        "ivhd0", 0x246577EFA2254AFA, True)
    assert "GA_vAPIC (bit 21) = 1" in unit.evidence[0].meaning
    assert report.remapping.value is True
    assert values(report.remapping.evidence) == [
        "[    0.425355] AMD-Vi: Interrupt remapping enabled"]
    assert report.remapping_mode.value == "xapic"  # this EFR has no X2APIC bit
    posting = report.posting
    assert posting.verdict == PostingVerdict.POSSIBLE
    assert [(c.name, c.ok) for c in posting.checks] == [
        ("remapping", True), ("iommu-posting-capability", True),
        ("cmdline-amd_iommu_intr-legacy", True), ("kvm-avic", True),
        ("kvm-device-posted-irqs", True)]
    vapic = posting.check("iommu-posting-capability")
    assert vapic is not None
    assert "[    0.529957] AMD-Vi: Virtual APIC enabled" in values(vapic.evidence)
    avic = posting.check("kvm-avic")
    assert avic is not None
    assert values(avic.evidence) == ["Y", "[    0.952840] kvm_amd: AVIC enabled"]


def test_amd_avic_devices() -> None:
    report = preflight(HOSTS / "amd-avic", ["0000:01:00.0", "0000:06:00.0"], kvm_usable)
    gpu, igpu = report.devices
    assert gpu.verdict == DeviceVerdict.CANNOT_ASSIGN
    assert gpu.reasons[0].startswith("IOMMU group 13 also holds 0000:01:00.1 bound to "
                                     "snd_hda_intel")
    assert igpu.verdict == DeviceVerdict.UNKNOWN
    assert igpu.line == ("posting unknown: MSI/MSI-X capability unknown: config space "
                         "unreadable")


def test_amd_x2apic_mode_variant(tmp_path: Path) -> None:
    # The line as a B550/Zen 3 host printed it right after "Interrupt remapping enabled"
    # (a published lab-host manifest, "zhulong").
    root = copy_host("amd-avic", tmp_path)
    dmesg = root / "dmesg.txt"
    dmesg.write_text(dmesg.read_text().replace(
        "[    0.425355] AMD-Vi: Interrupt remapping enabled\n",
        "[    0.425355] AMD-Vi: Interrupt remapping enabled\n"
        "[    0.458002] AMD-Vi: X2APIC enabled\n"))
    mode = probe_iommu(root).remapping_mode
    assert mode.value == "x2apic"
    assert values(mode.evidence) == ["[    0.458002] AMD-Vi: X2APIC enabled"]


@pytest.mark.parametrize(("change", "check", "summary"), [
    ("avic=N", "kvm-avic", "kvm_amd.avic is off: KVM never posts without AVIC"),
    ("legacy", "cmdline-amd_iommu_intr-legacy",
     "amd_iommu_intr=legacy turns GA (posting) mode off"),
    ("no-vapic", "iommu-posting-capability",
     "AMD-Vi did not enable Virtual APIC (legacy interrupt remapping)"),
    ("no-kvm_amd", "kvm-avic", "kvm_amd is not loaded"),
])
def test_amd_no_posting_variants(tmp_path: Path, change: str, check: str,
                                 summary: str) -> None:
    root = copy_host("amd-avic", tmp_path)
    if change == "avic=N":
        (root / "sys/module/kvm_amd/parameters/avic").write_text("N\n")
        dmesg = root / "dmesg.txt"
        dmesg.write_text(dmesg.read_text().replace("kvm_amd: AVIC enabled\n", ""))
    elif change == "legacy":
        append_cmdline(root, "amd_iommu_intr=legacy")
    elif change == "no-vapic":
        dmesg = root / "dmesg.txt"
        dmesg.write_text(dmesg.read_text().replace(
            "[    0.529957] AMD-Vi: Virtual APIC enabled\n", ""))
    else:
        shutil.rmtree(root / "sys/module/kvm_amd")
    posting = probe_iommu(root).posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    found = posting.check(check)
    assert found is not None and found.ok is False
    assert found.summary == summary
    assert found.evidence


# --- Arm ------------------------------------------------------------------------------------


def test_arm_gicv4_disabled_host() -> None:
    report = probe_iommu(HOSTS / "arm-gicv4")
    assert report.arch == "aarch64"
    assert report.vendor.value == IommuVendor.ARM_SMMU
    assert values(report.vendor.evidence)[0] == (
        "[    9.948836] arm-smmu-v3 arm-smmu-v3.5.auto: option mask 0x0")
    assert report.enabled.value is True
    assert len(report.groups) == 10
    assert report.remapping.value is True
    assert report.remapping_mode.value == "its"
    posting = report.posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    assert [(c.name, c.ok) for c in posting.checks] == [
        ("its", True), ("gicv4-hardware", True), ("kvm-gicv4", False)]
    hardware = posting.check("gicv4-hardware")
    assert hardware is not None
    assert "[    0.000000] ITS@0x0000000022040000: Using GICv4.1 mode 00000000 00000001" in \
        values(hardware.evidence)
    kvm = posting.check("kvm-gicv4")
    assert kvm is not None
    assert values(kvm.evidence) == ["[    9.842650] kvm [1]: GICv4 support disabled"]
    assert posting.reason == ("KVM has GICv4 direct injection disabled (it is off by default: "
                              "boot with kvm-arm.vgic_v4_enable=1)")
    assert [e.value for e in report.notes] == ["iommu.passthrough=1"]


def test_arm_gicv4_enabled_variant(tmp_path: Path) -> None:
    root = copy_host("arm-gicv4", tmp_path)
    dmesg = root / "dmesg.txt"
    dmesg.write_text(dmesg.read_text().replace("kvm [1]: GICv4 support disabled",
                                               "kvm [1]: GICv4 support enabled"))
    append_cmdline(root, "kvm-arm.vgic_v4_enable=1")
    posting = probe_iommu(root).posting
    assert posting.verdict == PostingVerdict.POSSIBLE
    kvm = posting.check("kvm-gicv4")
    assert kvm is not None and kvm.ok is True
    assert values(kvm.evidence) == ["[    9.842650] kvm [1]: GICv4 support enabled",
                                    "kvm-arm.vgic_v4_enable=1"]


def test_arm_devices_in_use() -> None:
    report = preflight(HOSTS / "arm-gicv4", ["0002:01:00.0", "0006:01:00.0"], kvm_usable)
    nic, nvme = report.devices
    assert nic.verdict == DeviceVerdict.CANNOT_ASSIGN
    assert nic.line == ("cannot assign: in use by the host: eth0 is up with addresses "
                        "2401:db00:209c:171e:face:0:172:0/64")
    assert nvme.verdict == DeviceVerdict.CANNOT_ASSIGN
    assert nvme.line == "cannot assign: in use by the host: /dev/nvme0n1p3 is mounted on /"
    assert nvme.device is not None
    (use,) = nvme.device.in_use
    assert (use.kind, use.name) == ("block", "nvme0n1")
    assert values(use.evidence) == ["259:3 /dev/nvme0n1p3 /"]


# --- no IOMMU (this machine, recorded) ------------------------------------------------------


def test_no_iommu_host() -> None:
    report = probe_iommu(HOSTS / "no-iommu")
    assert report.vendor.value == IommuVendor.NONE
    assert values(report.vendor.evidence) == ["(empty)", "(no DMAR, AMD-Vi or arm-smmu lines)"]
    assert report.enabled.value is False
    assert report.units == () and report.groups == ()
    assert report.remapping.value is False
    assert values(report.remapping.evidence) == [
        "28: PCI-MSIX-0000:00:01.0   0-edge      virtio0-config"]
    assert report.remapping_mode.value is None
    assert report.remapping_mode.evidence == report.remapping.evidence
    assert report.posting.verdict == PostingVerdict.NOT_POSSIBLE
    assert report.posting.reason == ("no IOMMU: posting needs an IOMMU that remaps "
                                     "interrupts")


def test_no_iommu_tcg_only_summary() -> None:
    report = preflight(HOSTS / "no-iommu", ["0000:00:03.0", "0000:00:02.0", "0000:00:00.0"],
                       kvm_unusable)
    assert report.accel.accel == "tcg"
    assert report.summary == ("TCG only: no usable KVM (test: KVM cannot run a guest); "
                              "no IOMMU; posting not possible")
    assert ("/sys/module/kvm_pvm", "(loaded)") in [
        (e.source, e.value) for e in report.accel.evidence]
    assert "[    0.000000] Hypervisor detected: KVM" in values(report.accel.evidence)
    net, blk, bridge = report.devices
    assert net.verdict == blk.verdict == bridge.verdict == DeviceVerdict.CANNOT_ASSIGN
    assert net.reasons == (
        "the IOMMU is off (no IOMMU groups): VFIO cannot take any device",
        "in use by the host: eth0 is up with addresses 192.0.2.2/24, fd00::2/64 and routes "
        "default via 192.0.2.1, 192.0.2.0/24, fd00::/64, default via fd00::1")
    assert blk.reasons[1] == "in use by the host: /dev/vda is mounted on /"
    assert net.device is not None and net.device.msi.msix_vectors == 3
    assert bridge.device is not None and bridge.device.msi.detail == (
        "no capability list: INTx only")


def test_recorded_host_is_not_probed() -> None:
    report = preflight(HOSTS / "no-iommu")
    assert (report.accel.accel, report.accel.kvm_usable) == ("unknown", None)
    assert report.summary.startswith("KVM not probed")


def test_in_use_without_ip_command_output_variant(tmp_path: Path) -> None:
    # Without `ip -j` output, /proc/net/if_inet6 and /proc/net/route still show use.
    root = copy_host("no-iommu", tmp_path)
    (root / "ip-addr.json").unlink()
    (root / "ip-route.json").unlink()
    device = read_pci_device("0000:00:03.0", HostView(root))
    (use,) = device.in_use
    assert use.reason == ("eth0 is up with addresses fd00:0000:0000:0000:0000:0000:0000:0002"
                          "/64 and routes 00000000, 000200C0")
    assert [e.source for e in use.evidence] == [
        "/sys/class/net/eth0/operstate", "/proc/net/if_inet6", "/proc/net/route"]


def test_block_holder_variant(tmp_path: Path) -> None:
    root = copy_host("no-iommu", tmp_path)
    (root / "proc/self/mountinfo").write_text("")
    (root / "proc/mounts").write_text("")
    holders = root / "sys/devices/pci0000:00/0000:00:02.0/virtio1/block/vda/holders"
    (holders / "dm-0").mkdir(parents=True)
    (use,) = read_pci_device("0000:00:02.0", HostView(root)).in_use
    assert use.reason == "/dev/vda is held by dm-0"


def test_unknown_device_and_bad_address() -> None:
    report = preflight(HOSTS / "no-iommu", ["0000:00:09.0", "not-a-bdf"], kvm_unusable)
    missing, bad = report.devices
    assert missing.line == ("cannot assign: no such PCI device "
                            "(/sys/bus/pci/devices/0000:00:09.0 does not exist)")
    assert bad.verdict == DeviceVerdict.CANNOT_ASSIGN
    assert "not a PCI address" in bad.reasons[0]


# --- MSI / MSI-X from config space ----------------------------------------------------------


def test_msix_table_size_from_real_config() -> None:
    config = (HOSTS / "no-iommu/sys/devices/pci0000:00/0000:00:03.0/config").read_bytes()
    msi = parse_msi_capability(config, "config")
    assert (msi.known, msi.msi_vectors, msi.msix_vectors) == (True, None, 3)
    assert [(e.value, e.meaning) for e in msi.evidence] == [
        ("cap 0x11 at 0x98, control 0x8002", "MSI-X, table size 3, enabled")]


def test_msi_vectors_from_real_config() -> None:
    path = "sys/devices/pci0000:00/0000:00:1c.0/0000:55:00.0/config"
    msi = parse_msi_capability((HOSTS / "intel-posting" / path).read_bytes(), "config")
    assert (msi.msi_vectors, msi.msix_vectors) == (1, None)
    assert msi.evidence[0].value == "cap 0x05 at 0x90, control 0x0081"


def test_unprivileged_config_read_is_unknown() -> None:
    # A reader without CAP_SYS_ADMIN gets the first 64 bytes of `config` only.
    config = (HOSTS / "no-iommu/sys/devices/pci0000:00/0000:00:03.0/config").read_bytes()
    msi = parse_msi_capability(config[:64], "config")
    assert not msi.known
    assert "64 bytes" in msi.detail


def test_bridge_cannot_be_assigned() -> None:
    view = HostView(HOSTS / "arm-gicv4")
    assign = check_assignable("0002:00:00.0", view, iommu_on=True)
    # A root port's sysfs directory holds its downstream devices: their use counts too.
    assert assign.reasons == (
        "it is a PCI bridge; VFIO does not assign bridges",
        "in use by the host: eth0 is up with addresses 2401:db00:209c:171e:face:0:172:0/64")


# --- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["intel-posting", "intel-nopost", "amd-avic", "arm-gicv4",
                                  "no-iommu"])
def test_table_and_json(name: str) -> None:
    root = HOSTS / name
    devices = list(HostView(root).listdir("/sys/bus/pci/devices"))
    report = preflight(root, devices, kvm_usable)
    text = format_preflight(report)
    assert report.summary in text
    assert f"posted interrupts: {report.iommu.posting.verdict.value}" in text
    for device in report.devices:
        assert device.line in text
    data = json.loads(json.dumps(preflight_to_dict(report)))
    assert data["posting"]["verdict"] == report.iommu.posting.verdict.value
    assert all(check["evidence"] for check in data["posting"]["checks"])
    assert [d["line"] for d in data["devices"]] == [d.line for d in report.devices]


# --- the virtual lab's emulated host (L1) ---------------------------------------------------


def test_lab_l1_host() -> None:
    if not LAB_L1_HOST.is_dir():
        pytest.skip(f"needs the recorded lab L1 host tree {LAB_L1_HOST} (not recorded yet)")
    report = preflight(LAB_L1_HOST, (), kvm_usable)
    iommu = report.iommu
    assert iommu.vendor.value == IommuVendor.INTEL
    assert iommu.enabled.value is True
    assert iommu.remapping.value is True
    assert iommu.remapping_mode.value == "xapic"
    assert iommu.posting.verdict == PostingVerdict.NOT_POSSIBLE
    cap = iommu.posting.check("iommu-posting-capability")
    assert cap is not None and cap.ok is False  # QEMU's emulated VT-d lacks cap bit 59
    assert any("bit 59 (posted interrupts) = 0" in e.meaning for e in cap.evidence)


def test_lab_l1_capture(tmp_path: Path) -> None:
    """The L1 boot log and /proc/interrupts from the lab capture, in a minimal tree."""
    dmesg = LAB_L1_CAPTURE / "l1-dmesg.txt"
    interrupts = LAB_L1_CAPTURE / "l1-interrupts-during.txt"
    if not (dmesg.is_file() and interrupts.is_file()):
        pytest.skip(f"needs the lab capture files {dmesg} and {interrupts}")
    root = tmp_path / "l1"
    (root / "proc").mkdir(parents=True)
    shutil.copy(dmesg, root / "dmesg.txt")
    first_sample: list[str] = []
    for line in interrupts.read_text().splitlines():
        if line.startswith("#"):
            if first_sample:
                break
            continue
        first_sample.append(line)
    (root / "proc/interrupts").write_text("\n".join(first_sample) + "\n")
    (root / "sys/module/kvm_amd/parameters").mkdir(parents=True)
    report = probe_iommu(root)
    assert report.vendor.value == IommuVendor.INTEL
    assert report.remapping.value is True and report.remapping_mode.value == "xapic"
    assert any(e.source == "/proc/interrupts" and "IR-PCI-MSI" in e.value
               for e in report.remapping.evidence)
    assert [(u.name, u.posting_capable) for u in report.units] == [("dmar0", False)]
    posting = report.posting
    assert posting.verdict == PostingVerdict.NOT_POSSIBLE
    assert [(c.name, c.ok) for c in posting.checks][:2] == [
        ("remapping", True), ("iommu-posting-capability", False)]
    apicv = posting.check("kvm-apicv")
    assert apicv is not None and apicv.ok is False
    assert "kvm_amd" in apicv.summary


# --- this machine ---------------------------------------------------------------------------


def test_this_machine() -> None:
    units = sorted(os.listdir("/sys/class/iommu")) if os.path.isdir("/sys/class/iommu") else []
    if units:
        pytest.skip(f"needs a host without an IOMMU; this one has /sys/class/iommu/{units[0]}")
    report = preflight()  # the real KVM probe (cached per boot)
    assert report.live
    assert report.iommu.vendor.value == IommuVendor.NONE
    assert report.iommu.enabled.value is False
    assert report.iommu.posting.verdict == PostingVerdict.NOT_POSSIBLE
    assert "no IOMMU" in report.summary
    # Whatever the probe finds here, the report must say it plainly.
    probe = kvm_probe()()
    assert report.accel.kvm_usable is probe.usable
    if probe.usable:
        assert report.summary.startswith("KVM usable")
    else:
        assert report.accel.accel == "tcg"
        assert report.summary.startswith(f"TCG only: no usable KVM ({probe.reason})")
        assert "accelerator: TCG only - " in format_preflight(report)
    json.dumps(preflight_to_dict(report))


def test_mounted_9p_share_variant(tmp_path: Path) -> None:
    # Like the lab's L1, whose root filesystem is L0's `/` over virtio-9p (tag hostroot):
    # the tag file and the mountinfo line are written here in the kernel's formats.
    root = copy_host("no-iommu", tmp_path)
    virtio = root / "sys/devices/pci0000:00/0000:00:04.0/virtio3"
    virtio.mkdir(parents=True)
    (virtio / "mount_tag").write_text("hostroot\x00")
    with (root / "proc/self/mountinfo").open("a") as fh:
        fh.write("42 27 0:50 / /mnt/root ro,relatime - 9p hostroot ro,access=client,"
                 "trans=virtio\n")
    (use,) = read_pci_device("0000:00:04.0", HostView(root)).in_use
    assert use.reason == "9p share 'hostroot' is mounted on /mnt/root"


@pytest.mark.parametrize("name", ["intel-posting", "intel-nopost", "amd-avic", "arm-gicv4",
                                  "no-iommu"])
def test_every_conclusion_has_evidence(name: str) -> None:
    report = preflight(HOSTS / name, HostView(HOSTS / name).listdir("/sys/bus/pci/devices"),
                       kvm_unusable)
    iommu = report.iommu
    for fact in (iommu.vendor, iommu.enabled, iommu.remapping, iommu.remapping_mode):
        assert fact.evidence, fact
    assert all(unit.evidence for unit in iommu.units)
    assert all(check.evidence for check in iommu.posting.checks)
    assert report.accel.evidence
    for device in report.devices:
        assert device.device is not None
        assert device.device.msi.evidence
        assert all(use.evidence for use in device.device.in_use)


def test_a_recording_of_this_host_reads_back_as_the_host(tmp_path: Path) -> None:
    """``harness preflight --record``: what preflight read live, it reads again from the
    recorded tree, with the same conclusions (the KVM probe aside: it runs only live)."""
    from harness.host.view import RecordingHostView

    no_probe = lambda: KvmProbe(False, "not probed in this test", 0.0)  # noqa: E731
    pci = sorted(os.listdir("/sys/bus/pci/devices"))[:2] if os.path.isdir(
        "/sys/bus/pci/devices") else []
    live = preflight(devices=pci, accel_probe=no_probe, view=RecordingHostView(tmp_path))
    again = preflight(tmp_path, devices=pci)
    assert live.live and not again.live
    assert again.iommu == live.iommu
    assert again.summary.split(";")[1:] == live.summary.split(";")[1:]
    assert [(d.bdf, d.verdict, d.reasons) for d in again.devices] == [
        (d.bdf, d.verdict, d.reasons) for d in live.devices]


ARM_LAB = DATA / "hosts" / "lab-l1-arm64"


def test_arm_lab_l1_with_gicv4_on_can_post() -> None:
    report = preflight(ARM_LAB / "gicv4-on", devices=["0000:00:05.0"])
    assert report.iommu.arch == "aarch64"
    assert report.iommu.vendor.value == IommuVendor.ARM_SMMU
    assert report.iommu.posting.verdict == PostingVerdict.POSSIBLE
    checks = {c.name: c for c in report.iommu.posting.checks}
    assert checks["gicv4-hardware"].ok and checks["kvm-gicv4"].ok and checks["its"].ok
    assert any("GICv4 support enabled" in e.value for e in checks["kvm-gicv4"].evidence)
    (device,) = report.devices
    assert device.device is not None and device.device.driver == "virtio-pci"
    assert device.device.msi.known and device.device.msi.msix_vectors == 4  # config, rx, tx, ctrl


def test_arm_lab_l1_with_gicv4_off_in_kvm_is_bounce_only_and_says_why() -> None:
    report = preflight(ARM_LAB / "gicv4-off", devices=["0000:00:05.0"])
    assert report.iommu.posting.verdict == PostingVerdict.NOT_POSSIBLE
    checks = {c.name: c for c in report.iommu.posting.checks}
    assert checks["gicv4-hardware"].ok is True  # the GIC can; KVM was told not to
    assert checks["kvm-gicv4"].ok is False
    shown = [(e.value, e.meaning) for e in checks["kvm-gicv4"].evidence]
    assert ("kvm-arm.vgic_v4_enable=0", "keeps GICv4 direct injection off in KVM") in shown
    assert "kvm-arm.vgic_v4_enable=1" in report.devices[0].reasons[0] or \
        "vgic_v4_enable" in report.devices[0].line
