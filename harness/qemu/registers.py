"""What a guest's vCPUs are doing when it stops making progress: a few samples of HMP
``info registers -a`` and a one-line reading of them.

A boot that never reaches init shows nothing on a quiet console (the kernel logs at
loglevel 4); the program counters say more: one PC in every sample with the halt flag set is
a vCPU idling for an interrupt that never comes, one PC without it a tight spin, PCs that move
a kernel still at work (only slowly).  QEMU reads each vCPU's registers while the guest runs,
so a sample is where the vCPU was executing, not where a debugger stopped it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
