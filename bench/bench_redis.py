"""Ledger throughput and latency: RedisStorage (commits queued, or sent at once) against
MemoryStorage, 1 and 4 processes on ONE trace scope, with and without per-worker daily caps.

    python bench/bench_redis.py                      # ~2 min on a 2-core machine
    python bench/bench_redis.py --quick              # smaller, for a smoke run
    python bench/bench_redis.py --json bench/results/redis.json
    python bench/bench_redis.py --settle-batches --json bench/results/redis_settle_batches.json

Each worker process runs sequential metered calls' ledger work: a reserve (on the call's
critical path) then a commit (``redis``: queued for the background writer; ``redis-sync``:
one more round trip, the old behaviour). Cases: ``trace`` (every worker on one shared trace
scope) and ``trace+cap`` (plus the worker's own daily cap). Workers are spawned, warm up
(connections, script load), then start together at a common wall-clock instant. Reported:
calls/s (all workers' calls over the wall time from the first start until every worker's
commits have landed in Redis), p50/p99 of the time added per call (reserve + commit, as the
caller sees it, ``perf_counter_ns``), and the caller thread's CPU per reserve and per commit
(``thread_time_ns``, means). Then the visibility bound: how long after ``commit()`` returns
another client sees the spend (p50/p99 over 500 commits, default 5 ms writer interval).
``--settle-batches``: the writer's batches as one ``settle_many.lua`` call each against one
``settle.lua`` call per lease, interleaved (server script time and writer CPU per settle).
``--throughput N``: only issue 11's throughput case (4 processes on one trace scope), queued
and synchronous commits, N interleaved rounds; ``--baseline-src PATH`` adds another
checkout's ``src`` (e.g. the code before issue 11, synchronous commits only) to each round.
Each run is a fresh interpreter (the other code imported in place of this checkout's), and
the figures are calls/s per round, then the median, minimum and maximum.

The redis-server is started by this script on a free 127.0.0.1 port (``--save ""
--appendonly no``) and stopped by PID at the end; nothing else is contacted. Redis-side cost
per script call is read from ``INFO commandstats``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.redis_server: the server helper and the worker
# (OTEL_BUDGET_BENCH_SRC: another checkout's code, for --throughput's baseline)
sys.path.insert(0, os.environ.get("OTEL_BUDGET_BENCH_SRC") or os.path.join(ROOT, "src"))

from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, bench_worker  # noqa: E402


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def run_case(backend: str, procs: int, pairs: int, url: str, case: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    prefix = f"otbbench:{uuid.uuid4().hex[:8]}:"
    start_at = time.time() + 1.5 + 0.5 * procs  # spawn + import + warm-up
    with ctx.Pool(procs) as pool:
        results = pool.starmap(
            bench_worker, [(backend, url, prefix, i, pairs, start_at, case) for i in range(procs)]
        )
    latencies = sorted(ns for r in results for ns in r[0])
    begin = min(r[1] for r in results)
    end = max(r[2] for r in results)
    total = len(latencies)
    return {
        "backend": backend,
        "case": case,
        "procs": procs,
        "calls": total,
        "calls_per_s": total / (end - begin),
        "p50_us": percentile(latencies, 0.50) / 1000,
        "p99_us": percentile(latencies, 0.99) / 1000,
        "mean_us": statistics.fmean(latencies) / 1000,
        "cpu_reserve_us": sum(r[3] for r in results) / total / 1000,
        "cpu_commit_us": sum(r[4] for r in results) / total / 1000,
    }


def visibility(url: str, count: int) -> dict[str, Any]:
    """Seconds from ``commit()`` returning to the spend being visible to another client."""
    import redis

    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage

    prefix = f"otbbench:{uuid.uuid4().hex[:8]}:"
    store = RedisStorage(url, prefix=prefix, socket_timeout=1.0, socket_connect_timeout=1.0)
    other = redis.Redis.from_url(url)
    key = store.scope_key("user:seen")
    waits = []
    try:
        for lease in range(1, count + 1):
            assert store.reserve(lease, [ScopeLimit("user:seen", 10**15)], 1000).ok
            store.commit(lease, 1)
            start = time.perf_counter_ns()
            while int(other.hget(key, "spent") or 0) < lease:
                pass
            waits.append(time.perf_counter_ns() - start)
    finally:
        store.close()
        other.close()
    waits.sort()
    return {"p50_us": percentile(waits, 0.5) / 1000, "p99_us": percentile(waits, 0.99) / 1000,
            "samples": count}  # fmt: skip


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


def settle_batches(url: str, rounds: int, leases: int) -> dict[str, Any]:
    """The writer's batches of 128 queued commits (a trace and a daily cap each), sent as one
    ``settle_many.lua`` call per batch (``batched``) or as the per-lease ``settle.lua`` calls
    in one pipelined write (``per_lease``, the previous writer), interleaved round by round on
    one server: the server's script time per settle (``INFO commandstats``) and the writer
    thread's CPU per settle (``thread_time``), medians over the rounds."""
    import redis

    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import SCRIPTS, RedisStorage, _Commands, lease_name

    store = RedisStorage(url, prefix=f"otbbench:{uuid.uuid4().hex[:8]}:", settle_async=False)
    other = redis.Redis.from_url(url, decode_responses=True)
    scopes = (ScopeLimit("t:batch", 10**15, True, 3600.0),
              ScopeLimit("user:b@d20261203", 10**15, False, 86400.0))  # fmt: skip
    keys = [s.key for s in scopes]
    for name in ("settle", "settle_many"):
        other.script_load(SCRIPTS[name])

    def script_usec() -> int:
        return int(other.info("commandstats")["cmdstat_evalsha"]["usec"])

    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for round_ in range(rounds):
            for mode in ("per_lease", "batched"):
                ids = [(mode, round_, i) for i in range(leases)]
                for lease in ids:
                    assert store.reserve(lease, scopes, 1000).ok
                names = [lease_name(lease) for lease in ids]
                entries = [("settle", n, keys, scopes, "c", 500) for n in names]
                usec, cpu = script_usec(), time.thread_time()
                for first in range(0, leases, 128):
                    batch = entries[first:first + 128]
                    if mode == "batched":
                        store._settle_many(batch)
                    else:
                        pipe = _Commands()
                        for e in batch:
                            store._settle_once(e[1], e[2], e[4], e[5], client=pipe)
                        store._send_commands(pipe.commands)
                cpu, usec = time.thread_time() - cpu, script_usec() - usec
                row = samples.setdefault(mode, {"server_us": [], "client_cpu_us": []})
                row["server_us"].append(usec / leases)
                row["client_cpu_us"].append(cpu * 1e6 / leases)
        usage = store.usage("t:batch")
        assert usage is not None and usage.reserved == 0
        assert usage.spent == 2 * rounds * leases * 500  # every settle landed, once
    finally:
        store.close()
        other.close()
    return {mode: {name: round(statistics.median(v), 2) for name, v in row.items()}
            for mode, row in samples.items()} | {"rounds": rounds, "leases_per_round": leases}


def throughput(url: str, rounds: int, pairs: int, baseline: str | None) -> dict[str, Any]:
    """Issue 11's throughput case, interleaved round by round: each run in its own
    interpreter (``_throughput_run``), so that a baseline checkout's code can be imported."""
    import subprocess

    runs = [("otel-budget", None, "redis"), ("otel-budget", None, "redis-sync")]
    if baseline is not None:
        runs.append(("baseline", os.path.abspath(baseline), "redis-sync"))
    samples: dict[str, list[float]] = {}
    for round_ in range(rounds):
        for label, src, backend in runs:
            env = dict(os.environ)
            if src is not None:
                env["OTEL_BUDGET_BENCH_SRC"] = src
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--_throughput-run", backend, url,
                 str(pairs)],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"{label} {backend}: {done.stderr.strip()[-2000:]}")
            rate = float(done.stdout.split()[-1])
            name = f"{label} {backend}"
            samples.setdefault(name, []).append(round(rate))
            print(f"  round {round_ + 1}: {name:<24} {rate:>9,.0f} calls/s", file=sys.stderr)
    return {
        "case": "trace", "procs": 4, "calls_per_process": pairs, "baseline_src": baseline,
        "calls_per_s": samples,
        "median": {name: statistics.median(v) for name, v in samples.items()},
        "min": {name: min(v) for name, v in samples.items()},
        "max": {name: max(v) for name, v in samples.items()},
    }  # fmt: skip


def _throughput_run(backend: str, url: str, pairs: int) -> None:
    row = run_case(backend, 4, pairs, url, "trace")
    print(row["calls_per_s"])


def _one_mode(measure: Any, json_path: str | None) -> int:
    """Run one of the single-purpose modes on a fresh server; print (and save) its JSON."""
    server = RedisServer().start()
    try:
        result = measure(server.url)
    finally:
        server.cleanup()
    print(json.dumps(result, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (smoke run)")
    parser.add_argument("--pairs", type=int, default=None, help="calls per worker process")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--settle-batches", action="store_true",
                        help="only: one script call per batch of settles vs one per lease")  # fmt: skip
    parser.add_argument("--throughput", type=int, default=None, metavar="ROUNDS",
                        help="only: 4 processes on one trace scope, ROUNDS interleaved rounds")  # fmt: skip
    parser.add_argument("--baseline-src", default=None,
                        help="with --throughput: another checkout's src, run alongside")  # fmt: skip
    parser.add_argument("--_throughput-run", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._throughput_run:
        backend, url, count = args._throughput_run
        _throughput_run(backend, url, int(count))
        return 0
    if REDIS_SERVER is None:
        print(f"bench_redis: {SKIP_REASON}", file=sys.stderr)
        return 2
    if args.settle_batches:
        os.environ.setdefault("OTEL_BUDGET_JOURNAL_DIR", tempfile.mkdtemp(prefix="otb-jnl-"))
        return _one_mode(lambda url: settle_batches(url, 5 if args.quick else 15, 2560), args.json)
    pairs = args.pairs or (1000 if args.quick else 4000)
    os.environ.setdefault("OTEL_BUDGET_JOURNAL_DIR", tempfile.mkdtemp(prefix="otb-bench-jnl-"))
    if args.throughput:
        return _one_mode(
            lambda url: throughput(url, args.throughput, pairs, args.baseline_src), args.json
        )  # fmt: skip
    try:
        import hiredis  # noqa: F401

        parser_name = "hiredis"
    except ImportError:
        parser_name = "python"
    rows: list[dict[str, Any]] = []
    server = RedisServer().start()
    try:
        for case in ("trace", "trace+cap"):
            for procs in (1, 4):
                for backend in ("memory", "redis", "redis-sync"):
                    row = run_case(backend, procs, pairs, server.url, case)
                    rows.append(row)
                    print(
                        f"  {case:<9} {backend:<10} x{procs}: {row['calls_per_s']:>9,.0f} "
                        f"calls/s  p50 {row['p50_us']:7.1f} us  p99 {row['p99_us']:8.1f} us  "
                        f"cpu reserve {row['cpu_reserve_us']:6.1f} commit "
                        f"{row['cpu_commit_us']:6.1f} us", file=sys.stderr,
                    )  # fmt: skip
        seen = visibility(server.url, 100 if args.quick else 500)
        ping = ping_baseline(server.url, 2000)
        server_side = script_stats(server.url)
    finally:
        server.cleanup()

    print()
    print(f"metered calls' ledger work, {pairs} per process; python "
          f"{platform.python_version()} ({parser_name} parser), redis-server "
          f"{server_side.get('redis_version')}, {os.cpu_count()} CPUs, loopback")  # fmt: skip
    header = (f"| {'case':<9} | {'backend':<10} | {'procs':>5} | {'calls/s':>9} | "
              f"{'p50 us':>8} | {'p99 us':>8} | {'cpu reserve us':>14} | {'cpu commit us':>13} |")  # fmt: skip
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        print(
            f"| {row['case']:<9} | {row['backend']:<10} | {row['procs']:>5} | "
            f"{row['calls_per_s']:>9,.0f} | {row['p50_us']:>8.1f} | {row['p99_us']:>8.1f} | "
            f"{row['cpu_reserve_us']:>14.1f} | {row['cpu_commit_us']:>13.1f} |"
        )
    print(f"visibility of a queued commit to another client: p50 {seen['p50_us']:.0f} us, "
          f"p99 {seen['p99_us']:.0f} us ({seen['samples']} commits)")  # fmt: skip
    print(f"baseline: redis-py PING round trip p50 {ping['p50_us']:.1f} us, "
          f"p99 {ping['p99_us']:.1f} us")  # fmt: skip
    evalsha = server_side.get("evalsha") or {}
    if evalsha:
        print(f"server side: {evalsha.get('calls')} EVALSHA, "
              f"{evalsha.get('usec_per_call')} us per script call")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "server": server_side, "ping": ping, "visibility": seen,
                       "calls_per_process": pairs, "parser": parser_name,
                       "cpus": os.cpu_count(), "python": platform.python_version()}, f,
                      indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
