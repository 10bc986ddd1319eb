"""RedisStorage's asyncio reserve on a real redis-server: a coroutine on the caller's loop.

* no worker thread: ``areserve_up_to`` never calls ``asyncio.to_thread``;
* one storage used from several event loops in several threads at once, and from blocking
  calls beside them: each loop has its own connections, the hard cap holds, the ledger
  equals what was committed; a loop's connections close when ``asyncio.run`` ends;
* a reserve cancelled while its script may already have run is released (a tombstone
  against a late arrival), not held until its lease deadline;
* 4 processes x 8 coroutines on one trace budget: never above it (sampled from outside),
  the ledger equals what was committed to the nano-dollar;
* Redis frozen or killed mid-run: the reserve fails within the same bound as the blocking
  one (``LedgerUnavailableError``: the failure policy decides), the fallback ledger takes
  over when configured, and service resumes when Redis is back; a restarted server's
  forgotten scripts are loaded again (NOSCRIPT);
* a loop too busy to read a reply in time does not turn a fast Redis into a timeout.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis")

from otel_budget.storage import MemoryStorage, ReserveStatus, ScopeLimit  # noqa: E402
from otel_budget.storage.redis import LedgerUnavailableError, RedisStorage  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

USD = 1_000_000_000


def unique_prefix() -> str:
    return f"otbaio:{uuid.uuid4().hex[:12]}:"



@pytest.fixture(autouse=True)
def _journal_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BUDGET_JOURNAL_DIR", str(tmp_path / "journal"))


def test_an_async_reserve_runs_on_the_loop_without_a_thread(
    private_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStorage(private_server.url, prefix=unique_prefix())
    cap = ScopeLimit("user:aio", 10 * USD)

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async reserve hopped to a thread")

    async def main() -> list[Any]:
        monkeypatch.setattr(asyncio, "to_thread", no_thread)
        try:
            results = [await store.areserve_up_to(1, [cap], USD, 2 * USD)]
            results.append(await store.areserve(2, [cap], USD))
            results.append(await store.areserve(1, [cap], USD))  # the same lease again
            results.append(await store.areserve(3, [cap], 20 * USD))
            results.append(await store.acommit(1, USD))
            return results
        finally:
            monkeypatch.undo()

    try:
        first, second, again, denied, committed = asyncio.run(main())
        assert (first.status, first.granted) == (ReserveStatus.OK, 2 * USD)
        assert (second.status, second.granted) == (ReserveStatus.OK, USD)
        assert (again.status, again.granted) == (ReserveStatus.DUPLICATE, 2 * USD)
        assert denied.status is ReserveStatus.DENIED and denied.denied.reserved == 3 * USD
        assert committed.reserved == 2 * USD
        assert store.usage(cap.key) == (cap.key, 10 * USD, USD, USD)
    finally:
        store.close()


def test_many_loops_and_threads_share_one_storage_and_the_cap_holds(
    private_server: RedisServer,
) -> None:
    store = RedisStorage(  # a loaded 2-core host: timing is not what this test checks
        private_server.url, prefix=unique_prefix(), socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )  # fmt: skip
    limit = 3 * USD
    scopes = [ScopeLimit("t:hot", limit, True, 3600.0), ScopeLimit("user:x", limit + 1)]
    granted: list[int] = []
    loops: set[int] = set()
    errors: list[BaseException] = []
    lock = threading.Lock()

    async def agent(worker: int, task: int) -> None:
        for turn in range(15):
            lease = (worker, task, turn)
            result = await store.areserve_up_to(lease, scopes, USD // 100, USD // 10)
            if result.ok:
                amount = result.granted * (turn % 3) // 2  # 0, half, all of the grant
                await store.acommit(lease, amount)
                with lock:
                    granted.append(amount)

    async def worker(index: int) -> None:
        loops.add(id(asyncio.get_running_loop()))
        await asyncio.gather(*(agent(index, t) for t in range(20)))

    def thread_main(index: int) -> None:
        try:
            asyncio.run(worker(index))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def blocking(index: int) -> None:  # blocking calls on the same storage meanwhile
        for turn in range(100):
            lease = ("sync", index, turn)
            if store.reserve_up_to(lease, scopes, USD // 100, USD // 10).ok:
                store.commit(lease, USD // 200)
                with lock:
                    granted.append(USD // 200)

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=blocking, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        assert len(loops) == 4
        assert store.flush()
        usage = store.usage("t:hot")
        assert usage.reserved == 0
        assert usage.spent == sum(granted) <= limit  # to the nano-dollar, under the cap
        assert 0 < len(granted) < 4 * 20 * 15 + 200  # the budget did refuse calls
        aconns = store._aconns
        assert aconns is not None
        opened = [c for pool in list(aconns._pools.values()) for c in pool.open]
        assert all(not c.is_connected for c in opened)  # closed when each loop ended
    finally:
        store.close()


def test_a_cancelled_reserve_is_released_not_held_until_its_deadline(
    private_server: RedisServer,
) -> None:
    store = RedisStorage(
        private_server.url, prefix=unique_prefix(), socket_timeout=5.0, breaker_failures=1000
    )
    cap = ScopeLimit("user:cancel", 10 * USD)
    try:
        assert store.reserve("warm", [cap], 1).ok  # scripts loaded, a connection open
        store.release("warm")

        async def main() -> None:
            await store.areserve("warm-aio", [cap], 1)  # this loop's connection is open
            await store.arelease("warm-aio")
            private_server.freeze()  # the script is sent; Redis runs it only once thawed
            task = asyncio.ensure_future(store.areserve("lost", [cap], 4 * USD))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            private_server.thaw()  # well within the socket timeout: the script runs now

        asyncio.run(main())
        assert store.flush(10.0)
        usage = store.usage(cap.key)
        assert usage.reserved == 0 and usage.spent == 0  # the ghost reservation was released
        assert store.stats["ghosts_released"] == 1
        # The tombstone: the same lease arriving late reserves nothing.
        assert store.reserve("lost", [cap], 4 * USD).status is ReserveStatus.DUPLICATE
        assert store.usage(cap.key).reserved == 0
    finally:
        private_server.thaw()
        store.close()


@pytest.mark.parametrize("fallback", [False, True])
def test_redis_killed_mid_run_follows_the_policy_and_service_resumes(
    private_server: RedisServer, fallback: bool
) -> None:
    store = RedisStorage(
        private_server.url, prefix=unique_prefix(),
        fallback=MemoryStorage() if fallback else None,
    )  # fmt: skip
    cap = ScopeLimit("user:outage", 100 * USD)

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        assert (await store.areserve("before", [cap], USD)).ok
        private_server.freeze()
        start = time.monotonic()
        try:
            out["frozen"] = await store.areserve("frozen", [cap], USD)
        except LedgerUnavailableError as exc:
            out["frozen"] = exc
        out["frozen_s"] = time.monotonic() - start
        private_server.kill()
        try:
            out["killed"] = await store.areserve("killed", [cap], USD)
        except LedgerUnavailableError as exc:
            out["killed"] = exc
        private_server.start()  # empty: the scripts are gone (NOSCRIPT)
        deadline = time.monotonic() + 10
        while True:
            try:
                out["after"] = await store.areserve("after", [cap], USD)
                break
            except LedgerUnavailableError:
                assert time.monotonic() < deadline, "service did not resume"
                await asyncio.sleep(0.05)
        return out

    try:
        out = asyncio.run(main())
        # Blocked no longer than the blocking client's bound (2 attempts x 0.1 s) and some
        # scheduling; the circuit breaker then fails fast.
        assert out["frozen_s"] < store.max_block_seconds + 0.3
        if fallback:
            assert out["frozen"].ok and out["killed"].ok  # the local ledger took over
        else:
            assert isinstance(out["frozen"], LedgerUnavailableError)
            assert isinstance(out["killed"], LedgerUnavailableError)
        assert out["after"].ok
        if not fallback:  # from the restarted (empty) Redis; else maybe the local ledger
            assert store.usage(cap.key).reserved == USD
    finally:
        store.close()


def test_a_busy_loop_reading_a_reply_late_is_not_a_timeout(
    private_server: RedisServer,
) -> None:
    store = RedisStorage(private_server.url, prefix=unique_prefix())  # 50 ms timeouts
    cap = ScopeLimit("user:busy", 1000 * USD)

    async def hog() -> None:
        for _ in range(30):
            time.sleep(0.07)  # each loop iteration takes longer than the socket timeout
            await asyncio.sleep(0)

    async def main() -> list[Any]:
        hogs = [asyncio.ensure_future(hog()) for _ in range(2)]
        results = await asyncio.gather(*(store.areserve(i, [cap], USD) for i in range(30)))
        await asyncio.gather(*hogs)
        return results

    try:
        results = asyncio.run(main())
        assert all(r.ok for r in results)
        assert store.stats["failures"] == 0
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connections(private_server: RedisServer) -> None:
    store = RedisStorage(private_server.url, prefix=unique_prefix())
    cap = ScopeLimit("user:fork", 100 * USD)
    loop = asyncio.new_event_loop()  # the same loop object on both sides of the fork
    try:
        assert loop.run_until_complete(store.areserve("parent-1", [cap], USD)).ok
        aconns = store._aconns
        assert aconns is not None
        parent_conns = list(aconns._pools[loop].open)
        pid = os.fork()
        if pid == 0:  # the child: never the parent's sockets, and its reserve counts
            code = 1
            try:
                result = loop.run_until_complete(store.areserve("child", [cap], USD))
                mine = list(aconns._pools[loop].open)
                code = 0 if result.ok and not set(mine) & set(parent_conns) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's connection still works (the child did not close or read from it).
        assert loop.run_until_complete(store.areserve("parent-2", [cap], USD)).ok
        assert list(aconns._pools[loop].open) == parent_conns
        assert store.usage(cap.key).reserved == 3 * USD
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        store.close()


def async_contention_worker(
    url: str, prefix: str, index: int, tasks: int, rounds: int, limit: int
) -> tuple[int, int]:
    """``tests.helpers.hammer``'s client, on asyncio: ``tasks`` coroutines of one loop
    reserve random amounts on one hot trace (plus a daily cap) through ``areserve``, release
    10 % and commit the rest twice; returns (admitted, nano-USD committed)."""
    import random

    store = RedisStorage(url, prefix=prefix, socket_timeout=2.0, socket_connect_timeout=2.0,
                         breaker_failures=1000)  # fmt: skip
    scopes = [
        ScopeLimit("t:hot", limit, True, 3600.0),
        ScopeLimit("user:x@d20261203", limit + 1, False, 2 * 86400.0),
    ]

    async def client(task: int) -> tuple[int, int]:
        rng = random.Random(index * 1000 + task)
        admitted = committed = 0
        for n in range(rounds):
            lease = (index << 48) | (task << 32) | n
            amount = rng.randint(1, 20_000_000)
            if (await store.areserve(lease, scopes, amount)).ok:
                admitted += 1
                if rng.random() < 0.1:
                    await store.arelease(lease)
                else:
                    actual = rng.randint(0, amount)
                    await store.acommit(lease, actual)
                    await store.acommit(lease, actual)
                    committed += actual
        return admitted, committed

    async def main() -> list[tuple[int, int]]:
        return await asyncio.gather(*(client(t) for t in range(tasks)))

    try:
        results = asyncio.run(main())
        # The reserves went through the loop's own connections (not a worker thread).
        assert store._aconns is not None and store._aconns.loops == 1
    finally:
        store.close()
    return sum(r[0] for r in results), sum(r[1] for r in results)


def test_four_processes_by_eight_async_tasks_never_exceed_one_trace_budget(
    private_server: RedisServer,
) -> None:
    import multiprocessing

    prefix = unique_prefix()
    limit = 3 * USD
    store = RedisStorage(private_server.url, prefix=prefix, socket_timeout=1.0,
                         socket_connect_timeout=1.0)  # fmt: skip
    key = store.scope_key("t:hot")
    samples: list[tuple[int, ...]] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            values = store.client.hmget(key, "limit", "spent", "reserved")  # atomic snapshot
            if values[0] is not None:
                samples.append(tuple(int(v) for v in values))
            time.sleep(0.0005)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            results = pool.starmap(
                async_contention_worker,
                [(private_server.url, prefix, i, 8, 60, limit) for i in range(4)],
            )
    finally:
        stop.set()
        watcher.join()
    try:
        admitted = sum(r[0] for r in results)
        committed = sum(r[1] for r in results)
        usage = store.usage("t:hot")
        assert len(samples) > 50
        assert not [s for s in samples if s[1] + s[2] > s[0]]
        assert usage is not None and usage.reserved == 0
        assert usage.spent == committed <= limit  # to the nano-dollar
        assert 0 < admitted < 4 * 8 * 60  # the budget did refuse calls
    finally:
        store.close()
