"""Instructions per metered call's Redis ledger work in the calling thread (deterministic).

    bash bench/instr_count_redis.sh          # runs this under valgrind --tool=callgrind

A real ``redis-server`` on a free 127.0.0.1 port (started before counting), one
``RedisStorage``, sequential calls on two scopes (a trace and a user's daily cap, as in
``bench_redis.py``'s ``trace+cap``). Modes: ``queued`` (the reserve's round trip, then the
commit journaled and queued: what the caller pays; the writer thread, held back here, sends
the batches later and is not counted), ``async`` (the same from a coroutine: the reserve on
the event loop's own connection) and ``sync`` (the commit's own round trip as well).
The server's work is in another process and is not counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.redis_server

from otel_budget.storage import ScopeLimit  # noqa: E402
from otel_budget.storage.redis import RedisStorage  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def main(mode: str, calls: int) -> None:
    server = RedisServer().start()
    store = RedisStorage(
        server.url, prefix=f"otbcount:{time.time()}:", settle_async=mode != "sync",
        settle_interval_seconds=3600.0, settle_batch=10**9,
        journal_dir=tempfile.mkdtemp(prefix="otb-count-jnl-"),
    )  # fmt: skip
    scopes = (
        ScopeLimit("t:shared", 10**15, True, 3600.0),
        ScopeLimit("user:u0@d20261203", 10**15, False, 2 * 86400.0),
    )

    def call(lease: int) -> None:
        store.reserve(lease, scopes, 1_000_000)
        store.commit(lease, 700_000)

    async def acall(lease: int) -> None:
        await store.areserve_up_to(lease, scopes, 1_000_000, 1_000_000)
        await store.acommit(lease, 700_000)

    async def calls_async() -> None:
        for lease in range(1, 300):
            await acall(lease)
        print("ready", flush=True)
        sys.stdin.readline()  # (blocks the loop too: nothing else runs on it)
        for lease in range(1000, 1000 + calls):
            await acall(lease)

    if mode == "async":
        asyncio.run(calls_async())
    else:
        for lease in range(1, 300):  # warm-up: connection, script load, caches
            call(lease)
        print("ready", flush=True)
        sys.stdin.readline()  # blocks (no instructions) while the driver switches callgrind on
        for lease in range(1000, 1000 + calls):
            call(lease)
    if server.pid is not None:
        os.kill(server.pid, signal.SIGKILL)  # (one syscall: its cleanup would be counted)
    os._exit(0)  # skip shutdown: its work is not per call


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
