"""Scratch folders of killed harness processes are swept; live ones are kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.scratch import scratch_dir, scratch_root, sweep, tidy


def test_sweep_removes_a_dead_processs_folder_and_keeps_the_living(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    mine = scratch_dir()
    assert mine.stat().st_mode & 0o777 == 0o700
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dead = scratch_root() / gone
    dead.mkdir()
    (dead / "run.g.disk0.img").write_bytes(b"")
    living = scratch_root() / "1"  # init: always alive
    living.mkdir()
    assert sweep() == [dead]
    assert mine.is_dir() and living.is_dir() and not dead.exists()



def test_tidy_removes_this_processs_folder_only_when_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    disk = scratch_dir() / "run.g.disk0.img"
    disk.write_bytes(b"")
    tidy()
    assert disk.exists()  # a VM's disk is still there: kept
    disk.unlink()
    tidy()
    assert not disk.parent.exists()
