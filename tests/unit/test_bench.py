"""``harness bench``: the replicated scenarios of the scaling table, and how it is printed.

Nothing boots here: the runs are RunResults built with the phases a run records (their names
are the runner's own, from harness.vm.BootTimes and harness.runner), so the arithmetic and
the layout are checked; ``ci/bench`` prints the measured figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bench import (
    BenchResult,
    PeakMemory,
    boot_seconds,
    format_bench,
    replicate,
    scaling_refusal,
    workload_seconds,
)
from harness.cli import BenchRequest, parse_args
from harness.config import load_scenario, load_scenario_text
from harness.config.loader import _Checker
from harness.errors import GuestError, UsageError
from harness.host.accel import KvmProbe
from harness.platform import platform_for
from harness.qemu.argv import place_devices
from harness.result import Phase, RunResult

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"


# --- replication ----------------------------------------------------------------------------


def test_one_copy_is_the_scenario_itself() -> None:
    smoke = load_scenario(SMOKE)
    assert replicate(smoke, 1) is smoke


def test_each_copy_has_its_own_name_workloads_and_expectations() -> None:
    smoke = load_scenario(SMOKE)
    four = replicate(smoke, 4)
    assert four.name == "smoke-x4"
    assert [vm.name for vm in four.vms] == ["guest0-1", "guest0-2", "guest0-3", "guest0-4"]
    assert [w.vm for w in four.workloads] == [
        f"guest0-{k}" for k in range(1, 5) for _ in smoke.workloads]
    assert [w.run for w in four.workloads] == [w.run for w in smoke.workloads] * 4
    assert [(e.vm, e.device, e.path) for e in four.expect] == [
        (f"guest0-{k}", e.device, e.path) for k in range(1, 5) for e in smoke.expect]
    # Everything else of a VM is the original's.
    assert {vm.devices for vm in four.vms} == {smoke.vms[0].devices}
    assert {(vm.cpus, vm.memory_mib, vm.accel) for vm in four.vms} == {
        (smoke.vms[0].cpus, smoke.vms[0].memory_mib, smoke.vms[0].accel)}


def test_a_replicated_scenario_passes_the_loaders_checks() -> None:
    # The same checks a file gets: unique VM names, every reference resolves, SSH per VM.
    _Checker("replicated", {}).check(replicate(load_scenario(SMOKE), 4))


def test_copies_share_no_network_state_in_the_argv() -> None:
    # Each VM's NICs get user-mode networks of their own (the same /24s, in separate slirp
    # stacks) and the SSH port is chosen per QEMU by slirp: nothing for copies to collide on.
    four = replicate(load_scenario(SMOKE), 4)
    placed = [place_devices(vm.devices, platform_for(vm.arch)) for vm in four.vms]
    assert len({tuple((p.slot, p.network) for p in devs) for devs in placed}) == 1


def test_a_scenario_that_assigns_a_host_device_is_not_replicated(tmp_path: Path) -> None:
    text = ("name: hil\nvms:\n  - name: g\n    devices:\n      - {kind: virtio-net, id: net0}\n"
            "      - {kind: vfio-pci, id: nic0, host: '0000:00:05.0'}\n")
    scenario = load_scenario_text(text, str(tmp_path / "hil.yaml"))
    assert scaling_refusal(scenario) == ("not replicated: device nic0 is a host device, which "
                                         "only one VM can own")
    assert scaling_refusal(load_scenario(SMOKE)) is None


# --- the figures ----------------------------------------------------------------------------


def _run(copies: int, boot: float, workload: float, passed: bool = True) -> RunResult:
    scenario = replicate(load_scenario(SMOKE), copies)
    # One VM: its own boot phases; several: "boot N VMs" (harness.runner.boot).
    booting = ((Phase("QEMU start", boot * 0.1), Phase("kernel to init", boot * 0.5),
                Phase("init to sshd", boot * 0.3), Phase("SSH ready", boot * 0.1))
               if copies == 1 else (Phase(f"boot {copies} VMs", boot),))
    phases = (Phase("prepare (image, accel)", 0.5), *booting, Phase("snapshot before", 0.2),
              Phase("workload", workload), Phase("verdict", 0.2), Phase("teardown", 0.1))
    result = RunResult(scenario, str(SMOKE), Path("/nonexistent"), 0.0, phases)
    if not passed:
        result = RunResult(scenario, str(SMOKE), Path("/nonexistent"), 0.0, phases,
                           error=GuestError("guest0-1", "died"))
    return result


def test_boot_and_workload_seconds_come_from_the_runners_phase_names() -> None:
    one, two = _run(1, 4.0, 2.0), _run(2, 6.0, 4.0)
    assert boot_seconds(one) == pytest.approx(4.0)
    assert boot_seconds(two) == pytest.approx(6.0)
    assert workload_seconds(two) == pytest.approx(4.0)
    assert one.total_seconds == pytest.approx(0.5 + 4.0 + 0.2 + 2.0 + 0.2 + 0.1)


def _bench() -> BenchResult:
    bench = BenchResult("smoke", bare_boots=[3.0, 3.2, 2.8],
                        runs=[_run(1, 4.0, 2.0), _run(1, 5.0, 2.2), _run(1, 4.4, 2.1)],
                        counts=(1, 2, 4))
    bench.scaled = {2: [_run(2, 6.0, 4.0), _run(2, 6.2, 4.4), _run(2, 5.8, 4.2)],
                    4: [_run(4, 12.0, 8.0), _run(4, 12.0, 8.8), _run(4, 13.0, 9.0)]}
    bench.peak_after = {1: PeakMemory(60 << 10, 300 << 10), 2: PeakMemory(70 << 10, 300 << 10),
                        4: PeakMemory(90 << 10, 310 << 10)}
    bench.memory = PeakMemory(91 << 10, 312 << 10)
    bench.probe = KvmProbe(False, "QEMU with -accel kvm -cpu host failed: no", 0.04)
    bench.load = (1.5, 2.25)
    bench.bare_cpu = [4.5, 4.8, 4.2]  # 1.5 cores busy each
    # QEMU CPU seconds: 1.2 cores busy for each run of one VM, 2 for the others
    bench.cpu = {r.run_id: r.total_seconds * (1.2 if n == 1 else 2.0)
                 for n in (1, 2, 4) for r in bench.runs_of(n)}
    return bench


def test_the_table_gives_medians_per_vm_and_the_growth() -> None:
    text = format_bench(_bench())
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("  scaling"))
    head, one, two, four = (ln.split() for ln in lines[start + 1:start + 5])
    assert head[:4] == ["VMs", "total", "s", "boot"]
    # Every run spends 1.0 s outside boot and workload (prepare, snapshot, verdict, teardown).
    # 1 VM: totals 7.0, 8.2, 7.5 -> median 7.50; boot 4.4; workload 2.1
    # (VMs, total, boot, workload, other, per VM, vs 1, QEMU CPU, cores busy, RSS)
    assert one == ["1", "7.50", "4.40", "2.10", "1.00", "7.50", "1.00x", "9.0", "1.20",
                   "60", "MiB"]
    # 2 VMs: totals 11.0, 11.6, 11.0 -> 11.00; per VM 5.50; 11.0 / 7.5 = 1.47x
    assert two == ["2", "11.00", "6.00", "4.20", "1.00", "5.50", "1.47x", "22.0", "2.00",
                   "70", "MiB"]
    # 4 VMs: totals 21.0, 21.8, 23.0 -> 21.80; per VM 5.45; 21.8 / 7.5 = 2.91x
    assert four == ["4", "21.80", "12.00", "8.80", "1.00", "5.45", "2.91x", "43.6", "2.00",
                    "90", "MiB"]
    assert "  peak memory (RSS): harness process 91 MiB; largest child 312 MiB (a QEMU)" in lines
    assert ("  KVM probe, uncached: 0.04 s (not usable: QEMU with -accel kvm -cpu host failed: "
            "no)") in lines
    bare = lines.index(next(ln for ln in lines if ln.startswith("  bare kernel boot")))
    assert lines[bare + 1].split() == ["QEMU", "CPU", "4.50", "s:", "1.50", "cores", "busy",
                                       "while", "it", "boots"]
    host = next(ln for ln in lines if ln.startswith("  host: "))
    assert "1-minute load average 1.50 at the start, 2.25 at the end" in host
    assert "FAILED" not in text


def test_a_failed_row_is_marked_and_fails_the_bench() -> None:
    bench = _bench()
    bench.scaled[4][1] = _run(4, 12.0, 8.8, passed=False)
    assert not bench.all_passed
    four = next(ln for ln in format_bench(bench).splitlines() if ln.strip().startswith("4 "))
    assert four.endswith("FAILED")


def test_without_replication_the_table_says_why() -> None:
    bench = BenchResult("hil", bare_boots=[3.0], runs=[_run(1, 4.0, 2.0)],
                        scaling_note="not replicated: device nic0 is a host device, which "
                                     "only one VM can own")
    assert "  scaling: not replicated: device nic0" in format_bench(bench)


def test_peak_memory_is_this_processes_own() -> None:
    peak = PeakMemory.now()
    assert peak.harness_kib > 1024  # a Python process with the harness imported: > 1 MiB
    assert peak.largest_child_kib >= 0


# --- the command line -----------------------------------------------------------------------


def test_vms_flag_defaults_to_1_2_4_and_is_sorted() -> None:
    request, _ = parse_args(["bench", "s.yaml"])
    assert isinstance(request, BenchRequest) and request.vms == (1, 2, 4)
    request, _ = parse_args(["bench", "s.yaml", "--vms", "4,1,8,4"])
    assert isinstance(request, BenchRequest) and request.vms == (1, 4, 8)


@pytest.mark.parametrize("value", ["0,2", "two", "", "1,17"])
def test_bad_vm_counts_are_usage_errors(value: str) -> None:
    with pytest.raises(UsageError, match=r"--vms .*: give counts from 1 to 16"):
        parse_args(["bench", "s.yaml", "--vms", value])
