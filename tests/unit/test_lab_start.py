"""What the harness does so that it starts quickly inside the lab's L1, checked on this machine:
the SSH library loads on a thread of its own and without invoke, the harness's modules are
byte-compiled before L1 boots, and L1's job reads the files L2's QEMU will need on the side."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness.config import load_scenarios
from harness.lab import l1
from harness.platform import X86_64
from harness.qemu.console import Console

REPO = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_client_key_is_made_without_paramiko_and_preload_loads_it_on_a_thread() -> None:
    out = _python("""
        import sys, threading
        from harness.guest.ssh import ClientKey, preload
        key = ClientKey.generate()
        print("after key:", "paramiko" in sys.modules)
        preload()
        loaders = [t for t in threading.enumerate() if t.name == "import-paramiko"]
        print("threads:", len(loaders))
        for t in loaders:
            t.join(60)
        print("after preload:", "paramiko" in sys.modules, sys.modules.get("invoke", "absent"))
        # the key signs as paramiko wants it, from the PEM it was made with
        print("key type:", key.private.get_name(), key.public_line.split()[0])
    """)
    assert "after key: False" in out
    assert "threads: 1" in out
    assert "after preload: True None" in out  # loaded, and invoke declared absent
    assert "key type: ssh-ed25519 ssh-ed25519" in out


def test_a_second_preload_starts_no_second_thread() -> None:
    out = _python("""
        import threading
        from harness.guest import ssh
        ssh.preload(); ssh.preload()
        print(sum(t.name == "import-paramiko" for t in threading.enumerate()) <= 1,
              ssh._preloader is not None)
    """)
    assert out.split() == ["True", "True"]


def test_byte_compile_writes_what_is_missing_even_when_python_is_told_not_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("VALUE = 1\n")
    l1._byte_compile(package)
    cached = sorted(p.name for p in (package / "__pycache__").iterdir())
    tag = sys.implementation.cache_tag
    assert cached == [f"__init__.{tag}.pyc", f"mod.{tag}.pyc"]
    pyc = package / "__pycache__" / f"mod.{tag}.pyc"
    first = pyc.stat().st_mtime_ns
    l1._byte_compile(package)  # up to date: left alone
    assert pyc.stat().st_mtime_ns == first
    (package / "mod.py").write_text("VALUE = 22\n")  # edited later: stale, compiled again
    later = pyc.stat().st_mtime + 10
    os.utime(package / "mod.py", (later, later))
    l1._byte_compile(package)
    # the .pyc header records the source's size (bytes 12-16, little-endian)
    assert int.from_bytes(pyc.read_bytes()[12:16], "little") == len("VALUE = 22\n")


def test_the_job_reads_its_list_and_qemu_on_the_side_before_the_harness() -> None:
    job = l1.run_job(["harness", "run", "x.yaml"], "/lab/warm list", "qemu-system-x86_64")
    side = next(line for line in job.splitlines() if "-version" in line)
    assert side == ("( ( xargs -d '\\n' cat -- < '/lab/warm list'; "
                    "qemu-system-x86_64 -version; ) >/dev/null 2>&1 & )")  # in the background
    assert job.index(side) < job.index("harness run x.yaml")
    checked = subprocess.run(["sh", "-n"], input=job, text=True, capture_output=True,
                             check=False)
    assert checked.returncode == 0, checked.stderr
    assert "-version" not in l1.run_job(["true"])  # nothing to read: no side job


def test_the_list_names_a_runs_modules_in_import_order() -> None:
    out = _python("""
        from harness.lab import l1
        files = [str(f) for f in l1._module_files()]
        import os, sys
        print(all(os.path.exists(f) for f in files), len(files))
        def at(part): return next(i for i, f in enumerate(files) if part in f)
        print(at("harness/__pycache__/cli.") < at("harness/__pycache__/runner."),
              at("paramiko/__pycache__/transport.") >= 0, at("_rust.abi3.so") >= 0)
        print(any("/invoke/" in f for f in files))
    """)
    exists, count, order, has_paramiko, has_rust, invoke = out.split()
    assert exists == "True" and int(count) > 100
    assert (order, has_paramiko, has_rust) == ("True", "True", "True")
    assert invoke == "False"


def test_the_recipes_read_ahead_are_the_ones_the_scenarios_boot() -> None:
    (vfio,) = load_scenarios(REPO / "configs" / "lab-vfio.yaml")
    assert l1.scenario_recipes(vfio, X86_64) == ("debian-cloud",)
    mixed = load_scenarios(REPO / "configs" / "mixed-nics.yaml")[0]
    # an e1000e needs the generic kernel; the other VM is content with the cloud one
    assert set(l1.scenario_recipes(mixed, X86_64)) == {"debian-generic", "debian-cloud"}


def test_the_wrapper_starts_python_without_site(tmp_path: Path) -> None:
    l1._write_tools(tmp_path, sys.executable, "/somewhere/site-packages")
    wrapper = (tmp_path / "bin" / "harness").read_text()
    assert " -S -m harness.cli " in wrapper and "/somewhere/site-packages" in wrapper
    assert os.access(tmp_path / "bin" / "harness", os.X_OK)


class _L1:
    """L1 as L0 sees it: a real console over a socketpair, fed by a thread in the test."""

    name = "lab-l1"
    argv: list[str] = []

    def __init__(self, console: Console, done: threading.Event) -> None:
        self.console = console
        self._done = done

    def is_alive(self) -> bool:
        return not self._done.is_set()

    def wait_exit(self, timeout: float) -> int:
        self._done.wait(timeout)
        return 0


def test_harness_start_in_l1_ends_at_the_inner_harness_first_progress_line(
        tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    console = Console("lab-l1", ours, tmp_path / "console.log")
    done = threading.Event()
    said: list[str] = []

    def l1_prints() -> None:
        theirs.sendall(b"harness-lab: job start 3.07\n[    3.200000] a kernel line\n")
        time.sleep(0.3)  # the harness starting
        theirs.sendall(b"[14:56:07] scenario lab-vfio: run folder /lab/x\n")
        time.sleep(0.1)
        theirs.sendall(b"[14:56:08] l2: starting QEMU\nharness-lab: job end 9.5\n")
        done.set()

    started = time.monotonic()
    feeder = threading.Thread(target=l1_prints)
    feeder.start()
    try:
        first = l1._follow(_L1(console, done), said.append, 30.0)  # type: ignore[arg-type]
    finally:
        feeder.join()
        console.close()
        theirs.close()
    assert first is not None and 0.3 <= first - started < 5
    # only the harness's progress lines are relayed, not the kernel's
    assert said == ["L1 [14:56:07] scenario lab-vfio: run folder /lab/x",
                    "L1 [14:56:08] l2: starting QEMU"]
