"""Read a scenario YAML file into the frozen dataclasses of :mod:`harness.config.model`.

Two passes, both reporting ``file:line: key.path: reason``: a typed walk over the YAML node
tree (composed with the safe loader, never constructed into Python objects wholesale), then
checks across the built scenario (unique names, references, one SSH NIC per VM).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from harness.config import model
from harness.config.schema import (
    dataclass_union,
    field_metadata,
    field_types,
    is_required,
    kind_of,
    optional_inner,
)
from harness.errors import ConfigError, ImageError
from harness.images.builder import Recipe, choose_recipe
from harness.platform import platform_for

__all__ = ["load_scenario", "load_scenario_text"]

_T = TypeVar("_T")

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = _TAG + "map", _TAG + "seq", _TAG + "merge"
# Tags the safe resolver gives plain scalars; an explicit tag outside these is refused.
_KNOWN_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL, _TAG + "timestamp", _MAP, _SEQ})

# YAML 1.1 reads 010 as 8 and 1:30 as 90; nobody writing a scenario means either.
_SURPRISING_INT = re.compile(r"[-+]?0[0-7_]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+")

_MSIX_ENTRIES = range(2048)


def load_scenario(path: str | os.PathLike[str]) -> model.Scenario:
    """Read and check a scenario file; raises :class:`ConfigError` with file:line on any fault."""
    filename = os.fspath(path)
    return load_scenario_text(_read(filename), filename)


def load_scenarios(path: str | os.PathLike[str]) -> tuple[model.Scenario, ...]:
    """Read a file of one or more scenarios (YAML documents separated by ``---``), run in
    order: a matrix such as the same device over two delivery paths."""
    filename = os.fspath(path)
    return load_scenarios_text(_read(filename), filename)


def _read(filename: str) -> str:
    try:
        with open(filename, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError(filename, None, "", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(filename, None, "",
                          f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return text


def load_scenario_text(text: str, filename: str) -> model.Scenario:
    """Check a scenario given as text; ``filename`` names it in errors and is the folder that
    relative image paths start from."""
    documents = _compose_all(text, filename)
    if len(documents) > 1:
        raise ConfigError(filename, _line(documents[1]), "",
                          f"holds {len(documents)} scenarios where one was expected")
    return _build_scenario(documents[0], filename)


def load_scenarios_text(text: str, filename: str) -> tuple[model.Scenario, ...]:
    scenarios: list[model.Scenario] = []
    for root in _compose_all(text, filename):
        scenario = _build_scenario(root, filename)
        if any(s.name == scenario.name for s in scenarios):
            raise ConfigError(filename, _line(root), "name",
                              f"scenario {scenario.name!r} appears twice in the file")
        scenarios.append(scenario)
    return tuple(scenarios)


def _build_scenario(root: yaml.Node, filename: str) -> model.Scenario:
    walker = _Walker(filename)
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(filename, _line(root), "",
                          f"expected a mapping at the top level, got {_describe(root)}")
    scenario = walker.build_dataclass(model.Scenario, root, "")
    checker = _Checker(filename, walker.lines)
    checker.check(scenario)
    return _resolve_paths(scenario, os.path.dirname(os.path.abspath(filename)), checker)


# --- YAML -> nodes -----------------------------------------------------------------------------


def _compose_all(text: str, filename: str) -> list[yaml.Node]:
    """Every YAML document of the text as a node tree; at least one, none of them empty."""
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        documents = [_compose(text, filename)]  # _compose words the error
    if not documents:
        return [_compose(text, filename)]
    for root in documents:
        _check_not_empty(root, filename)
    return documents


def _check_not_empty(root: yaml.Node | None, filename: str) -> None:
    if root is None or (root.tag == _NULL and not root.value):  # nothing, or just "---"
        raise ConfigError(filename, 1, "",
                          "the file is empty; a scenario needs at least 'name' and 'vms'")


def _compose(text: str, filename: str) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = f"invalid YAML: {exc.problem or exc.context}"
        if exc.problem and exc.context:
            where = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            reason += f" ({exc.context}{where})"
        raise ConfigError(filename, mark.line + 1 if mark else None, "", reason) from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(filename, line, "", f"invalid YAML: {exc.reason}"
                          f" (U+{exc.character:04X})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(filename, None, "", f"invalid YAML: {exc}") from exc
    if root is None or (root.tag == _NULL and not root.value):  # nothing, or just "---"
        raise ConfigError(filename, 1, "", "the file is empty; a scenario needs at least "
                                           "'name' and 'vms'")
    return root


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: yaml.Node) -> str:
    """A node as an error message shows what was found: 'two', 5, true, a list."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _STR:
        return repr(node.value)
    if node.tag == _NULL:
        return "null" if node.value else "an empty value"
    return str(node.value)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- nodes -> dataclasses ----------------------------------------------------------------------


class _Walker:
    """Builds model values from nodes by their annotated types, recording each path's line."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[str, int] = {}
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node, path: str, reason: str) -> ConfigError:
        return ConfigError(self.filename, _line(node), path, reason)

    def build(self, tp: Any, node: yaml.Node, path: str) -> Any:
        self.lines[path] = _line(node)
        if node.tag not in _KNOWN_TAGS:
            tag = node.tag.replace(_TAG, "!!", 1) if node.tag.startswith(_TAG) else node.tag
            raise self.error(node, path, f"unsupported YAML tag {tag}")
        inner = optional_inner(tp)
        if inner is not None:
            return None if node.tag == _NULL else self.build(inner, node, path)
        members = dataclass_union(tp)
        if members is not None:
            return self.build_union(members, node, path)
        if get_origin(tp) is tuple:
            return self.build_tuple(get_args(tp)[0], node, path)
        if get_origin(tp) is Literal:
            return self.build_choice([str(v) for v in get_args(tp)], node, path)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, node, path)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return tp(self.build_choice([str(m.value) for m in tp], node, path))
        if tp is bool:
            return self.build_scalar(node, path, {_BOOL}, "a boolean (true or false)")
        if tp is int:
            return self.build_int(node, path)
        if tp is float:
            return self.build_float(node, path)
        if tp is str:
            return self.build_str(node, path)
        raise TypeError(f"unsupported type in the scenario model: {tp!r}")

    def build_scalar(self, node: yaml.Node, path: str, tags: set[str], expected: str) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in tags:
            raise self.error(node, path, f"expected {expected}, got {_describe(node)}")
        try:
            return self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as exc:  # e.g. "!!int abc"
            raise self.error(node, path, f"expected {expected}, got {_describe(node)}") from exc

    def build_str(self, node: yaml.Node, path: str) -> str:
        if isinstance(node, yaml.ScalarNode) and node.tag not in (_STR, _NULL):
            raise self.error(node, path, f"expected a string, got {node.value} "
                                         "(quote it to use it as text)")
        value: str = self.build_scalar(node, path, {_STR}, "a string")
        return value

    def build_int(self, node: yaml.Node, path: str) -> int:
        value: int = self.build_scalar(node, path, {_INT}, "an integer")
        if _SURPRISING_INT.fullmatch(node.value):
            raise self.error(node, path, f"ambiguous integer {node.value} (YAML 1.1 reads it "
                                         f"as {value}); write {value} or quote the text")
        return value

    def build_float(self, node: yaml.Node, path: str) -> float:
        value = float(self.build_scalar(node, path, {_INT, _FLOAT}, "a number"))
        if not math.isfinite(value):
            raise self.error(node, path, f"expected a finite number, got {node.value}")
        return value

    def build_choice(self, choices: Sequence[str], node: yaml.Node, path: str) -> str:
        found = node.value if isinstance(node, yaml.ScalarNode) else None
        if node.tag != _STR or found not in choices:
            hint = _did_you_mean(found, choices) if node.tag == _STR and found else ""
            raise self.error(node, path, f"unknown value {_describe(node)}{hint}; "
                                         f"allowed values: {', '.join(choices)}")
        return str(found)

    def build_tuple(self, item_type: Any, node: yaml.Node, path: str) -> tuple[Any, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, path, f"expected a list, got {_describe(node)}")
        return tuple(self.build(item_type, item, f"{path}[{i}]")
                     for i, item in enumerate(node.value))

    def mapping_items(self, node: yaml.Node, path: str
                      ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key -> (key node, value node), refusing non-string, merge and duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, path, f"expected a mapping, got {_describe(node)}")
        items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                raise self.error(key_node, _join(path, "<<"),
                                 "YAML merge keys are not supported; write the keys out")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR:
                raise self.error(key_node, path,
                                 f"keys must be strings, got {_describe(key_node)}")
            key = key_node.value
            if key in items:
                first = _line(items[key][0])
                raise self.error(key_node, _join(path, key),
                                 f"duplicate key (first at line {first})")
            items[key] = (key_node, value_node)
        return items

    def build_union(self, members: Sequence[type], node: yaml.Node, path: str) -> Any:
        by_kind = {kind_of(m): m for m in members}
        allowed = ", ".join(by_kind)
        items = self.mapping_items(node, path)
        if "kind" not in items:
            raise self.error(node, _join(path, "kind"),
                             f"missing required key; allowed kinds: {allowed}")
        kind_node = items["kind"][1]
        kind = self.build_str(kind_node, _join(path, "kind"))
        if kind not in by_kind:
            raise self.error(kind_node, _join(path, "kind"),
                             f"unknown kind {kind!r}{_did_you_mean(kind, by_kind)}; "
                             f"allowed kinds: {allowed}")
        return self.build_dataclass(by_kind[kind], node, path, items)

    def build_dataclass(self, cls: type[_T], node: yaml.Node, path: str,
                        items: dict[str, tuple[yaml.Node, yaml.Node]] | None = None) -> _T:
        if items is None:
            items = self.mapping_items(node, path)
        self.lines[path] = _line(node)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key, (key_node, _) in items.items():
            if key not in fields:
                raise self.error(key_node, _join(path, key),
                                 f"unknown key{_did_you_mean(key, fields)}; "
                                 f"allowed keys: {', '.join(fields)}")
        for name, f in fields.items():
            if name not in items and is_required(f):
                raise self.error(node, _join(path, name), "missing required key")
        types = field_types(cls)
        values: dict[str, Any] = {}
        for key, (_, value_node) in items.items():
            child = _join(path, key)
            values[key] = self.build(types[key], value_node, child)
            self.check_constraints(fields[key], values[key], value_node, child)
        return cls(**values)

    def check_constraints(self, f: dataclasses.Field[Any], value: Any, node: yaml.Node,
                          path: str) -> None:
        meta = field_metadata(f)
        if isinstance(value, int | float) and not isinstance(value, bool):
            got = node.value  # as written: 0x41 stays 0x41, 30 does not become 30.0
            if "minimum" in meta and not value >= meta["minimum"]:
                raise self.error(node, path, f"must be at least {meta['minimum']}, got {got}")
            if "maximum" in meta and not value <= meta["maximum"]:
                raise self.error(node, path, f"must be at most {meta['maximum']}, got {got}")
            if "exclusiveMinimum" in meta and not value > meta["exclusiveMinimum"]:
                raise self.error(node, path, f"must be greater than {meta['exclusiveMinimum']}, "
                                             f"got {got}")
        if isinstance(value, str) and "pattern" in meta and not _matches(meta["pattern"], value):
            raise self.error(node, path, f"must match {meta['pattern']}, got {value!r}")
        if isinstance(value, tuple) and "minItems" in meta and len(value) < meta["minItems"]:
            raise self.error(node, path, f"must have at least {meta['minItems']} "
                                         f"item{'s' if meta['minItems'] != 1 else ''}, "
                                         f"got {len(value)}")


def _matches(pattern: str, value: str) -> bool:
    """JSON Schema's pattern test: a search, where ``$`` ends the text (in Python it also
    matches before a final newline, so "web\\n" would pass ``^[a-z]+$``)."""
    found = re.search(pattern, value)
    return found is not None and (not pattern.endswith("$") or found.end() == len(value))


# --- checks across the scenario -----------------------------------------------------------------


class _Checker:
    """Checks that need more than one value: uniqueness, references, SSH reachability."""

    def __init__(self, filename: str, lines: dict[str, int]) -> None:
        self.filename = filename
        self.lines = lines

    def line(self, path: str) -> int:
        """The line of a path, or of its nearest ancestor present in the file (for defaults)."""
        while path not in self.lines and path:
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path)
        return self.lines.get(path, 1)

    def error(self, path: str, reason: str) -> ConfigError:
        return ConfigError(self.filename, self.line(path), path, reason)

    def check(self, scenario: model.Scenario) -> None:
        first_vm: dict[str, int] = {}
        for i, vm in enumerate(scenario.vms):
            path = f"vms[{i}]"
            if vm.name in first_vm:
                raise self.error(f"{path}.name", f"duplicate VM name {vm.name!r} (first at line "
                                                 f"{self.line(f'vms[{first_vm[vm.name]}].name')})")
            first_vm[vm.name] = i
            self.check_devices(vm, path)
            self.check_image(vm, path)
        vms = {vm.name: vm for vm in scenario.vms}
        for i, workload in enumerate(scenario.workloads):
            self.vm_named(vms, workload.vm, f"workloads[{i}].vm")
        for i, expectation in enumerate(scenario.expect):
            self.check_expectation(vms, expectation, f"expect[{i}]", scenario.workloads)

    def check_devices(self, vm: model.VM, path: str) -> None:
        ids: dict[str, int] = {}
        slots: dict[int, int] = {}
        ssh_nics: list[int] = []
        networks: dict[str, int] = {}
        for j, device in enumerate(vm.devices):
            dev = f"{path}.devices[{j}]"
            if device.id in ids:
                first = self.line(f"{path}.devices[{ids[device.id]}].id")
                raise self.error(f"{dev}.id", f"duplicate device id {device.id!r} in VM "
                                              f"{vm.name!r} (first at line {first})")
            ids[device.id] = j
            slots_ok = platform_for(vm.arch).slots
            if device.addr is not None:
                if device.addr not in slots_ok:
                    raise self.error(f"{dev}.addr", f"slot {device.addr:#04x} is outside "
                                                    f"{slots_ok.start:#04x}.."
                                                    f"{slots_ok.stop - 1:#04x}")
                if device.addr in slots:
                    other = vm.devices[slots[device.addr]]
                    raise self.error(f"{dev}.addr", f"slot {device.addr:#04x} is already used by "
                                                    f"{other.id!r} (line "
                                                    f"{self.line(f'{path}.devices[{slots[device.addr]}].addr')})")
                slots[device.addr] = j
            if device.ssh_nic():
                ssh_nics.append(j)
            network = getattr(device, "network", None)
            if network is not None:
                if network in networks:
                    first = self.line(f"{path}.devices[{networks[network]}].network")
                    raise self.error(f"{dev}.network", f"{network} is already the network of "
                                     f"{vm.devices[networks[network]].id!r} (line {first}); "
                                     "each NIC of a VM needs its own")
                networks[network] = j
        if len(ssh_nics) > 1:
            one, two = (vm.devices[j] for j in ssh_nics[:2])
            raise self.error(f"{path}.devices[{ssh_nics[1]}].ssh",
                             f"{one.id!r} and {two.id!r} both forward SSH; set ssh: false on "
                             "all NICs but one (virtio-net has ssh: true by default)")
        if not ssh_nics:
            raise self.error(f"{path}.devices",
                             f"VM {vm.name!r} has no NIC with ssh: true; the harness reaches "
                             f"every guest over SSH, so add one (e.g. kind: virtio-net)")

    def check_image(self, vm: model.VM, path: str) -> None:
        """The image can boot on the VM's architecture and has its devices' drivers."""
        platform = platform_for(vm.arch)
        image = vm.image
        if isinstance(image, model.CloudImage):
            if not platform.disk_boot:
                raise self.error(f"{path}.image.kind", f"cloud images need firmware to boot "
                                 f"from disk, which the harness does not set up for "
                                 f"{platform.arch} guests; use kind: builtin or kernel")
            return
        wanted = tuple(dict.fromkeys(m for d in vm.devices for m in d.guest_modules))
        explicit = image.recipe if isinstance(image, model.BuiltinImage) else None
        try:
            recipe = Recipe.load(explicit) if explicit else choose_recipe(platform, wanted)
        except ImageError as exc:
            key = f"{path}.image.recipe" if explicit else f"{path}.devices"
            raise self.error(key, str(exc)) from exc
        if isinstance(image, model.KernelImage):
            return  # a user's kernel: its own modules tree says what it has, at run time
        lacking = [m for m in wanted if not recipe.has_modules((m,))]
        if lacking:
            j, device = next((j, d) for j, d in enumerate(vm.devices)
                             if set(d.guest_modules) & set(lacking))
            raise self.error(f"{path}.devices[{j}].kind",
                             f"{device.kind} needs the guest driver {', '.join(lacking)}, "
                             f"which recipe {recipe.name} does not pack; leave image.recipe "
                             f"out to have one chosen that does")

    def vm_named(self, vms: dict[str, model.VM], name: str, path: str) -> model.VM:
        if name not in vms:
            raise self.error(path, f"no VM named {name!r}{_did_you_mean(name, vms)}; "
                                   f"VMs: {', '.join(vms)}")
        return vms[name]

    def check_expectation(self, vms: dict[str, model.VM], expectation: model.Expectation,
                          path: str, workloads: tuple[model.Workload, ...]) -> None:
        vm = self.vm_named(vms, expectation.vm, f"{path}.vm")
        devices = {device.id: device for device in vm.devices}
        if expectation.device not in devices:
            raise self.error(f"{path}.device",
                             f"VM {vm.name!r} has no device {expectation.device!r}"
                             f"{_did_you_mean(expectation.device, devices)}; "
                             f"its devices: {', '.join(devices)}")
        device = devices[expectation.device]
        self.check_path(device, expectation.path, f"{path}.path")
        if expectation.released:
            if device.assigned_host is None:
                raise self.error(f"{path}.released", f"{device.kind} {device.id!r} is emulated: "
                                 "nothing of it is ever forwarded to a vCPU; released: true "
                                 "is for an assigned device")
            if not any(w.vm == vm.name and w.stage is model.Stage.RELEASE
                       for w in workloads):
                raise self.error(f"{path}.released", f"VM {vm.name!r} has no workload with "
                                 "stage: release to take the device's vectors away")
        for k, vector in enumerate(expectation.vectors):
            self.check_vector(vector, f"{path}.vectors[{k}]")

    def check_path(self, device: model.Device, path_kind: model.DeliveryPath, path: str) -> None:
        # The verdict sorts emulated devices' vectors as emulated and never passes
        # not-delivered; an expectation that can never hold is a config error, found early.
        if path_kind is model.DeliveryPath.NOT_DELIVERED:
            raise self.error(path, "not-delivered is a failure, never an expectation; "
                                   "expect the path the interrupts should take")
        emulated = device.emulated
        if emulated and path_kind is not model.DeliveryPath.EMULATED:
            raise self.error(path, f"{device.kind} {device.id!r} is emulated by QEMU, so its "
                                   f"interrupts can only take the path 'emulated'")
        if not emulated and path_kind is model.DeliveryPath.EMULATED:
            raise self.error(path, f"{device.kind} {device.id!r} is a host device; expect "
                                   "posted, irqfd-bounce or userspace-bounce")

    def check_vector(self, vector: str, path: str) -> None:
        entry = model.entry_number(vector)
        if entry is not None:
            if entry not in _MSIX_ENTRIES:
                raise self.error(path, f"MSI-X entry numbers are 0..{_MSIX_ENTRIES.stop - 1}, "
                                       f"got {vector!r}")
        elif not vector.strip() or vector != vector.strip():
            raise self.error(path, "expected an MSI-X entry number (\"1\") or a shell pattern "
                                   f"for guest IRQ names (\"*-input.*\"), got {vector!r}")


# --- paths ------------------------------------------------------------------------------------


def _resolve_paths(scenario: model.Scenario, base: str, checker: _Checker) -> model.Scenario:
    """Image paths made absolute, relative ones taken from the scenario file's folder."""

    def resolve(path: str, key: str) -> str:
        if not path.strip():
            raise checker.error(key, "must be a path, got ''")
        return os.path.normpath(os.path.join(base, os.path.expanduser(path)))

    vms = []
    for i, vm in enumerate(scenario.vms):
        image = vm.image
        at = f"vms[{i}].image"
        if isinstance(image, model.KernelImage):
            modules = None if image.modules is None else resolve(image.modules, f"{at}.modules")
            image = dataclasses.replace(image, kernel=resolve(image.kernel, f"{at}.kernel"),
                                        modules=modules)
        elif isinstance(image, model.CloudImage):
            image = dataclasses.replace(image, disk=resolve(image.disk, f"{at}.disk"))
        vms.append(dataclasses.replace(vm, image=image))
    return dataclasses.replace(scenario, vms=tuple(vms))
