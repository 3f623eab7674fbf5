"""What the JSON Schema exports share (``python -m schemas``, the HTTP API's OpenAPI document)."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["clean_descriptions"]


def clean_descriptions(node: Any) -> Any:
    """``node`` (a schema, or any JSON value) with every ``description`` normalised by
    :func:`inspect.cleandoc`.

    msgspec takes descriptions from docstrings, and how it strips their indentation changed in
    0.23. Cleaning them keeps an export byte-identical whichever msgspec is installed.
    """
    if isinstance(node, dict):
        return {
            key: inspect.cleandoc(value)
            if key == "description" and isinstance(value, str)
            else clean_descriptions(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [clean_descriptions(item) for item in node]
    return node
