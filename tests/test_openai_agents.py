"""The OpenAI Agents SDK integration: the real ``agents`` package, the real ``openai`` SDK,
``FakeLLMServer`` on 127.0.0.1 scripting the model's tool calls.

Every test checks the money three ways: the exception (or result) the app sees, the ledger,
and what the fake provider billed (``server.stats()["billed_nanos"]``): charged once, whether
or not our openai instrumentor meters the same requests underneath.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # the SDK's exporter: never
agents = pytest.importorskip(
    "agents", reason="openai-agents is not installed (pip install '.[openai-agents]')"
)
from agents import (  # noqa: E402
    Agent,
    GuardrailFunctionOutput,
    InputGuardrail,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
)
from openai import AsyncOpenAI, OpenAI  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402
from wrapt import FunctionWrapper  # noqa: E402

from otel_budget import BudgetExceededError, PriceBook, budget  # noqa: E402
from otel_budget import attributes as attrs  # noqa: E402
from otel_budget.instrumentation import instrumented_libraries  # noqa: E402
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor  # noqa: E402
from otel_budget.instrumentation.openai_agents import (  # noqa: E402
    _TARGETS,
    OpenAIAgentsInstrumentor,
)
from otel_budget.testing import Behaviour, FakeLLMServer  # noqa: E402
from tests.helpers import spans_named  # noqa: E402

MINI = "gpt-4o-mini"
# genai-prices' prices (cache reads included), so the ledger can equal the bill to the nano.
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075), "gpt-4o": (2.5, 10.0, 1.25)}
APIS = ("responses", "chat")


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture
def processor(make_processor: Any) -> Any:
    return make_processor(None, prices=PriceBook(tools={"paid_search": 0.5}))


@pytest.fixture
def instrument(processor: Any) -> Iterator[Any]:
    """``instrument(openai=..., **kwargs)``: the Agents SDK instrumentor, and (``openai=True``)
    our openai instrumentor underneath; both removed after the test."""
    agents_instrumentor = OpenAIAgentsInstrumentor()
    openai_instrumentor = OpenAIBudgetInstrumentor()

    def make(openai: bool = False, **kwargs: Any) -> OpenAIAgentsInstrumentor:
        agents_instrumentor.uninstrument()
        agents_instrumentor.instrument(**kwargs)
        if openai:
            openai_instrumentor.instrument(tracer_provider=kwargs.get("tracer_provider"))
        return agents_instrumentor

    yield make
    agents_instrumentor.uninstrument()
    openai_instrumentor.uninstrument()


def model_of(server: FakeLLMServer, api: str, name: str = MINI) -> Any:
    client = AsyncOpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
    if api == "responses":
        return OpenAIResponsesModel(model=name, openai_client=client)
    return OpenAIChatCompletionsModel(model=name, openai_client=client)


class Counter:
    def __init__(self) -> None:
        self.calls: list[str] = []


def lookup_tool(counter: Counter) -> Any:
    @function_tool
    def lookup(city: str) -> str:
        """Look up the weather of a city."""
        counter.calls.append(city)
        return f"sunny in {city}"

    return lookup


def calls_lookup(city: str = "Paris") -> Behaviour:
    return Behaviour(tool_calls=[{"name": "lookup", "arguments": {"city": city}}])


def billed(server: FakeLLMServer) -> int:
    return int(server.stats()["billed_nanos"])


def report_nanos(run: budget) -> int:
    return round(run.report().total_usd * 1e9)


async def drain(result: Any) -> None:
    async for _ in result.stream_events():
        pass


def run_mode(mode: str, agent: Any, prompt: str, **kwargs: Any) -> Any:
    """Run ``agent`` the way ``mode`` says: sync, async or streamed."""
    if mode == "sync":
        return Runner.run_sync(agent, prompt, **kwargs)
    if mode == "async":
        return asyncio.run(Runner.run(agent, prompt, **kwargs))

    async def streamed() -> Any:
        result = Runner.run_streamed(agent, prompt, **kwargs)
        await drain(result)
        return result

    return asyncio.run(streamed())


# -- the loops users report ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async", "streamed"])
@pytest.mark.parametrize("api", APIS)
def test_same_tool_same_arguments_is_stopped_by_loop_detection(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any, api: str, mode: str
) -> None:
    instrument(max_usd_per_run=5)
    counter = Counter()
    agent = Agent(name="weather", tools=[lookup_tool(counter)], model=model_of(server, api))
    server.default_behaviour = calls_lookup()  # forever the same call
    with pytest.raises(BudgetExceededError) as caught, budget(max_usd=1) as run:
        run_mode(mode, agent, "weather?", max_turns=60)
    assert caught.value.reason == "loop_detected"
    assert counter.calls == ["Paris"] * 4  # the 5th identical call never ran
    assert server.stats()["requests"] == 5
    report = run.report()
    assert report.terminated_by == "loop_detected"
    assert report_nanos(run) == billed(server)  # charged exactly what the provider billed
    tools = spans_named(exporter, "execute_tool lookup")
    assert len(tools) == 5
    ids = {s.attributes[attrs.GEN_AI_TOOL_CALL_ID] for s in tools}  # the model's call ids
    assert len(ids) == 5 and all(i.startswith("call_fake") for i in ids), ids
    refused = [s for s in tools if s.status.status_code is StatusCode.ERROR]
    assert len(refused) == 1 and refused[0].attributes[attrs.ERROR_TYPE] == "BudgetExceededError"
    assert len(spans_named(exporter, "invoke_agent weather")) == 5


@pytest.mark.parametrize("api", APIS)
def test_different_arguments_run_until_the_budget_stops_them(
    server: FakeLLMServer, processor: Any, instrument: Any, api: str
) -> None:
    instrument(max_usd_per_run="0.004")
    counter = Counter()
    agent = Agent(name="explorer", tools=[lookup_tool(counter)], model=model_of(server, api, "gpt-4o"))
    server.script(*(calls_lookup(f"city-{i}") for i in range(60)))
    with pytest.raises(BudgetExceededError) as caught, budget(max_usd=1) as outer:
        asyncio.run(Runner.run(agent, "explore", max_turns=60))
    assert caught.value.reason == "limit"
    assert 2 < server.stats()["requests"] < 60  # stopped by money, long before max_turns
    assert report_nanos(outer) == billed(server) <= 4_000_000  # never above the per-run cap
    assert len(counter.calls) == server.stats()["requests"]


def test_max_turns_still_applies_inside_the_budget(
    server: FakeLLMServer, processor: Any, instrument: Any
) -> None:
    instrument(max_usd_per_run=1)
    agent = Agent(name="explorer", tools=[lookup_tool(Counter())], model=model_of(server, "chat"))
    server.script(*(calls_lookup(f"city-{i}") for i in range(10)))
    with pytest.raises(agents.MaxTurnsExceeded), budget(max_usd=1) as run:
        Runner.run_sync(agent, "explore", max_turns=3)
    assert server.stats()["requests"] == 3
    assert report_nanos(run) == billed(server)


# -- charged once, with or without our openai instrumentor ---------------------------------
@pytest.mark.parametrize("mode", ["sync", "streamed"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("with_openai", [False, True], ids=["agents-only", "with-openai"])
def test_a_run_is_charged_once(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any, api: str, mode: str,
    with_openai: bool,
) -> None:  # fmt: skip
    instrument(openai=with_openai)
    counter = Counter()
    agent = Agent(name="weather", tools=[lookup_tool(counter)], model=model_of(server, api))
    server.script(calls_lookup("Paris"), calls_lookup("Rome"), Behaviour(text="Sunny."))
    with budget(max_usd=1) as run:
        result = run_mode(mode, agent, "weather?")
    assert result.final_output.startswith("Sunny")
    assert counter.calls == ["Paris", "Rome"]
    assert server.stats()["requests"] == 3
    assert report_nanos(run) == billed(server) > 0
    chats = spans_named(exporter, f"chat {MINI}")
    costed = [s for s in chats if attrs.COST_USD in s.attributes]
    assert len(costed) == 3  # one span per request carries its cost
    assert len(chats) == (6 if with_openai else 3)  # ours (taken over) + the openai call's
    assert round(sum(s.attributes[attrs.COST_USD] for s in costed) * 1e9) == billed(server)
    assert run.report().by_agent["weather"].usd == pytest.approx(billed(server) / 1e9)


@pytest.mark.parametrize("with_openai", [False, True], ids=["agents-only", "with-openai"])
def test_unsampled_spans_still_charge_once(
    server: FakeLLMServer, processor: Any, instrument: Any, with_openai: bool
) -> None:
    """No recording span to take over: the outer call is the openai wrappers' CURRENT_CALL,
    which they leave to it (as they do for litellm)."""
    instrument(openai=with_openai, tracer_provider=TracerProvider(sampler=ALWAYS_OFF))
    agent = Agent(name="weather", tools=[lookup_tool(Counter())], model=model_of(server, "responses"))
    server.script(calls_lookup(), Behaviour(text="Sunny."))
    with budget(max_usd=1) as run:
        Runner.run_sync(agent, "weather?")
    assert server.stats()["requests"] == 2
    assert report_nanos(run) == billed(server) > 0


def test_the_granted_output_cap_is_sent(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any
) -> None:
    instrument()
    agent = Agent(name="capped", model=model_of(server, "responses"),
                  model_settings=ModelSettings(max_tokens=100_000))  # fmt: skip
    with budget(max_usd="0.0002"):
        Runner.run_sync(agent, "hi")
    sent = server.last_call.body["max_output_tokens"]
    assert 16 <= sent < 1000  # lowered to what the budget affords, in the request itself
    span = spans_named(exporter, f"chat {MINI}")[0]
    assert span.attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] == sent


# -- agents, handoffs, nested runs ---------------------------------------------------------
@pytest.mark.parametrize("api", APIS)
def test_handoffs_are_attributed_per_agent(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any, api: str
) -> None:
    instrument()
    billing = Agent(name="billing", handoff_description="Answers billing questions.",
                    model=model_of(server, api))  # fmt: skip
    triage = Agent(name="triage", handoffs=[billing], model=model_of(server, api, "gpt-4o"))
    server.script(Behaviour(tool_calls=[{"name": "transfer_to_billing", "arguments": {}}]),
                  Behaviour(text="Your invoice is paid."))  # fmt: skip
    with budget(max_usd=1) as run:
        result = Runner.run_sync(triage, "my invoice?")
    assert result.last_agent is billing
    by_agent = run.report().by_agent
    assert set(by_agent) == {"triage", "billing"}
    calls = server.calls()
    assert calls[0].model == "gpt-4o" and calls[1].model == MINI
    assert round(by_agent["triage"].usd * 1e9) == calls[0].billed_nanos
    assert round(by_agent["billing"].usd * 1e9) == calls[1].billed_nanos
    spans = spans_named(exporter, "invoke_agent billing")
    assert spans and spans[0].attributes[attrs.GEN_AI_AGENT_NAME] == "billing"


def test_agent_as_tool_shares_the_run_budget(
    server: FakeLLMServer, processor: Any, instrument: Any
) -> None:
    instrument(max_usd_per_run=1)
    researcher = Agent(name="researcher", model=model_of(server, "responses"))
    lead = Agent(name="lead", model=model_of(server, "responses"),
                 tools=[researcher.as_tool(tool_name="research", tool_description="Research.")])  # fmt: skip
    server.script(Behaviour(tool_calls=[{"name": "research", "arguments": {"input": "x"}}]),
                  Behaviour(text="found"), Behaviour(text="done"))  # fmt: skip
    with budget(max_usd=1) as run:
        Runner.run_sync(lead, "go")
    by_agent = run.report().by_agent
    assert set(by_agent) == {"lead", "researcher"}
    assert report_nanos(run) == billed(server)


# -- refusals surface as BudgetExceededError, never as a tool error for the model ----------
def test_a_paid_tool_that_does_not_fit_is_refused_before_it_runs(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any
) -> None:
    instrument()
    ran: list[str] = []

    @function_tool
    def paid_search(query: str) -> str:
        """Search the paid index."""
        ran.append(query)
        return "results"

    agent = Agent(name="searcher", tools=[paid_search], model=model_of(server, "responses"))
    server.script(Behaviour(tool_calls=[{"name": "paid_search", "arguments": {"query": "q"}}]))
    with pytest.raises(BudgetExceededError) as caught, budget(max_usd="0.10"):
        Runner.run_sync(agent, "search")  # the price book: $0.50 a search
    assert caught.value.reason == "limit"
    assert ran == []
    assert server.stats()["requests"] == 1  # the model was not told, nor called again
    span = spans_named(exporter, "execute_tool paid_search")[0]
    assert span.status.status_code is StatusCode.ERROR


def test_a_refusal_inside_a_tool_is_not_handed_to_the_model(
    server: FakeLLMServer, processor: Any, instrument: Any
) -> None:
    """The SDK's default failure handler turns a tool's exception into a message for the
    model; a refusal of an LLM call the tool makes stops the run instead."""
    instrument(openai=True)
    sync_client = OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)

    @function_tool
    def summarise(text: str) -> str:
        """Summarise with a big model."""
        reply = sync_client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": text * 2000}], max_tokens=4000
        )
        return reply.choices[0].message.content or ""

    agent = Agent(name="writer", tools=[summarise], model=model_of(server, "responses"))
    server.default_behaviour = Behaviour(
        tool_calls=[{"name": "summarise", "arguments": {"text": "long text "}}]
    )
    with pytest.raises(BudgetExceededError) as caught, budget(max_usd="0.01"):
        Runner.run_sync(agent, "summarise", max_turns=20)
    assert caught.value.reason == "limit"
    assert server.stats()["by_model"].get("gpt-4o") is None  # never sent
    assert server.stats()["requests"] == 1  # and the agent's model was not called again


def test_a_refusal_in_a_guardrail_stops_the_run(
    server: FakeLLMServer, processor: Any, instrument: Any
) -> None:
    """A guardrail's own agent (a nested run) refused: the refusal reaches the caller, and
    the guarded agent's model is never called."""
    instrument(openai=True)
    cheap = Agent(name="guard", model=model_of(server, "responses"))
    costly = Agent(name="guard", model=model_of(server, "responses", "gpt-4o"),
                   model_settings=ModelSettings(max_tokens=50_000))  # fmt: skip

    async def check(ctx: Any, agent: Any, text: Any) -> GuardrailFunctionOutput:
        await Runner.run(cheap, "is this fine?")
        await Runner.run(costly, "x" * 40_000)
        return GuardrailFunctionOutput(output_info=None, tripwire_triggered=False)

    agent = Agent(name="main", model=model_of(server, "responses"),
                  input_guardrails=[InputGuardrail(guardrail_function=check,
                                                   run_in_parallel=False)])  # fmt: skip
    with pytest.raises(BudgetExceededError) as caught, budget(max_usd="0.0005") as run:
        Runner.run_sync(agent, "hello")
    assert caught.value.reason == "limit"
    assert server.stats()["requests"] == 1  # the cheap guard call only
    assert report_nanos(run) == billed(server) > 0
    assert set(run.report().by_agent) == {"guard"}


def test_a_failing_tool_is_charged_nothing(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any
) -> None:
    instrument()

    @function_tool
    def paid_search(query: str) -> str:
        """Search the paid index."""
        raise ValueError("index down")

    agent = Agent(name="searcher", tools=[paid_search], model=model_of(server, "responses"))
    server.script(Behaviour(tool_calls=[{"name": "paid_search", "arguments": {"query": "q"}}]),
                  Behaviour(text="Sorry."))  # fmt: skip
    with budget(max_usd=1) as run:
        result = Runner.run_sync(agent, "search")
    assert result.final_output.startswith("Sorry")  # the SDK told the model, as it does
    span = spans_named(exporter, "execute_tool paid_search")[0]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.COST_USD] == 0
    assert "paid_search" not in run.report().by_tool or run.report().by_tool["paid_search"].usd == 0
    assert report_nanos(run) == billed(server)


def test_a_run_outside_any_span_is_one_trace(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any
) -> None:
    instrument()
    agent = Agent(name="weather", tools=[lookup_tool(Counter())], model=model_of(server, "chat"))
    server.script(calls_lookup(), Behaviour(text="Sunny."))
    Runner.run_sync(agent, "weather?")
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    root = [s for s in spans if s.parent is None]
    assert [s.name for s in root] == ["Agent workflow"]
    assert root[0].attributes[attrs.TRACE_SPENT_USD] == pytest.approx(billed(server) / 1e9)


# -- no network, uninstrument ----------------------------------------------------------------
def test_nothing_dials_out_beyond_localhost(
    server: FakeLLMServer, processor: Any, instrument: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    instrument(openai=True, max_usd_per_run=1)
    dialled: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> Any:
        dialled.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    agent = Agent(name="weather", tools=[lookup_tool(Counter())], model=model_of(server, "responses"))
    server.script(calls_lookup(), Behaviour(text="Sunny."))
    Runner.run_sync(agent, "weather?")
    agents.flush_traces() if hasattr(agents, "flush_traces") else None
    assert dialled and all(addr[0] == "127.0.0.1" for addr in dialled), dialled


def wrapped_targets() -> list[bool]:
    """For each hook point: is it wrapped in place?"""
    import importlib

    out = []
    for module, path, name, _ in _TARGETS:
        owner: Any = importlib.import_module(module)
        for parent in path.split(".") if path else ():
            owner = getattr(owner, parent)
        out.append(isinstance(vars(owner)[name], FunctionWrapper))
    return out


def test_uninstrument_restores_the_sdk(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any
) -> None:
    instrumentor = instrument()
    assert all(wrapped_targets())  # every hook point exists in this SDK version
    assert "openai_agents" in instrumented_libraries()  # budget() does not warn "unobserved"
    instrumentor.uninstrument()
    assert not any(wrapped_targets())
    assert "openai_agents" not in instrumented_libraries()
    agent = Agent(name="weather", tools=[lookup_tool(Counter())], model=model_of(server, "chat"))
    server.script(calls_lookup(), Behaviour(text="Sunny."))
    Runner.run_sync(agent, "weather?")
    assert not spans_named(exporter, "execute_tool lookup")
    assert not spans_named(exporter, "invoke_agent weather")
    assert not spans_named(exporter, f"chat {MINI}")


# -- configuration and other models ------------------------------------------------------------
@pytest.mark.parametrize("bad", ["lots", float("nan"), -1, True])
def test_an_invalid_per_run_budget_is_refused_at_instrument(processor: Any, bad: Any) -> None:
    instrumentor = OpenAIAgentsInstrumentor()
    with pytest.raises(ValueError, match="max_usd_per_run"):
        instrumentor.instrument(max_usd_per_run=bad)
    assert not instrumentor.is_instrumented_by_opentelemetry
    assert not any(wrapped_targets())


class DirectModel(agents.Model):
    """A user's own ``Model``: calls the Responses API itself."""

    def __init__(self, client: AsyncOpenAI) -> None:
        self.client = client

    async def get_response(self, system_instructions: Any, input: Any, *args: Any,
                           **kwargs: Any) -> Any:  # fmt: skip
        response = await self.client.responses.create(model=MINI, input=input)
        usage = agents.Usage(requests=1, input_tokens=response.usage.input_tokens,
                             output_tokens=response.usage.output_tokens,
                             total_tokens=response.usage.total_tokens)  # fmt: skip
        return agents.ModelResponse(output=response.output, usage=usage,
                                    response_id=response.id)  # fmt: skip

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@pytest.mark.parametrize("with_openai", [False, True], ids=["agents-only", "with-openai"])
def test_another_model_class_is_named_in_a_warning(
    server: FakeLLMServer, processor: Any, instrument: Any, caplog: pytest.LogCaptureFixture,
    with_openai: bool,
) -> None:  # fmt: skip
    instrument(openai=with_openai)
    client = AsyncOpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
    agent = Agent(name="custom", model=DirectModel(client))
    # Read from the library logger itself: earlier tests of the suite stop its propagation
    # (the demo) or disable it (a logging configuration), neither of which is this test's.
    library_log = logging.getLogger("otel_budget")
    disabled, level = library_log.disabled, library_log.level
    library_log.disabled = False
    library_log.setLevel(logging.WARNING)
    library_log.addHandler(caplog.handler)
    try:
        with budget(max_usd=1) as run:
            Runner.run_sync(agent, "hi")
    finally:
        library_log.removeHandler(caplog.handler)
        library_log.disabled, library_log.level = disabled, level
    assert "uses a DirectModel, whose calls the Agents SDK integration does not meter" in caplog.text
    # Through our openai instrumentor it is budgeted all the same; without it, it is not.
    assert report_nanos(run) == (billed(server) if with_openai else 0)
    assert billed(server) > 0


def test_a_cancelled_streamed_run_closes_its_budget(
    server: FakeLLMServer, processor: Any, instrument: Any, exporter: Any
) -> None:
    instrument(max_usd_per_run=1)
    counter = Counter()
    agent = Agent(name="weather", tools=[lookup_tool(counter)], model=model_of(server, "chat"))
    server.script(*(calls_lookup(f"city-{i}") for i in range(60)))

    async def main() -> None:
        result = Runner.run_streamed(agent, "weather?", max_turns=60)
        async for _ in result.stream_events():
            if len(counter.calls) >= 2:
                result.cancel()
        for _ in range(50):  # the run's task ends; its done callback closes the budget
            if result.run_loop_task.done():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)

    asyncio.run(main())
    server.wait_idle()
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [s.name for s in roots] == ["Agent workflow"]  # ended, with the breakdown
    spent_usd = roots[0].attributes[attrs.TRACE_SPENT_USD]
    assert round(spent_usd * 1e9) >= billed(server) > 0  # a cut stream: at least its bill
    assert not [s for s in exporter.get_finished_spans() if s.end_time is None]
