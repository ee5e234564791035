"""Checks on JSON values a route keeps or ignores as sent: Python's JSON reader takes NaN, Infinity and any
nesting, which JSON (and the strict parsers of clients that get them echoed back) does not."""

from __future__ import annotations

import math
from typing import Any

# Deeper than any request field needs; pydantic's serializer gives up near 255 levels, and an A1111 extra that
# deep made the response fail after its job had run (a 500, and a second job on the client's retry).
MAX_NESTING = 32


def not_finite_at(value: Any, path: str) -> str | None:
    """Where in `value` (a JSON value) a NaN or an infinity is, as a dotted path from `path`; None if nowhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    for where, item in _children(value, path):
        found = not_finite_at(item, where)
        if found is not None:
            return found
    return None


def too_deep_at(value: Any, path: str, levels_left: int = MAX_NESTING) -> str | None:
    """Where in `value` arrays and objects nest more than MAX_NESTING levels, as a path; None if nowhere."""
    children = list(_children(value, path))
    if children and levels_left == 0:
        return path
    for where, item in children:
        found = too_deep_at(item, where, levels_left - 1)
        if found is not None:
            return found
    return None


def refuse_unsendable(data: Any) -> Any:
    """A request body's fields (a JSON object), refused as "[field] ..." (the errors' field convention) where
    one holds NaN or Infinity or nests too deep, whether the route reads that field or not."""
    if isinstance(data, dict):
        for name, value in data.items():
            where = not_finite_at(value, str(name))
            if where is not None:
                raise ValueError(
                    f"[{name}] {where} is NaN or Infinity, which JSON does not have; send a finite number or null"
                )
            where = too_deep_at(value, str(name))
            if where is not None:
                raise ValueError(
                    f"[{name}] {where} nests arrays or objects more than {MAX_NESTING} levels deep; send it flatter"
                )
    return data


def _children(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return ((f"{path}.{key}", item) for key, item in value.items())
    if isinstance(value, list):
        return ((f"{path}[{index}]", item) for index, item in enumerate(value))
    return ()
