"""One root error for the harness; subclasses carry what a user needs to act.

Third-party errors (yaml, paramiko, qemu.qmp, OSError) are translated into these at the
boundary with ``raise ... from exc``.  Exit codes are chosen here once and mapped by the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence


class HarnessError(Exception):
    """Root of every error the harness raises on purpose."""

    exit_code = 1


class ConfigError(HarnessError):
    """A scenario file (or other user input) is malformed: ``file:line: key.path: reason``."""

    exit_code = 2

    def __init__(self, file: str, line: int | None, key: str, reason: str) -> None:
        self.file = file
        self.line = line
        self.key = key
        self.reason = reason
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {key}: {reason}" if key else f"{where}: {reason}")


class UsageError(HarnessError):
    """The command line asked for something impossible."""

    exit_code = 2


class HostError(HarnessError):
    """The host cannot do what was asked; names the device or capability and why."""

    exit_code = 3

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"{subject}: {reason}")


class StateError(HarnessError):
    """An object was used in a state that does not allow the call (a bug in the caller)."""

    exit_code = 70


class LaunchError(HarnessError):
    """QEMU failed to start or died early: carries its exit code, argv and output."""

    exit_code = 4

    def __init__(self, name: str, reason: str, argv: Sequence[str] = (),
                 returncode: int | None = None, output: str = "") -> None:
        self.name = name
        self.reason = reason
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(f"{name}: {reason}")


class GuestError(HarnessError):
    """The guest did not become ready or an agent command failed; carries the console tail.

    ``before_init``: the guest's kernel never started init (it hung, or reset and QEMU
    exited): the one boot failure a scenario's ``boot_attempts`` may boot again."""

    exit_code = 4

    def __init__(self, name: str, reason: str, console_tail: str = "",
                 before_init: bool = False) -> None:
        self.name = name
        self.reason = reason
        self.console_tail = console_tail
        self.before_init = before_init
        super().__init__(f"{name}: {reason}")


class GuestTimeout(GuestError):
    """The guest's console did not show what was awaited in time, QEMU still running."""


class ImageError(HarnessError):
    """A guest image could not be built or found."""

    exit_code = 3


class TextParseError(HarnessError):
    """Text that is not what its source prints (``/proc/interrupts``, ``vgic-state``):
    ``source:line: reason``."""

    exit_code = 2

    def __init__(self, source: str, line: int, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        super().__init__(f"{source or '<text>'}:{line}: {reason}")


class Interrupted(HarnessError):
    """The run was stopped by a signal; what was measured up to then is still reported."""

    exit_code = 130


class OutputError(HarnessError):
    """What the run measured could not be written (a full disk, a folder gone)."""

    exit_code = 4
