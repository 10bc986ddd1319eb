"""LangChain / LangGraph under a budget: the real ``langchain-openai`` ``ChatOpenAI`` and a real
LangGraph ReAct graph, driving the real ``openai`` SDK against ``FakeLLMServer``.

Each run is checked three ways: the ledger (``report()``), the spans exported, and what the
fake provider billed. Every money test runs with and without our openai instrumentor
underneath (the model call is then metered by the provider call instead of the handler:
charged once either way).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Annotated, Any

import pytest

pytest.importorskip("langchain_core", reason="the langchain extra is not installed")
pytest.importorskip("langgraph", reason="the langchain extra is not installed")
pytest.importorskip("langchain_openai", reason="the langchain extra is not installed")

from langchain_core.messages import AnyMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from langgraph.graph import START, StateGraph  # noqa: E402
from langgraph.graph.message import add_messages  # noqa: E402
from langgraph.prebuilt import ToolNode, tools_condition  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402
from typing_extensions import TypedDict  # noqa: E402

from otel_budget import BudgetExceededError, PriceBook, budget  # noqa: E402
from otel_budget import attributes as attrs  # noqa: E402
from otel_budget.instrumentation.langchain import (  # noqa: E402
    BudgetCallbackHandler,
    LangChainInstrumentor,
    protect_graph,
)
from otel_budget.instrumentation.langchain import handler as handler_module  # noqa: E402
from otel_budget.instrumentation.langchain.runs import RUNS  # noqa: E402
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor  # noqa: E402
from otel_budget.testing import Behaviour, FakeLLMServer  # noqa: E402
from tests.helpers import NANOS, spans_named  # noqa: E402

MINI = "gpt-4o-mini"
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075)}  # genai-prices' gpt-4o-mini
CALL_LOOKUP = Behaviour(tool_calls=[{"name": "lookup", "arguments": {"city": "Paris"}}])
QUESTION = {"messages": [("user", "What is the weather in Paris?")]}


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """No LangSmith tracing, and nothing dials out beyond 127.0.0.1 (checked on every
    connect the run makes)."""
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    dialed: list[Any] = []
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> Any:
        dialed.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield dialed
    outside = [a for a in dialed if not (isinstance(a, tuple) and a[0] in ("127.0.0.1", "::1"))]
    assert not outside, f"dialed out: {outside}"


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture
def processor(make_processor: Any) -> Any:
    return make_processor(prices=PriceBook())


@pytest.fixture(params=[False, True], ids=["handler-meters", "openai-instrumented"])
def provider_instrumented(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Whether our openai instrumentor meters the SDK calls underneath."""
    if not request.param:
        yield False
        return
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    yield True
    instrumentor.uninstrument()


@pytest.fixture
def langchain_instrumented() -> Iterator[LangChainInstrumentor]:
    instrumentor = LangChainInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture(autouse=True)
def _no_runs_left() -> Iterator[None]:
    yield
    left = len(RUNS)
    RUNS._runs.clear()
    assert left == 0, "a run was never ended"


class ToolLog:
    def __init__(self) -> None:
        self.calls: list[str] = []


@pytest.fixture
def tool_log() -> ToolLog:
    return ToolLog()


def make_lookup(log: ToolLog) -> Any:
    @tool
    def lookup(city: str) -> str:
        """Look up the weather of a city."""
        log.calls.append(city)
        return f"sunny in {city}"

    return lookup


def llm(server: FakeLLMServer, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=MINI, base_url=server.openai_base_url, api_key="test", max_retries=0, **kwargs
    )


def react_graph(
    server: FakeLLMServer, log: ToolLog, sync_node: bool = False, **tool_node: Any
) -> Any:
    """A hand-built ReAct graph: model node ``agent``, ``ToolNode`` ``tools``. The model
    asks for usage when it streams (``stream_usage``). ``sync_node``: the model node has no
    async form (an async run calls it in a worker thread, under a sync callback manager)."""
    lookup = make_lookup(log)
    model = llm(server, stream_usage=True).bind_tools([lookup])

    class State(TypedDict):
        messages: Annotated[list[AnyMessage], add_messages]

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    async def aagent(state: State) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    from langchain_core.runnables import RunnableLambda

    builder = StateGraph(State)
    builder.add_node("agent", agent if sync_node else RunnableLambda(agent, afunc=aagent))
    builder.add_node("tools", ToolNode([lookup], **tool_node))
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", tools_condition)
    builder.add_edge("tools", "agent")
    return builder.compile(name="weather")


def run_graph(graph: Any, mode: str, inputs: Any = QUESTION, **kwargs: Any) -> Any:
    if mode == "invoke":
        return graph.invoke(inputs, **kwargs)
    if mode == "ainvoke":
        return asyncio.run(graph.ainvoke(inputs, **kwargs))
    if mode == "stream":
        return list(graph.stream(inputs, **kwargs))
    if mode == "stream-messages":  # the model streams its tokens (stream_mode="messages")
        return list(graph.stream(inputs, stream_mode="messages", **kwargs))

    async def consume() -> list[Any]:
        return [chunk async for chunk in graph.astream(inputs, **kwargs)]

    return asyncio.run(consume())


def nanos_of(usd: float) -> int:
    return round(usd * NANOS)


# -- money: charged once, attributed per node --------------------------------------------------
@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "stream", "stream-messages", "astream"])
def test_react_graph_is_charged_what_the_provider_billed(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog,
    provider_instrumented: bool, mode: str,
) -> None:  # fmt: skip
    server.script(CALL_LOOKUP, Behaviour())
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    run_graph(agent, mode)
    report = agent.report()
    billed = server.stats()["billed_nanos"]
    assert billed > 0 and server.stats()["requests"] == 2
    assert nanos_of(report.total_usd) == billed  # once, whichever path metered the model
    assert report.calls == 2 and report.tool_calls == 1 and tool_log.calls == ["Paris"]
    # Per node: the model node's two turns, the tool node's call.
    assert set(report.by_agent) == {"agent", "tools"}
    assert nanos_of(report.by_agent["agent"].usd) == billed
    assert report.by_agent["agent"].calls == 2 and report.by_agent["tools"].calls == 1
    # The root span's breakdown says the same.
    (root,) = spans_named(exporter, "budget weather")
    agents = dict(zip(root.attributes[attrs.TRACE_AGENTS],
                      root.attributes[attrs.TRACE_AGENT_COSTS_USD], strict=True))  # fmt: skip
    assert nanos_of(agents["agent"]) == billed
    # invoke_agent spans: the graph, its node runs; execute_tool inside the tools node.
    (graph_span,) = spans_named(exporter, "invoke_agent weather")
    nodes = spans_named(exporter, "invoke_agent agent")
    assert len(nodes) == 2 and all(s.parent.span_id == graph_span.context.span_id for s in nodes)
    assert nodes[0].attributes[attrs.GEN_AI_AGENT_NAME] == "agent"
    assert nodes[0].attributes[attrs.GEN_AI_OPERATION_NAME] == "invoke_agent"
    assert nodes[0].attributes["otel_budget.langgraph.node"] == "agent"
    (tools_node,) = spans_named(exporter, "invoke_agent tools")
    (tool_span,) = spans_named(exporter, "execute_tool lookup")
    assert tool_span.parent.span_id == tools_node.context.span_id
    assert tool_span.attributes[attrs.GEN_AI_TOOL_NAME] == "lookup"
    assert tool_span.attributes[attrs.GEN_AI_TOOL_CALL_ID].startswith("call_")
    assert attrs.GEN_AI_TOOL_CALL_ARGUMENTS not in tool_span.attributes  # content is opt-in
    # Each model call: exactly one span carries its cost, under its node.
    costed = [s for s in exporter.get_finished_spans()
              if s.name == f"chat {MINI}" and attrs.COST_USD in s.attributes]  # fmt: skip
    assert len(costed) == 2
    assert sum(nanos_of(s.attributes[attrs.COST_USD]) for s in costed) == billed
    chats = spans_named(exporter, f"chat {MINI}")
    assert len(chats) == (4 if provider_instrumented else 2)  # ours, and the SDK call's inside


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_parallel_tool_calls_are_each_priced_under_their_node(
    server: FakeLLMServer, make_processor: Any, exporter: Any, tool_log: ToolLog, mode: str
) -> None:
    """One model turn asking for two tools: ``ToolNode`` runs them at once (threads, or
    tasks); each is reserved, priced and parented to the ``tools`` node."""
    make_processor(prices=PriceBook(tools={"lookup": 0.01}))
    server.script(Behaviour(tool_calls=[
        {"name": "lookup", "arguments": {"city": "Paris"}},
        {"name": "lookup", "arguments": {"city": "Oslo"}},
    ]), Behaviour())  # fmt: skip
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    run_graph(agent, mode)
    report = agent.report()
    assert sorted(tool_log.calls) == ["Oslo", "Paris"] and report.tool_calls == 2
    assert nanos_of(report.total_usd) == server.stats()["billed_nanos"] + 2 * nanos_of(0.01)
    assert nanos_of(report.by_agent["tools"].usd) == 2 * nanos_of(0.01)
    (node,) = spans_named(exporter, "invoke_agent tools")
    tools = spans_named(exporter, "execute_tool lookup")
    assert len(tools) == 2 and all(s.parent.span_id == node.context.span_id for s in tools)


def test_chat_model_alone_under_budget(
    server: FakeLLMServer, processor: Any, exporter: Any, provider_instrumented: bool
) -> None:
    """A bare ``ChatOpenAI`` call (no graph) with the handler: metered once."""
    with budget(max_usd=1.0) as run:
        llm(server).invoke("hello", config={"callbacks": [BudgetCallbackHandler()]})
    assert nanos_of(run.report().total_usd) == server.stats()["billed_nanos"] > 0


def test_a_stream_without_usage_is_charged_an_estimate_never_less(
    server: FakeLLMServer, processor: Any, exporter: Any
) -> None:
    """Streamed without ``stream_usage`` the provider reports no usage: the handler charges
    the projection's input and the output seen, flagged as estimated, never below the bill."""
    with budget(max_usd=1.0) as run:
        for _ in llm(server).stream("hello", config={"callbacks": [BudgetCallbackHandler()]}):
            pass
    assert nanos_of(run.report().total_usd) >= server.stats()["billed_nanos"] > 0
    (span,) = spans_named(exporter, f"chat {MINI}")
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert attrs.GEN_AI_USAGE_INPUT_TOKENS not in span.attributes  # nothing was reported


def test_charged_once_when_our_span_cannot_be_taken_over(
    server: FakeLLMServer, processor: Any, tool_log: ToolLog, provider_instrumented: bool
) -> None:
    """The handler's spans dropped by a sampler (or no SDK provider at all): the provider
    call underneath cannot find our span to take it over, so ours is published as the call
    being sent and the provider wrapper passes through. Once, still."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    handler = BudgetCallbackHandler(tracer_provider=TracerProvider(sampler=ALWAYS_OFF))
    server.script(CALL_LOOKUP, Behaviour())
    with budget(max_usd=1.0) as run:
        react_graph(server, tool_log).invoke(QUESTION, config={"callbacks": [handler]})
    assert nanos_of(run.report().total_usd) == server.stats()["billed_nanos"] > 0
    assert run.report().calls == 2


# -- refusals ----------------------------------------------------------------------------------
def test_model_call_refused_before_it_is_sent(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog,
    provider_instrumented: bool,
) -> None:  # fmt: skip
    agent = protect_graph(react_graph(server, tool_log), max_usd=0.000001)
    with pytest.raises(BudgetExceededError) as caught:
        agent.invoke(QUESTION)
    assert caught.value.reason == "limit"
    assert server.stats()["requests"] == 0  # never sent
    assert agent.report().aborts == 1 and agent.report().total_usd == 0
    (refused,) = spans_named(exporter, f"chat {MINI}")
    assert refused.attributes[attrs.ERROR_TYPE] == "BudgetExceededError"
    (node,) = spans_named(exporter, "invoke_agent agent")
    assert node.status.status_code is StatusCode.ERROR


def test_tool_refused_before_it_runs(
    server: FakeLLMServer, make_processor: Any, exporter: Any, tool_log: ToolLog,
    provider_instrumented: bool,
) -> None:  # fmt: skip
    make_processor(prices=PriceBook(tools={"lookup": 0.5}))
    server.script(CALL_LOOKUP, Behaviour())
    agent = protect_graph(react_graph(server, tool_log), max_usd=0.25)
    with pytest.raises(BudgetExceededError) as caught:
        agent.invoke(QUESTION)
    assert caught.value.reason == "limit"
    assert tool_log.calls == []  # the tool never ran
    assert server.stats()["requests"] == 1
    report = agent.report()
    assert nanos_of(report.total_usd) == server.stats()["billed_nanos"]
    (refused,) = spans_named(exporter, "execute_tool lookup")
    assert refused.attributes[attrs.ERROR_TYPE] == "BudgetExceededError"


def test_tool_loop_is_stopped_by_loop_detection(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog,
    provider_instrumented: bool,
) -> None:  # fmt: skip
    server.default_behaviour = CALL_LOOKUP  # the model asks for the same call forever
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    with pytest.raises(BudgetExceededError) as caught:
        agent.invoke(QUESTION, config={"recursion_limit": 100})
    assert caught.value.reason == "loop_detected"
    assert tool_log.calls == ["Paris"] * 4  # the 5th identical call never ran
    report = agent.report()
    assert report.terminated_by == "loop_detected" and report.loops == 1
    assert server.stats()["requests"] == 5
    assert nanos_of(report.total_usd) == server.stats()["billed_nanos"]


@pytest.mark.parametrize("mode", ["invoke", "ainvoke"])
def test_a_refusal_the_tool_node_swallows_still_stops_the_graph(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog, mode: str
) -> None:
    """``ToolNode(handle_tool_errors=True)`` turns every exception into a ToolMessage: the
    refusal must stop the graph all the same, before another model turn is paid for."""
    server.default_behaviour = CALL_LOOKUP
    agent = protect_graph(react_graph(server, tool_log, handle_tool_errors=True), max_usd=1.0)
    with pytest.raises(BudgetExceededError) as caught:
        run_graph(agent, mode, config={"recursion_limit": 100})
    assert caught.value.reason == "loop_detected"
    assert tool_log.calls == ["Paris"] * 4
    assert server.stats()["requests"] == 5  # no model turn after the refusal


def test_the_agent_of_a_refused_run_refuses_again_until_the_run_ends(
    server: FakeLLMServer, processor: Any, tool_log: ToolLog
) -> None:
    """A refusal ends its run tree only: the next run of the same graph starts afresh."""
    agent = protect_graph(react_graph(server, tool_log), max_usd=0.000001)
    for _ in range(2):
        with pytest.raises(BudgetExceededError):
            agent.invoke(QUESTION)
    agent.max_usd = 1.0
    agent.invoke(QUESTION)
    assert server.stats()["requests"] == 1


# -- instrumentor ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["invoke", "ainvoke", "astream"])
def test_instrumentor_meters_every_run(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog,
    langchain_instrumented: LangChainInstrumentor, mode: str,
) -> None:  # fmt: skip
    server.script(CALL_LOOKUP, Behaviour())
    graph = react_graph(server, tool_log)
    with budget(max_usd=1.0) as run:
        run_graph(graph, mode)  # no callbacks passed: the instrumentor's handler is there
    report = run.report()
    assert nanos_of(report.total_usd) == server.stats()["billed_nanos"] > 0
    assert set(report.by_agent) == {"agent", "tools"} and report.tool_calls == 1
    assert len(spans_named(exporter, "execute_tool lookup")) == 1


def test_instrumentor_and_protect_graph_together_meter_once(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog,
    langchain_instrumented: LangChainInstrumentor, provider_instrumented: bool,
) -> None:  # fmt: skip
    server.script(CALL_LOOKUP, Behaviour())
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    agent.invoke(QUESTION)
    assert nanos_of(agent.report().total_usd) == server.stats()["billed_nanos"]
    assert len(spans_named(exporter, "execute_tool lookup")) == 1
    assert len(spans_named(exporter, "invoke_agent weather")) == 1


def test_async_refusal_stops_the_run(
    server: FakeLLMServer, make_processor: Any, tool_log: ToolLog,
    langchain_instrumented: LangChainInstrumentor,
) -> None:  # fmt: skip
    """Under the async twin (awaited inline), a refusal propagates as from the sync one."""
    make_processor(prices=PriceBook(tools={"lookup": 0.5}))
    server.script(CALL_LOOKUP, Behaviour())
    graph = react_graph(server, tool_log)

    async def go() -> None:
        async with budget(max_usd=0.25):
            await graph.ainvoke(QUESTION)

    with pytest.raises(BudgetExceededError):
        asyncio.run(go())
    assert tool_log.calls == []


def test_a_sync_step_inside_an_async_run_still_refuses(
    server: FakeLLMServer, processor: Any, tool_log: ToolLog,
    langchain_instrumented: LangChainInstrumentor,
) -> None:  # fmt: skip
    """An async run calls a sync-only node in a worker thread with a sync callback manager
    copied from the async one: it must carry the sync twin (a sync manager runs an async
    handler's events in a loop of its own and drops what they raise: the refusal too)."""
    graph = react_graph(server, tool_log, sync_node=True)

    async def go() -> None:
        async with budget(max_usd=0.000001):
            await graph.ainvoke(QUESTION)

    with pytest.raises(BudgetExceededError):
        asyncio.run(go())
    assert server.stats()["requests"] == 0


def test_uninstrument_removes_the_handler(
    server: FakeLLMServer, processor: Any, exporter: Any, tool_log: ToolLog
) -> None:
    instrumentor = LangChainInstrumentor()
    instrumentor.instrument()
    instrumentor.uninstrument()
    server.script(CALL_LOOKUP, Behaviour())
    with budget(max_usd=1.0) as run:
        react_graph(server, tool_log).invoke(QUESTION)
    assert run.report().total_usd == 0  # nothing metered (no provider instrumentor either)
    assert not spans_named(exporter, "execute_tool lookup")
    assert not spans_named(exporter, "invoke_agent weather")


# -- failures of ours and hostile use ----------------------------------------------------------
def _broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug of ours")


def test_a_failure_of_ours_is_logged_and_the_run_goes_on(
    server: FakeLLMServer, processor: Any, tool_log: ToolLog, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    monkeypatch.setattr(handler_module, "chat_request", _broken)
    server.script(CALL_LOOKUP, Behaviour())
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    agent.invoke(QUESTION)  # no exception of ours reaches the app
    assert tool_log.calls == ["Paris"]
    assert "a bug of ours" in caplog.text


def test_fail_closed_refuses_what_we_could_not_meter(
    server: FakeLLMServer, make_processor: Any, tool_log: ToolLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    make_processor(prices=PriceBook(), failure_policy="fail_closed")
    monkeypatch.setattr(handler_module, "chat_request", _broken)
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    with pytest.raises(BudgetExceededError) as caught:
        agent.invoke(QUESTION)
    assert caught.value.reason == "internal_error"
    assert server.stats()["requests"] == 0


def test_protect_graph_offers_no_unbudgeted_way_to_run(
    server: FakeLLMServer, tool_log: ToolLog
) -> None:
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    for name in ("batch", "abatch", "astream_events", "with_config"):
        with pytest.raises(AttributeError, match="outside its budget"):
            getattr(agent, name)
    assert agent.get_graph() is not None  # the graph's own API is there
    with pytest.raises(ValueError):
        protect_graph(react_graph(server, tool_log), max_usd="lots")


def test_callbacks_given_as_a_manager_keep_theirs(
    server: FakeLLMServer, processor: Any, tool_log: ToolLog
) -> None:
    from langchain_core.callbacks import BaseCallbackHandler, CallbackManager

    seen: list[str] = []

    class Mine(BaseCallbackHandler):
        def on_tool_start(self, *args: Any, **kwargs: Any) -> None:
            seen.append("tool")

    server.script(CALL_LOOKUP, Behaviour())
    agent = protect_graph(react_graph(server, tool_log), max_usd=1.0)
    mine = Mine()
    manager = CallbackManager(handlers=[mine], inheritable_handlers=[mine])
    agent.invoke(QUESTION, config={"callbacks": manager})
    assert seen == ["tool"]
    assert nanos_of(agent.report().total_usd) == server.stats()["billed_nanos"]
