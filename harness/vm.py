"""One scenario VM, booted and reachable: image, accelerator, devices, QEMU, SSH and agent.

``GuestVM`` is the unit the runner and the pytest fixtures share.  Readiness is a chain of
small waits, each with its own failure that says what was waited for: QMP greeting (in
Machine.launch), the init's first console line, the host key on the console, SSH, the agent.
Every wait fails fast with the console tail if the guest panics or QEMU exits; one that
times out says what the vCPUs were doing (``<vm>.stuck.txt`` keeps the register samples).
A kernel that never reaches init may be booted again (:meth:`GuestVM.relaunch`): the
earlier attempt's console, QEMU log, argv and samples stay beside, named ``<vm>.attempt1.*``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from harness.config.model import VM, BuiltinImage, CloudImage, KernelImage
from harness.errors import GuestError, GuestTimeout
from harness.guest.agent import GuestAgent, GuestSnapshot
from harness.guest.ssh import ClientKey, CommandResult, GuestSSH, parse_host_key, preload
from harness.host.accel import AccelDecision, choose_accel
from harness.host.kmsg import KernelLog
from harness.images.builder import (
    GuestImage,
    Recipe,
    UserKernel,
    cache_root,
    choose_recipe,
    ensure_image,
)
from harness.images.cloud import make_overlay, make_seed
from harness.platform import Platform, platform_for
from harness.qemu import argv as qargv
from harness.qemu.machine import Machine, check_qemu_binary
from harness.qemu.qmp import QmpError
from harness.qemu.vcpus import describe, sample_threads, take_samples
from harness.scratch import scratch_dir

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def builtin_recipe(spec: VM, platform: Platform) -> Recipe:
    """The builtin recipe: the scenario's, or the platform's cheapest that has every driver
    the devices need."""
    image = spec.image
    if isinstance(image, BuiltinImage) and image.recipe is not None:
        return Recipe.load(image.recipe)
    return choose_recipe(platform, spec.guest_modules)


@dataclass
class BootTimes:
    """Monotonic timestamps of the boot milestones, for the phase table and the bench."""

    launch: float = 0.0
    qmp_ready: float = 0.0
    init_started: float = 0.0
    guest_ready: float = 0.0
    ssh_ready: float = 0.0

    def phases(self) -> list[tuple[str, float]]:
        return [("QEMU start", self.qmp_ready - self.launch),
                ("kernel to init", self.init_started - self.qmp_ready),
                ("init to sshd", self.guest_ready - self.init_started),
                ("SSH ready", self.ssh_ready - self.guest_ready)]


@dataclass
class GuestVM:
    """A VM of the scenario.  ``with GuestVM(...) as vm: vm.boot()``; teardown always runs."""

    spec: VM
    run_dir: Path
    progress: Progress = field(default=lambda message: None)
    boot_timeout: float = 120.0
    shutdown_timeout: float = 10.0
    init_timeout: float | None = None  # QEMU start to init's first line (None: boot_timeout)
    accel: AccelDecision | None = None
    image: GuestImage | None = None
    placed: tuple[qargv.PlacedDevice, ...] = ()
    machine: Machine | None = None
    ssh: GuestSSH | None = None
    agent: GuestAgent | None = None
    times: BootTimes = field(default_factory=BootTimes)
    # ``harness up``: a QMP monitor for people on this Unix socket path (in a private 0700
    # folder the caller made); None: the harness's own socketpair monitor only
    user_qmp: Path | None = None
    # earlier boots of this VM whose kernel never reached init, why in one line, oldest first
    retried_boots: list[str] = field(default_factory=list)
    retried_seconds: float = 0.0  # the time they took, launch to teardown
    _client_key: ClientKey | None = None
    _ssh_user: str = "root"
    _host_log: KernelLog | None = None  # the host's kernel log since QEMU's start
    _scratch: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def platform(self) -> Platform:
        return platform_for(self.spec.arch)

    def recipe(self) -> Recipe:
        """The builtin recipe this VM boots (:func:`builtin_recipe`)."""
        return builtin_recipe(self.spec, self.platform)

    def __repr__(self) -> str:
        return f"<GuestVM {self.name} {self.machine!r}>"

    # --- preparation (no QEMU yet) ----------------------------------------------------------

    def prepare(self) -> None:
        """Image, accelerator and device placement; raises before anything is started."""
        image, platform = self.spec.image, self.platform
        if self.spec.qemu is not None:
            check_qemu_binary(self.spec.qemu, platform)
        if isinstance(image, CloudImage):
            self.image = None  # the accelerator probe runs a program of its own, no kernel
        else:
            user_kernel = (UserKernel(Path(image.kernel), platform,
                                      Path(image.modules) if image.modules else None)
                           if isinstance(image, KernelImage) else None)
            self.image = ensure_image(self.recipe().name, platform, progress=self.progress,
                                      user_kernel=user_kernel)
        self.accel = choose_accel(self.spec.accel, platform, self.spec.qemu, cache_root())
        self.progress(f"{self.name}: accel {self.accel.accel} ({self.accel.reason})")
        self.placed = qargv.place_devices(self.spec.devices, platform)

    @property
    def kernel_release(self) -> str:
        return self.image.kernel_release if self.image else "(the cloud image's own)"

    @property
    def image_key(self) -> str:
        if self.image is not None:
            return self.image.key
        return str(getattr(self.spec.image, "disk", ""))

    def _boot_spec(self, client_key: ClientKey) -> tuple[qargv.Boot, str]:
        """What QEMU boots, and the SSH user."""
        image = self.spec.image
        if isinstance(image, CloudImage):
            overlay = make_overlay(Path(image.disk), image.format, self.run_dir, self.name)
            seed = make_seed(self.run_dir, self.name, client_key.public_line, image.user,
                             self.platform.console)
            self._scratch += [overlay, seed]
            return qargv.Boot(disk=overlay, seed=seed), image.user
        assert self.image is not None
        nic = self._ssh_nic()
        address, gateway = nic.guest_address()
        # Every other NIC gets its address too (no default route: that is the SSH NIC's), so
        # a workload can use it at once: 10.0.3.2 is the second NIC's gateway, and so on.
        others = [f"harness.nic={p.mac},{p.guest_address()[0]}" for p in self.placed
                  if p.device.nic and p is not nic]
        append = " ".join(filter(None, [
            qargv.base_append(self.platform), f"harness.net={nic.mac}", f"harness.ip={address}",
            f"harness.gw={gateway}", *others,
            f"harness.ssh_key={client_key.public_b64}", self.spec.append]))
        return qargv.Boot(kernel=self.image.kernel, initrd=self.image.initrd,
                          append=append), "root"

    def _ssh_nic(self) -> qargv.PlacedDevice:
        nics = [p for p in self.placed if p.device.ssh_nic()]
        if len(nics) != 1:
            raise GuestError(self.name, "the VM needs exactly one NIC with ssh: true")
        return nics[0]

    def _scratch_files(self) -> dict[str, Path]:
        """A sparse scratch file (it costs no disk) for each device that needs one, in this
        process's scratch folder (swept by the next run should this one be killed)."""
        files = {}
        for placed in self.placed:
            size = placed.device.scratch_size()
            if size is not None:
                path = scratch_dir() / f"{self.run_dir.name}.{self.name}.{placed.device.id}.img"
                with open(path, "wb") as fh:
                    fh.truncate(size)
                self._scratch.append(path)
                files[placed.device.id] = path
        return files

    # --- boot --------------------------------------------------------------------------------

    def launch(self) -> None:
        """Start QEMU and return at once; :meth:`wait_ready` waits for the guest."""
        if self.accel is None:
            self.prepare()
        assert self.accel is not None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        client_key = ClientKey.generate()
        preload()  # the SSH library loads while QEMU starts and the guest boots
        self._ssh_nic()
        boot, user = self._boot_spec(client_key)
        scratch = self._scratch_files()
        accel, platform = self.accel.accel, self.platform

        listener = self._user_qmp_listener()

        def argv_for(qmp_fd: int, console_fd: int) -> list[str]:
            return qargv.build_argv(platform, self.spec, accel, boot, self.placed, scratch,
                                    qmp_fd, console_fd,
                                    listener.fileno() if listener is not None else None)

        self.machine = Machine(self.name, argv_for, self.run_dir,
                               extra_fds=(listener.fileno(),) if listener is not None else ())
        if self._host_log is not None:
            self._host_log.close()
        self._host_log = KernelLog.open()
        self.progress(f"{self.name}: starting QEMU ({accel}, {self.spec.cpus} vCPU, "
                      f"{self.spec.memory_mib} MiB)")
        try:
            self.machine.launch()
        finally:
            if listener is not None:
                listener.close()  # QEMU holds its own copy
        self._client_key = client_key
        self._ssh_user = user

    def _user_qmp_listener(self) -> socket.socket | None:
        """The listening socket of the people's QMP monitor, 0600, if one is wanted."""
        if self.user_qmp is None:
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.user_qmp))
            os.chmod(self.user_qmp, 0o600)
            listener.listen(4)
        except OSError as exc:
            listener.close()
            raise GuestError(self.name, f"cannot make the QMP socket {self.user_qmp}: "
                             f"{exc.strerror}") from exc
        self._scratch.append(self.user_qmp)
        return listener

    @property
    def client_key(self) -> ClientKey | None:
        """The run's SSH key for this VM (made at launch)."""
        return self._client_key

    @property
    def ssh_user(self) -> str:
        return self._ssh_user

    def boot(self) -> None:
        """Launch and wait until the guest answers over SSH."""
        self.launch()
        self.wait_ready()

    def wait_ready(self) -> None:
        """Init started, host key on the console, SSH up, agent answering."""
        if self.machine is None or self._client_key is None:
            raise GuestError(self.name, "not launched")
        client_key, user = self._client_key, self._ssh_user
        assert self.machine.console is not None
        console = self.machine.console
        assert self.machine.launched_at is not None and self.machine.qmp_ready_at is not None
        self.times.launch = self.machine.launched_at
        self.times.qmp_ready = self.machine.qmp_ready_at
        deadline = self.machine.launched_at + self.boot_timeout
        init_limit = min(self.init_timeout or self.boot_timeout, self.boot_timeout)
        init_deadline = self.machine.launched_at + init_limit

        def left(until: float = deadline) -> float:
            return max(until - time.monotonic(), 0.1)

        try:
            console.wait_for(r"^harness-init: start", left(init_deadline),
                             "the guest's init to start")
        except GuestTimeout as exc:
            raise self._stuck(f"the guest's init did not start within {init_limit:g} s of "
                              "QEMU's start", exc.console_tail, before_init=True) from None
        except GuestError as exc:
            # The kernel panicked (on the console) or the guest reset itself (-no-reboot
            # makes that QEMU's exit): its own doing, before init.  QEMU killed or failing
            # is not, and is never booted again.
            death = self.machine.death_within(2.0)  # the console closes a moment before
            own = death is None or self.machine.shutdown_reason in ("guest-reset",
                                                                     "guest-panic")
            raise GuestError(self.name, f"{exc.reason}: QEMU {death}" if death else exc.reason,
                             exc.console_tail, before_init=own) from None
        self.times.init_started = console.first_time(r"^harness-init: start") or time.monotonic()
        self.progress(f"{self.name}: kernel booted, init running")
        try:
            host_key_line = console.wait_for(r"^harness-hostkey: (ssh-\S+ \S+)", left(),
                                             "the guest's SSH host key").group(1)
            console.wait_for(r"^harness-init: ready", left(), "the guest's init to finish")
        except GuestTimeout as exc:
            raise self._stuck(exc.reason, exc.console_tail, before_init=False) from None
        self.times.guest_ready = console.first_time(r"^harness-init: ready") or time.monotonic()
        port = self.machine.ssh_port()
        self.ssh = GuestSSH(self.name, port, parse_host_key(host_key_line), client_key, user)
        self.ssh.connect(left(), self.machine.is_alive, console.tail)
        self.agent = GuestAgent(self.ssh)
        self.agent.check_version()
        self.times.ssh_ready = time.monotonic()
        self.progress(f"{self.name}: SSH ready on 127.0.0.1:{port} "
                      f"({self.times.ssh_ready - self.times.launch:.1f} s after launch)")

    def _stuck(self, reason: str, console_tail: str, before_init: bool) -> GuestTimeout:
        """A wait that timed out (``reason``), with what the vCPUs were doing added: their
        threads on the host over a second, then three register samples over a second, all
        kept in ``<vm>.stuck.txt`` (:mod:`harness.qemu.vcpus`)."""
        assert self.machine is not None and self.machine.qmp is not None
        machine, qmp = self.machine, self.machine.qmp
        path = self.run_dir / f"{self.name}.stuck.txt"
        kept: list[str] = []
        readings: list[str] = []
        try:
            status = qmp.execute("query-status", timeout=5.0)
            kept.append(f"query-status: {status}")
            state = status.get("status", "?") if isinstance(status, dict) else "?"
            if state != "running":
                readings.append(f"QEMU says the VM is {state}")
            cpus = qmp.execute("query-cpus-fast", timeout=5.0)
            tids = {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}
        except (QmpError, KeyError, TypeError, ValueError) as exc:
            tids = {}
            readings.append(f"vCPU threads not named ({exc})")
        if tids and machine.pid is not None:
            reading, threads = sample_threads(machine.pid, tids)
            readings.append(reading)
            kept += threads
        try:
            samples = take_samples(lambda: qmp.hmp("info registers -a", timeout=5.0))
        except QmpError as exc:
            death = machine.death_within(2.0)
            readings.append(f"QEMU {death} answering info registers" if death
                            else f"vCPU registers not read ({exc})")
        else:
            readings.append(describe(samples, self.platform))
            kept += [f"\n--- info registers -a, +{at - samples[0][0]:.2f} s ---\n{text}"
                     for at, text in samples]
        if self._host_log is not None:
            records, dropped = self._host_log.read()
            serious = [r for r in records if r.level <= 4]
            readings.append(
                f"host kernel: {len(records) + dropped} line(s) since QEMU's start"
                + (f", {len(serious)} warning(s) or worse, the last: {serious[-1].text!r}"
                   if serious else ""))
            kept += [f"\n--- the host kernel's log since QEMU's start ({dropped} older "
                     "line(s) not kept) ---", *map(str, records)]
        reading = "; ".join(readings)
        try:
            path.write_text("\n".join(kept) + "\n")
            reading += f" ({path.name})"
        except OSError as exc:
            reading += f" (samples not kept: {exc.strerror})"
        log.info("%s: %s: %s", self.name, reason, reading)
        return GuestTimeout(self.name, f"{reason}; {reading}", console_tail,
                            before_init=before_init)

    def relaunch(self, failed: GuestError) -> None:
        """Tear down a boot whose kernel never reached init (``failed``, from
        :meth:`wait_ready`) and launch again.

        That attempt's console log, QEMU log, argv and register samples are renamed
        ``<vm>.attemptN.*``; ``retried_boots`` keeps its reason for the report."""
        if self.machine is None:
            raise GuestError(self.name, "not launched")
        self.retried_boots.append(failed.reason)
        self.machine.shutdown(self.shutdown_timeout)
        if self.machine.launched_at is not None:
            self.retried_seconds += time.monotonic() - self.machine.launched_at
        attempt = len(self.retried_boots)
        # its reason names its register samples, which move to the attempt's name
        self.retried_boots[-1] = failed.reason.replace(
            f"({self.name}.stuck.txt)", f"({self.name}.attempt{attempt}.stuck.txt)")
        for suffix in ("console.log", "qemu.log", "argv", "stuck.txt"):
            path = self.run_dir / f"{self.name}.{suffix}"
            if path.exists():
                path.rename(self.run_dir / f"{self.name}.attempt{attempt}.{suffix}")
        if self.user_qmp is not None:
            self.user_qmp.unlink(missing_ok=True)
        self.machine, self._client_key, self.times = None, None, BootTimes()
        self.launch()

    # --- use ---------------------------------------------------------------------------------

    def snapshot(self) -> GuestSnapshot:
        if self.agent is None:
            raise GuestError(self.name, "not booted")
        return self.agent.snapshot()

    def run(self, argv: tuple[str, ...] | list[str], timeout: float,
            output: Callable[[bytes], object] | None = None) -> CommandResult:
        """Run ``argv`` in the guest for at most ``timeout`` seconds of wall clock; its output
        goes to ``output`` as it arrives and only its tail is kept (see GuestSSH.run)."""
        if self.ssh is None:
            raise GuestError(self.name, "not booted")
        return self.ssh.run(argv, timeout, output=output)

    def console_tail(self) -> str:
        return self.machine.console.tail() if self.machine and self.machine.console else ""

    # --- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Idempotent: SSH, then QEMU (quit, SIGTERM, SIGKILL), then scratch disks."""
        if self._host_log is not None:
            self._host_log.close()
            self._host_log = None
        if self.ssh is not None:
            self.ssh.close()
        if self.machine is not None:
            self.machine.shutdown(self.shutdown_timeout)
        for path in self._scratch:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._scratch.clear()

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
