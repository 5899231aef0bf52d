"""Experiments by hand, for real: ``harness up`` in the background, then ``ssh``, ``qmp``,
``console``, ``irq watch`` and ``down`` from other processes, as a user in another terminal
would type them; Ctrl-C on ``up`` leaves no QEMU behind."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import queue
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu_procs import qemu_pids

from harness.platform import host_platform

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]

SCENARIO = """\
name: manual
vms:
  - name: guest0
    memory_mib: 256
    devices:
      - {kind: virtio-net, id: net0}
      - {kind: virtio-blk, id: disk0}
workloads:
  - {vm: guest0, stage: setup, run: [touch, /tmp/set-up-by-the-scenario]}
"""


@dataclass
class Up:
    """A ``harness up`` running in the background, and how to reach it."""

    proc: subprocess.Popen[str]
    runtime: Path
    out: Path
    env: dict[str, str]
    ready_s: float = 0.0  # from the up command to its "run folder" line (a figure, printed)

    def harness(self, *args: str, timeout: float = 60.0,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"harness {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def session(self) -> dict[str, object]:
        (folder,) = [p for p in self.runtime.iterdir() if (p / "session.json").exists()]
        data: dict[str, object] = json.loads((folder / "session.json").read_text())
        return data

    @property
    def run_dir(self) -> Path:
        return Path(str(self.session()["run_dir"]))


_STARTED: list[Up] = []  # every up a test started, so a failing test leaves none running


@pytest.fixture(autouse=True)
def _no_up_left_behind() -> Iterator[None]:
    """An assertion between start_up and stop_up must not leave ``harness up`` (and its QEMU)
    running: the test's own ups are ended as Ctrl-C would, then killed."""
    before = len(_STARTED)
    yield
    for left in _STARTED[before:]:
        if left.proc.poll() is None:
            left.proc.send_signal(signal.SIGINT)
            try:
                left.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                left.proc.kill()
                left.proc.wait()
    del _STARTED[before:]


def start_up(tmp: Path, scenario: str = SCENARIO, timeout: float = 240.0) -> Up:
    """``harness up`` in the background, returned once it printed how to reach its VMs."""
    runtime = tmp / "runtime"
    (tmp / "scenario.yaml").write_text(scenario)
    env = {**os.environ, "HARNESS_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "up", str(tmp / "scenario.yaml"),
         "--out", str(tmp / "runs")], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=open(tmp / "up.stderr", "w"), text=True)  # noqa: SIM115 - the child's file
    up = Up(proc, runtime, tmp / "up.stdout", env)
    _STARTED.append(up)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read_until_up() -> None:  # the rest is read by stop_up
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
            if line.startswith("run folder "):
                return
        lines.put(None)

    threading.Thread(target=read_until_up, daemon=True).start()
    deadline = time.monotonic() + timeout
    with open(up.out, "w") as log:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                break
            if line is None:
                break
            log.write(line)
            if line.startswith("run folder "):
                up.ready_s = time.monotonic() - (deadline - timeout)
                return up
    proc.kill()
    proc.wait()
    pytest.fail(f"harness up never said its VMs were up (exit {proc.returncode}):\n"
                f"{(tmp / 'up.stderr').read_text()[-3000:]}")


def stop_up(up: Up, sig: signal.Signals = signal.SIGINT, timeout: float = 120.0) -> str:
    """Send ``sig`` to the up process (Ctrl-C) and return the rest of its output."""
    if up.proc.poll() is None:
        up.proc.send_signal(sig)
    try:
        rest, _ = up.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        up.proc.kill()
        rest, _ = up.proc.communicate()
        pytest.fail("harness up did not end after Ctrl-C")
    return rest


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    running = start_up(tmp_path_factory.mktemp("up"))
    try:
        yield running
    finally:
        stop_up(running)


def test_ssh_runs_a_command_in_the_guest_with_its_exit_status(up: Up) -> None:
    print(f"harness up -> its VMs handed over: {up.ready_s:.1f} s")
    done = up.harness("ssh", "guest0", "--", "uname", "-m")
    assert done.stdout.strip() == host_platform().uname
    # the words after -- reach the guest as they were (quoted for its shell), the exit status
    # comes back
    done = up.harness("ssh", up.run_dir.name, "guest0", "--", "sh", "-c", "echo 'a b'; exit 3",
                      check=False)
    assert (done.returncode, done.stdout) == (3, "a b\n")


def test_the_setup_workload_ran_before_the_vms_were_handed_over(up: Up) -> None:
    assert up.harness("ssh", "guest0", "--", "test", "-e",
                      "/tmp/set-up-by-the-scenario", check=False).returncode == 0


def test_the_printed_ssh_command_line_works_from_another_terminal(up: Up) -> None:
    """Plain OpenSSH with the key and known_hosts of the run folder, as ``up`` printed it:
    the host key is pinned (StrictHostKeyChecking=yes against the guest's own key)."""
    line = next(ln for ln in up.out.read_text().splitlines() if ln.strip().startswith("ssh -i"))
    argv = line.split()
    done = subprocess.run([*argv, "--", "cat", "/proc/sys/kernel/hostname"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    vm = up.session()["vms"][0]  # type: ignore[index]
    key, known = Path(vm["ssh"]["key"]), Path(vm["ssh"]["known_hosts"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert known.read_text().startswith(f"[127.0.0.1]:{vm['ssh']['port']} ssh-")
    # Another host key for that port is refused (the pinning is real).
    wrong = up.run_dir / "wrong.known_hosts"
    wrong.write_text(f"[127.0.0.1]:{vm['ssh']['port']} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIPKmnRnRSYmpwWXx4Vu8VJb9FwbK9FPvQS0E47zpV5n2\n")
    bad = [a.replace(str(known), str(wrong)) for a in argv]
    done = subprocess.run([*bad, "--", "true"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 255 and "host key" in done.stderr.lower()


def test_qmp_answers_query_pci_on_a_private_socket(up: Up) -> None:
    done = up.harness("qmp", "guest0", "query-pci")
    buses = json.loads(done.stdout)
    ids = {d["qdev_id"]: (b["bus"], d["slot"]) for b in buses for d in b["devices"]}
    assert ids["net0"] == (0, 3) and ids["disk0"] == (0, 4)
    vm = up.session()["vms"][0]  # type: ignore[index]
    sock = Path(vm["qmp"])
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    # qmp-shell, as qemu.qmp ships it, on the same socket (its input from a pipe here)
    shell = subprocess.run([sys.executable, "-m", "harness.cli", "qmp", "guest0"], cwd=REPO,
                           env=up.env, input="query-status\n", capture_output=True, text=True,
                           timeout=60, check=False)
    assert '"running": true' in shell.stdout, shell.stdout + shell.stderr
    # and an HMP command line
    assert "virtio-net" in up.harness("qmp", "-H", "guest0", "info", "qtree").stdout


def test_console_shows_the_serial_log(up: Up) -> None:
    done = up.harness("console", "guest0", "--no-follow", "-n", "1000")
    assert "harness-init: ready" in done.stdout


def test_irq_watch_shows_the_input_vector_rising_during_a_ping(up: Up) -> None:
    ping = subprocess.Popen([sys.executable, "-m", "harness.cli", "ssh", "guest0", "--",
                             "ping", "-q", "-c", "60", "-i", "0.05", "10.0.2.2"], cwd=REPO,
                            env=up.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        done = up.harness("irq", "watch", "guest0", "--count", "2", "--interval", "1",
                          "--json", timeout=60)
    finally:
        ping.wait(60)
    frames = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(frames) == 2
    rows = [next(r for r in f["rows"] if r["name"] == "virtio0-input.0") for f in frames]
    assert all(r["device"] == "net0" and r["path"] == "emulated" for r in rows)
    assert all(r["count"] > 0 and r["rate"] > 0 for r in rows)
    assert rows[1]["total"] > rows[0]["total"]
    # the table a person reads
    table = up.harness("irq", "watch", "guest0", "--count", "1", "--interval", "0.5").stdout
    assert "RATE/s" in table and "virtio0-input.0" in table


def test_bad_targets_are_one_line_exit_2(up: Up) -> None:
    done = up.harness("ssh", "no-such-vm", "--", "true", check=False)
    assert done.returncode == 2 and "no-such-vm" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_down_ends_the_session_with_a_report_and_leaves_nothing(
        tmp_path: Path) -> None:
    up = start_up(tmp_path)
    run_dir = up.run_dir
    session = up.session()
    pids = qemu_pids(parent=up.proc.pid)
    assert pids
    up.harness("ssh", "guest0", "--", "ping", "-q", "-c", "20", "-i", "0.05", "10.0.2.2")
    done = up.harness("down", timeout=180)
    assert "report:" in done.stdout
    assert up.proc.wait(30) == 0
    report = json.loads((run_dir / "report.json").read_text())
    inputs = [v for v in report["vectors"] if v["name"] == "virtio0-input.0"]
    assert inputs[0]["evidence"]["guest_delta"] >= 20, "the ping by hand was measured"
    assert not pids & qemu_pids()
    assert not Path(session["vms"][0]["ssh"]["key"]).exists()  # type: ignore[index]
    assert not any(up.runtime.iterdir()), "the session folder and its sockets are gone"
    assert up.harness("ssh", "guest0", "--", "true", check=False).returncode == 2


def test_ctrl_c_on_up_reports_and_leaves_no_qemu(tmp_path: Path) -> None:
    up = start_up(tmp_path)
    run_dir = up.run_dir
    pids = qemu_pids(parent=up.proc.pid)
    assert pids
    rest = stop_up(up, signal.SIGINT)
    assert up.proc.returncode == 0, rest
    assert "report:" in rest and (run_dir / "report.json").exists()
    assert not pids & qemu_pids(), "QEMU outlived Ctrl-C on harness up"
    assert not any(up.runtime.iterdir())


# --- hot-plug behind root ports ------------------------------------------------------------

HOTPLUG = """\
name: hotplug
vms:
  - name: guest0
    memory_mib: 256
    devices:
      - {kind: virtio-net, id: net0}
      - {kind: virtio-blk, id: disk0, hotplug: true}
      - {kind: virtio-net, id: net1, ssh: false, hotplug: true}
"""


def _rows(up: Up, device: str) -> list[dict[str, object]]:
    frame = json.loads(up.harness("irq", "watch", "guest0", "--count", "1", "--interval",
                                  "0.5", "--json").stdout)
    rows: list[dict[str, object]] = [r for r in frame["rows"] if r["device"] == device]
    return rows


def test_a_device_is_unplugged_and_plugged_back_with_its_vectors(tmp_path: Path) -> None:
    up = start_up(tmp_path, HOTPLUG)
    run_dir = up.run_dir
    pids = qemu_pids(parent=up.proc.pid)
    devices = {d["id"]: d["bdf"] for d in up.session()["vms"][0]["devices"]}  # type: ignore[index]
    assert devices == {"net0": "0000:00:03.0", "disk0": "0000:01:00.0",
                       "net1": "0000:02:00.0"}
    before = _rows(up, "net1")
    # The guest numbers virtio devices in probe order (devices behind root ports last): the
    # names come from the guest, the device from the harness.
    virtio = str(before[0]["name"]).split("-", 1)[0]
    assert [r["name"] for r in before] == [f"{virtio}-config", f"{virtio}-input.0",
                                           f"{virtio}-output.0"]

    done = up.harness("hotplug", "guest0", "unplug", "net1", timeout=120)
    assert done.stdout.startswith("unplug guest0/net1 (0000:02:00.0)")
    assert f"{virtio}-input.0" in done.stdout
    assert _rows(up, "net1") == [], "the guest has no vector of net1 any more"
    buses = json.loads(up.harness("qmp", "guest0", "query-pci").stdout)
    assert "net1" not in {d["qdev_id"] for b in buses for d in b["devices"]}

    done = up.harness("hotplug", "guest0", "plug", "net1", timeout=120)
    assert "vectors that came" in done.stdout and f"{virtio}-input.0" in done.stdout
    up.harness("ssh", "guest0", "--", "ping", "-q", "-c", "20", "-i", "0.05", "10.0.3.2")
    after = {r["name"]: r for r in _rows(up, "net1")}
    assert int(after[f"{virtio}-input.0"]["total"]) >= 20  # type: ignore[call-overload]

    # device_del by hand on the people's QMP works too (a root port), and hotplug plugs back
    up.harness("qmp", "guest0", "device_del", "id=disk0")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _rows(up, "disk0"):
        time.sleep(0.5)
    assert _rows(up, "disk0") == []
    up.harness("hotplug", "guest0", "plug", "disk0", timeout=120)
    assert len(_rows(up, "disk0")) == 3
    # refusals: the SSH NIC sits on the root bus, a device plugged in already
    done = up.harness("hotplug", "guest0", "unplug", "net0", check=False)
    assert done.returncode == 2 and "root bus" in done.stderr
    done = up.harness("hotplug", "guest0", "plug", "net1", check=False)
    assert done.returncode == 2 and "plugged in already" in done.stderr

    rest = stop_up(up)
    assert up.proc.returncode == 0, rest
    assert not pids & qemu_pids()
    report = json.loads((run_dir / "report.json").read_text())
    net1 = {v["name"]: v for v in report["vectors"] if v["device"] == "net1"}
    assert net1[f"{virtio}-input.0"]["bdf"] == "0000:02:00.0"
    assert net1[f"{virtio}-input.0"]["evidence"]["guest_delta"] >= 20
    events = [json.loads(line) for line in (run_dir / "hotplug.jsonl").read_text().splitlines()]
    assert [(e["device"], e["action"]) for e in events] == [
        ("net1", "unplug"), ("net1", "plug"), ("disk0", "plug")]


ARCHES = [pytest.param("x86_64", id="x86_64"),
          pytest.param("arm64", id="arm64", marks=pytest.mark.system(arch="arm64"))]


@pytest.mark.parametrize("arch", ARCHES)
def test_a_scenario_replugs_a_nic_behind_a_root_port(tmp_path: Path, arch: str) -> None:
    """q35 and virt alike: the predicted address behind the port is the guest's, a workload
    unplugs and plugs the NIC back, and the vectors it has after are judged."""
    scenario = tmp_path / "replug.yaml"
    scenario.write_text(
        f"name: replug\nvms:\n  - name: g\n    arch: {arch}\n    memory_mib: 256\n"
        "    devices:\n      - {kind: virtio-net, id: net0}\n"
        "      - {kind: virtio-net, id: net1, ssh: false, hotplug: true}\n"
        "workloads:\n  - {vm: g, hotplug: {device: net1, pause_s: 0.5}, timeout_s: 120}\n"
        "  - {vm: g, run: [ping, -q, -c, '30', -i, '0.05', 10.0.3.2]}\n"
        "expect:\n  - {vm: g, device: net1, path: emulated, vectors: ['*-input.*'],"
        " min_delta: 30}\n")
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(scenario), "--out",
                           str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    net1 = [v for v in report["vectors"] if v["device"] == "net1"]
    assert {v["bdf"] for v in net1} == {"0000:01:00.0"}
    replug = next(w for w in report["workloads"] if w["name"] == "hotplug replug net1")
    assert replug["exit_status"] == 0
    assert "unplug g/net1 (0000:01:00.0)" in replug["output_tail"]
    assert "plug g/net1 (0000:01:00.0)" in replug["output_tail"]


# --- the lab, by hand ------------------------------------------------------------------------


class Terminal:
    """A command on a pseudo-terminal, typed at as a person would: one line after each
    prompt."""

    PROMPT = re.compile(rb"# $")

    def __init__(self, argv: list[str], log: Path) -> None:
        self.started = time.monotonic()
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command, in the repository
            os.chdir(REPO)
            os.execv(argv[0], argv)
        self.out = b""
        self.log = log.open("wb")

    def read_until(self, pattern: re.Pattern[bytes], after: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.search(self.out, after)
            if found:
                return self.out[after:found.end()]
            ready, _, _ = select.select([self.fd], [], [], 1.0)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                self.log.write(data)
                self.log.flush()
                self.out += data
        raise AssertionError(f"no {pattern.pattern!r} within {timeout:g} s:\n"
                             f"{self.out[-2000:].decode(errors='replace')}")

    def run(self, line: str, timeout: float = 120.0) -> str:
        """Type ``line`` and return what came back up to the next prompt."""
        mark = len(self.out)
        os.write(self.fd, line.encode() + b"\n")
        return self.read_until(self.PROMPT, mark + len(line), timeout).decode(errors="replace")

    def close(self, timeout: float = 120.0) -> int:
        """Wait for the command to end (killed at ``timeout``); its exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    pass
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the command did not end")


HARNESS = str(REPO / ".venv" / "bin" / "harness")


def test_lab_shell_gives_a_prompt_with_harness_and_lspci(tmp_path: Path) -> None:
    term = Terminal([HARNESS, "lab", "shell", "--out", str(tmp_path)], tmp_path / "pty.log")
    try:
        term.read_until(re.compile(rb"harness-lab: shell.*?# $", re.S), 0, 180)
        print(f"lab shell: prompt after {time.monotonic() - term.started:.1f} s")
        l1 = qemu_pids(parent=term.pid)
        assert l1, "L1's QEMU runs as the harness's child"
        out = term.run("harness validate configs/smoke.yaml; echo RC=$?")
        assert "configs/smoke.yaml: ok" in out and "RC=0" in out
        assert "/lab/bin/harness" in term.run("command -v harness")
        out = term.run("lspci -n")
        assert re.search(r"^00:05\.0 0200: 1af4:", out, re.M), out  # L1's NIC, for L2
        os.write(term.fd, b"exit\n")
        assert term.close() == 0
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
    assert not l1 & qemu_pids(), "L1's QEMU outlived the shell"


def test_lab_up_keeps_l2_up_for_the_verbs_inside_l1(tmp_path: Path) -> None:
    term = Terminal([HARNESS, "lab", "up", str(REPO / "configs" / "manual-lab.yaml"),
                     "--out", str(tmp_path)], tmp_path / "pty.log")
    try:
        term.read_until(re.compile(rb"harness-lab: shell \(L2 is up.*?# $", re.S), 0, 400)
        assert "6.1" in term.run("harness ssh l2 -- uname -r </dev/null")
        term.run("harness ssh l2 -- ping -q -c 40 -i 0.02 10.0.2.2 </dev/null")
        out = term.run("harness irq watch l2 --count 1 --interval 1 --json")
        frame = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
        inp = next(r for r in frame["rows"] if r["device"] == "nic"
                   and str(r["name"]).endswith("-input.0"))
        assert inp["bdf"] == "0000:01:00.0" and inp["total"] >= 40
        assert inp["host"] is not None and "KVM irqfd" in inp["host"]["wiring"]
        # the assigned NIC unplugged and plugged back: the host's wiring goes and comes back
        out = term.run("harness hotplug l2 replug nic", timeout=240)
        unplugged = next(ln for ln in out.splitlines() if ln.startswith("unplug l2/nic"))
        plugged = next(ln for ln in out.splitlines() if ln.startswith("plug l2/nic"))
        assert "host wiring now: none" in unplugged
        assert "connected to KVM irqfd" in plugged
        term.run("harness ssh l2 -- sh -c 'ip link set $(harness-agent ifname 0000:01:00.0) up"
                 " && ip addr replace 10.0.2.15/24 dev $(harness-agent ifname 0000:01:00.0)"
                 " && ping -q -c 40 -i 0.02 10.0.2.2' </dev/null")
        out = term.run("harness irq watch l2 --count 1 --interval 1 --json")
        frame = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))
        back = next(r for r in frame["rows"] if r["device"] == "nic"
                    and r["name"] == inp["name"])
        assert back["host"] is not None and back["host"]["total"] >= 40
        os.write(term.fd, b"exit\n")
        assert term.close(300) == 0
    finally:
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
    (report,) = tmp_path.glob("lab-up-manual-lab-*/manual-lab-*/report.json")
    data = json.loads(report.read_text())
    paths = {v["name"].split("-", 1)[1]: v["path"] for v in data["vectors"]
             if v["device"] == "nic"}
    assert paths["input.0"] == "irqfd-bounce"
    events = [json.loads(line) for line in
              (report.parent / "hotplug.jsonl").read_text().splitlines()]
    assert [(e["action"], bool(e["wiring"])) for e in events] == [("unplug", False),
                                                                   ("plug", True)]
