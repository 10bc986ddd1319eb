"""Budget context that cannot be escaped: unique block keys across processes, threads and
executor workers inside a block, identities read from span attributes, idle open blocks.

The thread and identity tests drive the real ``openai`` SDK against ``FakeLLMServer``; the
block-key test runs two real processes on one real ``redis-server`` ledger.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import SpanProcessor

from otel_budget import BudgetExceededError, ScopeRule, budget, scope, threads
from otel_budget.context import (
    BUDGET_FRAMES,
    INVALID_IDENTITY_ATTRIBUTE,
    valid_identity,
)
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.storage import MemoryStorage, ScopeLimit
from otel_budget.testing import FakeLLMServer
from tests.conftest import SWITCH
from tests.helpers import NANOS, nanos, spans_named
from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer
from tests.test_storage_memory import FakeClock

MINI = "gpt-4o-mini"
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075)}


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture
def instrumented() -> Iterator[OpenAIBudgetInstrumentor]:
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


def ask(client: openai.OpenAI, n: int) -> str:
    """One chat call; 'refused' when the budget stops it."""
    try:
        client.chat.completions.create(
            model=MINI, messages=[{"role": "user", "content": f"question {n}"}]
        )
    except BudgetExceededError:
        return "refused"
    return "ok"


# == 9. block keys are unique across processes ================================================
def block_worker(url: str, prefix: str, limit_usd: float, cost_usd: float, barrier: Any,
                 results: Any) -> None:  # fmt: skip
    """A child process: one budget() block on the shared Redis ledger, spending fixed-cost
    calls until refused, while the other process does the same."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_budget import BudgetSpanProcessor
    from otel_budget.storage.redis import RedisStorage
    from tests.test_processor import llm_call

    store = RedisStorage(url, prefix=prefix, socket_timeout=2.0, socket_connect_timeout=2.0)
    processor = BudgetSpanProcessor(storage=store)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("child")
    calls = refused = 0
    with budget(max_usd=limit_usd, processor=processor) as run:
        key = BUDGET_FRAMES.get()[-1].key
        barrier.wait(30)  # both blocks are open
        for _ in range(1000):
            try:
                llm_call(tracer, cost_usd, processor=processor)
            except BudgetExceededError:
                refused += 1
                break
            calls += 1
        barrier.wait(30)  # neither block ends (and evicts its key) before both are done
    results.put((key, calls, refused, nanos(run.report().total_usd)))
    store.close()


def test_two_processes_each_get_their_own_block_on_one_redis_ledger() -> None:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    limit_usd, cost_usd = 0.05, 0.001
    with RedisServer() as srv:
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(2)
        results = ctx.Queue()
        prefix = f"otbtest:{uuid.uuid4().hex[:12]}:"
        procs = [
            ctx.Process(target=block_worker,
                        args=(srv.url, prefix, limit_usd, cost_usd, barrier, results))
            for _ in range(2)
        ]  # fmt: skip
        for proc in procs:
            proc.start()
        try:
            out = [results.get(timeout=60) for _ in procs]
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    keys = {key for key, *_ in out}
    assert len(keys) == 2, keys  # not b:1 twice
    for key, calls, refused, spent in out:
        assert key.startswith("b:") and len(key) == 2 + 32
        # Each block spends exactly its own budget: not refused early, never more.
        assert calls == round(limit_usd / cost_usd)
        assert refused == 1
        assert spent == nanos(limit_usd)


# == 13. threads and executor workers stay inside the block ==================================
def _fifty_call_block(setup: Any, server: FakeLLMServer) -> Any:
    processor = setup(default_max_output_tokens=300)
    server.default_output_tokens = 3000  # capped at 300: ~$0.0002 per call, ~50 fit in $0.01
    return processor


def test_thread_pool_inside_a_block_is_budgeted_and_reported(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    processor = _fifty_call_block(setup, server)
    with budget(max_usd=0.01) as run:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: ask(client, n), range(100)))
        live = run.report()
    billed = server.stats()["billed_nanos"]
    assert answers.count("refused") > 0  # refused once the block was spent
    assert server.stats()["billed_requests"] == answers.count("ok") < 100
    assert 0.8 * 10_000_000 <= billed <= 10_000_000
    assert nanos(live.total_usd) == billed  # the block's report shows the spend
    assert nanos(run.report().total_usd) == billed
    assert run.report().calls == answers.count("ok")
    # The OpenTelemetry context followed too: every call is in the block's trace.
    root = spans_named(exporter, "budget")[0]
    chat = spans_named(exporter, f"chat {MINI}")
    assert len(chat) == 100
    assert {s.context.trace_id for s in chat} == {root.context.trace_id}
    assert not processor.runtime.calls


class Worker(threading.Thread):
    """A thread subclass with its own run(): the context must reach it too."""

    def __init__(self, client: openai.OpenAI, first: int, out: list[str]) -> None:
        super().__init__()
        self.client, self.first, self.out = client, first, out

    def run(self) -> None:
        for n in range(self.first, self.first + 10):
            self.out.append(ask(self.client, n))


def test_raw_threads_inside_a_block_are_budgeted_and_reported(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    processor = _fifty_call_block(setup, server)
    answers: list[str] = []
    with budget(max_usd=0.01) as run:
        pool = [
            threading.Thread(target=lambda f: answers.extend(ask(client, n) for n in range(f, f + 10)),
                             args=(10 * i,))
            for i in range(5)
        ] + [Worker(client, 50 + 10 * i, answers) for i in range(5)]  # fmt: skip
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(30)
        live = run.report()
    billed = server.stats()["billed_nanos"]
    assert len(answers) == 100
    assert answers.count("refused") > 0
    assert 0.8 * 10_000_000 <= billed <= 10_000_000
    assert nanos(live.total_usd) == billed
    assert live.calls == answers.count("ok") == server.stats()["billed_requests"]
    assert not processor.runtime.calls
    assert all("run" not in t.__dict__ for t in pool)  # nothing of ours left on the threads


def test_scope_identities_follow_into_executor_workers(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    processor = setup(scopes=[ScopeRule("user", max_usd=0.001)], default_max_output_tokens=300)
    server.default_output_tokens = 3000
    with scope(user="alice"), ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: ask(client, n), range(40)))
    usage = processor.storage.usage("user:alice")
    assert answers.count("refused") > 0
    assert usage is not None and usage.spent == server.stats()["billed_nanos"] <= NANOS // 1000


def test_executors_outside_a_block_are_untouched(make_processor: Any) -> None:
    make_processor()
    threads.install("test")
    try:
        pool = ThreadPoolExecutor(2)
        with budget(max_usd=1):
            # The pool's worker threads are started by this submit, inside the block...
            inside = pool.submit(lambda: len(BUDGET_FRAMES.get())).result()
        # ... yet tasks submitted after the block do not see it.
        after = [pool.submit(lambda: len(BUDGET_FRAMES.get())).result() for _ in range(8)]
        pool.shutdown()
        started: list[int] = []
        thread = threading.Thread(target=lambda: started.append(len(BUDGET_FRAMES.get())))
        thread.start()
        thread.join()
        assert (inside, after, started) == (1, [0] * 8, [0])
        assert "run" not in thread.__dict__
    finally:
        threads.uninstall("test")


def test_install_is_idempotent_and_uninstall_restores_exactly() -> None:
    holders = set(threads._holders)
    for holder in holders:  # budget() may have installed it in an earlier test
        threads.uninstall(holder)
    try:
        original_start = threading.Thread.__dict__["start"]
        original_submit = ThreadPoolExecutor.__dict__["submit"]
        threads.install("a")
        wrapped_start = threading.Thread.__dict__["start"]
        threads.install("a")
        threads.install("b")
        assert threading.Thread.__dict__["start"] is wrapped_start is not original_start
        threads.uninstall("a")
        assert threads.is_installed()  # "b" still holds it
        threads.uninstall("b")
        assert threading.Thread.__dict__["start"] is original_start
        assert ThreadPoolExecutor.__dict__["submit"] is original_submit
        assert not threads.is_installed()
    finally:
        for holder in holders:
            threads.install(holder)


def test_budget_and_the_instrumentor_install_it(make_processor: Any) -> None:
    from otel_budget import BudgetInstrumentor

    make_processor()
    with budget(max_usd=1):
        pass
    assert threads.is_installed("budget")
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(max_usd=1, libraries=())
    try:
        assert threads.is_installed("instrumentor")
    finally:
        instrumentor.uninstrument()
    assert not threads.is_installed("instrumentor")
    assert threads.is_installed()  # budget()'s claim stays


# == 14. identities read from span attributes are validated ===================================
class BaggageToAttributes(SpanProcessor):
    """Copies ``user.id`` from baggage onto each span at start, as a baggage span processor
    does: how an identity attribute reaches the SDK's spans in an app."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        value = baggage.get_baggage("user.id", parent_context)
        if value is not None:
            span.set_attribute("user.id", value)


def test_invalid_identity_attribute_is_charged_to_a_placeholder_scope(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    cap = 1_000_000  # $0.001 per user: ~5 calls
    processor = setup(scopes=[ScopeRule("user", max_usd=cap / NANOS)],
                      default_max_output_tokens=300)  # fmt: skip
    SWITCH.chain.insert(0, BaggageToAttributes())
    server.default_output_tokens = 3000
    bad = ["mallory\nroot", "\x1b[31mred", "x" * 10_000]
    answers = []
    caplog.set_level(logging.WARNING, logger="otel_budget")
    for n in range(30):
        token = otel_context.attach(baggage.set_baggage("user.id", bad[n % 3]))
        try:
            answers.append(ask(client, n))
        finally:
            otel_context.detach(token)
    token = otel_context.attach(baggage.set_baggage("user.id", "alice"))
    try:
        assert ask(client, 99) == "ok"  # a valid identity keeps its own scope
    finally:
        otel_context.detach(token)
    keys = [usage.key for usage in processor.storage.scopes("user:")]
    assert sorted(keys) == ["user:<invalid>", "user:alice"]
    assert all(valid_identity(key) for key in keys)
    placeholder = processor.storage.usage("user:<invalid>")
    assert placeholder is not None and placeholder.limit == cap
    # Still enforced: the invalid identities share one cap, and it refused.
    assert "refused" in answers
    assert 0 < placeholder.spent <= cap
    assert placeholder.spent + processor.storage.usage("user:alice").spent == (
        server.stats()["billed_nanos"]
    )
    chat = spans_named(exporter, f"chat {MINI}")
    marked = [s for s in chat if s.attributes.get(INVALID_IDENTITY_ATTRIBUTE) == "user.id"]
    assert len(marked) == 30
    assert len(chat) == 31
    logged = [r for r in caplog.records if "cannot be a scope key" in r.getMessage()]
    assert len(logged) == 1  # once, not per call
    assert "mallory" not in logged[0].getMessage() and "\x1b" not in logged[0].getMessage()


# == an open block never forgets its spend ====================================================
def test_an_idle_open_block_keeps_its_spend_and_is_evicted_at_exit(make_processor: Any) -> None:
    from tests.test_processor import llm_call

    clock = FakeClock()
    storage = MemoryStorage(clock=clock)
    processor = make_processor(storage=storage, trace_ttl_seconds=60)
    tracer = trace.get_tracer("tests")
    other = ScopeLimit("t:other", 10**12, True, 60.0)
    with budget(max_usd=0.5) as run:
        key = BUDGET_FRAMES.get()[-1].key
        llm_call(tracer, 0.4, processor=processor)
        clock.now += 3600  # idle for an hour: sixty times the trace TTL
        for n in range(64):  # other traffic: the ledger sweeps idle scopes meanwhile
            storage.reserve(10_000 + n, [other], 1)
            storage.commit(10_000 + n, 1)
        usage = storage.usage(key)
        assert usage is not None and usage.spent == nanos(0.4)  # not forgotten
        with pytest.raises(BudgetExceededError):
            llm_call(tracer, 0.2, processor=processor)  # 0.4 + 0.2 > 0.5
        llm_call(tracer, 0.1, processor=processor)
    assert nanos(run.report().total_usd) == nanos(0.5)
    assert storage.usage(key) is None  # evicted when the block exited
