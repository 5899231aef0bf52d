"""The run folder's log on a full disk: quiet, never a traceback per record on stderr."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from harness.logs import run_log


def test_a_full_disk_stops_the_run_log_without_a_word(capsys: pytest.CaptureFixture[str]) -> None:
    # /dev/full answers every write with ENOSPC, as a full disk does.
    with run_log(Path("/dev/full")):
        for _ in range(50):
            logging.getLogger("harness.test").debug("%s", "x" * 500)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err


def test_the_run_log_keeps_every_record_when_it_can(tmp_path: Path) -> None:
    with run_log(tmp_path / "harness.log"):
        logging.getLogger("harness.test").debug("kept")
        logging.getLogger("paramiko.transport").debug("theirs too")
    text = (tmp_path / "harness.log").read_text()
    assert "harness.test DEBUG: kept" in text and "paramiko.transport DEBUG: theirs too" in text
