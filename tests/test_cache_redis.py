"""The Redis prompt cache against a real ``redis-server``: shared by two processes, bounded
when Redis is dead or frozen, never trusting what it reads, never touching the ledger.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from otel_budget import PriceBook
from otel_budget import attributes as attrs
from otel_budget.cache import ResponseCache
from otel_budget.cache.redis import RedisCache
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.storage.redis import RedisStorage
from otel_budget.testing import FakeLLMServer
from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, free_port

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
SRC = str(Path(__file__).resolve().parents[1] / "src")
# Where a test expects Redis to answer: timeouts a loaded CI machine cannot miss (the
# timeout tests set their own).
PATIENT: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}

# One process's whole use of the cache: the call, and what the caller and the span saw.
CHILD = """
import json, sys, openai
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otel_budget import BudgetSpanProcessor
from otel_budget.cache import ResponseCache
from otel_budget.cache.redis import RedisCache
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

redis_url, base_url = sys.argv[1], sys.argv[2]
exporter = InMemorySpanExporter()
provider = TracerProvider()
trace.set_tracer_provider(provider)
cache = ResponseCache(RedisCache(redis_url, socket_timeout=2, socket_connect_timeout=2), namespace="shared")
provider.add_span_processor(BudgetSpanProcessor(max_usd=1, cache=cache))
provider.add_span_processor(SimpleSpanProcessor(exporter))
OpenAIBudgetInstrumentor().instrument()
client = openai.OpenAI(base_url=base_url, api_key="test", max_retries=0)
answer = client.chat.completions.create(
    model="gpt-4o-mini", temperature=0,
    messages=[{"role": "user", "content": "Say something short about budgets."}])
cache.flush()
(span,) = [s for s in exporter.get_finished_spans() if s.name.startswith("chat")]
print(json.dumps({"answer": answer.model_dump(), "hit": span.attributes["otel_budget.cache.hit"]}))
"""


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    srv = RedisServer().start()
    yield srv
    srv.stop()
    srv.cleanup()


@pytest.fixture
def url(redis_srv: RedisServer) -> str:
    redis.Redis.from_url(redis_srv.url).flushall()
    return redis_srv.url


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def fake(server: FakeLLMServer) -> FakeLLMServer:
    assert server.wait_idle(5)
    server.reset_stats()
    return server


@pytest.fixture
def client(fake: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=fake.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def instrumented() -> Iterator[None]:
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    yield
    gc.collect()
    instrumentor.uninstrument()


def chat(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(model=MINI, messages=MESSAGES, temperature=0)


def requests(server: FakeLLMServer) -> int:
    return int(server.stats()["requests"])


def test_two_processes_share_one_redis_cache(
    url: str, make_processor: Any, instrumented: None, client: openai.OpenAI,
    fake: FakeLLMServer,
) -> None:  # fmt: skip
    """This process answers first (a miss, stored); another process's identical request is
    answered from Redis and never reaches the provider."""
    cache = ResponseCache(RedisCache(url, **PATIENT), namespace="shared")
    make_processor(1.0, prices=PriceBook(), cache=cache)
    first = chat(client).model_dump()
    assert cache.flush()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, url, fake.openai_base_url],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    second = json.loads(child.stdout)
    assert second == {"answer": first, "hit": True}
    assert requests(fake) == 1  # the second process's call never reached the provider
    keys = redis.Redis.from_url(url).keys("otel_budget:cache:shared:*")
    assert len(keys) == 1 and b"budgets" not in keys[0]  # a digest: no prompt text in keys


def test_a_hit_makes_no_ledger_command(
    url: str, make_processor: Any, instrumented: None, client: openai.OpenAI,
    fake: FakeLLMServer, exporter: Any,
) -> None:  # fmt: skip
    ledger = RedisStorage(url)
    cache = ResponseCache(RedisCache(url, **PATIENT))
    make_processor(1.0, prices=PriceBook(), cache=cache, storage=ledger)
    chat(client)
    cache.flush()
    ledger.flush()
    conn = redis.Redis.from_url(url)

    def ledger_commands() -> int:
        stats = conn.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k not in (
            "cmdstat_getrange", "cmdstat_info", "cmdstat_set"))  # fmt: skip

    before = ledger_commands()
    chat(client)
    ledger.flush()
    assert ledger_commands() == before
    assert requests(fake) == 1
    assert [s.attributes[attrs.CACHE_HIT] for s in exporter.get_finished_spans()
            if s.name.startswith("chat")] == [False, True]  # fmt: skip
    ledger.close()


def test_huge_and_wrong_type_values_are_misses(
    url: str, make_processor: Any, instrumented: None, client: openai.OpenAI,
    fake: FakeLLMServer,
) -> None:  # fmt: skip
    cache = ResponseCache(RedisCache(url, max_entry_bytes=64 * 1024, **PATIENT))
    make_processor(1.0, prices=PriceBook(), cache=cache)
    chat(client)
    cache.flush()
    conn = redis.Redis.from_url(url)
    (key,) = conn.keys("otel_budget:cache:*")
    good = conn.get(key)
    conn.set(key, (good or b"") + b" " * (1024 * 1024))  # a valid entry, padded to 1 MiB
    chat(client)
    cache.flush()  # (the miss stored its answer again)
    conn.delete(key)
    conn.lpush(key, b"x")  # WRONGTYPE for GETRANGE
    chat(client)
    assert requests(fake) == 3


def test_a_dead_redis_falls_back_within_the_timeout(
    make_processor: Any, instrumented: None, client: openai.OpenAI, fake: FakeLLMServer
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    store = RedisCache(dead, retry_seconds=60)
    sent: list[str] = []
    real = store.client.execute_command

    def counted(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return real(*args, **options)

    store.client.execute_command = counted
    cache = ResponseCache(store)
    make_processor(1.0, prices=PriceBook(), cache=cache)
    started = time.perf_counter()
    chat(client)
    first = time.perf_counter() - started
    assert sent == ["GETRANGE"]  # one attempt, refused
    chat(client)  # the breaker is open: not even a connection attempt
    cache.flush()
    assert sent == ["GETRANGE"]
    assert requests(fake) == 2
    assert first < 2.0  # refused at once; the slack is for a loaded CI machine


def test_a_frozen_redis_costs_at_most_the_timeout_then_recovers(
    make_processor: Any, instrumented: None, client: openai.OpenAI, fake: FakeLLMServer,
) -> None:  # fmt: skip
    srv = RedisServer().start()
    try:
        timeout = 0.25
        cache = ResponseCache(RedisCache(srv.url, socket_timeout=timeout, retry_seconds=0.2))
        make_processor(1.0, prices=PriceBook(), cache=cache)
        chat(client)  # a miss, stored
        cache.flush()
        srv.freeze()
        started = time.perf_counter()
        chat(client)  # the read times out: a miss, sent to the provider
        assert time.perf_counter() - started < timeout + 1.0  # (the call itself: < 0.1 s)
        srv.thaw()
        time.sleep(0.25)  # the breaker's retry time
        chat(client)
        assert requests(fake) == 2  # the third call was a hit again
    finally:
        srv.thaw()
        srv.stop()
        srv.cleanup()


def test_async_calls_read_redis_off_the_event_loop(
    url: str, make_processor: Any, instrumented: None, fake: FakeLLMServer
) -> None:
    cache = ResponseCache(RedisCache(url, **PATIENT))
    make_processor(1.0, prices=PriceBook(), cache=cache)

    async def main() -> tuple[Any, Any]:
        c = openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="t", max_retries=0)
        first = await c.chat.completions.create(model=MINI, messages=MESSAGES, temperature=0)
        await asyncio.to_thread(cache.flush)
        second = await c.chat.completions.create(model=MINI, messages=MESSAGES, temperature=0)
        await c.close()
        return first, second

    first, second = asyncio.run(main())
    assert second.model_dump() == first.model_dump() and requests(fake) == 1


def test_clear_removes_only_its_namespace(url: str) -> None:
    backend = RedisCache(url, **PATIENT)
    for key in ("a:1", "a*:1", "ab:1", "2"):  # namespaces a, a* (glob), ab, and none
        backend.set(key, b"x")
    assert ResponseCache(backend, namespace="a").clear() == 1
    assert [backend.get(k) for k in ("a:1", "a*:1", "ab:1", "2")] == [None, b"x", b"x", b"x"]
    assert ResponseCache(backend).clear() == 1  # no namespace: only its own keys
    assert [backend.get(k) for k in ("a*:1", "ab:1", "2")] == [b"x", b"x", None]
