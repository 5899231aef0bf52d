"""Decide the accelerator: KVM only if it can really run a guest here, else TCG.

``/dev/kvm`` existing proves little: on some hosts a stock guest kernel hangs under it, or
``-cpu host`` fails to set an MSR.  The probe boots the guest kernel itself under KVM and waits
for the kernel's first console line.  The answer is cached per host boot (``boot_id``), QEMU
binary and kernel, so only the first run on a host pays for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import selectors
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.config.model import Accel
from harness.errors import HostError
from harness.qemu.machine import DIE_WITH_HARNESS

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 8.0
_KERNEL_ALIVE = b"Linux version"


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


def kvm_device_problem(dev: Path = Path("/dev/kvm")) -> str | None:
    if not dev.exists():
        return "/dev/kvm does not exist (KVM module not loaded, or no virtualization support)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def probe_kvm(qemu: str, kernel: Path, timeout: float = PROBE_TIMEOUT_S) -> KvmProbe:
    """Boot ``kernel`` under KVM with no initramfs; usable if it prints its banner in time."""
    problem = kvm_device_problem()
    if problem:
        return KvmProbe(False, problem, 0.0)
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", str(kernel),
            "-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            [*DIE_WITH_HARNESS, *argv], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0)
    except OSError as exc:
        return KvmProbe(False, f"cannot run {qemu}: {exc.strerror}", 0.0)
    seen = b""
    errors = b""
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while _KERNEL_ALIVE not in seen and sel.get_map():
                remaining = started + timeout - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in sel.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        seen += chunk
                    else:
                        errors += chunk
    finally:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close() if proc.stdout else None
        proc.stderr.close() if proc.stderr else None
    seconds = time.monotonic() - started
    if _KERNEL_ALIVE in seen:
        return KvmProbe(True, f"a guest kernel booted under KVM in {seconds:.1f} s", seconds)
    message = errors.decode(errors="replace").strip().splitlines()
    if message:
        return KvmProbe(False, f"QEMU with -accel kvm -cpu host failed: {message[-1]}",
                        seconds)
    return KvmProbe(False, f"a guest kernel printed nothing under KVM within {timeout:.0f} s "
                    "(/dev/kvm exists but cannot run this guest)", seconds)


def _cache_key(qemu: str, kernel: Path) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    digest = hashlib.sha256(boot_id.encode())
    digest.update(qemu.encode())
    stat = kernel.stat()
    digest.update(f"{kernel}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_probe_kvm(qemu: str, kernel: Path, cache_dir: Path) -> KvmProbe:
    path = cache_dir / "kvm-probe.json"
    key = _cache_key(qemu, kernel)
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return KvmProbe(**cached["probe"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    probe = probe_kvm(qemu, kernel)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "probe": asdict(probe)}))
    return probe


def choose_accel(requested: Accel, qemu: str, kernel: Path | None,
                 cache_dir: Path) -> AccelDecision:
    """Resolve ``auto`` by a boot test; refuse ``kvm`` where /dev/kvm cannot be opened."""
    if requested == Accel.TCG:
        return AccelDecision("tcg", "TCG requested by the scenario", False)
    if requested == Accel.KVM:
        # Asked for by name: no boot test, only whether KVM can be opened at all; a guest
        # that then cannot boot fails its readiness wait with the console tail.
        problem = kvm_device_problem()
        if problem:
            raise HostError("accel kvm", problem)
        return AccelDecision("kvm", "KVM requested by the scenario (not boot-tested)", True)
    if kernel is None:
        problem = kvm_device_problem()
        probe = KvmProbe(problem is None, problem or "/dev/kvm is usable (not boot-tested)", 0)
    else:
        probe = cached_probe_kvm(qemu, kernel, cache_dir)
    if probe.usable:
        return AccelDecision("kvm", probe.reason, True)
    return AccelDecision("tcg", f"KVM not usable, falling back to TCG: {probe.reason}", False)
