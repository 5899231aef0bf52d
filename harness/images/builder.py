"""Build the builtin guest (a Debian kernel + a busybox/dropbear/agent initramfs), cached.

A recipe is a folder under ``guest-images/``.  Its packages are resolved with ``apt-cache`` to
exact versions and archive SHA256s without downloading anything; those, the recipe's files,
the shared initramfs files and the agent form the cache key.  A cached image is reused as
long as the key matches, so a rebuild happens only when an input changes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageError
from harness.images.cpio import Entry, write_newc
from harness.platform import Platform

log = logging.getLogger(__name__)

# Bump when the way an image is assembled changes, so old cache entries are not reused.
BUILDER_VERSION = "3"

Progress = Callable[[str], None]

# Parts of library packages a guest never needs (docs, locales, iconv modules).
_SKIP_PREFIXES = ("usr/share/", "usr/libexec/", "etc/", "usr/bin/", "sbin/", "usr/sbin/", "bin/")
_SKIP_LIBDIRS = ("gconv/", "audit/")  # under usr/lib/<multiarch>/
# ... except the programs the guest runs.
_KEEP_PROGRAMS = ("bin/busybox", "usr/sbin/dropbear", "usr/bin/dropbearkey")
_VERSIONED_KERNEL = re.compile(r"^linux-image-\d")


def _no_progress(message: str) -> None:
    log.info("%s", message)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def guest_images_dir() -> Path:
    return Path(os.environ.get("HARNESS_GUEST_IMAGES", repo_root() / "guest-images"))


def cache_root() -> Path:
    base = os.environ.get("HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "harness")
    return Path(base)


@dataclass(frozen=True)
class PackageRef:
    role: str  # "kernel" or "package"
    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class GuestImage:
    """A built guest: what QEMU boots, and where it came from."""

    key: str
    recipe: str
    kernel: Path
    initrd: Path
    kernel_release: str
    packages: tuple[PackageRef, ...]

    @property
    def folder(self) -> Path:
        return self.kernel.parent


@dataclass(frozen=True)
class Recipe:
    name: str
    folder: Path
    requests: tuple[tuple[str, str], ...]  # (role, package name) as written
    modules: tuple[str, ...]

    def has_modules(self, wanted: tuple[str, ...]) -> bool:
        """The recipe packs every wanted driver (built in or as a module)."""
        have = {m.replace("-", "_") for m in self.modules}
        return all(m.replace("-", "_") in have for m in wanted)

    @staticmethod
    def load(name: str) -> Recipe:
        folder = guest_images_dir() / name
        if not (folder / "packages.txt").is_file():
            raise ImageError(f"guest image recipe {name!r}: {folder}/packages.txt not found")
        requests = []
        for number, line in _numbered_lines(folder / "packages.txt"):
            role, _, package = line.partition(" ")
            if role not in ("kernel", "package") or not package.strip():
                raise ImageError(f"{folder / 'packages.txt'}:{number}: expected "
                                 f"'kernel NAME' or 'package NAME', got {line!r}")
            requests.append((role, package.strip()))
        if sum(role == "kernel" for role, _ in requests) != 1:
            raise ImageError(f"{folder / 'packages.txt'}: needs exactly one 'kernel' line")
        modules = tuple(_lines(folder / "modules.txt")) if (folder / "modules.txt").exists() else ()
        return Recipe(name, folder, tuple(requests), modules)

    def input_files(self) -> Iterator[Path]:
        """Every file whose content goes into the image, for the cache key."""
        shared = guest_images_dir()
        for folder in (self.folder, shared / "initramfs", shared / "agent"):
            yield from sorted(p for p in folder.rglob("*") if p.is_file())


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines without comments, with their line number in the file."""
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            yield number, line


def _lines(path: Path) -> Iterator[str]:
    return (line for _, line in _numbered_lines(path))


def run_tool(argv: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a build tool; its failure is an ImageError naming ``what`` and its last line."""
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise ImageError(f"{what}: {argv[0]} is not installed") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ImageError(f"{what}: {argv[0]} exited {done.returncode}: "
                         f"{detail[-1] if detail else 'no output'}")
    return done.stdout


def _apt_show(names: list[str], arch: str) -> dict[str, dict[str, str]]:
    """The candidate version's fields of each package of Debian architecture ``arch``, in one
    apt-cache call."""
    text = run_tool(["apt-cache", "show", "--no-all-versions", *(f"{n}:{arch}" for n in names)],
                f"resolving {arch} packages {' '.join(names)}")
    found: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                fields.setdefault(key, value.strip())
        if "Package" in fields:
            found.setdefault(fields["Package"], fields)
    missing = [n for n in names if n not in found]
    if missing:
        raise ImageError(f"resolving packages: apt-cache knows no {arch} package "
                         f"{', '.join(missing)} (run ci/setup: it adds the architecture and "
                         "updates the package lists)")
    return found


def resolve(recipe: Recipe, platform: Platform,
            with_kernel: bool = True) -> tuple[PackageRef, ...]:
    """Pin every requested package to the archive's current version and SHA256."""
    requests = [(r, n) for r, n in recipe.requests if with_kernel or r != "kernel"]
    arch = platform.package_arch
    shown = _apt_show([name for _, name in requests], arch)
    refs = []
    for role, name in requests:
        fields = shown[name]
        if role == "kernel" and not _VERSIONED_KERNEL.match(name) and "Depends" in fields:
            # A metapackage such as linux-image-cloud-amd64: follow it to the real kernel.
            real = next((d.strip().split(" ")[0] for d in fields["Depends"].split(",")
                         if d.strip().startswith("linux-image-")), None)
            if real is None:
                raise ImageError(f"kernel package {name}: depends on no linux-image-*")
            name, fields = real, _apt_show([real], arch)[real]
        refs.append(PackageRef(role, name, fields["Version"], fields.get("SHA256", "")))
    return tuple(refs)


# apt's package index and what shapes a resolution against it: while none of these changes,
# resolving the same request gives the same pins, so they are remembered (apt-cache costs
# seconds per image; stat'ing these costs milliseconds).
_INDEX_STATE = (Path("/var/lib/apt/lists"), Path("/etc/apt"), Path("/var/lib/dpkg/arch"))


def package_index_state() -> str:
    """A fingerprint of apt's package index and configuration (names, sizes, mtimes)."""
    digest = hashlib.sha256()
    for top in _INDEX_STATE:
        paths = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in paths:
            try:
                info = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def remembered_resolution(what: str, inputs: list[Path], resolve_now: Callable[[],
                          tuple[PackageRef, ...]], refresh: bool = False,
                          cache: Path | None = None) -> tuple[PackageRef, ...]:
    """The pins of ``what``, resolved again only when its input files or apt's package
    index changed since the last time (or when ``refresh`` asks for it)."""
    digest = hashlib.sha256(f"resolution {what}\n{package_index_state()}\n".encode())
    for path in inputs:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    memo = (cache or cache_root()) / "resolved" / f"{digest.hexdigest()[:24]}.json"
    if not refresh:
        try:
            return tuple(PackageRef(**p) for p in json.loads(memo.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    refs = resolve_now()
    memo.parent.mkdir(parents=True, exist_ok=True)
    aside = memo.with_suffix(f".{os.getpid()}.part")
    aside.write_text(json.dumps([dataclasses.asdict(p) for p in refs]))
    os.replace(aside, memo)
    return refs


@dataclass(frozen=True)
class UserKernel:
    """A user's own kernel (in its platform's boot format) and, optionally, its
    /lib/modules/<release> tree."""

    kernel: Path
    platform: Platform
    modules: Path | None = None

    def release(self) -> str:
        return self.platform.kernel_release(self.kernel)

    def module_files(self, wanted: tuple[str, ...]) -> list[Path]:
        if self.modules is None:
            return []
        return [self.modules / rel for rel in _module_closure(self.modules, wanted, None)]


def image_key(recipe: Recipe, packages: tuple[PackageRef, ...],
              user_kernel: UserKernel | None = None) -> str:
    digest = hashlib.sha256(f"builder {BUILDER_VERSION}\n".encode())
    if user_kernel is not None:
        for path in [user_kernel.kernel, *user_kernel.module_files(recipe.modules)]:
            digest.update(f"user {path.name}\n".encode())
            digest.update(path.read_bytes())
    for ref in packages:
        digest.update(f"{ref.role} {ref.name} {ref.version} {ref.sha256}\n".encode())
    base = guest_images_dir()
    for path in recipe.input_files():
        digest.update(f"file {path.relative_to(base)} {path.stat().st_mode & 0o111:o}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def choose_recipe(platform: Platform, modules: tuple[str, ...]) -> Recipe:
    """The platform's cheapest recipe whose kernel has every driver in ``modules``."""
    recipes = [Recipe.load(name) for name in platform.recipes]
    for recipe in recipes:
        if recipe.has_modules(modules):
            return recipe
    have = {m.replace("-", "_") for r in recipes for m in r.modules}
    lacking = sorted({m for m in modules if m.replace("-", "_") not in have})
    raise ImageError(f"no {platform.arch} image recipe ({', '.join(platform.recipes)}) has "
                     f"the guest driver(s) {', '.join(lacking)}")


def ensure_image(recipe_name: str, platform: Platform, progress: Progress = _no_progress,
                 cache: Path | None = None, user_kernel: UserKernel | None = None,
                 refresh: bool = False) -> GuestImage:
    """Return the cached image for the recipe's current inputs, building it if needed.

    With ``user_kernel``, the recipe's kernel package is replaced by the user's kernel and
    modules; the initramfs (busybox, dropbear, agent) is the recipe's.
    """
    pinned = _pinned(recipe_name) if user_kernel is None else None
    if pinned is not None:
        progress(f"image {recipe_name}: pinned ({pinned})")
        return _from_manifest(pinned / "manifest.json")
    recipe = Recipe.load(recipe_name)
    if user_kernel is not None and user_kernel.modules is not None:
        release = user_kernel.release()
        if user_kernel.modules.name != release:
            raise ImageError(f"modules tree {user_kernel.modules} is for release "
                             f"{user_kernel.modules.name}, but the kernel "
                             f"{user_kernel.kernel} is {release}")
    packages = remembered_resolution(
        f"{recipe_name} {platform.arch} kernel={user_kernel is None}",
        [recipe.folder / "packages.txt"],
        lambda: resolve(recipe, platform, with_kernel=user_kernel is None), refresh, cache)
    key = image_key(recipe, packages, user_kernel)
    prefix = recipe_name if user_kernel is None else f"{recipe_name}-userkernel"
    folder = (cache or cache_root()) / "images" / f"{prefix}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the next one finds the cache
        remove_stale_builds(folder.parent)
        manifest = folder / "manifest.json"
        if manifest.is_file():
            progress(f"image {recipe_name}: cached ({folder})")
            return _from_manifest(manifest)
        started = time.monotonic()
        progress(f"image {recipe_name}: building {key} from {len(packages)} Debian packages")
        with tempfile.TemporaryDirectory(prefix=".build-", dir=folder.parent) as tmp:
            staging = Path(tmp) / "image"
            staging.mkdir()
            _build(recipe, platform, packages, key, Path(tmp), staging, progress, user_kernel)
            os.rename(staging, folder)  # atomic: a cache entry is complete or absent
        progress(f"image {recipe_name}: built in {time.monotonic() - started:.1f} s ({folder})")
        return _from_manifest(manifest)


def remove_stale_builds(folder: Path) -> list[Path]:
    """``.build-*`` folders a killed build left; call holding the folder's lock (no build of
    this cache is running then)."""
    stale = sorted(folder.glob(".build-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def sweep_builds(cache: Path | None = None) -> list[Path]:
    """Stale ``.build-*`` folders of every cache folder no build holds the lock of now."""
    removed = []
    for folder in ((cache or cache_root()) / "images", (cache or cache_root()) / "userland"):
        if not folder.is_dir():
            continue
        with open(folder / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a build is running: its folder is not stale
            removed += remove_stale_builds(folder)
    return removed


def _pinned(recipe_name: str) -> Path | None:
    """An image folder fixed by ``HARNESS_PINNED_IMAGES`` (a JSON map recipe -> folder).

    The lab uses it: the outer side resolved and built the images, so the harness inside L1
    (under TCG, with no network) uses exactly those instead of resolving them again.
    """
    path = os.environ.get("HARNESS_PINNED_IMAGES")
    if not path:
        return None
    try:
        folder = json.loads(Path(path).read_text()).get(recipe_name)
    except (OSError, ValueError) as exc:
        raise ImageError(f"HARNESS_PINNED_IMAGES={path}: unreadable: {exc}") from exc
    if folder is None:
        return None
    if not (Path(folder) / "manifest.json").is_file():
        raise ImageError(f"HARNESS_PINNED_IMAGES={path}: {folder} holds no built image")
    return Path(folder)


def cached_kernel(platform: Platform, cache: Path | None = None) -> Path | None:
    """The kernel of the newest cached builtin image of ``platform``, if one is cached."""
    manifests = sorted(((cache or cache_root()) / "images").glob("*/manifest.json"),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    for manifest in manifests:
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if (data.get("arch") == platform.arch.value and data.get("recipe") in platform.recipes
                and (manifest.parent / "vmlinuz").is_file()):
            return manifest.parent / "vmlinuz"
    return None


def _from_manifest(path: Path) -> GuestImage:
    data = json.loads(path.read_text())
    return GuestImage(key=data["key"], recipe=data["recipe"], kernel=path.parent / "vmlinuz",
                      initrd=path.parent / "initrd.cpio", kernel_release=data["kernel_release"],
                      packages=tuple(PackageRef(**p) for p in data["packages"]))


def _build(recipe: Recipe, platform: Platform, packages: tuple[PackageRef, ...], key: str,
           tmp: Path, out: Path, progress: Progress, user_kernel: UserKernel | None) -> None:
    debs = tmp / "debs"
    debs.mkdir()
    arch = platform.package_arch
    progress(f"  downloading {', '.join(p.name for p in packages)} ({arch})")
    run_tool(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
          *(f"{p.name}:{arch}={p.version}" for p in packages)], "downloading packages",
         cwd=debs)
    trees: dict[str, Path] = {}
    for ref in packages:
        (deb,) = debs.glob(f"{ref.name}_*.deb")
        if ref.sha256 and hashlib.sha256(deb.read_bytes()).hexdigest() != ref.sha256:
            raise ImageError(f"{deb.name}: SHA256 differs from the archive index")
        tree = tmp / "x" / ref.name
        tree.mkdir(parents=True)
        progress(f"  extracting {deb.name}")
        run_tool(["dpkg-deb", "-x", str(deb), str(tree)], f"extracting {deb.name}")
        trees[ref.name] = tree
    if user_kernel is None:
        kernel_ref = next(p for p in packages if p.role == "kernel")
        kernel_tree = trees.pop(kernel_ref.name)
        (vmlinuz,) = (kernel_tree / "boot").glob("vmlinuz-*")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        run_tool(["depmod", "-b", str(kernel_tree), release], "running depmod")
        moddir: Path | None = kernel_tree / "lib" / "modules" / release
    else:
        vmlinuz, moddir = user_kernel.kernel, user_kernel.modules
        release = user_kernel.release()
    entries = _base_entries(trees, recipe.folder, platform)
    entries += _module_entries(moddir, release, recipe.modules, progress)
    progress(f"  writing initramfs ({len(entries)} entries)")
    with open(out / "initrd.cpio", "wb") as fh:
        write_newc(fh, entries)
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    manifest = {"key": key, "recipe": recipe.name, "arch": platform.arch.value,
                "kernel_release": release,
                "builder": BUILDER_VERSION, "packages": [dataclasses.asdict(p) for p in packages],
                "user_kernel": str(user_kernel.kernel) if user_kernel else None}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _tree_entries(tree: Path, platform: Platform) -> list[Entry]:
    entries = []
    skip = _SKIP_PREFIXES + tuple(f"usr/lib/{platform.multiarch}/{d}" for d in _SKIP_LIBDIRS)
    for path in sorted(tree.rglob("*")):
        rel = path.relative_to(tree).as_posix()
        if rel.startswith(skip) and rel not in _KEEP_PROGRAMS:
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            entries.append(Entry.symlink(rel, os.readlink(path)))
        elif stat.S_ISREG(info.st_mode):
            entries.append(Entry.file(rel, path.read_bytes(), stat.S_IMODE(info.st_mode)))
    return entries


def _base_entries(trees: dict[str, Path], recipe_folder: Path,
                  platform: Platform) -> list[Entry]:
    """busybox, the recipe's libraries and programs, /init, /etc, the agent.

    A recipe with its own ``init`` file uses it instead of the shared guest init.  The busybox
    applet links are made by /init itself (``busybox --install -s``): the binary may be of
    another architecture than this host, so it is never run here.
    """
    shared = guest_images_dir()
    init = recipe_folder / "init"
    if not init.is_file():
        init = shared / "initramfs" / "init"
    entries = [Entry.directory(d) for d in (
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "etc/harness",
        "proc", "sys", "dev", "tmp", "run", "root", "var", "var/log", "lib/modules")]
    entries.append(Entry.char_device("dev/console", 5, 1))
    entries.append(Entry.char_device("dev/null", 1, 3, 0o666))
    for tree in trees.values():
        entries += _tree_entries(tree, platform)
    taken = {e.path for e in entries}
    entries.append(Entry.file("init", init.read_bytes(), 0o755))
    for name in ("inittab", "passwd", "shells"):
        entries.append(Entry.file(f"etc/{name}", (shared / "initramfs" / name).read_bytes()))
    entries.append(Entry.file("etc/group", b"root:x:0:\n"))
    entries.append(Entry.file("usr/bin/harness-agent",
                              (shared / "agent" / "harness-agent").read_bytes(), 0o755))
    # Directories implied by files must exist in the archive before their members.
    dirs = {str(Path(e.path).parent) for e in entries} - {"."} - {e.path for e in entries}
    for d in sorted(dirs):
        parts = Path(d).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in taken:
                entries.append(Entry.directory(sub))
                taken.add(sub)
    return entries


def _module_closure(moddir: Path, wanted: tuple[str, ...],
                    progress: Progress | None) -> list[str]:
    """The wanted modules and their dependencies, in load order, as paths under ``moddir``.

    A wanted module that the kernel has built in (modules.builtin) is skipped; one that is
    neither a module nor built in is an error.
    """
    dep_file = moddir / "modules.dep"
    if not dep_file.is_file():
        raise ImageError(f"{moddir}: no modules.dep (run depmod for this kernel)")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    builtin_file = moddir / "modules.builtin"
    builtin = {Path(p).name.split(".ko")[0].replace("-", "_")
               for p in (builtin_file.read_text().split() if builtin_file.is_file() else [])}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        found = by_name.get(key)
        if found is not None:
            visit(found)
        elif key in builtin:
            if progress is not None:
                progress(f"  module {name}: built into the kernel")
        else:
            raise ImageError(f"kernel {moddir.name} has no module {name!r} and does not "
                             "list it as built in")
    return order


def _module_entries(moddir: Path | None, release: str, wanted: tuple[str, ...],
                    progress: Progress) -> list[Entry]:
    """The wanted modules and their dependencies, plus a load order for /init."""
    if moddir is None:
        progress(f"  no modules tree for {release}: the drivers must be built in")
        return [Entry.file("etc/harness/modules", b"")]
    order = _module_closure(moddir, wanted, progress)
    progress(f"  {len(order)} kernel modules: {' '.join(Path(p).stem for p in order)}")
    entries = [Entry.file(f"lib/modules/{Path(p).name}", (moddir / p).read_bytes())
               for p in order]
    entries.append(Entry.file("etc/harness/modules",
                              "".join(f"{Path(p).name}\n" for p in order).encode()))
    return entries
