"""A throwaway ``redis-server`` on 127.0.0.1 for tests and benchmarks.

    server = RedisServer().start()       # free port, no persistence, temp dir
    ... server.url ...
    server.freeze(); server.thaw()       # SIGSTOP / SIGCONT
    server.kill(); server.start()        # crash and restart on the same port
    server.stop()                        # by PID, always

Started with ``--save "" --appendonly no`` (nothing written to disk) and ``--bind
127.0.0.1``; ready once it answers PING (raw RESP over a socket, so no client library is
needed). Pytest fixtures: ``redis_server_or_skip()`` skips with a clear reason when the
binary is missing (``apt-get install -y redis-server``).

Also holds the worker functions that multi-process tests and the benchmark run in child
processes (spawned: they must be importable from a module without test-only imports).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)
SKIP_REASON = "redis-server not installed (apt-get install -y redis-server)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or REDIS_SERVER
        if self.binary is None:
            raise FileNotFoundError(SKIP_REASON)
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="otb-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(os.path.join(self.dir, "redis.log"), "ab")  # noqa: SIM115 - the server keeps it
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--daemonize", "no", "--loglevel", "warning", "--protected-mode", "yes",
            ],  # fmt: skip
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.frozen = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self.log_tail()}")
            if ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING in {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read()[-500:].decode(errors="replace")
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        """Crash it (SIGKILL by PID); nothing is persisted."""
        if self.proc is None:
            return
        self.thaw()
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.thaw()
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# -- child-process workers (spawn) ---------------------------------------------------------
def contention_worker(
    url: str, prefix: str, index: int, threads: int, rounds: int, limit: int
) -> tuple[int, int]:
    """``threads`` threads reserve random amounts on one hot trace (plus a daily cap) and
    commit at most what they reserved; returns (admitted, nano-USD committed)."""
    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage

    store = RedisStorage(url, prefix=prefix, socket_timeout=2.0, socket_connect_timeout=2.0,
                         breaker_failures=1000)  # fmt: skip
    scopes = [
        ScopeLimit("t:hot", limit, True, 3600.0),
        ScopeLimit("user:x@d20261123", limit + 1, False, 2 * 86400.0),
    ]
    return hammer_threads(store, scopes, index, threads, rounds)


def hammer_threads(store: Any, scopes: Any, index: int, threads: int, rounds: int
                   ) -> tuple[int, int]:  # fmt: skip
    """Run ``tests.helpers.hammer`` in ``threads`` threads of worker ``index`` (distinct
    seeds and lease ids), close the store; returns (admitted, nano-USD committed)."""
    from tests.helpers import hammer

    admitted = [0] * threads
    committed = [0] * threads

    def work(t: int) -> None:
        admitted[t], committed[t] = hammer(
            store, scopes, index * 1000 + t, (index << 48) | (t << 32), rounds
        )

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    store.close()
    return sum(admitted), sum(committed)


def pause_probe_worker(url: str, prefix: str, conn: Any) -> None:
    """A separate process that reserves on request: receives a lease id, answers the status."""
    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage

    store = RedisStorage(url, prefix=prefix, socket_timeout=2.0, socket_connect_timeout=2.0)
    scope = ScopeLimit("user:alice", 10**12)
    while True:
        lease = conn.recv()
        if lease is None:
            break
        result = store.reserve(lease, [scope], 1, ("user:alice", "user:*"))
        if result.ok:
            store.commit(lease, 1)
        conn.send(result.status.value)
    store.close()


def bench_worker(
    backend: str, url: str, prefix: str, index: int, pairs: int, start_at: float,
    case: str = "trace", warmup: int = 200,
) -> tuple[list[int], float, float, int, int]:
    """Sequential metered calls' ledger work (reserve, then commit), started at wall time
    ``start_at`` so that parallel workers overlap. ``case``: ``"trace"`` (every worker on
    one shared trace scope) or ``"trace+cap"`` (plus the worker's own daily cap). Backends:
    ``memory``, ``redis`` (commits queued), ``redis-sync`` (commits sent at once). Returns
    (each call's ns, start, end, this thread's CPU ns in reserves, in commits)."""
    from otel_budget.storage import MemoryStorage, ScopeLimit

    if backend.startswith("redis"):
        import inspect

        from otel_budget.storage.redis import RedisStorage

        # (A baseline checkout from before queued commits has no ``settle_async``: its
        # commits are synchronous, and only ``redis-sync`` is asked of it.)
        queued: dict[str, Any] = (
            {"settle_async": backend == "redis"}
            if "settle_async" in inspect.signature(RedisStorage).parameters else {}
        )  # fmt: skip
        if backend == "redis" and not queued:
            raise ValueError("this otel_budget has no queued commits: use redis-sync")
        store: Any = RedisStorage(url, prefix=prefix, socket_timeout=1.0,
                                  socket_connect_timeout=1.0, **queued)  # fmt: skip
    else:
        store = MemoryStorage()
    trace = ScopeLimit("t:shared", 10**15, True, 3600.0)
    scopes: tuple[Any, ...] = (trace,)
    if case == "trace+cap":
        scopes = (trace, ScopeLimit(f"user:u{index}@d20261123", 10**15, False, 2 * 86400.0))
    clock = time.perf_counter_ns
    cpu = time.thread_time_ns
    cpu_reserve = cpu_commit = 0

    for n in range(pairs, pairs + warmup):  # connections, script load
        lease = (index << 40) | n
        store.reserve(lease, scopes, 1_000_000)
        store.commit(lease, 700_000)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    out = []
    begin = time.time()
    for n in range(pairs):
        lease = (index << 40) | n
        start = clock()
        c0 = cpu()
        store.reserve(lease, scopes, 1_000_000)
        c1 = cpu()
        store.commit(lease, 700_000)
        c2 = cpu()
        out.append(clock() - start)
        cpu_reserve += c1 - c0
        cpu_commit += c2 - c1
    if backend == "redis":
        store.flush(timeout=30)  # the end is when every commit has landed
    end = time.time()
    store.close()
    return out, begin, end, cpu_reserve, cpu_commit


def settle_then_exit_worker(
    url: str, prefix: str, journal_dir: str, leases: int, amount: int, actual: int, how: str
) -> None:
    """Reserve ``leases`` leases and commit each (queued: the writer is held back a minute,
    so nothing is sent), then end: ``"exit"`` returns normally (no close: the interpreter's
    exit drains the queue), ``"kill"`` SIGKILLs itself (the journal file is all that is
    left)."""
    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage

    store = RedisStorage(url, prefix=prefix, journal_dir=journal_dir, socket_timeout=2.0,
                         socket_connect_timeout=2.0, settle_interval_seconds=60.0)  # fmt: skip
    scope = ScopeLimit("user:crash", 10**12)
    for lease in range(1, leases + 1):
        assert store.reserve(lease, [scope], amount).ok
    for lease in range(1, leases + 1):
        store.commit(lease, actual)
    assert store.stats["batches"] == 0, store.stats  # all of them still queued
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
