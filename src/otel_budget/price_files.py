"""JSON price tables: read and validate one file into ``PriceBook`` arguments.

    >>> from otel_budget.pricing import PriceBook
    >>> book = PriceBook.from_file("prices.json")                    # doctest: +SKIP

The format::

    {"models": {"ollama/*": {"input": 0, "output": 0},
                "ft:gpt-4o*": {"input": 3.75, "output": 15, "cache_read": 1.875}},
     "aliases": {"my-gpt4o-deployment": "gpt-4o"},
     "tools": {"web_search": 0.01},
     "unknown_model": "price_as:gpt-4o"}

Keys starting with ``_`` or ``$`` are comments; any other unknown key is an error. Amounts are
read by ``otel_budget.money.parse_usd`` (ASCII decimals only). A file nested deeper than
``MAX_DEPTH`` is refused with a ``ValueError`` (a price table is three levels deep; a deeply
nested file would otherwise raise ``RecursionError`` out of ``instrument()``).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["MAX_DEPTH", "read_price_file"]

MAX_DEPTH = 16
_SECTIONS = ("models", "aliases", "tools")
_ALLOWED = frozenset({*_SECTIONS, "unknown_model", "use_genai_prices"})


def _depth_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` (parsed JSON) nests deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def read_price_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``PriceBook`` keyword arguments a JSON price table holds; ``ValueError`` naming
    the path when it is not a valid table."""
    where = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(
                f"{where}: nested too deeply (a price table is at most {MAX_DEPTH} levels deep)"
            ) from None
    if _depth_exceeds(data, MAX_DEPTH):
        raise ValueError(
            f"{where}: nested too deeply (a price table is at most {MAX_DEPTH} levels deep)"
        )
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object at the top level")
    unknown = sorted(k for k in data if k not in _ALLOWED and not k.startswith(("_", "$")))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_ALLOWED)}")
    for section in _SECTIONS:
        if not isinstance(data.get(section, {}), dict):
            raise ValueError(f"{where}: {section!r} must be an object")
    use_gp = data.get("use_genai_prices", True)
    if not isinstance(use_gp, bool):
        raise ValueError(f"{where}: 'use_genai_prices' must be true or false")
    return {
        "overrides": data.get("models"),
        "aliases": data.get("aliases"),
        "tools": data.get("tools"),
        "unknown_model": data.get("unknown_model", "block"),
        "use_genai_prices": use_gp,
    }
