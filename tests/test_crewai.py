"""CrewAI under a budget: the real ``crewai`` driving the real ``openai`` SDK against FakeLLMServer.

CrewAI needs openai<3 and the main test venv has openai 3, so ``tests/run.sh`` builds a venv
for this file (``tests/crewai-requirements.txt``) and the main suite runs it there
(``test_crewai_suite_in_its_own_venv``); in a venv with crewai the tests run directly:

    PYTHONPATH=src $OTEL_BUDGET_TEST_CREWAI_PYTHON -m pytest -q tests/test_crewai.py

Every crew is checked against the fake server's bill: the ledger equals what the "provider"
billed (plus the tools' prices), with and without otel-budget's openai instrumentor
underneath, so a model call is charged exactly once either way.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from otel_budget import BudgetExceededError, PriceBook, budget
from otel_budget.money import usd_to_nanos
from otel_budget.testing import Behaviour, FakeLLMServer

ROOT = Path(__file__).resolve().parent.parent
HAVE_CREWAI = importlib.util.find_spec("crewai") is not None
needs_crewai = pytest.mark.skipif(
    not HAVE_CREWAI,
    reason="crewai is not installed in this venv (it needs openai<3); "
    "test_crewai_suite_in_its_own_venv runs this file in the CrewAI venv",
)
#: How many tests of this file must pass in the CrewAI venv (never silently fewer).
EXPECTED_PASSED = 20
TOOL_PRICE = 0.001
LOOKUP = {"name": "lookup", "arguments": {"query": "otel"}}


# -- the main suite's view: this file run in the CrewAI venv ----------------------------------
def _crewai_venv_run() -> tuple[int | None, str]:
    """This file's result in the CrewAI venv: the run ``tests/run.sh`` started beside the main
    suite (``OTEL_BUDGET_TEST_CREWAI_RESULT``), else one started now in the venv it built
    (``OTEL_BUDGET_TEST_CREWAI_PYTHON``). ``None``: there is no such venv."""
    result = os.environ.get("OTEL_BUDGET_TEST_CREWAI_RESULT")
    if result:
        rc_file, log_file = Path(result) / "rc", Path(result) / "log"
        deadline = time.monotonic() + 900
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(0.1)  # (the rc is written after the log: let it land)
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        if not rc_file.exists():
            return -1, log + "\n(timed out waiting for the CrewAI venv's run)"
        rc = rc_file.read_text().strip()
        return (None, log) if rc == "unbuilt" else (int(rc or -1), log)
    python = os.environ.get("OTEL_BUDGET_TEST_CREWAI_PYTHON")
    if not python or not Path(python).exists():
        return None, "OTEL_BUDGET_TEST_CREWAI_PYTHON is not set: run through tests/run.sh"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    done = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::DeprecationWarning", __file__],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


@pytest.mark.skipif(HAVE_CREWAI, reason="crewai is importable here: the tests below run directly")
def test_crewai_suite_in_its_own_venv() -> None:
    returncode, output = _crewai_venv_run()
    if returncode is None:
        message = f"no CrewAI test venv: {output[-2000:]}"
        if os.environ.get("OTEL_BUDGET_TEST_CREWAI") == "1":  # asked for, and not built
            pytest.fail(message)
        pytest.skip(message + " (OTEL_BUDGET_TEST_CREWAI=1 bash tests/run.sh builds it)")
    assert returncode == 0, output[-6000:]
    passed = re.search(r"(\d+) passed", output)
    assert passed is not None and int(passed.group(1)) >= EXPECTED_PASSED, output[-3000:]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh_server(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        fake: FakeLLMServer = request.getfixturevalue("server")
        fake.clear_script()
        fake.default_behaviour = None
        fake.reset_stats()


@pytest.fixture(scope="module")
def instrumented() -> Iterator[Any]:
    from otel_budget.instrumentation.crewai import CrewAIInstrumentor

    instrumentor = CrewAIInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.fixture(params=["crewai-only", "with-openai-instrumentor"])
def layers(request: pytest.FixtureRequest, instrumented: Any) -> Iterator[str]:
    """Model calls metered by the CrewAI integration alone, or by otel-budget's openai
    instrumentor underneath it (which then takes each call over)."""
    if request.param == "crewai-only":
        yield request.param
        return
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    openai_instrumentor = OpenAIBudgetInstrumentor()
    openai_instrumentor.instrument()
    try:
        yield request.param
    finally:
        openai_instrumentor.uninstrument()


@pytest.fixture
def processor(make_processor: Any) -> Any:
    return make_processor(prices=PriceBook(tools={"lookup": TOOL_PRICE}))


def make_crew(server: FakeLLMServer, *, model: str = "gpt-4o-mini", name: str = "research crew",
              writer: bool = True, stream: bool = False) -> tuple[Any, list[str]]:  # fmt: skip
    """A researcher with a ``lookup`` tool, then a writer; returns (crew, the tool's runs)."""
    from crewai import LLM, Agent, Crew, Task
    from crewai.tools import tool

    llm = LLM(model=model, base_url=server.openai_base_url, api_key="x", stream=stream)
    ran: list[str] = []

    @tool("lookup")
    def lookup(query: str) -> str:
        """Look a topic up."""
        ran.append(query)
        return f"three facts about {query}"

    researcher = Agent(role="Researcher", goal="Find facts", backstory="Careful.", llm=llm,
                       tools=[lookup])  # fmt: skip
    agents, tasks = [researcher], [
        Task(name="research", description="Research otel.", expected_output="Facts.",
             agent=researcher),
    ]  # fmt: skip
    if writer:
        author = Agent(role="Writer", goal="Write", backstory="Clear.", llm=llm)
        agents.append(author)
        tasks.append(Task(name="write", description="Write it up.", expected_output="A note.",
                          agent=author))  # fmt: skip
    return Crew(agents=agents, tasks=tasks, name=name), ran


def llm_nanos(report: Any) -> int:
    return sum(usd_to_nanos(item.usd) for item in report.by_model.values())


def billed(server: FakeLLMServer) -> int:
    return int(server.stats()["billed_nanos"])


def spans_named(exporter: Any, prefix: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


# -- a crew, charged once ------------------------------------------------------------------------
@needs_crewai
def test_crew_of_two_agents_charged_once(
    server: FakeLLMServer, processor: Any, exporter: Any, layers: str
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    crew, ran = make_crew(server)
    assert protect_crew(crew, max_usd=1.0) is crew
    server.script(Behaviour(tool_calls=[LOOKUP]))  # the researcher looks up once, then answers
    crew.kickoff()

    report = last_report(crew)
    assert report is not None and ran == ["otel"]
    assert server.stats()["requests"] == 3
    assert llm_nanos(report) == billed(server)  # the bill, once, in both configurations
    assert report.by_tool["lookup"].calls == 1
    assert report.total_usd == pytest.approx(billed(server) / 1e9 + TOOL_PRICE, abs=1e-9)
    assert set(report.by_agent) == {"Researcher", "Writer"}
    assert report.by_agent["Researcher"].calls == 3  # two model calls and the tool
    assert report.by_agent["Writer"].calls == 1
    assert report.by_agent["Researcher"].usd + report.by_agent["Writer"].usd == pytest.approx(
        report.total_usd, abs=1e-9
    )

    agents = {s.attributes["gen_ai.agent.name"]: s for s in spans_named(exporter, "invoke_agent ")}
    assert set(agents) == {"research crew", "Researcher", "Writer"}
    assert agents["Researcher"].attributes["otel_budget.task.name"] == "research"
    assert agents["Writer"].attributes["otel_budget.task.name"] == "write"
    assert "otel_budget.task.description" not in agents["Writer"].attributes  # content: opt-in
    crew_span = agents["research crew"]
    assert agents["Researcher"].parent.span_id == crew_span.context.span_id
    (tool_span,) = spans_named(exporter, "execute_tool lookup")
    assert tool_span.attributes["gen_ai.tool.name"] == "lookup"
    assert tool_span.attributes["otel_budget.agent.name"] == "Researcher"
    assert tool_span.parent.span_id == agents["Researcher"].context.span_id
    charged = [s for s in spans_named(exporter, "chat ") if "otel_budget.cost.usd" in s.attributes]
    assert len(charged) == 3  # one charged span per request, whoever metered it
    assert {s.attributes["otel_budget.agent.name"] for s in charged} == {"Researcher", "Writer"}
    (root,) = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert root.name == "kickoff research crew"
    assert set(root.attributes["otel_budget.trace.agents"]) == {"Researcher", "Writer"}


@needs_crewai
def test_streamed_model_calls_charged_once(
    server: FakeLLMServer, processor: Any, layers: str
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    crew, ran = make_crew(server, stream=True)
    protect_crew(crew, max_usd=1.0)
    server.script(Behaviour(tool_calls=[LOOKUP]))
    crew.kickoff()
    report = last_report(crew)
    assert report is not None and ran == ["otel"]
    assert all(call.stream for call in server.calls())
    assert report.calls == 3 and llm_nanos(report) == billed(server)


@needs_crewai
@pytest.mark.parametrize("method", ["kickoff_async", "akickoff"])
def test_async_kickoff_runs_inside_one_budget(
    server: FakeLLMServer, processor: Any, exporter: Any, layers: str, method: str
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    crew, ran = make_crew(server)
    protect_crew(crew, max_usd=1.0)
    server.script(Behaviour(tool_calls=[LOOKUP]))
    asyncio.run(getattr(crew, method)())

    report = last_report(crew)
    assert report is not None and ran == ["otel"]
    assert llm_nanos(report) == billed(server)
    assert set(report.by_agent) == {"Researcher", "Writer"}
    assert report.by_tool["lookup"].calls == 1
    roots = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert [s.name for s in roots] == ["kickoff research crew"]  # one run, one trace


# -- stopped -------------------------------------------------------------------------------------
@needs_crewai
def test_tool_loop_stopped_by_loop_detection(
    server: FakeLLMServer, processor: Any, exporter: Any, instrumented: Any
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    crew, ran = make_crew(server, writer=False)
    protect_crew(crew, max_usd=5.0)
    server.default_behaviour = Behaviour(tool_calls=[LOOKUP])  # the model never stops asking

    with pytest.raises(BudgetExceededError) as caught:
        crew.kickoff()

    assert caught.value.reason == "loop_detected"
    assert len(ran) == 4  # the fifth identical call is refused before the tool runs
    # Stopped, not retried: no model call after the refusal (CrewAI would hand the model
    # "Error executing tool" and carry on, then retry the task twice).
    assert server.stats()["requests"] == 5
    report = last_report(crew)
    assert report is not None and report.terminated_by == "loop_detected"
    assert report.by_tool["lookup"].calls == 4
    assert llm_nanos(report) == billed(server)
    refused = [s for s in spans_named(exporter, "execute_tool") if s.status.status_code is StatusCode.ERROR]
    assert len(refused) == 1
    assert refused[0].attributes["otel_budget.budget.reason"] == "loop_detected"


@needs_crewai
def test_tool_refused_by_the_budget_before_it_runs(
    server: FakeLLMServer, make_processor: Any, exporter: Any, instrumented: Any
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    make_processor(prices=PriceBook(tools={"lookup": 0.50}))
    crew, ran = make_crew(server)
    protect_crew(crew, max_usd=0.10)
    server.default_behaviour = Behaviour(tool_calls=[LOOKUP])

    with pytest.raises(BudgetExceededError) as caught:
        crew.kickoff()

    assert caught.value.reason == "limit"
    assert ran == []
    assert server.stats()["requests"] == 1  # the refusal was not fed back to the model
    report = last_report(crew)
    assert report is not None and "lookup" not in report.by_tool
    assert llm_nanos(report) == billed(server)
    assert [s.name for s in spans_named(exporter, "invoke_agent Writer")] == []  # never started


@needs_crewai
def test_budget_stops_the_crew_before_the_call_that_would_overshoot(
    server: FakeLLMServer, processor: Any, layers: str
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    # gpt-4o: one reply costs ~$0.0006 here; the budget holds one call, not two.
    crew, _ = make_crew(server, model="gpt-4o")
    protect_crew(crew, max_usd=0.0010)
    server.default_behaviour = Behaviour(tool_calls=[LOOKUP])

    with pytest.raises(BudgetExceededError) as caught:
        crew.kickoff()

    assert caught.value.reason == "limit"
    report = last_report(crew)
    assert report is not None
    assert llm_nanos(report) == billed(server)
    requests = server.stats()["requests"]
    assert 1 <= requests <= 2 and report.calls == requests  # nothing sent after the refusal
    assert report.total_usd <= 0.0010 + 1e-9


@needs_crewai
def test_unprotected_crew_follows_the_enclosing_budget(
    server: FakeLLMServer, processor: Any, instrumented: Any
) -> None:
    crew, _ = make_crew(server)
    server.script(Behaviour(tool_calls=[LOOKUP]))
    with budget(max_usd=1.0) as run:
        crew.kickoff()
    report = run.report()
    assert llm_nanos(report) == billed(server) > 0
    assert set(report.by_agent) == {"Researcher", "Writer"}


@needs_crewai
def test_unsampled_spans_still_charged_once(
    server: FakeLLMServer, processor: Any, instrumented: Any
) -> None:
    """A sampler that drops CrewAI's model-call spans: the openai instrumentor cannot find the
    outer call by its span, so the outer call is marked as sent and charged itself."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from otel_budget.instrumentation.crewai import CrewAIInstrumentor, protect_crew
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    instrumented.uninstrument()
    instrumented.instrument(tracer_provider=TracerProvider(sampler=ALWAYS_OFF))
    openai_instrumentor = OpenAIBudgetInstrumentor()
    openai_instrumentor.instrument()
    try:
        crew, _ = make_crew(server)
        protect_crew(crew, max_usd=1.0)
        server.script(Behaviour(tool_calls=[LOOKUP]))
        with budget(max_usd=1.0) as run:
            crew.kickoff()
    finally:
        openai_instrumentor.uninstrument()
        instrumented.uninstrument()
        CrewAIInstrumentor().instrument()
    assert llm_nanos(run.report()) == billed(server) > 0


# -- the example, offline ------------------------------------------------------------------------
_AUDIT = """
import json, runpy, sys
seen = []
def hook(event, args):
    if event == "socket.connect":
        address = args[1]
        seen.append(address[0] if isinstance(address, tuple) else str(address))
    elif event == "socket.getaddrinfo":
        seen.append(str(args[0]))
sys.addaudithook(hook)
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
finally:
    print("CONNECTIONS " + json.dumps(sorted(set(seen))))
"""


@needs_crewai
def test_example_crew_runs_offline_and_is_stopped() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREWAI_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "-c", _AUDIT, str(ROOT / "examples" / "crewai_crew.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "stopped by loop detection" in done.stdout, output[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("CONNECTIONS "))
    hosts = set(json.loads(line.removeprefix("CONNECTIONS ")))
    assert hosts and hosts <= {"127.0.0.1", "localhost"}, hosts  # CrewAI did not phone home


@needs_crewai
def test_crewai_telemetry_is_switched_off(instrumented: Any) -> None:
    from crewai.telemetry import Telemetry

    for name, value in (("CREWAI_DISABLE_TELEMETRY", "true"), ("CREWAI_TRACING_ENABLED", "false")):
        assert os.environ[name] == value
    assert Telemetry()._should_execute_telemetry() is False
    assert os.environ.get("OTEL_SDK_DISABLED") is None  # ours stays on


@needs_crewai
def test_kickoff_for_each_and_copies_keep_the_budget(
    server: FakeLLMServer, processor: Any, exporter: Any, instrumented: Any
) -> None:
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    crew, _ = make_crew(server, writer=False)
    protect_crew(crew, max_usd=1.0)
    crew.kickoff_for_each(inputs=[{"topic": "a"}, {"topic": "b"}])  # CrewAI copies the crew
    report = last_report(crew)
    assert report is not None and report.calls == server.stats()["requests"] == 2
    assert llm_nanos(report) == billed(server)
    assert [s.name for s in exporter.get_finished_spans() if s.parent is None] == [
        "kickoff research crew"
    ]
    copy = crew.copy()
    server.default_behaviour = Behaviour(tool_calls=[LOOKUP])
    with pytest.raises(BudgetExceededError, match="loop detected"):
        copy.kickoff()  # a copy the application made is protected too
    assert last_report(copy) is not None


@needs_crewai
@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_a_failure_of_ours_follows_the_failure_policy(
    server: FakeLLMServer, make_processor: Any, instrumented: Any,
    monkeypatch: pytest.MonkeyPatch, policy: str,
) -> None:  # fmt: skip
    from otel_budget.instrumentation.crewai import llm, protect_crew

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug of ours")

    make_processor(failure_policy=policy)
    monkeypatch.setattr(llm, "read_request", broken)
    crew, _ = make_crew(server, writer=False)
    protect_crew(crew, max_usd=1.0)
    if policy == "fail_open":
        crew.kickoff()  # the call goes ahead: the RuntimeError never reaches the app
        assert server.stats()["requests"] == 1
    else:
        with pytest.raises(BudgetExceededError) as caught:
            crew.kickoff()
        assert caught.value.reason == "internal_error"
        assert server.stats()["requests"] == 0


# -- a model call inside a priced tool: two costs ------------------------------------------------
def test_a_model_call_inside_a_priced_tool_is_charged_besides_the_tool(
    make_processor: Any, exporter: Any
) -> None:
    """(Core, without crewai: runs in the main suite too.) The model call a tool makes is
    metered by the openai instrumentor inside the tool's span; it must not take the tool's
    own charge over as if it described the same call."""
    import openai

    from otel_budget import track_tool
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    make_processor(prices=PriceBook(tools={"summarise": 0.01}))
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    try:
        with FakeLLMServer() as fake:
            client = openai.OpenAI(base_url=fake.openai_base_url, api_key="x", max_retries=0)

            @track_tool("summarise")
            def summarise(text: str) -> Any:
                return client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
                )

            with budget(max_usd=1.0) as run:
                summarise("hello")
            bill = billed(fake)
    finally:
        instrumentor.uninstrument()
    report = run.report()
    assert llm_nanos(report) == bill > 0
    assert report.by_tool["summarise"].usd == pytest.approx(0.01)
    (tool_span,) = spans_named(exporter, "execute_tool summarise")  # ended and exported
    assert tool_span.attributes["otel_budget.cost.usd"] == pytest.approx(0.01)
