"""The in-process cache backend: bounded by entries and bytes, with a TTL, least recently
used first out.

    >>> from otel_budget.cache.memory import MemoryCache
    >>> now = [0.0]
    >>> cache = MemoryCache(max_entries=2, max_bytes=1024, ttl_seconds=10, clock=lambda: now[0])
    >>> cache.set("a", b"1"); cache.set("b", b"2"); cache.get("a")
    b'1'
    >>> cache.set("c", b"3")           # "b" was used least recently: evicted
    >>> cache.get("b") is None
    True
    >>> now[0] = 11.0; cache.get("a") is None    # expired
    True

Thread-safe (one short lock per operation); never waits on anything, so its ``a`` twins are
the blocking methods. What it holds lives in this process only and is gone when it exits.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from otel_budget.cache.base import CacheBackend

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TTL_SECONDS = 3600.0


class MemoryCache(CacheBackend):
    """Entries in an LRU ``OrderedDict``; expired ones are dropped when read or evicted."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_seconds: float | None = DEFAULT_TTL_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("MemoryCache: max_entries and max_bytes must be >= 1")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("MemoryCache: ttl_seconds must be > 0 (or None: no expiry)")
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.bytes = 0
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> bytes | None:
        now = self.clock()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[1] <= now:
                self._drop(key)
                return None
            self._data.move_to_end(key)
            return item[0]

    def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        size = len(value)
        if size > self.max_bytes:
            return  # larger than the whole cache: not stored
        ttl = ttl_seconds if ttl_seconds is not None else self.ttl_seconds
        expires = self.clock() + ttl if ttl is not None else float("inf")
        with self._lock:
            if key in self._data:
                self._drop(key)
            self._data[key] = (bytes(value), expires)
            self.bytes += size
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                self._drop(next(iter(self._data)))

    def _drop(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self.bytes -= len(value)

    def delete(self, key: str) -> None:
        with self._lock:
            if key in self._data:
                self._drop(key)

    def clear(self, prefix: str = "") -> int:
        with self._lock:
            keys = [k for k in self._data if k.startswith(prefix) and ":" not in k[len(prefix) :]]
            for key in keys:
                self._drop(key)
            return len(keys)


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "DEFAULT_TTL_SECONDS", "MemoryCache"]
