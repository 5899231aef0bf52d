"""What a guest's vCPUs are doing when it stops making progress, seen from two sides.

The host's side first, which never disturbs QEMU: each vCPU thread (``query-cpus-fast``
names them) in ``/proc``: its state, the CPU time it spent over a second running the guest
(KVM), in QEMU (device exits; all of TCG's emulation) and in the host kernel, where it sleeps
(``wchan``) and, where readable, its kernel stack.  A vCPU that burns a core in the guest is
running guest code; one asleep in ``kvm_vcpu_block`` waits for an interrupt.

Then the guest's side: a few samples of HMP ``info registers -a``.  One PC in every sample
with the halt flag set is a vCPU idling for an interrupt that never comes, one PC without it
a tight spin, PCs that move a kernel still at work (only slowly).  QEMU reads the registers
while the guest runs, so a sample is where the vCPU was executing.  Reading them kicks each
vCPU out of the accelerator; a QEMU that crashes doing so (QEMU 7.2, KVM arm64 in the Arm
lab's L1, a vCPU that had never printed a byte) is reported as such, after the host's side
was read.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.platform import Platform

_CPU_HEADER = re.compile(r"^CPU#(\d+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class VcpuSample:
    cpu: int
    pc: int | None  # None: not in QEMU's answer
    pc_name: str  # the register it was read from ("RIP", "EIP", "PC")
    halted: bool | None  # None: the architecture's registers do not say


def parse_registers(text: str, platform: Platform) -> list[VcpuSample]:
    """Every vCPU's program counter (and halt flag) in one ``info registers -a`` answer."""
    names = "|".join(re.escape(n) for n in platform.pc_registers)
    pc_re = re.compile(rf"(?<![A-Z0-9_])({names})=([0-9a-fA-F]+)")
    halt_re = (re.compile(rf"(?<![A-Z0-9_]){re.escape(platform.halt_flag)}=([01])")
               if platform.halt_flag else None)
    headers = list(_CPU_HEADER.finditer(text))
    samples = []
    for i, header in enumerate(headers):
        end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
        body = text[header.end():end]
        pc = pc_re.search(body)
        halt = halt_re.search(body) if halt_re else None
        samples.append(VcpuSample(int(header.group(1)),
                                  int(pc.group(2), 16) if pc else None,
                                  pc.group(1) if pc else platform.pc_registers[0],
                                  halt.group(1) == "1" if halt else None))
    return samples


def take_samples(read: Callable[[], str], count: int = 3, interval: float = 0.5
                 ) -> list[tuple[float, str]]:
    """``count`` answers of ``read`` (an HMP ``info registers -a``), ``interval`` apart, each
    with the monotonic time it was taken."""
    out = []
    for i in range(count):
        if i:
            time.sleep(interval)
        out.append((time.monotonic(), read()))
    return out


def describe(samples: Sequence[tuple[float, str]], platform: Platform) -> str:
    """One line for all the vCPUs: "vCPU 0: RIP ffffffff81a2b3c4 in all 3 samples over
    1.0 s, halted (waiting for an interrupt); vCPU 1: running (3 PCs in 3 samples ...)"."""
    if not samples:
        return "no register samples"
    parsed = [parse_registers(text, platform) for _, text in samples]
    span = samples[-1][0] - samples[0][0]
    cpus = sorted({s.cpu for sample in parsed for s in sample})
    if not cpus:
        return "no vCPU in QEMU's answer to info registers"
    parts = []
    for cpu in cpus:
        seen = [s for sample in parsed for s in sample if s.cpu == cpu]
        read = [s for s in seen if s.pc is not None]
        if not read:
            parts.append(f"vCPU {cpu}: no program counter in QEMU's answer")
            continue
        distinct = list(dict.fromkeys((s.pc_name, s.pc) for s in read))
        if len(distinct) == 1:
            name, pc = distinct[0]
            text = f"vCPU {cpu}: {name} {pc:x} in all {len(read)} samples over {span:.1f} s"
            if all(s.halted is True for s in seen):
                text += ", halted (waiting for an interrupt)"
            elif all(s.halted is False for s in seen):
                text += ", not halted (spinning)"
            parts.append(text)
        else:
            last = read[-1]
            parts.append(f"vCPU {cpu}: running ({len(distinct)} PCs in {len(read)} samples "
                         f"over {span:.1f} s, last {last.pc_name} {last.pc:x})")
    return "; ".join(parts)


@dataclass(frozen=True)
class ThreadSample:
    """One vCPU thread in ``/proc`` at one moment."""

    at: float  # time.monotonic()
    state: str  # R running, S sleeping, D uninterruptible...
    user_ticks: int  # in user space, the guest's time included (the kernel counts it so)
    kernel_ticks: int
    guest_ticks: int  # running a KVM guest
    wchan: str  # where it sleeps ("0" or "" when running)
    stack: tuple[str, ...]  # kernel stack, innermost first (only for a thread not running)

    def text(self) -> str:
        return (f"state {self.state}, ticks: user {self.user_ticks} (guest {self.guest_ticks}), "
                f"kernel {self.kernel_ticks}; wchan {self.wchan or '-'}\n"
                + "\n".join(self.stack))


def read_thread(pid: int, tid: int, proc: Path = Path("/proc")) -> ThreadSample | None:
    """A thread of process ``pid`` now; None once it is gone."""
    task = proc / str(pid) / "task" / str(tid)
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return None
    # proc(5): after the command's ")", state is field 3, utime 14, stime 15, guest_time 43
    fields = stat.rsplit(")", 1)[1].split()
    wchan = _read(task / "wchan")
    # A running thread's stack is not reliable (arm64 prints bare addresses): kept only for
    # a thread that sleeps, by function name.
    frames = [line.split("] ", 1)[-1].split("+", 1)[0]
              for line in _read(task / "stack").splitlines() if line.strip()]
    stack = tuple(f for f in frames if not f.startswith("0x")) if fields[0] != "R" else ()
    return ThreadSample(time.monotonic(), fields[0], int(fields[11]), int(fields[12]),
                        int(fields[40]) if len(fields) > 40 else 0, wchan, stack)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:  # stack needs CAP_SYS_ADMIN; a thread can end between two reads
        return ""


def sample_threads(pid: int, tids: Mapping[int, int], interval: float = 1.0
                   ) -> tuple[str, list[str]]:
    """The vCPU threads ``tids`` (vCPU index -> thread id) of QEMU ``pid``, read twice
    ``interval`` apart: the one-line reading (:func:`describe_threads`) and each read, as
    text to keep."""
    first = {cpu: read_thread(pid, tid) for cpu, tid in tids.items()}
    time.sleep(interval)
    last = {cpu: read_thread(pid, tid) for cpu, tid in tids.items()}
    start = min((t.at for t in first.values() if t), default=0.0)
    kept = [f"\n--- vCPU {cpu} thread {tids[cpu]}, +{t.at - start:.2f} s ---\n{t.text()}"
            for sample in (first, last) for cpu, t in sorted(sample.items()) if t]
    return describe_threads(first, last, tids), kept


def describe_threads(first: Mapping[int, ThreadSample | None],
                     last: Mapping[int, ThreadSample | None],
                     tids: Mapping[int, int]) -> str:
    """vCPU index -> thread id ``tids``, each read twice: "vCPU 0 (thread 812): R, 95% of a
    core in the guest, 2% in QEMU, 3% in the host kernel over 1.0 s" (the guest: KVM; TCG's
    emulation is QEMU's own time), "... S, ..., in kvm_vcpu_block < kvm_vcpu_halt"."""
    hz = os.sysconf("SC_CLK_TCK")
    parts = []
    for cpu, tid in sorted(tids.items()):
        a, b = first.get(cpu), last.get(cpu)
        if a is None or b is None:
            parts.append(f"vCPU {cpu} (thread {tid}): gone")
            continue
        span = max(b.at - a.at, 1e-3)
        guest = (b.guest_ticks - a.guest_ticks) / hz / span
        qemu = max((b.user_ticks - a.user_ticks) / hz / span - guest, 0.0)
        kernel = (b.kernel_ticks - a.kernel_ticks) / hz / span
        text = (f"vCPU {cpu} (thread {tid}): {b.state}, {guest:.0%} of a core in the guest, "
                f"{qemu:.0%} in QEMU, {kernel:.0%} in the host kernel over {span:.1f} s")
        frames = [f for f in b.stack if not f.startswith("__")][:3]
        where = " < ".join(frames) or (b.wchan if b.wchan not in ("", "0") else "")
        if where:
            text += f", in {where}"
        parts.append(text)
    return "; ".join(parts) if parts else "no vCPU threads named by QEMU"
