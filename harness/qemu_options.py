"""QEMU's ``head,key=value,...`` option strings, built so that no value can inject a key."""

from __future__ import annotations

from collections.abc import Mapping


def qemu_options(head: str, props: Mapping[str, object]) -> str:
    """``head,key=value,...``: None values are left out, booleans become on/off.

    A value holding a comma would split into a second option, so it is refused.
    """
    parts = [head]
    for key, value in props.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        text = str(value)
        if "," in text:
            raise ValueError(f"QEMU option value {text!r} for {key} contains a comma")
        parts.append(f"{key}={text}")
    return ",".join(parts)
