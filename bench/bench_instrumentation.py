"""Per-call overhead of otel-budget's instrumentation + enforcement on real ``openai`` and
``anthropic`` SDK calls over loopback, against the bare call, the official GenAI
instrumentations and a hand-written wrapt span, in one run.

    PYTHONPATH=src python bench/bench_instrumentation.py [--rounds 15 --calls 200 --json out]

Cases, interleaved round by round (medians of the per-round means, in µs per call):

* ``bare``: the SDK method uninstrumented;
* ``otel-budget``: BudgetInstrumentor (span + projection + reservation + commit + root
  breakdown), with a budget far above what the run spends, so nothing is refused;
* ``genai-official``: ``opentelemetry-instrumentation-genai-openai`` and ``-genai-anthropic``
  (the official GenAI instrumentations, which enforce nothing), when installed;
* ``wrapt-span``: a hand-written ``wrapt`` wrapper starting one CLIENT span with the three
  request attributes and setting the response model and token counts (the floor of any
  instrumentation: the stretch target is otel-budget within 1.2x its overhead).

Kinds: openai ``sync``, ``async`` and ``stream`` (fully consumed, usage included), anthropic
``anthropic`` (sync) and ``anthropic_stream``. The fake server runs in a child process so
that it does not compete with the measured process for the GIL; every call is the same
request. Each case's wrappers (the SDK methods and the HTTP attempt hooks) are installed once
and swapped in per round, so ``bare`` runs no wrapper at all.

Times are the calling thread's CPU time per call (``time.thread_time``): the work the
application pays for, which is what an instrumentation adds; the network wait, identical in
every case, is left out, and with it most of the noise of a shared machine (loopback round
trips varied 2-3x between runs here). ``--wall`` measures wall-clock time instead.
``*_vs_official`` is otel-budget's overhead over the official one's (target: at most 0.8),
``*_vs_wrapt`` over the hand-written span's (stretch: within 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

SERVER = """
import sys, time
from otel_budget.testing import FakeLLMServer
server = FakeLLMServer(max_lifetime_s=float(sys.argv[1])).start()
print(server.openai_base_url, flush=True)
sys.stdin.read()
server.stop()
"""
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Summarise the plot of Hamlet in two sentences."},
]


class NoopExporter(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def start_server(lifetime: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(lifetime)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def capture(targets: Sequence[tuple[Any, str]]) -> dict[str, Any]:
    return {f"{owner.__qualname__}.{name}": owner.__dict__[name] for owner, name in targets}


def install(targets: Sequence[tuple[Any, str]], saved: dict[str, Any]) -> None:
    for owner, name in targets:
        setattr(owner, name, saved[f"{owner.__qualname__}.{name}"])


def wrapt_span(tracer: Any, provider_name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The hand-written baseline: one CLIENT span per call, request attributes at start,
    response model and token counts at the end (a stream's when it is exhausted)."""
    import wrapt

    def start(kwargs: dict[str, Any]) -> Any:
        model = kwargs.get("model")
        return tracer.start_span(f"chat {model}", kind=trace.SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider_name,
            "gen_ai.request.model": model,
        })  # fmt: skip

    def finish(span: Any, response: Any) -> None:
        usage = getattr(response, "usage", None)
        if usage is not None:
            inp = getattr(usage, "prompt_tokens", None) or getattr(usage, "input_tokens", 0)
            out = getattr(usage, "completion_tokens", None) or getattr(usage, "output_tokens", 0)
            span.set_attributes({"gen_ai.response.model": getattr(response, "model", ""),
                                 "gen_ai.usage.input_tokens": inp,
                                 "gen_ai.usage.output_tokens": out})  # fmt: skip
        span.end()

    class Stream(wrapt.ObjectProxy):  # type: ignore[misc]
        def __init__(self, stream: Any, span: Any) -> None:
            super().__init__(stream)
            self._self_span = span

        def __iter__(self) -> Any:
            last = None
            for chunk in self.__wrapped__:
                last = chunk if getattr(chunk, "usage", None) is not None else last
                yield chunk
            finish(self._self_span, last)

    def sync(wrapped: Any, instance: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        span = start(kwargs)
        with trace.use_span(span, end_on_exit=False):
            result = wrapped(*args, **kwargs)
        if kwargs.get("stream"):
            return Stream(result, span)
        finish(span, result)
        return result

    async def asynchronous(wrapped: Any, instance: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        span = start(kwargs)
        with trace.use_span(span, end_on_exit=False):
            result = await wrapped(*args, **kwargs)
        finish(span, result)
        return result

    return sync, asynchronous


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.wall else time.thread_time

    import anthropic
    import openai
    from anthropic._base_client import AsyncAPIClient as AnthropicAsyncAPIClient
    from anthropic._base_client import SyncAPIClient as AnthropicSyncAPIClient
    from anthropic.resources.messages import AsyncMessages, Messages
    from openai._base_client import AsyncAPIClient, SyncAPIClient
    from openai.resources.chat.completions import AsyncCompletions, Completions

    # Every method an instrumentation wraps on the measured paths, swapped per case.
    targets = [
        (Completions, "create"), (AsyncCompletions, "create"), (Messages, "create"),
        (AsyncMessages, "create"), (SyncAPIClient, "_send_request"),
        (AsyncAPIClient, "_send_request"), (AnthropicSyncAPIClient, "_attempt_request"),
        (AnthropicAsyncAPIClient, "_attempt_request"),
    ]  # fmt: skip
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 16))
    trace.set_tracer_provider(provider)

    cases: dict[str, dict[str, Any]] = {"bare": capture(targets)}
    from otel_budget import BudgetInstrumentor

    ours = BudgetInstrumentor()
    ours.instrument(max_usd=1_000_000, tracer_provider=provider, libraries=("openai", "anthropic"))
    cases["otel-budget"] = capture(targets)
    # Unwrap our wrappers (keeping the processor registered) so another can be measured.
    install(targets, cases["bare"])
    try:
        from opentelemetry.instrumentation.genai.anthropic import AnthropicInstrumentor
        from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor

        OpenAIInstrumentor().instrument(tracer_provider=provider)
        AnthropicInstrumentor().instrument(tracer_provider=provider)
        cases["genai-official"] = capture(targets)
        install(targets, cases["bare"])
    except ImportError:
        print("the official genai instrumentations are not installed: case skipped")
    import wrapt

    tracer = provider.get_tracer("bench.wrapt")
    for owner, provider_name in ((Completions, "openai"), (AsyncCompletions, "openai"),
                                 (Messages, "anthropic"), (AsyncMessages, "anthropic")):  # fmt: skip
        sync, asynchronous = wrapt_span(tracer, provider_name)
        wrapper = asynchronous if owner in (AsyncCompletions, AsyncMessages) else sync
        wrapt.wrap_function_wrapper(owner, "create", wrapper)
    cases["wrapt-span"] = capture(targets)
    install(targets, cases["bare"])

    kinds_n = 5
    # A safety net, not a deadline: up to 50 ms a call on a loaded machine.
    lifetime = 60 + args.rounds * args.calls * len(cases) * kinds_n * 0.05
    server, base_url = start_server(lifetime)
    anthropic_url = base_url.rsplit("/v1", 1)[0]
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    claude = anthropic.Anthropic(base_url=anthropic_url, api_key="bench", max_retries=0)
    loop = asyncio.new_event_loop()

    def sync_call() -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=64)

    def stream_call() -> None:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=64, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for _ in stream:
            pass

    async def async_many(n: int) -> None:
        for _ in range(n):
            await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=64)

    def anthropic_call() -> None:
        claude.messages.create(model="claude-3-5-haiku-latest", messages=MESSAGES[1:],
                               system=MESSAGES[0]["content"], max_tokens=64)  # fmt: skip

    def anthropic_stream_call() -> None:
        stream = claude.messages.create(
            model="claude-3-5-haiku-latest", messages=MESSAGES[1:], system=MESSAGES[0]["content"],
            max_tokens=64, stream=True,
        )  # fmt: skip
        for _ in stream:
            pass

    kinds: dict[str, Callable[[int], None]] = {
        "sync": lambda n: [sync_call() for _ in range(n)] and None,
        "async": lambda n: loop.run_until_complete(async_many(n)),
        "stream": lambda n: [stream_call() for _ in range(n)] and None,
        "anthropic": lambda n: [anthropic_call() for _ in range(n)] and None,
        "anthropic_stream": lambda n: [anthropic_stream_call() for _ in range(n)] and None,
    }
    assert len(kinds) == kinds_n
    results: dict[str, dict[str, list[float]]] = {k: {c: [] for c in cases} for k in kinds}
    try:
        for _name, saved in cases.items():  # warm-up: connections, caches, imports
            install(targets, saved)
            for kind in kinds.values():
                kind(20)
        for _ in range(args.rounds):
            for kind_name, kind in kinds.items():
                for name, saved in cases.items():
                    install(targets, saved)
                    t0 = clock()
                    kind(args.calls)
                    results[kind_name][name].append((clock() - t0) / args.calls * 1e6)
    finally:
        install(targets, cases["bare"])
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)

    summary: dict[str, Any] = {
        "rounds": args.rounds, "calls_per_round": args.calls,
        "clock": "wall" if args.wall else "thread_cpu", "cases": {},
    }  # fmt: skip
    for kind_name, per_case in results.items():
        bare = statistics.median(per_case["bare"])
        row: dict[str, float] = {"bare_us": round(bare, 1)}
        overhead: dict[str, float] = {}
        for name, values in per_case.items():
            if name == "bare":
                continue
            median = statistics.median(values)
            overhead[name] = median - bare
            row[f"{name}_us"] = round(median, 1)
            row[f"{name}_overhead_us"] = round(median - bare, 1)
        ours_overhead = overhead["otel-budget"]
        for name, label in (("genai-official", "vs_official"), ("wrapt-span", "vs_wrapt")):
            if overhead.get(name, 0) > 0:
                row[f"otel-budget_{label}"] = round(ours_overhead / overhead[name], 2)
        summary["cases"][kind_name] = row
        print(kind_name, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    provider.shutdown()
    os.environ.pop("OTEL_BUDGET_MAX_USD", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
