"""RedisStorage settles off the critical path: one command per metered call (counted by the
server), reservations held until their queued commit lands, overshoot and charges sent at
once, the queue drained at exit and replayed from the journal after a SIGKILL, and the
asyncio settles queued without a thread.

A real ``redis-server`` on a free 127.0.0.1 port (tests/redis_server.py); skipped with a
clear reason when the binary is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from otel_budget import ScopeRule, scope  # noqa: E402
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor  # noqa: E402
from otel_budget.storage import CommitStatus, ReserveStatus, ScopeLimit  # noqa: E402
from otel_budget.storage.journal import _read_pending  # noqa: E402
from otel_budget.storage.redis import RedisStorage  # noqa: E402
from otel_budget.testing import FakeLLMServer  # noqa: E402
from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer  # noqa: E402

USD = 1_000_000_000
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


def unique_prefix() -> str:
    return f"otbasync:{uuid.uuid4().hex[:12]}:"


class Monitor:
    """The commands clients send to the server, from ``MONITOR`` on a raw socket (``INFO
    commandstats`` also counts the commands scripts run, which MONITOR marks ``[0 lua]``)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.buffer = b""
        assert self._line() == "+OK"

    def _line(self) -> str:
        while b"\r\n" not in self.buffer:
            self.buffer += self.sock.recv(65536)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode(errors="replace")

    def commands_until(self, marker: str) -> list[str]:
        """Client commands seen until one whose arguments include ``marker``."""
        seen = []
        while True:
            line = self._line()
            if marker in line:
                return seen
            if "[0 lua]" not in line:
                seen.append(line.split("] ", 1)[1].split(" ", 1)[0].strip('"').upper())

    def close(self) -> None:
        self.sock.close()


def test_a_metered_openai_call_sends_one_command_on_its_critical_path(
    server: RedisServer, make_processor: Any, tracer: Any
) -> None:
    storage = RedisStorage(server.url, prefix=unique_prefix(), settle_interval_seconds=30.0)
    make_processor(
        max_usd=5, scopes=[ScopeRule("user", 2, window="day")], storage=storage
    )
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    try:
        with FakeLLMServer() as llm:
            client = openai.OpenAI(base_url=llm.openai_base_url, api_key="x", max_retries=0)

            def call() -> None:
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                    max_tokens=50,
                )  # fmt: skip

            with scope(user="alice"), tracer.start_as_current_span("agent run"):
                call()  # the first call loads the scripts
                assert storage.flush(timeout=5)
                monitor = Monitor(server.port)
                try:
                    # The test's own marker connection first (its HELLO is not the call's).
                    storage.client.echo("start")
                    monitor.commands_until("start")
                    call()
                    storage.client.echo("returned")
                    on_path = monitor.commands_until("returned")
                    assert storage.stats["queued"] == 2 and storage.stats["batches"] == 1
                    assert storage.flush(timeout=5)
                    storage.client.echo("flushed")
                    after = monitor.commands_until("flushed")
                finally:
                    monitor.close()
            client.close()
    finally:
        instrumentor.uninstrument()
    # The reserve (one EVALSHA: trace + user day scopes, kill switches, sweep) and nothing
    # else before the call returned; its commit went later, in the writer's pipeline.
    assert on_path == ["EVALSHA"], on_path
    assert [c for c in after if c != "HELLO"] == ["EVALSHA"], after  # (HELLO: a connection)
    usage = storage.usage(f"user:alice@d{time.strftime('%Y%m%d', time.gmtime())}")
    assert usage is not None and usage.reserved == 0 and usage.spent > 0


def test_a_queued_commit_holds_its_reservation_until_it_lands(server: RedisServer) -> None:
    prefix = unique_prefix()
    mine = RedisStorage(server.url, prefix=prefix, settle_interval_seconds=30.0)
    other = RedisStorage(server.url, prefix=prefix, settle_async=False)
    cap = ScopeLimit("user:held", 10 * USD)
    try:
        assert mine.reserve(1, [cap], 6 * USD).ok
        result = mine.commit(1, 2 * USD)  # queued: the writer waits 30 s
        assert result.status is CommitStatus.OK and result.reserved == 6 * USD
        assert result.scopes == (("user:held", 10 * USD, 2 * USD, 0),)  # as this instance sees
        # Another process still sees the whole reservation held, never room already spent.
        seen = other.client.hmget(other.scope_key(cap.key), "spent", "reserved")
        assert seen == ["0", str(6 * USD)]
        assert other.reserve(2, [cap], 5 * USD).status is ReserveStatus.DENIED
        # This instance's own denial waits for its queue: read-your-writes.
        assert mine.reserve(3, [cap], 5 * USD).ok
        assert other.usage(cap.key) == (cap.key, 10 * USD, 2 * USD, 5 * USD)
        # Spend above the reservation is never queued (it would be invisible): sent at once.
        assert mine.reserve(4, [cap], USD).ok
        assert mine.commit(4, 2 * USD).overshoot == USD
        assert other.usage(cap.key) == (cap.key, 10 * USD, 4 * USD, 5 * USD)
        # A second commit is a duplicate, decided locally, counted nowhere.
        assert mine.commit(1, 2 * USD).status is CommitStatus.DUPLICATE
        assert mine.release(3).status is CommitStatus.RELEASED
        assert mine.flush(timeout=5)
        assert other.usage(cap.key) == (cap.key, 10 * USD, 4 * USD, 0)
    finally:
        mine.close()
        other.close()


def test_a_commit_is_visible_to_another_process_within_the_bound(server: RedisServer) -> None:
    prefix = unique_prefix()
    mine = RedisStorage(server.url, prefix=prefix)  # the default interval (2 ms)
    other = RedisStorage(server.url, prefix=prefix, settle_async=False)
    key = other.scope_key("user:seen")
    waits = []
    try:
        for lease in range(1, 21):
            assert mine.reserve(lease, [ScopeLimit("user:seen", 100 * USD)], USD).ok
            start = time.perf_counter()
            mine.commit(lease, 1)
            while int(other.client.hget(key, "spent") or 0) < lease:
                assert time.perf_counter() - start < 2.0, "a queued commit did not land"
            waits.append(time.perf_counter() - start)
    finally:
        mine.close()
        other.close()
    waits.sort()
    # Loopback, a loaded 2-core machine: the bench measures it (p50 ~ interval + one pipeline).
    assert waits[len(waits) // 2] < 0.1, waits


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_queued_commits_survive_the_process_ending(
    server: RedisServer, tmp_path: Path, how: str
) -> None:
    prefix = unique_prefix()
    journal = tmp_path / "journal"
    code = (
        "from tests.redis_server import settle_then_exit_worker as w; "
        f"w({server.url!r}, {prefix!r}, {str(journal)!r}, 20, {USD}, 300_000_000, {how!r})"
    )
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT}")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, timeout=60,
                          capture_output=True)  # fmt: skip
    store = RedisStorage(server.url, prefix=prefix, settle_async=False,
                         durable_journal=False)  # fmt: skip
    try:
        usage = store.usage("user:crash")
        if how == "exit":  # drained by the interpreter's exit
            assert done.returncode == 0, done.stderr.decode()
            assert usage == ("user:crash", 10**12, 20 * 300_000_000, 0)
            assert all(not _read_pending(p) for p in journal.rglob("*.jnl"))  # none pending
            return
        assert done.returncode == -9, done.stderr.decode()
        # Killed with its queue: the reservations are still held (conservative), the
        # commits are in its journal file.
        assert usage == ("user:crash", 10**12, 0, 20 * USD)
        (left,) = journal.rglob("*.jnl")
        copy = tmp_path / "copy.jnl"
        shutil.copy(left, copy)
    finally:
        store.close()
    adopter = RedisStorage(server.url, prefix=prefix, journal_dir=journal)
    try:
        assert adopter.stats["adopted"] == 20
        assert adopter.flush(timeout=10)
        assert adopter.usage("user:crash") == ("user:crash", 10**12, 20 * 300_000_000, 0)
    finally:
        adopter.close()
    # A crash between sending and marking done replays them again: counted once.
    left.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(copy, left)
    again = RedisStorage(server.url, prefix=prefix, journal_dir=journal)
    try:
        assert again.stats["adopted"] == 20
        assert again.flush(timeout=10)
        assert again.usage("user:crash") == ("user:crash", 10**12, 20 * 300_000_000, 0)
    finally:
        again.close()


def test_async_settles_are_queued_without_a_thread(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStorage(server.url, prefix=unique_prefix())
    cap = ScopeLimit("user:aio", 10 * USD)
    try:
        assert store.reserve(1, [cap], USD).ok and store.reserve(2, [cap], USD).ok

        def no_thread(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a queued settle hopped to a thread")

        async def main() -> tuple[Any, Any]:
            monkeypatch.setattr(asyncio, "to_thread", no_thread)
            try:
                return await store.acommit(1, USD // 2), await store.arelease(2)
            finally:
                monkeypatch.undo()

        committed, released = asyncio.run(main())
        assert committed.status is CommitStatus.OK and released.status is CommitStatus.RELEASED
        assert store.usage(cap.key) == (cap.key, 10 * USD, USD // 2, 0)
    finally:
        store.close()


def test_synchronous_settles_remain_an_option(server: RedisServer) -> None:
    store = RedisStorage(server.url, prefix=unique_prefix(), settle_async=False)
    cap = ScopeLimit("user:sync", 10 * USD)
    try:
        assert store.reserve(1, [cap], USD).ok
        assert store.commit(1, 5).scopes == ((cap.key, 10 * USD, 5, 0),)
        assert store.stats["queued"] == 0 and store._writer is None
    finally:
        store.close()


def test_a_queued_settles_journal_line_is_the_replayable_entry(tmp_path: Path) -> None:
    """The cached encoding of queued settles decodes to the entry itself (odd keys too)."""
    fake = pytest.importorskip("fakeredis").FakeRedis(decode_responses=True)
    store = RedisStorage(client=fake, prefix="x:", durable_journal=False)
    scopes = (ScopeLimit('t:a"b\\c', 10**15, True, 3600.0), ScopeLimit("user:é", 5, False, None, 2))
    for name in ("1f", "~'x\"y'"):
        for _ in range(2):  # uncached, then cached
            entry = ("settle", name, [s.key for s in scopes], scopes, "c", 700)
            line = store._entry_json(entry)
            assert json.loads(line) == json.loads(json.dumps(store._encode(entry)))
            assert store._decode(json.loads(line)) == entry


def test_without_hiredis_the_same_calls_are_packed_by_redis_py(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hiredis is optional (the ``redis`` extra brings it): without it, redis-py packs."""
    import otel_budget.storage.redis as module

    monkeypatch.setattr(module, "_hiredis_pack", None)
    store = RedisStorage(server.url, prefix=unique_prefix())
    cap = ScopeLimit("user:nohiredis", 10 * USD)
    try:
        assert store.reserve(1, [cap], USD).ok and store.reserve(2, [cap], USD).ok
        store.commit(1, 5)
        store.release(2)
        assert store.usage(cap.key) == (cap.key, 10 * USD, 5, 0)
        assert store.stats["batched"] == 2
    finally:
        store.close()


def test_an_adopter_never_takes_a_journal_being_created(tmp_path: Path) -> None:
    """Many journals created while others adopt (as processes starting together do): every
    creator keeps its own file, locked (it was taken between creation and lock before)."""
    import threading

    from otel_budget.storage.journal import DurableJournal

    made: list[DurableJournal] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def adopt() -> None:
        adopter = DurableJournal(tmp_path)
        while not stop.is_set():
            adopter.adopt()
        adopter.close()

    def create() -> None:
        for _ in range(200):
            try:
                made.append(DurableJournal(tmp_path))
            except OSError as exc:
                errors.append(exc)

    adopters = [threading.Thread(target=adopt) for _ in range(2)]
    for thread in adopters:
        thread.start()
    create()
    stop.set()
    for thread in adopters:
        thread.join()
    assert not errors
    assert all(j.path.exists() for j in made)
    for journal in made:
        journal.close()


def test_a_batch_of_queued_settles_is_one_script_call(server: RedisServer) -> None:
    """The writer sends a whole batch as one ``settle_many.lua`` call (the server's CPU per
    settle), with each lease's outcome as ``settle.lua`` gives it."""
    store = RedisStorage(server.url, prefix=unique_prefix(), settle_interval_seconds=5.0)
    cap = ScopeLimit("user:batch", 100 * USD)
    try:
        assert store.reserve("warm", [cap], USD).ok
        store.commit("warm", 0)
        store.flush()  # the scripts are loaded (a first NOSCRIPT would count one more call)
        for lease in range(40):
            assert store.reserve(lease, [cap], USD).ok
        evalsha = int(store.client.info("commandstats")["cmdstat_evalsha"]["calls"])
        batches = store.stats["batches"]
        for lease in range(30):
            assert store.commit(lease, lease * 1000).status is CommitStatus.OK
        for lease in range(30, 40):
            assert store.release(lease).status is CommitStatus.RELEASED
        store.flush()  # the writer would wait its 5 s interval: sent now, one batch
        after = int(store.client.info("commandstats")["cmdstat_evalsha"]["calls"])
        assert store.stats["batches"] - batches == 1  # the writer waits its interval
        assert after - evalsha == 1  # one script call for the whole batch
        usage = store.usage(cap.key)
        assert usage == (cap.key, 100 * USD, sum(range(30)) * 1000, 0)
        assert store.stats["batches"] == 2 and store.stats["batched"] == 41
        # Settled in Redis: the same commit sent again (past this instance's own records)
        # counts nothing.
        assert store._settle(0, "c", 5).status is CommitStatus.DUPLICATE
        assert store.usage(cap.key).spent == sum(range(30)) * 1000
    finally:
        store.close()
