"""pytest fixtures and markers over the harness library (registered by entry point).

``vm_factory`` boots scenario VMs and tears every one down at the end of the test; a test's
run folder (QEMU log, console, argv) is kept only when the test failed.  The ``system``
marker skips a test, naming what is missing, on a host without the QEMU it needs:
``@pytest.mark.system`` for this host's architecture, ``@pytest.mark.system(arch="arm64")``
for another one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from harness.config.model import VM
from harness.platform import platform_for
from harness.vm import GuestVM

_FAILED = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system(arch=None): boots real QEMU guests of the "
                            "architecture (default: the host's); needs its QEMU")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("system")
    if marker is None:
        return
    platform = platform_for(marker.kwargs.get("arch"))
    if shutil.which(platform.qemu) is None:
        pytest.skip(f"host capability missing: {platform.qemu} is not installed "
                    f"(Debian package {platform.qemu_package}; run ci/setup)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if getattr(report, "failed", False):
        item.stash[_FAILED] = True
    return report


VMFactory = Callable[[VM], GuestVM]


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMFactory]:
    """Boot VMs from ``VM`` specs; all are torn down after the test, logs kept on failure."""
    run_dir = tmp_path_factory.mktemp(f"vm-{request.node.name[:40]}")
    booted: list[GuestVM] = []

    def boot(spec: VM) -> GuestVM:
        vm = GuestVM(spec, run_dir)
        booted.append(vm)
        vm.boot()
        return vm

    try:
        yield boot
    finally:
        for vm in reversed(booted):
            vm.close()
        if request.node.stash.get(_FAILED, False):
            print(f"\nVM logs kept in {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
