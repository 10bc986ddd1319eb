"""MCP tool calls through the real ``mcp`` SDK: a real server (in-process, or over stdio in a
subprocess) and a real ``ClientSession``, with the LLM calls of the same run made by the real
``openai`` SDK against ``FakeLLMServer``.

The server counts the tools it actually ran (``EXECUTIONS``, or its ``stats://executions``
resource across a process boundary): a refused call must never reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp", reason="the mcp extra is not installed (pip install '.[mcp]')")

import openai  # noqa: E402
import wrapt  # noqa: E402
from mcp import Client, ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.session import ClientSession as SessionClass  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402
from mcp.types import CallToolResult, TextContent  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from otel_budget import (  # noqa: E402
    BudgetExceededError,
    BudgetInstrumentor,
    LoopPolicy,
    PriceBook,
    Substitute,
    agent_span,
    budget,
)
from otel_budget import attributes as attrs  # noqa: E402
from otel_budget.config import libraries_from_env  # noqa: E402
from otel_budget.instrumentation.mcp import MCPInstrumentor  # noqa: E402
from otel_budget.instrumentation.mcp.call_token import (  # noqa: E402
    OPEN_CALLS,
    ledger_token,
    new_token,
)
from otel_budget.instrumentation.mcp.outcome import CALL_META_KEY  # noqa: E402
from otel_budget.instrumentation.mcp.server import METERED_BY  # noqa: E402
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor  # noqa: E402
from otel_budget.propagation import trace_budget  # noqa: E402
from otel_budget.scopes import trace_key  # noqa: E402
from otel_budget.testing import Behaviour, FakeLLMServer  # noqa: E402
from tests.helpers import NANOS, nanos, spans_named  # noqa: E402
from tests.mcp_tool_server import EXECUTIONS, build_server  # noqa: E402
from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEARCH_USD = "0.01"


def is_error(result: Any) -> bool:
    """``CallToolResult.is_error`` (mcp 2), ``isError`` (mcp 1)."""
    return bool(getattr(result, "is_error", None) or getattr(result, "isError", None))


def page_price(result: Any) -> Decimal:
    """$0.000004 a word of the page; the price book projects with ``None`` (before the call):
    at most 1,000 words."""
    if result is None:
        return Decimal("0.004")
    return 0 if is_error(result) else Decimal("0.000004") * len(result.content[0].text.split())


PRICES = {"search": SEARCH_USD, "fetch_page": page_price}
MINI = "gpt-4o-mini"
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075)}  # genai-prices' own, so the bills compare exactly


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _count() -> Iterator[None]:
    EXECUTIONS.clear()
    yield
    EXECUTIONS.clear()


@pytest.fixture
def instrumented() -> Iterator[MCPInstrumentor]:
    instrumentor = MCPInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture
def processor(make_processor: Any, instrumented: Any) -> Callable[..., Any]:
    def make(max_usd: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("prices", PriceBook(tools=PRICES))
        return make_processor(max_usd, **kwargs)

    return make


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    srv = RedisServer().start()
    yield srv.url
    srv.cleanup()


# Generous timeouts: these tests check who charges a call, not outages, on a loaded machine.
SLOW = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Any]:
    """A Redis ledger of its own (a fresh key prefix) on the module's redis-server."""
    from otel_budget.storage.redis import RedisStorage

    storage = RedisStorage(redis_url, prefix=f"otbtest:{uuid.uuid4().hex[:12]}:", **SLOW)
    yield storage
    storage.close()


def trace_spent(storage: Any, trace_id: int) -> int:
    """What the shared ledger holds (spent and reserved) on one trace's scope."""
    usage = storage.usage(trace_key(trace_id))
    return 0 if usage is None else usage.spent + usage.reserved


def settled_spent(storage: Any, trace_id: int, expected: int, timeout: float = 5.0) -> int:
    """The trace's spend once it is ``expected`` (another process queues its settles for a
    few ms), or what it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = trace_spent(storage, trace_id)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def run(body: Callable[[Any], Awaitable[Any]]) -> Any:
    """``body(client)`` against the in-process test server."""

    async def main() -> Any:
        async with Client(build_server()) as client:
            return await body(client)

    return asyncio.run(main())


def tool_spans(exporter: Any, name: str = "search") -> list[Any]:
    return spans_named(exporter, f"execute_tool {name}")


def raw_call_tool(session: Any, name: str, arguments: Any, meta: dict[str, Any]) -> Any:
    """``ClientSession.call_tool`` as an uninstrumented client sends it (a remote client
    without otel-budget, or one that forges ``params._meta``)."""
    return SessionClass.call_tool.__wrapped__(session, name, arguments, meta=meta)


def spent(processor: Any, run_budget: Any) -> int:
    return round(run_budget.report().total_usd * NANOS)


def stdio_params(*server_args: str) -> StdioServerParameters:
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return StdioServerParameters(
        command=sys.executable, args=["-m", "tests.mcp_tool_server", *server_args],
        env=env, cwd=str(ROOT),
    )  # fmt: skip


async def executions(session: Any) -> dict[str, int]:
    contents = (await session.read_resource("stats://executions")).contents
    return dict(json.loads(contents[0].text))


# -- spans and prices --------------------------------------------------------------------------
def test_call_tool_is_an_execute_tool_span_priced_from_the_price_book(
    processor: Any, exporter: Any
) -> None:
    processor()

    async def body(client: Any) -> Any:
        with budget(max_usd=1) as block:
            result = await client.call_tool("search", {"query": "budgets"})
        return block, result

    block, result = run(body)
    assert result.content[0].text == "3 results for budgets"
    (span,) = tool_spans(exporter)
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes[attrs.GEN_AI_OPERATION_NAME] == "execute_tool"
    assert span.attributes[attrs.GEN_AI_TOOL_NAME] == "search"
    assert span.attributes[attrs.GEN_AI_TOOL_TYPE] == "extension"
    assert span.attributes["mcp.method.name"] == "tools/call"
    assert span.attributes["mcp.protocol.version"] == "2026-07-28"
    assert span.attributes[attrs.COST_USD] == pytest.approx(0.01)
    # Content is opt-in: neither the arguments nor the result are on the span.
    assert attrs.GEN_AI_TOOL_CALL_ARGUMENTS not in span.attributes
    assert attrs.GEN_AI_TOOL_CALL_RESULT not in span.attributes
    report = block.report()
    assert report.tool_calls == 1 and report.tools_usd == pytest.approx(0.01)
    assert report.by_tool["search"].calls == 1
    # The server's own span (mcp 2) continues our trace under our span; it is not charged.
    server_span = spans_named(exporter, "tools/call search")
    if server_span:
        assert server_span[0].parent.span_id == span.context.span_id
        assert server_span[0].context.trace_id == span.context.trace_id


def test_content_capture_puts_arguments_and_result_on_the_span(
    processor: Any, exporter: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    processor()
    run(lambda client: client.call_tool("search", {"query": "secret plans"}))
    (span,) = tool_spans(exporter)
    assert "secret plans" in span.attributes[attrs.GEN_AI_TOOL_CALL_ARGUMENTS]
    assert "3 results for secret plans" in span.attributes[attrs.GEN_AI_TOOL_CALL_RESULT]


def test_a_computed_price_gets_the_call_tool_result(processor: Any, exporter: Any) -> None:
    processor()
    run(lambda client: client.call_tool("fetch_page", {"url": "https://example.test"}))
    (span,) = tool_spans(exporter, "fetch_page")
    assert span.attributes[attrs.COST_USD] == pytest.approx(250 * 0.000004)


def test_llm_and_tool_calls_of_one_run_share_one_budget(
    processor: Any, exporter: Any
) -> None:
    """An agent turn: the model (real openai SDK, our instrumentor) asks for a tool, the tool
    runs on the MCP server, the model answers. One budget, one trace, one report."""
    processor()
    openai_instrumentor = OpenAIBudgetInstrumentor()
    openai_instrumentor.instrument()
    try:
        with FakeLLMServer(prices=SERVER_PRICES) as llm:
            llm.script(Behaviour(tool_calls=[{"name": "search", "arguments": {"query": "x"}}]))

            async def body(client: Any) -> Any:
                model = openai.AsyncOpenAI(base_url=llm.openai_base_url, api_key="k", max_retries=0)
                messages: list[Any] = [{"role": "user", "content": "find x"}]
                with budget(max_usd=1) as block:
                    with agent_span("researcher"):
                        reply = await model.chat.completions.create(model=MINI, messages=messages)
                        call = reply.choices[0].message.tool_calls[0]
                        result = await client.call_tool(
                            call.function.name, json.loads(call.function.arguments)
                        )
                        messages += [reply.choices[0].message.model_dump(exclude_none=True), {
                            "role": "tool", "tool_call_id": call.id,
                            "content": result.content[0].text,
                        }]  # fmt: skip
                        await model.chat.completions.create(model=MINI, messages=messages)
                await model.close()
                return block

            block = run(body)
            billed = llm.stats()["billed_nanos"]
    finally:
        openai_instrumentor.uninstrument()
    report = block.report()
    assert report.calls == 2 and report.tool_calls == 1
    assert round(report.llm_usd * NANOS) == billed  # the provider's bill, to the nano-dollar
    assert round(report.tools_usd * NANOS) == nanos(0.01)
    assert round(report.total_usd * NANOS) == billed + nanos(0.01)
    assert report.by_agent["researcher"].calls == 3
    (tool_span,) = tool_spans(exporter)
    chat_spans = spans_named(exporter, f"chat {MINI}")
    assert len(chat_spans) == 2
    assert {s.context.trace_id for s in [tool_span, *chat_spans]} == {tool_span.context.trace_id}


# -- refusals ----------------------------------------------------------------------------------
def test_a_call_that_does_not_fit_is_refused_before_the_request_is_sent(
    processor: Any, exporter: Any
) -> None:
    processor()

    async def body(client: Any) -> Any:
        with budget(max_usd="0.025") as block:
            await client.call_tool("search", {"query": "a"})
            await client.call_tool("search", {"query": "b"})
            with pytest.raises(BudgetExceededError) as refused:
                await client.call_tool("search", {"query": "c"})
        return block, refused.value

    block, error = run(body)
    assert error.reason == "limit"
    assert EXECUTIONS["search"] == 2  # the third never reached the server
    assert block.report().total_usd == pytest.approx(0.02)
    refused = [s for s in tool_spans(exporter) if s.status.status_code is StatusCode.ERROR]
    assert len(refused) == 1
    assert refused[0].attributes[attrs.ERROR_TYPE] == "BudgetExceededError"
    # Nothing was sent for it: no server span under it.
    assert not [s for s in exporter.get_finished_spans()
                if s.parent is not None and s.parent.span_id == refused[0].context.span_id]


def test_concurrent_calls_never_overspend(processor: Any) -> None:
    processor()

    async def body(client: Any) -> Any:
        with budget(max_usd="0.035") as block:
            outcomes = await asyncio.gather(
                *(client.call_tool("search", {"query": f"q{i}"}) for i in range(10)),
                return_exceptions=True,
            )
        return block, outcomes

    block, outcomes = run(body)
    refused = [o for o in outcomes if isinstance(o, BudgetExceededError)]
    assert len(refused) == 7 and EXECUTIONS["search"] == 3
    assert block.report().total_usd == pytest.approx(0.03)


def test_loop_detection_trips_on_the_nth_identical_call(processor: Any, exporter: Any) -> None:
    processor(loop_detection=LoopPolicy(threshold=4))

    async def body(client: Any) -> Any:
        with budget(max_usd=10):
            for i in range(6):  # different arguments: an ordinary agent, never a loop
                await client.call_tool("search", {"query": f"page {i}"})
            for _ in range(3):
                await client.call_tool("search", {"query": "same"})
            with pytest.raises(BudgetExceededError) as stopped:
                await client.call_tool("search", {"query": "same"})
        return stopped.value

    error = run(body)
    assert error.reason == "loop_detected"
    assert EXECUTIONS["search"] == 9  # the 4th identical call never ran
    looped = tool_spans(exporter)[-1]
    assert looped.attributes[attrs.ERROR_TYPE] == "BudgetExceededError"
    assert looped.attributes["otel_budget.budget.reason"] == "loop_detected"


def test_on_exceeded_substitute_answers_instead_of_the_tool(processor: Any) -> None:
    placeholder = CallToolResult(content=[TextContent(type="text", text="out of budget")])
    processor(on_exceeded=lambda info: Substitute(placeholder))

    async def body(client: Any) -> Any:
        with budget(max_usd="0.001"):
            return await client.call_tool("search", {"query": "x"})

    assert run(body) is placeholder
    assert EXECUTIONS["search"] == 0


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_a_failure_of_ours_follows_the_failure_policy(
    processor: Any, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """fail_open: the tool runs (unmetered, logged); fail_closed: refused before it runs.
    Either way only the tool's result or a BudgetExceededError reaches the app."""
    processor(failure_policy=policy)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in otel-budget")

    monkeypatch.setattr("otel_budget.instrumentation.mcp.tool_call.abegin_tool", broken)

    async def body(client: Any) -> Any:
        with budget(max_usd=1):
            try:
                return await client.call_tool("search", {"query": "a"})
            except BudgetExceededError as error:
                return error

    outcome = run(body)
    if policy == "fail_open":
        assert outcome.content[0].text == "3 results for a"
        assert EXECUTIONS["search"] == 1
    else:
        assert isinstance(outcome, BudgetExceededError) and outcome.reason == "internal_error"
        assert EXECUTIONS["search"] == 0


def test_a_failure_of_ours_while_settling_never_replaces_the_result(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    processor()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in otel-budget")

    monkeypatch.setattr("otel_budget.instrumentation.mcp.tool_call.settle_result", broken)
    result = run(lambda client: client.call_tool("search", {"query": "a"}))
    assert result.content[0].text == "3 results for a"


# -- how calls end -----------------------------------------------------------------------------
def test_a_tool_error_result_is_an_error_span_and_is_charged(
    make_processor: Any, instrumented: Any, exporter: Any
) -> None:
    make_processor(prices=PriceBook(tools={"broken": "0.003"}))

    async def body(client: Any) -> Any:
        with budget(max_usd=1) as block:
            result = await client.call_tool("broken", {"reason": "upstream 500"})
        return block, result

    block, result = run(body)
    assert is_error(result) and EXECUTIONS["broken"] == 1
    (span,) = tool_spans(exporter, "broken")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.ERROR_TYPE] == "tool_error"
    assert span.attributes[attrs.COST_USD] == pytest.approx(0.003)  # the tool ran: paid
    assert block.report().tools_usd == pytest.approx(0.003)


def test_a_json_rpc_error_is_released_with_its_code(
    make_processor: Any, instrumented: Any, exporter: Any
) -> None:
    make_processor(prices=PriceBook(tools={"refuse": "0.003"}))

    async def body(client: Any) -> Any:
        with budget(max_usd=1) as block:
            with pytest.raises(MCPError):
                await client.call_tool("refuse", {"reason": "no"})
        return block

    block = run(body)
    (span,) = tool_spans(exporter, "refuse")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.ERROR_TYPE] == "-32602"
    assert span.attributes["rpc.response.status_code"] == "-32602"
    assert span.attributes[attrs.COST_USD] == 0.0
    assert block.report().total_usd == 0


def test_a_timeout_is_charged_what_was_reserved(processor: Any, exporter: Any) -> None:
    """The server may have run the tool: a loop of timeouts must still run out of budget."""
    processor(prices=PriceBook(tools={**PRICES, "slow": "0.004"}))

    async def body(client: Any) -> Any:
        with budget(max_usd=1) as block:
            with pytest.raises(MCPError):
                await client.session.call_tool("slow", {"seconds": 2}, read_timeout_seconds=0.1)
        return block

    block = run(body)
    (span,) = tool_spans(exporter, "slow")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.ERROR_TYPE] == "mcp.shared.exceptions.MCPError"
    assert span.attributes[attrs.COST_USD] == pytest.approx(0.004)
    assert block.report().tools_usd == pytest.approx(0.004)


def test_an_unpriced_tool_is_free_but_counted(processor: Any, exporter: Any) -> None:
    processor()

    async def body(client: Any) -> Any:
        with budget(max_usd=1) as block:
            await client.call_tool("where_am_i", {})
        return block

    report = run(body).report()
    assert report.tool_calls == 1 and report.total_usd == 0


# -- trace context -----------------------------------------------------------------------------
def test_the_server_continues_the_trace_of_the_tool_span(processor: Any, exporter: Any) -> None:
    processor()

    async def body(client: Any) -> Any:
        with budget(max_usd=1):
            return await client.call_tool("where_am_i", {})

    seen = json.loads(run(body).content[0].text)
    (span,) = tool_spans(exporter, "where_am_i")
    assert seen["trace_id"] == f"{span.context.trace_id:032x}"
    assert seen["traceparent"].split("-")[1:3] == [
        f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"
    ]


def test_meta_the_caller_gave_is_kept_and_not_modified(processor: Any) -> None:
    processor()
    meta = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    async def body(client: Any) -> Any:
        return await client.session.call_tool("where_am_i", {}, meta=meta)

    seen = json.loads(run(body).content[0].text)
    assert seen["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert meta == {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


# -- over stdio, in another process ------------------------------------------------------------
def test_stdio_server_subprocess(processor: Any, exporter: Any) -> None:
    processor()

    async def main() -> Any:
        async with stdio_client(stdio_params()) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with budget(max_usd="0.015") as block:
                first = await session.call_tool("search", {"query": "a"})
                where = await session.call_tool("where_am_i", {})
                with pytest.raises(BudgetExceededError):
                    await session.call_tool("search", {"query": "b"})
            return block, first, where, await executions(session)

    block, first, where, counted = asyncio.run(main())
    assert first.content[0].text == "3 results for a"
    assert counted == {"search": 1, "where_am_i": 1}  # the refused call never arrived
    assert block.report().total_usd == pytest.approx(0.01)
    span = tool_spans(exporter, "where_am_i")[0]
    assert span.attributes["mcp.protocol.version"]
    seen = json.loads(where.content[0].text)
    assert seen["trace_id"] == f"{span.context.trace_id:032x}"  # across the process boundary


# -- server side -------------------------------------------------------------------------------
def test_a_server_enforces_its_own_budget_per_trace(make_processor: Any, exporter: Any) -> None:
    """An uninstrumented client; the server (another process) has otel-budget with a $0.015
    trace budget and search at $0.01: the second search of one client trace is refused on the
    server, before the tool runs, and the client sees why as a tool error."""
    make_processor()  # the client side traces (the SDK's span carries the trace), meters nothing
    tracer = trace.get_tracer("tests")

    async def main() -> Any:
        params = stdio_params("--instrument", "0.015")
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with tracer.start_as_current_span("agent run"):
                first = await session.call_tool("search", {"query": "a"})
                second = await session.call_tool("search", {"query": "b"})
            with tracer.start_as_current_span("another run"):
                third = await session.call_tool("search", {"query": "c"})
            # A budget the client carries in baggage narrows the server's trace budget.
            with tracer.start_as_current_span("tight run"), trace_budget(max_usd="0.005"):
                fourth = await session.call_tool("search", {"query": "d"})
            return first, second, third, fourth, await executions(session)

    first, second, third, fourth, counted = asyncio.run(main())
    assert not is_error(first) and not is_error(third)
    assert is_error(second) and "exceed the budget" in second.content[0].text
    assert is_error(fourth) and "$0.0050" in fourth.content[0].text
    assert counted == {"search": 2}


def test_server_tool_calls_are_spans_of_their_own_when_called_directly(
    processor: Any, exporter: Any
) -> None:
    processor()
    server = build_server()

    async def main() -> Any:
        with budget(max_usd="0.015") as block:
            await server.call_tool("search", {"query": "a"})
            with pytest.raises(BudgetExceededError):
                await server.call_tool("search", {"query": "b"})
        return block

    block = asyncio.run(main())
    assert EXECUTIONS["search"] == 1
    spans = tool_spans(exporter)
    assert [s.attributes[attrs.GEN_AI_TOOL_TYPE] for s in spans] == ["function", "function"]
    assert block.report().tool_calls == 1


def test_an_in_process_client_and_server_charge_a_call_once(
    processor: Any, exporter: Any
) -> None:
    storage = processor().storage

    async def body(client: Any) -> Any:
        with budget(max_usd=1) as block:
            await client.call_tool("search", {"query": "a"})
        return block

    report = run(body).report()
    assert report.tool_calls == 1 and report.tools_usd == pytest.approx(0.01)
    assert len(tool_spans(exporter)) == 1  # the client's: an in-process server adds none
    assert not OPEN_CALLS and storage.sizes()["tokens"] == 0  # taken, then released


def test_a_call_cancelled_by_a_cancel_scope_still_releases_its_token(
    processor: Any, ledger: Any
) -> None:
    """A call cancelled by anyio's ``move_on_after`` (as mcp's own timeouts are) held its
    token while in flight and releases it at once, not at its TTL (awaited, or from a
    worker thread when the scope cancels that await too: the level-triggered case, which
    this test does not force)."""
    import anyio

    processor(max_usd=1, storage=ledger)

    def held() -> int:
        return len(ledger.client.keys(ledger.prefix + "tok:*"))

    async def main() -> Any:
        async with stdio_client(stdio_params()) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            seen = []
            with budget(max_usd=1):
                async with anyio.create_task_group() as group:

                    async def call() -> None:
                        with anyio.move_on_after(0.5):
                            await session.call_tool("slow", {"seconds": 30})

                    group.start_soon(call)
                    for _ in range(40):
                        seen.append(held())
                        await anyio.sleep(0.025)
            deadline = time.monotonic() + 5
            while held() and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            return max(seen), held()

    during, after = asyncio.run(main())
    assert (during, after) == (1, 0)


def test_the_caller_cannot_choose_the_call_token(processor: Any) -> None:
    """A marker the caller puts in ``meta`` (say, a token copied from another call) is
    replaced by the one the client registered for this call: it is never spent."""
    storage = processor().storage
    copied = new_token()
    storage.put_token(ledger_token(copied, "where_am_i"), 60, nanos(1))

    async def body(client: Any) -> Any:
        with budget(max_usd=1):
            return await client.session.call_tool("where_am_i", {}, meta={CALL_META_KEY: copied})

    sent = json.loads(run(body).content[0].text)["call_token"]
    assert sent != copied and len(sent) == 32
    assert storage.take_token(ledger_token(copied, "where_am_i")) == nanos(1)  # untouched


def test_a_token_runs_only_the_tool_it_was_registered_for(processor: Any, exporter: Any) -> None:
    """A token registered (by a client on this ledger) for where_am_i does not run search
    unmetered; on where_am_i it is taken, and the server's span says who metered it."""
    storage = processor().storage
    token = new_token()
    storage.put_token(ledger_token(token, "where_am_i"), 60, nanos(1))

    async def body(client: Any) -> Any:
        with budget(max_usd="0.005"):
            other = await raw_call_tool(client.session, "search", {"query": "a"},
                                        {CALL_META_KEY: token})  # fmt: skip
            own = await raw_call_tool(client.session, "where_am_i", {}, {CALL_META_KEY: token})
        return other, own

    other, own = run(body)
    assert is_error(other) and "exceed the budget" in other.content[0].text
    assert not is_error(own) and EXECUTIONS == {"where_am_i": 1}
    (span,) = tool_spans(exporter, "where_am_i")
    assert span.attributes[METERED_BY] == "client"
    assert span.attributes[attrs.GEN_AI_TOOL_TYPE] == "function"
    assert span.attributes[attrs.COST_USD] == 0.0


def test_a_forged_marker_does_not_dodge_the_server_budget(processor: Any) -> None:
    processor()

    async def body(client: Any) -> Any:
        with budget(max_usd="0.005"):
            # Uninstrumented client path: a hand-made request naming a call that is not open.
            return await SessionClass.call_tool.__wrapped__(
                client.session, "search", {"query": "a"}, meta={CALL_META_KEY: "a" * 32}
            )

    result = run(body)
    assert is_error(result) and "exceed the budget" in result.content[0].text
    assert EXECUTIONS["search"] == 0


# -- charged once across processes: the client's call token on a shared ledger ---------------
def stdio_on_ledger(storage: Any, max_usd: str, *more: str) -> StdioServerParameters:
    """The test server in a subprocess, instrumented, on ``storage``'s Redis ledger."""
    url = f"redis://127.0.0.1:{storage.client.connection_pool.connection_kwargs['port']}/0"
    return stdio_params(
        "--instrument", max_usd, "--redis-url", url, "--prefix", storage.prefix, *more
    )


def test_client_and_server_in_two_processes_on_one_ledger_charge_a_call_once(
    processor: Any, exporter: Any, ledger: Any
) -> None:
    """An instrumented client (this process) and an instrumented server (a subprocess over
    stdio) on one Redis ledger, both pricing search at $0.01 with a $0.025 trace budget:
    each call is charged once on the trace's scope (it was charged twice, and the second
    call of a budget sized for two was refused)."""
    processor(max_usd="0.025", storage=ledger)
    tracer = trace.get_tracer("tests")

    async def main() -> Any:
        params = stdio_on_ledger(ledger, "0.025")
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with tracer.start_as_current_span("agent run") as root:
                trace_id = root.get_span_context().trace_id
                await session.call_tool("search", {"query": "a"})
                after_one = settled_spent(ledger, trace_id, nanos(0.01), timeout=1.0)
                second = await session.call_tool("search", {"query": "b"})
            return trace_id, after_one, second, await executions(session)

    trace_id, after_one, second, counted = asyncio.run(main())
    assert after_one == nanos(0.01)  # the price, once
    assert not is_error(second)
    assert counted == {"search": 2}
    assert settled_spent(ledger, trace_id, nanos(0.02), timeout=1.0) == nanos(0.02)
    assert [s.attributes[attrs.COST_USD] for s in tool_spans(exporter)] == [0.01, 0.01]


def test_a_replayed_or_made_up_token_is_charged_by_the_server(
    processor: Any, ledger: Any
) -> None:
    """The server takes a client's token once: the same token replayed by a client without
    otel-budget (it read it off the wire), or a made-up one, is charged by the server; so
    is a call its client priced below the server's price (here: not at all)."""
    processor(max_usd=1, storage=ledger, prices=PriceBook(tools={**PRICES, "where_am_i": "0.002"}))
    tracer = trace.get_tracer("tests")

    async def main() -> Any:
        params = stdio_on_ledger(
            ledger, "1", "--tool-usd", "where_am_i=0.002", "--tool-usd", "slow=0.003"
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with tracer.start_as_current_span("agent run") as root:
                trace_id = root.get_span_context().trace_id
                where = await session.call_tool("where_am_i", {})
                token = json.loads(where.content[0].text)["call_token"]
                spent = [settled_spent(ledger, trace_id, nanos(0.002), timeout=1.0)]
                await raw_call_tool(session, "where_am_i", {}, {CALL_META_KEY: token})
                spent.append(settled_spent(ledger, trace_id, nanos(0.004)))
                made_up = {CALL_META_KEY: secrets.token_hex(16)}
                await raw_call_tool(session, "where_am_i", {}, made_up)
                spent.append(settled_spent(ledger, trace_id, nanos(0.006)))
                # Unpriced here, $0.003 on the server: the server's price is charged.
                await session.call_tool("slow", {"seconds": 0})
                spent.append(settled_spent(ledger, trace_id, nanos(0.009)))
            return token, spent, await executions(session)

    token, spent, counted = asyncio.run(main())
    assert isinstance(token, str) and len(token) == 32
    assert spent == [nanos(0.002), nanos(0.004), nanos(0.006), nanos(0.009)]
    assert counted == {"where_am_i": 3, "slow": 1}
    assert ledger.take_token(ledger_token(token, "where_am_i")) is None  # nothing left


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_a_server_whose_ledger_is_down_at_the_take_meters_the_call(
    make_processor: Any, instrumented: Any, exporter: Any, private_server: Any, policy: str
) -> None:
    """A remote instrumented client registered its tokens in the shared ledger with what it
    reserved (the test puts them there); the server's ledger answers for the first call (taken: run unmetered,
    traced as metered by the client) and is frozen for the second: the server cannot take
    the token and meters the call itself, under its failure policy (fail_open: it runs and
    its charge reaches the ledger when Redis is back; fail_closed: refused, never run)."""
    from otel_budget.storage.redis import RedisStorage

    storage = RedisStorage(private_server.url, prefix="otbtest:", socket_timeout=0.2,
                           socket_connect_timeout=0.2)  # fmt: skip
    make_processor(1, storage=storage, failure_policy=policy, prices=PriceBook(tools=PRICES))
    tracer = trace.get_tracer("tests")
    tokens = [new_token(), new_token()]
    for token in tokens:
        storage.put_token(ledger_token(token, "search"), 60, nanos(0.01))

    async def body(client: Any) -> Any:
        with tracer.start_as_current_span("remote client's run") as root:
            first = await raw_call_tool(client.session, "search", {"query": "a"},
                                        {CALL_META_KEY: tokens[0]})  # fmt: skip
            private_server.freeze()
            try:
                second = await raw_call_tool(client.session, "search", {"query": "b"},
                                             {CALL_META_KEY: tokens[1]})  # fmt: skip
            finally:
                private_server.thaw()
        return root.get_span_context().trace_id, first, second

    try:
        trace_id, first, second = run(body)
        storage.flush(timeout=10)
        spans = tool_spans(exporter)
        assert not is_error(first)
        assert spans[0].attributes[METERED_BY] == "client"
        assert spans[0].attributes[attrs.COST_USD] == 0.0
        assert METERED_BY not in spans[1].attributes
        if policy == "fail_open":
            assert not is_error(second) and EXECUTIONS["search"] == 2
            assert spans[1].attributes[attrs.COST_USD] == pytest.approx(0.01)
            assert trace_spent(storage, trace_id) == nanos(0.01)  # the second call, once
        else:
            assert is_error(second) and "fail_closed" in second.content[0].text
            assert EXECUTIONS["search"] == 1
            assert trace_spent(storage, trace_id) == 0
    finally:
        storage.close()


def test_the_client_holds_its_token_from_reservation_to_settlement(
    processor: Any
) -> None:
    """Against a server without otel-budget (which takes nothing), the client's token is in
    its ledger while the call is in flight and gone once it settles: returned, a JSON-RPC
    error, cancelled."""
    storage = processor().storage

    def held() -> int:
        return int(storage.sizes()["tokens"])

    async def in_flight(task: Any) -> None:
        deadline = time.monotonic() + 10
        while held() == 0:
            assert time.monotonic() < deadline and not task.done(), "never registered"
            await asyncio.sleep(0.005)

    async def main() -> Any:
        async with stdio_client(stdio_params()) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            with budget(max_usd=1):
                where = await session.call_tool("where_am_i", {})
                after = [held()]
                slow = asyncio.ensure_future(session.call_tool("slow", {"seconds": 0.3}))
                await in_flight(slow)
                await slow
                after.append(held())
                with pytest.raises(MCPError):
                    await session.call_tool("refuse", {"reason": "no"})
                after.append(held())
                cancelled = asyncio.ensure_future(session.call_tool("slow", {"seconds": 30}))
                await in_flight(cancelled)
                cancelled.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cancelled
                after.append(held())
            return json.loads(where.content[0].text)["call_token"], after

    token, after = asyncio.run(main())
    assert after == [0, 0, 0, 0] and not OPEN_CALLS
    assert storage.take_token(ledger_token(token, "where_am_i")) is None


# -- instrumenting -----------------------------------------------------------------------------
def test_uninstrument_unwraps_exactly(make_processor: Any, exporter: Any) -> None:
    original = SessionClass.__dict__["call_tool"]
    instrumentor = MCPInstrumentor()
    instrumentor.instrument()
    assert isinstance(SessionClass.__dict__["call_tool"], wrapt.FunctionWrapper)
    instrumentor.uninstrument()
    assert SessionClass.__dict__["call_tool"] is original
    make_processor(prices=PriceBook(tools=PRICES))
    run(lambda client: client.call_tool("search", {"query": "a"}))
    assert not tool_spans(exporter)


def test_budget_instrumentor_wires_mcp(exporter: Any) -> None:
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(max_usd="0.015", prices=PriceBook(tools=PRICES), libraries=["mcp"])
    try:
        assert isinstance(SessionClass.__dict__["call_tool"], wrapt.FunctionWrapper)

        async def body(client: Any) -> Any:
            with trace.get_tracer("tests").start_as_current_span("run"):
                await client.call_tool("search", {"query": "a"})
                with pytest.raises(BudgetExceededError):
                    await client.call_tool("search", {"query": "b"})

        run(body)
    finally:
        instrumentor.uninstrument()
    assert not isinstance(SessionClass.__dict__["call_tool"], wrapt.FunctionWrapper)
    assert EXECUTIONS["search"] == 1


def test_mcp_is_instrumented_by_default() -> None:
    assert "mcp" in libraries_from_env({})


def test_instrumenting_before_mcp_is_imported(tmp_path: Path) -> None:
    """As under ``opentelemetry-instrument``: ``BudgetInstrumentor().instrument()`` configured
    by ``OTEL_BUDGET_*`` runs before the app imports mcp, and never imports it itself (a
    second of import time): the post-import hook wraps it on the app's first import."""
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent("""
        import asyncio, sys
        from otel_budget import BudgetExceededError, BudgetInstrumentor

        BudgetInstrumentor().instrument()
        assert "mcp" not in sys.modules
        from mcp import Client
        from tests.mcp_tool_server import EXECUTIONS, build_server

        async def main():
            async with Client(build_server()) as client:
                for i in range(3):
                    try:
                        await client.call_tool("search", {"query": f"q{i}"})
                    except BudgetExceededError as exc:
                        print("refused", exc.reason, EXECUTIONS["search"])
                        return
        asyncio.run(main())
    """))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"tools": {"search": 0.01}}))
    env = {
        **os.environ, "OTEL_BUDGET_MAX_USD": "0.015", "OTEL_BUDGET_PRICES_FILE": str(prices),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    }  # fmt: skip
    env["OTEL_BUDGET_INSTRUMENT"] = "mcp"  # (the others only slow the start down)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
        cwd=str(ROOT),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused limit 1", done.stderr
