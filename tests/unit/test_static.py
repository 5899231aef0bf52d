"""The type checker (strict, configured in pyproject.toml) and the linter, as tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, check=False, timeout=300)


@pytest.mark.parametrize("argv", [
    ("mypy",),  # the packages and strictness pyproject.toml sets: harness/
    ("mypy", "--strict", "tests"),
], ids=["harness", "tests"])
def test_mypy_strict(argv: tuple[str, ...]) -> None:
    done = run_tool(*argv)
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"


def test_ruff() -> None:
    done = run_tool("ruff", "check", "harness", "tests")
    assert done.returncode == 0, f"ruff failed:\n{done.stdout}{done.stderr}"
