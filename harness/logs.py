"""Where log records go: the run folder's ``harness.log`` holds everything of a run, at debug
level; stderr gets only the harness's own warnings (all of its records with ``-v``).

The libraries under the harness speak loudly on their own: ``qemu.qmp`` logs every
disconnect as an error and paramiko logs a traceback for every banner it could not read
while a guest boots.  Those records are evidence of a run, not messages for its user, so
they never propagate to the root logger: they reach the run's log only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

#: Loggers kept off stderr (and off pytest's captured output): the run's log has them.
LIBRARIES = ("qemu.qmp", "paramiko")
_FORMAT = "%(asctime)s %(threadName)s %(name)s %(levelname)s: %(message)s"


def quiet_libraries() -> None:
    """Stop the libraries' records at their own loggers (idempotent)."""
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        logger.propagate = False
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())


class _RunLogHandler(logging.FileHandler):
    """The run folder's log.  A record it cannot write (a full disk) ends its writing
    quietly: logging's default prints a traceback per record on stderr, and the run's own
    error already says what happened to the disk."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # what was buffered cannot go to a full disk either
            self.broken = True


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[Path]:
    """Every record of the harness and its libraries, at debug level, into ``path`` while
    inside; the levels and handlers in place before are restored after."""
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT))
    loggers = [logging.getLogger(name) for name in ("harness", *LIBRARIES)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.DEBUG:
            logger.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()
