"""The SDK metrics of ``BudgetSpanProcessor(meter_provider=...)``, read back from the SDK.

Each test gives the processor its own ``MeterProvider(metric_readers=[InMemoryMetricReader()])``
and drives calls the way the instrumentors do: LLM calls through ``start_call``/``succeed``
(the code the openai/anthropic/litellm wrappers share; one test uses the real openai SDK against
``FakeLLMServer``), tools through ``track_tool``, runs through ``budget()``, named scopes through
``ScopeRule`` + ``otel_budget.scope``. Checked: names, units, kinds, the GenAI semantic-convention
attributes and advised buckets, the absence of high-cardinality labels, sums equal to the ledger,
aborts and warnings by scope kind, the remaining-budget gauge, and counting with sampled-out spans.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from otel_budget import (
    BudgetExceededError,
    ModelPrice,
    PriceBook,
    ScopeRule,
    budget,
    scope,
    track_tool,
)
from otel_budget import attributes as attrs
from otel_budget.engine import KIND_TOOL
from otel_budget.instrumentation._call import LLMCall, LLMRequest, start_call
from otel_budget.metered import begin_call
from otel_budget.money import parse_usd
from otel_budget.pricing import TokenUsage
from otel_budget.tokens import InputEstimate

# The buckets gen-ai-metrics.md advises (explicit_bucket_boundaries_advisory).
SPEC_TOKEN_BUCKETS = [
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
]  # fmt: skip
SPEC_DURATION_BUCKETS = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
]  # fmt: skip
# gen_ai.client.* attributes the spec defines (Required / Conditionally Required / Recommended).
CLIENT_ATTRIBUTES = {
    attrs.GEN_AI_OPERATION_NAME, attrs.GEN_AI_PROVIDER_NAME, attrs.GEN_AI_REQUEST_MODEL,
    attrs.GEN_AI_RESPONSE_MODEL, attrs.SERVER_ADDRESS, attrs.SERVER_PORT,
    # genai-openai's, on a chat completion's points (see test_telemetry_parity)
    attrs.OPENAI_RESPONSE_SERVICE_TIER, attrs.OPENAI_RESPONSE_SYSTEM_FINGERPRINT,
}  # fmt: skip
NEVER_A_LABEL = {
    "user.id", "session.id", "tenant.id", attrs.GEN_AI_CONVERSATION_ID, attrs.GEN_AI_RESPONSE_ID,
    attrs.GEN_AI_TOOL_CALL_ID, attrs.BUDGET_SCOPE, "trace_id", "span_id", "otel_budget.trace_id",
}  # fmt: skip
HEX_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{32}")
UNKNOWN_MODEL = "otel-budget-test-unknown-model"
PRICES = {"test-model": ModelPrice(input=1, output=2), "big-model": ModelPrice(input=1000, output=2000)}


# -- reading the metrics back ---------------------------------------------------------------------
@dataclass
class Metric:
    name: str
    unit: str
    description: str
    data: Any
    points: list[Any] = field(default_factory=list)

    def by(self, *keys: str) -> dict[tuple[Any, ...], float]:
        """Values (sums for histograms) summed by the given attribute keys."""
        out: dict[tuple[Any, ...], float] = {}
        for point in self.points:
            k = tuple(point.attributes.get(key) for key in keys)
            out[k] = out.get(k, 0) + (point.sum if isinstance(self.data, Histogram) else point.value)
        return out

    def total(self) -> float:
        return sum(self.by().values())


class Metrics:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.scopes: set[str] = set()

    def collect(self) -> dict[str, Metric]:
        out: dict[str, Metric] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                self.scopes.add(sm.scope.name)
                for m in sm.metrics:
                    out[m.name] = Metric(m.name, m.unit, m.description, m.data, list(m.data.data_points))
        return out


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.provider.shutdown()


@pytest.fixture
def metered(make_processor: Any, metrics: Metrics) -> Any:
    """make_processor with this test's MeterProvider and round test prices."""

    def make(max_usd: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("prices", PriceBook(overrides=PRICES))
        return make_processor(max_usd, meter_provider=metrics.provider, **kwargs)

    return make


# -- driving calls ----------------------------------------------------------------------------
def start(
    tracer: Any, processor: Any, model: str = "test-model", provider: str = "openai",
    inp: int = 1000, out: int = 500, **request: Any,
) -> LLMCall:  # fmt: skip
    req = LLMRequest(
        provider=provider, operation="chat", model=model, output_param="max_tokens",
        estimate=lambda: InputEstimate(inp, "test"), **request,
    )  # fmt: skip
    return start_call(tracer, req, {"max_tokens": out}, processor=processor)


def llm(
    tracer: Any, processor: Any, model: str = "test-model", provider: str = "openai",
    inp: int = 1000, out: int = 500, latency: float = 0.0, response: dict[str, Any] | None = None,
    **request: Any,
) -> None:  # fmt: skip
    """One successful call: 1000 in + 500 out on test-model is $0.002."""
    call = start(tracer, processor, model, provider, inp, out, **request)
    call.started -= latency  # as if the provider took that long
    call.succeed(TokenUsage(input_tokens=inp, output_tokens=out), response)


def refused(tracer: Any, processor: Any, model: str = "test-model", **kwargs: Any) -> BudgetExceededError:
    with pytest.raises(BudgetExceededError) as info:
        llm(tracer, processor, model, **kwargs)
    return info.value


def tool(name: str, usd: Any) -> None:
    with track_tool(name, cost_usd=usd):
        pass


# -- names, units, kinds, buckets ---------------------------------------------------------------
def mixed_workload(tracer: Any, processor: Any) -> None:
    with scope(user="alice"), tracer.start_as_current_span("agent"):
        llm(tracer, processor)
        llm(tracer, processor, "big-model", "anthropic", 100, 50)  # $0.2
        tool("web_search", 0.01)
        refused(tracer, processor, "big-model", provider="anthropic", inp=1000, out=500)  # $2 > $1


def test_instruments_names_units_and_kinds(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(max_usd=1.0, scopes=[ScopeRule("user", max_usd=0.4)])
    mixed_workload(tracer, processor)
    got = metrics.collect()
    expected = {
        "gen_ai.client.token.usage": ("{token}", Histogram, None),
        "gen_ai.client.operation.duration": ("s", Histogram, None),
        "otel_budget.cost": ("USD", Sum, True),
        "otel_budget.aborts": ("{call}", Sum, True),
        "otel_budget.warnings": ("{warning}", Sum, True),
        "otel_budget.scope.remaining": ("USD", Gauge, None),
    }
    assert set(got) == set(expected)
    for name, (unit, kind, monotonic) in expected.items():
        metric = got[name]
        assert metric.unit == unit, name
        assert isinstance(metric.data, kind), name
        assert metric.description, name
        if monotonic is not None:
            assert metric.data.is_monotonic is monotonic, name
    assert metrics.scopes == {"otel_budget"}


def test_histograms_use_the_buckets_the_genai_spec_advises(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered()
    with tracer.start_as_current_span("agent"):
        llm(tracer, processor)
    got = metrics.collect()
    for name, buckets in (
        ("gen_ai.client.token.usage", SPEC_TOKEN_BUCKETS),
        ("gen_ai.client.operation.duration", SPEC_DURATION_BUCKETS),
    ):
        assert got[name].points
        for point in got[name].points:
            assert list(point.explicit_bounds) == buckets, name


# -- attributes ---------------------------------------------------------------------------------
def test_token_usage_and_duration_carry_the_genai_attributes(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered()
    with tracer.start_as_current_span("agent"):
        llm(
            tracer, processor, inp=1234, out=56, latency=0.5,
            response={attrs.GEN_AI_RESPONSE_MODEL: "test-model-2026-01-01"},
            server_address="api.example.com", server_port=443,
        )  # fmt: skip
    got = metrics.collect()
    common = {
        attrs.GEN_AI_OPERATION_NAME: "chat", attrs.GEN_AI_PROVIDER_NAME: "openai",
        attrs.GEN_AI_REQUEST_MODEL: "test-model", attrs.GEN_AI_RESPONSE_MODEL: "test-model-2026-01-01",
        attrs.SERVER_ADDRESS: "api.example.com", attrs.SERVER_PORT: 443,
    }  # fmt: skip
    tokens = {p.attributes["gen_ai.token.type"]: p for p in got["gen_ai.client.token.usage"].points}
    assert set(tokens) == {"input", "output"}
    for kind, count in (("input", 1234), ("output", 56)):
        point = tokens[kind]
        assert dict(point.attributes) == {**common, "gen_ai.token.type": kind}
        assert (point.count, point.sum) == (1, count)
    (duration,) = got["gen_ai.client.operation.duration"].points
    assert dict(duration.attributes) == common
    assert duration.count == 1 and 0.5 <= duration.sum < 0.64  # in the (0.32, 0.64] bucket
    assert list(duration.bucket_counts).index(1) == SPEC_DURATION_BUCKETS.index(0.64)


def test_failed_call_records_duration_with_error_type_and_no_tokens(
    metered: Any, metrics: Metrics, tracer: Any
) -> None:
    processor = metered()
    with tracer.start_as_current_span("agent"):
        call = start(tracer, processor)
        # (A timeout may have been billed, and is charged: a refused connection never was.)
        call.fail(ConnectionRefusedError("provider refused the connection"))
    got = metrics.collect()
    (duration,) = got["gen_ai.client.operation.duration"].points
    assert duration.attributes[attrs.ERROR_TYPE] == "ConnectionRefusedError"
    assert "gen_ai.client.token.usage" not in got
    assert "otel_budget.cost" not in got  # released: nothing billed, nothing counted


def test_real_openai_sdk_call_emits_the_client_metrics(metered: Any, metrics: Metrics, tracer: Any) -> None:
    openai = pytest.importorskip("openai")
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
    from otel_budget.testing import FakeLLMServer

    metered(prices=PriceBook(overrides={"gpt-4o-mini": ModelPrice(input=0.15, output=0.6)}))
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    try:
        with FakeLLMServer(prices={"gpt-4o-mini": (0.15, 0.6, 0.075)}) as server:
            client = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
            with tracer.start_as_current_span("agent"):
                reply = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
                )
            billed = server.stats()["billed_usd"]
            port = int(server.openai_base_url.split(":")[2].split("/")[0])
    finally:
        instrumentor.uninstrument()
    got = metrics.collect()
    tokens = {p.attributes["gen_ai.token.type"]: p for p in got["gen_ai.client.token.usage"].points}
    assert tokens["input"].sum == reply.usage.prompt_tokens
    assert tokens["output"].sum == reply.usage.completion_tokens
    for point in (*tokens.values(), *got["gen_ai.client.operation.duration"].points):
        assert set(point.attributes) - {"gen_ai.token.type"} <= CLIENT_ATTRIBUTES
        assert point.attributes[attrs.GEN_AI_PROVIDER_NAME] == "openai"
        assert point.attributes[attrs.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
        assert point.attributes[attrs.SERVER_ADDRESS] == "127.0.0.1"
        assert point.attributes[attrs.SERVER_PORT] == port
    assert got["otel_budget.cost"].total() == pytest.approx(billed, abs=1e-12)


def test_no_trace_ids_or_other_high_cardinality_labels(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(max_usd=1.0, scopes=[ScopeRule("user", max_usd=0.4)])
    identity = {"user.id": "alice", "session.id": "s-0123456789abcdef", attrs.GEN_AI_CONVERSATION_ID: "c-42"}
    with scope(user="alice", session="s-0123456789abcdef"), tracer.start_as_current_span("agent") as root:
        llm(tracer, processor, attributes=dict(identity))
        llm(tracer, processor, "big-model", "anthropic", 100, 50, attributes=dict(identity),
            response={attrs.GEN_AI_RESPONSE_ID: "chatcmpl-0123456789abcdef0123456789abcdef"})  # fmt: skip
        tool("web_search", 0.01)
        refused(tracer, processor, "big-model", provider="anthropic", inp=1000, out=500)
        with budget(max_usd=0.001):
            refused(tracer, processor)
    trace_id = root.get_span_context().trace_id
    got = metrics.collect()
    assert got
    for metric in got.values():
        for point in metric.points:
            for label, value in point.attributes.items():
                assert label not in NEVER_A_LABEL, (metric.name, label)
                assert not (isinstance(value, str) and HEX_ID.search(value)), (metric.name, label, value)
                if metric.name != "otel_budget.scope.remaining":  # one series per named scope, by design
                    assert "alice" not in str(value), (metric.name, label)
    # Trace ids travel as exemplars (the SDK's trace-based filter), which is how a dashboard
    # jumps from a cost to its trace without a label per trace.
    exemplar_traces = {e.trace_id for p in got["otel_budget.cost"].points for e in p.exemplars}
    assert exemplar_traces == {trace_id}


# -- sums equal the ledger ----------------------------------------------------------------------
def test_cost_counter_equals_the_ledger(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(scopes=[ScopeRule("user", max_usd=100)])
    rng = random.Random(20261123)
    with scope(user="alice"), budget(max_usd=50) as run:
        for _ in range(150):
            llm(tracer, processor, inp=rng.randint(1, 50_000), out=rng.randint(1, 4_000))
            tool("web_search", str(Decimal(rng.randint(1, 10_000_000)) / 10**9))  # nano-USD amounts
        llm(tracer, processor, "big-model", "anthropic", 123, 45)
        with tracer.start_as_current_span("chat test-model", kind=SpanKind.CLIENT) as span:
            # Another instrumentation's span: usage at its end, priced by the processor.
            span.set_attributes({
                attrs.GEN_AI_OPERATION_NAME: "chat", attrs.GEN_AI_PROVIDER_NAME: "openai",
                attrs.GEN_AI_REQUEST_MODEL: "test-model",
                attrs.GEN_AI_USAGE_INPUT_TOKENS: 700, attrs.GEN_AI_USAGE_OUTPUT_TOKENS: 300,
            })  # fmt: skip
        start(tracer, processor).fail(ConnectionRefusedError("refused"))  # never sent: $0
        with budget(max_usd=0.0001):
            refused(tracer, processor)  # refused: $0
    report = run.report()
    cost = metrics.collect()["otel_budget.cost"]
    assert cost.total() == pytest.approx(report.total_usd, abs=1e-12)
    assert cost.total() == pytest.approx(processor.spent_usd("user:alice"), abs=1e-12)
    by_model = cost.by(attrs.GEN_AI_REQUEST_MODEL)
    for model, line in report.by_model.items():
        assert by_model[(model,)] == pytest.approx(line.usd, abs=1e-12), model
    by_tool = cost.by(attrs.GEN_AI_TOOL_NAME)
    assert by_tool[("web_search",)] == pytest.approx(report.by_tool["web_search"].usd, abs=1e-12)
    # Token metrics come only from our own calls: the other instrumentation's span emits its own.
    tokens = metrics.collect()["gen_ai.client.token.usage"].by(attrs.GEN_AI_REQUEST_MODEL, "gen_ai.token.type")
    ours = report.by_model["test-model"]
    assert tokens[("test-model", "input")] == ours.input_tokens - 700
    assert tokens[("test-model", "output")] == ours.output_tokens - 300


def test_cost_labels_llm_calls_by_provider_and_model_and_tools_by_name(
    metered: Any, metrics: Metrics, tracer: Any
) -> None:
    processor = metered()
    with tracer.start_as_current_span("agent"):
        llm(tracer, processor)
        llm(tracer, processor, "big-model", "anthropic", 100, 50)
        tool("web_search", 0.01)
        tool("web_search", 0.01)
    points = {tuple(sorted(p.attributes.items())): p.value for p in metrics.collect()["otel_budget.cost"].points}
    assert points == pytest.approx({
        ((attrs.GEN_AI_OPERATION_NAME, "chat"), (attrs.GEN_AI_PROVIDER_NAME, "openai"),
         (attrs.GEN_AI_REQUEST_MODEL, "test-model")): 0.002,
        ((attrs.GEN_AI_OPERATION_NAME, "chat"), (attrs.GEN_AI_PROVIDER_NAME, "anthropic"),
         (attrs.GEN_AI_REQUEST_MODEL, "big-model")): 0.2,
        ((attrs.GEN_AI_OPERATION_NAME, "execute_tool"), (attrs.GEN_AI_TOOL_NAME, "web_search")): 0.02,
    }, abs=1e-12)  # fmt: skip


# -- aborts, warnings, remaining --------------------------------------------------------------
def test_aborts_by_scope_kind_and_reason(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(max_usd=0.01, scopes=[ScopeRule("user", max_usd=0.005, window="day")])
    with tracer.start_as_current_span("agent-1"):
        refused(tracer, processor, "big-model", provider="anthropic")  # $2 > $0.01 per trace
        refused(tracer, processor, "big-model", provider="anthropic")
    with tracer.start_as_current_span("agent-2"), budget(max_usd=0.001):
        refused(tracer, processor)  # $0.002 > the block's $0.001
    refused(tracer, processor, "big-model", provider="anthropic")  # no parent: the process scope
    with scope(user="bob"), tracer.start_as_current_span("agent-3"):
        llm(tracer, processor)
        llm(tracer, processor)
        refused(tracer, processor)  # bob's day: $0.004 + $0.002 > $0.005
    with scope(user="carol"), tracer.start_as_current_span("agent-4"):
        processor.pause("user:carol")
        refused(tracer, processor)
        processor.resume("user:carol")
        processor.pause()
        refused(tracer, processor)  # the global kill switch
        processor.resume()
        refused(tracer, processor, UNKNOWN_MODEL)
    aborts = metrics.collect()["otel_budget.aborts"].by("otel_budget.scope.kind", "otel_budget.reason")
    global_kind = next(k for k, reason in aborts if reason == "paused" and k != "user")
    assert global_kind in ("*", "global")  # the kill switch's key is "*"
    assert aborts == {
        ("trace", "limit"): 2,
        ("budget", "limit"): 1,
        ("process", "limit"): 1,
        ("user", "limit"): 1,
        ("user", "paused"): 1,
        (global_kind, "paused"): 1,
        ("unknown", "unknown_model"): 1,
    }
    for point in metrics.collect()["otel_budget.aborts"].points:
        assert set(point.attributes) == {"otel_budget.scope.kind", "otel_budget.reason"}


def test_warnings_by_scope_kind_and_threshold(metered: Any, metrics: Metrics, tracer: Any) -> None:
    seen: list[dict[str, Any]] = []
    processor = metered(max_usd=0.01, scopes=[ScopeRule("user", max_usd=0.02)], on_warning=seen.append)
    with scope(user="alice"), tracer.start_as_current_span("agent"):
        for _ in range(5):  # $0.002 each: the trace at 20, 40, 60 (0.5), 80 (0.8), 100 % (0.95)
            llm(tracer, processor)
    with tracer.start_as_current_span("agent-2"), budget(max_usd=0.003):
        llm(tracer, processor)  # 67 % of the block
    warnings = metrics.collect()["otel_budget.warnings"]
    assert warnings.by("otel_budget.scope.kind", "otel_budget.threshold") == {
        ("trace", 0.5): 1, ("trace", 0.8): 1, ("trace", 0.95): 1,
        ("user", 0.5): 1,  # $0.010 of alice's $0.02
        ("budget", 0.5): 1,
    }  # fmt: skip
    assert warnings.total() == len(seen)  # one count per on_warning callback


def test_remaining_budget_gauge_per_named_scope(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(
        max_usd=10,
        scopes=[ScopeRule("user", max_usd=1, window="day"), ScopeRule("tenant", max_usd=5, window="month")],
    )
    with scope(user="alice", tenant="acme"), tracer.start_as_current_span("a"):
        llm(tracer, processor, "big-model", "anthropic", 100, 50)  # $0.2
    with scope(user="bob", tenant="acme"), tracer.start_as_current_span("b"):
        tool("web_search", 0.1)
    processor.set_scope_limit("user", "bob", 2)
    with scope(user="bob", tenant="acme"), tracer.start_as_current_span("c"):
        tool("web_search", 0.1)

    def remaining() -> dict[tuple[str, str], float]:
        gauge = metrics.collect()["otel_budget.scope.remaining"]
        return {(p.attributes["otel_budget.scope.kind"], p.attributes["otel_budget.scope"]): p.value
                for p in gauge.points}  # fmt: skip

    assert remaining() == pytest.approx({
        ("user", "user:alice"): 0.8,
        ("user", "user:bob"): 1.8,  # its own cap of $2 now
        ("tenant", "tenant:acme"): 4.6,
    })  # fmt: skip  (no window suffix in the label, no trace/budget/process scopes)


def test_remaining_budget_gauge_is_bounded(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(scopes=[ScopeRule("user", max_usd=1)])
    with tracer.start_as_current_span("many users"):
        for i in range(1010):
            with scope(user=f"u{i}"):
                call = begin_call(
                    tracer, "execute_tool t", attributes={attrs.GEN_AI_OPERATION_NAME: "execute_tool"},
                    projected_nanos=1, name="t", provider="tool", operation="execute_tool",
                    charge_kind=KIND_TOOL, processor=processor,
                )  # fmt: skip
                call.finish(1)
    scopes = {p.attributes["otel_budget.scope"] for p in metrics.collect()["otel_budget.scope.remaining"].points}
    assert len(scopes) == 1000  # the most recently seen ones
    assert "user:u1009" in scopes and "user:u0" not in scopes


def test_session_scopes_get_no_remaining_gauge_series(metered: Any, metrics: Metrics, tracer: Any) -> None:
    processor = metered(scopes=[ScopeRule("user", max_usd=1), ScopeRule("session", max_usd=1)])
    for i in range(3):
        with scope(user="alice", session=f"s-{i}"), tracer.start_as_current_span("conversation"):
            llm(tracer, processor)
    gauge = metrics.collect()["otel_budget.scope.remaining"]
    assert {p.attributes["otel_budget.scope.kind"] for p in gauge.points} == {"user"}


# -- sampling --------------------------------------------------------------------------------
def test_metrics_count_when_spans_are_sampled_out(metered: Any, metrics: Metrics) -> None:
    processor = metered(max_usd=0.5)
    exported = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(processor)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("sampled-out")
    with tracer.start_as_current_span("agent") as root:
        assert not root.is_recording()
        for _ in range(3):
            llm(tracer, processor)  # $0.006
        llm(tracer, processor, "big-model", "anthropic", 100, 50)  # $0.2
        call = begin_call(
            tracer, "execute_tool web_search",
            attributes={attrs.GEN_AI_OPERATION_NAME: "execute_tool", attrs.GEN_AI_TOOL_NAME: "web_search"},
            projected_nanos=parse_usd(0.05), name="web_search", provider="tool", operation="execute_tool",
            span_kind=SpanKind.INTERNAL, charge_kind=KIND_TOOL, processor=processor,
        )  # fmt: skip
        call.finish(parse_usd(0.05))
        refused(tracer, processor, "big-model", provider="anthropic")  # $2 > $0.5 - $0.256
    provider.shutdown()
    assert exported.get_finished_spans() == ()  # nothing was sampled...
    got = metrics.collect()  # ...and everything was counted
    cost = got["otel_budget.cost"]
    assert cost.total() == pytest.approx(0.256, abs=1e-12)
    assert cost.by(attrs.GEN_AI_TOOL_NAME)[("web_search",)] == pytest.approx(0.05)
    tokens = got["gen_ai.client.token.usage"].by(attrs.GEN_AI_REQUEST_MODEL, "gen_ai.token.type")
    assert tokens == {("test-model", "input"): 3000, ("test-model", "output"): 1500,
                      ("big-model", "input"): 100, ("big-model", "output"): 50}  # fmt: skip
    assert got["gen_ai.client.operation.duration"].by(attrs.GEN_AI_REQUEST_MODEL) != {}
    assert got["otel_budget.aborts"].by("otel_budget.scope.kind", "otel_budget.reason") == {("trace", "limit"): 1}
    assert got["otel_budget.warnings"].by("otel_budget.scope.kind", "otel_budget.threshold") == {("trace", 0.5): 1}


def test_calls_count_when_the_instrumentation_tracer_is_a_no_op(metered: Any, metrics: Metrics, tracer: Any) -> None:
    """An app whose global tracer provider is not the SDK (spans are no-ops) but whose context
    has a valid span, e.g. a remote parent from a traceparent header."""
    processor = metered(max_usd=0.05)
    no_op = trace.NoOpTracer()
    with tracer.start_as_current_span("request"):
        for _ in range(3):
            call = begin_call(
                no_op, "execute_tool t", attributes={attrs.GEN_AI_OPERATION_NAME: "execute_tool"},
                projected_nanos=parse_usd(0.01), name="t", provider="tool", operation="execute_tool",
                charge_kind=KIND_TOOL, processor=processor,
            )  # fmt: skip
            call.finish(parse_usd(0.01))
    assert metrics.collect()["otel_budget.cost"].total() == pytest.approx(0.03)
