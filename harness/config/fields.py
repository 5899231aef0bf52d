"""Field metadata for the scenario dataclasses: one-line docs and JSON Schema constraints."""

from __future__ import annotations


def doc(text: str, **kwargs: object) -> dict[str, object]:
    """Field metadata carrying the one-line documentation used by the schema."""
    return {"doc": text, **kwargs}
