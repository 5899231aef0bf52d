"""The KVM probe's programs run in a real QEMU: under TCG, with the probe's own argv but
the accelerator, each must print its marker on the serial port and power the VM off (QEMU
exits 0 on its own).  That proves the hand-assembled bytes without needing KVM."""

from __future__ import annotations

import pytest

from harness.host.accel import PROBE_MARKER, probe_kvm, run_probe_program
from harness.platform import Arch, host_platform, platform_for

pytestmark = pytest.mark.system

ARCHES = [pytest.param(Arch.X86_64, id="x86_64", marks=pytest.mark.system(arch="x86_64")),
          pytest.param(Arch.ARM64, id="arm64", marks=pytest.mark.system(arch="arm64"))]


@pytest.mark.parametrize("arch", ARCHES)
def test_the_probe_program_prints_its_marker_and_powers_off_under_tcg(arch: Arch) -> None:
    platform = platform_for(arch)
    # Generous: this only proves the program; the probe's own limit is for KVM.
    run = run_probe_program(platform, None, "tcg", timeout=60.0, until_exit=True)
    assert run.output == PROBE_MARKER, (run.output, run.errors, run.argv)
    assert run.exit_status == 0, (run.exit_status, run.errors)
    assert ",accel=tcg" in run.argv[run.argv.index("-machine") + 1]
    assert run.argv[-2] == platform.kvm_probe.option and run.argv[-1].startswith("/proc/self/fd/")


def test_the_live_probe_gives_a_reason_either_way() -> None:
    """On this host, whatever KVM does: the answer and its reason agree with a run of the
    program under KVM."""
    probe = probe_kvm(host_platform(), None)
    assert probe.reason
    if probe.usable:
        assert run_probe_program(host_platform(), None, "kvm").marker_seen
    else:
        assert not probe.reason.startswith("a guest program ran")
