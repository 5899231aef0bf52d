"""Scratch files of a running harness (sparse disks for virtio-blk), kept where the next run
finds them if this one is killed.

Each harness process has ``<cache>/scratch/<pid>/`` (mode 0700); a run removes its own files
when its VMs go, and :func:`sweep` (called at the start of every run and by
``harness restore``) removes the folders of processes that are gone, so a SIGKILL leaves
nothing behind for long.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from harness.images.builder import cache_root


def scratch_root() -> Path:
    return cache_root() / "scratch"


def scratch_dir() -> Path:
    """This process's scratch folder, made private on first use."""
    path = scratch_root() / str(os.getpid())
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def sweep() -> list[Path]:
    """Remove the scratch folders of harness processes that no longer exist."""
    removed: list[Path] = []
    try:
        entries = list(scratch_root().iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.isdigit() and int(entry.name) != os.getpid() and not _alive(
                int(entry.name)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def tidy() -> None:
    """This process's scratch folder, removed once it is empty (its VMs are gone)."""
    try:
        (scratch_root() / str(os.getpid())).rmdir()
    except OSError:
        pass  # absent, or still holding a VM's disk
