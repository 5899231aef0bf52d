"""A stuck guest's vCPUs: HMP ``info registers -a`` (recorded answers,
tests/data/registers/README.md) and their threads in /proc."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path

from harness.platform import ARM64, X86_64
from harness.qemu.vcpus import (
    ThreadSample,
    describe,
    describe_threads,
    parse_registers,
    read_thread,
    sample_threads,
)

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


def test_a_thread_read_from_the_real_proc() -> None:
    sample = read_thread(os.getpid(), threading.get_native_id())
    assert sample is not None and sample.state == "R"  # it is running: reading itself
    assert sample.guest_ticks == 0 and sample.stack == ()  # no KVM guest; running: no stack
    assert read_thread(os.getpid(), 2**22 + 1) is None  # no such thread


def test_a_sleeping_threads_wait_and_stack(tmp_path: Path) -> None:
    """A /proc task folder written in the kernel's layout (proc(5): state, utime, stime and
    guest_time at fields 3, 14, 15 and 43; a stack as /proc/PID/stack prints it), with the
    frames of a KVM vCPU thread halted on a WFI."""
    task = tmp_path / "812" / "task" / "813"
    task.mkdir(parents=True)
    fields = ["S", "1"] + ["0"] * 50
    fields[11], fields[12], fields[40] = "310", "2095", "250"
    (task / "stat").write_text(f"813 (CPU 0/KVM) {' '.join(fields)}\n")
    (task / "wchan").write_text("kvm_vcpu_block")
    (task / "stack").write_text(
        "[<0>] __switch_to+0xe8/0x16c\n[<0>] kvm_vcpu_block+0x58/0xb0\n"
        "[<0>] kvm_vcpu_halt+0x78/0x400\n[<0>] 0xffff000009494000\n"
        "[<0>] kvm_vcpu_wfi+0x30/0x70\n[<0>] kvm_handle_wfx+0x1a4/0x2d0\n")
    sample = read_thread(812, 813, proc=tmp_path)
    assert sample is not None
    assert (sample.state, sample.user_ticks, sample.kernel_ticks, sample.guest_ticks,
            sample.wchan) == ("S", 310, 2095, 250, "kvm_vcpu_block")
    assert sample.stack[:2] == ("__switch_to", "kvm_vcpu_block")
    assert all(not f.startswith("0x") for f in sample.stack)  # bare addresses are dropped
    hz = os.sysconf("SC_CLK_TCK")
    later = dataclasses.replace(sample, at=sample.at + 1.0, kernel_ticks=2095 + hz // 2,
                                user_ticks=310 + hz // 2, guest_ticks=250 + hz // 4)
    assert describe_threads({0: sample}, {0: later}, {0: 813}) == (
        "vCPU 0 (thread 813): S, 25% of a core in the guest, 25% in QEMU, 50% in the host "
        "kernel over 1.0 s, in kvm_vcpu_block < kvm_vcpu_halt < kvm_vcpu_wfi")
    (task / "stat").write_text(f"813 (CPU 0/KVM) R {' '.join(fields[1:])}\n")
    assert read_thread(812, 813, proc=tmp_path).stack == ()  # type: ignore[union-attr]


def test_a_running_thread_without_a_stack_and_a_gone_one() -> None:
    running = ThreadSample(0.0, "R", 100, 100, 0, "0", ())
    hz = os.sysconf("SC_CLK_TCK")
    later = ThreadSample(2.0, "R", 100 + hz, 100, 0, "0", ())  # one core-second in 2 s
    assert describe_threads({0: running, 1: running}, {0: later, 1: None}, {0: 7, 1: 8}) == (
        "vCPU 0 (thread 7): R, 0% of a core in the guest, 50% in QEMU, 0% in the host kernel "
        "over 2.0 s; vCPU 1 (thread 8): gone")
    assert describe_threads({}, {}, {}) == "no vCPU threads named by QEMU"


def test_sampling_this_processs_own_thread_twice() -> None:
    """sample_threads on the real /proc: this thread, read twice 0.1 s apart."""
    tid = threading.get_native_id()
    reading, kept = sample_threads(os.getpid(), {0: tid}, interval=0.1)
    assert reading.startswith(f"vCPU 0 (thread {tid}): R, 0% of a core in the guest, ")
    first, second = (k.split(" ---")[0] for k in kept)
    assert first == f"\n--- vCPU 0 thread {tid}, +0.00 s"
    later = float(second.removeprefix(f"\n--- vCPU 0 thread {tid}, +").removesuffix(" s"))
    assert 0.1 <= later < 5  # the second read, after the interval
    assert all("; wchan " in k for k in kept)
    assert sample_threads(os.getpid(), {0: 2**22 + 1}, interval=0.0)[0] == \
        f"vCPU 0 (thread {2**22 + 1}): gone"
