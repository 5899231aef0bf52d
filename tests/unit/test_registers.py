"""Reading HMP ``info registers -a`` (recorded answers, tests/data/registers/README.md)."""

from __future__ import annotations

from pathlib import Path

from harness.platform import ARM64, X86_64
from harness.qemu.registers import describe, parse_registers

DATA = Path(__file__).resolve().parents[1] / "data" / "registers"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def test_x86_program_counters_by_cpu_mode_and_the_halt_flag() -> None:
    cpu0, cpu1 = parse_registers(recorded("x86_64-tcg-2vcpu-booting.txt"), X86_64)
    assert (cpu0.cpu, cpu0.pc_name, cpu0.pc, cpu0.halted) == (0, "RIP", 0xffffffffabea2cc0,
                                                              False)
    # The second vCPU is not woken yet: 32-bit, in the firmware, halted.
    assert (cpu1.cpu, cpu1.pc_name, cpu1.pc, cpu1.halted) == (1, "EIP", 0x000fd09a, True)


def test_arm64_program_counters_and_no_halt_flag() -> None:
    cpus = parse_registers(recorded("arm64-tcg-2vcpu-booting.txt"), ARM64)
    assert [(s.cpu, s.pc_name, s.pc, s.halted) for s in cpus] == [
        (0, "PC", 0xffffabe8f75af4fc, None), (1, "PC", 0xffffabe8f6cf2fbc, None)]
    # X00..X30 and the vector registers are not the program counter
    assert all(s.pc is not None and s.pc > 0xffff000000000000 for s in cpus)


def test_one_pc_in_every_sample_with_the_halt_flag_is_an_idle_vcpu() -> None:
    idle = recorded("x86_64-tcg-2vcpu-idle.txt")
    text = describe([(10.0, idle), (10.5, idle), (11.0, idle)], X86_64)
    assert text == ("vCPU 0: RIP ffffffff96617a0b in all 3 samples over 1.0 s, halted "
                    "(waiting for an interrupt); vCPU 1: RIP ffffffff96617a0b in all 3 "
                    "samples over 1.0 s, halted (waiting for an interrupt)")


def test_pcs_that_move_are_a_running_vcpu_and_a_still_one_without_halt_flag_is_named() -> None:
    booting, idle = recorded("x86_64-tcg-2vcpu-booting.txt"), recorded("x86_64-tcg-2vcpu-idle.txt")
    text = describe([(0.0, booting), (0.5, idle)], X86_64)
    assert text.startswith("vCPU 0: running (2 PCs in 2 samples over 0.5 s, last RIP "
                           "ffffffff96617a0b)")
    arm = recorded("arm64-tcg-2vcpu-booting.txt")
    text = describe([(0.0, arm), (0.5, arm)], ARM64)
    assert text.startswith("vCPU 0: PC ffffabe8f75af4fc in all 2 samples over 0.5 s; vCPU 1:")
    vcpu0 = booting.split("CPU#1")[0]  # not halted; the same RIP twice
    assert describe([(0.0, vcpu0), (1.0, vcpu0)], X86_64) == (
        "vCPU 0: RIP ffffffffabea2cc0 in all 2 samples over 1.0 s, not halted (spinning)")


def test_an_answer_without_cpus_or_pcs_says_so() -> None:
    assert describe([], X86_64) == "no register samples"
    assert describe([(0.0, "Error: no CPU")], X86_64) == \
        "no vCPU in QEMU's answer to info registers"
    assert describe([(0.0, "CPU#0\nXYZ=1\n")], ARM64) == \
        "vCPU 0: no program counter in QEMU's answer"
