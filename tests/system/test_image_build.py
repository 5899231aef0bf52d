"""The builtin guest image, built for real from Debian's archive (no guest boots here)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from harness.images.builder import ensure_image
from harness.platform import ARM64, X86_64, Platform

pytestmark = pytest.mark.system


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("platform", [
    pytest.param(X86_64, id="x86_64", marks=pytest.mark.system(arch="x86_64")),
    pytest.param(ARM64, id="arm64", marks=pytest.mark.system(arch="arm64"))])
def test_two_builds_from_the_same_inputs_are_byte_identical(tmp_path: Path,
                                                            platform: Platform) -> None:
    messages: list[str] = []
    recipe = platform.recipes[0]
    first = ensure_image(recipe, platform, cache=tmp_path / "a", progress=messages.append)
    second = ensure_image(recipe, platform, cache=tmp_path / "b", progress=messages.append)
    assert first.key == second.key
    assert digest(first.initrd) == digest(second.initrd)
    assert digest(first.kernel) == digest(second.kernel)
    assert sum("building" in m for m in messages) == 2, "each empty cache builds once"
    again = ensure_image(recipe, platform, cache=tmp_path / "a", progress=messages.append)
    assert again.folder == first.folder and "cached" in messages[-1]
    assert not list((tmp_path / "a" / "images").glob(".build-*")), "no build leftovers"
