"""Ledger throughput and latency: RedisStorage against MemoryStorage, 1 and 4 processes.

    python bench/bench_redis.py               # ~30 s on a 2-core machine
    python bench/bench_redis.py --quick       # smaller, for a smoke run
    python bench/bench_redis.py --json out.json

Each worker process runs sequential reserve+commit pairs on two scopes (a trace of 20 calls,
lower-only, with a TTL; and the worker's daily cap): what one metered LLM call costs the
ledger. Workers are spawned, warm up (connections, script load), then start together at a
common wall-clock instant. Reported: pairs/s (all workers' pairs over the wall time from the
first start to the last end), and p50/p99 of one pair's latency (``perf_counter_ns``).

The redis-server is started by this script on a free 127.0.0.1 port (``--save ""
--appendonly no``) and stopped by PID at the end; nothing else is contacted. Redis-side
cost per script call is read from ``INFO commandstats``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.redis_server: the server helper and the worker

from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, bench_worker  # noqa: E402


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def run_case(backend: str, procs: int, pairs: int, url: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    prefix = f"otbbench:{uuid.uuid4().hex[:8]}:"
    start_at = time.time() + 1.5 + 0.5 * procs  # spawn + import + warm-up
    with ctx.Pool(procs) as pool:
        results = pool.starmap(
            bench_worker, [(backend, url, prefix, i, pairs, start_at) for i in range(procs)]
        )
    latencies = sorted(ns for r in results for ns in r[0])
    begin = min(r[1] for r in results)
    end = max(r[2] for r in results)
    total = len(latencies)
    return {
        "backend": backend,
        "procs": procs,
        "pairs": total,
        "pairs_per_s": total / (end - begin),
        "p50_us": percentile(latencies, 0.50) / 1000,
        "p99_us": percentile(latencies, 0.99) / 1000,
        "mean_us": statistics.fmean(latencies) / 1000,
    }


def ping_baseline(url: str, count: int) -> dict[str, Any]:
    """redis-py PING round trips from this process: the loopback + client floor."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):
            client.ping()
        out = []
        for _ in range(count):
            start = time.perf_counter_ns()
            client.ping()
            out.append(time.perf_counter_ns() - start)
    finally:
        client.close()
    out.sort()
    return {"p50_us": percentile(out, 0.5) / 1000, "p99_us": percentile(out, 0.99) / 1000}


def script_stats(url: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        info = client.info("server")
        return {"evalsha": stats, "redis_version": info.get("redis_version")}
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (smoke run)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per worker process")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if REDIS_SERVER is None:
        print(f"bench_redis: {SKIP_REASON}", file=sys.stderr)
        return 2
    pairs = args.pairs or (1000 if args.quick else 5000)
    rows: list[dict[str, Any]] = []
    server = RedisServer().start()
    try:
        for procs in (1, 4):
            for backend in ("memory", "redis"):
                row = run_case(backend, procs, pairs, server.url)
                rows.append(row)
                print(
                    f"  {backend:<7} x{procs}: {row['pairs_per_s']:>9,.0f} pairs/s  "
                    f"p50 {row['p50_us']:8.1f} us  p99 {row['p99_us']:8.1f} us",
                    file=sys.stderr,
                )
        ping = ping_baseline(server.url, 2000)
        server_side = script_stats(server.url)
    finally:
        server.cleanup()

    print()
    print(f"reserve+commit pairs, {pairs} per process; python {platform.python_version()}, "
          f"redis-server {server_side.get('redis_version')}, {os.cpu_count()} CPUs, loopback")  # fmt: skip
    header = f"| {'backend':<7} | {'procs':>5} | {'pairs':>6} | {'pairs/s':>9} | {'p50 us':>8} | {'p99 us':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(
            f"| {row['backend']:<7} | {row['procs']:>5} | {row['pairs']:>6} | "
            f"{row['pairs_per_s']:>9,.0f} | {row['p50_us']:>8.1f} | {row['p99_us']:>8.1f} |"
        )
    print(f"baseline: redis-py PING round trip p50 {ping['p50_us']:.1f} us, "
          f"p99 {ping['p99_us']:.1f} us (a pair is 2 round trips)")  # fmt: skip
    evalsha = server_side.get("evalsha") or {}
    if evalsha:
        print(f"server side: {evalsha.get('calls')} EVALSHA, "
              f"{evalsha.get('usec_per_call')} us per script call")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "server": server_side, "ping": ping,
                       "pairs_per_process": pairs}, f,
                      indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
