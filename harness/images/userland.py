"""A root filesystem of another architecture for the lab's emulated host, built and cached.

The x86 lab's L1 runs the outer machine's own root over 9p; an arm64 L1 cannot, so it gets a
user space of its own, made of:

- the Debian packages of the recipe's ``userland.txt`` and every dependency (no recommends),
  resolved by apt against an empty package database for the platform's architecture, pinned
  to exact versions and archive SHA256s, unpacked with ``dpkg-deb`` (no maintainer scripts)
  into a merged-/usr tree;
- the harness's Python dependencies from the recipe's ``wheels.txt`` (each pinned by its PyPI
  SHA256: pure-Python and manylinux wheels of the target, nothing compiled), installed into
  ``/usr/local/lib/python3.N/dist-packages``;
- the recipe's ``files/`` (``/etc/passwd`` and the like);
- bytecode for the standard library and the wheels, made here in hash-checked mode when this
  Python has the target's version (so L1, under TCG, does not compile them at each start).

The cache key hashes the builder version, the recipe's files and every package and wheel pin;
a tree is complete or absent (built aside, renamed into place), and reused while its key holds.
The harness itself is not in the tree: L1 mounts the repository it runs from.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageError
from harness.images.builder import (
    PackageRef,
    cache_root,
    guest_images_dir,
    remembered_resolution,
    remove_stale_builds,
    run_tool,
)
from harness.platform import Platform

Progress = Callable[[str], None]

USERLAND_VERSION = "1"  # bump when the way a tree is assembled changes
# "Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [arm64]) []"
_INST = re.compile(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)")
_PYTHON = re.compile(r"^python3\.(\d+)$")
# Debian 12 is merged-/usr: these top-level folders are links into /usr.
_MERGED = ("bin", "sbin", "lib")


@dataclass(frozen=True)
class Userland:
    key: str
    recipe: str
    root: Path
    packages: tuple[PackageRef, ...]
    python: str  # "3.11"

    @property
    def folder(self) -> Path:
        return self.root.parent


@dataclass(frozen=True)
class UserlandRecipe:
    name: str
    folder: Path
    packages: tuple[str, ...]
    wheels: Path

    @staticmethod
    def load(name: str) -> UserlandRecipe:
        folder = guest_images_dir() / name
        listing, wheels = folder / "userland.txt", folder / "wheels.txt"
        for path in (listing, wheels):
            if not path.is_file():
                raise ImageError(f"lab user space {name!r}: {path} not found")
        names = []
        for number, raw in enumerate(listing.read_text().splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", line):
                raise ImageError(f"{listing}:{number}: not a Debian package name: {line!r}")
            names.append(line)
        return UserlandRecipe(name, folder, tuple(names), wheels)

    def input_files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


def resolve(recipe: UserlandRecipe, platform: Platform) -> tuple[PackageRef, ...]:
    """Every package the recipe needs on ``platform``, with its version and archive SHA256."""
    arch = platform.package_arch
    with tempfile.NamedTemporaryFile(prefix="harness-empty-status-") as empty:
        text = run_tool(["apt-get", "-s", "-q", "-o", f"Dir::State::status={empty.name}",
                     "-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures::={arch}",
                     "-o", "APT::Install-Recommends=false", "install", *recipe.packages],
                    f"resolving the {arch} user space {recipe.name} (run ci/setup: it adds the "
                    "architecture and updates the package lists)")
    pins = sorted(m.groups() for m in map(_INST.match, text.splitlines()) if m)
    if not pins:
        raise ImageError(f"resolving the {arch} user space {recipe.name}: apt chose nothing")
    # The role says how apt names a package: "all" ones carry no architecture.
    refs = [PackageRef("all" if a == "all" else "package", n, v, "") for n, v, a in pins]
    shown = run_tool(["apt-cache", "show", *map(_apt_name(arch), refs)],
                 f"reading the {arch} package index")
    sha = {}
    for stanza in shown.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if "Package" in fields and fields.get("Architecture") in (arch, "all"):
            sha[(fields["Package"], fields["Version"])] = fields.get("SHA256", "")
    missing = [r.name for r in refs if not sha.get((r.name, r.version))]
    if missing:
        raise ImageError(f"the {arch} package index has no SHA256 for {', '.join(missing)}")
    return tuple(PackageRef(r.role, r.name, r.version, sha[(r.name, r.version)]) for r in refs)


def _apt_name(arch: str) -> Callable[[PackageRef], str]:
    def name(p: PackageRef) -> str:
        return f"{p.name}={p.version}" if p.role == "all" else f"{p.name}:{arch}={p.version}"
    return name


def _python_version(packages: tuple[PackageRef, ...]) -> str:
    found = sorted(int(m.group(1)) for p in packages if (m := _PYTHON.match(p.name)))
    if not found:
        raise ImageError("the lab user space has no python3.N package")
    return f"3.{found[-1]}"


def userland_key(recipe: UserlandRecipe, packages: tuple[PackageRef, ...],
                 platform: Platform) -> str:
    digest = hashlib.sha256(f"userland {USERLAND_VERSION} {platform.arch}\n".encode())
    for path in recipe.input_files():
        digest.update(path.relative_to(recipe.folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for p in packages:
        digest.update(f"{p.name}={p.version} {p.sha256}\n".encode())
    return digest.hexdigest()[:20]


def ensure_userland(recipe_name: str, platform: Platform, progress: Progress,
                    cache: Path | None = None, refresh: bool = False) -> Userland:
    """The cached user space for the recipe's current inputs, built if needed."""
    recipe = UserlandRecipe.load(recipe_name)
    packages = remembered_resolution(f"userland {recipe_name} {platform.arch}",
                                     [recipe.folder / "userland.txt"],
                                     lambda: resolve(recipe, platform), refresh, cache)
    python = _python_version(packages)
    key = userland_key(recipe, packages, platform)
    base = (cache or cache_root())
    folder = base / "userland" / f"{recipe_name}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_builds(folder.parent)
        if (folder / "manifest.json").is_file():
            progress(f"user space {recipe_name}: cached ({folder})")
            return Userland(key, recipe_name, folder / "root", packages, python)
        started = time.monotonic()
        progress(f"user space {recipe_name}: building {key} from {len(packages)} "
                 f"{platform.package_arch} packages and the wheels of wheels.txt")
        with tempfile.TemporaryDirectory(prefix=".build-", dir=folder.parent) as tmp:
            staging = Path(tmp) / "tree"
            root = staging / "root"
            root.mkdir(parents=True)
            debs = _download(packages, platform, base / "debs" / platform.package_arch,
                             progress)
            _unpack(debs, root, progress)
            _install_wheels(recipe, platform, python, root, Path(tmp) / "wheels", progress)
            shutil.copytree(recipe.folder / "files", root, dirs_exist_ok=True, symlinks=True)
            _compile(root, python, progress)
            (staging / "manifest.json").write_text(json.dumps({
                "key": key, "recipe": recipe_name, "arch": platform.arch.value,
                "python": python, "packages": [p.__dict__ for p in packages]}, indent=1) + "\n")
            os.rename(staging, folder)
        progress(f"user space {recipe_name}: built in {time.monotonic() - started:.1f} s "
                 f"({folder})")
        return Userland(key, recipe_name, folder / "root", packages, python)


def _download(packages: tuple[PackageRef, ...], platform: Platform, store: Path,
              progress: Progress) -> list[Path]:
    """The packages' .debs, from the shared download store or the archive, SHA256-checked."""
    store.mkdir(parents=True, exist_ok=True)
    arch = platform.package_arch

    def path_of(p: PackageRef) -> Path:
        return store / f"{p.name}_{p.version.replace(':', '%3a')}_{p.sha256[:16]}.deb"

    missing = [p for p in packages if not path_of(p).is_file()]
    if missing:
        progress(f"  downloading {len(missing)} of {len(packages)} packages ({arch})")
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            run_tool(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                  *map(_apt_name(arch), missing)],
                 "downloading packages", cwd=Path(tmp))
            for p in missing:
                (deb,) = Path(tmp).glob(f"{p.name}_*.deb")
                if p.sha256 and hashlib.sha256(deb.read_bytes()).hexdigest() != p.sha256:
                    raise ImageError(f"{deb.name}: SHA256 differs from the archive index")
                os.replace(deb, path_of(p))
    return [path_of(p) for p in packages]


def _unpack(debs: list[Path], root: Path, progress: Progress) -> None:
    (root / "usr").mkdir()
    for name in _MERGED:
        (root / "usr" / name).mkdir()
        (root / name).symlink_to(f"usr/{name}")
    progress(f"  unpacking {len(debs)} packages")
    for deb in debs:
        data = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],  # noqa: S603
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert data.stdout is not None
        tar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)],  # noqa: S603
                             stdin=data.stdout, capture_output=True, text=True, check=False)
        data.stdout.close()
        err = data.stderr.read().decode(errors="replace") if data.stderr else ""
        if data.wait() != 0 or tar.returncode != 0:
            raise ImageError(f"unpacking {deb.name}: {(err or tar.stderr).strip()[-300:]}")
    for folder in ("proc", "sys", "dev", "tmp", "run", "root", "lab", "var/tmp"):
        (root / folder).mkdir(parents=True, exist_ok=True)


def _install_wheels(recipe: UserlandRecipe, platform: Platform, python: str, root: Path,
                    store: Path, progress: Progress) -> None:
    abi = "cp" + python.replace(".", "")
    target = root / "usr" / "local" / "lib" / f"python{python}" / "dist-packages"
    tags = [f"--platform={tag}_{platform.uname}" for tag in
            ("manylinux2014", "manylinux_2_28", "manylinux_2_34", "manylinux_2_36")]
    common = ["--only-binary=:all:", *tags, f"--python-version={python}",
              "--implementation=cp", f"--abi={abi}", "--no-deps", "--quiet",
              "--disable-pip-version-check"]
    progress(f"  fetching the wheels of {recipe.wheels.name} ({platform.uname}, CPython {python})")
    run_tool([sys.executable, "-m", "pip", "download", "--require-hashes", *common,
          "-r", str(recipe.wheels), "-d", str(store)], "downloading the lab's wheels")
    run_tool([sys.executable, "-m", "pip", "install", "--no-index", "--no-compile", *common,
          "--target", str(target), *map(str, sorted(store.glob("*.whl")))],
         "installing the lab's wheels")


def _compile(root: Path, python: str, progress: Progress) -> None:
    """Bytecode made here, checked by source hash (not mtime), when this Python matches."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != python:
        progress(f"  no bytecode: this Python is {here}, L1's is {python} (L1 compiles it)")
        return
    progress(f"  compiling the standard library and wheels for CPython {python}")
    for folder, shown in ((root / "usr/lib" / f"python{python}", f"/usr/lib/python{python}"),
                          (root / "usr/local/lib" / f"python{python}" / "dist-packages",
                           f"/usr/local/lib/python{python}/dist-packages")):
        run_tool([sys.executable, "-m", "compileall", "-q", "-j", "0",
              "--invalidation-mode", "unchecked-hash", "-d", shown, "-x", r"/(test|idlelib)/",
              str(folder)], f"compiling {shown}")
