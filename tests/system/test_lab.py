"""System tests in the virtual lab: an emulated host (L1: TCG, nested SVM, emulated VT-d with
interrupt remapping, vfio-pci) that assigns its virtio-net to a guest (L2).

Each test boots L1 once (about 6 s here) and runs real work in it: the harness inside L1 binds
the device, traces the kernel's IRQ bypass and boots L2 under L1's KVM.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.lab.l1 import LAB_DEVICE_BDF, LabBoot, run_in_lab
from harness.platform import host_platform

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def reports(run_dir: Path) -> dict[str, Any]:
    found = {}
    for path in run_dir.glob("*/report.json"):
        report = json.loads(path.read_text())
        found[report["scenario"]["name"]] = report
    return found


def nic_vectors(report: dict[str, Any]) -> dict[str, Any]:
    return {v["name"]: v for v in report["vectors"] if v["device"] == "nic"}


def test_lab_vfio_gives_each_path_its_verdict_from_the_evidence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One L2 with two assigned NICs, one over KVM irqfd and one relayed by QEMU: each gets
    its path from the evidence, in one boot."""
    code = main(["lab", "run", str(REPO / "configs" / "lab-vfio.yaml"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = tmp_path.iterdir()
    found = reports(run_dir)
    assert sorted(found) == ["lab-vfio"]
    report = found["lab-vfio"]
    assert report["passed"] is True, report
    for device, host_bdf, path, connected in (
            ("nic", "0000:00:05.0", "irqfd-bounce", True),
            ("nic_user", "0000:00:06.0", "userspace-bounce", False)):
        vectors = {v["name"].split("-", 1)[1]: v for v in report["vectors"]
                   if v["device"] == device}
        for vector in ("input.0", "output.0"):
            v = vectors[vector]
            assert v["path"] == path, v
            guest, host = v["evidence"]["guest_delta"], v["evidence"]["host_delta"]
            assert guest >= 150 and 0.5 <= host / guest <= 1.5, v
            assert v["evidence"]["wiring"]["connected"] is connected, v
            assert v["evidence"]["wiring"]["producer"] is True, v
        wiring = [w for w in report["host_wiring"] if w["bdf"] == host_bdf]
        assert len(wiring) == 3  # config, rx, tx
    notes = " ".join(report["host_notes"])
    assert "posting not possible" in notes and "cap bit 59" in notes
    # The trace and both consoles come back with the reports.
    inner = next(p.parent for p in run_dir.glob("lab-vfio-*/report.json"))
    assert "irq_bypass_register_producer" in (inner / "host.bypass.trace").read_text()
    assert (inner / "l2.console.log").read_text().count("harness-init: ready") == 1
    assert "harness-lab: job end" in (run_dir / "lab-l1.console.log").read_text()


def test_a_wrong_expectation_fails_and_says_why(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "configs" / "lab-vfio.yaml").read_text()
    wrong = tmp_path / "expects-posted.yaml"
    wrong.write_text(text.replace("name: lab-vfio", "name: lab-expects-posted")
                     .replace("path: irqfd-bounce", "path: posted"))
    code = main(["lab", "run", str(wrong), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "[FAIL] l2/nic expects posted: virtio1-input.0: irqfd-bounce" in out
    assert "connected to a KVM irqfd consumer" in out  # the evidence behind the verdict
    assert "posting not possible" in out  # and why posting was never on the table
    assert "[PASS] l2/nic_user expects userspace-bounce" in out


LIFECYCLE = """\
set -u
harness() {{ {python} -m harness.cli "$@"; }}
driver() {{ basename "$(readlink /sys/bus/pci/devices/{bdf}/driver)"; }}
wait_for() {{ i=0; until grep -q "$1" "$2" 2>/dev/null || [ $i -ge 1200 ]; do
    sleep 0.1; i=$((i + 1)); done; }}
echo "before=$(driver)" > /lab/drivers
harness preflight --device {bdf} --json > /lab/preflight.json
# A live trace beside the run: two probe sessions at once, each in its own instance.
{python} -m harness.cli trace --quiet --json /lab/trace.json > /lab/trace.out 2>&1 &
tpid=$!
wait_for "Ctrl-C to stop" /lab/trace.out
{python} -m harness.cli run {scenario} --out /lab/runs > /lab/run.out 2>&1 &
pid=$!  # the harness itself (a shell function here would put a subshell in between)
i=0
until [ "$(driver)" = vfio-pci ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "during=$(driver)" >> /lab/drivers
wait_for "running sleep" /lab/run.out
kill -TERM $tpid
wait $tpid
echo "trace_exit=$?" >> /lab/drivers
ls /sys/kernel/tracing/instances > /lab/instances-during
kill -9 $pid
wait $pid 2>/dev/null
sleep 1
echo "after_kill=$(driver)" >> /lab/drivers
pgrep -a qemu-system > /lab/qemu-left || true
harness restore > /lab/restore.out 2>&1
echo "restore_exit=$?" >> /lab/drivers
echo "after_restore=$(driver)" >> /lab/drivers
harness restore > /lab/restore-again.out 2>&1
echo "restore_again_exit=$?" >> /lab/drivers
cat /sys/kernel/tracing/kprobe_events > /lab/kprobes-left
ls /sys/kernel/tracing/instances > /lab/instances-left
"""


def test_preflight_binding_sigkill_and_restore_in_the_lab(tmp_path: Path) -> None:
    """Issue 4 in the emulated host: preflight's verdict, a journaled binding, a SIGKILLed
    harness in the middle of a bound run, and `harness restore` giving the device back."""
    scenario = tmp_path / "bound.yaml"
    scenario.write_text(
        "name: bound\nvms:\n  - name: l2\n    accel: kvm\n    cpus: 1\n    memory_mib: 256\n"
        "    devices:\n      - {kind: virtio-net, id: ssh0, network: 10.0.3.0/24}\n"
        f"      - {{kind: vfio-pci, id: nic, host: '{LAB_DEVICE_BDF}'}}\n"
        "workloads:\n  - {vm: l2, run: [sleep, '600'], timeout_s: 900}\n")
    job = tmp_path / "lifecycle.sh"
    job.write_text(LIFECYCLE.format(python=shlex.quote(sys.executable), bdf=LAB_DEVICE_BDF,
                                    scenario=shlex.quote(str(scenario))))
    lab = run_in_lab(host_platform(), [LabBoot(("sh", str(job)), harness=False)],
                     tmp_path / "lab", lambda message: None, timeout=300)
    share = lab.run_dir
    drivers = dict(line.split("=", 1) for line in (share / "drivers").read_text().split())
    assert drivers["before"] == "virtio-pci"
    assert drivers["during"] == "vfio-pci"
    assert drivers["after_kill"] == "vfio-pci", "SIGKILL leaves the binding for restore"
    assert (share / "qemu-left").read_text().strip() == "", "QEMU died with the harness"
    assert drivers["restore_exit"] == "0", (share / "restore.out").read_text()
    assert drivers["after_restore"] == "virtio-pci"
    assert f"{LAB_DEVICE_BDF}: restored" in (share / "restore.out").read_text()
    assert drivers["restore_again_exit"] == "0"
    assert "nothing to restore" in (share / "restore-again.out").read_text()
    # harness trace, stopped by SIGTERM in the middle of the run, saw L2's MSI-X connected
    # (its own probes, beside the run's), removed its probes, and wrote the wiring.
    assert drivers["trace_exit"] == "0", (share / "trace.out").read_text()
    wiring = json.loads((share / "trace.json").read_text())["wiring"]
    msix = [w for w in wiring if w["bdf"] == LAB_DEVICE_BDF and w["kind"] == "msix"]
    assert len(msix) == 3 and all(w["connected"] for w in msix), wiring
    assert len((share / "instances-during").read_text().split()) == 1, "only the run's"
    # restore also removed the probes and instance the SIGKILLed run could not.
    assert "harness_irqbp" not in (share / "kprobes-left").read_text()
    assert (share / "instances-left").read_text().strip() == ""
    assert "removed the kprobes and trace instance" in (share / "restore.out").read_text()
    report = json.loads((share / "preflight.json").read_text())
    text = json.dumps(report)
    # Preflight inside L1 agrees with what runs there: KVM runs guest code (probed).
    assert report["accel"]["kvm_usable"] is True, text[:2000]
    assert report["iommu"]["enabled"]["value"] is True, text[:2000]
    assert report["iommu"]["remapping"]["value"] is True
    assert report["iommu"]["remapping"]["mode"] == "xapic"
    assert report["posting"]["verdict"] == "not possible"
    assert report["devices"][0]["verdict"] == "bounce only"


def test_lab_shell_gives_a_root_shell_in_the_emulated_host(tmp_path: Path) -> None:
    """`harness lab shell` on a real pseudo-terminal: type into L1's shell, read its answer."""
    import os
    import pty
    import select
    import subprocess
    import time

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "lab", "shell", "--out",
                             str(tmp_path)], stdin=follower, stdout=follower, stderr=follower,
                            cwd=REPO, start_new_session=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} from the lab shell; got:\n{seen[-2000:]!r}"
            ready, _, _ = select.select([leader], [], [], left)
            if ready:
                try:
                    seen += os.read(leader, 65536)
                except OSError:  # the other side closed
                    break

    try:
        read_until(b"harness-lab: shell", 120)
        time.sleep(1.0)  # let bash print its prompt
        os.write(leader, b"echo lab-$((6*7)) $(cat /sys/module/kvm_amd/initstate)\n")
        read_until(b"lab-42 live", 60)
        os.write(leader, b"exit\n")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)


# --- the Arm lab: GICv4 direct injection, the posted path for real ---------------------------


@pytest.mark.system(arch="arm64")
def test_arm_lab_gives_posted_userspace_and_irqfd_verdicts_from_the_evidence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["lab", "run", str(REPO / "configs" / "lab-arm-gicv4.yaml"),
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = tmp_path.iterdir()
    found = reports(run_dir)
    assert sorted(found) == ["lab-arm-intx", "lab-arm-irqfd", "lab-arm-posted",
                             "lab-arm-userspace"]
    # INTx on a host that posts MSIs: an SPI through a resample irqfd, never posted.
    (intx,) = [v for v in found["lab-arm-intx"]["vectors"] if v["device"] == "nic"
               and v["evidence"]["guest_delta"] > 0]
    assert (intx["kind"], intx["path"]) == ("intx", "irqfd-bounce"), intx
    assert intx["evidence"]["wiring"]["resample"] is True, intx
    for name, path in (("lab-arm-posted", "posted"), ("lab-arm-userspace", "userspace-bounce"),
                       ("lab-arm-irqfd", "irqfd-bounce")):
        report = found[name]
        assert report["passed"] is True, report
        assert {vm["arch"] for vm in report["vms"]} == {"arm64"}
        for vector in ("virtio1-input.0", "virtio1-output.0"):
            v = nic_vectors(report)[vector]
            assert v["path"] == path, v
            guest, host = v["evidence"]["guest_delta"], v["evidence"]["host_delta"]
            wiring = v["evidence"]["wiring"]
            assert guest >= 150, v
            if path == "posted":
                # The host's handler never ran: the MSI went to the vCPU as a vLPI.
                assert host <= 0.1 * guest and wiring["posted"] is True, v
                assert "vLPI" in wiring["detail"], v
            else:
                assert 0.5 <= host / guest <= 1.5 and wiring["posted"] is False, v
            assert wiring["connected"] is (path != "userspace-bounce"), v
    posted_dir = next(p.parent for p in run_dir.glob("lab-arm-posted-*/report.json"))
    trace = (posted_dir / "host.bypass.trace").read_text()
    assert "kvm_vgic_v4_set_forwarding" in trace and "its_map_vlpi" in trace
    irqfd_dir = next(p.parent for p in run_dir.glob("lab-arm-irqfd-*/report.json"))
    # GICv4 off: forwarding is entered but never maps a vLPI; preflight says why.
    off = (irqfd_dir / "host.bypass.trace").read_text()
    assert "kvm_vgic_v4_set_forwarding" in off and "its_map_vlpi" not in off
    assert "vgic_v4_enable" in " ".join(found["lab-arm-irqfd"]["host_notes"])
    assert (run_dir / "lab-l1-2.console.log").exists(), "case (c) boots L1 a second time"


@pytest.mark.system(arch="arm64")
def test_arm_lab_expecting_a_bounce_on_the_posted_path_fails_and_says_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (REPO / "configs" / "lab-arm-gicv4.yaml").read_text().split("\n---\n")[0]
    wrong = tmp_path / "expects-irqfd.yaml"
    wrong.write_text(text.replace("path: posted", "path: irqfd-bounce"))
    code = main(["lab", "run", str(wrong), "--out", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "[FAIL] l2/nic expects irqfd-bounce: virtio1-input.0: posted" in out
    assert "vLPI" in out  # the evidence behind the verdict


#: The matrix's label per scenario: (device, path, kind, vectors that must carry it).
MATRIX = {
    "lab-intx-irqfd": ("nic", "irqfd-bounce", "intx", 1),
    "lab-intx-userspace": ("nic", "userspace-bounce", "intx", 1),
    "lab-msi-irqfd": ("ahci", "irqfd-bounce", "msi", 1),
    "lab-msix-shared-vector": ("nic", "irqfd-bounce", "msix", 1),
    "lab-msix-multiqueue": ("disk", "irqfd-bounce", "msix", 2),
}


def test_lab_matrix_gives_every_case_its_labelled_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each case of configs/lab-matrix.yaml is built so its path is known; the verdict of
    every vector that fired must be that path, from the evidence (zero wrong verdicts)."""
    code = main(["lab", "run", str(REPO / "configs" / "lab-matrix.yaml"), "--out",
                 str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (run_dir,) = tmp_path.iterdir()
    found = reports(run_dir)
    assert sorted(found) == sorted(MATRIX)
    for name, (device, path, kind, fired) in MATRIX.items():
        report = found[name]
        assert report["passed"] is True, (name, report["expectations"])
        vectors = [v for v in report["vectors"] if v["device"] == device
                   and v["evidence"]["guest_delta"] > 0]
        assert len(vectors) == fired, (name, vectors)
        for v in vectors:
            assert (v["path"], v["kind"]) == (path, kind), (name, v)
            guest, host = v["evidence"]["guest_delta"], v["evidence"]["host_delta"]
            assert 0.5 <= host / guest <= 1.5, (name, v)
    # INTx: never a bypass producer; the KVM path is the resample irqfd, user space has none.
    for name, resample in (("lab-intx-irqfd", True), ("lab-intx-userspace", False)):
        (intx,) = [w for w in found[name]["host_wiring"] if w["kind"] == "intx"]
        assert (intx["producer"], intx["resample"]) == (False, resample), intx
    # Two queues read from two vCPUs: each queue's vector fired on its own CPU.
    multi = [v for v in found["lab-msix-multiqueue"]["vectors"] if v["device"] == "disk"
             and v["evidence"]["guest_delta"] > 0]
    assert sorted(v["evidence"]["guest_per_cpu"].index(max(v["evidence"]["guest_per_cpu"]))
                  for v in multi) == [0, 1]
    assert "intx" in out and "msi 0" in out  # the terminal table names each source
