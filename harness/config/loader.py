"""Read a scenario YAML file into the frozen dataclasses of :mod:`harness.config.model`.

Four passes, all reporting ``file:line: key.path: reason`` (or ``file: reason`` where no
line exists): a bounded read of the file (a regular file of at most :data:`MAX_FILE_BYTES`
UTF-8 bytes, never a FIFO or a device), a bounded composition into YAML nodes (nesting depth
and values after alias expansion counted as they are composed; nothing is constructed into
Python objects wholesale), a typed walk over the nodes, and checks across the built scenario
(unique names, references, one SSH NIC per VM, and what a scenario may ask of QEMU, which
runs as root).

Loading never executes anything and never opens a file but the scenario itself and the
harness's own guest-image recipes; image paths are only looked at with ``stat``.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import enum
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from harness.errors import ConfigError, ImageError, UsageError
from harness.images.builder import Recipe, choose_recipe, guest_images_dir
from harness.platform import platform_for

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_VALUES", "SHARED_HOST_ENV", "load_scenario",
           "load_scenario_text", "load_scenarios", "load_scenarios_text",
           "shared_host_from_env"]

_T = TypeVar("_T")

# A real scenario is a few KB holding a few hundred values nested six deep (configs/ has the
# largest).  The bounds are far above that and far below what would take the pure-Python YAML
# scanner a second (about 40 us per value, 2 us per byte of a long plain scalar) or the node
# tree tens of MB (about 1 KB per value).
MAX_FILE_BYTES = 256 * 1024
MAX_VALUES = 10_000  # after alias expansion: what the walk over the file visits
MAX_DEPTH = 32

#: Set to 1 on hosts shared between users (CI): ``qemu`` and ``extra_args`` are refused.
SHARED_HOST_ENV = "HARNESS_SHARED_HOST"

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE = _TAG + "map", _TAG + "seq", _TAG + "merge"
# Tags the safe resolver gives plain scalars; an explicit tag outside these is refused.
_KNOWN_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL, _TAG + "timestamp", _MAP, _SEQ})

# YAML 1.1 reads 010 as 8 and 1:30 as 90; nobody writing a scenario means either.
_SURPRISING_INT = re.compile(r"[-+]?0[0-7_]+|[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+")
# YAML 1.2 (and JSON) read 1e3 as a number; YAML 1.1 wants 1.0e+3 and reads 1e3 as text.
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")
# A number longer than this is no value any field takes; constructing one can take long
# (Python's int() of a long base-60 text is quadratic).
_NUMBER_MAX_CHARS = 100
# Control characters can only come from double-quoted escapes ("\e", "\0"); they would end
# up in argv (where NUL is refused by the OS), file names, terminals and reports.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

_MSIX_ENTRIES = range(2048)


# --- the way in --------------------------------------------------------------------------------


def load_scenario(path: str | os.PathLike[str], *,
                  shared_host: bool | None = None) -> model.Scenario:
    """Read and check a scenario file; raises :class:`ConfigError` with file:line on any fault.

    ``shared_host`` refuses ``qemu`` and ``extra_args``; None reads :data:`SHARED_HOST_ENV`.
    """
    filename = os.fspath(path)
    return load_scenario_text(_read(filename), filename, shared_host=shared_host)


def load_scenarios(path: str | os.PathLike[str], *,
                   shared_host: bool | None = None) -> tuple[model.Scenario, ...]:
    """Read a file of one or more scenarios (YAML documents separated by ``---``), run in
    order: a matrix such as the same device over two delivery paths."""
    filename = os.fspath(path)
    return load_scenarios_text(_read(filename), filename, shared_host=shared_host)


def load_scenario_text(text: str, filename: str, *,
                       shared_host: bool | None = None) -> model.Scenario:
    """Check a scenario given as text; ``filename`` names it in errors and is the folder that
    relative paths start from."""
    documents = _compose_all(text, filename)
    if len(documents) > 1:
        raise ConfigError(filename, _line(documents[1]), "",
                          f"holds {len(documents)} scenarios where one was expected")
    return _build_scenario(documents[0], filename, _shared(shared_host))


def load_scenarios_text(text: str, filename: str, *,
                        shared_host: bool | None = None) -> tuple[model.Scenario, ...]:
    shared = _shared(shared_host)
    scenarios: list[model.Scenario] = []
    for root in _compose_all(text, filename):
        scenario = _build_scenario(root, filename, shared)
        if any(s.name == scenario.name for s in scenarios):
            raise ConfigError(filename, _line(root), "name",
                              f"scenario {scenario.name!r} appears twice in the file")
        scenarios.append(scenario)
    return tuple(scenarios)


def shared_host_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`SHARED_HOST_ENV` says this host is shared (1) or not (0 or unset)."""
    value = (os.environ if environ is None else environ).get(SHARED_HOST_ENV, "")
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise UsageError(f"{SHARED_HOST_ENV} must be 1 (a shared host) or 0, got {_shown(value)}")


def _shared(shared_host: bool | None) -> bool:
    return shared_host_from_env() if shared_host is None else shared_host


def _build_scenario(root: yaml.Node, filename: str, shared_host: bool) -> model.Scenario:
    if not isinstance(root, yaml.MappingNode):
        # Not echoed: this may be any file at all (a key, a password file), not a scenario.
        raise ConfigError(filename, _line(root), "",
                          f"expected a mapping at the top level, got {_kind(root)}")
    walker = _Walker(filename)
    scenario = walker.build_dataclass(model.Scenario, root, "")
    base = os.path.dirname(os.path.abspath(filename))
    checker = _Checker(filename, walker.lines, shared_host)
    checker.check(scenario)
    return _resolve_paths(scenario, base, checker)


# --- the file, read within bounds --------------------------------------------------------------

_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("a FIFO (named pipe)"); None for a file."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _NOT_REGULAR if test(mode)), "not a regular file")


def _read(filename: str) -> str:
    """The file's text, read only if it is a regular file of at most MAX_FILE_BYTES.

    ``stat`` comes first, so a FIFO (which would block an open), a device (whose open alone
    can act, and whose read may never end) or a directory is refused unopened; the open is
    non-blocking and checked again with ``fstat``, in case the path changed in between.
    """
    try:
        info = os.stat(filename)
    except (OSError, ValueError) as exc:
        raise ConfigError(filename, None, "", f"cannot read: {_os_reason(exc)}") from exc
    _check_scenario_file(filename, info)
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(filename, None, "", f"cannot read: {_os_reason(exc)}") from exc
    try:
        _check_scenario_file(filename, os.fstat(fd))
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES and (chunk := os.read(fd, MAX_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ConfigError(filename, None, "", f"cannot read: {_os_reason(exc)}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:  # it grew after stat, or stat said 0 (as /proc does)
        raise ConfigError(filename, None, "", f"is larger than {MAX_FILE_BYTES // 1024} KiB, "
                                              "the most a scenario file may be")
    return _decode(data, filename)


def _os_reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _check_scenario_file(filename: str, info: os.stat_result) -> None:
    kind = _file_kind(info.st_mode)
    if kind is not None:
        raise ConfigError(filename, None, "", f"is {kind}, not a scenario file")
    if info.st_size > MAX_FILE_BYTES:
        raise ConfigError(filename, None, "", f"is {info.st_size} bytes; a scenario file is "
                                              f"at most {MAX_FILE_BYTES // 1024} KiB")


def _decode(data: bytes, filename: str) -> str:
    """UTF-8 text (a UTF-8 byte order mark is fine: YAML skips it); anything else is one line
    that names the encoding or the first bad byte, never the content."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise ConfigError(filename, None, "", f"is {encoding} text (it starts with a "
                                                  f"{encoding} byte order mark); save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ConfigError(filename, data.count(b"\n", 0, nul) + 1, "",
                          f"holds a NUL byte (at byte {nul}): a binary or UTF-16 file, not "
                          "UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(filename, data.count(b"\n", 0, exc.start) + 1, "",
                          f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


# --- YAML -> nodes, within bounds --------------------------------------------------------------


class _LimitExceeded(yaml.YAMLError):
    def __init__(self, mark: Any, path: str, reason: str) -> None:
        super().__init__(reason)
        self.line = int(mark.line) + 1
        self.path = _short_path(path)
        self.reason = reason


def _short_path(path: str, limit: int = 200) -> str:
    """A key path cut after its last whole step within ``limit`` (32 levels of 40-character
    keys would make a line of 2 KB)."""
    if len(path) <= limit:
        return path
    return path[:max(path.rfind(".", 0, limit), path.rfind("[", 0, limit))] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader's composer, counting as it composes.

    It counts the values the walk over the nodes will visit: one per node, and for an alias
    the values of the node it stands for (so ``[*a, *a, *a]`` of a 1000-value ``a`` counts
    3000).  The count stops the file at the node that passes MAX_VALUES, before anything
    walks it: an alias bomb ends after as many steps as the file has nodes.  Nesting deeper
    than MAX_DEPTH stops it too, long before the recursive composer reaches Python's
    recursion limit.  The path of each node is tracked for the message.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._count = 0
        self._paths: list[str] = []  # the path of each node being composed, outermost first
        self._values_of: dict[int, int] = {}  # id(node) -> values it stands for
        self.document_lines: list[int] = []  # where each document starts

    def compose_document(self) -> yaml.Node | None:
        start = self.peek_event()  # type: ignore[no-untyped-call]
        self.document_lines.append(int(start.start_mark.line) + 1)
        node: yaml.Node | None = super().compose_document()
        return node

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        path = self._path_of(parent, index)
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)  # missing: the composer words the error
            # An alias of a node still being composed (a recursive one) counts 1: the walk
            # stops at it, as no field of the model holds itself.
            values = self._values_of.get(id(target), 1)
            self._add(values, event, path, f"YAML aliases make the file more than {MAX_VALUES} "
                                           f"values (this one stands for {values})")
            return self._compose(parent, index)
        self._add(1, event, path, f"the file holds more than {MAX_VALUES} values, the most a "
                                  "scenario file may have")
        if len(self._paths) >= MAX_DEPTH:
            raise _LimitExceeded(event.start_mark, path,
                                 f"nested deeper than {MAX_DEPTH} levels")
        before = self._count
        self._paths.append(path)
        try:
            node = self._compose(parent, index)
        finally:
            self._paths.pop()
        self._values_of[id(node)] = self._count - before + 1
        return node

    def _compose(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        node = super().compose_node(parent, index)
        if node is None:  # the composer returns a node for every event it is asked at
            raise yaml.YAMLError("no node where one was expected")
        return node

    def _add(self, values: int, event: yaml.Event, path: str, reason: str) -> None:
        self._count += values
        if self._count > MAX_VALUES:
            raise _LimitExceeded(event.start_mark, path, reason)

    def _path_of(self, parent: yaml.Node | None, index: Any) -> str:
        outer = self._paths[-1] if self._paths else ""
        if isinstance(parent, yaml.SequenceNode):
            return f"{outer}[{index}]"
        if isinstance(parent, yaml.MappingNode):
            if index is None:  # a key (the composer composes it with no index)
                return _join(outer, "<key>")
            if isinstance(index, yaml.ScalarNode):  # a value, under its key
                return _join(outer, _key(str(index.value)))
        return outer  # the root, or a value under a key that is not text


def _compose_all(text: str, filename: str) -> list[yaml.Node]:
    """Every YAML document of the text as a node tree; at least one, none of them empty."""
    if len(text) > MAX_FILE_BYTES:  # text handed in directly, not read by _read
        raise ConfigError(filename, None, "", f"is larger than {MAX_FILE_BYTES // 1024} KiB, "
                                              "the most a scenario file may be")
    documents: list[yaml.Node] = []
    lines: list[int] = []
    try:
        loader = _BoundedLoader(text)
        lines = loader.document_lines
        try:
            while loader.check_node():
                root = loader.get_node()
                if root is not None:
                    documents.append(root)
        finally:
            loader.dispose()
    except _LimitExceeded as exc:
        raise ConfigError(filename, exc.line, exc.path, exc.reason) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = f"invalid YAML: {_cut(exc.problem or exc.context or '')}"
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
    if not documents:
        raise ConfigError(filename, 1, "", "the file is empty; a scenario needs at least "
                                           "'name' and 'vms'")
    for number, (root, line) in enumerate(zip(documents, lines, strict=True), start=1):
        if root.tag == _NULL and not root.value:  # nothing, or just "---"
            if number == 1:
                raise ConfigError(filename, line, "", "the file is empty; a scenario needs at "
                                                      "least 'name' and 'vms'")
            raise ConfigError(filename, line, "", f"scenario {number} of the file is empty "
                                                  "(a stray '---'?)")
    return documents


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key(key: str) -> str:
    """A key of the file as a key path shows it: as written if it is a plain word, else
    quoted and cut (a key may hold a dot, a newline or 100 KB)."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]{1,40}", key) else _shown(key)


_SHOWN_MAX = 40


def _shown(text: str) -> str:
    """A text of the file as a message quotes it: on one line, and cut when long."""
    if len(text) <= _SHOWN_MAX:
        return repr(text)
    return f"{text[:_SHOWN_MAX]!r}... ({len(text)} characters)"


def _cut(text: str, limit: int = 200) -> str:
    """A message of a library, cut (an undefined alias's name may be 100 KB long)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _plain(text: str) -> str:
    """A scalar as written (5, yes, 0x41), or quoted and cut if it is not short and printable."""
    return text if re.fullmatch(r"[!-~]{1,40}", text) else _shown(text)


def _describe(node: yaml.Node) -> str:
    """A node as an error message shows what was found: 'two', 5, true, a list."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == _STR:
        return _shown(node.value)
    if node.tag == _NULL:
        return "null" if node.value else "an empty value"
    return _plain(str(node.value))


def _kind(node: yaml.Node) -> str:
    """What a node is, without its content."""
    if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL:
        return _describe(node)
    kinds = {_STR: "text", _INT: "a number", _FLOAT: "a number", _BOOL: "a boolean"}
    return kinds.get(node.tag, "a scalar")


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    if len(word) > _SHOWN_MAX:
        return ""
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
            raise self.error(node, path, f"unsupported YAML tag {_plain(tag)}")
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
            raise self.error(node, path, f"expected a string, got {_plain(node.value)} "
                                         "(quote it to use it as text)")
        value: str = self.build_scalar(node, path, {_STR}, "a string")
        control = _CONTROL.search(value)
        if control is not None:
            raise self.error(node, path, f"holds the control character "
                                         f"U+{ord(control.group()):04X} (at character "
                                         f"{control.start()}); only tabs and newlines may be "
                                         "in a scenario's text")
        return value

    def check_number_length(self, node: yaml.Node, path: str) -> None:
        if (isinstance(node, yaml.ScalarNode) and node.tag in (_INT, _FLOAT)
                and len(node.value) > _NUMBER_MAX_CHARS):
            raise self.error(node, path, f"a number of {len(node.value)} characters; no "
                                         f"field takes one of more than {_NUMBER_MAX_CHARS}")

    def build_int(self, node: yaml.Node, path: str) -> int:
        self.check_number_length(node, path)
        if (isinstance(node, yaml.ScalarNode) and node.tag == _INT
                and _SURPRISING_INT.fullmatch(node.value)):
            read_as = self.build_scalar(node, path, {_INT}, "an integer")
            raise self.error(node, path, f"ambiguous integer {node.value} (YAML 1.1 reads it "
                                         f"as {read_as}); write {read_as} or quote the text")
        value: int = self.build_scalar(node, path, {_INT}, "an integer")
        return value

    def build_float(self, node: yaml.Node, path: str) -> float:
        self.check_number_length(node, path)
        if (isinstance(node, yaml.ScalarNode) and node.tag == _STR and node.style is None
                and _YAML12_FLOAT.fullmatch(node.value)):
            raise self.error(node, path, f"expected a number, got {_shown(node.value)} (YAML "
                                         "1.1 reads an exponent only after a point and with "
                                         "a sign, as in 1.5e+3)")
        value = float(self.build_scalar(node, path, {_INT, _FLOAT}, "a number"))
        if not math.isfinite(value):
            raise self.error(node, path, f"expected a finite number, got {_plain(node.value)}")
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
                raise self.error(key_node, _join(path, _key(key)),
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
                             f"unknown kind {_shown(kind)}{_did_you_mean(kind, by_kind)}; "
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
                raise self.error(key_node, _join(path, _key(key)),
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
            got = _plain(node.value)  # as written: 0x41 stays 0x41, 30 does not become 30.0
            if "minimum" in meta and not value >= meta["minimum"]:
                raise self.error(node, path, f"must be at least {meta['minimum']}, got {got}")
            if "maximum" in meta and not value <= meta["maximum"]:
                raise self.error(node, path, f"must be at most {meta['maximum']}, got {got}")
            if "exclusiveMinimum" in meta and not value > meta["exclusiveMinimum"]:
                raise self.error(node, path, f"must be greater than {meta['exclusiveMinimum']}, "
                                             f"got {got}")
        if isinstance(value, str) and "maxLength" in meta and len(value) > meta["maxLength"]:
            raise self.error(node, path, f"must be at most {meta['maxLength']} characters, got "
                                         f"{len(value)}")
        if isinstance(value, str) and "pattern" in meta and not _matches(meta["pattern"], value):
            raise self.error(node, path, f"must match {meta['pattern']}, got {_shown(value)}")
        if isinstance(value, tuple) and "minItems" in meta and len(value) < meta["minItems"]:
            raise self.error(node, path, f"must have at least {meta['minItems']} "
                                         f"item{'s' if meta['minItems'] != 1 else ''}, "
                                         f"got {len(value)}")
        if isinstance(value, tuple) and "maxItems" in meta and len(value) > meta["maxItems"]:
            raise self.error(node, path, f"must have at most {meta['maxItems']} items, "
                                         f"got {len(value)}")


def _matches(pattern: str, value: str) -> bool:
    """JSON Schema's pattern test: a search, where ``$`` ends the text (in Python it also
    matches before a final newline, so "web\\n" would pass ``^[a-z]+$``)."""
    found = re.search(pattern, value)
    return found is not None and (not pattern.endswith("$") or found.end() == len(value))


# --- checks across the scenario ----------------------------------------------------------------


class _Checker:
    """Checks that need more than one value: uniqueness, references, SSH reachability, and
    what the scenario asks of QEMU and of the host."""

    def __init__(self, filename: str, lines: dict[str, int], shared_host: bool = False) -> None:
        self.filename = filename
        self.lines = lines
        self.shared_host = shared_host
        self._recipes: dict[tuple[str, str | None, tuple[str, ...]], Recipe] = {}

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
            self.check_qemu(vm, path)
        vms = {vm.name: vm for vm in scenario.vms}
        for i, workload in enumerate(scenario.workloads):
            vm = self.vm_named(vms, workload.vm, f"workloads[{i}].vm")
            self.check_workload(vm, workload, f"workloads[{i}]")
        for i, expectation in enumerate(scenario.expect):
            self.check_expectation(vms, expectation, f"expect[{i}]", scenario.workloads)

    def check_devices(self, vm: model.VM, path: str) -> None:
        ids: dict[str, int] = {}
        slots: dict[int, int] = {}
        ssh_nics: list[int] = []
        networks: dict[str, int] = {}
        slots_ok = platform_for(vm.arch).slots
        for j, device in enumerate(vm.devices):
            dev = f"{path}.devices[{j}]"
            if device.id in ids:
                first = self.line(f"{path}.devices[{ids[device.id]}].id")
                raise self.error(f"{dev}.id", f"duplicate device id {device.id!r} in VM "
                                              f"{vm.name!r} (first at line {first})")
            ids[device.id] = j
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
        if explicit is not None:
            self.check_recipe_name(explicit, f"{path}.image.recipe")
        try:
            recipe = self.recipe(platform.arch, explicit, wanted)
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

    def recipe(self, arch: str, explicit: str | None, wanted: tuple[str, ...]) -> Recipe:
        """The recipe a VM boots, read once per scenario for each architecture and drivers."""
        key = (arch, explicit, wanted)
        if key not in self._recipes:
            self._recipes[key] = (Recipe.load(explicit) if explicit
                                  else choose_recipe(platform_for(arch), wanted))
        return self._recipes[key]

    def check_recipe_name(self, name: str, path: str) -> None:
        """A recipe is one of the harness's own folders (the pattern already keeps it a plain
        name); only that folder's files are read, and only if it is one."""
        folder = guest_images_dir()
        try:
            names = sorted(entry.name for entry in os.scandir(folder)
                           if os.path.isfile(os.path.join(entry.path, "packages.txt")))
        except OSError as exc:
            raise self.error(path, f"cannot list the harness's recipes in {folder}: "
                                   f"{_os_reason(exc)}") from exc
        if name not in names:
            raise self.error(path, f"no recipe {_shown(name)} in the harness's guest-images/"
                                   f"{_did_you_mean(name, names)}; recipes: {', '.join(names)}")

    def check_qemu(self, vm: model.VM, path: str) -> None:
        """What the VM asks of QEMU: its binary, machine and extra arguments (see the trust
        model in the README)."""
        if self.shared_host:
            for key, why in (("qemu", "choose the binary the harness runs as root"),
                             ("extra_args", "pass QEMU arguments of its own")):
                if f"{path}.{key}" in self.lines:
                    raise self.error(f"{path}.{key}", f"refused on a shared host "
                                     f"({SHARED_HOST_ENV}=1): a scenario may not {why}")
        if vm.qemu is not None:
            self.check_qemu_binary(vm, f"{path}.qemu")
        if vm.machine is not None:
            problem = _machine_problem(vm.machine, platform_for(vm.arch).machine)
            if problem is not None:
                raise self.error(f"{path}.machine", problem)
        self.check_extra_args(vm, f"{path}.extra_args")

    def check_qemu_binary(self, vm: model.VM, path: str) -> None:
        """A custom QEMU is named as the architecture's system emulator: it is run as root,
        so a typo or a script is refused here, by its name alone (the run checks the file
        before it starts it: an ELF executable of that name)."""
        expected = platform_for(vm.arch).qemu
        name = os.path.basename(vm.qemu or "")
        if not re.fullmatch(re.escape(expected) + r"([-.][A-Za-z0-9._-]+)?", name):
            raise self.error(path, f"must be a QEMU system emulator named {expected} (or "
                                   f"{expected}-SUFFIX), on PATH or as a path, got "
                                   f"{_shown(vm.qemu or '')}; the harness runs it as root")

    def check_extra_args(self, vm: model.VM, path: str) -> None:
        """Options from the allow-list only, each followed by a value its rule accepts."""
        own_ids = frozenset(device.id for device in vm.devices)
        args = vm.extra_args
        i = 0
        for j, arg in enumerate(args):
            if "\n" in arg or "\t" in arg:
                raise self.error(f"{path}[{j}]", f"{_shown(arg)} holds a newline or a tab, which "
                                 "no QEMU option takes")
        while i < len(args):
            arg = args[i]
            if not arg.startswith("-") or arg in ("-", "--"):
                raise self.error(f"{path}[{i}]", f"{_shown(arg)} is not an option, and QEMU "
                                 "takes a bare argument as a disk image (-hda): a host file "
                                 "the guest could write")
            name = arg[2:] if arg.startswith("--") else arg[1:]
            refusal = _REFUSED_OPTIONS.get(name)
            if refusal is not None:
                raise self.error(f"{path}[{i}]", f"{arg} is refused: {refusal}")
            check = _ALLOWED_OPTIONS.get(name)
            if check is None:
                raise self.error(f"{path}[{i}]", f"{_shown(arg)} is not among the options a "
                                 f"scenario may pass to QEMU "
                                 f"({', '.join('-' + o for o in _ALLOWED_OPTIONS)})")
            if i + 1 == len(args):
                raise self.error(f"{path}[{i}]", f"{arg} needs a value")
            problem = check(args[i + 1], own_ids)
            if problem is not None:
                raise self.error(f"{path}[{i + 1}]",
                                 f"{arg} {_shown(args[i + 1])} is refused: {problem}")
            i += 2

    def vm_named(self, vms: dict[str, model.VM], name: str, path: str) -> model.VM:
        if name not in vms:
            raise self.error(path, f"no VM named {_shown(name)}{_did_you_mean(name, vms)}; "
                                   f"VMs: {', '.join(vms)}")
        return vms[name]

    def check_workload(self, vm: model.VM, workload: model.Workload, path: str) -> None:
        """A workload runs a command or hot-plugs a device, one of the two; the device of a
        hotplug step is one of the VM's, behind a root port, and not the SSH NIC."""
        if bool(workload.run) == (workload.hotplug is not None):
            raise self.error(path, "a workload has run (a command) or hotplug (a device "
                                   "step), exactly one of them")
        if workload.hotplug is None:
            return
        devices = {device.id: device for device in vm.devices}
        name = workload.hotplug.device
        where = f"{path}.hotplug.device"
        if name not in devices:
            raise self.error(where, f"VM {vm.name!r} has no device {_shown(name)}"
                             f"{_did_you_mean(name, devices)}; its devices: "
                             f"{', '.join(devices)}")
        device = devices[name]
        if not device.hotplug:
            raise self.error(where, f"{device.kind} {name!r} sits on the root bus, which cannot "
                             "hot-plug: give it hotplug: true (a root port of its own)")
        if device.ssh_nic():
            raise self.error(where, f"{name!r} is the NIC the harness reaches the guest "
                             "through (ssh: true): it cannot be unplugged")

    def check_expectation(self, vms: dict[str, model.VM], expectation: model.Expectation,
                          path: str, workloads: tuple[model.Workload, ...]) -> None:
        vm = self.vm_named(vms, expectation.vm, f"{path}.vm")
        devices = {device.id: device for device in vm.devices}
        if expectation.device not in devices:
            raise self.error(f"{path}.device",
                             f"VM {vm.name!r} has no device {_shown(expectation.device)}"
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
        if expectation.cpu is not None and expectation.cpu >= vm.cpus:
            raise self.error(f"{path}.cpu", f"VM {vm.name!r} has {vm.cpus} CPU(s): "
                             f"CPU{expectation.cpu} is not one of them (they count from 0)")
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
        if re.fullmatch(r"[-+]?[0-9]+", vector):
            # int() of a long text is slow, and refused past 4300 digits
            if len(vector) > 5 or model.entry_number(vector) not in _MSIX_ENTRIES:
                raise self.error(path, f"MSI-X entry numbers are 0..{_MSIX_ENTRIES.stop - 1}, "
                                       f"got {_shown(vector)}")
        elif not vector.strip() or vector != vector.strip():
            raise self.error(path, "expected an MSI-X entry number (\"1\") or a shell pattern "
                                   f"for guest IRQ names (\"*-input.*\"), got {_shown(vector)}")


# --- what a scenario may ask of QEMU -----------------------------------------------------------
#
# The harness writes each VM's command line itself: machine and accelerator, CPU model, vCPUs,
# memory, name, -nodefaults -no-user-config -display none -no-reboot, QMP and the serial console
# over socketpairs, the image's kernel, initramfs and command line (or disk and seed), and every
# device of the scenario with its id, netdev and drive.  extra_args comes after all of that, so
# an option given again would silently win (QEMU takes the last) or contradict the first; and
# QEMU runs as root, so an option naming a host file could read it into the guest or overwrite
# it.  Hence an allow-list of options useful to interrupt experiments that name no host file,
# each value checked, and a reason for the refusals a user is likely to meet.

# (value, the VM's device ids) -> why the value is refused, or None
_OptionCheck = Callable[[str, frozenset[str]], str | None]


def _reasons(names: str, reason: str) -> dict[str, str]:
    return dict.fromkeys(names.split(), reason)


_REFUSED_OPTIONS: Mapping[str, str] = {
    # what the harness sets: a second one would override or contradict it
    **_reasons("machine M", "the harness sets -machine; use the VM's machine key (and its "
                            "accel key for the accelerator)"),
    **_reasons("accel enable-kvm", "the harness sets the accelerator (machine accel=) from the "
                                   "VM's accel key"),
    **_reasons("cpu", "the harness sets -cpu (host under KVM, the architecture's model under "
                      "TCG)"),
    **_reasons("smp", "the harness sets -smp from the VM's cpus key"),
    **_reasons("m", "the harness sets -m from the VM's memory_mib key"),
    **_reasons("name", "the harness names the VM after its name key"),
    **_reasons("nodefaults no-user-config display nographic no-reboot no-shutdown",
               "the harness sets QEMU's defaults, display and reboot behaviour itself"),
    **_reasons("serial chardev mon monitor qmp qmp-pretty parallel debugcon",
               "the harness owns QEMU's monitor and serial console (socketpairs it reads); "
               "another one could also write a host file"),
    **_reasons("kernel initrd append dtb bios L", "the harness boots the VM's image; use the "
                                                  "image and append keys"),
    **_reasons("netdev nic net", "each NIC device brings its own user-mode network; add NICs "
                                 "under devices"),
    **_reasons("drive blockdev hda hdb hdc hdd cdrom fda fdb sd mtdblock pflash snapshot",
               "it opens a host file as a guest disk; add disks under devices"),
    # what reaches outside the VM: host files, ports, the process itself
    **_reasons("D", "it makes QEMU write its log to a host file; the run folder keeps QEMU's "
                    "log already (choose what it logs with -d)"),
    **_reasons("pidfile dump-vmstate", "it makes QEMU write a host file"),
    **_reasons("daemonize", "QEMU would leave the harness's process group and outlive the run"),
    **_reasons("runas chroot", "it changes the user or the root directory QEMU runs with"),
    **_reasons("sandbox", "the harness leaves QEMU's seccomp sandbox as it is"),
    **_reasons("readconfig", "it reads QEMU options from a host file, past these checks"),
    **_reasons("plugin", "it loads a host shared library into QEMU"),
    **_reasons("incoming loadvm", "it loads the VM's state from a host file or socket"),
    **_reasons("gdb s vnc spice", "it opens a port from which the guest can be controlled"),
    **_reasons("semihosting semihosting-config", "it lets the guest read and write host files"),
    **_reasons("virtfs fsdev", "it shares a host folder with the guest"),
    **_reasons("add-fd", "it hands host file descriptors to QEMU"),
    **_reasons("fw_cfg option-rom mem-path", "it reads a host file into the guest"),
    **_reasons("audiodev", "an audio backend can write a host file (wav)"),
    **_reasons("S", "it holds the vCPUs stopped, so the guest would never boot"),
}

# Properties of -device, -global and -object that name a host file or device (which QEMU, as
# root, would open), or a backend: and the only backends are the harness's own.
_HOST_KEYS = frozenset({"file", "filename", "path", "romfile", "evdev", "sysfsdev", "host",
                        "hostbus", "hostaddr", "hostport", "hostdevice", "fd", "fds",
                        "vhostfd", "vhostfds", "iommufd", "mem-path", "script", "downscript"})
_BACKEND_KEYS = frozenset({"chardev", "netdev", "drive", "fsdev"})
# Device models that reach the host whatever their properties.
_REFUSED_DRIVERS = (
    ("vfio-", "assigns a host device past the harness; give it as a device of kind vfio-pci, "
              "whose binding the harness journals and restores"),
    ("vhost-", "opens a host kernel device (vhost) as root"),
    ("usb-host", "passes a host USB device to the guest"),
    ("u2f-passthru", "passes a host security key to the guest"),
    ("loader", "loads a host file into guest memory"),
)
_OBJECT_TYPES = ("iothread", "memory-backend-ram", "rng-builtin", "rng-random", "throttle-group")
_RNG_FILES = ("/dev/urandom", "/dev/random")
_TRACE = re.compile(r"(enable=)?[A-Za-z0-9_*?]+")
_LOG_ITEMS = re.compile(r"[A-Za-z0-9_*?:-]+(,[A-Za-z0-9_*?:-]+)*")
_GLOBAL = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_.-]+)=(.*)", re.DOTALL)
_MACHINE_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REFUSED_MACHINE_KEYS: Mapping[str, str] = {
    **_reasons("accel", "the harness sets it from the VM's accel key"),
    **_reasons("kernel initrd append dtb firmware", "the harness boots the VM's image; use the "
                                                   "image and append keys"),
    **_reasons("dumpdtb", "it makes QEMU write a host file"),
}


def _qemu_opts(text: str, implied: str) -> tuple[str | None, list[tuple[str, str]]]:
    """QEMU's ``value,key=value,key`` syntax (``,,`` is a comma in a value; a bare key means
    key=on): the implied first value (or its ``implied=`` key) and the other pairs.  A stray
    comma (an empty item) is a ValueError: QEMU would read the rest differently."""
    items = [item.replace("\0", ",") for item in text.replace(",,", "\0").split(",")]
    if "" in items:
        raise ValueError("it has an empty item (a stray comma)")
    head = None if "=" in items[0] else items.pop(0)
    pairs = [(k, v) for k, _, v in (item.partition("=") if "=" in item else (item, "=", "on")
                                    for item in items)]
    for key, value in pairs:
        if key == implied:
            head = value
    return head, [(k, v) for k, v in pairs if k != implied]


def _property_problem(key: str) -> str | None:
    if key in _HOST_KEYS:
        return f"{key}= names a host file or device, which QEMU would open as root"
    if key in _BACKEND_KEYS:
        return (f"{key}= attaches to a backend, and the only ones are the harness's (its QMP "
                "and console chardevs, its NICs' netdevs, its disks' drives)")
    return None


def _device_value(value: str, own_ids: frozenset[str]) -> str | None:
    if value.lstrip().startswith("{"):
        return "the JSON form is not checked here; write DRIVER,key=value,..."
    try:
        driver, props = _qemu_opts(value, "driver")
    except ValueError as exc:
        return str(exc)
    if not driver:
        return "expected DRIVER[,key=value...]"
    for prefix, reason in _REFUSED_DRIVERS:
        if driver.startswith(prefix):
            return f"{driver} {reason}"
    for key, item in props:
        if key == "id" and item in own_ids:
            return f"id {item!r} is the VM's device {item!r}; give the new device an id of its own"
        problem = _property_problem(key)
        if problem is not None:
            return problem
    return None


def _object_value(value: str, own_ids: frozenset[str]) -> str | None:
    if value.lstrip().startswith("{"):
        return "the JSON form is not checked here; write TYPE,id=ID,key=value,..."
    try:
        qom_type, props = _qemu_opts(value, "qom-type")
    except ValueError as exc:
        return str(exc)
    if qom_type not in _OBJECT_TYPES:
        return (f"objects of type {_shown(qom_type or '')} are not among those a scenario may "
                f"create ({', '.join(_OBJECT_TYPES)}); others open host files, sockets or "
                "devices")
    for key, item in props:
        if qom_type == "rng-random" and key == "filename":
            if item not in _RNG_FILES:
                return f"rng-random reads {' or '.join(_RNG_FILES)}, no other host file"
            continue
        problem = _property_problem(key)
        if problem is not None:
            return problem
    return None


def _global_value(value: str, own_ids: frozenset[str]) -> str | None:
    found = _GLOBAL.fullmatch(value)
    if found is None:
        return "expected DRIVER.PROPERTY=VALUE"
    return _property_problem(found.group(2))


def _trace_value(value: str, own_ids: frozenset[str]) -> str | None:
    if _TRACE.fullmatch(value):
        return None
    return ("only an event pattern (vfio_*) or enable=PATTERN may be given: file= would write "
            "a host file and events= read one; trace lines go to QEMU's log in the run folder")


def _log_value(value: str, own_ids: frozenset[str]) -> str | None:
    if _LOG_ITEMS.fullmatch(value):
        return None
    return ("only log items (int,guest_errors,trace:vfio_*) may be given; QEMU's log goes to "
            "the run folder")


def _keys(allowed: str, implied: bool = False, refused: Mapping[str, str] | None = None
          ) -> _OptionCheck:
    """A ``key=value,...`` option whose keys are all among ``allowed``."""
    names = allowed.split()

    def check(value: str, own_ids: frozenset[str]) -> str | None:
        try:
            head, props = _qemu_opts(value, "")
        except ValueError as exc:
            return str(exc)
        if head is not None and not implied:
            return f"expected key=value,... with keys among {', '.join(names)}"
        for key, _ in props:
            if refused and key in refused:
                return f"{key}= {refused[key]}"
            if key not in names:
                return f"{key}= is not one of its keys a scenario may set ({', '.join(names)})"
        return None

    return check


_ALLOWED_OPTIONS: Mapping[str, _OptionCheck] = {
    "device": _device_value,  # a device of the scenario's own, on the VM's buses
    "object": _object_value,  # what such devices need: rng, iothread, RAM backend, throttling
    "global": _global_value,  # a default property of a device model (DRIVER.PROPERTY=VALUE)
    "trace": _trace_value,  # trace events, to QEMU's log (the run folder keeps it)
    "d": _log_value,  # log items, to QEMU's log
    "icount": _keys("shift align sleep", implied=True, refused=_reasons(
        "rr rrfile rrsnapshot", "records or replays the VM through a host file")),
    "rtc": _keys("base clock driftfix"),
    "overcommit": _keys("mem-lock cpu-pm"),
    "msg": _keys("timestamp guest-name"),
}


def _machine_problem(machine: str, example: str) -> str | None:
    """Why a VM's ``machine`` (TYPE[,key=value...], passed as -machine with the harness's
    accel= after it) cannot be used, or None.  A machine type has many properties, nearly all
    harmless (kernel-irqchip, gic-version, its, iommu...): the few that are not are refused."""
    if "\n" in machine or "\t" in machine:
        return f"{_shown(machine)} holds a newline or a tab, which no machine option takes"
    try:
        head, props = _qemu_opts(machine, "type")
    except ValueError as exc:
        return str(exc)
    if head is None or not _MACHINE_TYPE.fullmatch(head):
        return f"expected a machine type first (such as {example}), got {_shown(machine)}"
    for key, _ in props:
        if key in _REFUSED_MACHINE_KEYS:
            return f"{key}= is refused: {_REFUSED_MACHINE_KEYS[key]}"
    return None


# --- paths -------------------------------------------------------------------------------------


def _resolve_paths(scenario: model.Scenario, base: str, checker: _Checker) -> model.Scenario:
    """Image paths and a custom QEMU's path made absolute, relative ones taken from the
    scenario file's folder (a bare QEMU name stays a name, looked up on PATH)."""

    def resolve(path: str, key: str) -> str:
        if not path.strip():
            raise checker.error(key, "must be a path, got ''")
        return os.path.normpath(os.path.join(base, os.path.expanduser(path)))

    vms = []
    for i, vm in enumerate(scenario.vms):
        image = vm.image
        at = f"vms[{i}].image"
        if isinstance(image, model.KernelImage):
            kernel = _existing(resolve(image.kernel, f"{at}.kernel"), f"{at}.kernel", checker)
            modules = None if image.modules is None else _existing(
                resolve(image.modules, f"{at}.modules"), f"{at}.modules", checker,
                folder=True)
            image = dataclasses.replace(image, kernel=kernel, modules=modules)
        elif isinstance(image, model.CloudImage):
            disk = _existing(resolve(image.disk, f"{at}.disk"), f"{at}.disk", checker)
            image = dataclasses.replace(image, disk=disk)
        qemu = vm.qemu
        if qemu is not None and (os.sep in qemu or qemu.startswith("~")):
            qemu = resolve(qemu, f"vms[{i}].qemu")
        vms.append(dataclasses.replace(vm, image=image, qemu=qemu))
    return dataclasses.replace(scenario, vms=tuple(vms))


def _existing(path: str, key: str, checker: _Checker, folder: bool = False) -> str:
    """``path``, refused if it is there but of the wrong kind: a FIFO would hang the image
    build and /dev/zero fill its memory.  Only ``stat`` looks at it; a missing one is the
    run's to report, where it needs it (a scenario may be checked on another host)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return path
    if folder and not stat.S_ISDIR(mode):
        raise checker.error(key, f"{path} is {_file_kind(mode) or 'a file'}, not a folder")
    if not folder and not stat.S_ISREG(mode):
        raise checker.error(key, f"{path} is {_file_kind(mode)}, not a file")
    return path
