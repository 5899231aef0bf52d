"""The result store: merged nights kept where CI artifacts already live.

Two forms, one interface: an SQLite file (``*.sqlite``, ``*.sqlite3``, ``*.db``: the
embedded default, one file to keep as the merge job's artifact or on a runner's disk), or a
folder of ``<night>.merged.json`` files (marked by a ``HARNESS-STORE`` file; plain files to
keep in an artifact store or a git repository).  A night is a merged report
(``harness-merged/2``) under a name (default: the date of its first run); adding a night of
the same name again replaces it.  ``harness report diff`` reads the last night from it and
the nights before for its flakiness policy.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import UsageError
from harness.report.runs import MERGED_FORMAT

SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
MARKER = "HARNESS-STORE"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS nights (
    name TEXT PRIMARY KEY,
    added TEXT NOT NULL,
    passed INTEGER NOT NULL,
    merged TEXT NOT NULL
);
"""


def is_store(path: Path) -> bool:
    return (path.suffix in SQLITE_SUFFIXES and not path.is_dir()) or (path / MARKER).is_file()


def night_name(merged: dict[str, Any]) -> str:
    """The date (UTC) of the night's first run."""
    starts = sorted(str(r["report"].get("started") or "") for r in merged["runs"])
    try:
        return datetime.fromisoformat(starts[0]).astimezone(UTC).strftime("%Y-%m-%d")
    except (IndexError, ValueError):
        return datetime.now(UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Store:
    path: Path

    @property
    def sqlite(self) -> bool:
        return self.path.suffix in SQLITE_SUFFIXES

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path)
            db.executescript(_SCHEMA)
            return db
        except sqlite3.Error as exc:
            raise UsageError(f"{self.path}: not a result store: {exc}") from exc

    def add(self, name: str, merged: dict[str, Any]) -> None:
        if not self.sqlite and not self.path.is_dir() and (self.path.suffix
                                                           or self.path.exists()):
            raise UsageError(f"{self.path}: a result store is a file named *.sqlite, "
                             "*.sqlite3 or *.db, or a folder")
        if not _NAME.fullmatch(name):
            raise UsageError(f"night name {name!r}: letters, digits and _.:- only, at most "
                             "64 characters")
        if merged.get("format") != MERGED_FORMAT:
            raise UsageError(f"{self.path}: only merged reports ({MERGED_FORMAT}) are stored")
        text = json.dumps(merged)
        if self.sqlite:
            with closing(self._connect()) as db, db:
                db.execute("INSERT OR REPLACE INTO nights VALUES (?, ?, ?, ?)",
                           (name, datetime.now(UTC).isoformat(timespec="seconds"),
                            int(bool(merged["passed"])), text))
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).write_text("harness result store: one merged report per night\n")
        tmp = self.path / f".{name}.merged.json.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(self.path / f"{name}.merged.json")

    def nights(self) -> list[tuple[str, dict[str, Any]]]:
        """Every night, oldest first (by name: dates sort as they happened)."""
        return list(self._iter())

    def _iter(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.sqlite:
            if not self.path.exists():
                return
            with closing(self._connect()) as db:
                try:
                    rows = db.execute("SELECT name, merged FROM nights ORDER BY name").fetchall()
                except sqlite3.Error as exc:
                    raise UsageError(f"{self.path}: not a result store: {exc}") from exc
            for name, text in rows:
                yield name, _parse(self.path, name, text)
            return
        for file in sorted(self.path.glob("*.merged.json")):
            yield file.name.removesuffix(".merged.json"), _parse(file, file.name,
                                                                 file.read_text())


def _parse(where: Path, name: str, text: str) -> dict[str, Any]:
    try:
        merged = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where}: night {name}: not JSON ({exc})") from exc
    if not isinstance(merged, dict) or merged.get("format") != MERGED_FORMAT:
        raise UsageError(f"{where}: night {name}: not a {MERGED_FORMAT} report")
    return merged
