"""A throwaway 3-master Redis Cluster on 127.0.0.1 for tests and benchmarks.

    cluster = RedisCluster3().start()    # 3 redis-server processes, free ports, temp dir
    ... cluster.url ...                   # 'redis+cluster://127.0.0.1:<port>'
    cluster.node_of(slot)                 # the port that serves a slot
    cluster.stop()                        # every node by PID

Each node runs ``redis-server --cluster-enabled yes`` with ``--save "" --appendonly no``
(nothing persisted but the cluster's own ``nodes-<port>.conf`` in the temp dir); the cluster
is created with ``redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`` and
is ready once every node reports ``cluster_state:ok``. Skips: ``SKIP_REASON`` when
``redis-server`` or ``redis-cli`` is missing.

Also holds the child-process workers (spawned) of the cluster tests and benchmark.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from tests.redis_server import REDIS_SERVER, hammer_threads

REDIS_CLI = shutil.which("redis-cli") or (
    "/usr/bin/redis-cli" if os.path.exists("/usr/bin/redis-cli") else None
)
SKIP_REASON = "redis-server / redis-cli not installed (apt-get install -y redis-server)"
AVAILABLE = REDIS_SERVER is not None and REDIS_CLI is not None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: list[int]) -> int:
    """A free port below 55535 whose cluster bus port (port + 10000) is free too."""
    while True:
        port = random.randint(20_000, 45_000)
        if port not in taken and _bindable(port) and _bindable(port + 10_000):
            return port


class RedisCluster3:
    def __init__(self, masters: int = 3) -> None:
        if not AVAILABLE:
            raise FileNotFoundError(SKIP_REASON)
        self.ports: list[int] = []
        for _ in range(masters):
            self.ports.append(cluster_port(self.ports))
        self.dir = tempfile.mkdtemp(prefix="otb-cluster-")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def cli(self, *args: str, port: int | None = None, timeout: float = 20.0) -> str:
        assert REDIS_CLI is not None
        cmd = [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port or self.ports[0]), *args]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stdout!r} {done.stderr!r}")
        return done.stdout.decode(errors="replace")

    def start(self, timeout: float = 20.0) -> RedisCluster3:
        assert REDIS_SERVER is not None
        for port in self.ports:
            log = open(os.path.join(self.dir, f"redis-{port}.log"), "ab")  # noqa: SIM115
            self.procs.append(subprocess.Popen(
                [
                    REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", os.path.join(self.dir, f"nodes-{port}.conf"),
                    "--save", "", "--appendonly", "no", "--dir", self.dir,
                    "--daemonize", "no", "--loglevel", "warning",
                ],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            ))  # fmt: skip
            log.close()
        try:
            deadline = time.monotonic() + timeout
            for port in self.ports:
                while "PONG" not in self._try("PING", port=port):
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                        raise RuntimeError(f"node {port} did not answer PING")
                    time.sleep(0.02)
            self.cli("--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                     "--cluster-replicas", "0", "--cluster-yes", timeout=timeout)  # fmt: skip
            for port in self.ports:
                while "cluster_state:ok" not in self._try("CLUSTER", "INFO", port=port):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node {port}: cluster_state not ok")
                    time.sleep(0.05)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _try(self, *args: str, port: int) -> str:
        try:
            return self.cli(*args, port=port, timeout=2.0)
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""

    def node_ids(self) -> dict[int, str]:
        """port -> node id."""
        out = {}
        for line in self.cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            out[int(fields[1].split(":")[1].split("@")[0])] = fields[0]
        return out

    def node_of(self, slot: int) -> int:
        """The port of the master that serves ``slot``."""
        for line in self.cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            port = int(fields[1].split(":")[1].split("@")[0])
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return port
        raise LookupError(f"slot {slot} is not served")

    def migrate_slot(self, slot: int, target: int) -> None:
        """Move one slot and its keys to the master on port ``target`` (what a reshard does,
        slot by slot): IMPORTING/MIGRATING, MIGRATE the keys, then NODE on every master."""
        source = self.node_of(slot)
        if source == target:
            return
        ids = self.node_ids()
        self.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source], port=target)
        self.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target], port=source)
        while True:
            keys = self.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100", port=source).split()
            if not keys:
                break
            self.cli("MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *keys,
                     port=source)  # fmt: skip
        for port in self.ports:
            self.cli("CLUSTER", "SETSLOT", str(slot), "NODE", ids[target], port=port)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster3:
        return self.start() if not self.procs else self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# -- child-process workers (spawn) ---------------------------------------------------------
def cluster_contention_worker(
    url: str, prefix: str, index: int, threads: int, rounds: int, limit: int, user: str
) -> tuple[int, int]:
    """``contention_worker`` of tests/redis_server.py on the cluster ledger: ``threads``
    threads reserve on one hot trace plus ``user``'s daily cap (another slot group), commit
    at most what they reserved; returns (admitted, nano-USD committed)."""
    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage

    store = RedisStorage.from_url(url, prefix=prefix, socket_timeout=2.0,
                                  socket_connect_timeout=2.0, breaker_failures=1000)  # fmt: skip
    scopes = [ScopeLimit("t:hot", limit, True, 3600.0), ScopeLimit(user, limit + 1, False, 2 * 86400.0)]
    return hammer_threads(store, scopes, index, threads, rounds)


def cluster_bench_worker(
    url: str, prefix: str, index: int, pairs: int, start_at: float, users: int, warmup: int = 200
) -> tuple[list[int], float, float, float]:
    """``bench_worker`` of tests/redis_server.py for any ledger URL (``redis://`` or
    ``redis+cluster://``): sequential reserve+commit pairs on a trace of 20 calls plus one
    of ``users`` daily caps (so traces and users spread over the slots). Returns (each pair's
    ns, start, end, this process's CPU seconds) of the measured part."""
    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage

    store = RedisStorage.from_url(url, prefix=prefix, socket_timeout=1.0,
                                  socket_connect_timeout=1.0)  # fmt: skip
    caps = [ScopeLimit(f"user:u{index}:{u}@d20261123", 10**15, False, 2 * 86400.0)
            for u in range(users)]  # fmt: skip
    clock = time.perf_counter_ns

    def pair(n: int) -> None:
        lease = (index << 40) | n
        trace = ScopeLimit(f"t:{index}:{n // 20}", 10**12, True, 3600.0)
        store.reserve(lease, (trace, caps[n % users]), 1_000_000)
        store.commit(lease, 700_000)

    for n in range(pairs, pairs + warmup):  # connections, slot map, script load
        pair(n)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    out = []
    cpu = time.process_time()
    begin = time.time()
    for n in range(pairs):
        start = clock()
        pair(n)
        out.append(clock() - start)
    end = time.time()
    cpu = time.process_time() - cpu
    store.close()
    return out, begin, end, cpu
