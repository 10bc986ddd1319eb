"""Prompt cache: identical requests answered from a cache, free, within the budget machinery.

    >>> from otel_budget import BudgetInstrumentor
    >>> from otel_budget.cache import MemoryCache, ResponseCache
    >>> BudgetInstrumentor().instrument(max_usd=1, cache=ResponseCache(MemoryCache()))  # doctest: +SKIP
    >>> client.chat.completions.create(model="gpt-4o-mini", messages=msgs, temperature=0)  # doctest: +SKIP
    >>> client.chat.completions.create(model="gpt-4o-mini", messages=msgs, temperature=0)  # doctest: +SKIP
    ... # the second: the SDK's own ChatCompletion, parsed from the cached body, $0, no request

Opt-in (off by default; ``OTEL_BUDGET_CACHE=memory`` or ``redis://...`` in zero-code runs).
``ResponseCache`` decides what may be cached and under which key (``keys``); ``MemoryCache``
and ``RedisCache`` store the entries (``base``: one small interface and the entry format).
A hit is a metered call that costs nothing: it never touches the budget's ledger; a miss is
an ordinary call, enforced as usual, whose successful answer is then stored.
"""

from otel_budget.cache.base import CacheBackend, Entry
from otel_budget.cache.memory import MemoryCache
from otel_budget.cache.response_cache import ResponseCache, as_cache, disabled, is_disabled


def __getattr__(name: str) -> object:
    # RedisCache needs the optional redis-py: imported only when asked for.
    if name == "RedisCache":
        from otel_budget.cache.redis import RedisCache

        return RedisCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CacheBackend",
    "Entry",
    "MemoryCache",
    "RedisCache",
    "ResponseCache",
    "as_cache",
    "disabled",
    "is_disabled",
]
