"""The guest image cache key and recipe loading, on copies of the real guest-images/ tree.

apt is never called: packages are synthetic PackageRef values, as resolve() would return them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from harness.errors import ImageError
from harness.images.builder import (
    BUILDER_VERSION,
    PackageRef,
    Recipe,
    cache_root,
    guest_images_dir,
    image_key,
)

REPO = Path(__file__).resolve().parents[2]

PACKAGES = (
    PackageRef("kernel", "linux-image-6.1.0-28-cloud-amd64", "6.1.119-1", "a" * 64),
    PackageRef("package", "busybox-static", "1:1.35.0-4+b3", "b" * 64),
    PackageRef("package", "dropbear-bin", "2022.83-1+deb12u2", "c" * 64),
)


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of guest-images/, which HARNESS_GUEST_IMAGES points the builder at."""
    copy = tmp_path / "guest-images"
    shutil.copytree(REPO / "guest-images", copy, symlinks=True)
    monkeypatch.setenv("HARNESS_GUEST_IMAGES", str(copy))
    return copy


def key(packages: tuple[PackageRef, ...] = PACKAGES) -> str:
    return image_key(Recipe.load("debian-cloud"), packages)


# --- the cache key --------------------------------------------------------------------------------


def test_environment_moves_the_folders(images: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert guest_images_dir() == images
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"


def test_key_is_stable(images: Path) -> None:
    first = key()
    assert len(first) == 20 and int(first, 16) >= 0
    assert key() == first


def test_key_does_not_depend_on_where_the_tree_is(images: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    here = key()
    elsewhere = tmp_path / "elsewhere" / "guest-images"
    shutil.copytree(images, elsewhere)
    monkeypatch.setenv("HARNESS_GUEST_IMAGES", str(elsewhere))
    assert key() == here


def test_key_ignores_timestamps(images: Path) -> None:
    before = key()
    for path in images.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert key() == before


@pytest.mark.parametrize("relative", [
    "debian-cloud/packages.txt",
    "debian-cloud/modules.txt",
    "initramfs/init",
    "initramfs/inittab",
    "agent/harness-agent",
])
def test_key_changes_when_an_input_file_changes(images: Path, relative: str) -> None:
    before = key()
    with open(images / relative, "a") as fh:
        fh.write("\n# changed\n")
    assert key() != before


def test_key_changes_when_a_recipe_file_is_added(images: Path) -> None:
    before = key()
    (images / "debian-cloud" / "extra.conf").write_text("x\n")
    assert key() != before


def test_key_changes_when_a_file_becomes_executable(images: Path) -> None:
    before = key()
    inittab = images / "initramfs" / "inittab"
    inittab.chmod(inittab.stat().st_mode | 0o111)
    assert key() != before


def test_key_changes_with_any_package_field(images: Path) -> None:
    base = key()
    kernel, *rest = PACKAGES
    variants = [
        (PackageRef("kernel", kernel.name, "6.1.119-2", kernel.sha256), *rest),
        (PackageRef("kernel", kernel.name, kernel.version, "d" * 64), *rest),
        (PackageRef("kernel", "linux-image-6.1.0-29-cloud-amd64", kernel.version,
                    kernel.sha256), *rest),
        (kernel, *rest, PackageRef("package", "zlib1g", "1:1.2.13.dfsg-1", "e" * 64)),
        (kernel,),
    ]
    keys = {key(tuple(v)) for v in variants}
    assert base not in keys and len(keys) == len(variants)


def test_key_names_the_builder_version() -> None:
    assert BUILDER_VERSION == "3"  # bumping it is a decision: every cached image is rebuilt


def test_input_files_cover_recipe_initramfs_and_agent(images: Path) -> None:
    files = [p.relative_to(images).as_posix() for p in Recipe.load("debian-cloud").input_files()]
    assert files[:2] == ["debian-cloud/modules.txt", "debian-cloud/packages.txt"]
    assert "initramfs/init" in files and "agent/harness-agent" in files
    assert len(files) == len(set(files))


# --- recipes --------------------------------------------------------------------------------------


def write_recipe(images: Path, name: str, packages: str, modules: str | None = None) -> Path:
    folder = images / name
    folder.mkdir()
    (folder / "packages.txt").write_text(packages)
    if modules is not None:
        (folder / "modules.txt").write_text(modules)
    return folder


def test_real_recipe_loads(images: Path) -> None:
    recipe = Recipe.load("debian-cloud")
    assert recipe.name == "debian-cloud" and recipe.folder == images / "debian-cloud"
    assert recipe.requests[0] == ("kernel", "linux-image-cloud-amd64")
    assert ("package", "busybox-static") in recipe.requests
    assert all(role == "package" for role, _ in recipe.requests[1:])
    assert recipe.modules[:2] == ("virtio_pci", "virtio_net")


def test_comments_blank_lines_and_missing_modules_file(images: Path) -> None:
    write_recipe(images, "tiny", "# a comment\n\nkernel  linux-image-amd64  # trailing\n"
                                 "package busybox-static\n")
    recipe = Recipe.load("tiny")
    assert recipe.requests == (("kernel", "linux-image-amd64"), ("package", "busybox-static"))
    assert recipe.modules == ()


def test_missing_recipe(images: Path) -> None:
    with pytest.raises(ImageError, match=r"guest image recipe 'nope': .*/nope/packages.txt "
                                         r"not found"):
        Recipe.load("nope")


def test_bad_line_names_the_file_and_line(images: Path) -> None:
    folder = write_recipe(images, "bad", "kernel linux-image-amd64\nfirmware foo\n")
    with pytest.raises(ImageError) as info:
        Recipe.load("bad")
    assert str(info.value) == (f"{folder}/packages.txt:2: expected 'kernel NAME' or "
                               "'package NAME', got 'firmware foo'")


def test_role_without_a_name_is_a_bad_line(images: Path) -> None:
    folder = write_recipe(images, "bad", "kernel linux-image-amd64\npackage\n")
    with pytest.raises(ImageError, match=rf"^{folder}/packages.txt:2: .*got 'package'$"):
        Recipe.load("bad")


def test_bad_line_number_counts_comments_and_blank_lines(images: Path) -> None:
    folder = write_recipe(images, "bad", "# header\n# more\n\nkernel linux-image-amd64\n"
                                         "firmware foo\n")
    with pytest.raises(ImageError, match=rf"^{folder}/packages.txt:5: "):
        Recipe.load("bad")


@pytest.mark.parametrize("packages", [
    "package busybox-static\n",
    "kernel linux-image-amd64\nkernel linux-image-cloud-amd64\n",
    "# only a comment\n",
])
def test_exactly_one_kernel_line(images: Path, packages: str) -> None:
    folder = write_recipe(images, "bad", packages)
    with pytest.raises(ImageError) as info:
        Recipe.load("bad")
    assert str(info.value) == f"{folder}/packages.txt: needs exactly one 'kernel' line"
    assert info.value.exit_code == 3


def test_a_killed_builds_folder_is_removed_by_the_next_sweep(tmp_path: Path) -> None:
    from harness.images.builder import sweep_builds

    stale = tmp_path / "images" / ".build-abc123" / "image"
    stale.mkdir(parents=True)
    (stale / "initrd.cpio").write_bytes(b"x" * 1024)
    assert sweep_builds(tmp_path) == [stale.parent]
    assert not stale.parent.exists()
    assert sweep_builds(tmp_path) == []


def test_a_resolution_is_remembered_until_its_inputs_or_aptes_index_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.images import builder
    from harness.images.builder import PackageRef, remembered_resolution

    recipe = tmp_path / "packages.txt"
    recipe.write_text("kernel linux-image-amd64\n")
    index = tmp_path / "lists"
    index.mkdir()
    (index / "deb.debian.org_Packages").write_text("Package: a\n")
    monkeypatch.setattr(builder, "_INDEX_STATE", (index,))
    calls: list[int] = []

    def resolve_now() -> tuple[PackageRef, ...]:
        calls.append(1)
        return (PackageRef("kernel", "linux-image-6.1.0-57-amd64", f"6.1.{len(calls)}", "ab"),)

    def pins(refresh: bool = False) -> str:
        (ref,) = remembered_resolution("r", [recipe], resolve_now, refresh, tmp_path / "c")
        return ref.version

    assert [pins(), pins()] == ["6.1.1", "6.1.1"] and len(calls) == 1  # remembered
    recipe.write_text("kernel linux-image-cloud-amd64\n")
    assert pins() == "6.1.2"  # the recipe changed
    (index / "deb.debian.org_Packages").write_text("Package: a\nPackage: b\n")
    assert pins() == "6.1.3"  # apt-get update brought a new index
    assert pins() == "6.1.3" and pins(refresh=True) == "6.1.4"
