"""``ResponseCache``: which LLM requests are answered from a cache, under which key, where.

    >>> from otel_budget.cache import MemoryCache, ResponseCache
    >>> cache = ResponseCache(MemoryCache(max_entries=512), namespace="svc-a")
    >>> BudgetInstrumentor().instrument(max_usd=1, cache=cache)          # doctest: +SKIP
    >>> with otel_budget.cache.disabled():                               # doctest: +SKIP
    ...     client.chat.completions.create(...)          # this call always goes to the provider
    >>> cache.clear()                                                    # doctest: +SKIP

The instrumentors ask it for a request's key (``key_for``: None when the request may not be
served from a cache, see ``otel_budget.cache.keys``), read and write the raw entries through
its backend, and count nothing themselves: hits, misses and savings are recorded by the
metered call (``otel_budget.instrumentation._cache``).

Isolation: the ``namespace`` prefixes every key (and ``clear()`` removes only its own); the
scope identities named in ``partition_by`` (by default ``tenant``, as set by
``otel_budget.scope(tenant=...)``) are part of every key's digest, so a tenant never reads an
entry another tenant's request stored, even with identical prompts. Cached entries contain
the prompts' answers (and the key digests of the prompts): they live only in the backend the
user chose (this process's memory, or their Redis).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from otel_budget.cache.base import CacheBackend
from otel_budget.cache.keys import Uncacheable, refusal, request_key
from otel_budget.cache.memory import MemoryCache
from otel_budget.context import SCOPE_IDENTITIES

DEFAULT_MAX_ENTRY_BYTES = 8 * 1024 * 1024
_DISABLED: ContextVar[bool] = ContextVar("otel_budget_cache_disabled", default=False)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Calls made inside the block neither read nor write the cache (they are ordinary
    metered calls, without ``otel_budget.cache.hit`` on their span)."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def is_disabled() -> bool:
    return _DISABLED.get()


class ResponseCache:
    """Opt-in response cache of the provider instrumentors (``instrument(cache=...)``).

    ``backend``: a ``MemoryCache`` (default) or ``RedisCache``; ``namespace``: prefixes every
    key; ``ttl_seconds``: per entry (None: the backend's); ``cache_sampled``: also cache
    requests that sample (temperature unset or > 0), which then always get the first answer;
    ``partition_by``: scope identities that partition the cache; ``max_entry_bytes``: larger
    answers are not stored."""

    def __init__(
        self,
        backend: CacheBackend | None = None,
        *,
        namespace: str = "",
        ttl_seconds: float | None = None,
        cache_sampled: bool = False,
        partition_by: Sequence[str] = ("tenant",),
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    ) -> None:
        if (
            not isinstance(namespace, str) or not namespace.isprintable() or len(namespace) > 128
            or ":" in namespace
        ):  # fmt: skip
            raise ValueError(
                "ResponseCache: namespace must be printable text of at most 128 chars, "
                "without ':'"
            )
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ResponseCache: ttl_seconds must be > 0")
        self.backend = backend if backend is not None else MemoryCache()
        self.namespace = namespace
        self.prefix = f"{namespace}:" if namespace else ""
        self.ttl_seconds = ttl_seconds
        self.cache_sampled = bool(cache_sampled)
        self.partition_by = tuple(partition_by)
        self.max_entry_bytes = int(max_entry_bytes)

    def key_for(
        self, provider: str, kind: str, params: Mapping[str, Any], server: str | None = None,
        port: int | None = None,
    ) -> str | None:  # fmt: skip
        """The backend key of a request, or None when it must go to the provider."""
        if _DISABLED.get() or refusal(params, kind, self.cache_sampled) is not None:
            return None
        identities = SCOPE_IDENTITIES.get()
        identity = {
            "provider": provider, "kind": kind, "server": server, "port": port,
            "namespace": self.namespace,
            "partition": {name: identities.get(name) for name in self.partition_by},
        }  # fmt: skip
        try:
            return self.prefix + request_key(identity, params)
        except Uncacheable:
            return None

    def clear(self) -> int:
        """Remove every entry of this cache's namespace (and of no other: a key of the
        namespace is its prefix then a digest, another's has another ``:``); returns how
        many were removed."""
        return self.backend.clear(self.prefix)

    async def aclear(self) -> int:
        return await self.backend.aclear(self.prefix)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the entries queued for storing are stored."""
        return self.backend.flush(timeout)

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return (
            f"ResponseCache({type(self.backend).__name__}, namespace={self.namespace!r}, "
            f"cache_sampled={self.cache_sampled})"
        )


def as_cache(value: Any) -> ResponseCache | None:
    """What ``instrument(cache=...)`` accepts: a ``ResponseCache``, a backend (wrapped with
    the defaults), True (an in-memory cache with the defaults), or None/False (no cache)."""
    if value is None or value is False:
        return None
    if value is True:
        return ResponseCache()
    if isinstance(value, ResponseCache):
        return value
    if isinstance(value, CacheBackend):
        return ResponseCache(value)
    raise TypeError(
        f"cache must be a ResponseCache, a cache backend, True or None, not {type(value).__name__}"
    )


__all__ = ["ResponseCache", "as_cache", "disabled", "is_disabled"]
