"""Faults and signals during real runs: each ends in the README's exit code, one line on
stderr that says what happened, the reports of what was measured on disk, and no QEMU left.

Each test runs the harness as a subprocess on one TCG guest (about 8 s to boot here) and
does the unkind thing at a known moment, found by waiting for the harness's own progress line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.platform import host_platform

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]

SCENARIO = """\
name: {name}
vms:
  - name: g
    memory_mib: 256
    devices:
      - {{kind: virtio-net, id: net0}}
workloads:
  - {{vm: g, name: warm up, run: [ping, -q, -c, "20", -i, "0.01", 10.0.2.2]}}
  - {{vm: g, name: the long one, run: [{long}], timeout_s: 300}}
expect:
  - {{vm: g, device: net0, path: emulated, vectors: ["*-input.*"], min_delta: 10}}
"""


def qemu_children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                comm = (entry / "comm").read_text()
            except OSError:
                continue
            if comm.startswith("qemu-system") and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


class Harness:
    """``harness run`` in a subprocess, its stderr followed line by line."""

    def __init__(self, tmp_path: Path, name: str, long: str = "sleep, '120'",
                 extra: str = "", vm_keys: str = "") -> None:
        """``extra``: more top-level YAML; ``vm_keys``: more keys of the VM, one per line."""
        scenario = tmp_path / f"{name}.yaml"
        text = SCENARIO.format(name=name, long=long) + extra
        for key in vm_keys.splitlines():
            text = text.replace("    memory_mib: 256\n", f"    memory_mib: 256\n    {key}\n")
        scenario.write_text(text)
        self.out = tmp_path / "runs"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.cli", "run", str(scenario), "--out", str(self.out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.stderr: list[str] = []

    def wait_for(self, text: str, timeout: float = 120) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stderr:
            self.stderr.append(line)
            if text in line:
                return
            if time.monotonic() > deadline:
                break
        pytest.fail(f"never saw {text!r}; stderr:\n{''.join(self.stderr)}")

    def finish(self, timeout: float = 90) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, "".join(self.stderr) + err

    def report(self) -> dict[str, object]:
        (path,) = self.out.glob("*/report.json")
        assert path.stat().st_size > 0
        assert (path.parent / "junit.xml").stat().st_size > 0
        result: dict[str, object] = json.loads(path.read_text())
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("harness: error:")]


def summary_error(out: str) -> str:
    """The run summary's one ERROR line (stdout)."""
    (line,) = [ln for ln in out.splitlines() if ln.strip().startswith("ERROR:")]
    return line


def test_qemu_killed_from_outside_is_named_with_its_signal(tmp_path: Path) -> None:
    h = Harness(tmp_path, "killed")
    try:
        h.wait_for("running the long one")
        (qemu,) = qemu_children(h.proc.pid)
        os.kill(qemu, signal.SIGKILL)
        code, out, err = h.finish()
    finally:
        h.kill()
    assert code == 4, err
    assert "QEMU killed by signal 9 (SIGKILL) during workload" in out
    assert "Traceback" not in err
    report = h.report()
    assert report["error"]["type"] == "GuestError"  # type: ignore[index]
    assert not qemu_children(h.proc.pid)


def test_a_guest_panic_during_a_workload_says_so_with_the_console(tmp_path: Path) -> None:
    h = Harness(tmp_path, "panic", long="sh, -c, 'echo c > /proc/sysrq-trigger'")
    try:
        code, out, err = h.finish(timeout=120)
    finally:
        h.kill()
    assert code == 4, out + err
    line = summary_error(out)
    assert "the guest printed '[" in line and "Kernel panic - not syncing" in line, line
    report = h.report()
    assert "Kernel panic" in json.dumps(report["console_tails"])
    assert "Traceback" not in err


def test_a_kernel_that_never_reaches_init_is_sampled_and_booted_again(tmp_path: Path) -> None:
    """init_s shorter than the kernel's boot under TCG (1.6 s to init here): each boot "hangs"
    before init as far as the harness can tell, so both attempts fail with the vCPUs
    sampled."""
    h = Harness(tmp_path, "hang", extra="timeouts: {init_s: 0.4, boot_attempts: 2}\n",
                vm_keys="accel: tcg\ncpus: 2")
    try:
        h.wait_for("booting it again (boot 2 of 2)")
        code, out, err = h.finish()
    finally:
        h.kill()
    assert code == 4, out + err
    line = summary_error(out)
    # The last attempt's reading, and the first one's behind it, each naming its samples.
    hung = "the guest's init did not start within 0.4 s of QEMU's start; vCPU 0 (thread "
    assert line.count(hung) == 2 and "(boot 2 of 2; the earlier: " in line, line
    # each boot: the vCPU threads on the host (TCG: QEMU's own threads), then the registers
    assert line.count("of a core in the guest, ") == 4, line
    assert line.count(" samples over ") >= 2, line
    assert "(g.stuck.txt)" in line and "(g.attempt1.stuck.txt)" in line, line
    (run,) = h.out.iterdir()
    for name in ("g.stuck.txt", "g.attempt1.stuck.txt"):
        text = (run / name).read_text()
        assert text.startswith("query-status: {") and "'status': 'running'" in text, text
        pc = host_platform().pc_registers[0]
        assert text.count("--- info registers -a, +") == 3 and f"{pc}=" in text, text
        assert text.count("--- vCPU 1 thread ") == 2 and "; wchan " in text, text
    for suffix in ("console.log", "qemu.log", "argv"):
        assert (run / f"g.attempt1.{suffix}").exists() and (run / f"g.{suffix}").exists()
    assert "Traceback" not in err
    assert not qemu_children(h.proc.pid)


def test_a_kernel_that_panics_before_init_is_booted_again_and_both_panics_named(
        tmp_path: Path) -> None:
    """No init in the initramfs (rdinit= names none): the kernel panics before init."""
    h = Harness(tmp_path, "noinit", extra="timeouts: {boot_attempts: 2}\n",
                vm_keys="append: rdinit=/no-such-init")
    try:
        code, out, err = h.finish(timeout=120)
    finally:
        h.kill()
    assert code == 4, out + err
    line = summary_error(out)
    assert "(boot 2 of 2; the earlier: guest failed while waiting for the guest's init to " \
        "start: [" in line and line.count("Unable to mount root fs") >= 3, line
    # panic=-1 and -no-reboot: the panic is a reset, QEMU's exit says so
    assert line.endswith("Unable to mount root fs on unknown-block(0,0): QEMU exited with code "
                         "0 (guest-reset)))"), line
    (run,) = h.out.iterdir()
    assert "Unable to mount root fs" in (run / "g.attempt1.console.log").read_text()
    assert not qemu_children(h.proc.pid)


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM, signal.SIGTERM]],
                         ids=["sigint", "sigterm-twice"])
def test_a_signal_during_the_workload_reports_what_was_measured_and_exits_130(
        tmp_path: Path, signals: list[signal.Signals]) -> None:
    h = Harness(tmp_path, "signalled")
    try:
        h.wait_for("running the long one")
        for sig in signals:  # the second one lands in the teardown the first one started
            h.proc.send_signal(sig)
            time.sleep(0.3)
        code, out, err = h.finish()
    finally:
        h.kill()
    assert code == 130, err  # not death by the second signal
    report = h.report()
    assert report["error"]["type"] == "Interrupted"  # type: ignore[index]
    assert "interrupted during workload" in report["error"]["message"]  # type: ignore[index]
    names = [w["name"] for w in report["workloads"]]  # type: ignore[attr-defined]
    assert names in ([], ["warm up"])
    assert "Traceback" not in err and "Task was destroyed" not in err
    assert not qemu_children(h.proc.pid)


def test_an_out_folder_that_cannot_be_written_is_one_line_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    scenario = REPO / "configs" / "smoke.yaml"
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(scenario),
                           "--out", str(blocker / "runs")], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        f"harness: error: --out {blocker}/runs: cannot write a run folder there: "
        "Not a directory"]


@pytest.mark.skipif(os.geteuid() != 0, reason="host capability missing: mounting a small "
                    "tmpfs (a full disk) needs root")
def test_a_full_disk_is_one_line_exit_4_and_no_partial_report(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(full)], check=True)
    try:
        done = subprocess.run([sys.executable, "-m", "harness.cli", "run",
                               str(REPO / "configs" / "smoke.yaml"), "--out", str(full)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        (run_dir,) = full.iterdir()
        assert done.returncode == 4, done.stderr
        assert done.stderr.count("Traceback") == 0
        (line,) = error_lines(done.stderr)
        assert "No space left on device" in line and str(run_dir) in line, line
        report = run_dir / "report.json"
        assert not report.exists() or json.loads(report.read_text())  # never a partial one
        assert not list(run_dir.glob(".*.part"))
        assert not qemu_children(os.getpid())
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
