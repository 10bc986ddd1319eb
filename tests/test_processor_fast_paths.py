"""The per-span shortcuts of issue 11 (fewer calls per GenAI span) keep every guarantee.

    pytest tests/test_processor_fast_paths.py

* thresholds are checked only from a run's ``alert_at`` on: a call that jumps over several
  thresholds fires each once, a call below fires none, a run without a limit never checks;
* ``begin`` reads "has a parent" from the SDK span instead of the current context: a call
  without a parent is still charged to the process-wide scope (a loop of parentless calls
  is stopped in total), one inside a trace to the trace;
* the call registry is a dict, still bounded.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from opentelemetry import trace

from otel_budget import BudgetExceededError
from otel_budget.metered import begin_call
from otel_budget.money import parse_usd
from otel_budget.runtime import CallRegistry
from otel_budget.scopes import PROCESS_SCOPE, trace_key


def call(tracer: trace.Tracer, projected: float, actual: float | None = None) -> Any:
    c = begin_call(
        tracer, "chat test-model", attributes={"gen_ai.operation.name": "chat"},
        projected_nanos=parse_usd(projected), name="test-model", provider="openai",
    )  # fmt: skip
    c.settle(parse_usd(projected if actual is None else actual))
    return c


def test_a_jump_over_thresholds_fires_each_once(make_processor: Any, tracer: Any) -> None:
    warnings: list[float] = []
    processor = make_processor(max_usd=1.0, on_warning=lambda w: warnings.append(w["threshold"]))
    with tracer.start_as_current_span("agent") as root:
        stats = processor.engine.trace_stats(root.get_span_context().trace_id)
        call(tracer, 0.1)  # 10 %: nothing
        assert warnings == []
        assert stats.alert_at == pytest.approx(parse_usd(0.5))  # next check from 50 % on
        call(tracer, 0.75)  # 85 %: 50 % and 80 % at once
        assert warnings == [0.5, 0.8]
        assert stats.alert_at == pytest.approx(parse_usd(0.95))
        call(tracer, 0.05)  # 90 %: still below 95 %
        assert warnings == [0.5, 0.8]
        call(tracer, 0.06)  # 96 %
        assert warnings == [0.5, 0.8, 0.95]
        assert stats.alert_at == math.inf  # all fired: never checked again
        with pytest.raises(BudgetExceededError):
            call(tracer, 0.1)
    assert warnings == [0.5, 0.8, 0.95]


def test_a_zero_budget_still_refuses_and_warns(make_processor: Any, tracer: Any) -> None:
    warnings: list[float] = []
    make_processor(max_usd=0, on_warning=lambda w: warnings.append(w["threshold"]))
    with tracer.start_as_current_span("agent"), pytest.raises(BudgetExceededError):
        call(tracer, 0.01)


def test_a_new_run_checks_no_threshold_below_the_first(
    make_processor: Any, tracer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace's totals start with the first threshold as their ``alert_at``: its calls below
    it run no threshold check at all (a parentless call is a new trace every time), and the
    first call that reaches it fires it."""
    warnings: list[float] = []
    processor = make_processor(max_usd=1.0, on_warning=lambda w: warnings.append(w["threshold"]))
    checks: list[int] = []
    real = processor.engine._check_thresholds
    monkeypatch.setattr(
        processor.engine, "_check_thresholds", lambda *a: (checks.append(1), real(*a))[1]
    )
    with tracer.start_as_current_span("agent") as root:
        stats = processor.engine.trace_stats(root.get_span_context().trace_id)
        assert stats.alert_at == pytest.approx(parse_usd(0.5))
        call(tracer, 0.2)
        call(tracer, 0.2)
        assert checks == [] and warnings == []
        call(tracer, 0.2)  # 60 %
        assert checks == [1] and warnings == [0.5]


def test_parentless_calls_are_stopped_in_total(make_processor: Any, tracer: Any) -> None:
    """No current span: each call starts its own trace, and all of them share the process
    scope (the SDK span's ``parent`` is None, read instead of the current context)."""
    processor = make_processor(max_usd=0.25)
    assert trace.get_current_span().get_span_context().is_valid is False
    call(tracer, 0.1)
    call(tracer, 0.1)
    with pytest.raises(BudgetExceededError) as info:
        call(tracer, 0.1)
    assert info.value.scope == PROCESS_SCOPE
    usage = processor.storage.usage(PROCESS_SCOPE)
    assert usage is not None and usage.spent == parse_usd(0.2) and usage.reserved == 0


def test_calls_in_a_trace_are_charged_to_the_trace(make_processor: Any, tracer: Any) -> None:
    processor = make_processor(max_usd=0.25)
    with tracer.start_as_current_span("agent") as root:
        key = trace_key(root.get_span_context().trace_id)
        call(tracer, 0.1)
        call(tracer, 0.1)
        with pytest.raises(BudgetExceededError) as info:
            call(tracer, 0.1)
        assert info.value.scope == key
        assert processor.storage.usage(key).spent == parse_usd(0.2)  # type: ignore[union-attr]
    assert processor.storage.usage(PROCESS_SCOPE) is None


def test_no_sdk_span_still_reads_the_current_context(make_processor: Any) -> None:
    """The API's no-op tracer hands back the parent's context: the call is charged to the
    parent's trace, looked up in the current context."""
    processor = make_processor(max_usd=0.15)
    noop = trace.NoOpTracer()
    parent = trace.NonRecordingSpan(trace.SpanContext(0xABC, 0xDEF, is_remote=False))
    with trace.use_span(parent):
        call(noop, 0.1)  # type: ignore[arg-type]
        with pytest.raises(BudgetExceededError) as info:
            call(noop, 0.1)  # type: ignore[arg-type]
    assert info.value.scope == trace_key(0xABC)
    assert processor.storage.usage(trace_key(0xABC)).spent == parse_usd(0.1)  # type: ignore[union-attr]


def test_call_registry_is_a_bounded_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_budget import runtime

    monkeypatch.setattr(runtime, "_MAX_REGISTERED", 3)
    calls = CallRegistry()
    for lease in range(5):
        calls.add(lease, lease)
    assert len(calls) == 3 and list(calls) == [2, 3, 4]
    assert calls.pop(4, None) == 4 and calls.pop(4, None) is None and calls.get(9) is None


def test_parentless_scopes_are_built_once(make_processor: Any) -> None:
    """A call without a parent (its own trace, no named scopes, no budget block): the process
    scope, the process's and its trace's totals, no pause keys; the process scope's spec is
    built once, not per call, and follows a changed limit."""
    from otel_budget.storage import ScopeLimit

    processor = make_processor(max_usd=0.25)
    engine = processor.engine
    scopes, stats, pauses = engine.scopes_for(7, True, None)
    assert scopes == (ScopeLimit(PROCESS_SCOPE, parse_usd(0.25)),)
    assert stats == (engine._process_stats, engine.trace_stats(7)) and pauses == ()
    again, _, _ = engine.scopes_for(8, True, None)
    assert again[0] is scopes[0]
    no_trace = engine.scopes_for(0, False, None)
    assert no_trace == (scopes, (engine._process_stats,), ())
    engine.settings.limit_nanos = parse_usd(0.5)
    assert engine.scopes_for(9, True, None)[0] == (ScopeLimit(PROCESS_SCOPE, parse_usd(0.5)),)
    engine.settings.limit_nanos = None
    assert engine.scopes_for(9, True, None) == ((), (engine._process_stats, engine.trace_stats(9)), ())
