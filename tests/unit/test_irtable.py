"""The IR-table witness: Intel's ir_translation_struct and AMD's irqtbl, joined to the trace.

No kernel on this project's machines has the IOMMU debugfs (Debian builds without
CONFIG_IOMMU_DEBUGFS, the labs boot Debian's kernels), so the tables below are constructed:
each line is written with the kernel's own format strings (drivers/iommu/intel/debugfs.c
``ir_tbl_remap_entry_show`` / ``ir_tbl_posted_entry_show``, drivers/iommu/amd/debugfs.c
``dump_irte`` / ``dump_128_irte``) from the field values named beside them, so a parser that
misreads a column fails here.  The trace records are this project's recorded kvm_pi_irte_update
format (tests/data/trace).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bypass.tracker import VectorWiring
from harness.config.model import DeliveryPath
from harness.host.irtable import (
    IrTableParseError,
    IrTableRead,
    parse_amd_irq_table,
    parse_intel_ir_table,
    read_ir_table,
)
from harness.hostside import join_ir_tables
from harness.verdict import classify


def intel_remap(idx: int, bus: int, dev: int, fn: int, dest: int, vector: int) -> str:
    # " %-5d %02x:%02x.%01x %08x %02x  %016llx\t%016llx\n"
    sid = bus << 8 | dev << 3 | fn
    high = sid
    low = dest << 32 | vector << 16 | 1
    return (f" {idx:<5d} {bus:02x}:{dev:02x}.{fn:01x} {dest:08x} {vector:02x}  "
            f"{high:016x}\t{low:016x}")


def intel_posted(idx: int, bus: int, dev: int, fn: int, pda: int, vector: int) -> str:
    # " %-5d %02x:%02x.%01x %08x %08x %02x  %016llx\t%016llx\n"
    sid = bus << 8 | dev << 3 | fn
    return (f" {idx:<5d} {bus:02x}:{dev:02x}.{fn:01x} {pda >> 32:08x} {pda & 0xFFFFFFC0:08x} "
            f"{vector:02x}  {(pda >> 32) << 32 | sid:016x}\t{vector << 16 | 0x8001:016x}")


def intel_table(remapped: list[str], posted: list[str], pi: bool = True) -> str:
    out = ["Remapped Interrupt supported on IOMMU: dmar0", " IR table address:100900000",
           " Entry SrcID   DstID    Vct IRTE_high\t\tIRTE_low", *remapped, "", "****", ""]
    if pi:
        out += ["Posted Interrupt supported on IOMMU: dmar0", " IR table address:100900000",
                " Entry SrcID   PDA_high PDA_low  Vct IRTE_high\t\tIRTE_low", *posted, ""]
    return "\n".join(out) + "\n"


def amd_ga(idx: int, guest_mode: bool, vector: int, dest: int) -> str:
    # "IRT[%04d] %016llx%016llx\n" (hi, lo): lo bit 0 valid, bit 7 guest mode, 8-31 destination
    lo = 1 | (1 << 7 if guest_mode else 0) | dest << 8
    return f"IRT[{idx:04d}] {vector:016x}{lo:016x}"


def wiring(bdf: str, entry: int, irq: int, posted: bool, gvec: int | None) -> VectorWiring:
    return VectorWiring(bdf=bdf, entry=entry, kind="msix", host_irq=irq, token=0x1000 + entry,
                        producer=True, consumer=True, connected=True, gsi=24 + entry,
                        posted=posted, vcpu=0 if posted else None,
                        guest_vector=gvec if posted else None)


def test_intel_table_reads_both_sections_by_source_id() -> None:
    text = intel_table([intel_remap(0, 0, 0x1f, 0, 0, 0x30), intel_remap(5, 0x3b, 0, 0, 2, 0x41)],
                       [intel_posted(6, 0x3b, 0, 0, 0x1_2345_6780, 0x22),
                        intel_posted(7, 0x3b, 0, 0, 0x1_2345_6780, 0x23)])
    table = parse_intel_ir_table(text)
    mine = table.for_source("0000:3b:00.0")
    assert [(e.index, e.posted, e.vector, e.destination) for e in mine] == [
        (5, False, 0x41, 2), (6, True, 0x22, None), (7, True, 0x23, None)]
    assert table.for_source("00:1f.0")[0].vector == 0x30
    assert {e.iommu for e in table.entries} == {"dmar0"}


def test_intel_table_without_remapping_is_a_note_and_garbage_is_refused() -> None:
    text = ("Remapped Interrupt supported on IOMMU: dmar0\nInterrupt Remapping is not enabled\n"
            "\n****\n\n")
    assert parse_intel_ir_table(text).notes == ("dmar0: interrupt remapping is not enabled",)
    with pytest.raises(IrTableParseError, match=r":4: not an IRTE line"):
        parse_intel_ir_table(intel_table(["  12 zz:00.0 0 0"], []))


def test_amd_ga_entries_tell_guest_mode_from_remapped() -> None:
    text = "\n".join(["DeviceId 0000:41:00:0", amd_ga(0, False, 0x25, 3), amd_ga(1, True, 0x22, 0),
                      ""]) + "\n"
    table = parse_amd_irq_table(text)
    assert [(e.source, e.index, e.posted, e.vector, e.destination) for e in table.entries] == [
        ("41:00.0", 0, False, 0x25, 3), ("41:00.0", 1, True, 0x22, None)]
    assert parse_amd_irq_table("Interrupt remapping is disabled\n").notes == (
        "Interrupt remapping is disabled",)


@pytest.mark.parametrize(("table_posted", "agrees"), [
    ([0x22, 0x23], True),   # every traced posted vector has its posted IRTE
    ([0x22], False),        # the trace posted 0x23, the IOMMU still remaps it
    ([0x22, 0x23, 0x24], False),  # a posted IRTE the trace never saw
])
def test_a_vector_is_posted_only_when_trace_and_table_agree(table_posted: list[int],
                                                            agrees: bool) -> None:
    bdf = "0000:3b:00.0"
    text = intel_table([intel_remap(5, 0x3b, 0, 0, 0, 0x41)],
                       [intel_posted(6 + i, 0x3b, 0, 0, 0x1_0000_0040, v)
                        for i, v in enumerate(table_posted)])
    traced = [wiring(bdf, 0, 40, False, None), wiring(bdf, 1, 41, True, 0x22),
              wiring(bdf, 2, 42, True, 0x23)]
    joined = join_ir_tables(traced, {bdf: IrTableRead(text, parse_intel_ir_table(text), "t")})
    assert all(w.state is not None and w.state.agrees is agrees for w in joined.wiring)
    assert bool(joined.anomalies) is not agrees
    path, reason = classify(False, 100, 0, joined.wiring[1].as_verdict_wiring())
    if agrees:
        assert path is DeliveryPath.POSTED and "the IR table agrees" in reason
    else:
        assert path is None and "the bypass trace and the kernel's IR table disagree" in reason


def test_a_host_without_the_iommu_debugfs_says_so(tmp_path: Path) -> None:
    read = read_ir_table("0000:00:05.0", tmp_path / "iommu")
    assert read.table is None and "CONFIG_IOMMU_DEBUGFS" in read.note
    joined = join_ir_tables([wiring("0000:00:05.0", 1, 30, True, 0x22)], {"0000:00:05.0": read})
    assert joined.wiring[0].state is None and joined.notes == (read.note,)


def test_amd_read_chooses_the_device_through_devid(tmp_path: Path) -> None:
    (tmp_path / "amd").mkdir()
    (tmp_path / "amd" / "devid").write_text("")
    (tmp_path / "amd" / "irqtbl").write_text(
        "DeviceId 0000:41:00:0\n" + amd_ga(3, True, 0x31, 0) + "\n")
    read = read_ir_table("0000:41:00.0", tmp_path)
    assert (tmp_path / "amd" / "devid").read_text() == "0000:41:00.0"
    assert read.table is not None and read.table.entries[0].vector == 0x31
