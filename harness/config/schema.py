"""JSON Schema (draft 2020-12) of the scenario format, generated from :mod:`harness.config.model`.

Editors use ``configs/scenario.schema.json`` for completion and checks; a unit test keeps that
file equal to what this module generates.  The few helpers that read the model's type
annotations and field metadata live here too, so the loader and the schema read them alike.

Regenerate the file with::

    .venv/bin/harness schema > configs/scenario.schema.json
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin, get_type_hints

from harness.config import model

DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: Field metadata keys that constrain a value, spelled as in JSON Schema.
CONSTRAINT_KEYS = ("minimum", "maximum", "exclusiveMinimum", "pattern", "maxLength", "minItems",
                   "maxItems")
METADATA_KEYS = frozenset({"doc", *CONSTRAINT_KEYS})


# --- reading the model's shape (shared with the loader) --------------------------------------


def field_types(cls: type) -> Mapping[str, Any]:
    """Evaluated annotations of a dataclass (model.py has ``from __future__ import annotations``,
    so ``__annotations__`` holds strings)."""
    return _field_types(cls)


@functools.cache
def _field_types(cls: type) -> Mapping[str, Any]:
    # Evaluated once per class: the loader asks at every mapping it walks.
    return types.MappingProxyType(get_type_hints(cls))


def field_metadata(f: dataclasses.Field[Any]) -> Mapping[str, Any]:
    """A field's metadata, refusing keys that neither the loader nor the schema understands."""
    unknown = set(f.metadata) - METADATA_KEYS
    if unknown:
        raise TypeError(f"field {f.name!r} has unknown metadata keys {sorted(unknown)}")
    return f.metadata


def is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def optional_inner(tp: Any) -> Any | None:
    """``X`` for ``X | None``; None for any other type."""
    if get_origin(tp) not in (types.UnionType, typing.Union):
        return None
    args = get_args(tp)
    if type(None) not in args:
        return None
    rest = [arg for arg in args if arg is not type(None)]
    if len(rest) != 1:
        raise TypeError(f"unsupported optional union in the scenario model: {tp!r}")
    return rest[0]


def dataclass_union(tp: Any) -> tuple[type, ...] | None:
    """The members of a union of dataclasses told apart by ``kind``; None for other types."""
    if get_origin(tp) not in (types.UnionType, typing.Union):
        return None
    members = get_args(tp)
    if type(None) in members:
        return None
    if not all(isinstance(m, type) and dataclasses.is_dataclass(m) for m in members):
        raise TypeError(f"unsupported union in the scenario model: {tp!r}")
    return tuple(members)


def kind_of(cls: type) -> str:
    """The one value of a dataclass's ``kind: Literal[...]`` field."""
    values = get_args(field_types(cls).get("kind"))
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{cls.__name__} needs a field kind: Literal['<one value>']")
    return values[0]


def class_doc(cls: type) -> str | None:
    """The class's own docstring; not the signature that ``@dataclass`` fills in without one."""
    text = cls.__doc__
    if not text or text.startswith(cls.__name__ + "("):
        return None
    return " ".join(text.split())


# --- JSON Schema ------------------------------------------------------------------------------


def scenario_json_schema() -> dict[str, Any]:
    """The JSON Schema of a scenario file, one ``$defs`` entry per dataclass and enum."""
    defs: dict[str, Any] = {}
    _type_schema(model.Scenario, defs)
    return {
        "$schema": DIALECT,
        "title": "harness scenario",
        "description": "One scenario for the harness: the guests to boot, the workloads to run "
                       "in them and the interrupt delivery paths to expect.",
        "$ref": "#/$defs/Scenario",
        "$defs": defs,
    }


def scenario_json_schema_text() -> str:
    """The schema as committed in ``configs/scenario.schema.json``."""
    return json.dumps(scenario_json_schema(), indent=2, sort_keys=True) + "\n"


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    inner = optional_inner(tp)
    if inner is not None:
        schema = _type_schema(inner, defs)
        if set(schema) == {"type"}:
            return {"type": [schema["type"], "null"]}
        return {"anyOf": [schema, {"type": "null"}]}
    members = dataclass_union(tp)
    if members is not None:
        return {"oneOf": [_type_schema(m, defs) for m in members]}
    if get_origin(tp) is tuple:
        item, ellipsis = get_args(tp)
        if ellipsis is not Ellipsis:
            raise TypeError(f"only tuple[X, ...] is supported in the scenario model: {tp!r}")
        return {"type": "array", "items": _type_schema(item, defs)}
    if get_origin(tp) is Literal:
        values = list(get_args(tp))
        return {"const": values[0]} if len(values) == 1 else {"enum": values}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder first: a dataclass may refer to itself
            defs[tp.__name__] = _dataclass_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if tp.__name__ not in defs:
            enum_schema: dict[str, Any] = {"type": "string",
                                           "enum": [member.value for member in tp]}
            if (text := class_doc(tp)) is not None:
                enum_schema["description"] = text
            defs[tp.__name__] = enum_schema
        return {"$ref": f"#/$defs/{tp.__name__}"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"unsupported type in the scenario model: {tp!r}")


def _dataclass_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = field_types(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        meta = field_metadata(f)
        prop = _type_schema(hints[f.name], defs)
        if "doc" in meta:
            prop["description"] = meta["doc"]
        for key in CONSTRAINT_KEYS:
            if key in meta:
                prop[key] = meta[key]
        if is_required(f):
            required.append(f.name)
        elif f.default is not dataclasses.MISSING:
            prop["default"] = _to_json(f.default)
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    if (text := class_doc(cls)) is not None:
        schema["description"] = text
    return schema


def _to_json(value: object) -> object:
    """A default value as JSON: enums by value, tuples as lists, dataclasses as objects."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_json(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def write_schema(path: str | os.PathLike[str]) -> None:
    """Write the generated schema to ``path`` (configs/scenario.schema.json in the repo)."""
    with open(path, "w", encoding="utf-8") as out:
        out.write(scenario_json_schema_text())
