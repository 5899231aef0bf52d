"""Which QEMU processes run on this host: the system tests' check that nothing leaks.
(A plain module beside the tests, which pytest puts on sys.path: the tests are no package.)"""

from __future__ import annotations

from pathlib import Path


def qemu_pids(parent: int | None = None) -> set[int]:
    """QEMU processes on the host, or only the children of ``parent``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if not (entry / "comm").read_text().startswith("qemu-system"):
                    continue
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent is None or ppid == parent:
                pids.add(int(entry.name))
    return pids
