"""The pytest plugin, as a user's test suite sees it: found by its entry point, booting real
guests through vm_factory, keeping VM logs only for failed tests."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.system
pytest_plugins = ["pytester"]

USER_TESTS = '''
from harness.config.model import VM, VirtioNet

SPEC = VM(name="p0", memory_mib=256, devices=(VirtioNet(kind="virtio-net", id="net0"),))


def test_boots(vm_factory):
    vm = vm_factory(SPEC)
    assert vm.run(["cat", "/proc/cmdline"], 30).stdout.count("harness.ssh_key=") == 1


def test_fails_after_boot(vm_factory):
    vm = vm_factory(SPEC)
    assert vm.run(["false"], 30).exit_status == 0
'''


def test_vm_factory_boots_and_keeps_logs_only_for_failures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1, failed=1)
    kept = [line for line in result.outlines if line.startswith("VM logs kept in ")]
    assert len(kept) == 1, "only the failed test keeps its run folder"
    assert "fails_after_boot" in kept[0]
