"""agent_span (invoke_agent spans, spend per agent) and begin_tool (execute_tool spans)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from otel_budget import BudgetExceededError, abegin_tool, agent_span, begin_tool, budget
from otel_budget import attributes as attrs
from otel_budget.metered import begin_call
from otel_budget.money import parse_usd

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def llm(usd: float, model: str = "test-model") -> None:
    call = begin_call(
        trace.get_tracer("tests"), f"chat {model}",
        attributes={attrs.GEN_AI_OPERATION_NAME: "chat", attrs.GEN_AI_REQUEST_MODEL: model,
                    attrs.GEN_AI_PROVIDER_NAME: "openai"},
        projected_nanos=parse_usd(usd), name=model, provider="openai",
    )  # fmt: skip
    call.finish(parse_usd(usd), input_tokens=10, output_tokens=1)


def tool(name: str, usd: float, arguments: Any = None) -> Any:
    call = begin_tool(name, arguments=arguments, cost_usd=usd)
    call.finish("done")
    return call


def test_spend_per_agent_nested_threads_and_tasks(make_processor: Any, exporter: Any) -> None:
    make_processor()
    with budget(max_usd=10, name="crew") as run:
        llm(0.5)  # outside any agent
        with agent_span("planner", agent_id="p-1", description="plans") as span:
            assert trace.get_current_span() is span
            llm(1.0)
            with agent_span("researcher"):
                llm(0.25)
                tool("search", 0.01, {"q": 1})
                with ThreadPoolExecutor(2) as pool:  # workers started inside the block
                    list(pool.map(lambda _: llm(0.125), range(2)))
            tool("search", 0.02, {"q": 2})

            async def fan_out() -> None:
                async def writer(i: int) -> None:
                    async with agent_span("writer"):
                        llm(0.0625)

                await asyncio.gather(*(writer(i) for i in range(4)))

            asyncio.run(fan_out())
    report = run.report()
    assert set(report.by_agent) == {"planner", "researcher", "writer"}
    assert report.by_agent["planner"].usd == pytest.approx(1.02)
    assert report.by_agent["planner"].calls == 2
    assert report.by_agent["researcher"].usd == pytest.approx(0.25 + 0.01 + 0.25)
    assert report.by_agent["writer"].usd == pytest.approx(0.25) and report.by_agent["writer"].calls == 4
    assert report.total_usd == pytest.approx(0.5 + 1.02 + 0.51 + 0.25)
    assert "agent planner" in report.format()
    assert report.to_dict()["by_agent"]["writer"]["calls"] == 4

    spans = exporter.get_finished_spans()
    planner = next(s for s in spans if s.name == "invoke_agent planner")
    assert planner.attributes[attrs.GEN_AI_OPERATION_NAME] == "invoke_agent"
    assert planner.attributes[attrs.GEN_AI_AGENT_NAME] == "planner"
    assert planner.attributes[attrs.GEN_AI_AGENT_ID] == "p-1"
    assert planner.attributes[attrs.GEN_AI_AGENT_DESCRIPTION] == "plans"
    assert planner.kind == trace.SpanKind.INTERNAL
    researcher = next(s for s in spans if s.name == "invoke_agent researcher")
    assert researcher.parent.span_id == planner.context.span_id
    charged = [s for s in spans if s.name == "chat test-model"]
    assert sorted(s.attributes.get(attrs.AGENT_NAME, "-") for s in charged) == sorted(
        ["-", "planner", "researcher", "researcher", "researcher"] + ["writer"] * 4
    )
    root = next(s for s in spans if s.name == "crew")
    names, costs = root.attributes[attrs.TRACE_AGENTS], root.attributes[attrs.TRACE_AGENT_COSTS_USD]
    agents = dict(zip(names, costs, strict=True))
    assert agents == pytest.approx({"planner": 1.02, "researcher": 0.51, "writer": 0.25})


def test_agent_span_errors_and_decorator(make_processor: Any, exporter: Any) -> None:
    make_processor()

    @agent_span("flaky")
    def flaky() -> None:
        llm(0.1)
        raise KeyError("boom")

    with budget(max_usd=1) as run, pytest.raises(KeyError):
        flaky()
    span = next(s for s in exporter.get_finished_spans() if s.name == "invoke_agent flaky")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.ERROR_TYPE] == "KeyError"
    assert run.report().by_agent["flaky"].calls == 1

    # A refusal inside an agent ends its span in error and reaches the caller unchanged.
    with pytest.raises(BudgetExceededError), budget(max_usd=0.15), agent_span("spender"):
        llm(0.1)
        llm(0.1)
    span = next(s for s in exporter.get_finished_spans() if s.name == "invoke_agent spender")
    assert span.attributes[attrs.ERROR_TYPE] == "otel_budget.errors.BudgetExceededError" or (
        span.attributes[attrs.ERROR_TYPE].endswith("BudgetExceededError")
    )


def test_tool_calls_price_refuse_and_content(make_processor: Any, exporter: Any, monkeypatch: Any) -> None:
    make_processor()
    with budget(max_usd=0.05) as run:
        call = begin_tool("fetch", arguments='{"url": "u"}', call_id="call_9", cost_usd=0.02,
                          description="fetches a page", tool_type="extension")  # fmt: skip
        call.finish({"status": 200})
        failed = begin_tool("fetch", arguments={"url": "v"}, cost_usd=0.02)
        failed.fail(TimeoutError("slow"))  # a tool that raised: charged nothing
        billed = begin_tool("fetch", arguments={"url": "w"}, cost_usd=0.02)
        billed.fail(RuntimeError("partial"), cost_usd=0.01)  # ...unless it was billed anyway
        with pytest.raises(BudgetExceededError):
            begin_tool("fetch", arguments={"url": "x"}, cost_usd=0.03)  # 0.03 spent, 0.02 left
    report = run.report()
    assert report.tools_usd == pytest.approx(0.03) and report.tool_calls == 2  # 1 released
    spans = [s for s in exporter.get_finished_spans() if s.name == "execute_tool fetch"]
    first = spans[0]
    assert first.attributes[attrs.GEN_AI_OPERATION_NAME] == "execute_tool"
    assert first.attributes[attrs.GEN_AI_TOOL_CALL_ID] == "call_9"
    assert first.attributes[attrs.GEN_AI_TOOL_TYPE] == "extension"
    assert first.attributes[attrs.GEN_AI_TOOL_DESCRIPTION] == "fetches a page"
    assert first.attributes[attrs.COST_USD] == pytest.approx(0.02)
    assert attrs.GEN_AI_TOOL_CALL_ARGUMENTS not in first.attributes
    assert attrs.GEN_AI_TOOL_CALL_RESULT not in first.attributes
    assert spans[1].status.status_code is StatusCode.ERROR and spans[1].attributes[attrs.COST_USD] == 0
    assert spans[2].attributes[attrs.COST_USD] == pytest.approx(0.01)
    assert spans[3].attributes["otel_budget.budget.reason"] == "limit"

    exporter.clear()
    monkeypatch.setenv(CAPTURE_ENV, "SPAN_ONLY")
    with budget(max_usd=1):
        tool("fetch", 0.001, {"url": "secret"})
    span = exporter.get_finished_spans()[0]
    assert json.loads(span.attributes[attrs.GEN_AI_TOOL_CALL_ARGUMENTS]) == {"url": "secret"}
    assert span.attributes[attrs.GEN_AI_TOOL_CALL_RESULT] == "done"


def test_tool_prices_from_the_book_and_odd_inputs(make_processor: Any) -> None:
    from otel_budget.pricing import PriceBook

    make_processor(prices=PriceBook(tools={"geocode": 0.005}))
    with budget(max_usd=1) as run:
        call = begin_tool("geocode", arguments={"q": "Paris"})
        assert call.projected_nanos == parse_usd(0.005)
        call.finish([1.0, 2.0])
        for odd in (None, "", 42):  # an integration may hand us anything: never an error
            begin_tool(odd, arguments=object()).finish()  # type: ignore[arg-type]
        broken = begin_tool("compute", arguments=None, cost_usd=lambda result: 1 / 0,
                            max_cost_usd=0.01)  # fmt: skip
        broken.finish("x")  # a cost function that raises: charged what was reserved
    report = run.report()
    assert report.by_tool["geocode"].usd == pytest.approx(0.005)
    assert report.by_tool["compute"].usd == pytest.approx(0.01)
    assert {"unknown", "42"} <= set(report.by_tool)


def test_async_tool_calls(make_processor: Any) -> None:
    make_processor()

    async def main() -> Any:
        async with budget(max_usd=1) as run:
            async with agent_span("async-agent"):
                call = await abegin_tool("lookup", arguments={"id": 1}, cost_usd=lambda r: 0.001 * len(r),
                                         max_cost_usd=0.01)  # fmt: skip
                await call.afinish("abc")
                failing = await abegin_tool("lookup", arguments={"id": 2}, cost_usd=0.004)
                await failing.afail(ValueError("nope"))
        return run

    report = asyncio.run(main()).report()
    assert report.by_tool["lookup"].usd == pytest.approx(0.003)
    assert report.by_agent["async-agent"].usd == pytest.approx(0.003)


def test_a_book_price_function_that_cannot_answer_before_the_call_still_meters(
    make_processor: Any,
) -> None:
    """The price book's function is asked for ``None`` before the tool runs; one that cannot
    answer then must not switch metering off for the tool (it reserves the minimum and
    charges the computed price afterwards)."""
    from otel_budget.pricing import PriceBook

    make_processor(prices=PriceBook(tools={"pages": lambda result: 0.001 * len(result)}))
    with budget(max_usd=1) as run:
        call = begin_tool("pages", arguments={"doc": 1})
        assert call.call.charge is not None and call.call.charge.reserved
        call.finish("abcd")
    assert run.report().by_tool["pages"].usd == pytest.approx(0.004)


def test_a_taken_over_call_ends_its_span_once(make_processor: Any, exporter: Any) -> None:
    """A tool call whose body makes our own tool call under the same name (an integration's
    tool around an MCP call): the inner call charges, the outer span still ends (once, with
    the error when the body failed) and is exported."""
    make_processor()
    with budget(max_usd=1) as run:
        for fails in (False, True):
            outer = begin_tool("search", arguments={"q": fails}, cost_usd=0.01)
            with trace.use_span(outer.span, end_on_exit=False):
                inner = begin_tool("search", arguments={"q": fails}, cost_usd=0.01)
                inner.finish("r")
            if fails:
                outer.fail(RuntimeError("after the inner call"))
                outer.fail(RuntimeError("twice"))  # settled twice: ended once
            else:
                outer.finish("r")
    spans = [s for s in exporter.get_finished_spans() if s.name == "execute_tool search"]
    assert len(spans) == 4
    failed_outer = [s for s in spans if s.status.status_code is StatusCode.ERROR]
    assert len(failed_outer) == 1 and failed_outer[0].attributes[attrs.ERROR_TYPE] == "RuntimeError"
    assert run.report().tool_calls == 2 and run.report().tools_usd == pytest.approx(0.02)
