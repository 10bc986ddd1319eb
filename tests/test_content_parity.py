"""Message content and the operation-details event, against the official instrumentations.

Each case runs the same call (same fake provider behaviour) twice through the real SDK: once
under the official package (``opentelemetry-instrumentation-genai-openai`` /
``-genai-anthropic`` 1.3b0, with their own TracerProvider and LoggerProvider), once under
ours (``logger_provider`` given to ``instrument()``), in each capture mode, and asserts that
the content attributes (byte for byte: they are JSON strings) and the event records
(name, content, trace context) are equal. ``otel_budget.*``, timestamps and ids are ignored.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_budget import BudgetExceededError
from otel_budget.instrumentation import _content
from otel_budget.instrumentation.anthropic import AnthropicBudgetInstrumentor
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.testing import Behaviour, FakeLLMServer

genai_openai = pytest.importorskip("opentelemetry.instrumentation.genai.openai")
genai_anthropic = pytest.importorskip("opentelemetry.instrumentation.genai.anthropic")

CAPTURE = _content.CAPTURE_CONTENT_ENV
EMIT = _content.EMIT_EVENT_ENV
CONTENT_KEYS = (
    "gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions",
    "gen_ai.tool.definitions",
)  # fmt: skip
MODES = ("SPAN_ONLY", "EVENT_ONLY", "SPAN_AND_EVENT", "NO_CONTENT")
MINI = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
PIXEL = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake pixel").decode()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}  # fmt: skip
CHAT_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "text", "text": "What is this, and the weather?"},
                                 {"type": "image_url", "image_url": {"url": PIXEL}}]},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": "Thanks.", "name": "alice"},
]  # fmt: skip
RESPONSES_INPUT: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather",
     "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    {"role": "user", "content": "And tomorrow?"},
]  # fmt: skip
RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
]  # fmt: skip
ANTHROPIC_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "text", "text": "And tomorrow?"},
    ]},
]  # fmt: skip
ANTHROPIC_TOOLS = [{
    "name": "get_weather", "description": "Weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}]  # fmt: skip


# -- running one call under an instrumentation ------------------------------------------------
class Recorded:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.logs = InMemoryLogRecordExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.logger_provider = LoggerProvider()
        self.logger_provider.add_log_record_processor(SimpleLogRecordProcessor(self.logs))

    def span(self, prefix: str = "chat") -> Any:
        spans = [s for s in self.spans.get_finished_spans() if s.name.startswith(prefix)]
        assert len(spans) == 1, [s.name for s in self.spans.get_finished_spans()]
        return spans[0]

    def events(self) -> list[Any]:
        return [r.log_record for r in self.logs.get_finished_logs()]


def _official(library: str) -> Any:
    if library == "anthropic":
        return genai_anthropic.AnthropicInstrumentor()
    return genai_openai.OpenAIInstrumentor()


def _ours(library: str) -> Any:
    return AnthropicBudgetInstrumentor() if library == "anthropic" else OpenAIBudgetInstrumentor()


def run_under(
    which: str, library: str, call: Callable[[], Any], monkeypatch: Any, mode: str,
    emit: str | None = None,
) -> Recorded:  # fmt: skip
    monkeypatch.setenv(CAPTURE, mode)
    if emit is None:
        monkeypatch.delenv(EMIT, raising=False)
    else:
        monkeypatch.setenv(EMIT, emit)
    rec = Recorded()
    instrumentor = _official(library) if which == "official" else _ours(library)
    instrumentor.instrument(tracer_provider=rec.tracer_provider, logger_provider=rec.logger_provider)
    try:
        try:
            call()
        except (openai.APIError, anthropic.APIError, BudgetExceededError):
            pass
    finally:
        instrumentor.uninstrument()
    return rec


def content_of(span: Any) -> dict[str, Any]:
    return {k: span.attributes[k] for k in CONTENT_KEYS if k in span.attributes}


def event_view(record: Any) -> dict[str, Any]:
    attributes = dict(record.attributes or {})
    return {
        "event_name": record.event_name,
        "body": record.body,
        "severity": record.severity_number,
        "content": {k: attributes[k] for k in CONTENT_KEYS if k in attributes},
        "operation": attributes.get("gen_ai.operation.name"),
        "provider": attributes.get("gen_ai.provider.name"),
        "model": attributes.get("gen_ai.request.model"),
        "has_error_type": "error.type" in attributes,
    }


def assert_parity(official: Recorded, ours: Recorded, mode: str, prefix: str = "chat") -> None:
    theirs_span, our_span = official.span(prefix), ours.span(prefix)
    assert content_of(our_span) == content_of(theirs_span)
    assert [event_view(e) for e in ours.events()] == [event_view(e) for e in official.events()]
    for recorded, span in ((official, theirs_span), (ours, our_span)):
        for event in recorded.events():  # in the call span's trace context
            assert (event.trace_id, event.span_id) == (
                span.context.trace_id, span.context.span_id,
            )  # fmt: skip
    if mode in ("SPAN_ONLY", "SPAN_AND_EVENT"):
        assert "gen_ai.input.messages" in content_of(our_span)
    else:
        assert content_of(our_span) == {}
    if mode in ("EVENT_ONLY", "SPAN_AND_EVENT"):
        assert len(ours.events()) == 1
        assert event_view(ours.events()[0])["content"]
    else:
        assert ours.events() == []


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def oa(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def an(server: FakeLLMServer) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def twice(
    library: str, call: Callable[[], Any], monkeypatch: Any, mode: str,
    server: FakeLLMServer | None = None, behaviour: Behaviour | None = None,
) -> tuple[Recorded, Recorded]:  # fmt: skip
    runs = []
    for which in ("official", "ours"):
        if server is not None and behaviour is not None:
            server.script(behaviour)
        runs.append(run_under(which, library, call, monkeypatch, mode))
    return runs[0], runs[1]


# -- OpenAI chat completions ------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_chat_completion_content(oa: openai.OpenAI, monkeypatch: Any, mode: str) -> None:
    def call() -> None:
        oa.chat.completions.create(model=MINI, messages=CHAT_MESSAGES, tools=[WEATHER],
                                   max_tokens=20)  # fmt: skip

    official, ours = twice("openai", call, monkeypatch, mode)
    assert_parity(official, ours, mode)


@pytest.mark.parametrize("mode", MODES)
def test_chat_stream_content(oa: openai.OpenAI, monkeypatch: Any, mode: str) -> None:
    def call() -> None:
        _drain(oa.chat.completions.create(model=MINI, messages=CHAT_MESSAGES, max_tokens=20,
                                          stream=True, stream_options={"include_usage": True}))  # fmt: skip

    official, ours = twice("openai", call, monkeypatch, mode)
    assert_parity(official, ours, mode)


@pytest.mark.parametrize("mode", ("SPAN_AND_EVENT", "EVENT_ONLY"))
def test_failed_call_records_its_request_and_event(
    oa: openai.OpenAI, server: FakeLLMServer, monkeypatch: Any, mode: str
) -> None:
    def call() -> None:
        oa.chat.completions.create(model=MINI, messages=CHAT_MESSAGES, max_tokens=20)

    official, ours = twice("openai", call, monkeypatch, mode, server, Behaviour(status=404))
    assert_parity(official, ours, mode)
    assert event_view(ours.events()[0])["has_error_type"]


# -- OpenAI Responses -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inp", ["Say something short.", RESPONSES_INPUT], ids=["string", "items"])
def test_responses_content(oa: openai.OpenAI, monkeypatch: Any, mode: str, inp: Any) -> None:
    def call() -> None:
        oa.responses.create(model=MINI, input=inp, instructions="Be terse.",
                            tools=RESPONSES_TOOLS, max_output_tokens=20)  # fmt: skip

    official, ours = twice("openai", call, monkeypatch, mode)
    assert_parity(official, ours, mode)
    if mode == "SPAN_ONLY":
        assert "gen_ai.system_instructions" in content_of(ours.span())
        assert "gen_ai.output.messages" in content_of(ours.span())


@pytest.mark.parametrize("mode", MODES)
def test_responses_stream_content(oa: openai.OpenAI, monkeypatch: Any, mode: str) -> None:
    def call() -> None:
        _drain(oa.responses.create(model=MINI, input=RESPONSES_INPUT, instructions="Be terse.",
                                   max_output_tokens=20, stream=True))  # fmt: skip

    official, ours = twice("openai", call, monkeypatch, mode)
    assert_parity(official, ours, mode)
    if mode == "SPAN_ONLY":
        assert "gen_ai.output.messages" in content_of(ours.span())


# -- Anthropic Messages -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
def test_anthropic_content(an: anthropic.Anthropic, monkeypatch: Any, mode: str, stream: bool) -> None:
    def call() -> None:
        result = an.messages.create(
            model=CLAUDE, system="You are terse.", messages=ANTHROPIC_MESSAGES,
            tools=ANTHROPIC_TOOLS, max_tokens=20, stream=stream,
        )  # fmt: skip
        if stream:
            _drain(result)

    official, ours = twice("anthropic", call, monkeypatch, mode)
    assert_parity(official, ours, mode)
    if mode == "SPAN_ONLY":
        assert "gen_ai.system_instructions" in content_of(ours.span())
        assert "gen_ai.output.messages" in content_of(ours.span())


# -- modes ------------------------------------------------------------------------------------
def test_emit_event_without_content(oa: openai.OpenAI, monkeypatch: Any) -> None:
    """``OTEL_INSTRUMENTATION_GENAI_EMIT_EVENT=true`` with no content mode: an event without
    content, as util-genai emits it."""
    runs = []
    for which in ("official", "ours"):
        runs.append(run_under(which, "openai", lambda: oa.chat.completions.create(
            model=MINI, messages=CHAT_MESSAGES, max_tokens=20), monkeypatch, "NO_CONTENT", "true"))  # fmt: skip
    official, ours = runs
    assert [event_view(e) for e in ours.events()] == [event_view(e) for e in official.events()]
    assert len(ours.events()) == 1 and event_view(ours.events()[0])["content"] == {}


def test_modes_are_read_as_util_genai_reads_them(caplog: Any, monkeypatch: Any) -> None:
    from opentelemetry.util.genai.types import ContentCapturingMode
    from opentelemetry.util.genai.utils import get_content_capturing_mode

    for raw in ("span_only", " Event_Only ", "SPAN_AND_EVENT", "no_content", ""):
        monkeypatch.setenv(CAPTURE, raw)
        theirs = get_content_capturing_mode()
        mode = _content.content_mode()
        assert mode.span == (theirs in (ContentCapturingMode.SPAN_ONLY,
                                        ContentCapturingMode.SPAN_AND_EVENT))  # fmt: skip
        assert mode.event == (theirs in (ContentCapturingMode.EVENT_ONLY,
                                         ContentCapturingMode.SPAN_AND_EVENT))  # fmt: skip
    # ``true`` (this repository's first spelling) keeps meaning content on spans.
    monkeypatch.setenv(CAPTURE, "true")
    assert _content.content_mode() == _content.ContentMode(True, False, False)
    # An invalid value: no content, logged once, never an exception.
    monkeypatch.setenv(CAPTURE, "everything-please")
    with caplog.at_level(logging.WARNING, logger=_content.__name__):
        assert _content.content_mode() == _content.OFF
        assert _content.content_mode() == _content.OFF
    assert sum("everything-please" in r.getMessage() for r in caplog.records) == 1


def test_content_off_by_default_costs_nothing(oa: openai.OpenAI, monkeypatch: Any) -> None:
    """Off (the default): no content attribute, no event, and no converter runs."""
    calls = []
    for name in ("openai_chat_input", "openai_chat_output", "openai_chat_tools", "dumps"):
        original = getattr(_content, name)
        monkeypatch.setattr(_content, name,
                            lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))  # fmt: skip
    monkeypatch.delenv(CAPTURE, raising=False)
    rec = Recorded()
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument(tracer_provider=rec.tracer_provider, logger_provider=rec.logger_provider)
    try:
        oa.chat.completions.create(model=MINI, messages=CHAT_MESSAGES, tools=[WEATHER], max_tokens=20)
        _drain(oa.chat.completions.create(model=MINI, messages=CHAT_MESSAGES, max_tokens=20,
                                          stream=True))  # fmt: skip
    finally:
        instrumentor.uninstrument()
    spans = rec.spans.get_finished_spans()
    assert len(spans) == 2
    assert all(content_of(s) == {} for s in spans)
    assert rec.events() == [] and calls == []


def test_refused_call_records_its_request_and_an_event(
    oa: openai.OpenAI, server: FakeLLMServer, monkeypatch: Any, make_processor: Any
) -> None:
    """A call the budget refuses is an operation that failed: its span carries the request
    (span modes) and its event is emitted with ``error.type`` (event modes)."""
    monkeypatch.setenv(CAPTURE, "SPAN_AND_EVENT")
    processor = make_processor(max_usd=0.000001)
    rec = Recorded()
    rec.tracer_provider.add_span_processor(processor)
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument(tracer_provider=rec.tracer_provider, logger_provider=rec.logger_provider,
                            runtime=processor.runtime)  # fmt: skip
    try:
        with pytest.raises(BudgetExceededError):
            oa.chat.completions.create(model=MINI, messages=CHAT_MESSAGES, max_tokens=20)
    finally:
        instrumentor.uninstrument()
    assert server.calls() == []
    span = rec.span()
    assert "gen_ai.input.messages" in content_of(span)
    (event,) = rec.events()
    assert event.event_name == _content.EVENT_NAME
    assert event.attributes["error.type"] == "BudgetExceededError"
    assert _content.dumps(event.attributes["gen_ai.input.messages"]) == span.attributes[
        "gen_ai.input.messages"
    ]
    assert event.trace_id == span.context.trace_id
