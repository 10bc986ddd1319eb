"""Processor-only enforcement of GenAI spans that other instrumentations create.

Each test registers ``BudgetSpanProcessor(max_usd=...)`` and an in-memory exporter, lets
another instrumentation (the official ``opentelemetry-instrumentation-genai-openai``,
OpenLLMetry's ``opentelemetry-instrumentation-openai``, or hand-written GenAI spans)
instrument the real ``openai`` SDK against ``FakeLLMServer``, and loops calls under one root
span: the loop must stop with ``BudgetExceededError`` before the provider billed more than
the budget, the refused span must be exported with ERROR status, and no reservation may be
left behind. A package that is not installed skips its tests (``pytest.importorskip``):
``pip install -e '.[test,test-foreign]'`` in a separate virtualenv runs them all.
OpenLIT is not tested: it pins ``openai<3`` and its install downgrades openai, anthropic and
the OpenTelemetry SDK. ``opentelemetry-instrumentation-openai-v2`` does not import beside
``opentelemetry-util-genai`` 1.3b0.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import wrapt
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from otel_budget import BudgetExceededError, PriceBook
from otel_budget import attributes as attrs
from otel_budget.engine import trace_key
from otel_budget.testing import Behaviour, FakeLLMServer
from tests.helpers import NANOS, assert_error_span, ledger, nanos, spans_named

MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something long about budgets."}]
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075)}  # genai-prices' (input, output, cache read) $/MTok
BUDGET = 0.02  # USD; a reply of 3000 output tokens costs ~$0.0018, a projection ~$0.0037
GENAI_SCOPE = GENAI_OPENAI = "opentelemetry.instrumentation.genai.openai"
OPENLLMETRY = "opentelemetry.instrumentation.openai"


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES, default_output_tokens=3000) as srv:
        yield srv


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


def _create_is_clean() -> bool:
    from openai.resources.chat.completions import Completions

    return not isinstance(vars(Completions)["create"], wrapt.FunctionWrapper)


def _sdk_methods() -> dict[tuple[type, str], Any]:
    """Every method of the openai SDK's resource classes, as the class holds it (all resource
    modules imported first: the instrumentors import the ones they wrap)."""
    import openai.resources

    for info in pkgutil.walk_packages(openai.resources.__path__, "openai.resources."):
        importlib.import_module(info.name)
    found: dict[tuple[type, str], Any] = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("openai.resources") and module is not None:
            for cls in vars(module).values():
                if isinstance(cls, type) and cls.__module__ == name:
                    for attr, value in vars(cls).items():
                        found[(cls, attr)] = value
    return found


def _instrumentor(module: str, alone: bool = True) -> Iterator[Any]:
    instrumentor = importlib.import_module(module).OpenAIInstrumentor()
    assert _create_is_clean() or not alone
    before = _sdk_methods()
    instrumentor.instrument(tracer_provider=trace.get_tracer_provider())
    assert not _create_is_clean()
    yield instrumentor
    instrumentor.uninstrument()
    # OpenLLMetry 0.62.4's uninstrument() leaves every wrapper in place: it passes
    # ("openai.resources.chat.completions", "Completions.create") to an unwrap() that expects
    # (module path + class, method). Put back whatever is still patched, so that the next
    # test file gets the SDK as it was.
    for (cls, attr), value in before.items():
        if vars(cls).get(attr) is not value:
            setattr(cls, attr, value)
    assert _create_is_clean() or not alone


@pytest.fixture
def genai_openai() -> Iterator[Any]:
    pytest.importorskip("opentelemetry.instrumentation.genai.openai")
    yield from _instrumentor("opentelemetry.instrumentation.genai.openai")


@pytest.fixture
def openllmetry() -> Iterator[Any]:
    pytest.importorskip("opentelemetry.instrumentation.openai.shared")
    yield from _instrumentor("opentelemetry.instrumentation.openai")


def run_until_refused(
    processor: Any, call: Any, limit: int = 40
) -> tuple[int, BudgetExceededError, int]:
    """Calls under one root span until refused: (calls made, the error, nano-USD still
    reserved in the trace's scope just before the root ends)."""
    tracer = trace.get_tracer("tests.agent")
    made = 0
    with tracer.start_as_current_span("agent") as root:
        trace_id = root.get_span_context().trace_id
        with pytest.raises(BudgetExceededError) as caught:
            for _ in range(limit):
                call()
                made += 1
        reserved = ledger(processor, trace_key(trace_id))[1]
    return made, caught.value, reserved


def assert_stopped_in_budget(
    processor: Any, server: FakeLLMServer, made: int, error: BudgetExceededError, reserved: int
) -> None:
    stats = server.stats()
    assert made >= 2 and stats["requests"] == made  # the refused call sent nothing
    assert stats["billed_nanos"] <= nanos(BUDGET)
    assert error.reason == "limit" and error.budget_usd == pytest.approx(BUDGET)
    assert reserved == 0  # every reservation settled or released
    assert not len(processor.runtime.calls)


def refused_span(exporter: Any, name: str) -> Any:
    refused = [
        s for s in spans_named(exporter, name)
        if s.attributes.get(attrs.ERROR_TYPE) == "BudgetExceededError"
    ]  # fmt: skip
    assert len(refused) == 1
    assert_error_span(refused[0], "BudgetExceededError")
    return refused[0]


# -- the official genai-openai instrumentation ---------------------------------------------------
def test_genai_openai_calls_stop_before_the_budget(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
    genai_openai: Any,
) -> None:  # fmt: skip
    processor = make_processor(BUDGET, prices=PriceBook())
    made, error, reserved = run_until_refused(
        processor, lambda: client.chat.completions.create(model=MINI, messages=MESSAGES)
    )
    assert_stopped_in_budget(processor, server, made, error, reserved)
    spans = spans_named(exporter, f"chat {MINI}")
    assert len(spans) == made + 1
    refused = refused_span(exporter, f"chat {MINI}")
    assert refused.attributes[attrs.COST_INPUT_ESTIMATED] == "assumed"
    assert refused.attributes[attrs.COST_OUTPUT_ASSUMED] is True
    # Settled from the usage the other instrumentation reported: what the provider billed.
    root = spans_named(exporter, "agent")[0]
    assert root.attributes[attrs.TRACE_SPENT_USD] == pytest.approx(
        server.stats()["billed_nanos"] / NANOS, abs=1e-8
    )
    assert root.attributes[attrs.TRACE_ABORTS] == 1


def test_genai_openai_failed_call_releases_its_reservation(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
    genai_openai: Any,
) -> None:  # fmt: skip
    processor = make_processor(BUDGET, prices=PriceBook())
    server.script(Behaviour(status=500))
    tracer = trace.get_tracer("tests.agent")
    with tracer.start_as_current_span("agent") as root:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MINI, messages=MESSAGES)
        assert ledger(processor, trace_key(root.get_span_context().trace_id)) == (0, 0)
    assert not len(processor.runtime.calls)
    span = spans_named(exporter, f"chat {MINI}")[0]
    assert span.status.status_code is StatusCode.ERROR
    assert attrs.COST_PROJECTED_USD in span.attributes


# -- OpenLLMetry -------------------------------------------------------------------------------
def test_openllmetry_spans_start_without_a_model_and_are_blocked_by_default(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
    openllmetry: Any,
) -> None:  # fmt: skip
    make_processor(BUDGET, prices=PriceBook())
    with pytest.raises(BudgetExceededError, match=r"starts without gen_ai\.request\.model") as caught:
        client.chat.completions.create(model=MINI, messages=MESSAGES)
    assert caught.value.reason == "unknown_model"
    assert server.stats()["requests"] == 0
    refused_span(exporter, "openai.chat")


def test_openllmetry_calls_stop_before_the_budget_with_a_price_as_policy(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
    openllmetry: Any,
) -> None:  # fmt: skip
    processor = make_processor(BUDGET, prices=PriceBook(unknown_model=f"price_as:{MINI}"))
    made, error, reserved = run_until_refused(
        processor, lambda: client.chat.completions.create(model=MINI, messages=MESSAGES)
    )
    assert_stopped_in_budget(processor, server, made, error, reserved)
    refused_span(exporter, "openai.chat")
    root = spans_named(exporter, "agent")[0]
    assert root.attributes[attrs.TRACE_SPENT_USD] == pytest.approx(
        server.stats()["billed_nanos"] / NANOS, abs=1e-8
    )


# -- ours inside another instrumentation: one call, charged once --------------------------------
@pytest.mark.parametrize(
    ("package", "probe"),
    [
        (GENAI_OPENAI, GENAI_OPENAI),
        (OPENLLMETRY, OPENLLMETRY + ".shared"),  # the package, not a namespace
    ],
    ids=["genai-openai", "openllmetry"],
)
def test_our_call_inside_another_instrumentation_is_charged_once(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
    package: str, probe: str,
) -> None:  # fmt: skip
    """Ours instrumented first, so the other wrapper is the outer one: its span starts first
    (OpenLLMetry's without a model, which is not refused since ours meters the call)."""
    pytest.importorskip(probe)
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    ours = OpenAIBudgetInstrumentor()
    ours.instrument()
    try:
        for _ in _instrumentor(package, alone=False):
            processor = make_processor(1.0, prices=PriceBook())
            tracer = trace.get_tracer("tests.agent")
            with tracer.start_as_current_span("agent") as root:
                for _ in range(3):
                    client.chat.completions.create(model=MINI, messages=MESSAGES)
                spent, reserved = ledger(processor, trace_key(root.get_span_context().trace_id))
            assert reserved == 0 and not len(processor.runtime.calls)
            assert spent == server.stats()["billed_nanos"] and server.stats()["requests"] == 3
    finally:
        ours.uninstrument()
    assert _create_is_clean()


# -- hand-written GenAI spans ---------------------------------------------------------------------
CURRENT = {
    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
    "gen_ai.request.model": MINI,
}  # fmt: skip
DEPRECATED = {"llm.request.type": "chat", "gen_ai.system": "openai", "llm.request.model": MINI}


def _hand_written_call(
    tracer: Any, server: FakeLLMServer, client: openai.OpenAI, name: str, at_start: dict[str, Any]
) -> None:
    """A GenAI span around a real call; usage (and the rest) recorded at the end."""
    with tracer.start_as_current_span(name, attributes=at_start) as span:
        reply = client.chat.completions.create(model=MINI, messages=MESSAGES)
        span.set_attributes({
            **CURRENT,
            "gen_ai.usage.input_tokens": reply.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
        })  # fmt: skip


@pytest.mark.parametrize(
    ("scope", "name", "at_start"),
    [
        ("tests.handwritten", f"chat {MINI}", CURRENT),
        ("tests.handwritten", "llm call", DEPRECATED),
        (GENAI_SCOPE, f"chat {MINI}", {}),  # every attribute set at the end
    ],
    ids=["current", "deprecated", "name-only"],
)
def test_hand_written_spans_stop_before_the_budget(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
    scope: str, name: str, at_start: dict[str, Any],
) -> None:  # fmt: skip
    processor = make_processor(BUDGET, prices=PriceBook())
    tracer = trace.get_tracer(scope)
    made, error, reserved = run_until_refused(
        processor, lambda: _hand_written_call(tracer, server, client, name, at_start)
    )
    assert_stopped_in_budget(processor, server, made, error, reserved)
    refused = refused_span(exporter, name)
    assert refused.attributes[attrs.GEN_AI_OPERATION_NAME] == "chat"


def test_hand_written_span_with_its_messages_is_counted(
    make_processor: Any, exporter: Any, tracer: Any,
) -> None:  # fmt: skip
    processor = make_processor(1.0, prices=PriceBook())
    messages = '[{"role": "user", "parts": [{"type": "text", "content": "Hi"}]}]'
    at_start = {**CURRENT, "gen_ai.input.messages": messages, "gen_ai.request.max_tokens": 10}
    with (
        tracer.start_as_current_span("agent"),
        tracer.start_as_current_span(f"chat {MINI}", attributes=at_start) as span,
    ):
        projected = span.attributes[attrs.COST_PROJECTED_USD]
        assert span.attributes[attrs.COST_INPUT_ESTIMATED] != "assumed"
        assert attrs.COST_OUTPUT_ASSUMED not in span.attributes
        span.set_attributes({"gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 10})
    assert 0 < projected < 0.00001
    assert not len(processor.runtime.calls)
    assert len(exporter.get_finished_spans()) == 2


def test_hand_written_span_around_our_call_is_superseded_by_it(
    make_processor: Any, exporter: Any, server: FakeLLMServer, client: openai.OpenAI,
) -> None:  # fmt: skip
    """A GenAI span our instrumentor does not recognise (a gateway's provider name) wraps our
    metered call: its projection is reserved at its start, then given back when ours starts
    (one call, reserved exactly by ours), and it is not charged when it ends."""
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    ours = OpenAIBudgetInstrumentor()
    ours.instrument()
    try:
        processor = make_processor(1.0, prices=PriceBook())
        tracer = trace.get_tracer("tests.gateway")
        at_start = {**CURRENT, "gen_ai.provider.name": "my-gateway"}
        with tracer.start_as_current_span("agent") as root:
            key = trace_key(root.get_span_context().trace_id)
            for _ in range(3):
                with tracer.start_as_current_span(f"chat {MINI}", attributes=at_start) as span:
                    assert ledger(processor, key)[1] > 0  # the gateway span's projection
                    reply = client.chat.completions.create(model=MINI, messages=MESSAGES)
                    span.set_attributes({
                        "gen_ai.usage.input_tokens": reply.usage.prompt_tokens,
                        "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
                    })  # fmt: skip
            spent, reserved = ledger(processor, key)
        assert reserved == 0 and not len(processor.runtime.calls)
        assert spent == server.stats()["billed_nanos"] and server.stats()["requests"] == 3
    finally:
        ours.uninstrument()
    assert _create_is_clean()
