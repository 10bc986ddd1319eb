"""Per-call overhead of otel-budget's instrumentation + enforcement on a real ``openai`` SDK
call over loopback, against the bare call and the official GenAI instrumentation, one run.

    bash bench/setup.sh                             # a venv with the official instrumentation
    /work/bench-venv/bin/python bench/bench_instrumentation.py [--rounds 15 --calls 200]

Cases, interleaved round by round (medians of the per-round means, in µs per call):

* ``bare``: ``client.chat.completions.create`` uninstrumented;
* ``otel-budget``: BudgetInstrumentor (span + projection + reservation + commit + root
  breakdown), with a budget far above what the run spends, so nothing is refused;
* ``genai-openai``: ``opentelemetry-instrumentation-genai-openai`` (the official GenAI
  instrumentation, which enforces nothing), when installed.

For sync, async and streaming (fully consumed, usage included). The fake server runs in a
child process so that it does not compete with the measured process for the GIL; every
call is the same request. Each case's wrapper is installed once and swapped in per round.

Times are the calling thread's CPU time per call (``time.thread_time``): the work the
application pays for, which is what an instrumentation adds; the network wait, identical in
every case, is left out, and with it most of the noise of a shared machine (loopback round
trips varied 2-3x between runs here). ``--wall`` measures wall-clock time instead.
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
    return {f"{owner.__name__}.{name}": owner.__dict__[name] for owner, name in targets}


def install(targets: Sequence[tuple[Any, str]], saved: dict[str, Any]) -> None:
    for owner, name in targets:
        setattr(owner, name, saved[f"{owner.__name__}.{name}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of thread CPU time")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.wall else time.thread_time

    import openai
    from openai.resources.chat.completions import AsyncCompletions, Completions

    targets = [(Completions, "create"), (AsyncCompletions, "create")]
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoopExporter(), max_queue_size=1 << 16))
    trace.set_tracer_provider(provider)

    cases: dict[str, dict[str, Any]] = {"bare": capture(targets)}
    from otel_budget import BudgetInstrumentor

    ours = BudgetInstrumentor()
    ours.instrument(max_usd=1_000_000, tracer_provider=provider, libraries=("openai",))
    cases["otel-budget"] = capture(targets)
    # Unwrap our wrappers (keeping the processor registered) so another can be measured.
    install(targets, cases["bare"])
    try:
        from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor

        official = OpenAIInstrumentor()
        official.instrument(tracer_provider=provider)
        cases["genai-openai"] = capture(targets)
        install(targets, cases["bare"])
    except ImportError:
        print("opentelemetry-instrumentation-genai-openai not installed: case skipped")

    # A safety net, not a deadline: sync, async and stream per case, up to 50 ms a call on a
    # loaded machine.
    lifetime = 60 + args.rounds * args.calls * len(cases) * 3 * 0.05
    server, base_url = start_server(lifetime)
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    aclient = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
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

    kinds: dict[str, Callable[[int], None]] = {
        "sync": lambda n: [sync_call() for _ in range(n)] and None,
        "async": lambda n: loop.run_until_complete(async_many(n)),
        "stream": lambda n: [stream_call() for _ in range(n)] and None,
    }
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

    summary: dict[str, Any] = {"rounds": args.rounds, "calls_per_round": args.calls, "cases": {}}
    for kind_name, per_case in results.items():
        bare = statistics.median(per_case["bare"])
        row = {"bare_us": round(bare, 1)}
        for name, values in per_case.items():
            if name == "bare":
                continue
            median = statistics.median(values)
            row[f"{name}_us"] = round(median, 1)
            row[f"{name}_overhead_us"] = round(median - bare, 1)
            row[f"{name}_ratio"] = round(median / bare, 3)
        summary["cases"][kind_name] = row
        summary["clock"] = "wall" if args.wall else "thread_cpu"
        print(kind_name, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    provider.shutdown()
    os.environ.pop("OTEL_BUDGET_MAX_USD", None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
