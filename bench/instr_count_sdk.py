"""Instructions per real SDK call over loopback, bare and under each instrumentation.

    bash bench/instr_count_sdk.sh [kind ...]   # runs this under valgrind --tool=callgrind

Kinds: ``sync`` (``chat.completions.create``), ``async`` (the same on ``AsyncOpenAI``) and
``stream`` (``stream=True``, read to the end, usage included in every case). Cases: ``bare`` (the SDK
alone), ``ours`` (BudgetInstrumentor: span, projection, reservation, settlement, its HTTP
attempt hooks), ``official`` (``opentelemetry-instrumentation-genai-openai``) and ``wrapt``
(a hand-written wrapt span). Unlike ``instr_count_wrapper.py``, which calls each wrapper
around a stub, every call here is the real SDK's: request building, HTTP to the fake
provider (a child process, not counted), parsing, and whatever each instrumentation adds on
that path. A case's overhead is its count minus ``bare``'s.

The process sets up one case with callgrind's counting off, warms up, blocks on stdin while
the driver switches counting on, makes ``calls`` calls and exits: the total over ``calls`` is
the client's user-space work per call (the kernel's socket work is not counted).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

sys.path.insert(0, str(Path(__file__).parent))
import bench_instrumentation as B  # noqa: E402


def setup(case: str) -> TracerProvider:
    provider = TracerProvider()
    # No export timer: what the batch worker does depends on the calls alone.
    provider.add_span_processor(BatchSpanProcessor(
        B.NoopExporter(), max_queue_size=1 << 16, schedule_delay_millis=3_600_000
    ))  # fmt: skip
    trace.set_tracer_provider(provider)
    if case == "ours":
        from otel_budget import BudgetInstrumentor

        BudgetInstrumentor().instrument(
            max_usd=1_000_000, tracer_provider=provider, libraries=("openai",)
        )
    elif case == "official":
        from opentelemetry.instrumentation.genai.openai import (  # type: ignore[import-not-found]
            OpenAIInstrumentor,
        )

        OpenAIInstrumentor().instrument(tracer_provider=provider)
    elif case == "wrapt":
        import wrapt
        from openai.resources.chat.completions import AsyncCompletions, Completions

        sync, asynchronous = B.wrapt_span(provider.get_tracer("bench.wrapt"), "openai")
        wrapt.wrap_function_wrapper(Completions, "create", sync)
        wrapt.wrap_function_wrapper(AsyncCompletions, "create", asynchronous)
    elif case != "bare":
        raise SystemExit(f"unknown case {case!r}")
    return provider


def main() -> None:
    case, kind, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    _server, base_url = B.start_server(3600.0)  # (it stops when our stdin pipe closes)
    setup(case)
    import openai

    request: dict[str, Any] = {"model": "gpt-4o-mini", "messages": B.MESSAGES, "max_tokens": 64}
    if kind == "async":
        client: Any = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
        loop = asyncio.new_event_loop()

        def run(n: int) -> None:
            async def many() -> None:
                for _ in range(n):
                    await client.chat.completions.create(**request)

            loop.run_until_complete(many())
    else:
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        if kind == "stream":
            # Usage included in every case (as bench_instrumentation.py asks for it): the SDK
            # then parses the same chunks whatever the instrumentation (ours would ask for it
            # otherwise, the others not, and its parsing would count as our overhead).
            request["stream"] = True
            request["stream_options"] = {"include_usage": True}

            def run(n: int) -> None:
                for _ in range(n):
                    for _chunk in client.chat.completions.create(**request):
                        pass
        else:

            def run(n: int) -> None:
                for _ in range(n):
                    client.chat.completions.create(**request)

    run(100)  # warm-up: imports, connections, caches
    print("ready", flush=True)
    sys.stdin.readline()  # blocks (no instructions) while the driver switches callgrind on
    run(calls)
    os._exit(0)  # skip shutdown (and the server's): its work is not per call


if __name__ == "__main__":
    main()
