"""The suite's own set-up (the harness's pytest plugin, for users, is harness.pytest_plugin)."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Tests send Ctrl-C (SIGINT) to the harnesses they start and expect the teardown it
    triggers.  A job started in the background without job control (``cmd &`` in a script)
    runs with SIGINT ignored, every child inherits that, and Python then leaves SIGINT
    ignored: those harnesses would never see the Ctrl-C.  A handler here (not an ignore) is
    reset to the default in each child at exec, so each harness gets its KeyboardInterrupt."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
