"""BudgetSpanProcessor and the engine, through real SDK spans and exporters."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from otel_budget import BudgetExceededError, ScopeRule, scope
from otel_budget import attributes as attrs
from otel_budget.metered import begin_call
from otel_budget.money import parse_usd
from otel_budget.storage import MemoryStorage

MTOK = 1_000_000


def gen_ai_attrs(model: str = "test-model") -> dict[str, Any]:
    return {
        attrs.GEN_AI_OPERATION_NAME: "chat",
        attrs.GEN_AI_PROVIDER_NAME: "openai",
        attrs.GEN_AI_REQUEST_MODEL: model,
    }


def llm_call(
    tracer: trace.Tracer, projected_usd: float, actual_usd: float | None = None,
    model: str = "test-model", processor: Any = None,
) -> Any:  # fmt: skip
    """What an instrumentor does: begin (reserve), 'send', finish (commit)."""
    call = begin_call(
        tracer, f"chat {model}", attributes=gen_ai_attrs(model),
        projected_nanos=parse_usd(projected_usd), name=model, provider="openai",
        processor=processor,
    )  # fmt: skip
    actual = projected_usd if actual_usd is None else actual_usd
    call.finish(parse_usd(actual), input_tokens=10, output_tokens=5)
    return call


def third_party_span(tracer: trace.Tracer, inp: int, out: int, **extra: Any) -> None:
    """A GenAI span from another instrumentation: usage at end, no projection."""
    with tracer.start_as_current_span("chat test-model", kind=SpanKind.CLIENT) as span:
        span.set_attributes(gen_ai_attrs())
        span.set_attributes({
            attrs.GEN_AI_USAGE_INPUT_TOKENS: inp, attrs.GEN_AI_USAGE_OUTPUT_TOKENS: out, **extra
        })  # fmt: skip


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    return {span.name: span for span in exporter.get_finished_spans()}


def test_reserve_commit_and_root_breakdown(make_processor: Any, tracer: Any, exporter: Any) -> None:
    processor = make_processor(max_usd=1.0)
    with tracer.start_as_current_span("agent"):
        llm_call(tracer, 0.30, 0.10)
        llm_call(tracer, 0.30, 0.20)
        third_party_span(tracer, MTOK // 10, MTOK // 20)  # $0.10 + $0.10
    root = by_name(exporter)["agent"]
    assert root.attributes[attrs.TRACE_SPENT_USD] == pytest.approx(0.50)
    assert root.attributes[attrs.TRACE_BUDGET_USD] == 1.0
    assert root.attributes[attrs.TRACE_REMAINING_USD] == pytest.approx(0.50)
    assert root.attributes[attrs.TRACE_CALLS] == 3
    assert root.attributes[attrs.TRACE_TURNS] == 3
    assert list(root.attributes[attrs.TRACE_MODELS]) == ["test-model"]
    assert list(root.attributes[attrs.TRACE_PROVIDERS]) == ["openai"]
    assert root.attributes[attrs.TRACE_LLM_USD] == pytest.approx(0.50)
    # The finished trace is forgotten: nothing left in the ledger or the trace table.
    assert processor.storage.sizes()["scopes"] == 0
    assert processor.storage.sizes()["leases"] == 0


def test_refusal_happens_before_the_call_and_the_span_is_exported(
    make_processor: Any, tracer: Any, exporter: Any
) -> None:
    seen: list[dict[str, Any]] = []
    make_processor(max_usd=0.50, on_exceeded=seen.append)
    with tracer.start_as_current_span("agent"):
        llm_call(tracer, 0.40)
        with pytest.raises(BudgetExceededError) as info:
            llm_call(tracer, 0.20)
    error = info.value
    assert error.reason == "limit"
    assert error.budget_usd == 0.5
    assert error.spent_usd == pytest.approx(0.4)
    assert error.projected_usd == pytest.approx(0.2)
    assert error.remaining_usd == pytest.approx(0.1)
    assert error.scope.startswith("t:")
    assert error.trace_id is not None and len(error.trace_id) == 32
    assert error.report is not None and error.report.total_usd == pytest.approx(0.4)
    assert error.report.terminated_by == "budget_exceeded"
    assert seen and seen[0]["scope"] == error.scope
    spans = exporter.get_finished_spans()
    refused = [s for s in spans if s.attributes.get(attrs.ERROR_TYPE) == "BudgetExceededError"]
    assert len(refused) == 1
    assert refused[0].status.status_code is StatusCode.ERROR
    assert any(event.name == "exception" for event in refused[0].events)
    root = by_name(exporter)["agent"]
    assert root.attributes[attrs.TRACE_TERMINATED_BY] == "budget_exceeded"
    assert root.attributes[attrs.TRACE_ABORTS] == 1
    assert any(event.name == attrs.EVENT_EXCEEDED for event in root.events)


def test_zero_budget_blocks_every_paid_call(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=0)
    with tracer.start_as_current_span("agent"):
        with pytest.raises(BudgetExceededError):
            llm_call(tracer, 0.000001)


def test_third_party_spans_count_and_then_projections_are_refused(
    make_processor: Any, tracer: Any
) -> None:
    make_processor(max_usd=0.25)
    with tracer.start_as_current_span("agent"):
        third_party_span(tracer, MTOK // 10, MTOK // 20)  # $0.20, seen only at its end
        with pytest.raises(BudgetExceededError):
            llm_call(tracer, 0.10)


def test_both_cache_spellings_and_anthropic_shape(make_processor: Any, tracer: Any, exporter: Any) -> None:
    make_processor(max_usd=10)
    with tracer.start_as_current_span("agent"):
        # cache tokens included in input (the convention), new spelling
        third_party_span(tracer, 1000, 0, **{attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS: 400})
        # old spelling, reported separately from input (Anthropic raw shape): still counted
        third_party_span(tracer, 100, 0, **{attrs.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: 400,
                                            attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: 500})
    root = by_name(exporter)["agent"]
    # test-model prices cache at the input rate: 1000 + 1000 tokens at $1/MTok
    assert root.attributes[attrs.TRACE_SPENT_USD] == pytest.approx(0.002)


def test_parentless_calls_share_one_process_scope(make_processor: Any, tracer: Any) -> None:
    processor = make_processor(max_usd=1.0)
    made = 0
    with pytest.raises(BudgetExceededError) as info:
        for _ in range(100):  # a bare script: every call is its own trace
            llm_call(tracer, 0.15, 0.1)
            made += 1
    assert info.value.scope == "process"
    assert made == 9  # 9 x $0.10 spent, the 10th needs 0.15 > 0.10 left
    assert processor.spent_usd("process") == pytest.approx(0.9)
    assert processor.process_report().calls == 9


def test_enforcement_holds_when_spans_are_sampled_out(exporter: Any, make_processor: Any) -> None:
    processor = make_processor(max_usd=0.5)
    provider = TracerProvider(sampler=ALWAYS_OFF)  # our processor never sees these spans
    provider.add_span_processor(processor)
    dropped = provider.get_tracer("sampled-out")
    calls = 0
    with pytest.raises(BudgetExceededError):
        with dropped.start_as_current_span("agent"):
            for _ in range(10):
                llm_call(dropped, 0.2, 0.2, processor=processor)
                calls += 1
    assert calls == 2


def test_enforcement_holds_without_an_sdk_provider(make_processor: Any) -> None:
    processor = make_processor(max_usd=0.5)
    noop = trace.NoOpTracerProvider().get_tracer("noop")
    calls = 0
    with pytest.raises(BudgetExceededError):
        for _ in range(10):
            llm_call(noop, 0.2, 0.2, processor=processor)
            calls += 1
    assert calls == 2


def test_thresholds_fire_once_each(make_processor: Any, tracer: Any, exporter: Any,
                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    warnings: list[dict[str, Any]] = []
    make_processor(max_usd=1.0, on_warning=warnings.append)
    with caplog.at_level(logging.WARNING, logger="otel_budget"):
        with tracer.start_as_current_span("agent"):
            for _ in range(9):
                llm_call(tracer, 0.1)  # 0.1 .. 0.9
            llm_call(tracer, 0.05, 0.06)  # 0.96
    assert [w["threshold"] for w in warnings] == [0.5, 0.8, 0.95]
    assert all(w["scope"] for w in warnings)
    root = by_name(exporter)["agent"]
    assert [e.attributes["otel_budget.threshold"] for e in root.events
            if e.name == attrs.EVENT_THRESHOLD] == [0.5, 0.8, 0.95]  # fmt: skip
    # A trace is one of thousands: its crossings go to events, metrics and on_warning, and
    # never to one log line per trace (otel_budget.thresholds).
    assert sum("crossed" in r.getMessage() for r in caplog.records) == 0


def test_raising_callbacks_do_not_break_enforcement(make_processor: Any, tracer: Any) -> None:
    def boom(_: Any) -> None:
        raise RuntimeError("callback bug")

    make_processor(max_usd=0.3, on_warning=boom, on_exceeded=boom)
    with tracer.start_as_current_span("agent"):
        llm_call(tracer, 0.2)
        with pytest.raises(BudgetExceededError):
            llm_call(tracer, 0.2)


class BrokenStorage(MemoryStorage):
    def reserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("ledger down")


def test_fail_open_lets_calls_through_and_logs_once(
    make_processor: Any, tracer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    make_processor(max_usd=0.1, storage=BrokenStorage(), failure_policy="fail_open")
    with caplog.at_level(logging.ERROR, logger="otel_budget"):
        with tracer.start_as_current_span("agent"):
            for _ in range(5):
                llm_call(tracer, 0.05)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "ledger down" in errors[0].getMessage()


def test_fail_closed_refuses_with_budget_error(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=0.1, storage=BrokenStorage(), failure_policy="fail_closed")
    with tracer.start_as_current_span("agent"):
        with pytest.raises(BudgetExceededError) as info:
            llm_call(tracer, 0.05)
    assert info.value.reason == "internal_error"
    assert isinstance(info.value.__cause__, ConnectionError)


def test_bad_projection_from_another_instrumentation_is_contained(
    make_processor: Any, tracer: Any, exporter: Any
) -> None:
    make_processor(max_usd=1)
    with tracer.start_as_current_span("agent"):
        with tracer.start_as_current_span(
            "chat x", attributes={**gen_ai_attrs(), attrs.COST_PROJECTED_USD: float("nan")}
        ):
            pass
    assert "chat x" in by_name(exporter)


def test_named_scopes_with_daily_window_roll_over(make_processor: Any, tracer: Any) -> None:
    now = [1_700_000_000.0]  # 2023-11-14T22:13:20Z
    processor = make_processor(
        max_usd=100, scopes=[ScopeRule("user", max_usd=0.5, window="day")], clock=lambda: now[0]
    )
    with scope(user="alice"):
        with tracer.start_as_current_span("run1"):
            llm_call(tracer, 0.3)
            with pytest.raises(BudgetExceededError) as info:
                llm_call(tracer, 0.3)
    assert info.value.scope == "user:alice@d20231114"
    with scope(user="bob"), tracer.start_as_current_span("run2"):
        llm_call(tracer, 0.3)  # another user has their own cap
    now[0] += 3 * 3600  # past midnight UTC
    with scope(user="alice"), tracer.start_as_current_span("run3"):
        llm_call(tracer, 0.3)
    assert processor.spent_usd("user:alice@d20231115") == pytest.approx(0.3)
    # identity from a span attribute, when the context names none
    with tracer.start_as_current_span("run4"):
        call = begin_call(
            tracer, "chat test-model", attributes={**gen_ai_attrs(), "user.id": "alice"},
            projected_nanos=parse_usd(0.2), name="test-model", provider="openai",
        )  # fmt: skip
        call.finish(parse_usd(0.2))
    assert processor.spent_usd("user:alice@d20231115") == pytest.approx(0.5)


def test_pause_resume_and_scope_limits(make_processor: Any, tracer: Any) -> None:
    processor = make_processor(max_usd=10, scopes=[ScopeRule("tenant", max_usd=1)])
    processor.pause()
    with tracer.start_as_current_span("agent"), pytest.raises(BudgetExceededError) as info:
        llm_call(tracer, 0.01)
    assert info.value.reason == "paused"
    processor.resume()
    processor.pause("tenant:acme")
    with scope(tenant="acme"), tracer.start_as_current_span("a"):
        with pytest.raises(BudgetExceededError):
            llm_call(tracer, 0.01)
    with scope(tenant="globex"), tracer.start_as_current_span("b"):
        llm_call(tracer, 0.01)
    processor.resume("tenant:acme")
    processor.set_scope_limit("tenant", "acme", 5)
    with scope(tenant="acme"), tracer.start_as_current_span("c"):
        llm_call(tracer, 3)  # above the rule's $1, within acme's own $5


def test_provider_error_releases_and_charges_nothing(make_processor: Any, tracer: Any) -> None:
    processor = make_processor(max_usd=0.5)
    with tracer.start_as_current_span("agent") as root:
        trace_id = root.get_span_context().trace_id
        for _ in range(5):
            call = begin_call(
                tracer, "chat test-model", attributes=gen_ai_attrs(),
                projected_nanos=parse_usd(0.4), name="test-model", provider="openai",
            )  # fmt: skip
            call.fail(ConnectionError("refused"))
        llm_call(tracer, 0.4)
        assert processor.trace_report(trace_id).total_usd == pytest.approx(0.4)


def test_overshoot_is_recorded_and_reported(make_processor: Any, tracer: Any, exporter: Any) -> None:
    make_processor(max_usd=1)
    with tracer.start_as_current_span("agent"):
        llm_call(tracer, 0.1, 0.3)
    spans = by_name(exporter)
    assert spans["chat test-model"].attributes[attrs.COST_OVERSHOOT_USD] == pytest.approx(0.2)
    assert spans["agent"].attributes[attrs.TRACE_SPENT_USD] == pytest.approx(0.3)


def test_unsampled_root_and_processor_on_separate_provider(make_processor: Any) -> None:
    processor = make_processor(max_usd=0.3)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(processor)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    own = provider.get_tracer("own")
    with own.start_as_current_span("agent"):
        llm_call(own, 0.1)
    root = next(s for s in exporter.get_finished_spans() if s.name == "agent")
    assert root.attributes[attrs.TRACE_SPENT_USD] == pytest.approx(0.1)


class ReserveDown(MemoryStorage):
    """A ledger whose reservations fail (an outage) but whose other operations work."""

    def reserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("reserve unavailable")


def test_fail_open_still_records_the_spend(make_processor: Any, tracer: Any) -> None:
    processor = make_processor(max_usd=10, storage=ReserveDown(), failure_policy="fail_open")
    with tracer.start_as_current_span("agent") as root:
        key = f"t:{root.get_span_context().trace_id:032x}"
        for _ in range(3):
            llm_call(tracer, 0.05, 0.04)  # through the processor's on_start
        noop = trace.NoOpTracerProvider().get_tracer("noop")
        llm_call(noop, 0.05, 0.02, processor=processor)  # through begin_call's own path
        report = processor.trace_report(root.get_span_context().trace_id)
        assert processor.spent_usd(key) == pytest.approx(0.14)
    assert report.total_usd == pytest.approx(0.14)


def test_a_stated_projection_never_lowers_what_the_span_projects(
    make_processor: Any, tracer: Any, exporter: InMemorySpanExporter
) -> None:
    """A hand-written GenAI span that states ``projected_usd=0`` is still reserved at what its
    own attributes project (model, max tokens, the assumed input): refused on a small
    budget before anything is spent, and exported as refused."""
    make_processor(0.001)
    start = {**gen_ai_attrs("gpt-4o"), attrs.GEN_AI_REQUEST_MAX_TOKENS: 1000,
             attrs.COST_PROJECTED_USD: 0.0}  # fmt: skip
    with tracer.start_as_current_span("agent"):
        with pytest.raises(BudgetExceededError) as info:
            tracer.start_span("chat gpt-4o", kind=SpanKind.CLIENT, attributes=start)
    assert info.value.reason == "limit" and info.value.projected_usd > 0.01
    refused = by_name(exporter)["chat gpt-4o"]
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes[attrs.COST_PROJECTED_USD] > 0.01
