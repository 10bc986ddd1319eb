"""The openai instrumentor, through the real ``openai`` SDK against ``FakeLLMServer``.

Every test drives a real client (``OpenAI``, ``AsyncOpenAI``, ``AzureOpenAI``, subclasses)
over HTTP on 127.0.0.1 and checks three things against each other: the spans exported, the
budget ledger, and what the fake provider says it billed. The fake server prices gpt-4o-mini
and gpt-4o like genai-prices does, cache reads included (the server's default would bill
cached tokens at the full input price, genai-prices at half), so a span's cost can be compared
to the server's bill to the nano-dollar.

The last tests guard against bugs found in the shared modules (``_stream.py``, ``_call.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
import wrapt
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from otel_budget import BudgetExceededError, PriceBook, Substitute, budget
from otel_budget import attributes as attrs
from otel_budget.engine import trace_key
from otel_budget.instrumentation._call import COST_OUTPUT_CAPPED
from otel_budget.instrumentation.openai import _TARGETS, OpenAIBudgetInstrumentor
from otel_budget.metered import error_type
from otel_budget.pricing import TokenUsage
from otel_budget.testing import Behaviour, FakeLLMServer
from otel_budget.tokens import estimate_input_tokens
from tests.helpers import (
    NANOS,
    StartRecorder,
    assert_error_span,
    assert_settled_from_server,
    ledger,
    nanos,
    only_span,
    spans_named,
)

MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# genai-prices' prices, cache reads included: (input, output, cache read) USD per MTok.
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075), "gpt-4o": (2.5, 10.0, 1.25)}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture(scope="module", autouse=True)
def _cheap_gc() -> Iterator[None]:
    """Tests collect garbage to settle dropped streams; freezing what is alive already (the
    SDK's modules and models) makes each collection cost milliseconds, not a tenth of a
    second."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
def instrumented() -> Iterator[OpenAIBudgetInstrumentor]:
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    gc.collect()  # a stream this test dropped settles now, not into the next test's exporter
    instrumentor.uninstrument()


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


def _to_fake(request: Any, target: Any) -> None:
    path = re.sub(r"^(/openai)?(/v1)?/deployments/[^/]+", "/v1", request.url.path)
    if not path.startswith("/v1"):
        path = "/v1" + path
    request.url = request.url.copy_with(
        scheme=target.scheme, host=target.host, port=target.port, path=path
    )


class Redirect(httpx2.HTTPTransport):
    """Sends every request to the fake server, whatever the client's base URL (api.openai.com,
    an Azure resource), and drops Azure's ``/deployments/{name}`` path segment."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = httpx2.URL(target)

    def handle_request(self, request: Any) -> Any:
        _to_fake(request, self.target)
        return super().handle_request(request)


class AsyncRedirect(httpx2.AsyncHTTPTransport):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = httpx2.URL(target)

    async def handle_async_request(self, request: Any) -> Any:
        _to_fake(request, self.target)
        return await super().handle_async_request(request)


def only(exporter: Any, name: str = f"chat {MINI}") -> Any:
    return only_span(exporter, name)


# -- helpers -----------------------------------------------------------------------------------
def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


# == 1. chat JSON: attributes at start and at end ============================================
def test_chat_json_span_attributes_at_start_and_end(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(cached_tokens=64, reasoning_tokens=7))
    reply = client.chat.completions.create(
        model=MINI, messages=MESSAGES, max_tokens=300, temperature=0.5, seed=7
    )
    span = only(exporter)
    assert span.kind is SpanKind.CLIENT
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.GEN_AI_OPERATION_NAME] == "chat"
    assert at_start[attrs.GEN_AI_PROVIDER_NAME] == "openai"
    assert at_start[attrs.GEN_AI_REQUEST_MODEL] == MINI
    assert at_start[attrs.SERVER_ADDRESS] == "127.0.0.1"
    assert at_start[attrs.SERVER_PORT] == server.port
    assert at_start[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 300
    assert at_start["gen_ai.request.temperature"] == 0.5
    assert at_start["gen_ai.request.seed"] == 7
    projected = at_start[attrs.COST_PROJECTED_USD]
    assert projected > 0
    assert attrs.COST_USD not in at_start  # the actual cost is only known at the end
    # The projection covers the worst case: estimated input + the whole output cap.
    estimate = estimate_input_tokens(MINI, messages=MESSAGES).tokens
    worst = processor.prices.quote("openai", MINI, TokenUsage(input_tokens=estimate, output_tokens=300))
    assert nanos(projected) == worst.nanos

    end = span.attributes
    assert end[attrs.GEN_AI_RESPONSE_ID] == reply.id
    assert end[attrs.GEN_AI_RESPONSE_MODEL] == MINI
    assert list(end[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["stop"]
    assert end[attrs.GEN_AI_USAGE_INPUT_TOKENS] == reply.usage.prompt_tokens
    assert end[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == reply.usage.completion_tokens == 27
    assert end[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 64
    assert end[attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 7
    assert end[attrs.PRICE_SOURCE].startswith("genai-prices")
    assert end[attrs.PRICE_MODEL] == MINI
    assert attrs.GEN_AI_SYSTEM_DEPRECATED not in end
    assert attrs.COST_ESTIMATED not in end
    assert_settled_from_server(span, server)
    # The cached part is priced at the cache-read price (half): not at the full input price.
    full = server.last_call.input_tokens * 150 + 27 * 600
    assert server.last_call.billed_nanos == full - 64 * 75
    assert ledger(processor) == (server.last_call.billed_nanos, 0)
    assert span.status.status_code is StatusCode.UNSET


def test_no_message_content_unless_opted_in(
    setup: Any, client: Any, exporter: Any, monkeypatch: Any
) -> None:
    setup(max_usd=1.0)
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    span = only(exporter)
    assert "gen_ai.input.messages" not in span.attributes
    assert "gen_ai.output.messages" not in span.attributes
    text = json.dumps({k: str(v) for k, v in span.attributes.items()})
    assert "budgets" not in text and "fake reply" not in text

    exporter.clear()
    monkeypatch.setenv(CAPTURE_ENV, "true")
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    span = only(exporter)
    assert "Say something short about budgets." in span.attributes["gen_ai.input.messages"]
    assert "fake reply" in span.attributes["gen_ai.output.messages"]


# == 2. refusal before any request ============================================================
def test_refused_before_any_http_request(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=0.000001)  # 1000 nano-USD: not even the input fits
    with pytest.raises(BudgetExceededError) as info:
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=100)
    assert info.value.reason == "limit"
    assert info.value.budget_usd == 0.000001
    assert server.stats()["requests"] == 0
    span = only(exporter)
    assert_error_span(span, "BudgetExceededError")
    assert span.attributes[attrs.COST_PROJECTED_USD] > 0.000001
    assert ledger(processor) == (0, 0)


# == 3. the hard output cap ===================================================================
def test_cap_is_injected_when_the_request_has_none(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    setup(max_usd=1.0, default_max_output_tokens=123)
    server.default_output_tokens = 500  # would cost more than the reservation, uncapped
    reply = client.chat.completions.create(model=MINI, messages=MESSAGES)
    body = server.last_call.body
    # Not api.openai.com / Azure and no max_completion_tokens given: the portable max_tokens.
    assert body["max_tokens"] == 123
    assert "max_completion_tokens" not in body
    assert reply.usage.completion_tokens == 123
    assert reply.choices[0].finish_reason == "length"
    span = only(exporter)
    at_start = starts.at_start[span.context.span_id]
    assert span.attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 123  # set before sending
    # The bound was defaulted (the request had none): flagged, even though the injected cap
    # now bounds the output; not lowered by the budget.
    assert at_start[attrs.COST_OUTPUT_ASSUMED] is True
    assert COST_OUTPUT_CAPPED not in span.attributes
    assert attrs.COST_OVERSHOOT_USD not in span.attributes
    assert nanos(span.attributes[attrs.COST_USD]) <= nanos(at_start[attrs.COST_PROJECTED_USD])
    assert_settled_from_server(span, server)


def test_cap_param_follows_the_callers_choice(setup: Any, client: Any, server: FakeLLMServer) -> None:
    setup(max_usd=0.0001)  # affords ~160 output tokens
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_completion_tokens=1000)
    body = server.last_call.body
    assert 16 <= body["max_completion_tokens"] < 1000
    assert "max_tokens" not in body


def test_cap_on_the_real_openai_host_is_max_completion_tokens(
    setup: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    setup(max_usd=1.0, default_max_output_tokens=77)
    http = httpx2.Client(transport=Redirect(server.url))
    c = openai.OpenAI(api_key="test", max_retries=0, http_client=http)  # api.openai.com
    c.chat.completions.create(model=MINI, messages=MESSAGES)
    body = server.last_call.body
    assert body["max_completion_tokens"] == 77  # o-series models reject max_tokens
    assert "max_tokens" not in body
    span = only(exporter)
    assert span.attributes[attrs.SERVER_ADDRESS] == "api.openai.com"
    assert span.attributes[attrs.SERVER_PORT] == 443
    assert_settled_from_server(span, server)
    # A framework passing max_tokens=None has not chosen max_tokens: same rule.
    c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=None)
    body = server.last_call.body
    assert body["max_completion_tokens"] == 77 and body.get("max_tokens") is None
    # The caller's own max_tokens is kept (and lowered there when the budget requires it).
    c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=40)
    body = server.last_call.body
    assert body["max_tokens"] == 40 and "max_completion_tokens" not in body
    c.close()


def test_cap_is_lowered_to_what_the_budget_affords(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=0.0001)  # 100_000 nano-USD
    server.default_output_tokens = 5000
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=1000)
    body = server.last_call.body
    span = only(exporter)
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 1000  # what the caller asked for
    cap = span.attributes[COST_OUTPUT_CAPPED]  # set before sending
    assert body["max_tokens"] == cap == span.attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS]
    assert 16 <= cap < 1000
    # The largest cap that fits: one more token would not.
    estimate = estimate_input_tokens(MINI, messages=MESSAGES).tokens

    def cost(out: int) -> int:
        return processor.prices.quote("openai", MINI, TokenUsage(input_tokens=estimate, output_tokens=out)).nanos

    assert cost(cap) <= 100_000 < cost(cap + 1)
    assert server.last_call.output_tokens == cap
    assert server.stats()["billed_nanos"] <= 100_000
    assert_settled_from_server(span, server)


def test_cap_below_min_output_tokens_is_refused(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    estimate = estimate_input_tokens(MINI, messages=MESSAGES).tokens
    room = estimate * 150 + 10 * 600  # the input plus 10 output tokens (min is 16)
    processor = setup(max_usd=room / NANOS)
    with pytest.raises(BudgetExceededError):
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=1000)
    assert server.stats()["requests"] == 0
    assert_error_span(only(exporter), "BudgetExceededError")
    # With a lower minimum, the same budget lets a truncated call through.
    exporter.clear()
    processor = setup(max_usd=room / NANOS, min_output_tokens=5)
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=1000)
    assert server.last_call.body["max_tokens"] == 10
    assert ledger(processor)[0] == server.stats()["billed_nanos"] <= room


def test_cap_output_tokens_false_leaves_the_request_untouched(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0, cap_output_tokens=False, default_max_output_tokens=50)
    server.default_output_tokens = 80
    client.chat.completions.create(model=MINI, messages=MESSAGES)
    body = server.last_call.body
    assert "max_tokens" not in body and "max_completion_tokens" not in body
    span = only(exporter)
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.COST_OUTPUT_ASSUMED] is True
    # Uncapped, the call cost more than its reservation; recorded truthfully.
    assert span.attributes[attrs.COST_OVERSHOOT_USD] > 0
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


# == 4. the guarantee: concurrent calls never overshoot =======================================
def test_32_threads_sharing_one_trace_never_overshoot(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    limit = 30_000_000  # $0.03
    processor = setup(max_usd=limit / NANOS, default_max_output_tokens=400)
    server.latency_s = 0.01
    server.default_output_tokens = 5000  # uncapped, each call would cost 12x its reservation
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    tracer = trace.get_tracer("tests")
    errors: list[BaseException] = []
    refused: list[int] = []
    calls = [0] * 32

    def worker(i: int) -> None:
        try:
            while True:
                content = f"worker {i} call {calls[i]}"
                try:
                    c.chat.completions.create(model=MINI, messages=[{"role": "user", "content": content}])
                except BudgetExceededError:
                    refused.append(i)
                    return
                calls[i] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with tracer.start_as_current_span("agent") as root:
        trace_id = root.get_span_context().trace_id
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(worker, i))
            for i in range(32)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(t.is_alive() for t in threads)
        usage = processor.storage.usage(trace_key(trace_id))
        stats = processor.engine.trace_stats(trace_id, create=False)
    c.close()
    assert not errors, errors
    assert sorted(refused) == list(range(32))  # every thread was stopped by the budget
    billed = server.stats()["billed_nanos"]
    assert server.stats()["errors"] == 0
    assert server.stats()["max_in_flight"] > 1  # the calls did overlap
    assert billed <= limit
    assert billed >= limit * 0.8  # the budget was used, not refused early
    # The ledger and the run's report agree with the provider's bill, to the nano-dollar.
    assert usage is not None and usage.spent == billed and usage.reserved == 0
    assert stats is not None and stats.spent == billed
    assert stats.calls == sum(calls) == server.stats()["billed_requests"]
    chat = spans_named(exporter, f"chat {MINI}")
    assert len(chat) == sum(calls) + 32
    assert all(s.context.trace_id == trace_id for s in chat)
    assert not [s for s in chat if attrs.COST_OVERSHOOT_USD in s.attributes]
    assert all(r.body["max_tokens"] <= 400 for r in server.calls())  # every call was capped


def test_threads_under_one_budget_block_never_overshoot(setup: Any, server: FakeLLMServer) -> None:
    processor = setup(default_max_output_tokens=300)
    server.latency_s = 0.01
    server.default_output_tokens = 3000
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    stopped = []

    def worker(i: int) -> None:
        for n in range(100):
            try:
                c.chat.completions.create(model=MINI, messages=[{"role": "user", "content": f"w{i} n{n}"}])
            except BudgetExceededError:
                stopped.append(i)
                return

    with budget(max_usd=0.01) as run:
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    c.close()
    billed = server.stats()["billed_nanos"]
    assert len(stopped) == 32
    assert 0.8 * 10_000_000 <= billed <= 10_000_000
    assert nanos(run.report().total_usd) == billed
    assert not len(processor.runtime.calls)  # no call left open


# == 5. streams ===============================================================================
def stream_chat(client: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("model", MINI)
    kwargs.setdefault("messages", MESSAGES)
    kwargs.setdefault("max_tokens", 100)
    return client.chat.completions.create(stream=True, **kwargs)


def test_stream_fully_consumed_asks_for_usage_and_settles_it(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(cached_tokens=32))
    text = ""
    for chunk in stream_chat(client):
        # The quickstart loop: the usage-only chunk (choices == []) that the instrumentor asked
        # for is read by it and not passed on, so this does not raise IndexError.
        text += chunk.choices[0].delta.content or ""
    assert server.last_call.body["stream_options"] == {"include_usage": True}
    assert len(text.split()) == 20
    span = only(exporter)
    assert span.attributes["gen_ai.request.stream"] is True
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 20
    assert span.attributes[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 32
    assert list(span.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["stop"]
    assert attrs.COST_ESTIMATED not in span.attributes
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_stream_options_set_by_the_caller_are_kept(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0)
    list(stream_chat(client, stream_options={"include_usage": False}))
    assert server.last_call.body["stream_options"] == {"include_usage": False}
    span = only(exporter)
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.COST_USD] > 0
    # A caller who asked for usage gets the usage chunk, and the span is exact.
    exporter.clear()
    chunks = list(stream_chat(client, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    span = only(exporter)
    assert attrs.COST_ESTIMATED not in span.attributes
    assert_settled_from_server(span, server)


def test_stream_include_usage_opt_out(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    setup(max_usd=1.0, stream_include_usage=False)
    list(stream_chat(client))
    assert "stream_options" not in server.last_call.body
    span = only(exporter)
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.COST_USD] > 0


def test_stream_with_block_and_close(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    with stream_chat(client) as stream:
        for _ in stream:
            pass
    span = only(exporter)
    assert_settled_from_server(span, server)

    exporter.clear()
    with stream_chat(client) as stream:
        next(stream)
        assert not spans_named(exporter, f"chat {MINI}")
    span = only(exporter)  # settled when the block closed the stream, from what was read
    assert span.attributes[attrs.COST_ESTIMATED] is True and span.attributes[attrs.COST_USD] > 0

    exporter.clear()
    stream = stream_chat(client)
    next(stream)
    next(stream)
    assert not spans_named(exporter, f"chat {MINI}")  # still open while the caller reads
    stream.close()
    span = only(exporter)
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.COST_USD] > 0
    stream.close()  # idempotent: still one span, settled once
    assert len(spans_named(exporter, f"chat {MINI}")) == 1
    assert ledger(processor)[1] == 0


def test_stream_broken_off_then_dropped_is_settled(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    stream = stream_chat(client)
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    assert not spans_named(exporter, f"chat {MINI}")
    del stream, _chunk
    gc.collect()
    span = only(exporter)
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.COST_USD] > 0
    # from the streamed output: an estimate, kept out of the provider-reported gen_ai.usage.*
    assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] >= 3
    assert attrs.GEN_AI_USAGE_OUTPUT_TOKENS not in span.attributes
    spent, reserved = ledger(processor)
    assert spent == nanos(span.attributes[attrs.COST_USD]) and reserved == 0


def test_stream_never_iterated_and_dropped_is_settled(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    stream = stream_chat(client)
    assert ledger(processor)[1] > 0  # reserved while the stream is open
    del stream
    gc.collect()
    span = only(exporter)
    assert span.attributes[attrs.COST_USD] > 0  # the input was billed, never free
    assert ledger(processor)[1] == 0


def test_broken_stream_is_an_error_and_charged(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(break_stream_after=2))
    with pytest.raises(Exception) as info:  # noqa: PT011 - the transport's error, whatever it is
        list(stream_chat(client))
    assert not isinstance(info.value, BudgetExceededError)
    span = only(exporter)
    assert_error_span(span, error_type(info.value))
    assert span.attributes[attrs.COST_USD] > 0  # the input and first delta were billed
    assert server.stats()["broken_streams"] == 1
    assert ledger(processor) == (nanos(span.attributes[attrs.COST_USD]), 0)


def test_stream_without_usage_is_estimated(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0)
    server.script(Behaviour(usage=False))
    list(stream_chat(client))
    span = only(exporter)
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.COST_USD] > 0
    assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] > 0  # estimated: not a gen_ai.usage.*
    assert attrs.GEN_AI_USAGE_OUTPUT_TOKENS not in span.attributes


def test_llm_span_is_not_current_while_the_caller_iterates(
    setup: Any, client: Any, exporter: Any
) -> None:
    setup(max_usd=1.0)
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("agent") as agent:
        for _chunk in stream_chat(client):
            with tracer.start_as_current_span("handle chunk"):
                pass
    chat = only(exporter)
    inner = spans_named(exporter, "handle chunk")
    assert inner
    assert all(s.parent.span_id == agent.get_span_context().span_id for s in inner)
    assert all(s.parent.span_id != chat.context.span_id for s in inner)
    assert chat.parent.span_id == agent.get_span_context().span_id


def test_chat_stream_helper_is_metered_once(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with client.chat.completions.stream(model=MINI, messages=MESSAGES, max_tokens=50) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
        final = stream.get_final_completion()
    assert text == final.choices[0].message.content
    assert server.stats()["requests"] == 1
    span = only(exporter)
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 20
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_chat_stream_helper_left_early_settles_at_exit(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with client.chat.completions.stream(model=MINI, messages=MESSAGES, max_tokens=50) as stream:
        for _event in stream:
            break
    # Leaving the helper's block closes the response: the call must not stay reserved until
    # the garbage collector happens to free the stream (it sits in a reference cycle).
    span = only(exporter)
    assert span.attributes[attrs.COST_USD] > 0
    assert ledger(processor)[1] == 0
    del stream


# -- async -----------------------------------------------------------------------------------
def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_async_chat_json_and_stream(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        reply = await c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=40)
        assert reply.usage is not None
        assert_settled_from_server(only(exporter), server)
        exporter.clear()
        stream = await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)
        assert server.last_call.body["stream_options"] == {"include_usage": True}
        async for chunk in stream:
            assert chunk.choices  # the usage-only chunk is not passed on
        assert_settled_from_server(only(exporter), server)
        await c.close()

    run(main())
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_async_stream_endings(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    tracer = trace.get_tracer("tests")

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        # async with
        async with await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True) as s:
            async for _chunk in s:
                pass
        assert_settled_from_server(only(exporter), server)
        # close() part-way
        exporter.clear()
        s = await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)
        await s.__anext__()
        await s.close()
        span = only(exporter)
        assert span.attributes[attrs.COST_ESTIMATED] is True and span.attributes[attrs.COST_USD] > 0
        # broken stream
        exporter.clear()
        server.script(Behaviour(break_stream_after=2))
        s = await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)
        with pytest.raises(Exception) as info:  # noqa: PT011
            async for _chunk in s:
                pass
        assert_error_span(only(exporter), error_type(info.value))
        assert only(exporter).attributes[attrs.COST_USD] > 0
        # no usage
        exporter.clear()
        server.script(Behaviour(usage=False))
        s = await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)
        async for _chunk in s:
            pass
        assert only(exporter).attributes[attrs.COST_ESTIMATED] is True
        # early break, then dropped
        exporter.clear()
        s = await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)
        async for _chunk in s:
            break
        del s, _chunk
        gc.collect()
        assert only(exporter).attributes[attrs.COST_USD] > 0
        # the chat span is not current while iterating
        exporter.clear()
        with tracer.start_as_current_span("agent") as agent:
            s = await c.chat.completions.create(model=MINI, messages=MESSAGES, stream=True)
            async for _chunk in s:
                with tracer.start_as_current_span("handle chunk"):
                    pass
        chat = only(exporter)
        for inner in spans_named(exporter, "handle chunk"):
            assert inner.parent.span_id == agent.get_span_context().span_id != chat.context.span_id
        # the helper
        exporter.clear()
        server.reset_stats()
        async with c.chat.completions.stream(model=MINI, messages=MESSAGES, max_tokens=30) as hs:
            async for _event in hs:
                pass
        assert server.stats()["requests"] == 1
        assert_settled_from_server(only(exporter), server)
        await c.close()

    run(main())
    assert ledger(processor)[1] == 0


# == 6. Responses API =========================================================================
class Answer(BaseModel):
    title: str
    score: int


def test_responses_create_json_and_stream(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0, default_max_output_tokens=64)
    server.script(Behaviour(cached_tokens=16, reasoning_tokens=4))
    reply = client.responses.create(model=MINI, input="Summarise budgets.", instructions="Be brief.")
    assert server.last_call.body["max_output_tokens"] == 64  # the Responses cap parameter
    span = only(exporter)
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.GEN_AI_OPERATION_NAME] == "chat"
    assert span.attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 64  # injected before sending
    assert span.attributes[attrs.GEN_AI_RESPONSE_ID] == reply.id
    assert list(span.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["stop"]  # completed
    assert span.attributes[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 16
    assert span.attributes[attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 4
    assert_settled_from_server(span, server)

    exporter.clear()
    events = list(client.responses.create(model=MINI, input="Summarise budgets.", max_output_tokens=10, stream=True))
    assert events[-1].type == "response.incomplete"  # cut by max_output_tokens
    span = only(exporter)
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 10
    assert list(span.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["length"]  # incomplete: max_output_tokens
    assert_settled_from_server(span, server)

    exporter.clear()
    with client.responses.stream(model=MINI, input="Summarise budgets.", max_output_tokens=30) as rs:
        for _event in rs:
            pass
        final = rs.get_final_response()
    assert final.usage is not None
    assert_settled_from_server(only(exporter), server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)
    assert server.stats()["requests"] == 3


def test_parse_helpers_are_metered_once(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    parsed = client.chat.completions.parse(model=MINI, messages=MESSAGES, response_format=Answer, max_tokens=60)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    span = only(exporter)
    assert_settled_from_server(span, server)

    exporter.clear()
    response = client.responses.parse(model=MINI, input="Rate this.", text_format=Answer, max_output_tokens=60)
    assert isinstance(response.output_parsed, Answer)
    span = only(exporter)
    assert_settled_from_server(span, server)
    assert server.stats()["requests"] == 2
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_async_responses_and_parse(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        await c.responses.create(model=MINI, input="hello", max_output_tokens=20)
        assert_settled_from_server(only(exporter), server)
        exporter.clear()
        stream = await c.responses.create(model=MINI, input="hello", stream=True)
        async for _event in stream:
            pass
        assert_settled_from_server(only(exporter), server)
        exporter.clear()
        parsed = await c.chat.completions.parse(model=MINI, messages=MESSAGES, response_format=Answer)
        assert isinstance(parsed.choices[0].message.parsed, Answer)
        assert_settled_from_server(only(exporter), server)
        await c.close()

    run(main())
    assert server.stats()["requests"] == 3
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


# == 7. embeddings ============================================================================
def test_embeddings(setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    result = client.embeddings.create(model="text-embedding-3-small", input=["budget " * 40, "cost"])
    assert len(result.data) == 2
    span = only(exporter, "embeddings text-embedding-3-small")
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.GEN_AI_OPERATION_NAME] == "embeddings"
    assert at_start[attrs.COST_PROJECTED_USD] > 0
    assert attrs.GEN_AI_REQUEST_MAX_TOKENS not in at_start
    assert span.attributes[attrs.GEN_AI_USAGE_INPUT_TOKENS] == result.usage.prompt_tokens
    assert span.attributes[attrs.COST_USD] > 0
    assert_settled_from_server(span, server)
    assert "max_tokens" not in server.last_call.body
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


# == 8. errors release the reservation ========================================================
@pytest.mark.parametrize("status, error", [(429, "RateLimitError"), (500, "InternalServerError")])
def test_http_errors_release_the_reservation(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any, status: int, error: str
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(status=status))
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    assert ledger(processor) == (0, 0)
    span = only(exporter)
    assert_error_span(span, f"openai.{error}")
    assert span.attributes[attrs.COST_USD] == 0.0
    assert server.stats()["billed_nanos"] == 0


def test_timeout_charges_the_reservation(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    # The request was sent: the provider may have finished (and billed) it after the client
    # gave up, so the attempt is charged its projection, never released.
    processor = setup(max_usd=1.0)
    server.bill_abandoned = True
    server.script(Behaviour(delay_s=0.6))
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0, timeout=0.15)
    with pytest.raises(openai.APITimeoutError):
        c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    span = only(exporter)
    assert_error_span(span, "openai.APITimeoutError")
    projected = nanos(span.attributes[attrs.COST_PROJECTED_USD])
    assert ledger(processor) == (projected, 0)
    assert nanos(span.attributes[attrs.COST_USD]) == projected
    assert server.wait_idle(5)
    assert 0 < server.stats()["billed_nanos"] <= projected
    c.close()


def test_connection_refused_releases_the_reservation(setup: Any, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="test", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    assert ledger(processor) == (0, 0)
    assert_error_span(only(exporter), "openai.APIConnectionError")
    c.close()


# == 9. exactly once ==========================================================================
def _original(module: str, cls: str, method: str) -> Any:
    import importlib

    return vars(getattr(importlib.import_module(module), cls))[method]


def test_instrument_twice_wraps_once_and_uninstrument_restores(
    make_processor: Any, client: Any, exporter: Any
) -> None:
    from openai.resources.chat.completions import Completions

    make_processor(max_usd=1.0, prices=PriceBook())
    originals = {(m, c, f): _original(m, c, f) for m, c, f, _ in _TARGETS}
    assert not any(isinstance(fn, wrapt.ObjectProxy) for fn in originals.values())
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    instrumentor.instrument()
    OpenAIBudgetInstrumentor().instrument()  # the same (singleton) instrumentor
    try:
        wrapper = vars(Completions)["create"]
        assert isinstance(wrapper, wrapt.FunctionWrapper)
        # Wrapped once: the wrapper's target is the SDK's own function, not another wrapper.
        assert wrapper.__wrapped__ is originals[("openai.resources.chat.completions", "Completions", "create")]
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=10)
        assert len(exporter.get_finished_spans()) == 1
    finally:
        instrumentor.uninstrument()
    for key, fn in originals.items():
        assert _original(*key) is fn, key
    assert not isinstance(vars(Completions)["create"], wrapt.ObjectProxy)
    exporter.clear()
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=10)
    assert exporter.get_finished_spans() == ()


# == 10. Substitute ===========================================================================
def test_substitute_from_on_exceeded(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    seen: list[dict[str, Any]] = []

    def on_exceeded(info: dict[str, Any]) -> Any:
        seen.append(info)
        return Substitute("fallback")

    setup(max_usd=0, on_exceeded=on_exceeded)
    assert client.chat.completions.create(model=MINI, messages=MESSAGES) == "fallback"
    assert client.chat.completions.create(model=MINI, messages=MESSAGES, stream=True) == "fallback"
    assert client.embeddings.create(model="text-embedding-3-small", input="x") == "fallback"

    async def main() -> Any:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        try:
            return await c.responses.create(model=MINI, input="x")
        finally:
            await c.close()

    assert run(main()) == "fallback"
    assert server.stats()["requests"] == 0
    assert len(seen) == 4 and seen[0]["reason"] == "limit"
    assert all(s.status.status_code is StatusCode.ERROR for s in exporter.get_finished_spans())


# == 11. unknown models =======================================================================
def test_unknown_model_is_refused_unless_priced_as(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0)
    with pytest.raises(BudgetExceededError) as info:
        client.chat.completions.create(model="my-private-model", messages=MESSAGES, max_tokens=10)
    assert info.value.reason == "unknown_model"
    assert "my-private-model" in str(info.value)
    assert server.stats()["requests"] == 0
    assert_error_span(only(exporter, "chat my-private-model"), "BudgetExceededError")

    exporter.clear()
    processor = setup(max_usd=1.0, prices=PriceBook(unknown_model="price_as:gpt-4o"))
    client.chat.completions.create(model="my-private-model", messages=MESSAGES, max_tokens=10)
    assert server.stats()["requests"] == 1
    span = only(exporter, "chat my-private-model")
    assert span.status.status_code is StatusCode.UNSET
    # Priced as gpt-4o: 10 output tokens at $10/MTok, plus the input at $2.50/MTok.
    expected = server.last_call.input_tokens * 2500 + 10 * 10_000
    assert nanos(span.attributes[attrs.COST_USD]) == expected
    assert ledger(processor) == (expected, 0)


# == 12. sampling does not switch enforcement off =============================================
def test_sampled_out_spans_are_still_enforced(
    make_processor: Any, server: FakeLLMServer, client: Any, exporter: Any
) -> None:
    limit = 1_000_000  # $0.001
    processor = make_processor(max_usd=limit / NANOS, prices=PriceBook())
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument(tracer_provider=TracerProvider(sampler=ALWAYS_OFF))
    try:
        done = 0
        with pytest.raises(BudgetExceededError):
            for done in range(1000):  # noqa: B007
                client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=100)
    finally:
        instrumentor.uninstrument()
    assert 10 < done < 1000
    assert exporter.get_finished_spans() == ()  # nothing sampled, nothing exported
    billed = server.stats()["billed_nanos"]
    assert billed <= limit
    assert ledger(processor) == (billed, 0)


# == clients and SDK surfaces: Azure, subclasses, raw responses, legacy completions, n =========
def test_azure_client_and_subclasses(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0, default_max_output_tokens=50)

    class CorpClient(openai.AzureOpenAI):  # an Azure client whose name does not say so
        pass

    class MyOpenAI(openai.OpenAI):
        pass

    for cls in (openai.AzureOpenAI, CorpClient):
        exporter.clear()
        az = cls(
            azure_endpoint="https://corp.openai.azure.com", api_key="test", api_version="2024-10-21",
            max_retries=0, http_client=httpx2.Client(transport=Redirect(server.url)),
        )  # fmt: skip
        az.chat.completions.create(model=MINI, messages=MESSAGES)
        span = only(exporter)
        assert span.attributes[attrs.GEN_AI_PROVIDER_NAME] == "azure.ai.openai", cls
        assert span.attributes[attrs.SERVER_ADDRESS] == "corp.openai.azure.com"
        assert server.last_call.body["max_completion_tokens"] == 50
        assert_settled_from_server(span, server)
        az.close()

    exporter.clear()
    mine = MyOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    mine.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=10)
    span = only(exporter)
    assert span.attributes[attrs.GEN_AI_PROVIDER_NAME] == "openai"
    assert_settled_from_server(span, server)
    mine.close()

    async def main() -> None:
        exporter.clear()
        az = openai.AsyncAzureOpenAI(
            azure_endpoint="https://corp.openai.azure.com", api_key="test", api_version="2024-10-21",
            max_retries=0, http_client=httpx2.AsyncClient(transport=AsyncRedirect(server.url)),
        )  # fmt: skip
        await az.chat.completions.create(model=MINI, messages=MESSAGES)
        span = only(exporter)
        assert span.attributes[attrs.GEN_AI_PROVIDER_NAME] == "azure.ai.openai"
        assert_settled_from_server(span, server)
        await az.close()

    run(main())
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_with_raw_response_is_metered(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    raw = client.chat.completions.with_raw_response.create(model=MINI, messages=MESSAGES, max_tokens=20)
    assert raw.parse().usage is not None
    span = only(exporter)
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_with_raw_response_stream_is_metered_from_the_stream(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    raw = client.chat.completions.with_raw_response.create(
        model=MINI, messages=MESSAGES, max_tokens=20, stream=True
    )
    assert raw.headers.get("x-request-id")
    assert not spans_named(exporter, f"chat {MINI}")  # not settled before the stream is read
    chunks = list(raw.parse())
    assert chunks and all(c.choices for c in chunks)
    span = only(exporter)
    assert attrs.COST_ESTIMATED not in span.attributes
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_with_streaming_response_stream_left_early_settles_at_exit(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with client.chat.completions.with_streaming_response.create(
        model=MINI, messages=MESSAGES, max_tokens=20, stream=True
    ) as response:
        for _chunk in response.parse():
            break
    span = only(exporter)
    assert span.attributes[attrs.COST_USD] > 0
    assert ledger(processor)[1] == 0


def test_async_raw_and_streaming_responses_are_metered(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        # with_streaming_response: parse() is a coroutine there
        async with c.chat.completions.with_streaming_response.create(
            model=MINI, messages=MESSAGES, max_tokens=20
        ) as response:
            completion = await response.parse()
        assert completion.usage is not None
        assert_settled_from_server(only(exporter), server)
        exporter.clear()
        async with c.chat.completions.with_streaming_response.create(
            model=MINI, messages=MESSAGES, max_tokens=20, stream=True
        ) as response:
            async for _chunk in await response.parse():
                pass
        assert_settled_from_server(only(exporter), server)
        exporter.clear()
        raw = await c.chat.completions.with_raw_response.create(
            model=MINI, messages=MESSAGES, max_tokens=20, stream=True
        )
        async for _chunk in raw.parse():
            pass
        assert_settled_from_server(only(exporter), server)
        await c.close()

    run(main())
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_legacy_completions_are_metered(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.default_output_tokens = 100
    reply = client.completions.create(model=MINI, prompt="Once upon a time")
    # Absent max_tokens means 16 for this API: sent as such, not as the (larger) default cap.
    assert server.last_call.body["max_tokens"] == 16
    assert reply.usage.completion_tokens == 16
    span = only(exporter, f"text_completion {MINI}")
    assert starts.at_start[span.context.span_id][attrs.GEN_AI_OPERATION_NAME] == "text_completion"
    assert list(span.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["length"]
    assert_settled_from_server(span, server)

    exporter.clear()
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MINI, prompt="Once upon a time", max_tokens=8, stream=True))
    assert len(text.split()) == 8
    span = only(exporter, f"text_completion {MINI}")
    assert_settled_from_server(span, server)

    async def main() -> None:
        c = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
        await c.completions.create(model=MINI, prompt="Once", max_tokens=4)
        await c.close()

    exporter.clear()
    run(main())
    assert_settled_from_server(only(exporter, f"text_completion {MINI}"), server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_stream_in_band_error_is_charged(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(stream_error_after=4))
    with pytest.raises(openai.APIError):
        list(stream_chat(client))
    span = only(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.COST_USD] > 0
    assert ledger(processor) == (nanos(span.attributes[attrs.COST_USD]), 0)


def test_n_choices_cannot_overshoot(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    estimate = estimate_input_tokens(MINI, messages=MESSAGES).tokens
    limit = estimate * 150 + 150 * 600  # room for the input and 150 output tokens
    processor = setup(max_usd=limit / NANOS)
    server.default_output_tokens = 100
    reply = client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=100, n=3)
    # Each of the 3 choices may use the whole cap: the 150 affordable tokens are split.
    assert server.last_call.body["max_tokens"] == 50
    assert [c.finish_reason for c in reply.choices] == ["length"] * 3
    span = only(exporter)
    assert span.attributes[COST_OUTPUT_CAPPED] == 50
    assert attrs.COST_OVERSHOOT_USD not in span.attributes
    assert_settled_from_server(span, server)
    assert ledger(processor)[0] == server.stats()["billed_nanos"] <= limit


# == regressions of bugs found in shared code ==
def test_streams_closed_early_cannot_overshoot(setup: Any, client: Any, server: FakeLLMServer) -> None:
    limit = 200_000
    setup(max_usd=limit / NANOS)
    server.default_output_tokens = 100
    with pytest.raises(BudgetExceededError):
        for _ in range(1000):
            stream = stream_chat(client, max_tokens=100)
            next(stream)
            next(stream)
            # The provider finished generating (and billing) while the caller read two chunks.
            assert server.wait_idle(5)
            stream.close()
    assert server.wait_idle(5)
    assert server.stats()["billed_nanos"] <= limit


def test_assumed_output_bound_is_not_reported_as_a_request_parameter(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0, cap_output_tokens=False, default_max_output_tokens=50)
    client.chat.completions.create(model=MINI, messages=MESSAGES)
    assert "max_tokens" not in server.last_call.body
    span = only(exporter)
    assert span.attributes[attrs.COST_OUTPUT_ASSUMED] is True
    assert attrs.GEN_AI_REQUEST_MAX_TOKENS not in span.attributes


def test_unknown_model_refusal_is_reported_once(setup: Any, client: Any, server: FakeLLMServer) -> None:
    seen: list[str] = []
    processor = setup(max_usd=1.0, on_exceeded=lambda info: seen.append(info["reason"]))
    processor.pause("*")
    with pytest.raises(BudgetExceededError):
        client.chat.completions.create(model="my-private-model", messages=MESSAGES, max_tokens=10)
    assert server.stats()["requests"] == 0
    assert len(seen) == 1
