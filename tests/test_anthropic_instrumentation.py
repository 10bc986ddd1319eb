"""The anthropic instrumentor, through the real ``anthropic`` SDK against ``FakeLLMServer``.

Every test drives a real client (``Anthropic``, ``AsyncAnthropic``) over HTTP on 127.0.0.1
and checks the spans exported, the budget ledger and what the fake provider says it billed
against each other. The fake server prices claude-sonnet-4-5 like genai-prices does, cache
included (reads at 0.1x the input price, 5-minute writes at 1.25x; the server's default would
bill both at the input price), so a span's cost can be compared to the bill to the nano-dollar.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import importlib
import json
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import anthropic
import pydantic
import pytest
import wrapt
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from otel_budget import BudgetExceededError, PriceBook, Substitute, budget
from otel_budget import attributes as attrs
from otel_budget.instrumentation._call import COST_OUTPUT_CAPPED, IN_METERED_CALL
from otel_budget.instrumentation.anthropic import _TARGETS, AnthropicBudgetInstrumentor
from otel_budget.instrumentation.anthropic.response import anthropic_usage
from otel_budget.instrumentation.anthropic.streams import MessagesAccumulator
from otel_budget.metered import error_type
from otel_budget.pricing import TokenUsage
from otel_budget.storage.memory import MemoryStorage
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

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

CLAUDE = "claude-sonnet-4-5"
SPAN = f"chat {CLAUDE}"
SDK_SPAN = "anthropic.messages.create"
SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# genai-prices: (input, output, cache read, cache write 5m) USD per MTok.
SERVER_PRICES = {CLAUDE: (3.0, 15.0, 0.3, 3.75)}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture
def server(shared_server: FakeLLMServer) -> FakeLLMServer:
    """The module's server (one server and one client keep the suite fast), reset."""
    assert shared_server.wait_idle(5)  # the previous test's requests are fully accounted
    shared_server.clear_script()
    shared_server.reset_stats()
    shared_server.default_output_tokens = 20
    shared_server.latency_s = 0.0
    return shared_server


@pytest.fixture
def instrumented() -> Iterator[AnthropicBudgetInstrumentor]:
    instrumentor = AnthropicBudgetInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture(scope="module")
def shared_client(shared_server: FakeLLMServer) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=shared_server.anthropic_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def client(server: FakeLLMServer, shared_client: anthropic.Anthropic) -> anthropic.Anthropic:
    return shared_client


def aclient(server: FakeLLMServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key="test", max_retries=0)


def only(exporter: Any, name: str = SPAN) -> Any:
    return only_span(exporter, name)


# -- helpers -----------------------------------------------------------------------------------
def create(c: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 300)
    kwargs.setdefault("messages", MESSAGES)
    return c.messages.create(model=CLAUDE, **kwargs)


def stream_helper(c: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 300)
    kwargs.setdefault("messages", MESSAGES)
    return c.messages.stream(model=CLAUDE, **kwargs)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# == 1. JSON: attributes at start and at end ===================================================
def test_json_span_attributes_at_start_and_end(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(cached_tokens=64, cache_creation_tokens=32, reasoning_tokens=5))
    reply = create(client, system=SYSTEM, stop_sequences=["END"])
    span = only(exporter)
    assert span.kind is SpanKind.CLIENT
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.GEN_AI_OPERATION_NAME] == "chat"
    assert at_start[attrs.GEN_AI_PROVIDER_NAME] == "anthropic"
    assert at_start[attrs.GEN_AI_REQUEST_MODEL] == CLAUDE
    assert at_start[attrs.SERVER_ADDRESS] == "127.0.0.1"
    assert at_start[attrs.SERVER_PORT] == server.port
    assert at_start[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 300
    assert list(at_start["gen_ai.request.stop_sequences"]) == ["END"]
    assert attrs.COST_USD not in at_start  # the actual cost is only known at the end
    # The projection is there at start and covers the worst case: input estimate + max_tokens.
    estimate = estimate_input_tokens(CLAUDE, messages=MESSAGES, system=SYSTEM).tokens
    worst = processor.prices.quote("anthropic", CLAUDE, TokenUsage(input_tokens=estimate, output_tokens=300))
    assert nanos(at_start[attrs.COST_PROJECTED_USD]) == worst.nanos > 0

    end = span.attributes
    assert end[attrs.GEN_AI_RESPONSE_ID] == reply.id
    assert end[attrs.GEN_AI_RESPONSE_MODEL] == CLAUDE
    assert list(end[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["stop"]  # end_turn
    # Anthropic's input_tokens excludes the cache; the semconv input_tokens includes it.
    assert reply.usage.cache_read_input_tokens == 64
    assert reply.usage.cache_creation_input_tokens == 32
    total_input = reply.usage.input_tokens + 64 + 32
    assert end[attrs.GEN_AI_USAGE_INPUT_TOKENS] == total_input == server.last_call.input_tokens
    assert end[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 64
    assert end[attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS] == 32
    assert end[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == reply.usage.output_tokens == 25
    assert end[attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 5
    assert end[attrs.PRICE_SOURCE].startswith("genai-prices")
    assert attrs.COST_ESTIMATED not in end
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.last_call.billed_nanos, 0)
    assert span.status.status_code is StatusCode.UNSET


def test_no_message_content_unless_opted_in(
    setup: Any, client: Any, exporter: Any, monkeypatch: Any
) -> None:
    setup(max_usd=1.0)
    monkeypatch.delenv(CAPTURE_ENV, raising=False)
    create(client, system=SYSTEM)
    span = only(exporter)
    text = json.dumps({k: str(v) for k, v in span.attributes.items()})
    assert "budgets" not in text and "fake reply" not in text and "terse" not in text

    exporter.clear()
    monkeypatch.setenv(CAPTURE_ENV, "true")
    create(client, system=SYSTEM)
    span = only(exporter)
    assert "Say something short about budgets." in span.attributes["gen_ai.input.messages"]
    assert "terse" in span.attributes["gen_ai.system_instructions"]
    output = json.loads(span.attributes["gen_ai.output.messages"])
    assert output[0]["role"] == "assistant" and "fake reply" in output[0]["parts"][0]["content"]


def test_sdk_span_is_kept_as_a_child_and_charged_once(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    """anthropic 2.x emits its own ``anthropic.messages.create`` span per call (tracing is on
    by default). It is kept, as a child of ours with its HTTP attributes, and never charged:
    the ledger equals the bill, JSON, stream and helper, sync and async."""
    processor = setup(max_usd=1.0)
    create(client)
    with create(client, stream=True) as stream:
        for _event in stream:
            pass
    with stream_helper(client) as helper:
        helper.get_final_message()

    async def main() -> None:
        c = aclient(server)
        await create(c)
        async for _event in await create(c, stream=True):
            pass
        async with stream_helper(c) as helper:
            await helper.get_final_message()
        await c.close()

    run(main())
    ours, sdk = spans_named(exporter, SPAN), spans_named(exporter, SDK_SPAN)
    assert len(ours) == len(sdk) == 6
    by_id = {span.context.span_id: span for span in ours}
    for span in sdk:
        parent = by_id[span.parent.span_id]  # each a child of one of ours
        assert span.context.trace_id == parent.context.trace_id
        assert span.attributes["http.response.status_code"] == 200
        assert attrs.COST_USD not in span.attributes
    assert len({span.parent.span_id for span in sdk}) == 6
    # The trace context sent to the provider names the SDK's span, inside ours.
    header = server.last_call.headers.get("traceparent") or ""
    assert f"{sdk[-1].context.span_id:016x}" in header
    assert server.stats()["requests"] == 6
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)
    assert sum(nanos(span.attributes[attrs.COST_USD]) for span in ours) == server.stats()["billed_nanos"]
    # Outside a metered call (count_tokens is not billed, not wrapped) the SDK's spans stay.
    client.messages.count_tokens(model=CLAUDE, messages=MESSAGES)
    assert len(spans_named(exporter, "anthropic.messages.count_tokens")) == 1


def test_keep_sdk_spans_is_accepted_and_changes_nothing(
    make_processor: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = make_processor(max_usd=1.0, prices=PriceBook())
    for keep in (True, False):
        instrumentor = AnthropicBudgetInstrumentor()
        instrumentor.instrument(keep_sdk_spans=keep)
        try:
            create(client)
        finally:
            instrumentor.uninstrument()
        ours, sdk = only(exporter), only(exporter, SDK_SPAN)
        assert sdk.parent.span_id == ours.context.span_id
        assert_settled_from_server(ours, server)
        exporter.clear()
    assert ledger(processor)[0] == server.stats()["billed_nanos"]


# == 2. refusal before any request =============================================================
@pytest.mark.parametrize("kind", ["json", "stream", "helper"])
def test_refused_before_any_http_request(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any, kind: str
) -> None:
    processor = setup(max_usd=0.000001)  # 1000 nano-USD: not even the input fits
    with pytest.raises(BudgetExceededError) as info:
        if kind == "json":
            create(client)
        elif kind == "stream":
            create(client, stream=True)
        else:
            stream_helper(client)
    assert info.value.reason == "limit"
    assert server.stats()["requests"] == 0
    span = only(exporter)
    assert_error_span(span, "BudgetExceededError")
    assert span.attributes[attrs.COST_PROJECTED_USD] > 0.000001
    assert ledger(processor) == (0, 0)


# == 3. max_tokens lowered to what the budget affords ==========================================
def test_max_tokens_is_lowered_to_what_the_budget_affords(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=0.001)  # 1_000_000 nano-USD: ~60 output tokens
    server.default_output_tokens = 5000
    reply = create(client, max_tokens=1000)
    body = server.last_call.body
    span = only(exporter)
    at_start = starts.at_start[span.context.span_id]
    assert at_start[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 1000  # what the caller asked for
    cap = span.attributes[COST_OUTPUT_CAPPED]  # set before sending
    assert body["max_tokens"] == cap == span.attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS]
    assert 16 <= cap < 1000
    estimate = estimate_input_tokens(CLAUDE, messages=MESSAGES).tokens

    def cost(out: int) -> int:
        return processor.prices.quote("anthropic", CLAUDE, TokenUsage(input_tokens=estimate, output_tokens=out)).nanos

    assert cost(cap) <= 1_000_000 < cost(cap + 1)  # the largest cap that fits
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == cap
    assert list(span.attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["length"]
    assert server.stats()["billed_nanos"] <= 1_000_000
    assert_settled_from_server(span, server)


def test_max_tokens_lowered_in_the_stream_helper_body(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=0.001)
    server.default_output_tokens = 5000
    with stream_helper(client, max_tokens=1000) as stream:
        message = stream.get_final_message()
    cap = server.last_call.body["max_tokens"]
    assert 16 <= cap < 1000 and message.usage.output_tokens == cap
    assert server.stats()["billed_nanos"] <= 1_000_000
    assert_settled_from_server(only(exporter), server)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_thinking_budget_follows_a_lowered_max_tokens(setup: Any, client: Any, server: FakeLLMServer) -> None:
    setup(max_usd=0.025)  # affords ~1660 output tokens
    thinking = {"type": "enabled", "budget_tokens": 4000}
    create(client, max_tokens=8000, thinking=thinking)
    body = server.last_call.body
    cap = body["max_tokens"]
    assert 1025 < cap < 8000
    # budget_tokens counts inside max_tokens and must stay below it, or the API rejects it.
    assert body["thinking"] == {"type": "enabled", "budget_tokens": cap - 1}
    assert thinking == {"type": "enabled", "budget_tokens": 4000}  # the caller's dict is untouched
    # Not lowered: left as it was.
    setup(max_usd=1.0)
    create(client, max_tokens=8000, thinking=thinking)
    assert server.last_call.body["thinking"]["budget_tokens"] == 4000


def test_refused_below_min_output_tokens(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    estimate = estimate_input_tokens(CLAUDE, messages=MESSAGES).tokens
    room = estimate * 3000 + 10 * 15000  # the input plus 10 output tokens (min is 16)
    setup(max_usd=room / NANOS)
    with pytest.raises(BudgetExceededError):
        create(client, max_tokens=1000)
    assert server.stats()["requests"] == 0
    assert_error_span(only(exporter), "BudgetExceededError")
    # With a lower minimum, the same budget lets a truncated call through.
    exporter.clear()
    processor = setup(max_usd=room / NANOS, min_output_tokens=5)
    create(client, max_tokens=1000)
    assert server.last_call.body["max_tokens"] == 10
    assert ledger(processor)[0] == server.stats()["billed_nanos"] <= room


# == 4. stream=True: the raw event stream ======================================================
def test_raw_stream_fully_consumed(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(cached_tokens=100, cache_creation_tokens=50, reasoning_tokens=4))
    stream = create(client, stream=True)
    assert not spans_named(exporter, SPAN)  # open while the caller reads
    events = list(stream)
    assert events[0].type == "message_start"
    span = only(exporter)
    assert starts.at_start[span.context.span_id]["gen_ai.request.stream"] is True
    end = span.attributes
    assert end[attrs.GEN_AI_USAGE_INPUT_TOKENS] == server.last_call.input_tokens
    assert end[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 100
    assert end[attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS] == 50
    # message_start's placeholder output count is replaced by message_delta's final one.
    assert end[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == server.last_call.output_tokens == 24
    assert end[attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] == 4
    assert end[attrs.GEN_AI_RESPONSE_ID] == events[0].message.id
    assert list(end[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ["stop"]  # end_turn
    assert attrs.COST_ESTIMATED not in end
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.last_call.billed_nanos, 0)


def test_raw_stream_with_block_and_close(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    with create(client, stream=True) as stream:
        for _event in stream:
            pass
    assert_settled_from_server(only(exporter), server)

    exporter.clear()
    stream = create(client, stream=True)
    for _ in range(5):  # message_start, block start, ping, two deltas
        next(stream)
    stream.close()
    span = only(exporter)
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] >= 2  # estimated from the stream
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 1  # as message_start said
    stream.close()  # idempotent
    assert len(spans_named(exporter, SPAN)) == 1
    assert ledger(processor)[1] == 0


def test_raw_stream_broken_mid_stream_charges_what_was_produced(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(break_stream_after=2))
    with pytest.raises(Exception) as info:  # noqa: PT011 - the transport's error, whatever it is
        list(create(client, stream=True))
    assert not isinstance(info.value, BudgetExceededError)
    span = only(exporter)
    assert_error_span(span, error_type(info.value))
    assert server.wait_idle(5)
    assert server.stats()["broken_streams"] == 1
    billed = server.stats()["billed_nanos"]
    cost = nanos(span.attributes[attrs.COST_USD])
    # The input (exact, from message_start) was billed: charged, never less than the bill.
    assert billed > 0 and billed <= cost <= nanos(span.attributes[attrs.COST_PROJECTED_USD])
    assert ledger(processor) == (cost, 0)


def test_raw_stream_in_band_error_event(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(stream_error_after=6))
    with pytest.raises(anthropic.APIStatusError):
        list(create(client, stream=True))
    span = only(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert server.wait_idle(5)
    assert nanos(span.attributes[attrs.COST_USD]) >= server.stats()["billed_nanos"] > 0
    assert ledger(processor)[1] == 0


def test_raw_stream_early_break_then_dropped_is_settled_from_streamed_output(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    stream = create(client, stream=True)
    deltas = 0
    for event in stream:
        deltas += event.type == "content_block_delta"
        if deltas == 4:
            break
    assert not spans_named(exporter, SPAN)
    del stream, event
    gc.collect()
    span = only(exporter)
    assert server.wait_idle(5)  # the server's accounting of the dropped stream is final
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] >= 4  # estimated from the streamed text
    # The input is exact (message_start), so the cost is more than the input alone.
    inp = span.attributes[attrs.GEN_AI_USAGE_INPUT_TOKENS]
    assert inp == server.last_call.input_tokens
    assert nanos(span.attributes[attrs.COST_USD]) >= inp * 3000 + 4 * 15000
    spent, reserved = ledger(processor)
    assert spent == nanos(span.attributes[attrs.COST_USD]) and reserved == 0


def test_raw_stream_never_iterated_and_dropped_is_settled(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    stream = create(client, stream=True)
    assert ledger(processor)[1] > 0  # reserved while the stream is open
    del stream
    gc.collect()
    assert only(exporter).attributes[attrs.COST_USD] > 0  # the input was billed: never free
    assert ledger(processor)[1] == 0


# == 5. messages.stream(): the MessageStreamManager ============================================
def test_stream_helper_get_final_message(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(cached_tokens=10))
    manager = stream_helper(client, system=SYSTEM)
    assert server.stats()["requests"] == 0  # the manager sends on __enter__
    with manager as stream:
        message = stream.get_final_message()
    assert server.stats()["requests"] == 1
    span = only(exporter)
    assert starts.at_start[span.context.span_id][attrs.COST_PROJECTED_USD] > 0
    assert span.attributes[attrs.GEN_AI_RESPONSE_ID] == message.id
    assert span.attributes[attrs.GEN_AI_USAGE_INPUT_TOKENS] == message.usage.input_tokens + 10
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == message.usage.output_tokens
    assert_settled_from_server(span, server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_stream_helper_text_stream_and_until_done(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with stream_helper(client) as stream:
        text = "".join(stream.text_stream)
    assert text.startswith("This is a fake reply")
    assert_settled_from_server(only(exporter), server)

    exporter.clear()
    with stream_helper(client) as stream:
        stream.until_done()
        assert stream.get_final_text().startswith("This is")
    assert_settled_from_server(only(exporter), server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_stream_helper_left_early_settles_at_exit(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with stream_helper(client) as stream:
        for event in stream:
            if event.type == "text":
                break
    span = only(exporter)  # settled at the block's exit, not by the garbage collector
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.COST_USD] > 0
    assert ledger(processor)[1] == 0


def test_stream_helper_entered_then_abandoned_is_settled(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    stream = stream_helper(client).__enter__()
    next(iter(stream))
    del stream
    gc.collect()
    assert only(exporter).attributes[attrs.COST_USD] > 0
    assert ledger(processor)[1] == 0


def test_stream_helper_entered_twice_is_metered_twice(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    manager = stream_helper(client)
    for _ in range(2):
        with manager as stream:
            stream.until_done()
    assert server.stats()["requests"] == 2
    assert len(spans_named(exporter, SPAN)) == 2
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_stream_helper_never_entered_releases_the_reservation(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    manager = stream_helper(client)
    assert ledger(processor)[1] > 0
    del manager
    gc.collect()
    assert ledger(processor) == (0, 0)
    assert server.stats()["requests"] == 0
    assert_error_span(
        only(exporter), "otel_budget.instrumentation.anthropic.wrappers.StreamManagerNotEnteredError"
    )


def test_stream_helper_error_on_enter_releases(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(status=529))
    with pytest.raises(anthropic.APIStatusError):
        with stream_helper(client):
            pass
    assert ledger(processor) == (0, 0)
    assert only(exporter).status.status_code is StatusCode.ERROR


# == 6. errors release the reservation =========================================================
@pytest.mark.parametrize("status, error", [(429, "RateLimitError"), (500, "InternalServerError")])
def test_http_errors_release_the_reservation(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any, status: int, error: str
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(status=status))
    with pytest.raises(anthropic.APIStatusError):
        create(client)
    assert ledger(processor) == (0, 0)
    span = only(exporter)
    assert_error_span(span, f"anthropic.{error}")
    assert span.attributes[attrs.COST_USD] == 0.0
    assert server.stats()["billed_nanos"] == 0


# == 7. async ==================================================================================
def test_async_json_stream_and_helper(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)

    async def main() -> None:
        c = aclient(server)
        server.script(Behaviour(cached_tokens=20, cache_creation_tokens=30))
        reply = await create(c)
        span = only(exporter)
        assert span.attributes[attrs.GEN_AI_USAGE_INPUT_TOKENS] == reply.usage.input_tokens + 50
        assert_settled_from_server(span, server)
        # stream=True
        exporter.clear()
        stream = await create(c, stream=True)
        async for _event in stream:
            pass
        assert_settled_from_server(only(exporter), server)
        # messages.stream(): get_final_message and text_stream
        exporter.clear()
        async with stream_helper(c) as helper:
            message = await helper.get_final_message()
        assert message.usage.output_tokens == 20
        assert_settled_from_server(only(exporter), server)
        exporter.clear()
        async with stream_helper(c) as helper:
            text = "".join([t async for t in helper.text_stream])
        assert text.startswith("This is")
        assert_settled_from_server(only(exporter), server)
        await c.close()

    run(main())
    assert server.stats()["requests"] == 4
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_async_stream_endings_and_errors(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)

    async def main() -> None:
        c = aclient(server)
        # broken mid-stream
        server.script(Behaviour(break_stream_after=2))
        stream = await create(c, stream=True)
        with pytest.raises(Exception) as info:  # noqa: PT011
            async for _event in stream:
                pass
        assert_error_span(only(exporter), error_type(info.value))
        assert only(exporter).attributes[attrs.COST_USD] > 0
        # close() part-way
        exporter.clear()
        stream = await create(c, stream=True)
        await stream.__anext__()
        await stream.close()
        span = only(exporter)
        assert span.attributes[attrs.COST_ESTIMATED] is True and span.attributes[attrs.COST_USD] > 0
        # early break then dropped
        exporter.clear()
        stream = await create(c, stream=True)
        async for _event in stream:
            break
        del stream, _event
        gc.collect()
        assert only(exporter).attributes[attrs.COST_USD] > 0
        # the helper left early
        exporter.clear()
        async with stream_helper(c) as helper:
            async for _event in helper:
                break
        assert only(exporter).attributes[attrs.COST_USD] > 0
        # errors
        for status, error in ((429, "RateLimitError"), (500, "InternalServerError")):
            exporter.clear()
            server.script(Behaviour(status=status))
            with pytest.raises(anthropic.APIStatusError):
                await create(c)
            assert_error_span(only(exporter), f"anthropic.{error}")
        exporter.clear()
        server.script(Behaviour(status=500))
        with pytest.raises(anthropic.APIStatusError):
            async with stream_helper(c):
                pass
        assert only(exporter).status.status_code is StatusCode.ERROR
        await c.close()

    run(main())
    assert ledger(processor)[1] == 0


def test_async_helper_never_entered_reserves_nothing(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    """The async manager reserves on ``__aenter__`` (``stream()`` is a plain function of the
    async client: reserving there would block the event loop on the ledger)."""
    processor = setup(max_usd=1.0)

    async def main() -> None:
        c = aclient(server)
        manager = stream_helper(c)
        assert ledger(processor) == (0, 0)
        del manager
        gc.collect()
        await c.close()

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "coroutine was never awaited"
        run(main())
        gc.collect()
    assert ledger(processor) == (0, 0)
    assert server.stats()["requests"] == 0
    assert spans_named(exporter, SPAN) == []


def test_async_refusal_before_any_request(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    setup(max_usd=0.000001)

    async def main() -> None:
        c = aclient(server)
        with pytest.raises(BudgetExceededError):
            await create(c)
        with pytest.raises(BudgetExceededError):
            await create(c, stream=True)
        manager = stream_helper(c)  # reserves (and refuses) when entered
        with pytest.raises(BudgetExceededError):
            async with manager:
                pass
        await c.close()

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the unsent coroutine is closed
        run(main())
        gc.collect()
    assert server.stats()["requests"] == 0
    assert len(spans_named(exporter, SPAN)) == 3


def test_async_helper_substitute_on_entry(
    make_processor: Any, instrumented: Any, server: FakeLLMServer, exporter: Any
) -> None:
    make_processor(max_usd=0.000001, on_exceeded=lambda error: Substitute("cached"))

    async def main() -> Any:
        c = aclient(server)
        async with stream_helper(c) as helper:
            value = helper
        await c.close()
        return value

    assert run(main()) == "cached"
    assert server.stats()["requests"] == 0


class _LoopGuardStorage(MemoryStorage):
    """Notes every blocking ledger method called while an event loop runs on this thread
    (the ``a``-methods of the in-memory ledger call them directly: those are allowed)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[tuple[str, bool]] = []  # (method, called by a stream proxy)

    def _check(self, name: str) -> None:
        if not _IN_ASYNC.get():
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return
            callers = {frame.filename.rsplit("/", 1)[-1] for frame in traceback.extract_stack()}
            self.blocked.append((name, "_stream.py" in callers))


def _guarded(name: str) -> Any:
    def blocking(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._check(name)
        return getattr(MemoryStorage, name)(self, *args, **kwargs)

    async def coroutine(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _IN_ASYNC.set(True)
        try:
            return await getattr(MemoryStorage, "a" + name)(self, *args, **kwargs)
        finally:
            _IN_ASYNC.reset(token)

    return blocking, coroutine


_IN_ASYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("_IN_ASYNC", default=False)
for _name in ("reserve_up_to", "reserve", "commit", "release", "charge"):
    _blocking, _coroutine = _guarded(_name)
    setattr(_LoopGuardStorage, _name, _blocking)
    setattr(_LoopGuardStorage, "a" + _name, _coroutine)


def test_async_paths_never_call_a_blocking_ledger_method(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    storage = _LoopGuardStorage()
    processor = setup(max_usd=1.0, storage=storage)

    async def main() -> None:
        c = aclient(server)
        await create(c)
        async for _event in await create(c, stream=True):
            pass
        async with stream_helper(c) as helper:
            await helper.get_final_message()
        server.script(Behaviour(status=500))
        with pytest.raises(anthropic.APIStatusError):
            await create(c)
        server.script(Behaviour(text="not json at all"))  # billed, then fails to validate
        with pytest.raises(pydantic.ValidationError):
            await c.messages.parse(model=CLAUDE, messages=MESSAGES, max_tokens=50, output_format=Verdict)
        await c.close()

    run(main())
    # The stream proxies of ``instrumentation._stream`` (shared by every SDK, not this
    # package's) still settle with blocking calls: everything else here awaits the ledger.
    assert [name for name, by_proxy in storage.blocked if not by_proxy] == []
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_max_tokens_left_out_is_not_filled_in(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    """``max_tokens`` is required by the SDK: a call without it fails as it would
    uninstrumented (nothing sent, reservation released), still projected with the default
    output bound, flagged as assumed."""
    processor = setup(max_usd=1.0)
    with pytest.raises(TypeError):
        client.messages.create(model=CLAUDE, messages=MESSAGES)
    with pytest.raises(TypeError):
        client.messages.stream(model=CLAUDE, messages=MESSAGES)

    async def main() -> None:
        c = aclient(server)
        with pytest.raises(TypeError):
            await c.messages.create(model=CLAUDE, messages=MESSAGES)
        await c.close()

    run(main())
    assert server.stats()["requests"] == 0
    assert ledger(processor) == (0, 0)
    spans = spans_named(exporter, SPAN)
    assert len(spans) == 3  # create, stream(), async create
    for span in spans:
        at_start = starts.at_start[span.context.span_id]
        assert at_start[attrs.COST_OUTPUT_ASSUMED] is True
        assert at_start[attrs.COST_PROJECTED_USD] > 0
        assert_error_span(span, "TypeError")
        # Not sent, so not reported as sent: the request carried no max_tokens.
        assert attrs.GEN_AI_REQUEST_MAX_TOKENS not in span.attributes
        assert span.attributes[attrs.COST_USD] == 0.0


# == 8. cache pricing ==========================================================================
def test_cache_read_and_write_are_priced_at_their_rates(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(input_tokens=1000, cached_tokens=4000, cache_creation_tokens=2000, output_tokens=10))
    reply = create(client)
    assert reply.usage.input_tokens == 1000  # Anthropic's raw count: without the cache
    span = only(exporter)
    assert span.attributes[attrs.GEN_AI_USAGE_INPUT_TOKENS] == 7000
    # $3 input, $0.30 cache read (0.1x), $3.75 cache write (1.25x), $15 output, per MTok.
    expected = 1000 * 3000 + 4000 * 300 + 2000 * 3750 + 10 * 15000
    assert nanos(span.attributes[attrs.COST_USD]) == expected == server.last_call.billed_nanos
    usage = TokenUsage(input_tokens=7000, output_tokens=10, cache_read_tokens=4000, cache_write_tokens=2000)
    assert processor.prices.quote("anthropic", CLAUDE, usage).nanos == expected
    assert ledger(processor) == (expected, 0)


def test_usage_readers() -> None:
    usage = anthropic_usage({"input_tokens": 5, "cache_read_input_tokens": 7,
                             "cache_creation_input_tokens": None, "output_tokens": 3})  # fmt: skip
    assert usage == TokenUsage(input_tokens=12, output_tokens=3, cache_read_tokens=7)
    assert anthropic_usage(None) is None
    acc = MessagesAccumulator(fallback_input=99)
    assert acc.usage is None  # nothing seen: the call falls back to its own estimate
    acc.add({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 8}})
    assert acc.usage == TokenUsage(input_tokens=99, output_tokens=8)  # input never reported
    assert acc.attributes()[attrs.COST_ESTIMATED] is True


# == 9. Substitute =============================================================================
def test_substitute_none_from_on_exceeded(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    seen: list[dict[str, Any]] = []

    def on_exceeded(info: dict[str, Any]) -> Any:
        seen.append(info)
        return Substitute(None)

    setup(max_usd=0, on_exceeded=on_exceeded)
    assert create(client) is None
    assert create(client, stream=True) is None
    assert stream_helper(client) is None

    async def main() -> Any:
        c = aclient(server)
        try:
            return await create(c)
        finally:
            await c.close()

    assert run(main()) is None
    assert server.stats()["requests"] == 0
    assert len(seen) == 4 and seen[0]["reason"] == "limit"
    assert all(s.status.status_code is StatusCode.ERROR for s in exporter.get_finished_spans())


# == 10. the runaway loop ======================================================================
def test_runaway_loop_stops_within_budget(setup: Any, client: Any, server: FakeLLMServer) -> None:
    setup()  # no default limit: the block's applies
    server.default_output_tokens = 400  # each turn costs ~$0.006
    limit = 0.03
    calls = 0
    history = list(MESSAGES)
    with pytest.raises(BudgetExceededError) as info:
        with budget(max_usd=limit) as run_:
            for turn in range(100):  # a runaway agent: it never decides to stop on its own
                if turn % 2:
                    with stream_helper(client, messages=history, max_tokens=500) as stream:
                        stream.until_done()
                else:
                    create(client, messages=history, max_tokens=500)
                calls += 1
                history = [*history, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    assert info.value.reason == "limit"
    assert 2 <= calls < 100
    billed = server.stats()["billed_nanos"]
    assert billed <= nanos(limit)  # the provider never billed more than the budget
    assert server.stats()["requests"] == calls  # the refused turn was never sent
    assert nanos(run_.report().total_usd) == billed  # the ledger is the bill


def test_runaway_loop_async_concurrent(setup: Any, server: FakeLLMServer) -> None:
    setup()
    server.default_output_tokens = 400
    server.latency_s = 0.005
    limit = 0.05

    async def worker(c: Any) -> int:
        done = 0
        while True:
            try:
                await create(c, max_tokens=500)
            except BudgetExceededError:
                return done
            done += 1

    async def main() -> int:
        c = aclient(server)
        async with budget(max_usd=limit):
            counts = await asyncio.gather(*(worker(c) for _ in range(8)))
        await c.close()
        return sum(counts)

    total = run(main())
    assert total >= 2
    assert server.stats()["billed_nanos"] <= nanos(limit)


# == 11. other entry points: beta, parse, raw responses ========================================
class Verdict(BaseModel):
    answer: str
    score: int


def test_beta_messages_are_metered_once(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    client.beta.messages.create(model=CLAUDE, messages=MESSAGES, max_tokens=100)
    assert_settled_from_server(only(exporter), server)
    exporter.clear()
    for _event in client.beta.messages.create(model=CLAUDE, messages=MESSAGES, max_tokens=100, stream=True):
        pass
    assert_settled_from_server(only(exporter), server)
    exporter.clear()
    with client.beta.messages.stream(model=CLAUDE, messages=MESSAGES, max_tokens=100) as stream:
        stream.get_final_message()
    assert_settled_from_server(only(exporter), server)
    assert server.stats()["requests"] == 3
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_parse_is_metered(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    parsed = client.messages.parse(model=CLAUDE, messages=MESSAGES, max_tokens=200, output_format=Verdict)
    assert isinstance(parsed.parsed_output, Verdict)
    assert_settled_from_server(only(exporter), server)
    exporter.clear()
    client.beta.messages.parse(model=CLAUDE, messages=MESSAGES, max_tokens=200, output_format=Verdict)
    assert_settled_from_server(only(exporter), server)
    assert server.stats()["requests"] == 2
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_with_raw_response_is_metered(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)
    raw = client.messages.with_raw_response.create(model=CLAUDE, messages=MESSAGES, max_tokens=100)
    assert raw.parse().usage.output_tokens == 20
    assert_settled_from_server(only(exporter), server)
    exporter.clear()
    raw = client.messages.with_raw_response.create(model=CLAUDE, messages=MESSAGES, max_tokens=100, stream=True)
    assert not spans_named(exporter, SPAN)
    for _event in raw.parse():
        pass
    assert_settled_from_server(only(exporter), server)
    assert ledger(processor) == (server.stats()["billed_nanos"], 0)


def test_inside_an_outer_metered_call_it_passes_through(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0)
    token = IN_METERED_CALL.set(True)  # e.g. litellm's wrapper is metering this call
    try:
        create(client)
        with stream_helper(client) as stream:
            stream.until_done()
    finally:
        IN_METERED_CALL.reset(token)
    assert server.stats()["requests"] == 2
    assert spans_named(exporter, SPAN) == []


def test_the_llm_span_is_not_current_while_the_caller_iterates(setup: Any, client: Any, exporter: Any) -> None:
    setup(max_usd=1.0)
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("agent") as agent:
        with stream_helper(client) as stream:
            for _event in stream:
                with tracer.start_as_current_span("handle event"):
                    pass
    chat = only(exporter)
    inner = spans_named(exporter, "handle event")
    assert inner and all(s.parent.span_id == agent.get_span_context().span_id for s in inner)
    assert chat.parent.span_id == agent.get_span_context().span_id


# == 12. instrument / uninstrument =============================================================
def _original(module: str, cls: str | None, method: str) -> Any:
    owner = importlib.import_module(module)
    return vars(getattr(owner, cls) if cls else owner)[method]


def test_instrument_twice_wraps_once_and_uninstrument_restores(
    make_processor: Any, client: Any, exporter: Any
) -> None:
    make_processor(max_usd=1.0, prices=PriceBook())
    keys = [(m, c, f) for m, c, f, _ in _TARGETS]
    originals = {key: _original(*key) for key in keys}
    assert not any(isinstance(fn, wrapt.FunctionWrapper) for fn in originals.values())
    instrumentor = AnthropicBudgetInstrumentor()
    instrumentor.instrument()
    instrumentor.instrument()
    AnthropicBudgetInstrumentor().instrument()  # the same (singleton) instrumentor
    try:
        for key, fn in originals.items():
            wrapped = _original(*key)
            assert isinstance(wrapped, wrapt.FunctionWrapper) and wrapped.__wrapped__ is fn, key
        create(client, max_tokens=10)
        assert len(spans_named(exporter, SPAN)) == 1
    finally:
        instrumentor.uninstrument()
    for key, fn in originals.items():
        assert _original(*key) is fn, key
    exporter.clear()
    create(client, max_tokens=10)
    assert [s.name for s in exporter.get_finished_spans()] == [SDK_SPAN]  # only the SDK's own
