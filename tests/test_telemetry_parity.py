"""Our GenAI telemetry against the official instrumentations' for the same call.

Each test runs one call (the real ``openai`` / ``anthropic`` SDK against ``FakeLLMServer``)
twice: once under ``opentelemetry-instrumentation-genai-openai`` / ``-genai-anthropic``
1.3b0 (the oracle; otel-budget not instrumented), once under otel-budget's instrumentors
(the oracle not instrumented), each with its own in-memory span exporter and
``MeterProvider`` (delta histograms: one call's points), and compares what the official
package emits for the point in question: attribute names, value types, finish reasons,
metric names, units, bucket boundaries, metric attributes, counts, and when an attribute is
absent. The differences that are the official packages' own (``error.type`` spelled with
the module prefix, ids the fake numbers per request, timings) are left out by name.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from otel_budget import BudgetInstrumentor, BudgetSpanProcessor, PriceBook
from otel_budget import attributes as attrs
from otel_budget.instrumentation.anthropic import AnthropicBudgetInstrumentor
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.processor import _ACTIVE
from otel_budget.runtime import _CURRENT
from otel_budget.testing import Behaviour, FakeLLMServer
from tests.conftest import SWITCH
from tests.helpers import ledger, nanos

genai_openai = pytest.importorskip("opentelemetry.instrumentation.genai.openai")
genai_anthropic = pytest.importorskip("opentelemetry.instrumentation.genai.anthropic")

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

MINI = "gpt-4o-mini"
EMBED = "text-embedding-3-small"
CLAUDE = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075), EMBED: (0.02, 0.0), CLAUDE: (3.0, 15.0, 0.3, 3.75)}
SDK_SPAN = "anthropic.messages.create"
# Per call or per run (the fake numbers its ids; time is time), compared by presence and type.
VARYING = {attrs.GEN_AI_RESPONSE_ID, attrs.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK}


# -- the two runs ------------------------------------------------------------------------------
@dataclass
class Point:
    attributes: dict[str, Any]
    count: int
    total: float
    bounds: list[float]


@dataclass
class Run:
    """What one instrumentation emitted for one scenario."""

    spans: list[Any]
    metrics: dict[str, tuple[str, list[Point]]] = field(default_factory=dict)  # name: (unit, points)
    result: Any = None

    def genai(self) -> Any:
        """The GenAI span (``chat ...``, ``embeddings ...``)."""
        (span,) = [s for s in self.spans if s.name.split(" ")[0] in ("chat", "embeddings")]
        return span

    def points(self, name: str) -> list[Point]:
        return self.metrics.get(name, ("", []))[1]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES, default_output_tokens=6) as srv:
        yield srv


@pytest.fixture
def fake(server: FakeLLMServer) -> FakeLLMServer:
    assert server.wait_idle(5)
    server.clear_script()
    server.reset_stats()
    return server


def _clients(server: FakeLLMServer) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    return (
        openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0),
        anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test", max_retries=0),
    )


def _collect(reader: InMemoryMetricReader) -> dict[str, tuple[str, list[Point]]]:
    out: dict[str, tuple[str, list[Point]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if not metric.name.startswith("gen_ai."):
                    continue
                points = [
                    Point(dict(p.attributes), p.count, p.sum, list(p.explicit_bounds))
                    for p in metric.data.data_points if p.count
                ]  # fmt: skip
                if points:
                    out[metric.name] = (metric.unit, points)
    return out


def _run(which: str, server: FakeLLMServer, scenario: Callable[..., Any], behaviour: Behaviour | None) -> Run:
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    meters = MeterProvider(metric_readers=[reader])
    processor: BudgetSpanProcessor | None = None
    if which == "official":
        SWITCH.chain[:] = [SimpleSpanProcessor(exporter)]
        instrumentors: list[Any] = [genai_openai.OpenAIInstrumentor(), genai_anthropic.AnthropicInstrumentor()]
        for instrumentor in instrumentors:
            instrumentor.instrument(tracer_provider=trace.get_tracer_provider(), meter_provider=meters)
    else:
        processor = BudgetSpanProcessor(1.0, prices=PriceBook(), meter_provider=meters)
        SWITCH.chain[:] = [processor, SimpleSpanProcessor(exporter)]
        instrumentors = [OpenAIBudgetInstrumentor(), AnthropicBudgetInstrumentor()]
        for instrumentor in instrumentors:
            instrumentor.instrument()
    oai, anth = _clients(server)
    try:
        if behaviour is not None:
            server.script(behaviour)
        result = scenario(oai, anth)
        gc.collect()  # a dropped stream ends now
        assert server.wait_idle(5)
        run = Run(list(exporter.get_finished_spans()), _collect(reader), result)
        if processor is not None:
            run.result = (result, ledger(processor), server.stats()["billed_nanos"])
        return run
    finally:
        for instrumentor in instrumentors:
            instrumentor.uninstrument()
        oai.close()
        anth.close()
        SWITCH.chain[:] = []
        if processor is not None:
            processor.shutdown()
            _ACTIVE.clear()
            _CURRENT.clear()
        meters.shutdown()


def both(server: FakeLLMServer, scenario: Callable[..., Any], behaviour: Behaviour | None = None) -> tuple[Run, Run]:
    """(official, ours) of the same scenario."""
    theirs = _run("official", server, scenario, behaviour)
    server.reset_stats()
    ours = _run("ours", server, scenario, behaviour)
    return theirs, ours


def _value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def assert_same(theirs: Any, ours: Any, *keys: str) -> None:
    """The spans agree on each key: the same value (or both absent; for ``VARYING`` keys,
    both present with the same type)."""
    for key in keys:
        a, b = theirs.attributes.get(key), ours.attributes.get(key)
        if key in VARYING:
            assert (a is None) == (b is None), (key, a, b)
            assert type(a) is type(b), (key, a, b)
        else:
            assert _value(a) == _value(b), (key, a, b)


def assert_same_points(theirs: Run, ours: Run, name: str, *, sums: bool = False) -> None:
    """The metric has the same unit, the same points (by attributes), bucket boundaries and
    counts (and sums, for token counts) in both runs."""
    unit_a, points_a = theirs.metrics.get(name, ("", []))
    unit_b, points_b = ours.metrics.get(name, ("", []))
    assert unit_a == unit_b, (name, unit_a, unit_b)

    def key(p: Point) -> tuple[Any, ...]:
        return tuple(sorted((k, str(v)) for k, v in p.attributes.items()))

    a, b = {key(p): p for p in points_a}, {key(p): p for p in points_b}
    assert set(a) == set(b), (name, set(a) ^ set(b))
    for k, p in a.items():
        assert p.bounds == b[k].bounds, name
        assert p.count == b[k].count, (name, k, p.count, b[k].count)
        if sums:
            assert p.total == b[k].total, (name, k, p.total, b[k].total)


def money_path_unchanged(ours: Run) -> None:
    """Whatever the telemetry says, the ledger holds the cost on the span, nothing reserved."""
    _, (spent, reserved), _billed = ours.result
    assert reserved == 0
    assert spent == nanos(ours.genai().attributes[attrs.COST_USD]) > 0


# -- scenarios ---------------------------------------------------------------------------------
def chat(oai: openai.OpenAI, _: Any) -> Any:
    return oai.chat.completions.create(model=MINI, messages=MESSAGES, response_format={"type": "json_object"})


def chat_stream(oai: openai.OpenAI, _: Any) -> Any:
    stream = oai.chat.completions.create(
        model=MINI, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    return list(stream)


def chat_stream_closed_early(oai: openai.OpenAI, _: Any) -> Any:
    with oai.chat.completions.create(model=MINI, messages=MESSAGES, stream=True) as stream:
        for _chunk in stream:
            break


def chat_stream_caller_raises(oai: openai.OpenAI, _: Any) -> Any:
    with pytest.raises(KeyError):
        with oai.chat.completions.create(model=MINI, messages=MESSAGES, stream=True) as stream:
            for _chunk in stream:
                raise KeyError("the caller's own")


def chat_stream_caller_raises_without_with(oai: openai.OpenAI, _: Any) -> Any:
    with pytest.raises(KeyError):
        for _chunk in oai.chat.completions.create(model=MINI, messages=MESSAGES, stream=True):
            raise KeyError("the caller's own")


def async_chat_stream_caller_raises(oai: openai.OpenAI, _: Any) -> Any:
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=str(oai.base_url), api_key="test", max_retries=0)
        with pytest.raises(KeyError):
            async with await client.chat.completions.create(model=MINI, messages=MESSAGES, stream=True) as stream:
                async for _chunk in stream:
                    raise KeyError("the caller's own")
        await client.close()

    asyncio.run(main())


def responses_helper_caller_raises(oai: openai.OpenAI, _: Any) -> Any:
    with pytest.raises(KeyError):
        with oai.responses.stream(model=MINI, input="Say hi.") as stream:
            for _event in stream:
                raise KeyError("the caller's own")


def claude_helper_caller_raises(_: Any, anth: anthropic.Anthropic) -> Any:
    with pytest.raises(KeyError):
        with anth.messages.stream(model=CLAUDE, max_tokens=64, messages=MESSAGES) as stream:
            for _text in stream.text_stream:
                raise KeyError("the caller's own")


def chat_stream_provider_error(oai: openai.OpenAI, _: Any) -> Any:
    with pytest.raises(openai.APIError):
        for _chunk in oai.chat.completions.create(model=MINI, messages=MESSAGES, stream=True):
            pass


def responses(oai: openai.OpenAI, _: Any) -> Any:
    return oai.responses.create(model=MINI, input="Say hi.", text={"format": {"type": "json_object"}})


def responses_stream(oai: openai.OpenAI, _: Any) -> Any:
    return list(oai.responses.create(model=MINI, input="Say hi.", stream=True))


def responses_stream_closed_early(oai: openai.OpenAI, _: Any) -> Any:
    with oai.responses.create(model=MINI, input="Say hi.", stream=True) as stream:
        for _event in stream:
            break


def embeddings(oai: openai.OpenAI, _: Any) -> Any:
    return oai.embeddings.create(model=EMBED, input="budgets", encoding_format="float")


def embeddings_with_dimensions(oai: openai.OpenAI, _: Any) -> Any:
    return oai.embeddings.create(model=EMBED, input="budgets", dimensions=4)


def claude(_: Any, anth: anthropic.Anthropic) -> Any:
    return anth.messages.create(model=CLAUDE, max_tokens=64, messages=MESSAGES)


def claude_stream(_: Any, anth: anthropic.Anthropic) -> Any:
    return list(anth.messages.create(model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True))


def claude_stream_closed_early(_: Any, anth: anthropic.Anthropic) -> Any:
    with anth.messages.create(model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True) as stream:
        for index, _event in enumerate(stream):
            if index == 4:
                break


# -- 3. streams --------------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", [chat_stream, responses_stream, claude_stream])
def test_stream_time_to_first_chunk_attribute_and_chunk_metrics(fake: FakeLLMServer, scenario: Any) -> None:
    theirs, ours = both(fake, scenario)
    assert isinstance(theirs.genai().attributes[attrs.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK], float)
    assert_same(theirs.genai(), ours.genai(), attrs.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, "gen_ai.request.stream")
    assert 0 < ours.genai().attributes[attrs.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] < 5
    first = "gen_ai.client.operation.time_to_first_chunk"
    per_chunk = "gen_ai.client.operation.time_per_output_chunk"
    if scenario is claude_stream:
        # genai-anthropic records the chunk points before it knows the response model (it
        # reads the message at the end); ours name it, as the spec recommends: the same
        # points otherwise.
        for point in ours.points(first) + ours.points(per_chunk):
            assert point.attributes.pop(attrs.GEN_AI_RESPONSE_MODEL) == CLAUDE
    assert_same_points(theirs, ours, first)
    assert_same_points(theirs, ours, per_chunk)
    (point,) = ours.points(first)
    assert point.count == 1 and point.bounds == theirs.points(first)[0].bounds
    assert sum(p.count for p in ours.points(per_chunk)) >= 3
    money_path_unchanged(ours)


def test_chat_stream_service_tier(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, chat_stream)
    assert theirs.genai().attributes["openai.response.service_tier"] == "default"
    assert_same(theirs.genai(), ours.genai(), "openai.response.service_tier")
    # (on the span only: genai-openai puts no service tier on a stream's metric points)
    assert_same_points(theirs, ours, "gen_ai.client.operation.duration")
    assert_same_points(theirs, ours, "gen_ai.client.token.usage", sums=True)


def test_responses_stream_service_tier_and_finish_reasons(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, responses_stream)
    keys = ("openai.response.service_tier", attrs.GEN_AI_RESPONSE_FINISH_REASONS, "openai.api.type")
    assert theirs.genai().attributes["openai.response.service_tier"] == "default"
    assert_same(theirs.genai(), ours.genai(), *keys)


# -- 4. attributes ----------------------------------------------------------------------------
def test_chat_completion_attributes_and_metric_attributes(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, chat)
    keys = (
        "openai.response.system_fingerprint", "openai.response.service_tier", "gen_ai.output.type",
        attrs.GEN_AI_RESPONSE_FINISH_REASONS, attrs.GEN_AI_USAGE_INPUT_TOKENS,
        attrs.GEN_AI_USAGE_OUTPUT_TOKENS, "openai.api.type",
    )  # fmt: skip
    assert theirs.genai().attributes["openai.response.system_fingerprint"] == "fp_fake"
    assert theirs.genai().attributes["gen_ai.output.type"] == "json"
    assert_same(theirs.genai(), ours.genai(), *keys)
    # genai-openai puts the service tier and fingerprint on a chat completion's points
    assert_same_points(theirs, ours, "gen_ai.client.operation.duration")
    assert_same_points(theirs, ours, "gen_ai.client.token.usage", sums=True)
    money_path_unchanged(ours)


def test_responses_api_attributes(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, responses)
    keys = (
        "openai.api.type", "gen_ai.output.type", "openai.response.service_tier",
        attrs.GEN_AI_RESPONSE_FINISH_REASONS, attrs.GEN_AI_USAGE_INPUT_TOKENS,
        attrs.GEN_AI_USAGE_OUTPUT_TOKENS,
    )  # fmt: skip
    assert theirs.genai().attributes["openai.api.type"] == "responses"
    assert_same(theirs.genai(), ours.genai(), *keys)
    assert_same_points(theirs, ours, "gen_ai.client.operation.duration")
    assert_same_points(theirs, ours, "gen_ai.client.token.usage", sums=True)


@pytest.mark.parametrize("scenario", [embeddings, embeddings_with_dimensions])
def test_embeddings_attributes_and_no_output_tokens(fake: FakeLLMServer, scenario: Any) -> None:
    theirs, ours = both(fake, scenario)
    keys = (
        "gen_ai.embeddings.dimension.count", "gen_ai.request.encoding_formats",
        attrs.GEN_AI_USAGE_INPUT_TOKENS, attrs.GEN_AI_USAGE_OUTPUT_TOKENS,
        attrs.GEN_AI_RESPONSE_MODEL,
    )  # fmt: skip
    assert attrs.GEN_AI_USAGE_OUTPUT_TOKENS not in theirs.genai().attributes
    assert_same(theirs.genai(), ours.genai(), *keys)
    assert_same_points(theirs, ours, "gen_ai.client.token.usage", sums=True)
    assert_same_points(theirs, ours, "gen_ai.client.operation.duration")
    money_path_unchanged(ours)


# -- 5. meter_provider -------------------------------------------------------------------------
def test_instrument_meter_provider_is_used(fake: FakeLLMServer) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(
        max_usd=1.0, tracer_provider=tracer_provider, meter_provider=meters, libraries=["openai"]
    )
    oai, _anth = _clients(fake)
    try:
        chat(oai, None)
    finally:
        instrumentor.uninstrument()
        oai.close()
        _ACTIVE.clear()
        _CURRENT.clear()
    got = _collect(reader)
    assert got["gen_ai.client.operation.duration"][1][0].count == 1
    tokens = {p.attributes["gen_ai.token.type"]: p.total for p in got["gen_ai.client.token.usage"][1]}
    assert tokens == {"input": fake.last_call.input_tokens, "output": fake.last_call.output_tokens}
    meters.shutdown()
    tracer_provider.shutdown()


# -- 6. finish reasons -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scenario", "behaviour", "expected"),
    [
        (claude, None, ["stop"]),
        (claude, Behaviour(stop_reason="tool_use"), ["tool_call"]),
        (claude, Behaviour(stop_reason="stop_sequence"), ["stop"]),
        (claude, Behaviour(stop_reason="max_tokens"), ["length"]),
        (claude_stream, Behaviour(stop_reason="tool_use"), ["tool_call"]),
        (responses, None, ["stop"]),
        (responses_stream, None, ["stop"]),
    ],
)
def test_finish_reasons_are_the_official_values(
    fake: FakeLLMServer, scenario: Any, behaviour: Behaviour | None, expected: list[str]
) -> None:
    theirs, ours = both(fake, scenario, behaviour)
    reasons = theirs.genai().attributes.get(attrs.GEN_AI_RESPONSE_FINISH_REASONS)
    if expected is None:  # 500 tokens asked, max_tokens=64: truncated
        expected = ["length"]
    assert list(reasons) == expected
    assert_same(theirs.genai(), ours.genai(), attrs.GEN_AI_RESPONSE_FINISH_REASONS)


def test_tool_calls_finish_reasons_follow_each_official_package(fake: FakeLLMServer) -> None:
    """One mapping for every SDK: Anthropic's ``tool_use`` is ``tool_call`` (genai-anthropic),
    a chat completion's ``tool_calls`` stays as sent (genai-openai)."""
    for scenario, reason, expected in ((claude, "tool_use", "tool_call"), (chat, "tool_calls", "tool_calls")):
        theirs, ours = both(fake, scenario, Behaviour(stop_reason=reason))
        assert list(theirs.genai().attributes[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == [expected]
        assert_same(theirs.genai(), ours.genai(), attrs.GEN_AI_RESPONSE_FINISH_REASONS)


def test_responses_stream_closed_early_has_no_finish_reason(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, responses_stream_closed_early)
    assert attrs.GEN_AI_RESPONSE_FINISH_REASONS not in theirs.genai().attributes
    assert_same(theirs.genai(), ours.genai(), attrs.GEN_AI_RESPONSE_FINISH_REASONS)
    assert ours.genai().status.status_code is theirs.genai().status.status_code is StatusCode.UNSET


# -- 7. estimates stay out of the standard attributes --------------------------------------------
@pytest.mark.parametrize("scenario", [chat_stream_closed_early, responses_stream_closed_early])
def test_openai_stream_closed_early_reports_no_usage_and_keeps_its_estimate_apart(
    fake: FakeLLMServer, scenario: Any
) -> None:
    theirs, ours = both(fake, scenario)
    usage = (attrs.GEN_AI_USAGE_INPUT_TOKENS, attrs.GEN_AI_USAGE_OUTPUT_TOKENS)
    assert not set(usage) & set(theirs.genai().attributes)
    assert_same(theirs.genai(), ours.genai(), *usage, attrs.GEN_AI_RESPONSE_FINISH_REASONS)
    assert_same_points(theirs, ours, "gen_ai.client.token.usage")  # none in either
    span = ours.genai().attributes
    assert span[attrs.COST_ESTIMATED] is True
    assert span[attrs.USAGE_INPUT_TOKENS] > 0 and span[attrs.USAGE_OUTPUT_TOKENS] >= 0
    money_path_unchanged(ours)  # charged at least the reservation, as before


def test_openai_stream_without_usage_reports_none(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, chat_stream, Behaviour(usage=False))
    usage = (attrs.GEN_AI_USAGE_INPUT_TOKENS, attrs.GEN_AI_USAGE_OUTPUT_TOKENS)
    assert not set(usage) & set(theirs.genai().attributes)
    assert_same(theirs.genai(), ours.genai(), *usage)
    assert_same_points(theirs, ours, "gen_ai.client.token.usage")
    span = ours.genai().attributes
    assert span[attrs.COST_ESTIMATED] is True
    assert span[attrs.USAGE_OUTPUT_TOKENS] >= 6  # the streamed output, charged
    money_path_unchanged(ours)


def test_anthropic_stream_closed_early_reports_what_the_stream_said(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, claude_stream_closed_early)
    usage = (attrs.GEN_AI_USAGE_INPUT_TOKENS, attrs.GEN_AI_USAGE_OUTPUT_TOKENS)
    assert theirs.genai().attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 1  # message_start's
    assert_same(theirs.genai(), ours.genai(), *usage)
    for point in ours.points("gen_ai.client.token.usage"):
        point.attributes.pop(attrs.GEN_AI_RESPONSE_MODEL, None)
    for point in theirs.points("gen_ai.client.token.usage"):
        point.attributes.pop(attrs.GEN_AI_RESPONSE_MODEL, None)
    assert_same_points(theirs, ours, "gen_ai.client.token.usage", sums=True)
    span = ours.genai().attributes
    assert span[attrs.COST_ESTIMATED] is True
    assert span[attrs.USAGE_OUTPUT_TOKENS] > 1  # what was streamed: the estimate charged
    money_path_unchanged(ours)


# -- 8. a stream ended by the caller's exception -------------------------------------------------
@pytest.mark.parametrize(
    "scenario",
    [
        chat_stream_caller_raises, chat_stream_caller_raises_without_with,
        async_chat_stream_caller_raises, responses_helper_caller_raises,
        claude_helper_caller_raises,
    ],
)  # fmt: skip
def test_stream_ended_by_the_callers_exception_is_an_error(fake: FakeLLMServer, scenario: Any) -> None:
    theirs, ours = both(fake, scenario)
    a, b = theirs.genai(), ours.genai()
    assert a.status.status_code is StatusCode.ERROR
    assert b.status.status_code is StatusCode.ERROR
    assert a.status.description == b.status.description
    assert_same(a, b, attrs.ERROR_TYPE)
    if scenario is claude_helper_caller_raises:  # (genai-anthropic: no response model there)
        for point in ours.points("gen_ai.client.operation.duration"):
            point.attributes.pop(attrs.GEN_AI_RESPONSE_MODEL, None)
        for point in theirs.points("gen_ai.client.operation.duration"):
            point.attributes.pop(attrs.GEN_AI_RESPONSE_MODEL, None)
    assert_same_points(theirs, ours, "gen_ai.client.operation.duration")
    money_path_unchanged(ours)  # an early end, charged as one


def test_stream_broken_by_the_provider_is_an_error_with_its_response_attributes(fake: FakeLLMServer) -> None:
    theirs, ours = both(fake, chat_stream_provider_error, Behaviour(stream_error_after=3))
    a, b = theirs.genai(), ours.genai()
    assert a.status.status_code is b.status.status_code is StatusCode.ERROR
    assert_same(a, b, attrs.GEN_AI_RESPONSE_MODEL, attrs.GEN_AI_RESPONSE_ID, attrs.GEN_AI_USAGE_INPUT_TOKENS)
    assert a.attributes[attrs.ERROR_TYPE] == b.attributes[attrs.ERROR_TYPE] == "openai.APIError"


# -- 9. the Anthropic SDK's own span -------------------------------------------------------------
@pytest.mark.parametrize("scenario", [claude, claude_stream])
def test_anthropic_sdk_span_kept_under_the_genai_span_and_charged_once(fake: FakeLLMServer, scenario: Any) -> None:
    theirs, ours = both(fake, scenario)
    for run in (theirs, ours):
        (sdk,) = [s for s in run.spans if s.name == SDK_SPAN]
        genai = run.genai()
        assert sdk.parent.span_id == genai.context.span_id  # a child of the GenAI span, in both
        assert attrs.COST_USD not in sdk.attributes
    _, (spent, reserved), billed = ours.result
    assert (spent, reserved) == (billed, 0)  # charged once: the GenAI span's cost
    assert nanos(ours.genai().attributes[attrs.COST_USD]) == billed


# -- 10. cache writes ----------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", [claude, claude_stream])
def test_anthropic_cache_write_is_named_as_the_official_instrumentation_names_it(
    fake: FakeLLMServer, scenario: Any
) -> None:
    theirs, ours = both(fake, scenario, Behaviour(cache_creation_tokens=120, cached_tokens=30))
    keys = (
        attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS, attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        attrs.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, attrs.GEN_AI_USAGE_INPUT_TOKENS,
    )  # fmt: skip
    assert theirs.genai().attributes[attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS] == 120
    assert_same(theirs.genai(), ours.genai(), *keys)
    # (the SDK's own span says the same)
    (sdk,) = [s for s in ours.spans if s.name == SDK_SPAN]
    assert sdk.attributes[attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS] == 120
    money_path_unchanged(ours)
