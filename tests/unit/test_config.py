"""Scenario files: the YAML loader, its exact error messages, and the generated JSON Schema.

Each invalid file in tests/data/configs/ has one fault; the test pins the whole one-line message
(``file:line: key.path: reason``) so that a change in wording or line numbers is a decision.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.config import (
    VM,
    Accel,
    BuiltinImage,
    CloudImage,
    DeliveryPath,
    E1000e,
    Expectation,
    KernelImage,
    Scenario,
    Timeouts,
    VfioPci,
    VirtioBlk,
    VirtioNet,
    Workload,
    load_scenario,
    load_scenario_text,
    model,
    scenario_json_schema,
)
from harness.config.model import HotplugAction
from harness.config.schema import field_metadata, scenario_json_schema_text
from harness.errors import ConfigError, UsageError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "configs"
SCHEMA_FILE = REPO / "configs" / "scenario.schema.json"
VALID = sorted(DATA.glob("valid-*.yaml")) + sorted((REPO / "configs").glob("*.yaml"))


# --- valid files ------------------------------------------------------------------------------


def test_full_scenario_builds_exactly_the_model() -> None:
    scenario = load_scenario(DATA / "valid-full.yaml")

    assert scenario == Scenario(
        name="full-example",
        description="every device and image kind the format knows",
        vms=(
            VM(
                name="host-a", arch=model.Arch.X86_64, machine="q35", accel=Accel.KVM, cpus=4,
                memory_mib=1024,
                image=BuiltinImage(kind="builtin", recipe="debian-generic"),
                devices=(
                    VirtioNet(kind="virtio-net", id="net0", addr=0x03),
                    E1000e(kind="e1000e", id="nic1", ssh=False),
                    VirtioBlk(kind="virtio-blk", id="disk0", size_mib=16),
                    VfioPci(kind="vfio-pci", id="nvme0", host="0000:00:05.0", addr=0x10,
                            no_kvm_msix=True, no_kvm_msi=False),
                ),
                append="console=ttyS0 loglevel=7",
                qemu="qemu-system-x86_64",
                extra_args=("-trace", "vfio_*", "-global", "virtio-pci.disable-legacy=on"),
            ),
            VM(
                name="host-b", accel=Accel.TCG,
                image=KernelImage(kind="kernel", kernel=str(DATA / "images" / "bzImage"),
                                  modules=str(REPO / "tests" / "data" / "images" / "modules"
                                              / "6.8.0")),
                devices=(E1000e(kind="e1000e", id="eth0", ssh=True),),
            ),
            VM(
                name="host-c",
                image=CloudImage(kind="cloud", disk="/var/lib/images/debian-12.qcow2",
                                 format="raw", user="debian"),
                devices=(VirtioNet(kind="virtio-net", id="net0"),),
            ),
        ),
        workloads=(
            Workload(vm="host-a", name="ping flood",
                     run=("ping", "-f", "-c", "1000", "10.0.2.2"), timeout_s=30.0),
            Workload(vm="host-c", run=("true",)),
        ),
        expect=(
            Expectation(vm="host-a", device="net0", path=DeliveryPath.EMULATED,
                        vectors=("*-input.*", "*-output.*"), min_delta=10),
            Expectation(vm="host-a", device="nvme0", path=DeliveryPath.USERSPACE_BOUNCE,
                        vectors=("1", "2"), min_delta=0),
        ),
        timeouts=Timeouts(boot_s=300.0, shutdown_s=5.5),
    )


def test_minimal_scenario_takes_the_model_defaults() -> None:
    scenario = load_scenario(str(DATA / "valid-minimal.yaml"))

    assert scenario == Scenario(
        name="minimal", vms=(VM(name="vm", devices=(VirtioNet(kind="virtio-net", id="net0"),)),))
    vm = scenario.vms[0]
    assert (vm.accel, vm.cpus, vm.memory_mib, vm.image) == (
        Accel.AUTO, 2, 512, BuiltinImage(kind="builtin"))
    assert scenario.timeouts == Timeouts(boot_s=120.0, shutdown_s=10.0)


def _values(value: object) -> Iterator[object]:
    yield value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _values(getattr(value, f.name))
    elif isinstance(value, tuple):
        for item in value:
            yield from _values(item)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_files_give_frozen_dataclasses_tuples_and_enums(path: Path) -> None:
    from harness.config import load_scenarios

    for scenario in load_scenarios(path):  # configs/lab-matrix.yaml holds five
        for value in _values(scenario):
            assert not isinstance(value, dict | list | set), value
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                with pytest.raises(dataclasses.FrozenInstanceError):
                    setattr(value, dataclasses.fields(value)[0].name, None)
        with pytest.raises(dataclasses.FrozenInstanceError):
            scenario.name = "changed"  # type: ignore[misc]
    assert all(isinstance(vm.accel, Accel) for vm in scenario.vms)
    assert all(isinstance(e.path, DeliveryPath) for e in scenario.expect)


def test_ints_are_accepted_as_floats_and_hex_as_ints() -> None:
    text = ("name: n\nvms:\n  - name: vm\n    devices: [{kind: virtio-net, id: n0, addr: 0x1a}]\n"
            "timeouts: {boot_s: 30, shutdown_s: 2.5}\n")
    scenario = load_scenario_text(text, "inline.yaml")

    assert scenario.vms[0].devices[0].addr == 26
    assert scenario.timeouts.boot_s == 30.0 and isinstance(scenario.timeouts.boot_s, float)


def test_boot_attempts_and_the_init_limit() -> None:
    head = "name: n\nvms:\n  - name: vm\n    devices: [{kind: virtio-net, id: n0}]\n"
    scenario = load_scenario_text(head + "timeouts: {init_s: 45, boot_attempts: 2}\n", "a.yaml")
    assert (scenario.timeouts.init_s, scenario.timeouts.boot_attempts) == (45.0, 2)
    assert load_scenario_text(head, "b.yaml").timeouts.init_s is None
    for bad, why in (("boot_attempts: 0", "must be at least 1, got 0"),
                     ("boot_attempts: 6", "must be at most 5, got 6"),
                     ("init_s: 0", "must be greater than 0, got 0")):
        with pytest.raises(ConfigError, match=why):
            load_scenario_text(head + f"timeouts: {{{bad}}}\n", "c.yaml")


def test_image_paths_are_resolved_from_the_scenario_folder(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = ("name: n\nvms:\n"
            "  - name: a\n    image: {kind: kernel, kernel: ./k/../bzImage, modules: ~/mods}\n"
            "    devices: [{kind: virtio-net, id: n0}]\n"
            "  - name: b\n    image: {kind: cloud, disk: /abs/disk.qcow2}\n"
            "    devices: [{kind: virtio-net, id: n0}]\n")
    scenario = load_scenario_text(text, str(tmp_path / "sub" / "s.yaml"))

    assert scenario.vms[0].image == KernelImage(kind="kernel",
                                                kernel=str(tmp_path / "sub" / "bzImage"),
                                                modules=str(tmp_path / "home" / "mods"))
    assert scenario.vms[1].image == CloudImage(kind="cloud", disk="/abs/disk.qcow2")


def test_relative_filename_resolves_against_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = ("name: n\nvms:\n  - name: a\n    image: {kind: cloud, disk: d.qcow2}\n"
            "    devices: [{kind: virtio-net, id: n0}]\n")

    scenario = load_scenario_text(text, "conf/s.yaml")

    assert scenario.vms[0].image == CloudImage(kind="cloud",
                                               disk=str(tmp_path / "conf" / "d.qcow2"))


# --- invalid files: the exact message ---------------------------------------------------------

# (file, expected message, whether the JSON Schema rejects it too)
INVALID: list[tuple[str, str, bool]] = [
    # keys
    ("bad-unknown-key.yaml",
     "bad-unknown-key.yaml:4: vms[0].cpu: unknown key (did you mean 'cpus'?); allowed keys: "
     "name, arch, machine, accel, cpus, memory_mib, image, devices, append, qemu, extra_args",
     True),
    ("bad-unknown-top-key.yaml",
     "bad-unknown-top-key.yaml:6: workload: unknown key (did you mean 'workloads'?); allowed "
     "keys: name, vms, description, workloads, expect, timeouts, lab", True),
    ("bad-key-of-other-kind.yaml",
     "bad-key-of-other-kind.yaml:8: vms[0].devices[0].size_mib: unknown key; allowed keys: "
     "kind, id, addr, ssh, network, hotplug", True),
    ("bad-missing-required.yaml",
     "bad-missing-required.yaml:7: vms[0].devices[1].host: missing required key", True),
    ("bad-missing-vms.yaml", "bad-missing-vms.yaml:2: vms: missing required key", True),
    ("bad-duplicate-key.yaml",
     "bad-duplicate-key.yaml:7: vms[0].cpus: duplicate key (first at line 4)", False),
    ("bad-merge-key.yaml",
     "bad-merge-key.yaml:7: vms[1].<<: YAML merge keys are not supported; write the keys out",
     False),
    # types
    ("bad-str-for-int.yaml",
     "bad-str-for-int.yaml:4: vms[0].cpus: expected an integer, got 'two'", True),
    ("bad-bool-for-int.yaml",
     "bad-bool-for-int.yaml:4: vms[0].memory_mib: expected an integer, got yes", True),
    ("bad-int-for-str.yaml",
     "bad-int-for-str.yaml:8: workloads[0].run[1]: expected a string, got 5 "
     "(quote it to use it as text)", True),
    ("bad-null-for-int.yaml",
     "bad-null-for-int.yaml:4: vms[0].cpus: expected an integer, got an empty value", True),
    ("bad-octal.yaml",
     "bad-octal.yaml:4: vms[0].memory_mib: ambiguous integer 0512 (YAML 1.1 reads it as 330); "
     "write 330 or quote the text", False),
    ("bad-infinite.yaml",
     "bad-infinite.yaml:7: timeouts.boot_s: expected a finite number, got .inf", False),
    ("bad-scalar-for-mapping.yaml",
     "bad-scalar-for-mapping.yaml:4: vms[0].image: expected a mapping, got 'builtin'", True),
    ("bad-mapping-for-list.yaml",
     "bad-mapping-for-list.yaml:3: vms: expected a list, got a mapping", True),
    ("bad-tag.yaml",
     "bad-tag.yaml:3: vms[0].name: unsupported YAML tag !!python/object/apply:os.system", False),
    # enums and kinds
    ("bad-enum.yaml",
     "bad-enum.yaml:4: vms[0].accel: unknown value 'kvmm' (did you mean 'kvm'?); "
     "allowed values: auto, kvm, tcg", True),
    ("bad-literal.yaml",
     "bad-literal.yaml:7: vms[0].image.format: unknown value 'vmdk'; allowed values: qcow2, raw",
     True),
    ("bad-device-kind.yaml",
     "bad-device-kind.yaml:7: vms[0].devices[1].kind: unknown kind 'virtio-nett' (did you mean "
     "'virtio-net'?); allowed kinds: virtio-net, e1000e, virtio-blk, vfio-pci",
     True),
    ("bad-missing-kind.yaml",
     "bad-missing-kind.yaml:6: vms[0].devices[1].kind: missing required key; allowed kinds: "
     "virtio-net, e1000e, virtio-blk, vfio-pci", True),
    # constraints
    ("bad-out-of-range.yaml", "bad-out-of-range.yaml:4: vms[0].cpus: must be at most 64, got 65",
     True),
    ("bad-exclusive-minimum.yaml",
     "bad-exclusive-minimum.yaml:9: workloads[0].timeout_s: must be greater than 0, got 0", True),
    ("bad-min-items.yaml", "bad-min-items.yaml:2: vms: must have at least 1 item, got 0", True),
    ("bad-empty-run.yaml",
     "bad-empty-run.yaml:8: workloads[0].run: must have at least 1 item, got 0", True),
    ("bad-pattern.yaml",
     r"bad-pattern.yaml:8: vms[0].devices[1].host: must match "
     r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$, got '00:05.0'", True),
    # Python's jsonschema lets "vm\n" pass ^...$ (re.search); ECMA-262 and the loader do not.
    ("bad-pattern-newline.yaml",
     "bad-pattern-newline.yaml:3: vms[0].name: must match ^[a-z][a-z0-9-]*$, got 'vm\\n'", False),
    ("bad-device-id.yaml",
     "bad-device-id.yaml:5: vms[0].devices[0].id: must match ^[A-Za-z][A-Za-z0-9._-]*$, "
     "got 'net0,romfile=/etc/shadow'", True),
    # the file as a whole
    ("bad-yaml-syntax.yaml",
     "bad-yaml-syntax.yaml:5: invalid YAML: expected <block end>, but found "
     "'<block mapping start>' (while parsing a block collection at line 3)", False),
    ("bad-unclosed-quote.yaml",
     "bad-unclosed-quote.yaml:5: invalid YAML: found unexpected end of stream "
     "(while scanning a quoted scalar at line 3)", False),
    ("bad-two-documents.yaml",
     "bad-two-documents.yaml:4: holds 2 scenarios where one was expected", False),
    ("bad-empty.yaml",
     "bad-empty.yaml:1: the file is empty; a scenario needs at least 'name' and 'vms'", False),
    ("bad-top-level-list.yaml",
     "bad-top-level-list.yaml:1: expected a mapping at the top level, got a list", True),
    # across the scenario
    ("bad-duplicate-vm.yaml",
     "bad-duplicate-vm.yaml:9: vms[2].name: duplicate VM name 'web' (first at line 3)", False),
    ("bad-duplicate-device-id.yaml",
     "bad-duplicate-device-id.yaml:7: vms[0].devices[2].id: duplicate device id 'disk0' "
     "in VM 'vm' (first at line 6)", False),
    ("bad-addr-range.yaml",
     "bad-addr-range.yaml:5: vms[0].devices[0].addr: slot 0x1f is outside 0x01..0x1e", False),
    ("bad-addr-duplicate.yaml",
     "bad-addr-duplicate.yaml:10: vms[0].devices[1].addr: slot 0x05 is already used by 'net0' "
     "(line 7)", False),
    ("bad-released-emulated.yaml",
     "bad-released-emulated.yaml:12: expect[0].released: virtio-net 'net0' is emulated: "
     "nothing of it is ever forwarded to a vCPU; released: true is for an assigned device",
     False),
    ("bad-released-no-stage.yaml",
     "bad-released-no-stage.yaml:13: expect[0].released: VM 'vm' has no workload with stage: "
     "release to take the device's vectors away", False),
    ("bad-stage.yaml",
     "bad-stage.yaml:7: workloads[0].stage: unknown value 'after'; allowed values: setup, "
     "measure, release", True),
    ("bad-network-duplicate.yaml",
     "bad-network-duplicate.yaml:10: vms[0].devices[1].network: 10.0.7.0/24 is already the "
     "network of 'net0' (line 7); each NIC of a VM needs its own", False),
    ("bad-recipe-lacks-driver.yaml",
     "bad-recipe-lacks-driver.yaml:8: vms[0].devices[1].kind: e1000e needs the guest driver "
     "e1000e, which recipe debian-cloud does not pack; leave image.recipe out to have one "
     "chosen that does", False),
    ("bad-arch.yaml",
     "bad-arch.yaml:4: vms[0].arch: unknown value 'aarch64' (did you mean 'arm64'?); allowed "
     "values: x86_64, arm64", True),
    ("bad-addr-range-arm64.yaml",
     "bad-addr-range-arm64.yaml:6: vms[0].devices[0].addr: slot 0x00 is outside 0x01..0x1f",
     False),
    ("bad-two-ssh.yaml",
     "bad-two-ssh.yaml:7: vms[0].devices[1].ssh: 'net0' and 'net1' both forward SSH; set "
     "ssh: false on all NICs but one (virtio-net has ssh: true by default)", False),
    ("bad-no-ssh.yaml",
     "bad-no-ssh.yaml:8: vms[0].devices: VM 'vm' has no NIC with ssh: true; the harness reaches "
     "every guest over SSH, so add one (e.g. kind: virtio-net)", False),
    ("bad-no-devices.yaml",
     "bad-no-devices.yaml:3: vms[0].devices: VM 'vm' has no NIC with ssh: true; the harness "
     "reaches every guest over SSH, so add one (e.g. kind: virtio-net)", False),
    ("bad-workload-vm.yaml",
     "bad-workload-vm.yaml:7: workloads[0].vm: no VM named 'wbe' (did you mean 'web'?); "
     "VMs: web", False),
    ("bad-expect-vm.yaml", "bad-expect-vm.yaml:7: expect[0].vm: no VM named 'db'; VMs: web",
     False),
    ("bad-expect-device.yaml",
     "bad-expect-device.yaml:9: expect[0].device: VM 'web' has no device 'nic0'; "
     "its devices: net0, disk0", False),
    ("bad-expect-path.yaml",
     "bad-expect-path.yaml:9: expect[0].path: virtio-net 'net0' is emulated by QEMU, so its "
     "interrupts can only take the path 'emulated'", False),
    ("bad-expect-not-delivered.yaml",
     "bad-expect-not-delivered.yaml:10: expect[0].path: not-delivered is a failure, never an "
     "expectation; expect the path the interrupts should take", False),
    ("bad-vector.yaml",
     "bad-vector.yaml:11: expect[0].vectors[1]: MSI-X entry numbers are 0..2047, got '4096'",
     False),
    ("bad-vector-blank.yaml",
     "bad-vector-blank.yaml:10: expect[0].vectors[1]: expected an MSI-X entry number (\"1\") "
     "or a shell pattern for guest IRQ names (\"*-input.*\"), got ' '", False),
    ("bad-empty-path.yaml", "bad-empty-path.yaml:6: vms[0].image.disk: must be a path, got ''",
     False),
]


def test_every_invalid_file_has_a_case() -> None:
    assert sorted(p.name for p in DATA.glob("bad-*.yaml")) == sorted(c[0] for c in INVALID)


@pytest.mark.parametrize(("name", "message", "schema_rejects"), INVALID,
                         ids=[c[0] for c in INVALID])
def test_invalid_file_gives_one_exact_line(name: str, message: str, schema_rejects: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)  # so the message names the file as given: "bad-x.yaml:4: ..."

    with pytest.raises(ConfigError) as info:
        load_scenario(name)

    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2
    assert info.value.file == name
    assert isinstance(info.value.line, int)


_HOTPLUG = ("name: n\nvms:\n  - name: vm\n    devices:\n"
            "      - {kind: virtio-net, id: n0}\n      - {kind: virtio-blk, id: d, hotplug: true}\n"
            "workloads:\n")


def test_a_hotplug_step_loads() -> None:
    scenario = load_scenario_text(
        _HOTPLUG + "  - {vm: vm, hotplug: {device: d, action: unplug}, stage: release}\n"
        "  - {vm: vm, hotplug: {device: d, pause_s: 0.5}}\n", "s.yaml")
    unplug, replug = scenario.workloads
    assert unplug.run == () and unplug.hotplug is not None
    assert (unplug.hotplug.device, unplug.hotplug.action) == ("d", HotplugAction.UNPLUG)
    assert replug.hotplug is not None and replug.hotplug.action is HotplugAction.REPLUG
    assert replug.hotplug.pause_s == 0.5
    assert scenario.vms[0].devices[1].hotplug and not scenario.vms[0].devices[0].hotplug


@pytest.mark.parametrize(("text", "message"), [
    ("name: n\nvms:\n  - name: vm\n    cpus: true\n",
     "s.yaml:4: vms[0].cpus: expected an integer, got true"),
    ("name: n\nvms:\n  - name: vm\n    cpus: 2.5\n",
     "s.yaml:4: vms[0].cpus: expected an integer, got 2.5"),
    ("name: n\nvms:\n  - name: vm\n    cpus: !!int abc\n",
     "s.yaml:4: vms[0].cpus: expected an integer, got abc"),
    ("name: n\nvms:\n  - name: vm\n    machine: [q35]\n",
     "s.yaml:4: vms[0].machine: expected a string, got a list"),
    ("name: n\nvms:\n  - name: vm\n    append: on\n",
     "s.yaml:4: vms[0].append: expected a string, got on (quote it to use it as text)"),
    ("name: n\nvms:\n  - name: vm\n    devices: [{kind: e1000e, id: e, ssh: 1}]\n",
     "s.yaml:4: vms[0].devices[0].ssh: expected a boolean (true or false), got 1"),
    ("name: n\nvms:\n  - name: vm\n    devices: [{kind: virtio-blk, id: e, size_mib: 0x10001}]\n",
     "s.yaml:4: vms[0].devices[0].size_mib: must be at most 65536, got 0x10001"),
    ("name: n\nvms:\n  - name: vm\n    devices: [{kind: 5, id: e}]\n",
     "s.yaml:4: vms[0].devices[0].kind: expected a string, got 5 (quote it to use it as text)"),
    ("name: n\nvms:\n  - name: vm\n    accel: 1\n",
     "s.yaml:4: vms[0].accel: unknown value 1; allowed values: auto, kvm, tcg"),
    ("name: n\nvms:\n  - name: vm\n    1: x\n", "s.yaml:4: vms[0]: keys must be strings, got 1"),
    ("name: n\nvms: &v [*v]\n", "s.yaml:2: vms[0]: expected a mapping, got a list"),
    ("name: n\nvms: !!set {a}\n", "s.yaml:2: vms: unsupported YAML tag !!set"),
    ("name: n\nvms:\n  - name: vm\n    qemu: \x07\n",
     "s.yaml:4: invalid YAML: special characters are not allowed (U+0007)"),
    ("---\n", "s.yaml:1: the file is empty; a scenario needs at least 'name' and 'vms'"),
    ("~\n", "s.yaml:1: expected a mapping at the top level, got null"),
    # not echoed: the file may be anything (a key, a password file), not a scenario
    ("just text\n", "s.yaml:1: expected a mapping at the top level, got text"),
    # hotplug steps: one of run and hotplug; a device behind a root port; never the SSH NIC
    (_HOTPLUG + "  - {vm: vm, run: [\"true\"], hotplug: {device: d}}\n",
     "s.yaml:8: workloads[0]: a workload has run (a command) or hotplug (a device step), "
     "exactly one of them"),
    (_HOTPLUG + "  - {vm: vm}\n",
     "s.yaml:8: workloads[0]: a workload has run (a command) or hotplug (a device step), "
     "exactly one of them"),
    (_HOTPLUG + "  - {vm: vm, hotplug: {device: n0}}\n",
     "s.yaml:8: workloads[0].hotplug.device: virtio-net 'n0' sits on the root bus, which "
     "cannot hot-plug: give it hotplug: true (a root port of its own)"),
    (_HOTPLUG.replace("id: n0}", "id: n0, hotplug: true}")
     + "  - {vm: vm, hotplug: {device: n0}}\n",
     "s.yaml:8: workloads[0].hotplug.device: 'n0' is the NIC the harness reaches the guest "
     "through (ssh: true): it cannot be unplugged"),
    (_HOTPLUG + "  - {vm: vm, hotplug: {device: dd}}\n",
     "s.yaml:8: workloads[0].hotplug.device: VM 'vm' has no device 'dd' (did you mean 'd'?); "
     "its devices: n0, d"),
    (_HOTPLUG + "  - {vm: vm, hotplug: {device: d, action: remove}}\n",
     "s.yaml:8: workloads[0].hotplug.action: unknown value 'remove'; allowed values: unplug, "
     "plug, replug"),
])
def test_inline_mistakes(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario_text(text, "s.yaml")

    assert str(info.value) == message


def test_yaml_tags_never_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\nvms: []\n"

    with pytest.raises(ConfigError, match="unsupported YAML tag"):
        load_scenario_text(text, "s.yaml")
    assert not marker.exists()


def test_yaml_errors_keep_their_cause() -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario_text("a: b: c\n", "s.yaml")

    assert str(info.value) == "s.yaml:1: invalid YAML: mapping values are not allowed here"
    assert isinstance(info.value.__cause__, yaml.MarkedYAMLError)


def test_missing_file_names_the_path_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError) as info:
        load_scenario(path)

    assert str(info.value) == f"{path}: cannot read: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory_is_not_a_scenario(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_scenario(tmp_path)

    assert str(info.value) == f"{tmp_path}: is a directory, not a scenario file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("name: n\n")
    path.chmod(0)

    with pytest.raises(ConfigError) as info:
        load_scenario(path)

    assert str(info.value) == f"{path}: cannot read: Permission denied"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")

    with pytest.raises(ConfigError) as info:
        load_scenario(path)

    assert str(info.value) == f"{path}:1: not UTF-8 text (invalid continuation byte at byte 9)"


# --- the JSON Schema ------------------------------------------------------------------------


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == scenario_json_schema_text(), (
        "configs/scenario.schema.json is stale; regenerate it with: "
        ".venv/bin/harness schema > configs/scenario.schema.json")


def test_schema_shape() -> None:
    schema = scenario_json_schema()
    defs = schema["$defs"]

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$ref"] == "#/$defs/Scenario"
    vm = defs["VM"]
    assert vm["additionalProperties"] is False
    assert vm["required"] == ["name"]
    assert vm["properties"]["cpus"] == {"type": "integer", "description": "vCPUs",
                                        "minimum": 1, "maximum": 64, "default": 2}
    assert vm["properties"]["devices"]["items"]["oneOf"] == [
        {"$ref": f"#/$defs/{name}"}
        for name in ("VirtioNet", "E1000e", "VirtioBlk", "VfioPci")]
    assert vm["properties"]["image"]["default"] == {"kind": "builtin", "recipe": None}
    assert vm["properties"]["arch"]["anyOf"][0] == {"$ref": "#/$defs/Arch"}
    assert defs["Arch"]["enum"] == ["x86_64", "arm64"]
    assert defs["VirtioNet"]["properties"]["kind"] == {"const": "virtio-net"}
    assert defs["VirtioNet"]["properties"]["addr"]["type"] == ["integer", "null"]
    assert defs["Accel"]["enum"] == ["auto", "kvm", "tcg"]
    assert defs["CloudImage"]["properties"]["format"]["enum"] == ["qcow2", "raw"]
    assert defs["Workload"]["properties"]["timeout_s"]["exclusiveMinimum"] == 0
    assert defs["Scenario"]["properties"]["vms"]["minItems"] == 1


def _model_fields() -> Iterator[tuple[type, dataclasses.Field[Any]]]:
    for value in vars(model).values():
        if isinstance(value, type) and dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                yield value, f


def test_every_model_field_is_documented_except_kind() -> None:
    undocumented = [f"{cls.__name__}.{f.name}" for cls, f in _model_fields()
                    if f.name != "kind" and "doc" not in field_metadata(f)]
    assert undocumented == []


def test_unknown_metadata_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        x: int = dataclasses.field(metadata={"doc": "x", "maxProperties": 3})

    with pytest.raises(TypeError, match="maxProperties"):
        field_metadata(dataclasses.fields(Odd)[0])


def _jsonschema_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema not installed")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_files_pass_the_schema(path: Path) -> None:
    validator = _jsonschema_validator()

    for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        validator.validate(document)


@pytest.mark.parametrize("name", [c[0] for c in INVALID if c[2]])
def test_schema_rejects_what_the_loader_rejects_by_shape(name: str) -> None:
    validator = _jsonschema_validator()

    assert not validator.is_valid(yaml.safe_load((DATA / name).read_text(encoding="utf-8")))


def test_schema_enums_match_the_model() -> None:
    defs = scenario_json_schema()["$defs"]
    for cls in (Accel, DeliveryPath):
        assert issubclass(cls, enum.StrEnum)
        assert defs[cls.__name__]["enum"] == [m.value for m in cls]


def test_a_file_of_several_scenarios_loads_them_in_order() -> None:
    from harness.config import load_scenarios_text

    doc = "name: {0}\nvms:\n  - name: g\n    devices: [{{kind: virtio-net, id: net0}}]\n"
    scenarios = load_scenarios_text(doc.format("one") + "---\n" + doc.format("two"), "m.yaml")
    assert [s.name for s in scenarios] == ["one", "two"]


def test_a_scenario_name_twice_in_one_file_is_refused() -> None:
    from harness.config import load_scenarios_text

    doc = "name: same\nvms:\n  - name: g\n    devices: [{kind: virtio-net, id: net0}]\n"
    with pytest.raises(ConfigError, match=r"^m.yaml:6: name: scenario 'same' appears twice"):
        load_scenarios_text(doc + "---\n" + doc, "m.yaml")


def test_an_error_in_the_second_scenario_names_its_line() -> None:
    from harness.config import load_scenarios_text

    doc = ("name: {0}\nvms:\n  - name: g\n    cpus: {1}\n"
           "    devices: [{{kind: virtio-net, id: n}}]\n")  # 5 lines; the second starts at 7
    with pytest.raises(ConfigError, match=r"^m.yaml:10: vms\[0\].cpus: expected an integer"):
        load_scenarios_text(doc.format("a", 1) + "---\n" + doc.format("b", "x"), "m.yaml")


# --- trust: what a scenario may ask of the host --------------------------------------------------


QEMU_SCENARIO = ("name: n\nvms:\n  - name: a\n    arch: x86_64\n    qemu: {qemu}\n"
                 "    devices: [{{kind: virtio-net, id: n0}}]\n")


def test_a_qemu_path_is_taken_from_the_scenario_folder(tmp_path: Path) -> None:
    scenario = load_scenario_text(QEMU_SCENARIO.format(qemu="../bin/qemu-system-x86_64"),
                                  str(tmp_path / "conf" / "s.yaml"))

    assert scenario.vms[0].qemu == str(tmp_path / "bin" / "qemu-system-x86_64")


@pytest.mark.parametrize("qemu", ["qemu-system-x86_64", "qemu-system-x86_64-debug",
                                  "/opt/qemu-9.2/bin/qemu-system-x86_64"])
def test_a_qemu_named_as_the_architectures_is_accepted(qemu: str) -> None:
    scenario = load_scenario_text(QEMU_SCENARIO.format(qemu=qemu), "/s/s.yaml")

    assert scenario.vms[0].qemu == qemu  # a name stays a name, looked up on PATH


def test_a_shared_host_refuses_a_qemu_and_extra_args(monkeypatch: pytest.MonkeyPatch) -> None:
    text = QEMU_SCENARIO.format(qemu="qemu-system-x86_64")
    message = ("s.yaml:5: vms[0].qemu: refused on a shared host (HARNESS_SHARED_HOST=1): a "
               "scenario may not choose the binary the harness runs as root")

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_scenario_text(text, "s.yaml", shared_host=True)
    monkeypatch.setenv("HARNESS_SHARED_HOST", "1")  # read when the caller does not say
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_scenario_text(text, "s.yaml")
    assert load_scenario_text(text, "s.yaml", shared_host=False).vms[0].qemu == (
        "qemu-system-x86_64")


def test_a_bad_shared_host_setting_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_SHARED_HOST", "true")

    with pytest.raises(UsageError, match="HARNESS_SHARED_HOST must be 1"):
        load_scenario_text(QEMU_SCENARIO.format(qemu="qemu-system-x86_64"), "s.yaml")


def test_text_over_the_size_limit_is_refused_before_parsing() -> None:
    from harness.config.loader import MAX_FILE_BYTES

    with pytest.raises(ConfigError) as info:
        load_scenario_text("#" * (MAX_FILE_BYTES + 1), "s.yaml")

    assert str(info.value) == "s.yaml: is larger than 256 KiB, the most a scenario file may be"
