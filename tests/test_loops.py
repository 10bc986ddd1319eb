"""Loop detection: trips on loops, never on ordinary agents; refuses before the call runs."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from otel_budget import BudgetExceededError, LoopPolicy, Substitute, agent_span, budget, track_tool
from otel_budget import attributes as attrs
from otel_budget.config import read_env
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.loops import LoopDetector, fingerprint, policy_of
from otel_budget.testing import FakeLLMServer
from otel_budget.tools import begin_tool
from tests.agent_transcripts import ORDINARY, STUCK, STUCK_NEAR


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replay(detector: LoopDetector, transcript: list[tuple[str, str]], run: str = "r") -> list[int]:
    """Indexes of the calls that tripped."""
    return [
        i for i, (name, arguments) in enumerate(transcript)
        if detector.observe(run, "tool", name, detector.key("tool", name, arguments))
    ]  # fmt: skip


# -- the detector ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_ordinary_agents_never_trip_under_the_defaults(name: str) -> None:
    transcript = ORDINARY[name]
    for policy in (LoopPolicy(), LoopPolicy(near_identical=True)):
        assert replay(LoopDetector(policy), transcript) == [], name
    by_name: dict[str, int] = {}
    for tool, _ in transcript:
        by_name[tool] = by_name.get(tool, 0) + 1
    # Each would trip a detector keyed by the tool's name (5 calls of one tool).
    assert max(by_name.values()) >= 5


@pytest.mark.parametrize("name", sorted(STUCK))
def test_stuck_agents_trip_early(name: str) -> None:
    trips = replay(LoopDetector(LoopPolicy()), STUCK[name])
    assert trips, name
    # A loop of one call trips at its 5th repeat; a cycle of two once each call of it has
    # repeated 5 times after the first round (which is still progress).
    assert trips[0] <= 9, (name, trips[0])


def test_near_identical_arguments_trip_only_when_asked() -> None:
    transcript = STUCK_NEAR["shuffled_case"]
    assert replay(LoopDetector(LoopPolicy()), transcript) == []
    assert replay(LoopDetector(LoopPolicy(near_identical=True)), transcript)[0] == 4


def test_canonical_arguments() -> None:
    one = fingerprint("t", '{"a": 1, "b": [1, 2]}')
    assert one == fingerprint("t", '{"b":[1,2],"a":1}') == fingerprint("t", {"b": [1, 2], "a": 1})
    assert one != fingerprint("t", {"a": 2, "b": [1, 2]})
    assert one != fingerprint("u", {"a": 1, "b": [1, 2]})
    assert fingerprint("t", "Paris") != fingerprint("t", "paris")
    assert fingerprint("t", "Paris", near_identical=True) == fingerprint("t", " paris ", near_identical=True)
    assert fingerprint("t", {"x": 0.1 + 0.2}, near_identical=True) == fingerprint("t", {"x": 0.3}, near_identical=True)
    # Whatever the arguments are, a digest (never an error).
    circular: list[Any] = []
    circular.append(circular)
    for odd in (object(), {1: "a", "1": "b"}, b"\xff\xfe", circular, float("nan"), "{not json"):
        assert len(fingerprint("t", odd)) == 16


def test_window_and_threshold() -> None:
    clock = Clock()
    detector = LoopDetector(LoopPolicy(threshold=3, window_seconds=10), clock=clock)
    key = detector.key("tool", "poll", {})
    assert not detector.observe("r", "tool", "poll", key)
    clock.now += 6
    assert not detector.observe("r", "tool", "poll", key)
    clock.now += 6  # 12 s after the first: outside the window
    assert not detector.observe("r", "tool", "poll", key)
    clock.now += 1  # 3 within 7 s
    hit = detector.observe("r", "tool", "poll", key)
    assert hit is not None and hit.repeats == 3 and hit.elapsed_seconds == pytest.approx(7)
    assert hit.fingerprint == key.hex() and hit.name == "poll"
    assert not detector.observe("other-run", "tool", "poll", key)  # runs are separate


def test_memory_is_bounded() -> None:
    detector = LoopDetector(LoopPolicy(max_runs=50, max_fingerprints=20))
    for run in range(500):
        for call in range(100):
            detector.observe(f"run{run}", "tool", "t", detector.key("tool", "t", call))
    assert len(detector) == 50
    assert all(len(history.calls) <= 20 for history in detector._runs.values())


def test_threads_see_one_history() -> None:
    detector = LoopDetector(LoopPolicy(threshold=5))
    key = detector.key("tool", "t", {"same": True})
    hits: list[Any] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        for _ in range(10):
            hit = detector.observe("r", "tool", "t", key)
            if hit:
                hits.append(hit)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hits) == 160 - 4  # every call from the 5th on


@pytest.mark.parametrize(
    "value", [0, 1, -3, 2.5, True, "5"],
)
def test_policy_validation(value: Any) -> None:
    with pytest.raises(ValueError):
        LoopPolicy(threshold=value)


def test_policy_of() -> None:
    assert policy_of(True) == LoopPolicy() == policy_of(None)
    assert policy_of(False) is None and policy_of("off") is None
    assert policy_of("warn") == LoopPolicy(action="warn")
    for bad in ("refused", 3, "on"):
        with pytest.raises(ValueError):
            policy_of(bad)
    for bad_window in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            LoopPolicy(window_seconds=bad_window)
    with pytest.raises(ValueError):
        LoopPolicy(action="block")


def test_environment_never_turns_it_off_by_a_typo() -> None:
    config = read_env({"OTEL_BUDGET_LOOP_DETECTION": "of", "OTEL_BUDGET_LOOP_THRESHOLD": "1"})
    assert "loop_detection" not in config.kwargs  # both unreadable: the defaults (refuse, 5)
    assert {p.variable for p in config.problems} == {
        "OTEL_BUDGET_LOOP_DETECTION", "OTEL_BUDGET_LOOP_THRESHOLD",
    }  # fmt: skip
    config = read_env({"OTEL_BUDGET_LOOP_THRESOLD": "3"})  # misspelt: said, not silently used
    assert any("OTEL_BUDGET_LOOP_THRESHOLD" in p.reason for p in config.problems)
    config = read_env({
        "OTEL_BUDGET_LOOP_DETECTION": "warn", "OTEL_BUDGET_LOOP_THRESHOLD": "3",
        "OTEL_BUDGET_LOOP_WINDOW_SECONDS": "60", "OTEL_BUDGET_LOOP_NEAR_IDENTICAL": "true",
        "OTEL_BUDGET_LOOP_PROMPTS": "yes",
    })  # fmt: skip
    assert config.kwargs["loop_detection"] == LoopPolicy(
        threshold=3, window_seconds=60.0, near_identical=True, prompts=True, action="warn"
    )
    assert not config.problems
    assert read_env({"OTEL_BUDGET_LOOP_DETECTION": "off"}).kwargs["loop_detection"] is False


# -- through the metered path -----------------------------------------------------------------
def test_a_looping_tool_is_refused_before_it_runs(make_processor: Any, exporter: Any) -> None:
    seen: list[dict[str, Any]] = []
    make_processor(on_loop_detected=seen.append)
    runs = []

    @track_tool("web_search", cost_usd=0.01)
    def web_search(query: str) -> str:
        runs.append(query)
        return "results"

    with pytest.raises(BudgetExceededError) as info, budget(max_usd=5, name="agent") as run:
        with agent_span("researcher"):
            web_search("a")
            web_search(query="b")
            for _ in range(10):
                web_search("stuck")
    error = info.value
    assert error.reason == "loop_detected"
    assert error.loop is not None and error.loop["name"] == "web_search" and error.loop["repeats"] == 5
    assert runs == ["a", "b"] + ["stuck"] * 4  # the 5th never ran
    assert seen == [error.loop]
    report = run.report()
    assert report.terminated_by == "loop_detected" and report.loops == 1 and report.aborts == 1
    assert report.by_tool["web_search"].calls == 6
    assert report.total_usd == pytest.approx(0.06)
    spans = exporter.get_finished_spans()
    refused = [s for s in spans if s.attributes.get("otel_budget.budget.reason")]
    assert len(refused) == 1 and refused[0].name == "execute_tool web_search"
    assert refused[0].attributes["otel_budget.budget.reason"] == "loop_detected"
    assert refused[0].attributes[attrs.TOOL_CALL_FINGERPRINT] == error.loop["fingerprint"]
    root = next(s for s in spans if s.name == "agent")
    assert root.attributes[attrs.TRACE_LOOPS] == 1
    assert root.attributes[attrs.TRACE_TERMINATED_BY] == "loop_detected"
    loop_event = next(e for e in root.events if e.name == attrs.EVENT_LOOP)
    assert loop_event.attributes["otel_budget.loop.name"] == "web_search"
    # No content anywhere unless capture is on: the arguments are only a digest.
    for span in spans:
        assert attrs.GEN_AI_TOOL_CALL_ARGUMENTS not in span.attributes
        assert "stuck" not in json.dumps(dict(span.attributes))


def test_warn_reports_without_refusing(make_processor: Any, exporter: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    make_processor(loop_detection="warn", meter_provider=MeterProvider(metric_readers=[reader]))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    # (Another test may stop the logger's propagation, raise its level, or disable it through
    # a logging.config.dictConfig of some library: read it here, as it is.)
    logger = logging.getLogger("otel_budget")
    level, disabled = logger.level, logger.disabled
    logger.setLevel(logging.WARNING)
    logger.disabled = False
    logger.addHandler(handler)
    try:
        with budget(max_usd=5) as run:
            for _ in range(7):
                with begin_tool_call("poll", {"id": 1}):
                    pass
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.disabled = disabled
    report = run.report()
    assert report.tool_calls == 7 and report.aborts == 0 and report.loops == 3
    assert report.terminated_by is None
    assert any("loop detected" in record.getMessage() for record in records)
    points = [
        point for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        if metric.name == "otel_budget.loops" for point in metric.data.data_points
    ]  # fmt: skip
    assert sum(p.value for p in points) == 3
    assert points[0].attributes["otel_budget.loop.action"] == "warn"


class begin_tool_call:  # noqa: N801
    """A tool call with arguments, through the public begin/finish API."""

    def __init__(self, name: str, arguments: Any) -> None:
        self.call = begin_tool(name, arguments=arguments, cost_usd=0.001)

    def __enter__(self) -> Any:
        return self.call

    def __exit__(self, *exc: Any) -> None:
        self.call.finish("ok")


def test_off_and_substitute(make_processor: Any) -> None:
    make_processor(loop_detection=False)
    with budget(max_usd=5) as run:
        for _ in range(20):
            with begin_tool_call("poll", {"id": 1}):
                pass
    assert run.report().loops == 0

    make_processor(on_loop_detected=lambda info: Substitute(f"stopped {info['name']}"))
    calls = []

    @track_tool("poll")
    def poll() -> str:
        calls.append(1)
        return "live"

    with budget(max_usd=5):
        answers = [poll() for _ in range(6)]
    assert answers == ["live"] * 4 + ["stopped poll"] * 2
    assert len(calls) == 4


def test_context_manager_without_arguments_is_not_compared(make_processor: Any) -> None:
    make_processor()
    with budget(max_usd=5) as run:
        for _ in range(20):
            with track_tool("lookup", cost_usd=0.001):
                pass
        for _ in range(4):
            with track_tool("lookup", cost_usd=0.001, arguments={"id": 7}):
                pass
        with pytest.raises(BudgetExceededError):
            with track_tool("lookup", cost_usd=0.001, arguments={"id": 7}):
                pass
    assert run.report().tool_calls == 24


def test_each_run_has_its_own_history(make_processor: Any) -> None:
    make_processor()
    for _ in range(3):  # three runs of 4 identical calls: no run loops
        with budget(max_usd=5) as run:
            for _ in range(4):
                with begin_tool_call("poll", {"id": 1}):
                    pass
        assert run.report().loops == 0


def test_async_tools_and_agents(make_processor: Any) -> None:
    make_processor()
    ran = []

    @track_tool("fetch", cost_usd=0.002)
    async def fetch(url: str) -> str:
        ran.append(url)
        return "page"

    @agent_span("crawler")
    async def crawl() -> None:
        for i in range(3):
            await fetch(f"u{i}")
        while True:
            await fetch("same")

    async def main() -> Any:
        async with budget(max_usd=1) as run:
            try:
                await crawl()
            except BudgetExceededError as error:
                return run, error
        raise AssertionError("not stopped")

    run, error = asyncio.run(main())
    assert error.reason == "loop_detected"
    assert ran.count("same") == 4
    assert run.report().by_agent["crawler"].calls == 7


# -- LLM requests resent unchanged (opt-in), through the real openai SDK ----------------------
@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices={"gpt-4o-mini": (0.15, 0.60, 0.075)}) as srv:
        yield srv


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()
    instrumentor.uninstrument()


def test_prompt_loops_are_opt_in(make_processor: Any, client: Any, server: FakeLLMServer) -> None:
    from otel_budget.pricing import PriceBook

    messages = [{"role": "user", "content": "Are we there yet?"}]
    make_processor(prices=PriceBook())
    with budget(max_usd=5) as run:
        for _ in range(8):  # the same request 8 times: not watched by default
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5)
        for i in range(30):  # an ordinary agent: one model, different prompts
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"step {i}"}], max_tokens=5
            )
    assert run.report().loops == 0 and run.report().calls == 38

    make_processor(prices=PriceBook(), loop_detection=LoopPolicy(prompts=True))
    server.reset_stats()
    with pytest.raises(BudgetExceededError) as info, budget(max_usd=5) as run:
        for i in range(30):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"step {i}"}], max_tokens=5
            )
        while True:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=5)
    assert info.value.reason == "loop_detected" and info.value.loop["kind"] == "prompt"
    assert server.stats()["requests"] == 34  # the 5th identical request was never sent
    assert run.report().calls == 34


def test_a_tool_taken_over_by_a_nested_tool_call_is_counted_once(make_processor: Any) -> None:
    """An integration's tool call (a framework tool) whose body makes our own tool call (an
    MCP client call under the same name): one call, charged once, one repeat for the loop."""
    from opentelemetry import trace

    make_processor()
    with budget(max_usd=5) as run:
        for _ in range(4):
            outer = begin_tool("search", arguments={"q": "x"}, cost_usd=0.01)
            with trace.use_span(outer.span, end_on_exit=False):
                inner = begin_tool("search", arguments={"q": "x"}, cost_usd=0.01)
                inner.finish("r")
            outer.finish("r")
    report = run.report()
    assert report.loops == 0  # 4 calls, not 8 repeats
    assert report.tool_calls == 4 and report.tools_usd == pytest.approx(0.04)
