"""The platform layer: one description per architecture, and no architecture named elsewhere."""

from __future__ import annotations

import ast
import gzip
import os
import re
import struct
from pathlib import Path

import pytest

from harness.errors import HostError, ImageError
from harness.platform import (
    ARM64,
    PLATFORMS,
    X86_64,
    Arch,
    arm64_image_release,
    bzimage_release,
    host_platform,
    platform_for,
    recipe_platform,
)

REPO = Path(__file__).resolve().parents[2]

# Words that name an architecture or one of its particulars (machine types, consoles,
# kernel formats, emulator binaries, package architectures, library triplets).
ARCH_WORDS = re.compile(r"x86|amd64|aarch64|arm64|\bq35\b|ttyS\d|ttyAMA|bzImage|"
                        r"qemu-system-|linux-gnu|\bvirt\b|gic-version|iommu=smmuv3")


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module that is not a docstring (comments are not in the AST)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_no_architecture_literal_outside_the_platform_module() -> None:
    found = []
    for path in sorted((REPO / "harness").rglob("*.py")):
        if path.name == "platform.py" and path.parent.name == "harness":
            continue
        for line, text in _code_strings(path):
            if ARCH_WORDS.search(text):
                found.append(f"{path.relative_to(REPO)}:{line}: {text!r}")
    assert not found, "architecture literals outside harness/platform.py:\n" + "\n".join(found)


def test_the_grep_sees_a_literal_where_there_is_one(tmp_path: Path) -> None:
    # The check above must be able to fail: a module with a console literal is caught, its
    # docstring and comments are not.
    module = tmp_path / "m.py"
    module.write_text('"""Boots on ttyS0."""\n# q35 here\nCONSOLE = "console=ttyS0"\n')
    hits = [t for _, t in _code_strings(module) if ARCH_WORDS.search(t)]
    assert hits == ["console=ttyS0"]


def test_each_platform_is_complete_and_distinct() -> None:
    assert set(PLATFORMS) == set(Arch)
    for arch, p in PLATFORMS.items():
        assert p.arch is arch
        assert p.first_auto_slot in p.slots and p.slots.start >= 1
        assert p.recipes and all((REPO / "guest-images" / r / "packages.txt").is_file()
                                 for r in (*p.recipes, p.lab.recipe)
                                 if r != "lab-host-arm64")
        assert recipe_platform(p.recipes[0]) is p
    assert len({p.qemu for p in PLATFORMS.values()}) == len(PLATFORMS)
    assert len({p.console for p in PLATFORMS.values()}) == len(PLATFORMS)


def test_platform_for_defaults_to_this_host() -> None:
    assert platform_for(None) is host_platform()
    assert platform_for("arm64") is ARM64 and platform_for(Arch.X86_64) is X86_64
    assert host_platform("aarch64") is ARM64 and host_platform("x86_64") is X86_64
    with pytest.raises(HostError, match="'riscv64' is not supported"):
        host_platform("riscv64")


# --- kernel releases, from each image format ------------------------------------------------


def _bzimage(tmp_path: Path, version: str) -> Path:
    head = bytearray(0x8000)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x20E, 0x1000)  # kernel_version - 0x200
    text = f"{version} (debian-kernel@lists.debian.org) #1 SMP".encode()
    head[0x1200:0x1200 + len(text)] = text
    path = tmp_path / "bzImage"
    path.write_bytes(bytes(head))
    return path


def _arm64_image(tmp_path: Path, version: str, compress: bool) -> Path:
    head = bytearray(64)
    head[0x38:0x3C] = b"ARM\x64"
    body = bytes(head) + b"\0" * 4096 + f"Linux version {version} (gcc 12) #1 SMP\n".encode()
    path = tmp_path / ("Image.gz" if compress else "Image")
    path.write_bytes(gzip.compress(body) if compress else body)
    return path


def test_bzimage_release_is_read_from_the_setup_header(tmp_path: Path) -> None:
    assert bzimage_release(_bzimage(tmp_path, "6.1.0-57-cloud-amd64")) == "6.1.0-57-cloud-amd64"
    assert X86_64.kernel_release(_bzimage(tmp_path, "6.18.0")) == "6.18.0"


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_arm64_image_release_is_read_from_the_banner(tmp_path: Path, compress: bool) -> None:
    path = _arm64_image(tmp_path, "6.1.0-57-cloud-arm64", compress)
    assert arm64_image_release(path) == "6.1.0-57-cloud-arm64"
    assert ARM64.kernel_release(path) == "6.1.0-57-cloud-arm64"


def test_a_kernel_of_the_wrong_format_is_refused_with_its_name(tmp_path: Path) -> None:
    arm = _arm64_image(tmp_path, "6.1.0", compress=False)
    with pytest.raises(ImageError, match="not a bzImage"):
        X86_64.kernel_release(arm)
    with pytest.raises(ImageError, match="not an arm64 Image"):
        ARM64.kernel_release(_bzimage(tmp_path, "6.1.0"))
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b" + b"\0" * 40)
    with pytest.raises(ImageError, match="not a readable gzip"):
        ARM64.kernel_release(broken)
    with pytest.raises(ImageError, match="cannot read the kernel"):
        ARM64.kernel_release(tmp_path / "absent")


def test_a_kernel_that_is_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ImageError, match="not a regular file|cannot read the kernel"):
            ARM64.kernel_release(path)
        with pytest.raises(ImageError, match="not a regular file|cannot read the kernel"):
            X86_64.kernel_release(path)
