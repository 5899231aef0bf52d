"""System tests: real QEMU guests (TCG here), real SSH, real /proc/interrupts.

Each boot costs a few seconds under TCG, so one guest is shared by the tests that only look.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from qemu_procs import qemu_pids

from harness.cli import main
from harness.config.model import VM, Arch, BuiltinImage, VirtioBlk, VirtioNet
from harness.errors import GuestError, LaunchError
from harness.guest.ssh import GuestSSH
from harness.images.builder import GuestImage, ensure_image
from harness.platform import host_platform
from harness.vm import GuestVM

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


#: Both guest architectures; a test that takes ``arch`` runs once for each.
ARCHES = [pytest.param(Arch.X86_64, id="x86_64"),
          pytest.param(Arch.ARM64, id="arm64", marks=pytest.mark.system(arch="arm64"))]


def smoke_vm(**overrides: object) -> VM:
    spec: dict[str, object] = {
        "name": "t0", "cpus": 2, "memory_mib": 256,
        "image": BuiltinImage(kind="builtin"),
        "devices": (VirtioNet(kind="virtio-net", id="net0"),
                    VirtioBlk(kind="virtio-blk", id="disk0"))}
    spec.update(overrides)
    return VM(**spec)  # type: ignore[arg-type]


def _host_image() -> GuestImage:
    platform = host_platform()
    return ensure_image(platform.recipes[0], platform)


@pytest.fixture(scope="module", params=ARCHES)
def guest(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    with GuestVM(smoke_vm(arch=request.param), tmp_path_factory.mktemp("guest")) as vm:
        vm.boot()
        yield vm


def test_guest_boots_and_answers_over_ssh(guest: GuestVM) -> None:
    assert guest.image is not None
    result = guest.run(["uname", "-r", "-m"], timeout=30)
    assert result.exit_status == 0
    release, machine = result.stdout.split()
    assert release == guest.image.kernel_release
    assert machine == guest.platform.uname
    assert guest.accel is not None and guest.accel.accel in ("kvm", "tcg")


def test_agent_snapshot_names_the_devices_vectors(guest: GuestVM) -> None:
    snap = guest.snapshot()
    net = snap.device("0000:00:03.0")
    assert net is not None and net.driver == "virtio-pci"
    assert [kind for _, kind in net.msi_irqs] == ["msix"] * 3  # config, input.0, output.0
    lines = {line.label: line for line in snap.interrupts.lines}
    names = sorted(a for irq, _ in net.msi_irqs for a in lines[irq].actions)
    assert names == ["virtio0-config", "virtio0-input.0", "virtio0-output.0"]
    # The interrupt controller's name: x86's PCI-MSI domain, or the GICv3 ITS on arm64.
    chips = {lines[irq].chip for irq, _ in net.msi_irqs}
    assert chips == ({"ITS-MSI"} if guest.platform.arch is Arch.ARM64 else {"PCI-MSI"})
    for irq, _ in net.msi_irqs:
        vector = lines[irq].vector
        assert vector is not None and vector.bdf == "0000:00:03.0"


def test_network_workload_raises_the_input_vector(guest: GuestVM) -> None:
    before = guest.snapshot()
    done = guest.run(["ping", "-q", "-c", "20", "-i", "0.01", "10.0.2.2"], timeout=60)
    assert done.exit_status == 0, done.stderr
    after = guest.snapshot()
    rows = [r for r in before.interrupts.delta(after.interrupts).rows
            if r.after is not None and "virtio0-input.0" in r.after.actions]
    assert len(rows) == 1
    assert rows[0].total >= 20  # one reply per echo at least


def test_a_wrong_pinned_host_key_is_refused(guest: GuestVM) -> None:
    assert guest.ssh is not None
    impostor = paramiko.Ed25519Key.from_private_key  # noqa: F841 - only the type matters
    other = GuestSSH("t0", guest.ssh.port, _other_host_key(), guest.ssh._client_key)
    with pytest.raises(GuestError, match="host key differs"):
        other.connect(10, lambda: True, lambda: "")


def _other_host_key() -> paramiko.PKey:
    from harness.guest.ssh import ClientKey, parse_host_key

    return parse_host_key(ClientKey.generate().public_line)


@pytest.mark.parametrize("arch", ARCHES)
def test_teardown_leaves_no_qemu(tmp_path: Path, arch: Arch) -> None:
    with GuestVM(smoke_vm(name="t1", arch=arch), tmp_path) as vm:
        vm.boot()
        assert vm.machine is not None
        pid = vm.machine.pid
        assert pid in qemu_pids()
    assert pid not in qemu_pids()
    vm.close()  # idempotent
    assert not list(tmp_path.glob("*.img")), "scratch disks must be removed"


def test_launch_failure_reports_exit_code_argv_and_output(tmp_path: Path) -> None:
    vm = GuestVM(smoke_vm(name="t2", extra_args=("-device", "no-such-device")), tmp_path)
    with vm, pytest.raises(LaunchError) as info:
        vm.boot()
    err = info.value
    assert err.returncode == 1
    assert "no-such-device" in err.output
    assert "no-such-device" in " ".join(err.argv)
    assert "exit code 1" in str(err)


def test_a_qemu_that_crashes_is_named_once_it_is_gone(tmp_path: Path) -> None:
    """A QEMU that dies (SIGSEGV sent from outside, as QEMU 7.2 crashed answering 'info
    registers' for the Arm lab's stuck L2): its monitor goes first, the process a moment
    later; death_within waits for the process and names the signal."""
    vm = GuestVM(smoke_vm(name="t3"), tmp_path)
    with vm:
        vm.launch()
        assert vm.machine is not None and vm.machine.pid is not None
        assert vm.machine.death_within(0.2) is None  # still running: waited, then None
        os.kill(vm.machine.pid, signal.SIGSEGV)
        assert vm.machine.death_within(5.0) == "killed by signal 11 (SIGSEGV)"


@pytest.mark.parametrize("arch", ARCHES)
def test_a_panicking_guest_fails_fast_with_the_console_tail(tmp_path: Path, arch: Arch) -> None:
    vm = GuestVM(smoke_vm(name="t3", arch=arch, append="rdinit=/no-such-init"), tmp_path,
                 boot_timeout=120)
    started = time.monotonic()
    with vm, pytest.raises(GuestError) as info:
        vm.boot()
    assert time.monotonic() - started < 30, "a panic must not wait for the boot timeout"
    assert "Kernel panic" in str(info.value) or "QEMU exited" in str(info.value)
    assert "no-such-init" in info.value.console_tail or "panic" in info.value.console_tail


@pytest.mark.parametrize("scenario", [
    "smoke.yaml", pytest.param("smoke-arm64.yaml", marks=pytest.mark.system(arch="arm64"))])
def test_cli_run_smoke_writes_reports_and_passes(tmp_path: Path, scenario: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(REPO / "configs" / scenario), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = tmp_path.iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["format"] == "harness-run/1" and report["passed"] is True
    inputs = [v for v in report["vectors"] if v["name"] == "virtio0-input.0"]
    assert inputs and inputs[0]["evidence"]["guest_delta"] >= 50
    assert inputs[0]["path"] == "emulated"
    assert (run_dir / "junit.xml").read_text().count("<testcase") == 4
    assert (run_dir / "guest0.before.interrupts").read_text().lstrip().startswith("CPU0")
    assert "virtio0-input.0" in out and "PASSED" in out


def test_cli_run_fails_when_a_vector_did_not_fire(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "quiet.yaml"
    scenario.write_text(
        "name: quiet\n"
        "vms:\n  - name: g\n    memory_mib: 256\n    devices:\n"
        "      - {kind: virtio-net, id: net0}\n      - {kind: virtio-blk, id: disk0}\n"
        "expect:\n  - {vm: g, device: disk0, path: emulated, min_delta: 1000000}\n")
    code = main(["run", str(scenario), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] g/disk0 expects emulated" in out


def test_sigkill_of_the_harness_leaves_no_qemu(tmp_path: Path) -> None:
    scenario = tmp_path / "long.yaml"
    scenario.write_text(
        "name: long\nvms:\n  - name: g\n    memory_mib: 256\n    devices:\n"
        "      - {kind: virtio-net, id: net0}\n"
        "workloads:\n  - {vm: g, run: [sleep, '600'], timeout_s: 900}\n")
    harness = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "run", str(scenario), "--out", str(tmp_path)],
        stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert harness.stderr is not None
    try:
        for line in harness.stderr:
            if "running sleep" in line:
                break
        else:
            pytest.fail(f"the harness never reached the workload (exit {harness.wait()})")
        ours = qemu_pids(parent=harness.pid)  # setpriv execs QEMU: its parent is the harness
        assert ours, "QEMU should be running the guest now"
        os.kill(harness.pid, signal.SIGKILL)
        harness.wait()
        deadline = time.monotonic() + 10
        while ours & qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not ours & qemu_pids(), "QEMU outlived the SIGKILLed harness"
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()


def test_a_users_own_kernel_and_modules_tree_boots(tmp_path: Path) -> None:
    """kind: kernel - a kernel and /lib/modules tree from outside the harness's cache.

    The Debian kernel package, unpacked by hand into a temp dir, stands in for a user's
    build: the harness builds its initramfs around it from the modules tree given.
    """
    from harness.config.model import KernelImage

    ref = next(p for p in _host_image().packages if p.role == "kernel")
    subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
                    f"{ref.name}={ref.version}"], cwd=tmp_path, check=True,
                   capture_output=True)
    (deb,) = tmp_path.glob("*.deb")
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    (vmlinuz,) = (tree / "boot").glob("vmlinuz-*")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    subprocess.run(["depmod", "-b", str(tree), release], check=True)
    image = KernelImage(kind="kernel", kernel=str(vmlinuz),
                        modules=str(tree / "lib" / "modules" / release))
    with GuestVM(smoke_vm(name="t4", image=image), tmp_path / "run") as vm:
        vm.boot()
        assert vm.image is not None and "userkernel" in vm.image.folder.name
        assert vm.run(["uname", "-r"], 30).stdout.strip() == release
        loaded = vm.run(["cat", "/proc/modules"], 30).stdout
        assert "virtio_net" in loaded and "virtio_blk" in loaded


def test_a_mismatched_modules_tree_is_refused(tmp_path: Path) -> None:
    from harness.config.model import KernelImage
    from harness.errors import ImageError

    wrong = tmp_path / "5.10.0-99-amd64"
    wrong.mkdir()
    (wrong / "modules.dep").write_text("")
    image = KernelImage(kind="kernel", kernel=str(_host_image().kernel), modules=str(wrong))
    with GuestVM(smoke_vm(name="t5", image=image), tmp_path) as vm:
        with pytest.raises(ImageError, match="is for release 5.10.0-99-amd64"):
            vm.prepare()


@pytest.mark.skipif(not os.environ.get("HARNESS_CLOUD_IMAGE"),
                    reason="no cloud image on this host: set HARNESS_CLOUD_IMAGE to a qcow2 "
                           "cloud image with cloud-init (none can be downloaded here)")
def test_a_cloud_image_boots_with_the_seed(tmp_path: Path) -> None:
    from harness.config.model import CloudImage

    image = CloudImage(kind="cloud", disk=os.environ["HARNESS_CLOUD_IMAGE"])
    with GuestVM(smoke_vm(name="t6", image=image, memory_mib=1024), tmp_path,
                 boot_timeout=600) as vm:
        vm.boot()
        snap = vm.snapshot()
        assert snap.device("0000:00:03.0") is not None


def test_two_guests_boot_side_by_side_and_are_counted_apart(tmp_path: Path) -> None:
    from harness.config import load_scenario_text
    from harness.runner import run_scenario

    scenario = load_scenario_text(
        "name: pair\nvms:\n"
        "  - {name: a, memory_mib: 256, devices: [{kind: virtio-net, id: net0}]}\n"
        "  - {name: b, memory_mib: 256, devices: [{kind: virtio-net, id: net0}]}\n"
        "workloads:\n  - {vm: a, run: [ping, -q, -c, '30', -i, '0.01', 10.0.2.2]}\n"
        "expect:\n  - {vm: a, device: net0, path: emulated, vectors: ['*-input.*'],"
        " min_delta: 30}\n", str(tmp_path / "pair.yaml"))
    result = run_scenario(scenario, "pair.yaml", tmp_path / "run")
    assert result.error is None, result.error
    assert result.passed
    ports = {vm.ssh_port for vm in result.vms}
    assert len(ports) == 2, "each guest has its own forwarded port"
    inputs = {v.vm: v.guest_delta for v in result.verdicts if v.name == "virtio0-input.0"}
    assert inputs["a"] >= 30
    assert inputs["b"] < inputs["a"], "b's counts must not include a's workload"


def test_e1000e_beside_virtio_and_a_second_vm_pass_with_the_default_setup(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """configs/mixed-nics.yaml: e1000e's driver is only in the generic kernel, which the
    harness picks for that VM by itself; its vectors are counted and judged."""
    code = main(["run", str(REPO / "configs" / "mixed-nics.yaml"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = tmp_path.iterdir()
    report = json.loads((run_dir / "report.json").read_text())
    lan = [v for v in report["vectors"] if v["vm"] == "nics" and v["device"] == "lan0"]
    # 100 echo replies; the e1000e moderates its interrupts (ITR), so fewer than 100 may come.
    assert sum(v["evidence"]["guest_delta"] for v in lan) >= 40
    assert {v["path"] for v in lan if v["evidence"]["guest_delta"] > 0} == {"emulated"}
    kernels = {vm["name"]: vm["kernel_release"] for vm in report["vms"]}
    assert not kernels["nics"].endswith("-cloud-amd64") and kernels["disk"].endswith("-cloud-amd64")


def test_e1000e_as_the_ssh_nic(tmp_path: Path) -> None:
    from harness.config.model import E1000e

    spec = smoke_vm(name="t6", devices=(E1000e(kind="e1000e", id="lan0", ssh=True),))
    with GuestVM(spec, tmp_path) as vm:
        vm.boot()
        assert vm.recipe().name == "debian-generic"
        done = vm.run(["cat", "/sys/class/net/eth0/device/vendor"], 30)
        assert done.stdout.strip() == "0x8086"  # Intel: the e1000e carries the SSH session


def test_a_nic_whose_driver_is_missing_fails_at_once_with_the_console_line(
        tmp_path: Path) -> None:
    """The recipe is forced to the cloud kernel (the loader would refuse this scenario): the
    guest's init finds no NIC with the SSH MAC and says so; the wait ends there."""
    from harness.config.model import E1000e

    spec = smoke_vm(name="t7", image=BuiltinImage(kind="builtin", recipe="debian-cloud"),
                    devices=(E1000e(kind="e1000e", id="lan0", ssh=True),))
    started = time.monotonic()
    with GuestVM(spec, tmp_path, boot_timeout=120) as vm, pytest.raises(GuestError) as info:
        vm.boot()
    assert time.monotonic() - started < 30, "must not wait for the SSH timeout"
    assert "harness-init: fatal: no NIC with MAC" in str(info.value)
