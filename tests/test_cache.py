"""The prompt cache, through the real openai and anthropic SDKs against ``FakeLLMServer``.

Each test checks what the caller got (the SDK's own types, equal to the live answer), what
reached the provider (``server.stats()``: a hit never does), what the spans, the run's report
and the ledger say (a hit costs 0, saves the live price, and makes no ledger operation), and
that every kind of bad entry is a miss, never an error.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import BaseModel

from otel_budget import BudgetExceededError, PriceBook, budget, scope
from otel_budget import attributes as attrs
from otel_budget.cache import MemoryCache, ResponseCache, disabled
from otel_budget.cache.base import Entry, decode, encode
from otel_budget.cache.keys import refusal
from otel_budget.config import read_env
from otel_budget.instrumentation._cache import HIT_HEADER
from otel_budget.instrumentation.anthropic import AnthropicBudgetInstrumentor
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.storage import MemoryStorage
from otel_budget.testing import FakeLLMServer
from tests.helpers import nanos

MINI = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku-latest"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
ZERO = {"temperature": 0}


class CountingStorage(MemoryStorage):
    """The in-process ledger, counting every ledger operation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def reserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        self.ops.append("reserve_up_to")
        return super().reserve_up_to(*args, **kwargs)

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        self.ops.append("reserve")
        return super().reserve(*args, **kwargs)

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        self.ops.append("commit")
        return super().commit(*args, **kwargs)

    def release(self, *args: Any, **kwargs: Any) -> Any:
        self.ops.append("release")
        return super().release(*args, **kwargs)

    def charge(self, *args: Any, **kwargs: Any) -> Any:
        self.ops.append("charge")
        return super().charge(*args, **kwargs)


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _cheap_gc() -> Iterator[None]:
    """Freezing what is alive already (the SDKs' modules and models) makes the collections
    that settle dropped streams cost milliseconds."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def server(shared_server: FakeLLMServer) -> FakeLLMServer:
    assert shared_server.wait_idle(5)
    shared_server.clear_script()
    shared_server.reset_stats()
    return shared_server


@pytest.fixture
def instrumented() -> Iterator[None]:
    oi, ai = OpenAIBudgetInstrumentor(), AnthropicBudgetInstrumentor()
    oi.instrument()
    ai.instrument()
    yield
    gc.collect()
    oi.uninstrument()
    ai.uninstrument()


@pytest.fixture
def memory() -> MemoryCache:
    return MemoryCache()


@pytest.fixture
def cache(memory: MemoryCache) -> ResponseCache:
    return ResponseCache(memory)


@pytest.fixture
def processor(make_processor: Any, cache: ResponseCache, instrumented: None) -> Any:
    return make_processor(1.0, prices=PriceBook(), cache=cache)


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def aclient(server: FakeLLMServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test", max_retries=0)


def requests(server: FakeLLMServer) -> int:
    return int(server.stats()["requests"])


def llm_spans(exporter: Any) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(("chat ", "embeddings "))]


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model=MINI, messages=MESSAGES, **{**ZERO, **kw})


def claude(client: anthropic.Anthropic, **kw: Any) -> Any:
    return client.messages.create(
        model=CLAUDE, max_tokens=100, messages=MESSAGES, extra_body=ZERO, **kw
    )


def assert_hit_span(span: Any, live: Any) -> None:
    """A hit's span: cost 0, the live call's cost saved, the cached counts under our names."""
    hit, miss = span.attributes, live.attributes
    assert hit[attrs.CACHE_HIT] is True and miss[attrs.CACHE_HIT] is False
    assert hit[attrs.COST_USD] == 0.0
    assert miss[attrs.COST_USD] > 0
    assert hit[attrs.CACHE_SAVED_USD] == pytest.approx(miss[attrs.COST_USD], abs=1e-12)
    assert attrs.GEN_AI_USAGE_INPUT_TOKENS not in hit  # the provider billed nothing now
    assert hit[attrs.CACHE_INPUT_TOKENS] == miss[attrs.GEN_AI_USAGE_INPUT_TOKENS]
    assert hit[attrs.CACHE_OUTPUT_TOKENS] == miss[attrs.GEN_AI_USAGE_OUTPUT_TOKENS]
    assert hit[attrs.GEN_AI_RESPONSE_ID] == miss[attrs.GEN_AI_RESPONSE_ID]
    assert hit[attrs.COST_PROJECTED_USD] == 0.0


# -- hits are the SDK's own answers ---------------------------------------------------------------
def test_chat_hit_is_the_sdk_type_and_never_reaches_the_provider(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    live = chat(client)
    cached = chat(client)
    assert requests(server) == 1
    assert type(cached) is type(live) is openai.types.chat.ChatCompletion
    assert cached.model_dump() == live.model_dump()
    miss, hit = llm_spans(exporter)
    assert_hit_span(hit, miss)


def test_chat_stream_hit_is_a_stream_of_the_same_chunks(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    live = [c.model_dump() for c in chat(client, stream=True)]
    stream = chat(client, stream=True)
    assert isinstance(stream, openai.Stream)
    assert [c.model_dump() for c in stream] == live
    assert requests(server) == 1
    miss, hit = llm_spans(exporter)
    assert_hit_span(hit, miss)
    # stream and non-stream are different entries; a non-stream request is a miss
    chat(client)
    assert requests(server) == 2


def test_stream_left_early_is_not_stored(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, memory: MemoryCache
) -> None:
    stream = chat(client, stream=True)
    next(iter(stream))
    stream.close()
    assert len(memory) == 0
    list(chat(client, stream=True))
    assert requests(server) == 2 and len(memory) == 1


def test_responses_and_their_streams(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    live = client.responses.create(model=MINI, input="hi", temperature=0)
    cached = client.responses.create(model=MINI, input="hi", temperature=0)
    assert type(cached) is openai.types.responses.Response
    assert cached.model_dump() == live.model_dump()
    events = [e.model_dump() for e in client.responses.create(model=MINI, input="hi", temperature=0, stream=True)]
    again = [e.model_dump() for e in client.responses.create(model=MINI, input="hi", temperature=0, stream=True)]
    assert again == events and events[-1]["type"] == "response.completed"
    assert requests(server) == 2


def test_with_raw_response_and_the_stream_helper(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    live = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, **ZERO)
    raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, **ZERO)
    assert raw.headers[HIT_HEADER] == "hit" and HIT_HEADER not in live.headers
    assert raw.parse().model_dump() == live.parse().model_dump()
    with client.chat.completions.stream(model=MINI, messages=MESSAGES, **ZERO) as s:
        first = s.get_final_completion()
    with client.chat.completions.stream(model=MINI, messages=MESSAGES, **ZERO) as s:
        second = s.get_final_completion()
    assert second.model_dump() == first.model_dump()
    with client.chat.completions.with_streaming_response.create(
        model=MINI, messages=MESSAGES, seed=3, **ZERO
    ) as streamed:  # the body read lazily: teed on the miss
        lazy = streamed.parse()
    with client.chat.completions.with_streaming_response.create(
        model=MINI, messages=MESSAGES, seed=3, **ZERO
    ) as streamed:
        assert streamed.parse().model_dump() == lazy.model_dump()
    assert requests(server) == 3


def test_embeddings_are_cached_without_a_temperature(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    live = client.embeddings.create(model="text-embedding-3-small", input="hello")
    cached = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert cached.model_dump() == live.model_dump() and requests(server) == 1


def test_async_chat_and_stream(
    processor: Any, server: FakeLLMServer, exporter: Any
) -> None:
    async def main() -> tuple[Any, ...]:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0)
        a = await c.chat.completions.create(model=MINI, messages=MESSAGES, **ZERO)
        b = await c.chat.completions.create(model=MINI, messages=MESSAGES, **ZERO)
        s1 = [x.model_dump() async for x in await c.chat.completions.create(
            model=MINI, messages=MESSAGES, stream=True, **ZERO)]  # fmt: skip
        s2 = [x.model_dump() async for x in await c.chat.completions.create(
            model=MINI, messages=MESSAGES, stream=True, **ZERO)]  # fmt: skip
        await c.close()
        return a, b, s1, s2

    a, b, s1, s2 = asyncio.run(main())
    assert type(b) is type(a) and b.model_dump() == a.model_dump() and s1 == s2
    assert requests(server) == 2
    spans = llm_spans(exporter)
    assert [s.attributes[attrs.CACHE_HIT] for s in spans] == [False, True, False, True]


def test_anthropic_messages_streams_and_helper(
    processor: Any, aclient: anthropic.Anthropic, server: FakeLLMServer, exporter: Any
) -> None:
    live = claude(aclient)
    cached = claude(aclient)
    assert type(cached) is anthropic.types.Message and cached.model_dump() == live.model_dump()
    events = [e.model_dump() for e in claude(aclient, stream=True)]
    # messages.stream() shares the entry of create(stream=True): same request, same SSE
    with aclient.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES, extra_body=ZERO) as s:
        helper = s.get_final_message()
    assert [e.model_dump() for e in claude(aclient, stream=True)] == events
    assert helper.content[0].text == live.content[0].text
    assert requests(server) == 2
    miss, hit = llm_spans(exporter)[:2]
    assert_hit_span(hit, miss)


def test_async_anthropic(processor: Any, server: FakeLLMServer) -> None:
    async def main() -> tuple[Any, Any, Any]:
        c = anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key="t", max_retries=0)
        a = await c.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES, extra_body=ZERO)
        b = await c.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES, extra_body=ZERO)
        async with c.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES, extra_body=ZERO) as s:
            m = await s.get_final_message()
        async with c.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES, extra_body=ZERO) as s:
            m2 = await s.get_final_message()
        await c.close()
        return (a, b), m, m2

    (a, b), m, m2 = asyncio.run(main())
    assert b.model_dump() == a.model_dump() and m2.model_dump() == m.model_dump()
    assert requests(server) == 2


# -- what is not cached -------------------------------------------------------------------------
def test_sampled_requests_pass_through_unless_opted_in(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any,
    aclient: anthropic.Anthropic, cache: ResponseCache,
) -> None:  # fmt: skip
    for _ in range(2):
        client.chat.completions.create(model=MINI, messages=MESSAGES, temperature=0.7)
        client.chat.completions.create(model=MINI, messages=MESSAGES)  # the API's default samples
        aclient.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES)
    assert requests(server) == 6
    assert all(attrs.CACHE_HIT not in s.attributes for s in llm_spans(exporter))
    cache.cache_sampled = True
    for _ in range(2):
        client.chat.completions.create(model=MINI, messages=MESSAGES, temperature=0.7)
    assert requests(server) == 7


@pytest.mark.parametrize(
    ("params", "kind", "why"),
    [
        ({"temperature": 0, "store": True}, "chat", "store=True"),
        ({"temperature": 0, "previous_response_id": "resp_1"}, "responses", "previous_response_id"),
        ({"temperature": 0, "background": True}, "responses", "background"),
        ({"temperature": 0, "conversation": "conv_1"}, "responses", "conversation"),
        ({"temperature": 0, "modalities": ["text", "audio"]}, "chat", "audio"),
        ({"temperature": 0, "tools": [{"type": "web_search"}]}, "responses", "web_search"),
        ({"temperature": 0, "tools": [{"type": "web_search_20250305", "name": "w"}]}, "messages", "web_search"),
        ({"temperature": 0, "web_search_options": {}}, "chat", None),
        ({"temperature": 0, "mcp_servers": [{"url": "x"}]}, "messages", "server-side"),
        ({"temperature": 1}, "chat", "sampled"),
    ],
)
def test_requests_with_state_or_live_tools_are_not_cacheable(
    params: dict[str, Any], kind: str, why: str | None
) -> None:
    reason = refusal(params, kind, cache_sampled=False)
    assert reason is not None and (why is None or why in reason)
    assert refusal({"temperature": 0, "tools": [{"type": "function", "function": {}}]}, kind, False) is None


def test_disabled_block_and_clear(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, cache: ResponseCache,
    exporter: Any,
) -> None:  # fmt: skip
    chat(client)
    with disabled():
        chat(client)
    assert requests(server) == 2
    assert attrs.CACHE_HIT not in llm_spans(exporter)[1].attributes
    assert cache.clear() == 1
    chat(client)
    chat(client)
    assert requests(server) == 3


def test_uninstrument_removes_the_cache(
    make_processor: Any, cache: ResponseCache, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    make_processor(1.0, prices=PriceBook(), cache=cache)
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    chat(client)
    chat(client)
    instrumentor.uninstrument()
    chat(client)
    assert requests(server) == 2


def test_instrumentor_cache_argument(
    make_processor: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    """``OpenAIBudgetInstrumentor().instrument(cache=True)``: an in-memory cache of its own."""
    make_processor(1.0, prices=PriceBook())
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument(cache=True)
    try:
        chat(client)
        chat(client)
    finally:
        instrumentor.uninstrument()
    assert requests(server) == 1


def test_a_cache_without_a_budget(client: openai.OpenAI, server: FakeLLMServer, exporter: Any) -> None:
    """Tracing only (no processor anywhere): the instrumentor's own cache still answers."""
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument(cache=ResponseCache(MemoryCache()))
    try:
        first, second = chat(client), chat(client)
    finally:
        instrumentor.uninstrument()
    assert second.model_dump() == first.model_dump() and requests(server) == 1


# -- budget: a hit costs nothing and touches no ledger ----------------------------------------------
def test_a_hit_makes_no_ledger_operation_and_is_answered_when_the_budget_is_spent(
    make_processor: Any, cache: ResponseCache, instrumented: None, client: openai.OpenAI,
    server: FakeLLMServer,
) -> None:  # fmt: skip
    storage = CountingStorage()
    make_processor(1.0, prices=PriceBook(), cache=cache, storage=storage)
    live = chat(client)
    assert storage.ops  # the miss reserved and settled
    storage.ops.clear()
    with budget(max_usd=0.0000001) as run:  # a tenth of a micro-dollar: no live call fits
        cached = chat(client)
        with pytest.raises(BudgetExceededError):
            chat(client, seed=7)  # another request: a miss, enforced as usual
    assert cached.model_dump() == live.model_dump()
    assert storage.ops == ["reserve_up_to"]  # only the refused miss asked the ledger
    report = run.report()
    # (a miss is counted when it is sent: the refused one is an abort)
    assert report.total_usd == 0 and report.cache_hits == 1 and report.cache_misses == 0
    assert report.cache_saved_usd > 0 and report.calls == 1 and report.aborts == 1
    storage.pause()  # the kill switch stops spending; a hit spends nothing
    assert chat(client).model_dump() == live.model_dump()
    with pytest.raises(BudgetExceededError):
        chat(client, seed=8)
    storage.resume()
    assert requests(server) == 1


def test_output_capped_by_the_budget_is_not_stored(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, memory: MemoryCache
) -> None:
    # room for about 30 output tokens: the cap is lowered, the answer may be cut short
    with budget(max_usd=0.00002):
        chat(client, max_tokens=500)
    assert len(memory) == 0
    chat(client, max_tokens=500)
    assert len(memory) == 1 and requests(server) == 2


def test_report_root_span_and_metrics(
    make_processor: Any, cache: ResponseCache, instrumented: None, client: openai.OpenAI,
    server: FakeLLMServer, exporter: Any,
) -> None:  # fmt: skip
    reader = InMemoryMetricReader()
    make_processor(1.0, prices=PriceBook(), cache=cache, meter_provider=MeterProvider([reader]))
    with budget(max_usd=1.0) as run:
        chat(client)
        chat(client)
        chat(client)
        chat(client, temperature=1)  # not cacheable: neither hit nor miss
    report = run.report()
    miss = llm_spans(exporter)[0].attributes[attrs.COST_USD]
    assert (report.cache_hits, report.cache_misses, report.calls) == (2, 1, 4)
    assert nanos(report.cache_saved_usd) == nanos(2 * miss)
    assert "cache: 2 hits, 1 misses" in report.format()
    root = [s for s in exporter.get_finished_spans() if attrs.TRACE_CACHE_HITS in s.attributes]
    assert len(root) == 1 and root[0].attributes[attrs.TRACE_CACHE_MISSES] == 1
    assert nanos(root[0].attributes[attrs.TRACE_CACHE_SAVED_USD]) == nanos(2 * miss)
    points: dict[str, float] = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.startswith("otel_budget.cache."):
                    points[metric.name] = sum(p.value for p in metric.data.data_points)
    assert points["otel_budget.cache.hits"] == 2 and points["otel_budget.cache.misses"] == 1
    assert nanos(points["otel_budget.cache.saved"]) == nanos(2 * miss)


# -- isolation ---------------------------------------------------------------------------------------
def test_tenants_and_namespaces_never_read_each_other(
    make_processor: Any, instrumented: None, client: openai.OpenAI, server: FakeLLMServer,
    memory: MemoryCache,
) -> None:  # fmt: skip
    make_processor(1.0, prices=PriceBook(), cache=ResponseCache(memory, namespace="svc-a"))
    with scope(tenant="acme"):
        chat(client)
    with scope(tenant="globex"):
        chat(client)  # identical request, another tenant: a miss
    with scope(tenant="acme", user="u1"):
        chat(client)  # the user is not a partition by default: acme's entry
    assert requests(server) == 2
    # another namespace on the same backend sees nothing of svc-a's
    make_processor(1.0, prices=PriceBook(), cache=ResponseCache(memory, namespace="svc-b"))
    with scope(tenant="acme"):
        chat(client)
    assert requests(server) == 3
    assert ResponseCache(memory, namespace="svc-b").clear() == 1 and len(memory) == 2
    assert ResponseCache(memory).clear() == 0 and len(memory) == 2  # none is un-namespaced
    with pytest.raises(ValueError):
        ResponseCache(memory, namespace="svc:a")  # would nest under svc's keys


def test_beta_headers_are_part_of_the_key(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    chat(client, extra_headers={"X-Request-Tag": "one"})
    chat(client, extra_headers={"X-Request-Tag": "two"})  # not in the key: a hit
    chat(client, extra_headers={"OpenAI-Beta": "feature=v1"})  # a beta feature: a miss
    assert requests(server) == 2


def test_an_entry_copied_to_another_tenants_key_is_a_miss(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, memory: MemoryCache
) -> None:
    with scope(tenant="acme"):
        chat(client, seed=1)
    (acme_key,) = list(memory._data)
    with scope(tenant="globex"):
        chat(client)  # stores globex's own entry
    globex_key = next(k for k in memory._data if k != acme_key)
    memory.set(globex_key, memory.get(acme_key) or b"")  # acme's answer under globex's key
    with scope(tenant="globex"):
        chat(client)
    assert requests(server) == 3  # the copy names acme's key in its header: refused


# -- bad entries are misses ----------------------------------------------------------------------------
def _only_key(memory: MemoryCache) -> str:
    (key,) = list(memory._data)
    return key


def _stored(memory: MemoryCache) -> tuple[str, Entry]:
    key = _only_key(memory)
    blob = memory.get(key) or b""
    header = json.loads(blob[len(b"otel-budget-cache/1\n") + 4 : blob.index(b"}") + 1])
    entry = decode(blob, key, header["provider"], header["kind"], header["stream"])
    assert entry is not None
    return key, entry


@pytest.mark.parametrize(
    "corrupt",
    ["garbage", "truncated", "empty", "error body", "not an object", "wrong kind", "header only"],
)
def test_corrupt_json_entries_are_misses(
    corrupt: str, processor: Any, client: openai.OpenAI, server: FakeLLMServer,
    memory: MemoryCache,
) -> None:  # fmt: skip
    live = chat(client)
    key, entry = _stored(memory)
    blob = encode(entry)
    bad = {
        "garbage": b"\x00\xff not an entry at all",
        "truncated": blob[: len(blob) - 40],
        "empty": b"",
        "error body": encode(Entry(key, "openai", "chat", False, entry.content_type,
                                   b'{"error": {"message": "boom"}}')),  # fmt: skip
        "not an object": encode(Entry(key, "openai", "chat", False, entry.content_type, b"[1]")),
        "wrong kind": encode(Entry(key, "openai", "responses", False, entry.content_type, entry.body)),
        "header only": blob[: blob.index(b"}") + 1],
    }[corrupt]
    memory.set(key, bad)
    again = chat(client)
    assert requests(server) == 2
    assert again.choices[0].message.content == live.choices[0].message.content
    assert decode(memory.get(key), key, "openai", "chat", False) is not None  # stored afresh


@pytest.mark.parametrize("corrupt", ["truncated", "no end", "error event", "bad json", "stream as json"])
def test_corrupt_stream_entries_are_misses(
    corrupt: str, processor: Any, client: openai.OpenAI, server: FakeLLMServer,
    memory: MemoryCache,
) -> None:  # fmt: skip
    live = [c.model_dump()["choices"] for c in chat(client, stream=True)]
    key, entry = _stored(memory)
    body = entry.body
    bodies = {
        "truncated": body[: len(body) // 2],
        "no end": body.replace(b"data: [DONE]\n\n", b""),
        "error event": body.replace(b"data: [DONE]", b'data: {"error": {"message": "x"}}\n\ndata: [DONE]'),
        "bad json": body.replace(b'"choices"', b'"choices', 1),
        "stream as json": None,
    }
    if corrupt == "stream as json":
        bad = encode(Entry(key, "openai", "chat", False, "application/json", b'{"id": "x"}'))
    else:
        bad = encode(Entry(key, "openai", "chat", True, entry.content_type, bodies[corrupt] or b""))
    memory.set(key, bad)
    assert [c.model_dump()["choices"] for c in chat(client, stream=True)] == live
    assert requests(server) == 2


def test_a_poisoned_entry_cannot_inflate_the_saving_or_claim_another_model(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, memory: MemoryCache,
    exporter: Any,
) -> None:  # fmt: skip
    chat(client)
    key, entry = _stored(memory)
    body = json.loads(entry.body)
    body["model"] = "gpt-4"  # a model 200 times dearer
    memory.set(key, encode(Entry(key, "openai", "chat", False, entry.content_type,
                                 json.dumps(body).encode())))  # fmt: skip
    answer = chat(client)
    assert answer.model == "gpt-4"  # what the entry says (the SDK's parse of it) ...
    miss, hit = llm_spans(exporter)
    # ... but the saving is priced as the model asked for
    assert hit.attributes[attrs.CACHE_SAVED_USD] == pytest.approx(miss.attributes[attrs.COST_USD])
    assert hit.attributes[attrs.COST_USD] == 0.0


def test_an_entry_the_sdk_rejects_falls_back_to_the_provider(
    processor: Any, client: openai.OpenAI, server: FakeLLMServer, memory: MemoryCache,
    exporter: Any,
) -> None:  # fmt: skip
    class Answer(BaseModel):
        text: str

    live = client.chat.completions.parse(model=MINI, messages=MESSAGES, response_format=Answer, **ZERO)
    key, entry = _stored(memory)
    body = json.loads(entry.body)
    body["choices"][0]["message"]["content"] = "not json at all"  # parse() would raise
    memory.set(key, encode(Entry(key, "openai", "chat", False, entry.content_type,
                                 json.dumps(body).encode())))  # fmt: skip
    again = client.chat.completions.parse(model=MINI, messages=MESSAGES, response_format=Answer, **ZERO)
    assert again.choices[0].message.parsed == live.choices[0].message.parsed
    assert requests(server) == 2
    assert [s.attributes.get(attrs.CACHE_HIT) for s in llm_spans(exporter)] == [False, True, None]


def test_a_huge_answer_is_not_stored(
    make_processor: Any, instrumented: None, client: openai.OpenAI, server: FakeLLMServer,
    memory: MemoryCache,
) -> None:  # fmt: skip
    make_processor(1.0, prices=PriceBook(), cache=ResponseCache(memory, max_entry_bytes=200))
    chat(client)
    chat(client)
    assert len(memory) == 0 and requests(server) == 2


def test_a_backend_that_raises_is_a_miss(
    make_processor: Any, instrumented: None, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    class Broken(MemoryCache):
        def get(self, key: str) -> bytes | None:
            raise ConnectionError("down")

        def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
            raise ConnectionError("down")

    make_processor(1.0, prices=PriceBook(), cache=ResponseCache(Broken()))
    assert chat(client).choices and chat(client).choices
    assert requests(server) == 2


# -- the in-memory backend ------------------------------------------------------------------------------
def test_memory_cache_ttl_lru_and_bounds() -> None:
    now = [100.0]
    mem = MemoryCache(max_entries=3, max_bytes=10, ttl_seconds=5, clock=lambda: now[0])
    mem.set("a", b"11")
    mem.set("b", b"22")
    mem.set("c", b"33")
    assert mem.get("a") == b"11"  # a is now the most recently used
    mem.set("d", b"44")  # 4 entries > 3: b (least recently used) goes
    assert mem.get("b") is None and mem.get("a") == b"11" and len(mem) == 3
    mem.set("e", b"5555")  # 10 bytes > ... 2+2+2+4 = 10: fits; one more byte would not
    assert mem.bytes <= 10
    mem.set("f", b"x")
    assert mem.bytes <= 10 and mem.get("f") == b"x"
    mem.set("huge", b"x" * 11)  # larger than the whole cache: not stored, nothing evicted
    assert mem.get("huge") is None and mem.get("f") == b"x"
    now[0] = 105.0  # every entry is 5 s old: expired
    assert mem.get("f") is None and mem.get("e") is None
    mem.set("g", b"1", ttl_seconds=100)
    now[0] = 200.0
    assert mem.get("g") is not None
    assert mem.clear("g") == 1 and mem.get("g") is None


def test_a_hit_served_by_an_expired_entry_is_a_miss(
    make_processor: Any, instrumented: None, client: openai.OpenAI, server: FakeLLMServer
) -> None:
    now = [0.0]
    make_processor(1.0, prices=PriceBook(),
                   cache=ResponseCache(MemoryCache(ttl_seconds=60, clock=lambda: now[0])))  # fmt: skip
    chat(client)
    now[0] = 59.0
    chat(client)
    now[0] = 121.0
    chat(client)
    assert requests(server) == 2


# -- configuration ------------------------------------------------------------------------------------
def test_environment_variables() -> None:
    config = read_env({
        "OTEL_BUDGET_CACHE": "memory", "OTEL_BUDGET_CACHE_TTL_SECONDS": "30",
        "OTEL_BUDGET_CACHE_MAX_ENTRIES": "10", "OTEL_BUDGET_CACHE_MAX_BYTES": "1000",
        "OTEL_BUDGET_CACHE_NAMESPACE": "svc", "OTEL_BUDGET_CACHE_SAMPLED": "true",
    })  # fmt: skip
    cache = config.kwargs["cache"]
    assert not config.problems
    assert (cache.namespace, cache.cache_sampled) == ("svc", True)
    assert (cache.backend.max_entries, cache.backend.max_bytes, cache.backend.ttl_seconds) == (10, 1000, 30)
    typo = read_env({"OTEL_BUDGET_CACHE": "memroy"})
    assert "cache" not in typo.kwargs and typo.problems[0].variable == "OTEL_BUDGET_CACHE"
    stray = read_env({"OTEL_BUDGET_CACHE_TTL_SECONDS": "30"})
    assert "cache" not in stray.kwargs and "has no effect" in stray.problems[0].reason
    bad = read_env({"OTEL_BUDGET_CACHE": "memory", "OTEL_BUDGET_CACHE_TTL_SECONDS": "-1",
                    "OTEL_BUDGET_CACHE_SAMPLED": "maybe"})  # fmt: skip
    assert bad.kwargs["cache"].backend.ttl_seconds == 3600 and not bad.kwargs["cache"].cache_sampled
    assert [p.variable for p in bad.problems] == ["OTEL_BUDGET_CACHE_TTL_SECONDS", "OTEL_BUDGET_CACHE_SAMPLED"]
    ns = read_env({"OTEL_BUDGET_CACHE": "memory", "OTEL_BUDGET_CACHE_NAMESPACE": "x" * 200})
    assert "cache" not in ns.kwargs and ns.problems[0].variable == "OTEL_BUDGET_CACHE_NAMESPACE"
    assert read_env({"OTEL_BUDGET_CACHE": "off"}).kwargs.get("cache") is None


def test_zero_code_cache_from_the_environment(
    monkeypatch: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    from otel_budget import BudgetInstrumentor

    monkeypatch.setenv("OTEL_BUDGET_MAX_USD", "1")
    monkeypatch.setenv("OTEL_BUDGET_CACHE", "memory")
    monkeypatch.setenv("OTEL_BUDGET_INSTRUMENT", "openai")
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument()
    try:
        first, second = chat(client), chat(client)
    finally:
        instrumentor.uninstrument()
        if instrumentor.processor is not None:
            instrumentor.processor.shutdown()
    assert second.model_dump() == first.model_dump() and requests(server) == 1


def test_no_cache_no_attribute(
    make_processor: Any, instrumented: None, client: openai.OpenAI, exporter: Any,
    server: FakeLLMServer,
) -> None:  # fmt: skip
    make_processor(1.0, prices=PriceBook())
    chat(client)
    chat(client)
    assert requests(server) == 2
    assert all(attrs.CACHE_HIT not in s.attributes for s in llm_spans(exporter))
