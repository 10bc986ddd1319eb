"""A prompt-cache hit against the live call it replaces, real ``openai`` SDK over loopback.

    PYTHONPATH=src python bench/bench_cache.py [--rounds 9 --calls 100 --json out]

Cases, interleaved round by round, every call the same request (``temperature=0``):

* ``live``: BudgetInstrumentor with the cache on, each call inside ``otel_budget.cache.
  disabled()`` (the ordinary metered call: reserve, send, settle);
* ``hit``: the same call answered from the in-memory cache (the SDK parses the cached body;
  no request, no ledger operation);
* ``redis_hit``: answered from a Redis cache on loopback (when ``redis-server`` is
  installed: one ``GETRANGE`` round trip instead of the provider's);
* ``live_stream`` / ``hit_stream``: the same with ``stream=True``, fully consumed.

Per call: the wall-clock latency (median and p99 of every call) and the calling thread's CPU
time (``time.thread_time``). The fake provider runs in a child process (``FakeLLMServer``,
no added latency: a real provider's hundreds of milliseconds come on top of ``live``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
import bench_instrumentation as B  # noqa: E402


def _measure(call: Callable[[], Any], calls: int, walls: list[float], cpus: list[float]) -> None:
    for _ in range(calls):
        w, c = time.perf_counter(), time.thread_time()
        call()
        cpus.append(time.thread_time() - c)
        walls.append(time.perf_counter() - w)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import openai

    from otel_budget import BudgetInstrumentor
    from otel_budget.cache import MemoryCache, ResponseCache, disabled

    proc, base_url = B.start_server(600)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(B.NoopExporter()))
    trace.set_tracer_provider(provider)
    memory = ResponseCache(MemoryCache())
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(max_usd=1000, cache=memory, tracer_provider=provider)
    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0)
    request = {"model": "gpt-4o-mini", "messages": B.MESSAGES, "temperature": 0}

    def create() -> Any:
        return client.chat.completions.create(**request)

    def stream() -> Any:
        return list(client.chat.completions.create(**request, stream=True))

    def live(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with disabled():
                return fn()

        return run

    cases: dict[str, Callable[[], Any]] = {
        "live": live(create), "hit": create, "live_stream": live(stream), "hit_stream": stream,
    }  # fmt: skip
    redis_srv = None
    redis_cache = None
    try:
        from tests.redis_server import REDIS_SERVER, RedisServer

        if REDIS_SERVER is not None:
            from otel_budget.cache.redis import RedisCache

            redis_srv = RedisServer().start()
            redis_cache = ResponseCache(RedisCache(redis_srv.url))
    except Exception as exc:  # pragma: no cover - no redis-server here
        print(f"redis case skipped: {exc}", file=sys.stderr)

    create()  # the entries every hit case reads
    stream()
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    if redis_cache is not None:
        walls["redis_hit"], cpus["redis_hit"] = [], []
    for _ in range(args.rounds):
        for name, call in cases.items():
            _measure(call, args.calls, walls[name], cpus[name])
        if redis_cache is not None:
            instrumentor.instrument(max_usd=1000, cache=redis_cache, tracer_provider=provider)
            create()
            redis_cache.flush()
            _measure(create, args.calls, walls["redis_hit"], cpus["redis_hit"])
            instrumentor.instrument(max_usd=1000, cache=memory, tracer_provider=provider)
    out: dict[str, Any] = {"rounds": args.rounds, "calls_per_round": args.calls, "cases": {}}
    for name in walls:
        w = sorted(walls[name])
        out["cases"][name] = {
            "wall_p50_us": round(statistics.median(w) * 1e6, 1),
            "wall_p99_us": round(w[int(len(w) * 0.99) - 1] * 1e6, 1),
            "cpu_us": round(statistics.median(cpus[name]) * 1e6, 1),
        }
    cases_out = out["cases"]
    for hit, live_case in (("hit", "live"), ("hit_stream", "live_stream"), ("redis_hit", "live")):
        if hit in cases_out:
            cases_out[hit]["wall_vs_live"] = round(
                cases_out[hit]["wall_p50_us"] / cases_out[live_case]["wall_p50_us"], 3
            )
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    instrumentor.uninstrument()
    client.close()
    proc.stdin.close()  # type: ignore[union-attr]
    proc.wait(10)
    if redis_srv is not None:
        redis_srv.stop()
        redis_srv.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
