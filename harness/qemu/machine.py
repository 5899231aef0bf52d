"""One QEMU process: launch, QMP, console, and a shutdown that always finishes.

QEMU runs in its own process group under ``setpriv --pdeathsig KILL``, so it dies with the
harness even when the harness is SIGKILLed; QMP and the serial console are socketpairs, so no
socket exists on the filesystem.  Shutdown is a ladder (QMP quit, SIGTERM, SIGKILL to the
group), idempotent, and run from ``__exit__`` on every path.

The parent-death signal follows the *thread* that started QEMU: launch from a thread that
lives as long as the Machine (the main thread, as the CLI and pytest do).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from harness.errors import HarnessError, LaunchError, StateError, UsageError
from harness.platform import QEMU_SYSTEM_PREFIX, Platform
from harness.qemu.argv import die_with_harness
from harness.qemu.console import Console
from harness.qemu.qmp import QmpChannel, QmpError

log = logging.getLogger(__name__)

ArgvFactory = Callable[[int, int], list[str]]  # (qmp_fd, console_fd) -> argv

def check_qemu_binary(qemu: str, platform: Platform) -> Path:
    """A scenario's own ``qemu:`` must be a QEMU system emulator before anything runs it: an
    executable ELF file named like one (a script of that name is refused, and the binary is
    never run to ask it).  The platform's own name is the usual one."""
    found = shutil.which(qemu)
    if found is None:
        raise UsageError(f"qemu: {qemu}: not found or not executable")
    path = Path(found).resolve()
    if not path.name.startswith(QEMU_SYSTEM_PREFIX):
        raise UsageError(f"qemu: {qemu}: not a QEMU system emulator (its file is {path.name}, "
                         f"expected {QEMU_SYSTEM_PREFIX}*, e.g. {platform.qemu})")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UsageError(f"qemu: {qemu}: cannot read it: {exc.strerror}") from exc
    if magic != b"\x7fELF":
        raise UsageError(f"qemu: {qemu}: not a QEMU system emulator ({path} is not an "
                         "executable ELF file)")
    return path


class MachineState(enum.Enum):
    CREATED = "created"
    LAUNCHING = "launching"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Machine:
    """A QEMU process and its channels.  Use as a context manager."""

    def __init__(self, name: str, argv_factory: ArgvFactory, run_dir: Path,
                 qmp_timeout: float = 15.0, extra_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self._extra_fds = extra_fds  # more descriptors QEMU inherits (a listening socket)
        self.run_dir = run_dir
        self._argv_factory = argv_factory
        self._qmp_timeout = qmp_timeout
        self.state = MachineState.CREATED
        self.argv: list[str] = []
        self.console: Console | None = None
        self.qmp: QmpChannel | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = log.getChild(name)
        self.launched_at: float | None = None
        self.qmp_ready_at: float | None = None
        self.exit_code: int | None = None
        self.version = ""  # what QEMU says it is (QMP query-version), once launched

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"<Machine {self.name} {self.state.value} pid={pid}>"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"{self.name}.qemu.log"

    @property
    def console_path(self) -> Path:
        return self.run_dir / f"{self.name}.console.log"

    def _require(self, *states: MachineState) -> None:
        if self.state not in states:
            raise StateError(f"{self.name}: not allowed while {self.state.value}")

    # --- launch ------------------------------------------------------------------------------

    def launch(self) -> None:
        self._require(MachineState.CREATED)
        self.state = MachineState.LAUNCHING
        self.run_dir.mkdir(parents=True, exist_ok=True)
        qmp_ours, qmp_theirs = socket.socketpair()
        con_ours, con_theirs = socket.socketpair()
        try:
            self.argv = self._argv_factory(qmp_theirs.fileno(), con_theirs.fileno())
            (self.run_dir / f"{self.name}.argv").write_text(shlex.join(self.argv) + "\n")
            self._log.info("launching: %s", shlex.join(self.argv))
            with open(self.log_path, "wb") as out:
                try:
                    self._proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                        die_with_harness(self.argv),
                        pass_fds=(qmp_theirs.fileno(), con_theirs.fileno(),
                                  *self._extra_fds),
                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        process_group=0)
                except OSError as exc:
                    raise LaunchError(self.name, f"cannot start {self.argv[0]}: "
                                      f"{exc.strerror}", self.argv) from exc
            self.launched_at = time.monotonic()
            qmp_theirs.close()
            con_theirs.close()
            self.console = Console(self.name, con_ours, self.console_path)
            self.qmp = QmpChannel(self.name, self._log)
            try:
                self.qmp.connect(qmp_ours, self._qmp_timeout)
            except QmpError as exc:
                raise self._launch_failure("QEMU did not answer on QMP") from exc
            self.qmp_ready_at = time.monotonic()
            # The version for the report comes from QEMU itself, not from running the binary
            # a second time (which may be a user's file: it runs once, as the VM).
            self.version = self._query_version()
            self.state = MachineState.RUNNING
        except BaseException:
            qmp_theirs.close()
            con_theirs.close()
            if self.console is None:
                con_ours.close()
            if self.qmp is None:
                qmp_ours.close()
            self._teardown(grace=0.0)
            raise

    def _query_version(self) -> str:
        assert self.qmp is not None
        try:
            answer = self.qmp.execute("query-version")
            q, package = answer["qemu"], answer.get("package", "")
            return f"QEMU {q['major']}.{q['minor']}.{q['micro']} {package}".strip()
        except (QmpError, KeyError, TypeError) as exc:
            self._log.debug("query-version: %s", exc)
            return "unknown (QEMU did not answer query-version)"

    def _launch_failure(self, reason: str) -> LaunchError:
        code = None
        if self._proc is not None:
            try:
                code = self._proc.wait(2.0)
            except subprocess.TimeoutExpired:
                code = None
        output = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        first = next((ln for ln in output.splitlines() if ln.strip()), "")
        detail = f"{reason}; exit code {code}" if code is not None else reason
        if first:
            detail += f": {first.strip()}"
        return LaunchError(self.name, detail, self.argv, code, output)

    # --- while running -----------------------------------------------------------------------

    def ssh_port(self) -> int:
        """The host port slirp chose for the forward to the guest's port 22."""
        self._require(MachineState.RUNNING)
        assert self.qmp is not None
        text = self.qmp.hmp("info usernet")
        match = re.search(r"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+22\b", text)
        if not match:
            raise LaunchError(self.name, "no SSH port forward in 'info usernet'", self.argv,
                              None, text)
        return int(match.group(1))

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def death(self) -> str | None:
        """How a QEMU that was running died on its own ("killed by signal 9 (SIGKILL)",
        "exited with code 1"); None while it runs, before launch, or once torn down by us."""
        if self._proc is None or self.state is not MachineState.RUNNING:
            return None
        code = self._proc.poll()
        if code is None:
            return None
        self.exit_code = code
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "?"
            return f"killed by signal {-code} ({name})"
        why = self.shutdown_reason
        return f"exited with code {code}" + (f" ({why})" if why else "")

    def death_within(self, timeout: float) -> str | None:
        """:meth:`death`, once QEMU has exited or ``timeout`` passed: for a monitor that
        went away, which it does a moment before the process is gone."""
        if self._proc is not None and self.state is MachineState.RUNNING:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.death()

    @property
    def shutdown_reason(self) -> str | None:
        """The reason of QEMU's last SHUTDOWN event: "guest-reset" (a reboot under
        -no-reboot: with panic=-1, a kernel panic), "guest-panic", "guest-shutdown",
        "host-qmp-quit", ...; None if it sent none."""
        why = [e.get("data", {}).get("reason") for e in (self.qmp.events if self.qmp else ())
               if e.get("event") == "SHUTDOWN"]
        return str(why[-1]) if why and why[-1] else None

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (a guest that powers off)."""
        self._require(MachineState.RUNNING, MachineState.LAUNCHING)
        assert self._proc is not None
        try:
            self.exit_code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise LaunchError(self.name, f"still running after {timeout:g} s",
                              self.argv) from exc
        return self.exit_code

    # --- teardown ----------------------------------------------------------------------------

    def shutdown(self, timeout: float = 10.0) -> None:
        """QMP quit, then SIGTERM, then SIGKILL to QEMU's process group; always finishes."""
        if self.state in (MachineState.STOPPED, MachineState.CREATED):
            self.state = MachineState.STOPPED
            return
        self.state = MachineState.STOPPING
        self._teardown(grace=timeout)

    def _teardown(self, grace: float) -> None:
        # The budget: half for quit and the exit after it, half for SIGTERM, then SIGKILL.
        proc = self._proc
        quit_deadline = time.monotonic() + grace / 2
        if proc is not None and proc.poll() is None and self.qmp is not None and grace > 0:
            try:
                self.qmp.execute("quit", timeout=grace / 2)
            except HarnessError as exc:
                self._log.debug("quit: %s", exc)
        if proc is not None:
            for sig, wait in ((None, max(quit_deadline - time.monotonic(), 0.0)),
                              (signal.SIGTERM, grace / 2), (signal.SIGKILL, 5.0)):
                if sig is not None:
                    self._log.debug("sending %s to process group %d", sig.name, proc.pid)
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    self.exit_code = proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.qmp is not None:
            self.qmp.close()
        if self.console is not None:
            self.console.close()
        self.state = MachineState.STOPPED

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()
