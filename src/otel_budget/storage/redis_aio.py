"""``redis.asyncio`` connections per event loop, for ``RedisStorage``'s coroutine methods.

    >>> conns = LoopConnections("redis://127.0.0.1:6379/0", 0.05, 0.05)  # doctest: +SKIP
    >>> reply = await conns.evalsha(sha, source, keys, args)             # doctest: +SKIP
    >>> conns.close()                                                     # doctest: +SKIP

A script call from a coroutine runs on the caller's event loop: no worker thread, no GIL
handoff, no executor queue (``asyncio.to_thread`` per reserve cost a thread hop and, under
load, a wait for the GIL behind the busy loop). A connection of ``redis.asyncio`` belongs to
the loop that opened it, so each running loop has its own free list (looked up by the
running loop, weakly: a loop that goes away takes its entry with it; a forked child starts
afresh). A connection serves one command at a time: taken from the loop's free list (or
opened), given back when the whole reply was read; one that failed or was cancelled while a
reply could still be on its way is closed, never reused. At most ``max_connections`` (128)
per loop are in use at once (a burst of 10,000 tasks does not open 10,000 connections: the
others wait on the loop for a free one) and kept open between calls. A loop's connections
are closed when it shuts down (``asyncio.run`` closes them through an async generator the
loop finalises) or at ``close()``.

The same timeouts as the blocking client (``socket_timeout``, ``socket_connect_timeout``;
no retries of redis-py's own: ``RedisStorage`` retries and runs the circuit breaker),
measured in Redis' time rather than the loop's (``_Deadline``: a loop too busy to read a
reply in time does not turn it into a timeout; at most 5 s then), the
same ``EVALSHA`` with a ``SCRIPT LOAD`` on ``NOSCRIPT`` (a restarted server forgot the
script), the same single retry on a fresh connection when a kept one was closed by the
server while idle.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import weakref
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import redis.asyncio as _aredis
from redis.asyncio.retry import Retry as _ARetry
from redis.backoff import NoBackoff as _NoBackoff
from redis.exceptions import ConnectionError as _ConnectionError
from redis.exceptions import NoScriptError as _NoScriptError
from redis.exceptions import ResponseError as _ResponseError
from redis.exceptions import TimeoutError as _TimeoutError

try:  # optional, with the extra: redis-py's own packing checks every argument in Python
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - redis-py's packer then
    _hiredis_pack = None  # type: ignore[assignment]


class _LoopPool:
    """One event loop's connections."""

    __slots__ = ("__weakref__", "closed", "free", "limit", "loop", "open", "pid", "watcher")

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int) -> None:
        self.loop = loop
        self.limit = asyncio.Semaphore(size)  # connections in use at once
        self.pid = os.getpid()
        self.free: list[Any] = []
        self.open: weakref.WeakSet[Any] = weakref.WeakSet()  # to close them at close()
        self.closed = False
        self.watcher: AsyncGenerator[None, None] | None = None

    def close_all(self) -> None:
        """Close every connection now (in the loop's thread, the loop not yet closed)."""
        self.closed = True
        self.free.clear()
        for conn in list(self.open):
            _close_now(conn)


async def _watch(pool: _LoopPool) -> AsyncGenerator[None, None]:
    """Closes the pool's connections when its loop shuts down: once iterated, the loop
    tracks this generator and ``loop.shutdown_asyncgens()`` (``asyncio.run`` and
    ``asyncio.Runner`` call it before closing the loop) closes it, in the loop."""
    try:
        yield
    finally:
        pool.close_all()


class LoopConnections:
    """``redis.asyncio`` connections to one Redis, kept per running event loop."""

    def __init__(
        self,
        url: str,
        socket_timeout: float,
        socket_connect_timeout: float,
        *,
        max_connections: int = 128,
    ) -> None:
        # Only its ``make_connection`` is used (the URL's host, port, db, auth, TLS): a
        # connection binds to a loop when it connects, so one factory serves every loop.
        # redis-py's own timeouts are off: they measure the loop's time, and a busy loop that
        # reads a reply late is not a late Redis (see _Deadline, which bounds every call).
        self.socket_timeout = float(socket_timeout)
        self.socket_connect_timeout = float(socket_connect_timeout)
        self._factory = _aredis.ConnectionPool.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=None,
            retry=_ARetry(_NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=True,
        )
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.max_connections = int(max_connections)
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopPool] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self.closed = False

    def _pool(self) -> _LoopPool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None or pool.pid != os.getpid() or pool.closed:
            with self._lock:
                pool = self._pools.get(loop)
                if pool is None or pool.pid != os.getpid() or pool.closed:
                    # A forked child never touches its parent's sockets: a fresh list.
                    pool = _LoopPool(loop, self.max_connections)
                    self._pools[loop] = pool
        return pool

    @property
    def loops(self) -> int:
        """Event loops with connections kept (for tests and stats)."""
        return len(self._pools)

    async def evalsha(
        self, sha: str, source: str, keys: Sequence[str], args: Sequence[Any],
        packed: bytes | None = None,
    ) -> Any:  # fmt: skip
        """``EVALSHA sha keys args`` on one of this loop's connections; ``SCRIPT LOAD
        source`` and once more on ``NOSCRIPT``. Raises redis-py's ``ConnectionError`` /
        ``TimeoutError`` (the connection is then closed) and ``ResponseError``.
        ``packed``: the whole ``EVALSHA`` in RESP already (``keys`` and ``args`` unused)."""
        if self.closed:
            raise _ConnectionError("the storage is closed")
        pool = self._pool()
        if pool.watcher is None:
            pool.watcher = _watch(pool)  # held here: the loop keeps it weakly
            await pool.watcher.__anext__()
        command: Any = packed if packed is not None else ("EVALSHA", sha, len(keys), *keys, *args)
        async with pool.limit:  # a call beyond max_connections waits for a free one
            return await self._evalsha(pool, command, source)

    async def _evalsha(self, pool: _LoopPool, command: Any, source: str) -> Any:
        for reused in (True, False):
            fresh = not pool.free or not reused
            conn = self._factory.make_connection() if fresh else pool.free.pop()  # type: ignore[no-untyped-call]
            if fresh:
                pool.open.add(conn)
            timeout = self.socket_timeout
            if not conn.is_connected:
                timeout += self.socket_connect_timeout
            deadline = _Deadline(conn, timeout)
            try:
                try:
                    try:
                        reply = await self._roundtrip(conn, command)
                    except _NoScriptError:  # a restarted server forgot it
                        await self._roundtrip(conn, ("SCRIPT", "LOAD", source))
                        reply = await self._roundtrip(conn, command)
                except asyncio.CancelledError:
                    if deadline.expired():  # ours, not the caller's: Redis did not answer
                        raise _TimeoutError(
                            f"Redis did not answer within {timeout:.3f}s"
                        ) from None
                    raise
                finally:
                    deadline.cancel()
            except _ResponseError:
                self._give_back(pool, conn)  # the whole reply was read: the connection is fine
                raise
            except _ConnectionError:
                await self._discard(conn)
                if not fresh:
                    # Closed by the server while idle (a restart): once more on a new
                    # connection, at once (every script call is idempotent).
                    continue
                raise
            except BaseException:
                # A timeout or a cancellation: a reply may still be on its way.
                await self._discard(conn)
                raise
            self._give_back(pool, conn)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _roundtrip(conn: Any, command: tuple[Any, ...] | bytes) -> Any:
        """One command (a tuple of arguments, or packed in RESP already) and its reply."""
        if isinstance(command, bytes):
            packed = [command]
        elif _hiredis_pack is not None:
            packed = [_hiredis_pack(command)]
        else:  # pragma: no cover - without hiredis
            packed = conn.pack_command(*command)
        await conn.send_packed_command(packed, check_health=False)
        return await conn.read_response()

    def _give_back(self, pool: _LoopPool, conn: Any) -> None:
        if not (self.closed or pool.closed) and conn.is_connected:
            pool.free.append(conn)
        else:
            _close_now(conn)

    @staticmethod
    async def _discard(conn: Any) -> None:
        try:
            await conn.disconnect(nowait=True)
        except BaseException:  # closing a broken socket; a second cancellation
            _close_now(conn)

    def close(self) -> None:
        """Close every loop's connections (those of a loop that has already closed go with
        it: their transports cannot be closed without it)."""
        self.closed = True
        with self._lock:
            pools = list(self._pools.values())
            self._pools = weakref.WeakKeyDictionary()
        for pool in pools:
            loop = pool.loop
            if loop.is_closed() or pool.pid != os.getpid() or pool.closed:
                continue
            try:
                if _running_loop() is loop or not loop.is_running():
                    _finish(pool)
                else:
                    loop.call_soon_threadsafe(_finish, pool)
            except RuntimeError:  # the loop closed meanwhile
                pass


def _finish(pool: _LoopPool) -> None:
    """Close the pool's connections and its watcher (in the loop's thread): a watcher left
    open would ask its closed loop to finalise it when collected."""
    watcher, pool.watcher = pool.watcher, None
    if watcher is not None:
        try:
            watcher.aclose().send(None)  # runs its ``finally`` (no await in it) at once
        except StopIteration:
            pass
        except Exception:  # pragma: no cover - already running or closed
            pass
    pool.close_all()


class _Deadline:
    """Bounds one call by ``timeout`` of Redis' time, not of a busy loop's.

    A plain ``asyncio`` timeout fires when the loop gets round to it: on a loop busy with a
    thousand tasks that is long after a reply that came back in 100 us, and the timer wins
    over the reply read in the same iteration. So when the timer fires it checks, one
    iteration later (after the callbacks that a reply read in this iteration scheduled):
    if the connection has bytes waiting (Redis answered; the loop has not read them yet), or
    the loop was busy (the timer, or this check, ran more than half the timeout late: the
    wait says nothing about Redis), it waits another ``timeout``. Otherwise it cancels the
    call, which ``expired()`` tells apart from a cancellation by the caller. On a busy loop
    ``hard_cap`` (5 s, or 4 timeouts) bounds the wait for a Redis that does not answer (on
    such a loop every await takes that long; the loop itself is never blocked)."""

    __slots__ = (
        "conn", "fired", "handle", "hard_at", "late", "loop", "task", "timed_out", "timeout",
    )  # fmt: skip

    def __init__(self, conn: Any, timeout: float, hard_cap: float = 5.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.conn = conn
        self.timeout = timeout
        self.hard_at = self.loop.time() + max(hard_cap, 4 * timeout)
        self.timed_out = False
        self.late = self.fired = 0.0
        self.handle: asyncio.Handle = self.loop.call_later(timeout, self._fire)

    def _fire(self) -> None:
        assert isinstance(self.handle, asyncio.TimerHandle)
        self.late = self.loop.time() - self.handle.when()
        self.fired = self.loop.time()
        self.handle = self.loop.call_soon(self._check)

    def _check(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        now = self.loop.time()
        # Busy: the timer ran late, or this check (one iteration later) did.
        busy = max(self.late, now - self.fired) > self.timeout / 2
        if _has_bytes(self.conn) or (busy and now < self.hard_at):
            self.handle = self.loop.call_later(self.timeout, self._fire)  # not Redis' delay
            return
        self.timed_out = True
        task.cancel()

    def expired(self) -> bool:
        """True if this deadline cancelled the call (and no one else did)."""
        if not self.timed_out:
            return False
        task = self.task
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        return uncancel is None or uncancel() == 0

    def cancel(self) -> None:
        self.handle.cancel()


def _has_bytes(conn: Any) -> bool:
    """True if the connection's socket has bytes to read (a reply the loop has not read)."""
    writer = getattr(conn, "_writer", None)
    if writer is None:
        return False
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return bool(select.select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _close_now(conn: Any) -> None:
    """Close a connection without awaiting (what redis-py's own finaliser does)."""
    try:
        conn._close()
    except Exception:  # pragma: no cover - a dead transport
        pass


__all__ = ["LoopConnections"]
