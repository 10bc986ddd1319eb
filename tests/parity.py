"""Parity harness: the same calls under otel-budget and under the official GenAI instrumentations.

    from tests.parity import MODES, collect, compare
    runs = collect(("official", "ours"), MODES)         # one subprocess per side
    diff = compare(runs["official", "SPAN_ONLY"]["chat"], runs["ours", "SPAN_ONLY"]["chat"])
    assert not diff, "\\n".join(diff)

    # one side by hand, the raw telemetry as JSON ({mode: {scenario: ...}}):
    # PYTHONPATH=src:. python -m tests.parity ours out.json SPAN_ONLY,EVENT_ONLY chat messages_tools

Each scenario drives the real ``openai`` / ``anthropic`` SDK against ``FakeLLMServer`` with a
scripted behaviour, inside an application span ``app``. Each side runs in its own subprocess,
with its own SDK ``TracerProvider`` + ``InMemorySpanExporter``, ``MeterProvider`` +
``InMemoryMetricReader`` (delta temporality: each scenario's points alone) and
``LoggerProvider`` + in-memory log exporter, set as the global providers (the anthropic SDK's
own span, and anything either side takes from the API, land there) and also passed to
``instrument()``:

* ``official``: ``opentelemetry-instrumentation-genai-openai`` and ``-genai-anthropic``
  (built on ``opentelemetry-util-genai``), otel-budget not imported;
* ``ours``: ``BudgetInstrumentor`` with a budget no scenario reaches, the official packages
  not imported.

A subprocess per side keeps the two from ever sharing a wrapper, a singleton instrumentor or a
global provider. Inside it, each capture mode is set in the environment, then the side is
instrumented (util-genai reads the mode when ``instrument()`` builds its handler), the
scenarios run against a fresh server (so response ids match between runs), and the side is
uninstrumented. The official packages re-instrument cleanly: ``test_parity.py`` runs one mode
twice and finds the repeat identical. ``util-genai`` 1.3b0 and the two official packages read
neither ``OTEL_SEMCONV_STABILITY_OPT_IN`` nor anything but
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` (and ``..._EMIT_EVENT``, left unset:
events follow the capture mode); the children get no ``OTEL_*`` variable from the parent (no
sampler, limit or budget setting of the developer's shell changes a run).

What is captured (``run_side``): every finished span (name, kind, status, attributes, events
with their attributes, the parent), every log record (event name, body, attributes, severity,
the name of the span it belongs to), every metric point (name, unit, attributes, count, sum,
bucket counts and boundaries), and the scenario's outcome (``ok`` or the exception type the
application saw).

What is compared (``normalise``): all of it except what depends on time or on the run (ids,
timestamps, durations, the fake server's port, exception stack traces, instrumentation
scopes, metric descriptions), and except otel-budget's documented additions: attributes,
events and metrics under ``otel_budget.``, and ``gen_ai.request.max_tokens`` where otel-budget
injected the output cap (``apply_documented_cap``). JSON-string attributes and bodies (the
captured content) are compared as JSON values, not as text.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIDES = ("official", "ours")
#: The capture modes: the variable unset, then each value util-genai 1.3b0 accepts.
MODES = ("unset", "NO_CONTENT", "SPAN_ONLY", "EVENT_ONLY", "SPAN_AND_EVENT")
CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
#: Variables either side (or the SDK: a sampler, attribute limits) could read, which would make
#: the runs differ by accident: none reaches the children.
_SCRUBBED_PREFIXES = ("OTEL_", "ANTHROPIC_OPEN_TELEMETRY")
_REPO = Path(__file__).resolve().parent.parent
OURS_PREFIX = "otel_budget."
MAX_TOKENS = "gen_ai.request.max_tokens"
TOKEN_TYPE = "gen_ai.token.type"
#: Set by otel-budget on a span whose request had no output cap, when it sends its own.
OUTPUT_ASSUMED = "otel_budget.cost.output_assumed"
_VARYING = "<varies>"
#: Attributes whose value depends on the run, not on the instrumentation: kept as present.
_VARYING_ATTRIBUTES = frozenset({
    "server.port", "url.full", "exception.stacktrace", "gen_ai.response.time_to_first_chunk",
})  # fmt: skip
_TIME_UNITS = frozenset({"s", "ms"})

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
EMBEDDING_MODEL = "text-embedding-3-small"
SYSTEM = "You are a terse assistant."
QUESTION = "What is the weather in Paris?"
CHAT_MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
ANTHROPIC_MESSAGES = [{"role": "user", "content": QUESTION}]
TOOL_CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
_WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
CHAT_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": _WEATHER_SCHEMA}}]  # fmt: skip
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather",
                    "description": "Current weather of a city.", "parameters": _WEATHER_SCHEMA}]  # fmt: skip
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Current weather of a city.",
                    "input_schema": _WEATHER_SCHEMA}]  # fmt: skip


# -- scenarios -----------------------------------------------------------------------------------
@dataclass
class Clients:
    """What a scenario drives: the fake server and the SDK clients pointed at it."""

    server: Any
    openai: Any
    anthropic: Any

    def aopenai(self) -> Any:
        """A new async client, for the event loop the scenario runs in."""
        import openai

        return openai.AsyncOpenAI(base_url=self.server.openai_base_url, api_key="k", max_retries=0)

    def aanthropic(self) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            base_url=self.server.anthropic_base_url, api_key="k", max_retries=0
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    provider: str  # "openai" or "anthropic"
    run: Callable[[Clients], Any]  # sync, or a coroutine function


SCENARIOS: dict[str, Scenario] = {}


def scenario(provider: str) -> Callable[[Callable[[Clients], Any]], Callable[[Clients], Any]]:
    def register(fn: Callable[[Clients], Any]) -> Callable[[Clients], Any]:
        SCENARIOS[fn.__name__] = Scenario(fn.__name__, provider, fn)
        return fn

    return register


def _behaviour(**kwargs: Any) -> Any:
    from otel_budget.testing import Behaviour

    return Behaviour(**kwargs)


# OpenAI chat completions
@scenario("openai")
def chat(c: Clients) -> None:
    c.openai.chat.completions.create(model=OPENAI_MODEL, messages=CHAT_MESSAGES)


@scenario("openai")
def chat_params(c: Clients) -> None:
    c.openai.chat.completions.create(
        model=OPENAI_MODEL, messages=CHAT_MESSAGES, max_completion_tokens=64, temperature=0.2,
        top_p=0.9, stop=["\n\n"], seed=7, frequency_penalty=0.1, presence_penalty=0.2,
    )  # fmt: skip


@scenario("openai")
def chat_tools(c: Clients) -> None:
    c.server.script(_behaviour(tool_calls=TOOL_CALLS))
    c.openai.chat.completions.create(model=OPENAI_MODEL, messages=CHAT_MESSAGES, tools=CHAT_TOOLS)


@scenario("openai")
def chat_n2(c: Clients) -> None:
    c.openai.chat.completions.create(model=OPENAI_MODEL, messages=CHAT_MESSAGES, n=2)


@scenario("openai")
def chat_error_4xx(c: Clients) -> None:
    c.server.script(_behaviour(status=400))
    c.openai.chat.completions.create(model=OPENAI_MODEL, messages=CHAT_MESSAGES)


@scenario("openai")
def chat_error_5xx(c: Clients) -> None:
    c.server.script(_behaviour(status=500))
    c.openai.chat.completions.create(model=OPENAI_MODEL, messages=CHAT_MESSAGES)


@scenario("openai")
def chat_stream(c: Clients) -> None:
    for _ in c.openai.chat.completions.create(
        model=OPENAI_MODEL, messages=CHAT_MESSAGES, stream=True
    ):
        pass


@scenario("openai")
def chat_stream_usage(c: Clients) -> None:
    stream = c.openai.chat.completions.create(
        model=OPENAI_MODEL, messages=CHAT_MESSAGES, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    with stream:
        for _ in stream:
            pass


@scenario("openai")
def chat_stream_closed(c: Clients) -> None:
    stream = c.openai.chat.completions.create(
        model=OPENAI_MODEL, messages=CHAT_MESSAGES, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()


@scenario("openai")
def chat_stream_tools(c: Clients) -> None:
    c.server.script(_behaviour(tool_calls=TOOL_CALLS))
    for _ in c.openai.chat.completions.create(
        model=OPENAI_MODEL, messages=CHAT_MESSAGES, tools=CHAT_TOOLS, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        pass


@scenario("openai")
async def chat_async(c: Clients) -> None:
    async with c.aopenai() as client:
        await client.chat.completions.create(model=OPENAI_MODEL, messages=CHAT_MESSAGES)


@scenario("openai")
async def chat_stream_async(c: Clients) -> None:
    async with c.aopenai() as client:
        stream = await client.chat.completions.create(
            model=OPENAI_MODEL, messages=CHAT_MESSAGES, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for _ in stream:
            pass


# OpenAI Responses
@scenario("openai")
def responses(c: Clients) -> None:
    c.openai.responses.create(model=OPENAI_MODEL, input=QUESTION)


@scenario("openai")
def responses_instructions(c: Clients) -> None:
    c.openai.responses.create(
        model=OPENAI_MODEL, instructions=SYSTEM, input=QUESTION, max_output_tokens=64,
        temperature=0.2,
    )  # fmt: skip


@scenario("openai")
def responses_tools(c: Clients) -> None:
    c.server.script(_behaviour(tool_calls=TOOL_CALLS))
    c.openai.responses.create(model=OPENAI_MODEL, input=QUESTION, tools=RESPONSES_TOOLS)


@scenario("openai")
def responses_stream(c: Clients) -> None:
    for _ in c.openai.responses.create(model=OPENAI_MODEL, input=QUESTION, stream=True):
        pass


@scenario("openai")
def responses_stream_helper(c: Clients) -> None:
    with c.openai.responses.stream(model=OPENAI_MODEL, instructions=SYSTEM, input=QUESTION) as s:
        for _ in s:
            pass
        s.get_final_response()


@scenario("openai")
def responses_error_5xx(c: Clients) -> None:
    c.server.script(_behaviour(status=500))
    c.openai.responses.create(model=OPENAI_MODEL, input=QUESTION)


@scenario("openai")
async def responses_async(c: Clients) -> None:
    async with c.aopenai() as client:
        await client.responses.create(model=OPENAI_MODEL, instructions=SYSTEM, input=QUESTION)


# OpenAI embeddings
@scenario("openai")
def embeddings(c: Clients) -> None:
    c.openai.embeddings.create(model=EMBEDDING_MODEL, input=["budgets", "telemetry"])


@scenario("openai")
def embeddings_error_4xx(c: Clients) -> None:
    c.server.script(_behaviour(status=400))
    c.openai.embeddings.create(model=EMBEDDING_MODEL, input="budgets")


@scenario("openai")
async def embeddings_async(c: Clients) -> None:
    async with c.aopenai() as client:
        await client.embeddings.create(
            model=EMBEDDING_MODEL, input="budgets", dimensions=8, encoding_format="float"
        )


# Anthropic messages
@scenario("anthropic")
def messages(c: Clients) -> None:
    c.anthropic.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, system=SYSTEM, messages=ANTHROPIC_MESSAGES
    )


@scenario("anthropic")
def messages_params(c: Clients) -> None:
    # (anthropic 2.x dropped temperature / top_p / top_k from the signature)
    c.anthropic.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=ANTHROPIC_MESSAGES,
        stop_sequences=["\n\nHuman:"], service_tier="auto",
    )  # fmt: skip


@scenario("anthropic")
def messages_tools(c: Clients) -> None:
    c.server.script(_behaviour(tool_calls=TOOL_CALLS))
    c.anthropic.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=ANTHROPIC_MESSAGES, tools=ANTHROPIC_TOOLS
    )


@scenario("anthropic")
def messages_cache(c: Clients) -> None:
    c.server.script(_behaviour(cached_tokens=1200, cache_creation_tokens=300))
    c.anthropic.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, system=SYSTEM, messages=ANTHROPIC_MESSAGES
    )


@scenario("anthropic")
def messages_thinking(c: Clients) -> None:
    c.server.script(_behaviour(thinking="The user wants the weather.", reasoning_tokens=12))
    c.anthropic.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=2048, messages=ANTHROPIC_MESSAGES,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )  # fmt: skip


@scenario("anthropic")
def messages_error_4xx(c: Clients) -> None:
    c.server.script(_behaviour(status=400))
    c.anthropic.messages.create(model=ANTHROPIC_MODEL, max_tokens=256, messages=ANTHROPIC_MESSAGES)


@scenario("anthropic")
def messages_error_5xx(c: Clients) -> None:
    c.server.script(_behaviour(status=500))
    c.anthropic.messages.create(model=ANTHROPIC_MODEL, max_tokens=256, messages=ANTHROPIC_MESSAGES)


@scenario("anthropic")
def messages_stream(c: Clients) -> None:
    for _ in c.anthropic.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=256, system=SYSTEM, messages=ANTHROPIC_MESSAGES,
        stream=True,
    ):  # fmt: skip
        pass


@scenario("anthropic")
def messages_stream_helper(c: Clients) -> None:
    with c.anthropic.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=256, system=SYSTEM, messages=ANTHROPIC_MESSAGES
    ) as stream:
        stream.get_final_message()


@scenario("anthropic")
def messages_stream_tools(c: Clients) -> None:
    c.server.script(_behaviour(tool_calls=TOOL_CALLS))
    with c.anthropic.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=ANTHROPIC_MESSAGES, tools=ANTHROPIC_TOOLS
    ) as stream:
        for _ in stream:
            pass


@scenario("anthropic")
async def messages_async(c: Clients) -> None:
    async with c.aanthropic() as client:
        await client.messages.create(
            model=ANTHROPIC_MODEL, max_tokens=256, system=SYSTEM, messages=ANTHROPIC_MESSAGES
        )


@scenario("anthropic")
async def messages_stream_async(c: Clients) -> None:
    async with c.aanthropic() as client, client.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=256, messages=ANTHROPIC_MESSAGES
    ) as stream:
        await stream.get_final_message()


# -- one side, in this process (the subprocess's entry point) -------------------------------------
def _instrument(side: str, providers: Mapping[str, Any]) -> Callable[[], None]:
    """Instrument the SDKs as ``side`` does; returns how to undo it."""
    if side == "official":
        from opentelemetry.instrumentation.genai.anthropic import AnthropicInstrumentor
        from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(**providers)
        AnthropicInstrumentor().instrument(**providers)

        def undo() -> None:
            OpenAIInstrumentor().uninstrument()
            AnthropicInstrumentor().uninstrument()

        return undo
    if side == "ours":
        from otel_budget import BudgetInstrumentor

        # A budget no scenario reaches; the default price book (genai-prices).
        BudgetInstrumentor().instrument(max_usd=1000, libraries=["openai", "anthropic"], **providers)
        return lambda: BudgetInstrumentor().uninstrument()
    raise ValueError(f"unknown side {side!r}")


def run_side(side: str, modes: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    """Run the scenarios under one side in this process, instrumenting it anew in each capture
    mode (the variable set before ``instrument()``): {mode: {scenario: raw telemetry}}. A mode
    given twice is run twice (``<mode>#2``: the harness checks that a repeat is identical).
    Sets the global OpenTelemetry providers: call it once per process."""
    import anthropic
    import openai
    from opentelemetry import _logs, metrics, trace
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import (
        Counter,
        Histogram,
        MeterProvider,
        ObservableGauge,
        UpDownCounter,
    )
    from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_budget.testing import FakeLLMServer

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logs = InMemoryLogRecordExporter()
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    instruments = (Histogram, Counter, UpDownCounter, ObservableGauge)
    delta = dict.fromkeys(instruments, AggregationTemporality.DELTA)
    reader = InMemoryMetricReader(preferred_temporality=delta)  # type: ignore[arg-type]
    meter_provider = MeterProvider(metric_readers=[reader])
    # Global too: whatever either side (or the anthropic SDK's own span) takes from the API.
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    _logs.set_logger_provider(logger_provider)
    providers = {"tracer_provider": tracer_provider, "meter_provider": meter_provider,
                 "logger_provider": logger_provider}  # fmt: skip
    tracer = tracer_provider.get_tracer("tests.parity")
    out: dict[str, Any] = {}
    for mode in modes:
        if mode == "unset":
            os.environ.pop(CAPTURE_ENV, None)
        else:
            os.environ[CAPTURE_ENV] = mode
        # A fresh server per mode: its ids (response ids) are the same in every run.
        with FakeLLMServer() as server:
            clients = Clients(
                server=server,
                openai=openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0),
                anthropic=anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="k",
                                              max_retries=0),
            )  # fmt: skip
            undo = _instrument(side, providers)
            reader.get_metrics_data()  # start every scenario from an empty delta
            runs: dict[str, Any] = {}
            for name in names:
                runs[name] = _run(SCENARIOS[name], clients, tracer)
                runs[name]["spans"] = [_span(s) for s in spans.get_finished_spans()]
                runs[name]["logs"] = [
                    _log(r, spans.get_finished_spans()) for r in logs.get_finished_logs()
                ]
                runs[name]["metrics"] = _metrics(reader.get_metrics_data())
                spans.clear()
                logs.clear()
            undo()
            clients.openai.close()
            clients.anthropic.close()
            out[mode if mode not in out else f"{mode}#2"] = runs
    return out


def _run(sc: Scenario, clients: Clients, tracer: Any) -> dict[str, Any]:
    outcome, error = "ok", None
    try:
        with tracer.start_as_current_span("app"):
            result = sc.run(clients)
            if asyncio.iscoroutine(result):
                asyncio.run(result)
    except Exception as exc:  # the scenario's outcome is part of what is compared
        outcome = f"{type(exc).__module__}.{type(exc).__qualname__}"
        error = str(exc)[:500]  # for the reader; not compared (it names request ids)
    clients.server.wait_idle()
    return {"outcome": outcome, "error": error}


def _plain(value: Any) -> Any:
    """An attribute / body value as JSON: tuples as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _span(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "span_id": span.context.span_id,  # only to resolve parents; dropped by normalise
        "parent_id": span.parent.span_id if span.parent is not None else None,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope else None,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "status_description": span.status.description,
        "attributes": _plain(dict(span.attributes or {})),
        "events": [{"name": e.name, "attributes": _plain(dict(e.attributes or {}))}
                   for e in span.events],  # fmt: skip
    }


def _log(data: Any, spans: Sequence[Any]) -> dict[str, Any]:
    record = data.log_record
    owner = next((s.name for s in spans if s.context.span_id == record.span_id), None)
    return {
        "event_name": record.event_name,
        "span": owner,
        "severity": record.severity_number.name if record.severity_number is not None else None,
        "body": _plain(record.body),
        "attributes": _plain(dict(record.attributes or {})),
        "scope": data.instrumentation_scope.name if data.instrumentation_scope else None,
    }


def _metrics(data: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for resource_metrics in (data.resource_metrics if data is not None else ()):
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points = []
                for point in metric.data.data_points:
                    entry: dict[str, Any] = {"attributes": _plain(dict(point.attributes or {}))}
                    for field in ("count", "sum", "bucket_counts", "explicit_bounds", "value"):
                        if hasattr(point, field):
                            entry[field] = _plain(getattr(point, field))
                    points.append(entry)
                out.append({
                    "name": metric.name, "unit": metric.unit,
                    "description": metric.description, "scope": scope_metrics.scope.name,
                    "points": points,
                })  # fmt: skip
    return out


def main(argv: Sequence[str]) -> int:
    """``python -m tests.parity SIDE OUT.json [MODE,MODE,...] [SCENARIO ...]``"""
    side, path, *rest = argv
    modes = rest[0].split(",") if rest else list(MODES)
    result = run_side(side, modes, rest[1:] or list(SCENARIOS))
    Path(path).write_text(json.dumps(result, default=repr))
    return 0


# -- running both sides (from the tests) -----------------------------------------------------------
def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO / "src"), str(_REPO)])
    return env


def run_subprocess(
    side: str, modes: Sequence[str], names: Sequence[str] = (), timeout: float = 180
) -> dict[str, Any]:
    """One side in a fresh interpreter: {mode: {scenario: raw telemetry}}."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        proc = subprocess.run(
            [sys.executable, "-m", "tests.parity", side, str(path), ",".join(modes), *names],
            cwd=_REPO, env=child_environment(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"parity run {side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(path.read_text())
        return result


def collect(
    sides: Sequence[str] = SIDES, modes: Sequence[str] = MODES, names: Sequence[str] = ()
) -> dict[tuple[str, str], dict[str, Any]]:
    """Every side in every mode, the sides in parallel: {(side, mode): {scenario: raw}}."""
    with ThreadPoolExecutor(max_workers=len(sides)) as pool:
        results = list(pool.map(lambda side: run_subprocess(side, modes, names), sides))
    return {(side, mode): runs for side, result in zip(sides, results, strict=True)
            for mode, runs in result.items()}  # fmt: skip


# -- normalising and comparing -------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    """A JSON-string attribute (captured content) as its value: compared as JSON, not text."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in attributes.items():
        if key.startswith(OURS_PREFIX):
            continue
        out[key] = _VARYING if key in _VARYING_ATTRIBUTES else _json_value(value)
    return out


def _keyed(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Entries keyed by name, ``#n`` telling repeated names apart in a stable order."""
    out: dict[str, Any] = {}
    seen: dict[str, int] = {}
    for name, value in sorted(items, key=lambda item: (item[0], json.dumps(item[1], sort_keys=True))):
        n = seen.get(name, 0)
        seen[name] = n + 1
        out[f"{name}#{n}" if n else name] = value
    return out


def normalise(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What is compared of one scenario's raw telemetry (see the module docstring)."""
    by_id = {s["span_id"]: s for s in raw["spans"]}
    spans = []
    for s in raw["spans"]:
        parent = by_id.get(s["parent_id"])
        spans.append((s["name"], {
            "kind": s["kind"],
            "status": s["status"],
            "status_description": s["status_description"],
            "parent": parent["name"] if parent is not None else None,
            "attributes": _attributes(s["attributes"]),
            "events": _keyed(
                (e["name"], _attributes(e["attributes"])) for e in s["events"]
                if not e["name"].startswith(OURS_PREFIX)
            ),
        }))  # fmt: skip
    logs = [
        (r["event_name"] or "<no event name>", {
            "span": r["span"], "severity": r["severity"], "body": _json_value(r["body"]),
            "attributes": _attributes(r["attributes"]),
        })
        for r in raw["logs"]
    ]  # fmt: skip
    metrics = []
    for m in raw["metrics"]:
        if m["name"].startswith(OURS_PREFIX):
            continue
        timed = m["unit"] in _TIME_UNITS
        # Points keyed by token type (one point per type and scenario), so that a difference
        # in their attributes reads attribute by attribute.
        points = _keyed(
            (str(p["attributes"].get(TOKEN_TYPE, "point")), {
                k: (_attributes(v) if k == "attributes" else v) for k, v in p.items()
                if not (timed and k in ("sum", "bucket_counts", "value"))
            })
            for p in m["points"]
        )  # fmt: skip
        metrics.append((m["name"], {"unit": m["unit"], "points": points}))
    return {
        "outcome": raw["outcome"],
        "spans": _keyed(spans),
        "logs": _keyed(logs),
        "metrics": _keyed(metrics),
    }


def apply_documented_cap(official: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """``ours`` with ``gen_ai.request.max_tokens`` removed from each span where otel-budget
    injected the output cap (the request had none: the official span has no max_tokens and
    ours says ``otel_budget.cost.output_assumed``), and from that span's operation-details
    event: the documented difference."""
    ours = json.loads(json.dumps(ours))
    official_spans = {s["span_id"]: s for s in official["spans"]}
    official_by_name = {}
    for s in official_spans.values():
        official_by_name.setdefault(s["name"], s)
    capped: set[str] = set()
    for span in ours["spans"]:
        attributes = span["attributes"]
        theirs = official_by_name.get(span["name"])
        if (
            MAX_TOKENS in attributes
            and attributes.get(OUTPUT_ASSUMED) is True
            and (theirs is None or MAX_TOKENS not in theirs["attributes"])
        ):
            del attributes[MAX_TOKENS]
            capped.add(span["name"])
    # The operation-details event repeats its span's attributes: the same injected cap.
    for record in ours["logs"]:
        if record["span"] in capped:
            record["attributes"].pop(MAX_TOKENS, None)
    return ours


def _diff(path: str, a: Any, b: Any, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            sub = f"{path}/{key}" if path else str(key)
            if key not in b:
                out.append(f"- {sub}: official {_show(a[key])} | ours: missing")
            elif key not in a:
                out.append(f"+ {sub}: ours {_show(b[key])} | official: missing")
            else:
                _diff(sub, a[key], b[key], out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(f"{path}[{i}]", x, y, out)
    elif a != b or type(a) is not type(b):
        out.append(f"~ {path}: official {_show(a)} | ours {_show(b)}")


def _show(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


def compare(official: Mapping[str, Any], ours: Mapping[str, Any]) -> list[str]:
    """The differences between two raw runs of one scenario, one readable line each (``-``:
    only the official has it, ``+``: only ours, ``~``: both, different); empty when equal."""
    out: list[str] = []
    _diff("", normalise(official), normalise(apply_documented_cap(official, ours)), out)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
