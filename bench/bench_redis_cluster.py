"""The Redis ledger on one Redis against a 3-master Redis Cluster, 4 processes each.

    python bench/bench_redis_cluster.py                  # ~1 min on a 2-core machine
    python bench/bench_redis_cluster.py --quick          # smaller, for a smoke run
    python bench/bench_redis_cluster.py --json bench/results/redis_cluster.json

Each worker process runs sequential reserve+commit pairs on two scopes (a trace of 20 calls
and one of 50 users' daily caps, so that traces and users spread over the cluster's slots):
what one metered LLM call costs the ledger. Cases, side by side in one run: one
redis-server (``RedisStorage``, 2 round trips a pair); the cluster (``RedisClusterStorage``,
one slot group per scope: 4 round trips a pair); the cluster with a single-slot prefix
(``{otb}:``: every key on one node, 2 round trips, no scale-out). Reported: pairs/s (all
workers' pairs over the wall time from the first start to the last end), p50/p99 of a
pair (``perf_counter_ns``), and the client CPU per pair (``process_time``). Every server
is started here on free 127.0.0.1 ports (``--save "" --appendonly no``) and stopped by PID.
On a 2-core machine the 3 nodes, 4 clients and 1 server share the same 2 cores: this
measures the client and round-trip cost of the cluster, not its scale-out (which needs
nodes on their own cores or hosts).
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
sys.path.insert(0, ROOT)  # tests.redis_cluster: the servers and the worker

from tests.redis_cluster import (  # noqa: E402
    AVAILABLE,
    SKIP_REASON,
    RedisCluster3,
    cluster_bench_worker,
)
from tests.redis_server import RedisServer  # noqa: E402


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def run_case(name: str, url: str, prefix: str, procs: int, pairs: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 2.0 + 0.5 * procs  # spawn + import + warm-up
    with ctx.Pool(procs) as pool:
        results = pool.starmap(
            cluster_bench_worker, [(url, prefix, i, pairs, start_at, 50) for i in range(procs)]
        )
    latencies = sorted(ns for r in results for ns in r[0])
    begin = min(r[1] for r in results)
    end = max(r[2] for r in results)
    total = len(latencies)
    return {
        "case": name,
        "procs": procs,
        "pairs": total,
        "pairs_per_s": total / (end - begin),
        "p50_us": percentile(latencies, 0.50) / 1000,
        "p99_us": percentile(latencies, 0.99) / 1000,
        "mean_us": statistics.fmean(latencies) / 1000,
        "client_cpu_us_per_pair": 1e6 * sum(r[3] for r in results) / total,
    }


def pipeline_vs_calls(cluster: RedisCluster3, rounds: int = 7, n: int = 300) -> dict[str, Any]:
    """Client thread CPU and wall time (medians of ``rounds``) of two one-key script calls
    on two nodes: in turn, or in one redis-py cluster pipeline (why the ledger calls)."""
    from redis.cluster import RedisCluster

    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0], decode_responses=True)
    script = client.register_script("return 1")
    keys = [f"{{s:k{i}}}" for i in range(64)]
    first = keys[0]
    second = next(k for k in keys if cluster.node_of(client.keyslot(k))
                  != cluster.node_of(client.keyslot(first)))  # fmt: skip
    script(keys=[first], client=client)
    script(keys=[second], client=client)

    def in_turn() -> None:
        script(keys=[first], client=client)
        script(keys=[second], client=client)

    def pipelined() -> None:
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", script.sha, 1, first)
        pipe.execute_command("EVALSHA", script.sha, 1, second)
        pipe.execute()

    samples: dict[str, list[tuple[float, float]]] = {"in_turn": [], "pipelined": []}
    for _ in range(rounds):  # side by side, interleaved
        for name, fn in (("in_turn", in_turn), ("pipelined", pipelined)):
            cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
            for _ in range(n):
                fn()
            samples[name].append(((time.thread_time_ns() - cpu) / n / 1000,
                                  (time.perf_counter_ns() - wall) / n / 1000))  # fmt: skip
    client.close()
    return {name: {"cpu_us": statistics.median(s[0] for s in v),
                   "wall_us": statistics.median(s[1] for s in v)}
            for name, v in samples.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs (smoke run)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per worker process")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three cases")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if not AVAILABLE:
        print(f"bench_redis_cluster: {SKIP_REASON}", file=sys.stderr)
        return 2
    pairs = args.pairs or (500 if args.quick else 3000)
    rows: list[dict[str, Any]] = []
    server = RedisServer().start()
    cluster = RedisCluster3().start()
    try:
        tag = uuid.uuid4().hex[:8]
        cases = [
            ("one redis", server.url, f"otbbench:{tag}:"),
            ("cluster", cluster.url, f"otbbench:{tag}:"),
            ("cluster 1 slot", cluster.url, f"{{otbbench{tag}}}:"),
        ]
        for rnd in range(args.rounds):  # interleaved: a load change hits every case
            for name, url, prefix in cases:
                row = run_case(name, url, prefix + f"{rnd}:", 4, pairs)
                row["round"] = rnd
                rows.append(row)
                print(f"  {name:<15} x4: {row['pairs_per_s']:>8,.0f} pairs/s  p50 "
                      f"{row['p50_us']:7.1f} us  p99 {row['p99_us']:8.1f} us  client CPU "
                      f"{row['client_cpu_us_per_pair']:6.1f} us/pair", file=sys.stderr)  # fmt: skip
        keys_per_node = [int(cluster.cli("DBSIZE", port=p).strip()) for p in cluster.ports]
        piped = pipeline_vs_calls(cluster)
    finally:
        cluster.cleanup()
        server.cleanup()
    summary = []
    for name, _, _ in cases:
        mine = [r for r in rows if r["case"] == name]
        summary.append({
            "case": name,
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in mine),
            "p50_us": statistics.median(r["p50_us"] for r in mine),
            "p99_us": statistics.median(r["p99_us"] for r in mine),
            "client_cpu_us_per_pair": statistics.median(r["client_cpu_us_per_pair"] for r in mine),
        })  # fmt: skip
    print()
    print(f"4 processes, {pairs} reserve+commit pairs each, median of {args.rounds} rounds; "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, loopback")  # fmt: skip
    print("| case | pairs/s | p50 us | p99 us | client CPU us/pair |")
    print("|---|---:|---:|---:|---:|")
    for row in summary:
        print(f"| {row['case']} | {row['pairs_per_s']:,.0f} | {row['p50_us']:.1f} | "
              f"{row['p99_us']:.1f} | {row['client_cpu_us_per_pair']:.1f} |")  # fmt: skip
    print(f"keys per cluster node at the end: {keys_per_node}")
    print("two one-key scripts on two nodes, client thread CPU / wall per pair: in turn "
          f"{piped['in_turn']['cpu_us']:.0f} / {piped['in_turn']['wall_us']:.0f} us, one "
          f"cluster pipeline {piped['pipelined']['cpu_us']:.0f} / "
          f"{piped['pipelined']['wall_us']:.0f} us")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows, "pairs_per_process": pairs,
                       "keys_per_node": keys_per_node, "pipeline_vs_calls": piped, "cpus": os.cpu_count(),
                       "python": platform.python_version()}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
