"""Decide the accelerator: KVM only if it can really run guest code here, else TCG.

``/dev/kvm`` existing proves little: on some hosts QEMU cannot set up a vCPU under KVM
(``-cpu host`` fails to set an MSR), or the vCPU never runs.  The probe runs the platform's
probe program (:class:`~harness.platform.ProbePayload`: a few hand-assembled instructions
that write a marker to the serial port and power the VM off) under KVM, and KVM is usable if
the marker comes back.  No kernel boots, so the answer takes milliseconds: QEMU starts
paused, and from the moment it lets the vCPU run (QMP ``cont``) the program has
:data:`PROBE_TIMEOUT_S` whatever the host.  QEMU's own start is bounded apart
(:data:`START_TIMEOUT_S`): it is tens of milliseconds on a real host but seconds inside the
lab's emulated one, where a guest kernel used to need 15 s to print its banner.  A definite
answer is cached per host boot (``boot_id``), QEMU binary and program.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import HostError
from harness.platform import Accel, Platform, host_platform
from harness.qemu.argv import die_with_harness, kvm_probe_argv

log = logging.getLogger(__name__)

#: The longest the probe program may take, from its vCPU's start to its marker.
PROBE_TIMEOUT_S = 1.0
#: The longest QEMU may take to start (paused, before the program runs): tens of
#: milliseconds on a real host, seconds inside the lab's emulated one.
START_TIMEOUT_S = 30.0
#: What the probe program writes to the serial port.
PROBE_MARKER = b"HARNESS-KVM-PROBE-OK\n"
_CACHE_VERSION = 2  # the probe program replaced the guest kernel


@dataclass(frozen=True)
class AccelDecision:
    accel: str  # "kvm" or "tcg"
    reason: str
    kvm_usable: bool


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str
    seconds: float
    definite: bool = True  # False: nothing came back in time (not cached: load may be why)


@dataclass(frozen=True)
class ProbeRun:
    """What one run of the probe program under an accelerator gave."""

    argv: tuple[str, ...]
    output: bytes  # the serial port
    errors: bytes  # QEMU's stderr
    exit_status: int | None  # None: still running at the deadline or at the marker (killed)
    seconds: float  # from launch to the answer
    start_seconds: float | None  # from launch to the vCPUs running (None: they never did)

    @property
    def marker_seen(self) -> bool:
        return PROBE_MARKER in self.output

    @property
    def program_seconds(self) -> float | None:
        """From the vCPUs' start to the answer: the guest program's own time."""
        return None if self.start_seconds is None else self.seconds - self.start_seconds


def kvm_device_problem(dev: Path = Path("/dev/kvm")) -> str | None:
    if not dev.exists():
        return "/dev/kvm does not exist (KVM module not loaded, or no virtualization support)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


# Sent as soon as QEMU is launched; it answers each once it is up, "cont" in its main loop,
# after the machine and its vCPUs exist: from then on the vCPUs run the program.
_QMP_START = b'{"execute": "qmp_capabilities"}\n{"execute": "cont"}\n'


def run_probe_program(platform: Platform, qemu: str | None, accel: str = "kvm",
                      timeout: float = PROBE_TIMEOUT_S, until_exit: bool = False,
                      start_timeout: float = START_TIMEOUT_S) -> ProbeRun:
    """Run the platform's probe program under ``accel``: QEMU starts paused (at most
    ``start_timeout``), then the program has ``timeout`` from the vCPUs' start to put its
    marker on the serial port (with ``until_exit``: until QEMU exits).  The program reaches
    QEMU as a memfd (``/proc/self/fd/N``) and QMP is a socketpair: nothing on the filesystem.
    Raises OSError if QEMU cannot be started."""
    fd = os.memfd_create("harness-kvm-probe", os.MFD_CLOEXEC)
    ours, theirs = socket.socketpair()
    try:
        os.write(fd, platform.kvm_probe.build(PROBE_MARKER))
        argv = kvm_probe_argv(platform, qemu, f"/proc/self/fd/{fd}", theirs.fileno(), accel)
        launched = time.monotonic()
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            die_with_harness(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, process_group=0, pass_fds=(fd, theirs.fileno()))
    except BaseException:
        ours.close()
        raise
    finally:
        os.close(fd)
        theirs.close()
    output = errors = qmp = b""
    running: float | None = None
    deadline = launched + start_timeout
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with contextlib.suppress(OSError):  # a QEMU that died at once: its stderr says why
            ours.sendall(_QMP_START)
        with selectors.DefaultSelector() as sel:
            for stream in (proc.stdout, proc.stderr, ours):
                sel.register(stream, selectors.EVENT_READ)
            while sel.get_map() and (until_exit or PROBE_MARKER not in output):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(remaining):
                    try:
                        chunk = (ours.recv(65536) if key.fileobj is ours
                                 else os.read(key.fd, 65536))
                    except ConnectionResetError:  # QEMU gone with our commands unread
                        chunk = b""
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        output = (output + chunk)[-65536:]
                    elif key.fileobj is proc.stderr:
                        errors = (errors + chunk)[-65536:]
                    else:
                        qmp = (qmp + chunk)[-65536:]
                        # the second answer (to "cont"): the vCPUs run from now on
                        if running is None and qmp.count(b'"return"') >= 2:
                            running = time.monotonic()
                            deadline = running + timeout
            closed = not (set(sel.get_map() or {}) & {proc.stdout, proc.stderr})
        # Exited, or killed below: an exit status only for a QEMU that ended on its own.
        status = proc.wait(timeout=max(0.1, deadline - time.monotonic())) \
            if closed else proc.poll()
    except subprocess.TimeoutExpired:
        status = None
    finally:
        ours.close()
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return ProbeRun(tuple(argv), output, errors, status, time.monotonic() - launched,
                    None if running is None else running - launched)


def probe_kvm(platform: Platform, qemu: str | None,
              timeout: float = PROBE_TIMEOUT_S) -> KvmProbe:
    """Run the probe program under KVM: usable if its marker reaches the serial port."""
    problem = kvm_device_problem()
    if problem:
        return KvmProbe(False, problem, 0.0)
    binary = qemu or platform.qemu
    if shutil.which(binary) is None:
        return KvmProbe(False, f"{binary} is not installed, so KVM cannot be probed", 0.0)
    try:
        run = run_probe_program(platform, binary, "kvm", timeout, start_timeout=START_TIMEOUT_S)
    except OSError as exc:
        return KvmProbe(False, f"cannot run {binary}: {exc.strerror}", 0.0)
    if run.marker_seen:
        when = (f"{run.seconds * 1000:.0f} ms after QEMU's launch" if run.start_seconds is None
                else f"{(run.seconds - run.start_seconds) * 1000:.0f} ms after its vCPU "
                f"started (QEMU's own start: {run.start_seconds * 1000:.0f} ms)")
        return KvmProbe(True, f"a guest program ran under KVM and wrote to the serial port "
                        f"{when}", run.seconds)
    message = run.errors.decode(errors="replace").strip().splitlines()
    if message:
        return KvmProbe(False, f"QEMU with -accel kvm -cpu host failed: {message[-1]}",
                        run.seconds)
    if run.exit_status is not None:
        return KvmProbe(False, f"QEMU exited {run.exit_status} under KVM before the guest "
                        "program wrote anything to the serial port", run.seconds)
    if run.start_seconds is None:
        return KvmProbe(False, f"QEMU did not start its vCPU under KVM within "
                        f"{START_TIMEOUT_S:g} s", run.seconds, definite=False)
    return KvmProbe(False, f"a guest program wrote nothing under KVM within {timeout:g} s "
                    "of its vCPU starting (/dev/kvm exists but runs no guest code)",
                    run.seconds, definite=False)


def _cache_key(platform: Platform, qemu: str) -> str:
    """This host boot, this QEMU binary (an upgrade changes it) and this probe program."""
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    digest = hashlib.sha256(f"{_CACHE_VERSION}:{boot_id}:{platform.arch}".encode())
    path = shutil.which(qemu) or qemu
    try:
        stat = Path(path).resolve().stat()
        digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    except OSError:
        digest.update(path.encode())
    digest.update(platform.kvm_probe.build(PROBE_MARKER))
    return digest.hexdigest()[:16]


def cached_probe_kvm(platform: Platform, qemu: str | None, cache_dir: Path) -> KvmProbe:
    """:func:`probe_kvm`, its definite answers kept in ``cache_dir/kvm-probe.json`` for this
    host boot; an answer that was only "nothing in time" is asked again next time."""
    binary = qemu or platform.qemu
    path = cache_dir / "kvm-probe.json"
    key = _cache_key(platform, binary)
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return KvmProbe(**cached["probe"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    probe = probe_kvm(platform, binary)
    if probe.definite:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "probe": asdict(probe)}))
    return probe


def choose_accel(requested: Accel, platform: Platform, qemu: str | None,
                 cache_dir: Path) -> AccelDecision:
    """Resolve ``auto`` by the probe program; refuse ``kvm`` where /dev/kvm cannot be opened
    or the guest is of another architecture than the host."""
    if requested == Accel.TCG:
        return AccelDecision("tcg", "TCG requested by the scenario", False)
    host = host_platform()
    if platform is not host:
        reason = (f"an {platform.arch} guest on an {host.arch} host runs under TCG "
                  "(KVM runs only guests of the host's architecture)")
        if requested == Accel.KVM:
            raise HostError("accel kvm", reason)
        return AccelDecision("tcg", reason, False)
    if requested == Accel.KVM:
        # Asked for by name: no probe, only whether KVM can be opened at all; a guest that
        # then cannot boot fails its readiness wait with the console tail.
        problem = kvm_device_problem()
        if problem:
            raise HostError("accel kvm", problem)
        return AccelDecision("kvm", "KVM requested by the scenario (not probed)", True)
    probe = cached_probe_kvm(platform, qemu, cache_dir)
    if probe.usable:
        return AccelDecision("kvm", probe.reason, True)
    return AccelDecision("tcg", f"KVM not usable, falling back to TCG: {probe.reason}", False)


def kvm_probe(kernel: Path | None = None, cache_dir: Path | None = None,
              qemu: str | None = None) -> Callable[[], KvmProbe]:
    """The live probe for this host's platform, cached in ``cache_dir`` when one is given.
    ``kernel`` is not used any more (the probe runs its own program)."""
    del kernel
    platform = host_platform()

    def probe() -> KvmProbe:
        problem = kvm_device_problem()
        if problem:
            return KvmProbe(False, problem, 0.0)
        binary = qemu or platform.qemu
        if cache_dir is None or shutil.which(binary) is None:
            return probe_kvm(platform, binary)
        return cached_probe_kvm(platform, binary, cache_dir)

    return probe
