"""The /proc/interrupts parser against recorded real text (tests/data/interrupts/README.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.interrupts import (
    InterruptSnapshot,
    InterruptsParseError,
    IrqLine,
    VectorId,
    decode_pci_msi_hwirq,
    format_table,
    normalize_bdf,
    parse_proc_interrupts,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "interrupts"
ALL_FILES = sorted(p.name for p in DATA.glob("*.txt"))


def load(name: str) -> InterruptSnapshot:
    return parse_proc_interrupts((DATA / name).read_text(), source=name)


def line(snap: InterruptSnapshot, label: str) -> IrqLine:
    found = snap.by_label(label)
    assert found is not None, f"{snap.source}: no row {label}"
    return found


def by_cpu(snap: InterruptSnapshot, row: IrqLine) -> dict[str, int]:
    return {cpu: n for cpu, n in zip(snap.cpus, row.counts, strict=True) if n}


# --- every recorded file -------------------------------------------------------------------


def test_there_are_enough_recordings() -> None:
    assert len(ALL_FILES) >= 6


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_recording_parses_with_one_count_per_cpu(name: str) -> None:
    snap = load(name)
    assert snap.cpus and all(re.fullmatch(r"CPU\d+", c) for c in snap.cpus)
    assert snap.lines
    for row in snap.lines:
        if not row.is_arch:
            assert len(row.counts) == len(snap.cpus)
            assert row.chip
        else:
            assert 1 <= len(row.counts) <= len(snap.cpus)
            assert row.chip is None and row.vector is None


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_readme_row_names_its_file(name: str) -> None:
    assert f"`{name}`" in (DATA / "README.md").read_text()


# --- this machine (L0) ---------------------------------------------------------------------


def test_l0_host_per_device_msix_and_single_count_rows() -> None:
    snap = load("host-l0-debian12.txt")
    assert snap.cpus == ("CPU0", "CPU1")
    req = line(snap, "36")
    assert req.counts == (0, 34462)
    assert req.chip == "PCI-MSIX-0000:00:02.0" and req.hwirq == 1 and req.trigger == "edge"
    assert req.actions == ("virtio1-req.0",)
    assert req.vector == VectorId("0000:00:02.0", 1, "msix")
    assert not req.is_remapped
    serial = line(snap, "26")
    assert (serial.chip, serial.hwirq, serial.counts, serial.vector) == ("IO-APIC", 4, (0, 15),
                                                                          None)
    for name in ("ERR", "MIS"):
        row = snap.arch_row(name)
        assert row is not None and row.counts == (0,) and row.description == ""
    for name in ("PIN", "NPI", "PIW"):
        row = snap.arch_row(name)
        assert row is not None and row.counts == (0, 0)
    assert line(snap, "PIN").description == "Posted-interrupt notification event"
    assert line(snap, "HYP").counts == (90, 29)
    assert [ln.vector.entry for ln in snap.for_device("00:04.0") if ln.vector] == [0, 1, 2, 3]


# --- x86 hosts with VFIO -------------------------------------------------------------------


def test_intel_host_per_device_vfio_msix_and_posted_counters() -> None:
    snap = load("x86-intel-host-vfio-msix-6x.txt")
    assert len(snap.cpus) == 32
    vfio = snap.for_device("0000:03:00.0")
    assert [ln.label for ln in vfio] == ["127", "130", "131", "132", "133", "134", "135",
                                         "136", "137"]
    assert all(ln.is_remapped and ln.chip == "IR-PCI-MSIX-0000:03:00.0" for ln in vfio)
    six = line(snap, "135")
    assert six.actions == ("vfio-msix[6](0000:03:00.0)",)
    assert six.vector == VectorId("0000:03:00.0", 6, "msix") and six.hwirq == 6
    assert by_cpu(snap, six) == {"CPU16": 2262612}
    pin = snap.arch_row("PIN")
    assert pin is not None and pin.total == 203032
    assert by_cpu(snap, pin)["CPU8"] == 83397 and by_cpu(snap, pin)["CPU10"] == 91270
    assert line(snap, "PIW").total == 0 and line(snap, "NPI").total == 0
    assert line(snap, "ERR").counts == (0,) and line(snap, "MIS").counts == (0,)
    bare = line(snap, "16")  # an IO-APIC pin that fired with no handler left
    assert (bare.chip, bare.hwirq, bare.trigger, bare.actions) == ("IR-IO-APIC", 16, "fasteoi", ())
    assert line(snap, "27").actions == ("idma64.0", "i2c_designware.0")
    assert line(snap, "186").vector == VectorId("0000:00:14.0", 0, "msi")


def test_intel_host_posted_rows_from_notes_at_full_width() -> None:
    snap = load("x86-intel-host-vfio-posted-c8-excerpt.txt")
    assert len(snap.cpus) == 128
    rows = snap.for_device("0000:c8:00.0")
    assert [ln.vector.entry for ln in rows if ln.vector] == [0, 1, 2, 3, 4]
    assert all(ln.total == 0 for ln in rows)  # posted: the host never saw them


def test_shared_ir_pci_msi_domain_hwirq_decodes_to_bdf_and_entry() -> None:
    snap = load("x86-intel-host-vfio-nvme-4x.txt")  # blank lines between rows are skipped
    assert len(snap.cpus) == 20 and len(snap.lines) == 14
    vfio = line(snap, "128")
    assert (vfio.chip, vfio.hwirq, vfio.trigger) == ("IR-PCI-MSI", 1572865, "edge")
    assert vfio.vector == VectorId("0000:03:00.0", 1, "msix")
    assert decode_pci_msi_hwirq(1572865) == ("0000:03:00.0", 1)
    assert by_cpu(snap, vfio) == {"CPU1": 1}
    # The ahci driver puts its own BDF in the name: the hwirq decode must agree.
    ahci = line(snap, "125")
    assert ahci.actions == ("ahci[0000:00:17.0]",)
    assert ahci.vector == VectorId("0000:00:17.0", 0, "msi-or-msix")
    assert line(snap, "124").counts[2] == 4532075
    assert line(snap, "123").actions == ("PCIe PME", "aerdrv", "pcie-dpc")
    dmar = line(snap, "120")
    assert (dmar.chip, dmar.hwirq, dmar.vector) == ("DMAR-MSI", 0, None)


def test_2015_host_old_joined_chip_flow_era() -> None:
    snap = load("x86-host-2015-ir-pci-msi-edge.txt")
    assert len(snap.cpus) == 8
    vfio = line(snap, "45")
    assert (vfio.chip, vfio.hwirq, vfio.trigger) == ("IR-PCI-MSI", None, "edge")
    assert vfio.counts[0] == 2316334 and vfio.total == 2316334
    assert vfio.vector == VectorId("0000:07:00.0", 0, "msi")
    # Same file, already the new style for some IO-APIC pins.
    usb = line(snap, "16")
    assert (usb.chip, usb.hwirq, usb.trigger, usb.actions) == ("IR-IO-APIC", 16, "fasteoi",
                                                               ("ehci_hcd:usb5",))
    assert line(snap, "24").chip == "DMAR_MSI"
    assert line(snap, "7").actions == ()
    sata = line(snap, "39")  # the action is a PCI name, but without a hwirq nothing decodes
    assert sata.actions == ("0000:00:1f.2",) and sata.vector is None
    assert line(snap, "ERR").counts == (37,) and line(snap, "MIS").counts == (0,)
    assert snap.arch_row("PIN") is None
    assert snap.device_lines() == (vfio,)


def test_amd_host_ga_log_irq_and_pin_rows() -> None:
    snap = load("x86-amd-host-6.18.txt")
    assert len(snap.cpus) == 16
    ga = line(snap, "27")
    assert (ga.chip, ga.hwirq, ga.actions, ga.vector) == ("IOMMU-MSI", 384, ("AMD-Vi0-GA",),
                                                          None)
    bridge = line(snap, "28")
    assert bridge.chip == "IR-PCI-MSI-0000:00:01.1"
    assert bridge.actions == ("PCIe PME", "PCIe bwctrl")
    assert bridge.vector == VectorId("0000:00:01.1", 0, "msi")
    gpio = line(snap, "81")
    assert (gpio.chip, gpio.hwirq, gpio.trigger, gpio.actions) == ("amd_gpio", 89, None,
                                                                   ("ELAN06FA:00",))
    assert len(snap.for_device("05:00.0")) == 17  # nvme1q0..q16
    assert line(snap, "66").vector == VectorId("0000:05:00.0", 10, "msix")
    for name in ("PIN", "NPI", "PIW"):
        row = snap.arch_row(name)
        assert row is not None and len(row.counts) == 16 and row.total == 0
    assert line(snap, "LOC").counts[0] == 121036793


# --- arm64 ---------------------------------------------------------------------------------


def test_arm64_its_msi_hwirq_is_the_pci_encoding_not_an_lpi() -> None:
    snap = load("arm64-guest-its-msi.txt")
    timer = line(snap, "2")
    assert (timer.chip, timer.hwirq, timer.trigger, timer.actions) == ("GICv3", 27, "Level",
                                                                       ("arch_timer",))
    assert timer.total == 1020348 + 924296 + 763104 + 823621
    assert line(snap, "43").chip == "pl061"
    # The source's `ls /sys/bus/pci/devices/0000:04:00.0/msi_irqs` printed "56 57 58".
    assert [ln.label for ln in snap.for_device("04:00.0")] == ["56", "57", "58"]
    rx = line(snap, "57")
    assert rx.vector == VectorId("0000:04:00.0", 1, "msi-or-msix") and rx.counts[0] == 186776
    assert line(snap, "52").vector == VectorId("0000:03:00.0", 3, "msi-or-msix")
    assert line(snap, "47").vector == VectorId("0000:00:01.3", 0, "msi-or-msix")
    assert [ln.label for ln in snap.lines if ln.is_arch] == [f"IPI{i}" for i in range(7)]
    ipi0 = line(snap, "IPI0")
    assert ipi0.counts == (35739, 68329, 56984, 48197)
    assert ipi0.description == "Rescheduling interrupts"


def test_arm64_per_device_its_pci_msix_domain() -> None:
    snap = load("arm64-guest-its-pci-msix-excerpt.txt")
    rx = line(snap, "62")
    assert rx.chip == "ITS-PCI-MSIX-0000:00:03.0" and rx.trigger == "Edge"
    assert rx.vector == VectorId("0000:00:03.0", 1, "msix")
    assert rx.counts == (867413, 0, 0, 262)
    assert [ln.vector.entry for ln in snap.for_device("0000:00:01.0") if ln.vector] == [
        0, 1, 2, 3, 4, 5, 6]


def test_arm64_xen_rows_with_trigger_word_and_flow_but_no_hwirq() -> None:
    snap = load("arm64-xen-dom0-before.txt")
    console = line(snap, "35")
    assert (console.chip, console.hwirq, console.trigger, console.actions) == (
        "xen-dyn", None, "Edge", ("hvc_console",))
    assert line(snap, "42").chip == "xen-dyn-lateeoi"
    assert line(snap, "15").chip == "RC-Event" and line(snap, "15").hwirq == 0
    assert line(snap, "37").vector == VectorId("0000:01:00.0", 0, "msi-or-msix")
    assert line(snap, "Err").counts == (0,)


# --- guests and other arches ---------------------------------------------------------------


def test_x86_kvm_guest_shared_pci_msi_and_two_actions_on_one_pin() -> None:
    snap = load("x86-kvm-guest-4.19.txt")
    assert snap.cpus == ("CPU0",)
    assert line(snap, "11").actions == ("uhci_hcd:usb1", "virtio3")
    rx = line(snap, "25")
    assert rx.vector == VectorId("0000:00:03.0", 1, "msi-or-msix") and rx.counts == (705063,)
    assert line(snap, "LOC").counts == (861860291,)
    assert line(snap, "PIN").counts == (0,) and line(snap, "ERR").counts == (0,)


def test_guest_msi_hwirq_carries_the_pci_domain() -> None:
    snap = load("x86-guest-nemu-pci-segment-excerpt.txt")
    misc = line(snap, "9")
    assert misc.actions == ("i40e-0001:00:0f.0:misc",)
    assert misc.vector == VectorId("0001:00:0f.0", 0, "msi-or-msix")
    assert line(snap, "5").vector == VectorId("0001:00:00.0", 0, "msi-or-msix")
    assert line(snap, "8").vector == VectorId("0000:00:01.0", 1, "msi-or-msix")


def test_action_names_may_contain_spaces() -> None:
    snap = load("x86-guest-acrn-iwlwifi-excerpt.txt")
    assert line(snap, "5").actions == ("iwlwifi: default queue",)
    assert line(snap, "8").actions == ("iwlwifi: exception",)
    assert line(snap, "8").vector == VectorId("0000:00:0b.0", 3, "msi-or-msix")


def test_ppc64_prints_loc_twice() -> None:
    snap = load("ppc64-guest-xive.txt")
    locs = [ln for ln in snap.lines if ln.label == "LOC"]
    assert [ln.description for ln in locs] == ["Local timer interrupts for timer event device",
                                               "Local timer interrupts for others"]
    assert line(snap, "LOC").counts == (2236,)  # lookups give the first
    npu = line(snap, "19")
    assert (npu.chip, npu.hwirq, npu.trigger, npu.actions) == ("XIVE-IRQ", 4610, "Level",
                                                               ("NPU Device",))
    assert snap.device_lines() == ()
    delta = snap.delta(snap)
    assert [r.status for r in delta.by_label("LOC")] == ["both", "both"]


def test_lines_quoted_in_the_notes() -> None:
    l1 = load("notes-virtual-lab-l1-host.txt")
    host = line(l1, "26")
    assert host.counts == (199, 0) and host.is_remapped
    assert host.vector == VectorId("0000:00:05.0", 1, "msix")
    assert decode_pci_msi_hwirq(81921) == ("0000:00:05.0", 1)
    l2 = load("notes-virtual-lab-l2-guest.txt")
    assert line(l2, "25").vector == VectorId("0000:00:01.0", 1, "msi-or-msix")
    arch = load("notes-posted-arch-rows.txt")
    assert line(arch, "PIN").counts == (0, 0, 0, 418)
    assert line(arch, "PIW").total == 0 and line(arch, "NPI").total == 0
    pmn = load("x86-posted-msi-pmn-excerpt.txt")
    assert line(pmn, "PMN").counts == (13868907,)
    assert line(pmn, "PMN").description == "Posted MSI notification event"


# --- deltas --------------------------------------------------------------------------------


def bump(text: str, label: str, cpu_index: int, by: int) -> str:
    """The same real text with one count raised, as a later read would show it."""
    out = []
    for raw in text.splitlines():
        m = re.match(r"(\s*" + re.escape(label) + r":)(.*)", raw)
        if m:
            cells = re.split(r"(\s+)", m.group(2))
            numbers = [i for i, c in enumerate(cells) if c.isdigit()]
            i = numbers[cpu_index]
            cells[i] = str(int(cells[i]) + by).rjust(len(cells[i]))
            raw = m.group(1) + "".join(cells)
        out.append(raw)
    return "\n".join(out) + "\n"


def test_delta_counts_only_what_moved() -> None:
    text = (DATA / "x86-kvm-guest-4.19.txt").read_text()
    before = parse_proc_interrupts(text, "before", taken_at=10.0)
    after = parse_proc_interrupts(bump(bump(text, "25", 0, 201), "LOC", 0, 1000), "after",
                                  taken_at=12.5)
    delta = before.delta(after)
    assert delta.elapsed == 2.5
    assert all(r.status == "both" and not r.reset for r in delta.rows)
    assert [(r.label, r.per_cpu, r.total) for r in delta.changed()] == [
        ("25", (201,), 201), ("LOC", (1000,), 1000)]
    assert [r.total for r in delta.for_device("0000:00:03.0")] == [0, 201, 0]


def test_delta_reused_numbers_appear_and_vanish_and_counter_drops_reset() -> None:
    before = load("arm64-xen-dom0-before.txt")
    after = load("arm64-xen-dom0-after.txt")
    delta = before.delta(after)
    # IRQ 38 was sysmon-irq and is now nvme0q1; 40 the other way round.
    assert [(r.status, r.line.actions) for r in delta.by_label("38")] == [
        ("vanished", ("sysmon-irq",)), ("appeared", ("nvme0q1",))]
    assert [(r.status, r.line.actions) for r in delta.by_label("40")] == [
        ("vanished", ("nvme0q1",)), ("appeared", ("sysmon-irq",))]
    appeared = delta.by_label("39")[0]
    assert (appeared.status, appeared.per_cpu, appeared.total) == ("appeared", (0, 66), 66)
    vanished = delta.by_label("41")[0]
    assert (vanished.status, vanished.per_cpu, vanished.total) == ("vanished", (0, 0), 0)
    assert vanished.before is not None and vanished.after is None
    # The board rebooted: arch_timer went 18084 -> 4928 on CPU0.
    timer = delta.by_label("11")[0]
    assert timer.reset and timer.status == "both"
    assert timer.per_cpu == (4928, 3938) and timer.total == 8866
    assert all(r.total >= 0 and min(r.per_cpu) >= 0 for r in delta.rows)
    ipi1 = delta.by_label("IPI1")[0]
    assert not ipi1.reset and ipi1.per_cpu == (2513 - 1888, 2512 - 1458)
    nvme = [(r.label, r.status, r.total) for r in delta.for_device("01:00.0")]
    assert nvme == [("37", "both", 10), ("40", "vanished", 0), ("41", "vanished", 0),
                    ("38", "appeared", 48), ("39", "appeared", 66)]


def test_same_name_reallocated_with_lower_count_is_a_reset_not_negative() -> None:
    text = (DATA / "notes-virtual-lab-l1-host.txt").read_text()
    later = text.replace("26:   199     0", "26:     3     1")
    delta = parse_proc_interrupts(text).delta(parse_proc_interrupts(later))
    (row,) = delta.rows
    assert row.reset and row.status == "both"
    assert row.per_cpu == (3, 1) and row.total == 4


def test_cpu_columns_are_matched_by_name_when_a_cpu_goes_offline() -> None:
    before = parse_proc_interrupts(
        "           CPU0       CPU1       CPU2\n"
        " 26:        199          0          5  IR-PCI-MSI 81921-edge"
        "   vfio-msix[1](0000:00:05.0)\n")
    after = parse_proc_interrupts(
        "           CPU0       CPU2\n"
        " 26:        250          9  IR-PCI-MSI 81921-edge   vfio-msix[1](0000:00:05.0)\n")
    assert after.cpus == ("CPU0", "CPU2")  # names kept, gaps and all
    delta = before.delta(after)
    assert delta.cpus_changed and delta.cpus == ("CPU0", "CPU2")
    assert delta.rows[0].per_cpu == (51, 4)


def test_delta_to_dict_is_json_with_stable_keys() -> None:
    delta = load("arm64-xen-dom0-before.txt").delta(load("arm64-xen-dom0-after.txt"))
    data = delta.to_dict()
    assert list(data) == ["before", "after", "elapsed", "cpus", "cpus_changed", "rows"]
    rows = data["rows"]
    assert isinstance(rows, list)
    assert list(rows[0]) == ["label", "chip", "hwirq", "actions", "name", "vector", "status",
                             "reset", "per_cpu", "total"]
    text = json.dumps(data)
    assert json.loads(text) == data
    nvme = [r for r in rows if r["label"] == "38" and r["status"] == "appeared"][0]
    assert nvme["vector"] == {"bdf": "0000:01:00.0", "entry": 1, "kind": "msi-or-msix"}


def test_format_table_is_fixed_width_and_shows_notes() -> None:
    delta = load("arm64-xen-dom0-before.txt").delta(load("arm64-xen-dom0-after.txt"))
    table = format_table(delta)
    lines = table.splitlines()
    assert lines[0].split() == ["IRQ", "DEVICE", "ENTRY", "NAME", "CPU0", "CPU1", "TOTAL", "NOTE"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    row38 = [ln for ln in lines if ln.startswith("38 ") and "nvme0q1" in ln]
    assert row38 and row38[0].split() == ["38", "0000:01:00.0", "1", "nvme0q1", "48", "0", "48",
                                          "appeared"]
    assert any(ln.split()[-1] == "reset" and "arch_timer" in ln for ln in lines)
    # Columns line up: every total is right-aligned under the TOTAL header.
    end = lines[0].index("TOTAL") + len("TOTAL")
    for ln in lines[2:]:
        assert ln[end - 1].isdigit() and (len(ln) == end or ln[end] == " ")
    assert len(format_table(delta, changed_only=False).splitlines()) == len(delta.rows) + 2


def test_format_table_leaves_cpu_cells_empty_for_single_count_rows() -> None:
    snap = load("x86-host-2015-ir-pci-msi-edge.txt")
    later = parse_proc_interrupts(bump((DATA / "x86-host-2015-ir-pci-msi-edge.txt").read_text(),
                                       "ERR", 0, 2))
    table = format_table(snap.delta(later))
    err = [ln for ln in table.splitlines() if ln.startswith("ERR")]
    assert err and err[0].split() == ["ERR", "-", "-", "2"]


# --- helpers and errors --------------------------------------------------------------------


def test_normalize_bdf() -> None:
    assert normalize_bdf("00:1F.6") == "0000:00:1f.6"
    assert normalize_bdf("0001:00:0f.0") == "0001:00:0f.0"
    with pytest.raises(ValueError):
        normalize_bdf("not-a-bdf")


@pytest.mark.parametrize(("text", "line_no", "reason"), [
    ("", 1, "no CPU header"),
    ("\n\n", 1, "no CPU header"),
    ("Traceback (most recent call last):\n", 1, "CPU header"),
    ("           CPU0       CPU1\n  0:   3   IO-APIC   2-edge   timer\n", 2, "expected 2"),
    ("           CPU0\nhello world\n", 2, "LABEL"),
    ("           CPU0\n 25:     1   PCI-MSI 16385-edge   virtio0-input.0\n"
     " 25:     2   PCI-MSI 16385-edge   virtio0-input.0\n", 3, "twice"),
    ("           CPU0\n 25:     1\n", 2, "no irq chip"),
    ("           CPU0\n 25:     1     7   PCI-MSI 16385-edge   virtio0-input.0\n", 2,
     "more count columns"),
    ("           CPU0\nfoo: bar\n", 2, "no counts"),
    ("           CPU0\n$$$:  1  what\n", 2, "not an IRQ number"),
])
def test_garbage_raises_a_typed_error_with_source_and_line(text: str, line_no: int,
                                                           reason: str) -> None:
    with pytest.raises(InterruptsParseError) as info:
        parse_proc_interrupts(text, source="guest:/proc/interrupts")
    err = info.value
    assert isinstance(err, HarnessError) and err.exit_code == 2
    assert err.source == "guest:/proc/interrupts" and err.line == line_no
    assert reason in err.reason
    assert str(err).startswith(f"guest:/proc/interrupts:{line_no}: ")


def test_error_without_a_source_still_says_where() -> None:
    with pytest.raises(InterruptsParseError, match=r"^<text>:1: "):
        parse_proc_interrupts("bogus")
