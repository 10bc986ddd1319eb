"""The public API: budget() as context manager and decorator (sync/async), track_tool."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry import trace

import otel_budget
from otel_budget import BudgetExceededError, budget, track_tool
from otel_budget import attributes as attrs
from otel_budget.metered import begin_call
from otel_budget.money import parse_usd


def llm(tracer: trace.Tracer, usd: float, model: str = "test-model") -> None:
    call = begin_call(
        tracer, f"chat {model}",
        attributes={attrs.GEN_AI_OPERATION_NAME: "chat", attrs.GEN_AI_REQUEST_MODEL: model,
                    attrs.GEN_AI_PROVIDER_NAME: "openai"},
        projected_nanos=parse_usd(usd), name=model, provider="openai",
    )  # fmt: skip
    call.finish(parse_usd(usd), input_tokens=100, output_tokens=10)


def test_public_names() -> None:
    from otel_budget import BudgetExceededError as E  # noqa: F401

    error = E("x", budget_usd=1.0, spent_usd=0.5, projected_usd=0.6, remaining_usd=0.5,
              scope="t:1", trace_id="ab", report=None)  # fmt: skip
    for name in ("budget_usd", "spent_usd", "projected_usd", "remaining_usd", "scope",
                 "trace_id", "report"):  # fmt: skip
        assert hasattr(error, name)
    assert otel_budget.__version__


def test_budget_starts_a_root_span_and_reports(make_processor: Any, tracer: Any, exporter: Any) -> None:
    make_processor()  # no default per-trace limit: the block's limit applies
    with pytest.raises(BudgetExceededError) as info:
        with budget(max_usd=0.5, name="runaway-agent") as run:
            for _ in range(100):
                llm(tracer, 0.2)
    report = run.report()
    assert report.total_usd == pytest.approx(0.4)
    assert report.remaining_usd == pytest.approx(0.1)
    assert report.budget_usd == 0.5
    assert report.calls == 2 and report.turns == 2 and report.aborts == 1
    assert report.by_model["test-model"].calls == 2
    assert report.by_model["test-model"].input_tokens == 200
    assert report.by_provider["openai"].usd == pytest.approx(0.4)
    assert report.terminated_by == "budget_exceeded"
    assert report.duration_s >= 0
    assert [e["name"] for e in report.events][-1] == attrs.EVENT_EXCEEDED
    assert info.value.report.total_usd == pytest.approx(0.4)
    assert "spent $0.4" in report.format()
    root = next(s for s in exporter.get_finished_spans() if s.name == "runaway-agent")
    assert root.parent is None
    assert root.attributes[attrs.TRACE_SPENT_USD] == pytest.approx(0.4)
    assert root.attributes[attrs.TRACE_BUDGET_USD] == 0.5
    assert root.attributes[attrs.TRACE_TERMINATED_BY] == "budget_exceeded"
    assert root.attributes[attrs.ERROR_TYPE] == "BudgetExceededError"
    assert report.to_dict()["by_model"]["test-model"]["calls"] == 2


def test_budget_inside_an_existing_trace_and_nesting(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=100)
    with tracer.start_as_current_span("request"):
        with budget(max_usd=1.0) as outer:
            llm(tracer, 0.5)
            with budget(max_usd=0.4) as inner:
                llm(tracer, 0.3)
                with pytest.raises(BudgetExceededError) as info:
                    llm(tracer, 0.2)  # inner has 0.1 left
                assert info.value.scope.startswith("b:")
            with pytest.raises(BudgetExceededError):
                with budget(max_usd=5):  # nested: still bounded by outer's 0.2 left
                    llm(tracer, 0.3)
            llm(tracer, 0.2)
    assert inner.report().total_usd == pytest.approx(0.3)
    assert outer.report().total_usd == pytest.approx(1.0)


def test_budget_replaces_the_default_trace_limit(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=0.1)
    with budget(max_usd=1):
        llm(tracer, 0.5)  # above the processor default, within the block


def test_budget_decorator_sync_and_async(make_processor: Any, tracer: Any) -> None:
    make_processor()

    @budget(max_usd=0.3)
    def agent(n: int) -> int:
        for _ in range(n):
            llm(tracer, 0.1)
        return n

    @budget(max_usd=0.3)
    async def async_agent(n: int) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
            llm(tracer, 0.1)
        return n

    assert agent(3) == 3
    assert agent(2) == 2  # a fresh budget per call
    assert agent.budget.report().total_usd == pytest.approx(0.2)
    with pytest.raises(BudgetExceededError):
        agent(4)
    assert asyncio.run(async_agent(3)) == 3
    with pytest.raises(BudgetExceededError):
        asyncio.run(async_agent(4))


def test_async_with_and_tasks_share_the_block(make_processor: Any, tracer: Any) -> None:
    make_processor()

    async def worker() -> int:
        done = 0
        try:
            for _ in range(10):
                await asyncio.sleep(0)
                llm(tracer, 0.01)
                done += 1
        except BudgetExceededError:
            pass
        return done

    async def main() -> tuple[int, Any]:
        async with budget(max_usd=0.25) as run:
            results = await asyncio.gather(*(worker() for _ in range(8)))
        return sum(results), run

    total, run = asyncio.run(main())
    assert total == 25
    assert run.report().total_usd == pytest.approx(0.25)


def test_budget_rejects_bad_values() -> None:
    for bad in (float("nan"), -1, "lots", True, float("inf")):
        with pytest.raises(ValueError):
            budget(max_usd=bad)


def test_budget_works_without_a_configured_processor(
    tracer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No processor registered: budget() creates a default one on first use (and adds it to
    # the global SDK provider: a private one here, so other tests do not inherit it).
    from opentelemetry.sdk.trace import TracerProvider

    private = TracerProvider()
    monkeypatch.setattr(otel_budget.api.trace, "get_tracer_provider", lambda: private)
    otel_budget.processor._ACTIVE.clear()
    try:
        with pytest.raises(BudgetExceededError):
            with budget(max_usd=0.1):
                llm(tracer, 0.06)
                llm(tracer, 0.06)
    finally:
        otel_budget.processor._ACTIVE.clear()


def test_track_tool_fixed_computed_and_refused(make_processor: Any, exporter: Any) -> None:
    make_processor()
    ran: list[str] = []

    @track_tool("web_search", cost_usd=0.05)
    def search(q: str) -> list[str]:
        ran.append(q)
        return [q]

    @track_tool("pages", cost_usd=lambda pages: 0.01 * len(pages), max_cost_usd=0.05)
    async def fetch(n: int) -> list[int]:
        return list(range(n))

    with pytest.raises(BudgetExceededError):
        with budget(max_usd=0.2) as run:
            search("a")
            asyncio.run(fetch(3))
            with track_tool("db", cost_usd=0.01) as call:
                call.result = "rows"
            search("b")
            search("c")  # 0.05 + 0.03 + 0.01 + 0.05 = 0.14; 0.05 more fits; next does not
            search("d")
    assert ran == ["a", "b", "c"]
    report = run.report()
    assert report.tools_usd == pytest.approx(0.19)
    assert report.by_tool["web_search"].calls == 3
    assert report.by_tool["pages"].usd == pytest.approx(0.03)
    assert report.tool_calls == 5
    tool_spans = [s for s in exporter.get_finished_spans() if s.name.startswith("execute_tool")]
    assert {s.attributes[attrs.GEN_AI_TOOL_NAME] for s in tool_spans} == {"web_search", "pages", "db"}
    assert all(s.attributes[attrs.GEN_AI_OPERATION_NAME] == "execute_tool" for s in tool_spans)
    assert all(s.parent is not None for s in tool_spans)


def test_failing_tool_is_charged_nothing(make_processor: Any) -> None:
    make_processor()

    @track_tool("flaky", cost_usd=0.05)
    def flaky() -> None:
        raise TimeoutError("upstream")

    with budget(max_usd=1) as run:
        with pytest.raises(TimeoutError):
            flaky()
    assert run.report().tools_usd == 0


def test_track_tool_bad_cost_function_falls_back_to_projection(make_processor: Any) -> None:
    make_processor()

    @track_tool("weird", cost_usd=lambda _: float("nan"), max_cost_usd=0.02)
    def weird() -> int:
        return 1

    with budget(max_usd=1) as run:
        assert weird() == 1
    assert run.report().tools_usd == pytest.approx(0.02)


def test_substitute_from_on_exceeded_replaces_the_refused_tool(make_processor: Any) -> None:
    from otel_budget import Substitute

    make_processor(on_exceeded=lambda info: Substitute(["cached result"]))
    ran: list[int] = []

    @track_tool("search", cost_usd=0.5)
    def search() -> list[str]:
        ran.append(1)
        return ["fresh result"]

    with budget(max_usd=0.6):
        assert search() == ["fresh result"]
        assert search() == ["cached result"]  # refused: the substitute, the tool never ran
    assert ran == [1]
