"""Boot the lab's emulated host (L1) and run a job in it: a scenario, or an interactive shell.

The job is a shell script written into the run folder (shared into L1 at /lab); L1's init hands
PID 1 to it and it powers L1 off when done, so the outer side only waits for QEMU to exit.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import GuestError, HarnessError, LaunchError
from harness.images.builder import GuestImage, ensure_image, repo_root
from harness.platform import Platform, host_platform
from harness.qemu.argv import LabShare, channel_args, die_with_harness, lab_host_argv
from harness.qemu.machine import Machine

Progress = Callable[[str], None]

# The device L1 assigns to its guest: an emulated virtio-net that honours the IOMMU, at a fixed
# slot of L1's root bus.  Scenarios run in the lab name it as ``host: 0000:00:05.0``.
LAB_DEVICE_SLOT = 0x05
LAB_DEVICE_BDF = f"0000:00:{LAB_DEVICE_SLOT:02x}.0"
L1_MEMORY_MIB = 2048
L1_CPUS = 2
BOOT_TIMEOUT_S = 120.0


def l1_argv(image: GuestImage, share: Path, platform: Platform,
            memory_mib: int = L1_MEMORY_MIB, cpus: int = L1_CPUS) -> list[str]:
    """L0's command line for L1 without its console/QMP channels (the caller adds those):
    the host's root read-only at ``hostroot``, the run folder at ``lab``."""
    shares = [LabShare("hostroot", Path("/"), readonly=True, slot=0x03),
              LabShare("lab", share, readonly=False, slot=0x04)]
    return lab_host_argv(platform, image.kernel, image.initrd, shares, LAB_DEVICE_SLOT,
                         memory_mib, cpus)


_JOB_HEAD = """#!/bin/sh
# Written by `harness lab`; run by L1's init as PID 1.  L1 powers off when it ends.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 HARNESS_PINNED_IMAGES=/lab/images.json
hostname lab-l1
ip link set lo up
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
cd {repo}
"""

_JOB_TAIL = """sync
echo o > /proc/sysrq-trigger
sleep 60
"""


def run_job(argv: list[str]) -> str:
    """A job that runs ``argv`` in L1, logs it to /lab/l1-job.log and keeps its exit status."""
    command = shlex.join(argv)
    return (_JOB_HEAD.format(repo=shlex.quote(str(repo_root())))
            + 'echo "harness-lab: job start $(cut -d" " -f1 /proc/uptime)"\n'
            + f"{{ {command}; echo $? > /lab/exit-status; }} 2>&1 | tee /lab/l1-job.log\n"
            + 'echo "harness-lab: job end $(cut -d" " -f1 /proc/uptime)"\n'
            + _JOB_TAIL)


def shell_job() -> str:
    return (_JOB_HEAD.format(repo=shlex.quote(str(repo_root())))
            + 'echo "harness-lab: shell (exit to power L1 off)"\n'
            + "setsid -c /bin/bash -l\n" + _JOB_TAIL)


@dataclass
class LabRun:
    run_dir: Path
    exit_status: int | None = None
    phases: list[tuple[str, float]] = field(default_factory=list)
    inner_runs: list[Path] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(s for _, s in self.phases)


def prepare(progress: Progress, share: Path, platform: Platform) -> GuestImage:
    """The L1 image, and the builtin guest images L1's harness will boot as L2, pinned for it
    (L1 shares this machine's root, so it finds them at the same paths)."""
    image = ensure_image(platform.lab.recipe, platform, progress=progress)
    guests = {name: str(ensure_image(name, platform, progress=progress).folder)
              for name in platform.recipes[:1]}
    (share / "images.json").write_text(json.dumps(guests) + "\n")
    return image


def run_in_lab(argv: list[str], run_dir: Path, progress: Progress,
               timeout: float = 1800.0) -> LabRun:
    """Boot L1, run ``argv`` there (from the repository), wait for L1 to power off."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = LabRun(run_dir)
    started = time.monotonic()
    platform = host_platform()  # L1 runs this machine's own root filesystem
    image = prepare(progress, run_dir, platform)
    result.phases.append(("prepare images", time.monotonic() - started))
    (run_dir / "job.sh").write_text(run_job(argv))
    share = run_dir.resolve()

    def argv_for(qmp_fd: int, console_fd: int) -> list[str]:
        return l1_argv(image, share, platform) + channel_args(qmp_fd, console_fd)

    with Machine("lab-l1", argv_for, run_dir) as machine:
        progress(f"lab: booting the emulated host (L1: {platform.lab.what})")
        launched = time.monotonic()
        machine.launch()
        assert machine.console is not None
        machine.console.wait_for(r"^harness-lab: job start", BOOT_TIMEOUT_S,
                                 "L1 to boot and start the job")
        booted = time.monotonic()
        result.phases.append(("L1 boot", booted - launched))
        progress(f"lab: L1 up in {booted - launched:.1f} s; running "
                 f"{shlex.join(argv[-3:])}")
        _follow(machine, progress, timeout)
        result.phases.append(("job in L1", time.monotonic() - booted))
    status_file = run_dir / "exit-status"
    if not status_file.exists():
        raise GuestError("lab-l1", "the job in L1 ended without an exit status (see "
                         f"{machine.console_path})", machine.console.tail() if machine.console
                         else "")
    result.exit_status = int(status_file.read_text().strip() or 1)
    result.inner_runs = sorted(p.parent for p in run_dir.glob("*/report.json"))
    return result


def _follow(machine: Machine, progress: Progress, timeout: float) -> None:
    """Relay the inner harness's progress lines until L1 powers off."""
    assert machine.console is not None
    deadline = time.monotonic() + timeout
    seen = 0
    while machine.is_alive():
        if time.monotonic() > deadline:
            raise LaunchError("lab-l1", f"the job did not finish within {timeout:g} s",
                              machine.argv)
        try:
            machine.console.wait_for(r"^harness-lab: job end", 1.0, "the job's end")
        except GuestError:
            pass
        lines = machine.console.lines()
        for line in lines[seen:]:
            if line.text.startswith("[") and "] " in line.text[:12]:
                progress(f"L1 {line.text}")
        seen = len(lines)
        if any(ln.text.startswith("harness-lab: job end") for ln in lines[-5:]):
            break
    try:
        machine.wait_exit(30.0)
    except LaunchError:
        pass  # the shutdown ladder in Machine.__exit__ finishes it


def inner_reports(lab: LabRun) -> list[dict[str, object]]:
    reports = []
    for folder in lab.inner_runs:
        try:
            reports.append(json.loads((folder / "report.json").read_text()))
        except (OSError, ValueError) as exc:
            raise HarnessError(f"{folder}/report.json: unreadable: {exc}") from exc
    return reports


def shell(progress: Progress, run_dir: Path) -> int:
    """L1 with a login shell on this terminal; QEMU's monitor on Ctrl-A c, quit Ctrl-A x."""
    run_dir.mkdir(parents=True, exist_ok=True)
    platform = host_platform()
    image = prepare(progress, run_dir, platform)
    (run_dir / "job.sh").write_text(shell_job())
    argv = l1_argv(image, run_dir.resolve(), platform) + [
        "-chardev", "stdio,id=console,mux=on,signal=off", "-serial", "chardev:console",
        "-mon", "chardev=console,mode=readline"]
    progress("lab: booting L1; you get a root shell in it (exit powers it off; Ctrl-A x "
             "quits QEMU)")
    proc = subprocess.Popen(die_with_harness(argv),
                            stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
