"""Boot the lab's emulated host (L1) and run a job in it: a scenario, or an interactive shell.

The job is a shell script written into the run folder (shared into L1 at /lab); L1's init hands
PID 1 to it and it powers L1 off when done, so the outer side only waits for QEMU to exit.

L1's root is the outer machine's own (an L1 of this machine's architecture) or a user space
built for L1's architecture (:mod:`harness.images.userland`); in the second case the
repository and the image cache are shared into L1 at the paths they have outside, so the
harness inside runs this very checkout and boots the images prepared here.
"""

from __future__ import annotations

import compileall
import functools
import importlib
import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.config.model import DEFAULT_LAB_DEVICE, BuiltinImage, LabDevice, Scenario
from harness.errors import GuestError, HarnessError, LaunchError, UsageError
from harness.guest.ssh import paramiko_lib
from harness.images.builder import GuestImage, cache_root, ensure_image, repo_root
from harness.images.userland import ensure_userland
from harness.lab.direct_boot import direct_kernel
from harness.platform import Platform, host_platform, platform_for
from harness.qemu.argv import LabShare, channel_args, die_with_harness, lab_host_argv
from harness.qemu.machine import Machine
from harness.vm import builtin_recipe

Progress = Callable[[str], None]

# The devices L1 assigns to its guests (an emulated virtio-net that honours the IOMMU unless
# the scenario's lab: devices says otherwise) sit at fixed slots of L1's root bus from this
# one on: scenarios run in the lab name the first as ``host: 0000:00:05.0``, the next 06.0...
LAB_DEVICE_SLOT = 0x05
LAB_DEVICE_BDF = f"0000:00:{LAB_DEVICE_SLOT:02x}.0"
L1_MEMORY_MIB = 2048
L1_CPUS = 2
BOOT_TIMEOUT_S = 120.0


# The shares L1 mounts at their outer paths, far from the devices (slots 5 and on).
_EXTRA_SLOTS = (0x1C, 0x1D)


@dataclass(frozen=True)
class LabSetup:
    """What an L1 of one platform boots: its kernel and initramfs, its root, the L2 images."""

    platform: Platform
    image: GuestImage
    root: Path  # shared read-only as L1's root (under a tmpfs overlay)
    same_path: tuple[Path, ...]  # outer folders L1 mounts at the same paths
    kernel: Path | None = None  # what QEMU boots: the image's kernel, or its PVH vmlinux
    guests: Mapping[str, Path] = field(default_factory=dict)  # builtin recipe -> image folder

    @property
    def own_root(self) -> bool:
        """L1 runs the outer machine's root: every outer path is there as it is here."""
        return not self.same_path


def l1_argv(setup: LabSetup, share: Path, append: str = "",
            memory_mib: int = L1_MEMORY_MIB, cpus: int = L1_CPUS,
            devices: tuple[LabDevice, ...] = (DEFAULT_LAB_DEVICE,)) -> list[str]:
    """L0's command line for L1 without its console/QMP channels (the caller adds those):
    L1's root read-only at ``hostroot``, the run folder at ``lab``, and the folders L1 mounts
    at their outer paths (named on the kernel command line for L1's init)."""
    shares = [LabShare("hostroot", setup.root, readonly=True, slot=0x03),
              LabShare("lab", share, readonly=False, slot=0x04)]
    words = []
    for i, (path, slot) in enumerate(zip(setup.same_path, _EXTRA_SLOTS, strict=False)):
        shares.append(LabShare(f"outer{i}", path, readonly=True, slot=slot))
        words.append(f"harness.share=outer{i}:{path}")
    extra = " ".join([*words, append]).strip()
    return lab_host_argv(setup.platform, setup.kernel or setup.image.kernel,
                         setup.image.initrd, shares,
                         LAB_DEVICE_SLOT, memory_mib, cpus, extra, devices)


_JOB_HEAD = """#!/bin/sh
# Written by `harness lab`; run by L1's init as PID 1.  L1 powers off when it ends.
export PATH=/lab/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PYTHONUNBUFFERED=1 HARNESS_PINNED_IMAGES=/lab/images.json
export PYTHONPATH={repo}
# The reports written in here name the machine that ran the lab as their runner.
export HARNESS_LAB_RUNNER={runner}
# L1's init did these with its busybox, from RAM (each program run from the 9p root costs
# TCG a moment); an older init left them to the job.
if [ ! -e /sys/kernel/tracing/trace ]; then
    hostname lab-l1
    ip link set lo up
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /dev/shm
    mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
    mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
fi
cd {repo}
"""

# Power off, and wait for it without a word: once the 9p root is gone, running even sleep
# fails, and the shell would say so on the console after "reboot: Power down".
_JOB_TAIL = """sync
exec 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 60
"""


def run_job(argv: list[str], warm: str | None = None, qemu: str | None = None) -> str:
    """A job that runs ``argv`` in L1, logs it to /lab/l1-job.log and keeps its exit status.

    While the harness starts, L1 reads on the side, into its page cache, the files named in
    the list ``warm`` (L1's path of a file of lines: the harness's modules in the order it
    imports them, then the L2 images), then QEMU's binary and libraries (``qemu -version``
    maps them).  Read cold over 9p under TCG, the modules cost the harness's start about
    1.5 s and QEMU and the images L2's QEMU start about 1 s (1.8 s against 0.9 s warm),
    measured in L1."""
    command = shlex.join(argv)
    side = [f"xargs -d '\\n' cat -- < {shlex.quote(warm)}"] if warm else []
    side += [f"{shlex.quote(qemu)} -version"] if qemu else []
    return (_JOB_HEAD.format(repo=shlex.quote(str(repo_root())),
                             runner=shlex.quote(socket.gethostname() or "unknown"))
            + 'echo "harness-lab: job start $(cut -d" " -f1 /proc/uptime)"\n'
            + (f"( ( {'; '.join(side)}; ) >/dev/null 2>&1 & )\n" if side else "")
            # A heartbeat on the console: an L1 that stops printing it has hung (nested
            # virtualization under TCG sometimes does, silently), see _follow.
            + f'( while sleep {HEARTBEAT_S}; do echo "harness-lab: alive '
            + '$(cut -d" " -f1 /proc/uptime)"; done ) &\n'
            + f"{{ {command}; echo $? > /lab/exit-status; }} 2>&1 | tee /lab/l1-job.log\n"
            + 'echo "harness-lab: job end $(cut -d" " -f1 /proc/uptime)"\n'
            + _JOB_TAIL)


# The shell's own start-up file: a login shell would read the distribution's profile and
# bash-completion over 9p, half a minute under TCG.
_BASHRC = """PS1='\\u@\\h:\\w\\$ '
HISTFILE=/lab/bash_history
alias ls='ls --color=auto' ll='ls -l'
echo "harness, lspci and the QEMU of the host are here; exit powers L1 off"
"""


def shell_job() -> str:
    return (_JOB_HEAD.format(repo=shlex.quote(str(repo_root())),
                             runner=shlex.quote(socket.gethostname() or "unknown"))
            + 'echo "harness-lab: shell (exit to power L1 off)"\n'
            + _WARM_UP + "setsid -c /bin/bash --noprofile --rcfile /lab/bashrc -i\n" + _JOB_TAIL)


# Python and the harness's modules read once in the background while the shell starts, so
# the first harness command finds them in L1's page cache instead of fetching them over 9p.
_WARM_UP = "( nice -n 10 harness --help >/dev/null 2>&1 & )\n"


def up_job(scenario_file: str, only: str | None = None) -> str:
    """``harness lab up``: ``harness up`` keeps the scenario's VMs (L2) up in L1, and once they
    are, the console is a shell in L1 where ``harness ssh``, ``qmp``, ``console`` and ``irq
    watch`` reach them.  Leaving the shell ends the session as ``harness down`` does (its
    report in the run folder) and powers L1 off."""
    scenario = shlex.join([scenario_file, *(["--only", only] if only else [])])
    return (_JOB_HEAD.format(repo=shlex.quote(str(repo_root())),
                             runner=shlex.quote(socket.gethostname() or "unknown"))
            # Sockets on tmpfs: L1's /run and /tmp show the outer machine's through 9p.
            + "export HARNESS_RUNTIME_DIR=/dev/shm/harness\n"
            + "echo \"harness-lab: starting the scenario's VMs in L1 (harness up; its "
            + "progress in /lab/up.err)\"\n"
            + f"harness up {scenario} --out /lab >/lab/up.out 2>/lab/up.err &\n"
            + "up=$!\n"
            + "while kill -0 $up 2>/dev/null && ! grep -q '^run folder ' /lab/up.out; do "
            + "sleep 1; done\n"
            + "if kill -0 $up 2>/dev/null; then\n"
            + "    cat /lab/up.out\n"
            + "    echo \"harness-lab: shell (L2 is up: harness ssh, qmp, console and irq watch "
            + "reach it; exit ends the session and powers L1 off)\"\n"
            + "    " + _WARM_UP
            + "    setsid -c /bin/bash --noprofile --rcfile /lab/bashrc -i\n"
            + "    echo \"harness-lab: ending the session\"\n"
            + "    harness down || kill -INT $up\n"
            + "    wait $up\n"
            + "else\n"
            + "    echo \"harness-lab: harness up ended before its VMs were up:\"\n"
            + "    tail -n 20 /lab/up.err\n"
            + "fi\n" + _JOB_TAIL)


# What the harness in L1 imports for a run, named: the lab itself does not use them.
_RUN_MODULES = ("harness.cli", "harness.config", "harness.runner", "harness.report.json_report",
                "harness.report.junit", "harness.report.summary")


@functools.cache
def _module_files() -> tuple[Path, ...]:
    """The files of the modules a run imports, in import order (bytecode, extensions), as
    this process finds them when it imports the same: L1 runs this machine's root, so the
    paths are L1's too.  Once per process, whatever the number of L1 boots."""
    for name in _RUN_MODULES:
        importlib.import_module(name)
    paramiko_lib()
    files: list[Path] = []
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not isinstance(source, str):
            continue
        if source.endswith(".py"):
            cached = Path(importlib.util.cache_from_source(source))
            files.append(cached if cached.exists() else Path(source))
        elif source.endswith(".so"):
            files.append(Path(source))
    return tuple(files)


def _byte_compile(package: Path) -> None:
    """The harness's own modules compiled here, where it is cheap.  L1 imports them from a
    read-only root, so a module without an up-to-date .pyc beside it is compiled again in
    every L1 boot, under TCG: 25 of the modules a run imports were, on a machine that sets
    PYTHONDONTWRITEBYTECODE.  Only missing and stale files are compiled (a stat each)."""
    compileall.compile_dir(package, quiet=2)


def _write_tools(share: Path, python: str, site_packages: str | None = None) -> None:
    """``harness`` for L1's PATH (/lab/bin: the run folder), and the shell's start-up file.

    With this interpreter's own site-packages given, it starts Python without ``site`` and
    names the folders itself: the site module's scan of the environment costs TCG over 9p
    about half a second of every start."""
    bin_dir = share / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "harness"
    if site_packages is not None:
        path = shlex.quote(f"{repo_root()}:{site_packages}")
        command = f"PYTHONPATH={path} exec {shlex.quote(python)} -S -m harness.cli"
    else:
        command = f"exec {shlex.quote(python)} -m harness.cli"
    wrapper.write_text(f"#!/bin/sh\n{command} \"$@\"\n")
    wrapper.chmod(0o755)
    (share / "bashrc").write_text(_BASHRC)


@dataclass
class LabRun:
    run_dir: Path
    exit_status: int | None = None
    phases: list[tuple[str, float]] = field(default_factory=list)
    inner_runs: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what went wrong and was tried again

    @property
    def total_seconds(self) -> float:
        return sum(s for _, s in self.phases)


def scenario_recipes(scenario: Scenario, platform: Platform) -> tuple[str, ...]:
    """The builtin images the scenario's VMs boot (as L2, in a lab of ``platform``)."""
    return tuple(dict.fromkeys(builtin_recipe(vm, platform).name for vm in scenario.vms
                               if isinstance(vm.image, BuiltinImage)))


def lab_platform(path: Path, scenarios: Sequence[Scenario]) -> Platform:
    """The lab's architecture: the one the scenarios' VMs name (L2 runs under KVM in L1, so
    they are of L1's architecture), this machine's if none names one."""
    named = {vm.arch for s in scenarios for vm in s.vms if vm.arch is not None}
    if len(named) > 1:
        raise UsageError(f"{path}: its VMs name several architectures "
                         f"({', '.join(sorted(named))}); a lab runs one")
    return platform_for(named.pop()) if named else host_platform()


def prepare(progress: Progress, share: Path, platform: Platform) -> LabSetup:
    """L1's image and root, and the builtin guest images L1's harness will boot as L2 (every
    builtin recipe of the architecture: L1 cannot fetch packages), pinned for it in
    ``share/images.json``."""
    image = ensure_image(platform.lab.recipe, platform, progress=progress)
    guests = {name: ensure_image(name, platform, progress=progress).folder
              for name in platform.recipes}
    (share / "images.json").write_text(json.dumps({k: str(v) for k, v in guests.items()})
                                       + "\n")
    kernel = direct_kernel(image.kernel, image.key, cache_root() / "lab-kernels")
    _byte_compile(repo_root() / "harness")
    if platform.lab.userland is None:
        if platform is not host_platform():
            raise HarnessError(f"the {platform.arch} lab needs a user space for L1 (this "
                               f"machine's root is {host_platform().arch})")
        _write_tools(share, sys.executable, sysconfig.get_paths()["purelib"])
        return LabSetup(platform, image, Path("/"), (), kernel, guests)
    userland = ensure_userland(platform.lab.userland, platform, progress)
    _write_tools(share, "python3")
    return LabSetup(platform, image, userland.root,
                    (repo_root(), cache_root() / "images"), kernel, guests)


@dataclass(frozen=True)
class LabBoot:
    """One boot of L1 and the harness command it runs."""

    args: tuple[str, ...]  # harness arguments, after ``python -m harness.cli``
    append: str = ""  # extra kernel arguments for L1
    harness: bool = True  # False: ``args`` is a whole command of its own
    # what L1 offers for assignment, from LAB_DEVICE_BDF on
    devices: tuple[LabDevice, ...] = (DEFAULT_LAB_DEVICE,)
    recipes: tuple[str, ...] = ()  # the builtin images its L2s boot (read ahead in L1)


def run_in_lab(platform: Platform, boots: list[LabBoot], run_dir: Path, progress: Progress,
               timeout: float = 1800.0) -> LabRun:
    """Boot L1 once per entry of ``boots``, run its command there (from the repository), wait
    for L1 to power off; the exit status is the worst of them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result = LabRun(run_dir)
    started = time.monotonic()
    setup = prepare(progress, run_dir, platform)
    result.phases.append(("prepare images", time.monotonic() - started))
    share = run_dir.resolve()
    statuses = []
    for n, boot in enumerate(boots, start=1):
        suffix = f" {n}" if len(boots) > 1 else ""
        # /lab/bin/harness: the wrapper that starts Python without the site scan
        argv = ["harness", *boot.args] if boot.harness else list(boot.args)
        warm = [*(_module_files() if boot.harness and setup.own_root else ()),
                *(f for r in boot.recipes if r in setup.guests
                  for f in sorted(setup.guests[r].iterdir()) if f.suffix != ".json")]
        (run_dir / "warm.list").write_text("".join(f"{f}\n" for f in warm))
        (run_dir / "job.sh").write_text(run_job(argv, "/lab/warm.list", platform.qemu))
        (run_dir / "exit-status").unlink(missing_ok=True)

        def argv_for(qmp_fd: int, console_fd: int, append: str = boot.append,
                     devices: tuple[LabDevice, ...] = boot.devices) -> list[str]:
            return (l1_argv(setup, share, append, devices=devices)
                    + channel_args(qmp_fd, console_fd))

        for attempt in range(1, LOCKUP_ATTEMPTS + 1):
            name = ("lab-l1" if n == 1 else f"lab-l1-{n}") + (
                f"-try{attempt}" if attempt > 1 else "")
            before = set(run_dir.glob("*/report.json"))
            try:
                with Machine(name, argv_for, run_dir) as machine:
                    what = platform.lab.what + (f"; {boot.append}" if boot.append else "") + (
                        "; " + ", ".join(f"{d.kind} at 0000:00:{LAB_DEVICE_SLOT + n:02x}.0"
                                         for n, d in enumerate(boot.devices))
                        if boot.devices != (DEFAULT_LAB_DEVICE,) else "")
                    progress(f"lab: booting the emulated host (L1{suffix}: {what})")
                    launched = time.monotonic()
                    machine.launch()
                    assert machine.console is not None
                    machine.console.wait_for(r"^harness-lab: job start", BOOT_TIMEOUT_S,
                                             "L1 to boot and start the job")
                    booted = time.monotonic()
                    result.phases.append((f"L1{suffix} boot", booted - launched))
                    progress(f"lab: L1{suffix} up in {booted - launched:.1f} s; running "
                             f"{shlex.join(argv[:3] if boot.harness else argv)}")
                    first = _follow(machine, progress, timeout)
                    ended = time.monotonic()
                    if first is not None:  # the inner harness's first progress line
                        result.phases.append((f"harness start in L1{suffix}", first - booted))
                        booted = first
                    result.phases.append((f"job in L1{suffix}", ended - booted))
                break
            except L1LockedUp as exc:
                if attempt == LOCKUP_ATTEMPTS:
                    raise
                # The half-done inner runs stay as evidence, out of the reports' way.
                for report in set(run_dir.glob("*/report.json")) - before:
                    report.rename(report.with_name("report.l1-locked-up.json"))
                result.notes.append(f"{name}: {exc.reason}; booted again")
                progress(f"lab: {exc.reason} (an emulation hang, see {machine.console_path}); "
                         "booting L1 again")
        status_file = run_dir / "exit-status"
        if not status_file.exists():
            raise GuestError(name, "the job in L1 ended without an exit status (see "
                             f"{machine.console_path})", machine.console.tail()
                             if machine.console else "")
        statuses.append(int(status_file.read_text().strip() or 1))
    result.exit_status = max(statuses)
    result.inner_runs = sorted((p.parent for p in run_dir.glob("*/report.json")),
                               key=lambda p: p.stat().st_mtime)
    return result


# QEMU's TCG sometimes hangs an L1 vCPU in nested virtualization (seen with the x86 lab's
# nested SVM, about one L2 start in four on a 2-core machine): the L1 kernel's watchdog says so
# within half a minute, from the stuck CPU itself or from another one ("detected stalls on
# CPUs/tasks": L1's CPU 0 gone into L2 for good, seen here in CI with L1's heartbeat stopped
# and only the kernel's stall reports coming).  Such an L1 is booted again, once; the hang is
# noted in the result.
_LOCKUP = re.compile(r"watchdog: BUG: soft lockup|"
                     r"rcu: INFO: rcu_\w+ (?:self-detected stall|detected stalls on CPUs)")
# A kernel log record on the console ("[  104.377657] ..."): not a sign the job is alive.
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\] ")
LOCKUP_ATTEMPTS = 2
HEARTBEAT_S = 10  # the job prints "harness-lab: alive" this often
SILENCE_S = 120.0  # no line of the job (heartbeat, progress) for this long: L1 has hung


class L1LockedUp(LaunchError):
    """L1's kernel reported a vCPU that stopped making progress."""


def _follow(machine: Machine, progress: Progress, timeout: float) -> float | None:
    """Relay the inner harness's progress lines until L1 powers off; an L1 whose kernel
    reports a locked-up vCPU is given up at once (:class:`L1LockedUp`).  When the first
    progress line came (``time.monotonic()``), None if none did."""
    assert machine.console is not None
    deadline = time.monotonic() + timeout
    seen = 0
    first: float | None = None
    heard = time.monotonic()
    while machine.is_alive():
        now = time.monotonic()
        if now > deadline:
            raise LaunchError("lab-l1", f"the job did not finish within {timeout:g} s",
                              machine.argv)
        if now - heard > SILENCE_S:
            raise L1LockedUp(machine.name, f"L1 locked up: not a line of the job for "
                             f"{now - heard:.0f} s (its heartbeat comes every {HEARTBEAT_S} s)",
                             machine.argv)
        try:
            machine.console.wait_for(r"^harness-lab: job end", 1.0, "the job's end")
        except GuestError:
            pass
        lines = machine.console.lines(since=seen)  # numbered since boot: the window rolls
        for line in lines:
            if _LOCKUP.search(line.text):
                raise L1LockedUp(machine.name, f"L1 locked up: {line.text.strip()}",
                                 machine.argv)
            if line.text.startswith("[") and "] " in line.text[:12]:
                progress(f"L1 {line.text}")
                first = line.at if first is None else first
        if any(not _KERNEL_LINE.match(line.text) for line in lines):
            heard = time.monotonic()
        seen = lines[-1].number + 1 if lines else seen
        if any(ln.text.startswith("harness-lab: job end") for ln in lines):
            break
    try:
        machine.wait_exit(30.0)
    except LaunchError:
        pass  # the shutdown ladder in Machine.__exit__ finishes it
    return first


def inner_reports(lab: LabRun) -> list[dict[str, object]]:
    reports = []
    for folder in lab.inner_runs:
        try:
            reports.append(json.loads((folder / "report.json").read_text()))
        except (OSError, ValueError) as exc:
            raise HarnessError(f"{folder}/report.json: unreadable: {exc}") from exc
    return reports


def shell(progress: Progress, run_dir: Path, platform: Platform,
          scenario_file: str | None = None, only: str | None = None) -> int:
    """L1 with a login shell on this terminal; QEMU's monitor on Ctrl-A c, quit Ctrl-A x.
    With a scenario (``harness lab up``), its VMs are kept up in L1 first (:func:`up_job`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare(progress, run_dir, platform)
    (run_dir / "job.sh").write_text(shell_job() if scenario_file is None
                                    else up_job(scenario_file, only))
    argv = l1_argv(setup, run_dir.resolve()) + [
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
