"""Instructions per call of each instrumentation's own wrapper work (deterministic).

    bash bench/instr_count_wrapper.sh [case ...]   # runs this under valgrind --tool=callgrind
    PYTHONPATH=src python bench/instr_count_wrapper.py time [cases] [calls] [rounds]

Cases: ``ours`` (BudgetInstrumentor: span, projection, reservation, settle), ``official``
(opentelemetry-instrumentation-genai-openai, when installed) and ``wrapt`` (a hand-written
wrapt span with the three request and three response attributes). Each wrapper is called
around a stub ``chat.completions.create`` that returns a prebuilt ``ChatCompletion``: no
HTTP, no SDK request building, only what the instrumentation itself adds per call. Two more
cases isolate parts of ``ours``: ``request`` (reading the request, the input estimate and the
projection's two quotes) and ``response`` (reading the body, pricing its usage); the rest of
``ours`` is the span (SDK) and the ledger (reserve, settle, scopes, report, processor).

Under callgrind (``count`` mode) the process sets up with instrumentation off, blocks on
stdin, the driver switches callgrind on and writes a line, the process runs ``calls`` wrapper
calls and exits: the total divided by ``calls`` is the work per call, repeatable whatever the
machine's load. ``time`` mode prints thread-CPU medians instead, interleaved round by round.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

sys.path.insert(0, str(Path(__file__).parent))
import bench_instrumentation as B  # noqa: E402

Wrapper = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Any]


def build(cases: list[str]) -> tuple[TracerProvider, dict[str, Wrapper], Any, Callable[..., Any]]:
    import openai
    from openai.resources.chat.completions import Completions
    from openai.types.chat import ChatCompletion

    provider = TracerProvider()
    # No export timer: the worker exports when a batch is full, so what it does during the
    # counted calls depends on the calls alone, not on how long they take under valgrind.
    provider.add_span_processor(BatchSpanProcessor(
        B.NoopExporter(), max_queue_size=1 << 16, schedule_delay_millis=3_600_000
    ))  # fmt: skip
    trace.set_tracer_provider(provider)
    client = openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0)
    body = ChatCompletion.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
        "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Hamlet avenges his father. Everyone dies."}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40},
    })  # fmt: skip

    def stub(*args: Any, **kwargs: Any) -> Any:
        return body

    bare = Completions.__dict__["create"]
    wrappers: dict[str, Wrapper] = {}
    if "ours" in cases:
        from otel_budget import BudgetInstrumentor

        BudgetInstrumentor().instrument(
            max_usd=1_000_000, tracer_provider=provider, libraries=("openai",)
        )
        wrappers["ours"] = Completions.__dict__["create"]._self_wrapper
        Completions.create = bare  # type: ignore[method-assign]
    if "official" in cases:
        from opentelemetry.instrumentation.genai.openai import (  # type: ignore[import-not-found]
            OpenAIInstrumentor,
        )

        OpenAIInstrumentor().instrument(tracer_provider=provider)
        wrappers["official"] = Completions.__dict__["create"]._self_wrapper
        Completions.create = bare  # type: ignore[method-assign]
    if "wrapt" in cases:
        tracer = provider.get_tracer("hand")

        def hand(wrapped: Any, instance: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            with tracer.start_as_current_span(
                "chat " + kwargs["model"], kind=trace.SpanKind.CLIENT, attributes={
                    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": kwargs["model"]},
            ) as span:  # fmt: skip
                response = wrapped(*args, **kwargs)
                usage = response.usage
                span.set_attributes({
                    "gen_ai.response.model": response.model,
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                })  # fmt: skip
                return response

        wrappers["wrapt"] = hand
    if "request" in cases or "response" in cases:
        from types import SimpleNamespace

        from otel_budget.costing import price_call
        from otel_budget.instrumentation.openai.request import chat_request
        from otel_budget.instrumentation.openai.response import read_body
        from otel_budget.pricing import PriceBook, TokenUsage

        book = PriceBook()

        def parts_request(wrapped: Any, instance: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            request = chat_request(instance, kwargs)
            tokens = request.estimate().tokens
            for out in (64, 1):  # the maximum and the minimum quote of the projection
                book.quote(request.provider, request.model,
                           TokenUsage(input_tokens=tokens, output_tokens=out),
                           server_address=request.server_address)  # fmt: skip
            return request

        call = SimpleNamespace(request=SimpleNamespace(content=None), processor=None,
                               metric_attributes={})  # fmt: skip

        def parts_response(wrapped: Any, instance: Any, args: Any, kwargs: dict[str, Any]) -> Any:
            usage, attributes, _ = read_body(call, wrapped(), "chat")  # type: ignore[arg-type]
            assert usage is not None
            price_call(
                book, "openai", usage, (attributes.get("gen_ai.response.model"), "gpt-4o-mini")
            )
            return usage

        wrappers["request"], wrappers["response"] = parts_request, parts_response
    return provider, wrappers, client.chat.completions, stub


def request() -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": B.MESSAGES, "max_tokens": 64}


def count(case: str, calls: int) -> None:
    _, wrappers, instance, stub = build([case])
    wrapper = wrappers[case]
    for _ in range(200):  # warm-up: imports, caches
        wrapper(stub, instance, (), request())
    print("ready", flush=True)
    sys.stdin.readline()  # blocks (no instructions) while the driver switches callgrind on
    for _ in range(calls):
        wrapper(stub, instance, (), request())
    os._exit(0)  # skip shutdown: its work is not per call


def timed(cases: list[str], calls: int, rounds: int) -> None:
    provider, wrappers, instance, stub = build(cases)
    for wrapper in wrappers.values():
        for _ in range(200):
            wrapper(stub, instance, (), request())
    results: dict[str, list[float]] = {case: [] for case in wrappers}
    for _ in range(rounds):
        for case, wrapper in wrappers.items():
            start = time.thread_time_ns()
            for _ in range(calls):
                wrapper(stub, instance, (), request())
            results[case].append((time.thread_time_ns() - start) / calls / 1000)
    for case, values in results.items():
        print(f"{case:10s} median {statistics.median(values):7.1f} us  min {min(values):7.1f}")
    provider.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "count":
        count(sys.argv[2], int(sys.argv[3]))
    else:
        names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ours", "official", "wrapt"]
        timed(names, int(sys.argv[3]) if len(sys.argv) > 3 else 2000,
              int(sys.argv[4]) if len(sys.argv) > 4 else 9)  # fmt: skip
