"""The shared cache backend: one Redis for every process, entries expiring with ``SET PX``.

    >>> from otel_budget.cache import ResponseCache
    >>> from otel_budget.cache.redis import RedisCache
    >>> cache = ResponseCache(RedisCache("redis://127.0.0.1:6379/0"), namespace="svc-a")  # doctest: +SKIP
    >>> BudgetInstrumentor().instrument(max_usd=1, cache=cache)                           # doctest: +SKIP

Install with ``pip install 'otel-budget[redis]'`` (redis-py >= 5). Keys are ``prefix`` plus
the cache key (the namespace, then a blake2b digest: no prompt text in a key). Values are
the entries of ``otel_budget.cache.base``, stored with ``SET key value PX ttl``.

A cache must never slow the app down more than it saves, nor fail it:

* **Short timeouts** (``socket_timeout`` / ``socket_connect_timeout``, 0.1 s each, no
  redis-py retries): a read blocks at most their sum.
* **A broken Redis is a miss.** Any error (refused, timed out, ``WRONGTYPE``, a reply that
  is not bytes) makes the read a miss; it is logged once per kind (``RateLimitedLog``) and
  opens the ledger's circuit breaker (``otel_budget.storage.redis``, here after one
  failure): for ``retry_seconds`` (doubling up to ``max_retry_seconds`` while it keeps
  failing) no command is sent at all, so every call goes straight to the provider, as
  without a cache. Then one command probes while the others still skip Redis; one success
  closes it.
* **Bounded reads:** ``GETRANGE key 0 max_entry_bytes``: an entry larger than the limit is
  never read whole (it is a miss), whatever another process wrote.
* **Writes off the caller's path:** ``set_nowait`` queues the write (bounded: past
  ``max_queue`` it is dropped) for one writer thread; ``flush()`` waits for it (called at
  exit). The ``a`` twins run the blocking call in a worker thread, bounded by the same
  timeouts.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from otel_budget.cache.base import CacheBackend
from otel_budget.logs import RateLimitedLog
from otel_budget.storage.redis import _Breaker

DEFAULT_PREFIX = "otel_budget:cache:"
DEFAULT_TIMEOUT = 0.1
DEFAULT_TTL_SECONDS = 3600.0
DEFAULT_MAX_ENTRY_BYTES = 8 * 1024 * 1024
_LIVE: weakref.WeakSet[RedisCache] = weakref.WeakSet()


def _flush_all() -> None:  # pragma: no cover - at interpreter exit
    for cache in list(_LIVE):
        cache.flush(1.0)


atexit.register(_flush_all)


class RedisCache(CacheBackend):
    """Entries in Redis (``url`` or a ready ``client`` of redis-py, bytes replies)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        prefix: str = DEFAULT_PREFIX,
        ttl_seconds: float | None = DEFAULT_TTL_SECONDS,
        socket_timeout: float = DEFAULT_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_TIMEOUT,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
        max_queue: int = 1024,
        log: RateLimitedLog | None = None,
    ) -> None:
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("RedisCache: ttl_seconds must be > 0 (or None: no expiry)")
        if client is None:
            if url is None:
                raise ValueError("RedisCache: give a url (redis://...) or a client")
            client = self._make_client(url, socket_timeout, socket_connect_timeout)
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.max_entry_bytes = int(max_entry_bytes)
        self.log = log if log is not None else RateLimitedLog()
        self._breaker = _Breaker(1, retry_seconds, max_retry_seconds)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes, float | None] | None] = queue.Queue(max_queue)
        self._writer: threading.Thread | None = None
        self._closed = False
        _LIVE.add(self)

    @staticmethod
    def _make_client(url: str, socket_timeout: float, socket_connect_timeout: float) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        pool = redis.ConnectionPool.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
        )  # fmt: skip
        return redis.Redis(connection_pool=pool)

    # -- one command through the breaker ------------------------------------------------------------
    def _command(self, site: str, command: Callable[[], Any]) -> tuple[bool, Any]:
        """(sent and answered, the reply); never raises."""
        breaker = self._breaker
        if not breaker.allow():
            return False, None
        try:
            reply = command()
        except Exception as exc:
            breaker.failure()
            self.log(f"cache {site}", exc, f"Redis cache unavailable ({exc}); calls go to the provider")
            return False, None
        except BaseException:  # interrupted: free the probe slot
            breaker.abort()
            raise
        breaker.success()
        return True, reply

    # -- operations -------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        ok, value = self._command(
            "get", lambda: self.client.getrange(self.prefix + key, 0, self.max_entry_bytes)
        )
        if not ok:
            return None
        if not isinstance(value, (bytes, bytearray)) or not value:
            return None  # missing (GETRANGE answers b"" for no key), or not bytes
        if len(value) > self.max_entry_bytes:
            return None  # larger than we ever store: not ours to trust
        return bytes(value)

    def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        if len(value) > self.max_entry_bytes:
            return
        ttl = ttl_seconds if ttl_seconds is not None else self.ttl_seconds
        px = None if ttl is None else max(1, int(ttl * 1000))
        self._command("set", lambda: self.client.set(self.prefix + key, value, px=px))

    def delete(self, key: str) -> None:
        self._command("delete", lambda: self.client.delete(self.prefix + key))

    def clear(self, prefix: str = "") -> int:
        """Remove this cache's keys under ``prefix`` (``SCAN`` + ``UNLINK``, in batches)."""
        full = (self.prefix + prefix).encode()
        pattern = _glob_escape(self.prefix + prefix) + "*"

        def unlink_all() -> int:
            removed = 0
            batch: list[Any] = []
            for name in self.client.scan_iter(match=pattern, count=500):
                raw = name.encode() if isinstance(name, str) else bytes(name)
                if b":" in raw[len(full) :]:
                    continue  # another namespace's key
                batch.append(name)
                if len(batch) >= 500:
                    removed += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self.client.unlink(*batch))
            return removed

        _, removed = self._command("clear", unlink_all)
        return int(removed or 0)

    # -- writes off the caller's path ---------------------------------------------------------------
    def set_nowait(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        if self._closed or len(value) > self.max_entry_bytes or self._breaker.is_open:
            return
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_loop, name="otel-budget-cache-writer", daemon=True
                    )
                    self._writer.start()
        try:
            self._queue.put_nowait((key, value, ttl_seconds))
        except queue.Full:
            self.log("cache queue", None, "Redis cache write queue full: a response not cached")

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.set(*item)
            except Exception as exc:  # pragma: no cover - set never raises
                self.log("cache writer", exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    async def aget(self, key: str) -> bytes | None:
        if self._breaker.is_open:
            return None  # (no thread for a command the breaker would not send)
        return await asyncio.to_thread(self.get, key)

    async def aset(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        await asyncio.to_thread(self.set, key, value, ttl_seconds)

    async def adelete(self, key: str) -> None:
        await asyncio.to_thread(self.delete, key)

    async def aclear(self, prefix: str = "") -> int:
        return await asyncio.to_thread(self.clear, prefix)

    def close(self) -> None:
        self.flush(1.0)
        self._closed = True
        if self._writer is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # pragma: no cover
                pass


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


__all__ = ["DEFAULT_PREFIX", "RedisCache"]
