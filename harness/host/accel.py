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
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import HostError
from harness.platform import Accel, Platform, host_platform
from harness.qemu.argv import die_with_harness, kvm_probe_argv

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


def probe_kvm(platform: Platform, qemu: str | None, kernel: Path,
              timeout: float = PROBE_TIMEOUT_S) -> KvmProbe:
    """Boot ``kernel`` under KVM with no initramfs; usable if it prints its banner in time."""
    problem = kvm_device_problem()
    if problem:
        return KvmProbe(False, problem, 0.0)
    argv = kvm_probe_argv(platform, qemu, kernel)
    qemu = argv[0]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
            die_with_harness(argv), stdin=subprocess.DEVNULL,
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


def _cache_key(qemu: str | None, kernel: Path) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    digest = hashlib.sha256(boot_id.encode())
    digest.update((qemu or "").encode())
    stat = kernel.stat()
    digest.update(f"{kernel}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_probe_kvm(platform: Platform, qemu: str | None, kernel: Path,
                     cache_dir: Path) -> KvmProbe:
    path = cache_dir / "kvm-probe.json"
    key = _cache_key(qemu, kernel)
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return KvmProbe(**cached["probe"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    probe = probe_kvm(platform, qemu, kernel)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "probe": asdict(probe)}))
    return probe


def choose_accel(requested: Accel, platform: Platform, qemu: str | None, kernel: Path | None,
                 cache_dir: Path) -> AccelDecision:
    """Resolve ``auto`` by a boot test; refuse ``kvm`` where /dev/kvm cannot be opened or the
    guest is of another architecture than the host."""
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
        probe = cached_probe_kvm(platform, qemu, kernel, cache_dir)
    if probe.usable:
        return AccelDecision("kvm", probe.reason, True)
    return AccelDecision("tcg", f"KVM not usable, falling back to TCG: {probe.reason}", False)


def kvm_probe(kernel: Path | None = None, cache_dir: Path | None = None,
              qemu: str | None = None) -> Callable[[], KvmProbe]:
    """The live probe for this host's platform: boot ``kernel`` (default: the host's own
    ``/boot/vmlinuz-<release>``) under KVM, cached in ``cache_dir`` when one is given."""
    platform = host_platform()

    def probe() -> KvmProbe:
        problem = kvm_device_problem()
        if problem:
            return KvmProbe(False, problem, 0.0)
        binary = qemu or platform.qemu
        if shutil.which(binary) is None:
            return KvmProbe(False, f"{binary} is not installed, so KVM cannot be boot-tested",
                            0.0)
        boot = kernel
        if boot is None:
            own = Path(f"/boot/vmlinuz-{os.uname().release}")
            boot = own if own.is_file() else None
        if boot is None:
            return KvmProbe(True, "/dev/kvm is usable (not boot-tested: no guest kernel "
                            "cached; run 'harness image build')", 0.0)
        if cache_dir is None:
            return probe_kvm(platform, binary, boot)
        return cached_probe_kvm(platform, binary, boot, cache_dir)

    return probe
