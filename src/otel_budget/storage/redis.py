"""A ledger shared by every process that talks to one Redis: ``RedisStorage``.

    >>> from otel_budget import BudgetSpanProcessor
    >>> from otel_budget.storage.redis import RedisStorage
    >>> storage = RedisStorage("redis://127.0.0.1:6379/0")            # doctest: +SKIP
    >>> processor = BudgetSpanProcessor(max_usd=2, storage=storage)   # doctest: +SKIP

Install with ``pip install 'otel-budget[redis]'`` (redis-py >= 5). The URL defaults to
``OTEL_BUDGET_REDIS_URL``.

Design:

* **One round trip on a call's critical path.** ``reserve_up_to`` (and ``reserve``) is one
  ``EVALSHA``
  that checks the kill switches, sweeps expired leases, computes the grant (the maximum, or
  the smallest room of the scopes, ``min(limit, cap) - spent - reserved``) and reserves it in
  all or none of them:
  Redis runs one script at a time, so ``spent + reserved <= limit`` holds in every scope at
  every instant, across processes and hosts. Scripts are package data
  (``otel_budget/storage/lua/*.lua``, read with ``importlib.resources``) loaded with
  ``register_script`` (``EVALSHA``, re-sent on ``NOSCRIPT`` after a server restart). A script
  call goes on its thread's own connection when the client is ours (``_evalsha``: redis-py's
  pool checkout polls the socket on every command).
* **Settles leave the critical path** (``settle_async=True``, the default). ``commit`` and
  ``release`` of a lease this instance reserved append the operation to the durable journal
  (below; one ``write``, fsynced per ``journal_fsync``), queue it and return a result computed
  locally (its ``scopes``: the usage this instance last saw, with the settle applied). A
  writer thread sends the queue as ONE script call, ``settle_many.lua``, running the same
  ``settle_one`` as ``settle.lua`` per lease, in order (``_settle_many``; the server runs one
  script per batch instead of one per lease), ``settle_interval_seconds`` (5 ms) after the
  first queued one, or at once when ``settle_batch`` (128) are queued. **No overshoot:** until a commit lands, its
  whole reservation stays held in Redis, so other callers only ever see more in use than is
  true; a release frees its room within the bound below. What would hide spend stays
  synchronous: a commit above its reservation (the excess), a ``charge`` (spend without a
  reservation), a settle while Redis is failing (journaled at once), a lease reserved by
  another instance or within ``min(60 s, lease_seconds / 2)`` of its deadline.
  **Read-your-writes:** ``usage``, ``scopes``, ``flush``, ``close`` and the operator calls
  send the queue first, and a reserve this instance would deny (or grant less than asked:
  see below) after its own queued releases is decided again once they have landed (a denial
  costs one more round trip only when something is queued). A grant *short of its maximum*
  is not retried: it may be smaller than the room for up to the bound, never larger.
  **Visibility bound** to other processes: the interval plus one pipelined round trip,
  measured from ``commit()`` returning to another client seeing the spend
  (``bench/bench_redis.py``, loopback, a shared 2-core machine): p50 5.7 ms, p99 30 ms
  (6.0 / 20.9 ms in another run at load average ~15). While Redis fails, the journal's replay (above) bounds it instead. **Nothing lost:** the queue is sent at ``close``, ``flush`` and
  interpreter exit (``atexit``); after a crash or SIGKILL the journal holds every queued
  settle and the next ``RedisStorage`` on the same URL and prefix adopts and replays it
  (idempotent by lease: a settle sent before the crash counts once). Until then the
  reservations stay held (budgets conservative) until their lease deadline
  (``lease_seconds``); if no process on that host starts within it, the spend reaches Redis
  only when one does. ``settle_async=False``: the old synchronous settle (one more round
  trip per call).
* **Idempotent by lease id** (the span): each lease has a record key; a retried reserve
  returns ``DUPLICATE``, a retried commit counts nothing twice. This is what makes a retry
  after a timeout safe (a timed-out command may still run on the server later: a "ghost").
* **Money is integer nano-USD**, stored with ``HINCRBY`` from the caller's decimal strings;
  the scripts never format a float. Lua compares amounts as doubles, exact up to 2**53
  nano-USD (~$9M), far above ``MAX_BUDGET_USD``: every amount is clamped to ``MAX_AMOUNT``
  (2**53 - 1; a reservation that large is refused by every limit anyway; a commit or charge
  that large is a unit mistake, still recorded, never an error), a negative commit counts 0,
  and spend saturates at 4e18 so ``HINCRBY`` never overflows: a commit never fails.
* **Leases have server-time deadlines** (``redis.call('TIME')``: one clock for every
  client). A scope keeps its open leases in a sorted set scored by deadline; each script call
  sweeps at most ``sweep_per_scope`` expired ones per scope, so a crashed worker's
  reservation frees itself and no call pays for a big backlog. A commit arriving after its
  lease expired is still recorded as spend (``LATE``).
* **Limits:** trace scopes (``lower_only``) keep ``min(stored, requested)``; named scopes
  follow the caller's configuration (a redeploy with a new limit takes effect) unless an
  operator set one with ``set_limit`` (``otel-budget set-limit``), which is stored as an
  override and wins until it is changed. A ``cap`` (e.g. carried in baggage) narrows one
  reservation's check and is never written.
* **Shared** (``shared = True``): a trace scope is not evicted when one service's local root
  ends (other services of the trace may still call); it goes when its TTL runs out.
* **asyncio:** ``areserve_up_to``/``areserve`` are coroutines on the caller's event loop
  (``redis.asyncio``, connections per loop: ``storage/redis_aio.py``; same script, retries,
  breaker, journal and fallback; timeouts measured in Redis' time, not a busy loop's; a
  cancellation mid-reserve journals the lease's release). ``acommit``/``arelease`` queue
  inline (no thread: appending to the queue does not touch the network); ``acharge``, and
  settles that go the synchronous way, run the sync call in a worker thread (the default of
  ``LedgerStorage``), bounded by the same timeouts and circuit breaker; so does every ``a*``
  method with a client passed in (``client=``) or on a cluster.
* **TTLs** come from ``ScopeLimit.ttl`` and are set in the same script as the write
  (refreshed on use, never shortened below an open lease); scopes without a TTL persist.
* **Every key a script touches is passed in ``KEYS``.** On a Redis Cluster
  (``redis+cluster://`` URLs, ``RedisStorage.from_url``) ``RedisClusterStorage``
  (``storage/redis_cluster.py``) puts each scope in its own slot group; a prefix with a hash
  tag, e.g. ``prefix="{otb}:"``, puts every key in one slot instead.

Keys (``P`` is the prefix, default ``otb:``): ``P s:<scope>`` hash (``limit``, ``spent``,
``reserved``, ``olimit`` operator override, ``ttl`` ms), ``P z:<scope>`` sorted set of open
leases (member ``<lease>|<amount>``, score = deadline ms), ``P lease:<lease>`` hash (amount,
state, scope keys; kept ``settle_grace_seconds`` after it settles, for idempotency and late
commits), ``P pause`` set of kill switches, ``P tok:{<token>}`` a call token and its amount
(``put_token``: ``SET ... PX``; ``take_token``: ``GET`` + ``DEL`` in one script, the amount
for the one taker; ``lua/token.lua``, one key, its own slot on a cluster unless the prefix
holds a hash tag).
A token operation goes through the same retries and breaker as a reserve; when Redis does
not answer it raises ``LedgerUnavailableError`` (the fallback ledger never holds tokens:
they only mean something in the shared ledger).

Failure handling (Redis down, hung or slow; measured figures in the tests'
``measured:`` lines, ``tests/test_storage_redis_outages.py``):

* short socket timeouts (50 ms), ``retries`` immediate retries (safe: idempotent), then a
  circuit breaker: after ``breaker_failures`` consecutive failed operations every call fails
  fast, without touching the network, for ``breaker_reset_seconds`` (250 ms); then one call
  probes; each failed probe doubles the wait up to ``breaker_max_reset_seconds`` (500 ms),
  a success resets it. Service resumes within about half a second of Redis answering
  (measured 118-148 ms after a 2 s freeze; it was 3.4 s with a fixed 5 s).
* A reserve blocks at most ``max_block_seconds`` = ``(retries + 1) * (socket_connect_timeout
  + socket_timeout)`` (0.2 s), first calls included (connection setup and script loading
  run inside the same attempts). A commit, release or charge sent synchronously makes one
  attempt (0.1 s) and none while Redis is failing (a failure not yet followed by a success): it is journaled at
  once. One metered call (reserve, then settle) blocks at most ``max_call_block_seconds``
  (0.3 s; measured 195-326 ms, scheduling included, with 4 processes x 8 threads and the
  server frozen for 1 s before their first calls).
* ``reserve`` then raises ``LedgerUnavailableError`` (a ``ConnectionError``), and the
  processor's ``failure_policy`` decides: ``fail_open`` lets the call through unmetered,
  ``fail_closed`` refuses it with ``BudgetExceededError(reason="internal_error")``.
* A reserve whose outcome is unknown (it timed out: it may still run when the server wakes
  up, a "ghost") is settled later: a release is journaled, leaving a tombstone so that a
  ghost arriving even later reserves nothing. A tombstone is not a settlement: the call's
  own charge (``fail_open``) still counts, once, and settles a ghost reservation if one ran.
* ``commit``/``release``/``charge`` never lose spend: when Redis is unavailable they are
  journaled and replayed in order by a background thread when it answers again
  (idempotent, so a replay after a ghost counts once); they return a result computed
  locally, so reports and span attributes stay right. The journal is **durable**
  (``otel_budget.storage.journal``): written to a per-process file under ``journal_dir``
  (default ``$OTEL_BUDGET_JOURNAL_DIR`` or ``~/.local/state/otel-budget/journal``) before
  the call returns, fsynced per ``journal_fsync`` (``everysec`` default, ``always``, ``no``),
  and what a process leaves at exit (or SIGKILL) is adopted and replayed by the next
  ``RedisStorage`` on the same URL and prefix. ``max_journal`` bounds the memory copy only.
* A commit whose lease record is gone (Redis restarted without persistence, or the record
  expired) is charged to the lease's scopes instead of being dropped as a duplicate (this
  instance knows them; ``LATE``). Redis itself must persist a money ledger: AOF with
  ``appendfsync everysec`` (loses at most ~1 s of writes on a crash) or ``always``;
  without persistence a restart forgets every scope's spend, limits set by operators and
  open leases (budgets restart from 0; only journaled operations are replayed).
* ``fallback=MemoryStorage()`` ("degrade to a local ledger"): while Redis is unavailable,
  reservations go to the local ledger, seeded with the last usage this process saw in Redis
  and with the kill switches it last saw, and their spend is replayed into Redis once it is
  back. **Trade-off:** during the outage budgets are enforced per process, so N processes
  may together overspend a scope by up to N times its remaining budget; without a fallback
  the choice is the processor's ``failure_policy`` (unmetered, or refused).
* The ``process`` scope (a bare script's calls) is this process's own in Redis:
  ``process:<host>:<pid>:<start>``, with an idle TTL (``process_ttl_seconds``, 24 h), so
  runs never share it; ``otel-budget show --prefix process:`` lists them.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import logging
import math
import os
import re
import socket
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from otel_budget.storage.base import (
    GLOBAL_PAUSE_KEY,
    MAX_AMOUNT,
    PROCESS_SCOPE_KEY,
    CommitResult,
    CommitStatus,
    LeaseId,
    LedgerStorage,
    ReserveResult,
    ReserveStatus,
    ScopeLimit,
    ScopeUsage,
    check_token,
    reserve_range,
    settle_amount,
    token_ttl,
)
from otel_budget.storage.journal import (
    FSYNC_POLICIES,
    DurableJournal,
    default_directory,
    ledger_id,
)

try:  # optional dependency: pip install 'otel-budget[redis]'
    import redis as _redis
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.retry import Retry as _Retry
except ImportError:  # pragma: no cover - exercised only without the extra
    _redis = None  # type: ignore[assignment]

try:  # redis.asyncio, with the same extra: the coroutine reserve (storage/redis_aio.py)
    from otel_budget.storage import redis_aio as _aio
except ImportError:  # pragma: no cover - exercised only without the extra
    _aio = None  # type: ignore[assignment]

try:  # optional, with the extra: redis-py's own packing checks every argument in Python
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - redis-py's packer then
    _hiredis_pack = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from otel_budget.storage.redis_aio import LoopConnections

logger = logging.getLogger("otel_budget.storage.redis")
_new_tuple = tuple.__new__  # a NamedTuple built without its Python-level __new__
_RESERVED = ReserveStatus.OK


def _pack(conn: Any, command: tuple[Any, ...]) -> bytes:
    """One command in RESP (our arguments are str and int only)."""
    if _hiredis_pack is not None:
        return _hiredis_pack(command)  # type: ignore[no-any-return]
    return b"".join(conn.pack_command(*command))


def _bulk(value: str | int) -> bytes:
    """One argument in RESP, as a bulk string (str in UTF-8, int in decimal)."""
    data = value.encode() if type(value) is str else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)

ENV_URL = "OTEL_BUDGET_REDIS_URL"

# -- Lua ------------------------------------------------------------------------------------
# The scripts are package data (``otel_budget/storage/lua/*.lua``, like the ``limits``
# library's): ``helpers.lua`` is prepended to the scripts that use it.
# ``settle_one.lua`` (one lease's settle) to the two that settle.
_WITH_HELPERS = ("reserve", "settle", "settle_many", "charge")
_WITH_SETTLE_ONE = ("settle", "settle_many")


def _load_scripts() -> dict[str, str]:
    lua = resources.files("otel_budget.storage").joinpath("lua")
    helpers = lua.joinpath("helpers.lua").read_text(encoding="utf-8")
    settle_one = lua.joinpath("settle_one.lua").read_text(encoding="utf-8")
    scripts = {}
    for name in (
        "reserve", "settle", "settle_many", "charge", "evict", "set_limit", "reset", "token",
    ):  # fmt: skip
        source = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        if name in _WITH_SETTLE_ONE:
            source = settle_one + source
        scripts[name] = helpers + source if name in _WITH_HELPERS else source
    return scripts


SCRIPTS = _load_scripts()

_GLOB = re.compile(r"([*?\[\]\\])")

# The ``process`` scope (a bare script's calls) is per process on a shared ledger: its Redis
# key names the host, pid and start time, and it goes after this long idle.
PROCESS_TTL_SECONDS = 86_400.0
_PROCESS_IDENT: dict[int, str] = {}


def process_scope_name() -> str:
    """This process's ``process`` scope in Redis: ``process:<host>:<pid>:<start s>``."""
    pid = os.getpid()
    name = _PROCESS_IDENT.get(pid)
    if name is None:
        name = f"process:{socket.gethostname()}:{pid}:{int(time.time())}"
        _PROCESS_IDENT.clear()  # a forked child gets its own
        _PROCESS_IDENT[pid] = name
    return name


class LedgerUnavailableError(ConnectionError):
    """The Redis ledger did not answer (refused, timed out, or the circuit is open).

    ``attempted`` is False when the circuit breaker refused without touching the network
    (so the operation certainly did not happen)."""

    def __init__(self, message: str, *, attempted: bool = True) -> None:
        super().__init__(message)
        self.attempted = attempted


class _Breaker:
    """Consecutive-failure circuit breaker with a single half-open probe. It stays open
    ``reset_seconds`` at first, doubling after each failed probe up to ``max_reset_seconds``,
    back to ``reset_seconds`` on a success: service resumes soon after Redis answers."""

    def __init__(self, failures: int, reset_seconds: float, max_reset_seconds: float) -> None:
        self.threshold = failures
        self.initial_seconds = reset_seconds
        self.max_reset_seconds = max(max_reset_seconds, reset_seconds)
        self.reset_seconds = reset_seconds  # the current wait
        self.failures = 0
        self.open_until = 0.0
        self.probing = False
        self.opened = False  # has been open since the last success (for recovery hooks)
        self._lock = threading.Lock()

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True  # (closed: one read, no lock; a failure racing it is ordered after)
        with self._lock:
            if self.failures < self.threshold:
                return True
            if time.monotonic() < self.open_until or self.probing:
                return False
            self.probing = True  # half-open: this caller probes, the others still fail fast
            return True

    def success(self) -> bool:
        """Record a success; True if the circuit had been open (a recovery)."""
        if not (self.failures or self.probing or self.opened):
            return False  # nothing to reset (the usual call: no lock)
        with self._lock:
            recovered = self.opened
            self.failures = 0
            self.probing = False
            self.opened = False
            self.reset_seconds = self.initial_seconds
            return recovered

    def abort(self) -> None:
        with self._lock:
            self.probing = False

    def failure(self) -> bool:
        """Record a failure; True if the circuit (re)opens now."""
        with self._lock:
            self.failures += 1
            self.probing = False
            if self.failures >= self.threshold:
                if self.opened:  # a probe failed: back off
                    self.reset_seconds = min(self.reset_seconds * 2, self.max_reset_seconds)
                self.open_until = time.monotonic() + self.reset_seconds
                first = not self.opened
                self.opened = True
                return first
            return False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self.failures >= self.threshold and time.monotonic() < self.open_until


_AT_EXIT: weakref.WeakSet[RedisStorage] = weakref.WeakSet()
_AT_EXIT_HOOKED: list[bool] = []


def _drain_at_exit(storage: RedisStorage | None = None) -> None:
    """Registers ``storage``; at interpreter exit, sends what every live one still queues
    (what cannot be sent stays in its durable journal for the next start)."""
    if storage is not None:
        if not _AT_EXIT_HOOKED:
            _AT_EXIT_HOOKED.append(True)
            atexit.register(_drain_at_exit)
        _AT_EXIT.add(storage)
        return
    for live in list(_AT_EXIT):
        try:
            live._drain()
        except Exception:  # pragma: no cover - best effort at exit; the journal keeps it
            pass


def lease_name(lease_id: LeaseId) -> str:
    """A lease id as Redis text: ints (span-derived, possibly negative, up to 192 bits) in
    hex; anything else by ``repr`` behind a '~' so the two spaces cannot collide."""
    if isinstance(lease_id, int) and not isinstance(lease_id, bool):
        return format(lease_id, "x")
    return "~" + repr(lease_id)


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _token_amount(reply: Any) -> int | None:
    """The token script's answer to a take: the amount, or None (nothing to take)."""
    if reply is None or reply is False:
        return None
    try:
        return int(_text(reply))
    except ValueError:  # not a value ``put_token`` wrote: trusted for nothing
        return 0


def _ttl_ms(ttl: float | None) -> int:
    if ttl is None:
        return 0
    return max(1, math.ceil(ttl * 1000))


def _spec(scope: ScopeLimit) -> str:
    limit = min(int(scope.limit), MAX_AMOUNT)
    if limit < 0:
        raise ValueError(f"scope {scope.key!r} has a negative limit")
    cap = scope.cap
    if cap is None:
        text = ""
    else:
        if cap < 0:
            raise ValueError(f"scope {scope.key!r} has a negative cap")
        text = str(min(int(cap), MAX_AMOUNT))
    return f"{limit}:{1 if scope.lower_only else 0}:{_ttl_ms(scope.ttl)}:{text}"


def _effective(limit: int, scope: ScopeLimit) -> int:
    cap = scope.cap
    return limit if cap is None or cap >= limit else int(cap)


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    return re.sub(r"(?<=://)([^@/]*)@", lambda m: ("***@" if m.group(1) else "@"), url, count=1)


class _Commands:
    """Collects the script calls ``_settle_once``/``_charge_once`` make (a pipeline's
    ``evalsha``) for ``RedisStorage._send_commands``."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self.commands.append(("EVALSHA", sha, numkeys, *keys_and_args))


class RedisStorage(LedgerStorage):
    """The budget ledger in Redis, shared by every process and host that uses it."""

    shared = True  # trace scopes end by their TTL, not when one service's root ends

    def __init__(
        self,
        url: str | None = None,
        client: Any = None,
        *,
        prefix: str = "otb:",
        lease_seconds: float = 3600.0,
        socket_timeout: float = 0.05,
        socket_connect_timeout: float = 0.05,
        retries: int = 1,
        breaker_failures: int = 5,
        breaker_reset_seconds: float = 0.25,
        breaker_max_reset_seconds: float = 0.5,
        fallback: LedgerStorage | None = None,
        settle_grace_seconds: float = 3600.0,
        sweep_per_scope: int = 32,
        max_journal: int = 100_000,
        max_local_leases: int = 100_000,
        journal_dir: str | os.PathLike[str] | None = None,
        journal_fsync: str = "everysec",
        durable_journal: bool = True,
        process_ttl_seconds: float = PROCESS_TTL_SECONDS,
        settle_async: bool = True,
        settle_interval_seconds: float = 0.005,
        settle_batch: int = 128,
    ) -> None:
        if _redis is None:
            raise ImportError(
                "RedisStorage needs redis-py: pip install 'otel-budget[redis]'"
            )
        if lease_seconds <= 0 or settle_grace_seconds <= 0:
            raise ValueError("lease_seconds and settle_grace_seconds must be positive")
        if retries < 0 or breaker_failures < 1 or breaker_reset_seconds < 0:
            raise ValueError("retries >= 0, breaker_failures >= 1, breaker_reset_seconds >= 0")
        if socket_timeout <= 0 or socket_connect_timeout <= 0:
            raise ValueError("socket timeouts must be positive (None would block for ever)")
        if settle_interval_seconds < 0 or settle_batch < 1:
            raise ValueError("settle_interval_seconds >= 0 and settle_batch >= 1")
        if sweep_per_scope < 1 or max_journal < 1 or max_local_leases < 1:
            raise ValueError("sweep_per_scope, max_journal and max_local_leases must be >= 1")
        self._own_client = client is None
        if client is None:
            url = url or os.environ.get(ENV_URL)
            if not url:
                raise ValueError(f"no Redis URL: pass url= or set {ENV_URL}")
            client = self._make_client(url, socket_timeout, socket_connect_timeout)
        self.url = redact(url) if url else repr(client)
        # For the per-loop asyncio connections (made on first use: _async_connections).
        self._raw_url = url if self._own_client else None
        self._socket_timeout = float(socket_timeout)
        self._socket_connect_timeout = float(socket_connect_timeout)
        self._aconns: LoopConnections | None = None
        self.client = client
        self.prefix = prefix
        self.lease_seconds = float(lease_seconds)
        # The longest a reserve can block (retries), a commit/release/charge (one attempt,
        # journaled on failure), and so one metered call end to end (a reserve, a settle).
        self.max_block_seconds = (retries + 1) * (socket_timeout + socket_connect_timeout)
        self.max_settle_block_seconds = socket_timeout + socket_connect_timeout
        self.max_call_block_seconds = self.max_block_seconds + self.max_settle_block_seconds
        self._lease_ms = max(1, math.ceil(lease_seconds * 1000))
        self._settled_ms = max(1, math.ceil(settle_grace_seconds * 1000))
        self._record_ms = self._lease_ms + self._settled_ms
        self._sweep = int(sweep_per_scope)
        self._retries = int(retries)
        if process_ttl_seconds <= 0:
            raise ValueError("process_ttl_seconds must be positive")
        if journal_fsync not in FSYNC_POLICIES:
            raise ValueError(f"journal_fsync must be one of {FSYNC_POLICIES}")
        self._process_ttl = float(process_ttl_seconds)
        self._breaker = _Breaker(
            int(breaker_failures), float(breaker_reset_seconds), float(breaker_max_reset_seconds)
        )
        self._fallback = fallback
        self._max_journal = int(max_journal)
        self._max_local = int(max_local_leases)
        self._pause_key = prefix + "pause"
        self._scripts = {name: client.register_script(src) for name, src in SCRIPTS.items()}
        # Tests move the ledger's clock (lease deadlines) with this; production leaves 0.
        self._clock_offset_ms = 0
        self._lock = threading.Lock()
        # Open leases reserved through this instance: lease name -> (scopes, amount, the
        # monotonic second past which a settle is no longer queued: near its deadline).
        self._local: OrderedDict[str, tuple[tuple[ScopeLimit, ...], int, float]] = (
            OrderedDict()
        )
        # Leases this instance settled (queued or sent): a second settle is a duplicate.
        self._settled: OrderedDict[str, None] = OrderedDict()
        # Settlements queued for the background writer: (entry, seq in the durable journal).
        self.settle_async = bool(settle_async)
        self._settle_interval = float(settle_interval_seconds)
        self._settle_batch = int(settle_batch)
        # Queue a settle only while its lease has this long left, so that it lands before
        # the deadline even if the writer is held up (an outage journals it anyway).
        self._queue_margin = min(60.0, self.lease_seconds / 2)
        self._queue: deque[tuple[tuple[Any, ...], int]] = deque()
        self._queue_wake = threading.Event()
        self._send_lock = threading.Lock()  # one batch in flight: drains wait for it
        self._writer: threading.Thread | None = None
        self._writer_pid = 0
        # Each thread's own connection for script calls (see _evalsha).
        self._thread_conn = threading.local()
        self._specs_json: dict[tuple[ScopeLimit, ...], str] = {}
        # The reserve command's constant RESP parts, per scope set (see _reserve_packed).
        self._reserve_resp: dict[tuple[Any, ...], tuple[bytes, bytes, bytes]] = {}
        self._reserve_parts: dict[
            tuple[tuple[ScopeLimit, ...], int], tuple[list[str], str, list[str]]
        ] = {}
        self._thread_conns: weakref.WeakSet[Any] = weakref.WeakSet()
        # Degraded mode: leases held by the fallback, and what this process last saw.
        self._fallback_leases: OrderedDict[LeaseId, tuple[str, tuple[ScopeLimit, ...]]] = (
            OrderedDict()
        )
        self._known: OrderedDict[str, ScopeUsage] = OrderedDict()
        self._seeded: set[str] = set()
        self._fallback_keys: set[str] = set()
        self._last_pauses = ""
        self._outage = 0
        # Operations to send when Redis answers again (idempotent, in order): (entry, seq in
        # the durable journal, -1 if none).
        self._journal: deque[tuple[tuple[Any, ...], int]] = deque()
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self.stats: dict[str, int] = {
            "expired_leases": 0, "failures": 0, "fast_failures": 0, "fallback_reserves": 0,
            "journaled": 0, "replayed": 0, "journal_dropped": 0, "ghosts_released": 0,
            "adopted": 0, "queued": 0, "batches": 0, "batched": 0,
        }  # fmt: skip
        # The durable journal: opened at once when earlier processes left entries (adopted
        # and replayed), else at the first operation that cannot reach Redis.
        self._journal_fsync = journal_fsync
        self._durable: DurableJournal | None = None
        self._journal_path: Path | None = None
        if durable_journal:
            base = Path(journal_dir) if journal_dir is not None else default_directory()
            self._journal_path = base / ledger_id(self.url, prefix)
            try:
                leftover = self._journal_path.is_dir() and any(self._journal_path.glob("*.jnl"))
            except OSError:
                leftover = False
            if leftover:
                self._adopt()

    def _make_client(self, url: str, socket_timeout: float, socket_connect_timeout: float) -> Any:
        """The redis-py client for ``url`` (a hook: ``RedisClusterStorage`` makes a cluster
        client)."""
        # Our own retry loop below; redis-py's (10 attempts with backoff by default in
        # 8.x) would multiply the time a call can block.
        pool = _redis.ConnectionPool.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=_Retry(_NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=True,
        )
        return _redis.Redis(connection_pool=pool)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisStorage:
        """The ledger at ``url``; ``redis+cluster://`` / ``rediss+cluster://`` give a
        ``RedisClusterStorage`` (``storage/redis_cluster.py``)."""
        from otel_budget.storage.redis_cluster import RedisClusterStorage, is_cluster_url

        if is_cluster_url(url) and not issubclass(cls, RedisClusterStorage):
            return RedisClusterStorage(url=url, **kwargs)
        return cls(url=url, **kwargs)

    # -- keys -----------------------------------------------------------------------------
    def scope_key(self, key: str) -> str:
        """The Redis hash of one scope (``HMGET <it> limit spent reserved`` is a snapshot).
        The ``process`` scope is this process's own (``process_scope_name()``)."""
        if key == PROCESS_SCOPE_KEY:
            key = process_scope_name()
        return self.prefix + "s:" + key

    def _zkey(self, key: str) -> str:
        if key == PROCESS_SCOPE_KEY:
            key = process_scope_name()
        return self.prefix + "z:" + key

    def _spec(self, scope: ScopeLimit) -> str:
        if scope.key == PROCESS_SCOPE_KEY and scope.ttl is None:
            scope = scope._replace(ttl=self._process_ttl)  # idle TTL: it goes with its process
        return _spec(scope)

    def _rkey(self, name: str) -> str:
        return self.prefix + "lease:" + name

    def token_key(self, token: str) -> str:
        """A call token's key: the token is its hash tag (one key per command: any slot
        will do on a cluster; a prefix with a hash tag keeps it in the prefix's slot)."""
        return self.prefix + "tok:{" + token + "}"

    def _scope_keys(self, keys: Sequence[str]) -> list[str]:
        out: list[str] = []
        for key in keys:
            out.append(self.scope_key(key))
            out.append(self._zkey(key))
        return out

    # -- the network, with retry and circuit breaker ------------------------------------
    def _call(self, op: Callable[[], Any], settle: bool = False) -> Any:
        """Run ``op`` with retries and the breaker. ``settle`` (commit, release, charge: they
        are journaled when Redis does not answer, so waiting buys nothing): one attempt, and
        none at all while Redis is failing (a failure not yet followed by a success)."""
        self._admit(settle)
        last: BaseException | None = None
        for _ in range(1 if settle else self._retries + 1):
            try:
                result = op()
            except (_redis.ConnectionError, _redis.TimeoutError, OSError) as exc:
                last = exc  # transient: retry at once (every operation is idempotent)
                continue
            except _redis.RedisError as exc:  # OOM, READONLY, a script error: no retry
                last = exc
                break
            except BaseException:
                self._breaker.abort()  # our bug, not Redis': free a half-open probe slot
                raise
            if self._breaker.success():
                self._recovered()
            return result
        raise self._failed(last) from last

    async def _acall(self, op: Callable[[], Awaitable[Any]], settle: bool = False) -> Any:
        """``_call`` for a coroutine operation: the same admission, retries and breaker."""
        self._admit(settle)
        last: BaseException | None = None
        for _ in range(1 if settle else self._retries + 1):
            try:
                result = await op()
            except (_redis.ConnectionError, _redis.TimeoutError, OSError) as exc:
                last = exc  # transient: retry at once (every operation is idempotent)
                continue
            except _redis.RedisError as exc:  # OOM, READONLY, a script error: no retry
                last = exc
                break
            except BaseException:  # our bug, or a cancellation: not Redis' failure
                self._breaker.abort()
                raise
            if self._breaker.success():
                self._recovered()
            return result
        raise self._failed(last) from last

    def _admit(self, settle: bool) -> None:
        """Raise (``attempted=False``) when no attempt may be made: closed, a settle while
        Redis is failing, or the circuit is open."""
        if self._closed:
            raise LedgerUnavailableError("RedisStorage is closed", attempted=False)
        if settle and self._breaker.failures:
            raise LedgerUnavailableError(
                f"Redis ledger at {self.url} is failing: journaled", attempted=False
            )
        if not self._breaker.allow():
            self.stats["fast_failures"] += 1
            raise LedgerUnavailableError(
                f"Redis ledger at {self.url} unavailable (circuit open)", attempted=False
            )

    def _failed(self, last: BaseException | None) -> LedgerUnavailableError:
        """Record a failed operation (the breaker, the log) and the error to raise."""
        self.stats["failures"] += 1
        if self._breaker.failure():
            logger.warning(
                "otel-budget: Redis ledger at %s unavailable (%s: %s); failing fast for "
                "%.1fs%s", self.url, type(last).__name__, last, self._breaker.reset_seconds,
                " (degraded to the local fallback ledger: budgets are per process until "
                "Redis is back)" if self._fallback is not None else "",
            )  # fmt: skip
            with self._lock:
                self._outage += 1
        return LedgerUnavailableError(
            f"Redis ledger at {self.url} unavailable: {type(last).__name__}: {last}"
        )

    def _recovered(self) -> None:
        logger.warning("otel-budget: Redis ledger at %s answers again", self.url)
        fallback = self._fallback
        if fallback is not None:
            with self._lock:
                keys = self._fallback_keys | self._seeded
                self._fallback_keys = set()
                self._seeded = set()
            for key in keys:  # the next outage starts from what Redis says then
                try:
                    fallback.evict(key)
                except Exception:  # pragma: no cover - a local ledger does not fail
                    pass
        self._wake.set()

    # -- journal of operations to replay -------------------------------------------------
    # Entries: ("settle", lease, keys | None, scopes | None, mode, actual) or
    # ("charge", lease, scopes, amount). Each is also written to the durable journal first.
    @staticmethod
    def _encode(entry: tuple[Any, ...]) -> list[Any]:
        out = list(entry)
        index = 3 if entry[0] == "settle" else 2
        if out[index] is not None:
            out[index] = [list(spec) for spec in out[index]]
        return out

    @staticmethod
    def _decode(data: list[Any]) -> tuple[Any, ...]:
        index = 3 if data[0] == "settle" else 2
        if data[index] is not None:
            data[index] = tuple(ScopeLimit(*spec) for spec in data[index])
        return tuple(data)

    def _durable_journal(self) -> DurableJournal | None:
        """This process's durable journal, opened on first use (call with ``_lock`` held)."""
        if self._durable is None and self._journal_path is not None and not self._closed:
            try:
                self._durable = DurableJournal(self._journal_path, self._journal_fsync)
            except OSError as exc:
                logger.error(
                    "otel-budget: cannot open the ledger journal in %s (%s): operations that "
                    "cannot reach Redis are kept in memory only", self._journal_path, exc,
                )  # fmt: skip
                self._journal_path = None
        return self._durable

    def _adopt(self) -> None:
        """Replay what exited processes left in their journals for this ledger."""
        with self._lock:
            durable = self._durable_journal()
        if durable is None:
            return
        adopted = durable.adopt()
        if not adopted:
            return
        with self._lock:
            for seq, data in adopted:
                try:
                    self._journal.append((self._decode(data), seq))
                except (TypeError, ValueError, IndexError) as exc:
                    logger.error("otel-budget: skipping an unreadable journal entry: %s", exc)
                    durable.done(seq)
            self.stats["adopted"] += len(adopted)
            self._start_flusher()
        self._wake.set()

    def _start_flusher(self) -> None:
        if self._flusher is None and not self._closed and self._journal:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="otel-budget-redis-replay", daemon=True
            )
            self._flusher.start()

    def _journal_add(self, entry: tuple[Any, ...]) -> None:
        with self._lock:
            seq = -1
            durable = self._durable_journal()
            if durable is not None:
                try:
                    seq = durable.append(self._encode(entry))
                except (OSError, TypeError, ValueError) as exc:
                    logger.error("otel-budget: cannot write the ledger journal: %s", exc)
            if len(self._journal) >= self._max_journal:
                # Dropped from memory only: a durable entry stays in the file for the next
                # process to replay.
                self._journal.popleft()
                self.stats["journal_dropped"] += 1
                if self.stats["journal_dropped"] == 1:
                    logger.error(
                        "otel-budget: the Redis replay journal is full (%d); the oldest entries "
                        "wait in %s for the next start", self._max_journal,
                        self._journal_path or "memory (lost)",
                    )  # fmt: skip
            self._journal.append((entry, seq))
            self.stats["journaled"] += 1
            self._start_flusher()
        self._wake.set()

    @property
    def pending(self) -> int:
        """Journaled operations not yet replayed into Redis."""
        with self._lock:
            return len(self._journal)

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._journal:
                    self._flusher = None
                    return
                item = self._journal[0]
            entry, seq = item
            try:
                self._call(functools.partial(self._replay, entry))
            except LedgerUnavailableError:
                # Probe again as the breaker allows (it backs off from 250 ms to its cap).
                wait = min(max(self._breaker.reset_seconds, 0.02), 1.0)
                self._wake.wait(wait)
                self._wake.clear()
                continue
            except Exception as exc:  # a bad entry must not block the others
                logger.error("otel-budget: dropping an unreplayable ledger entry: %s", exc)
            with self._lock:
                if self._journal and self._journal[0] is item:
                    self._journal.popleft()
                self.stats["replayed"] += 1
                if self._durable is not None:
                    self._durable.done(seq)

    def _settle_op(
        self, name: str, keys: Sequence[str] | None, specs: Sequence[ScopeLimit] | None,
        mode: str, actual: int,
    ) -> Any:  # fmt: skip
        """Settle a lease; a commit whose record is gone (Redis restarted without
        persistence, or the record expired) is charged instead: spend is never dropped."""
        reply = self._settle_once(name, keys, mode, actual)
        if mode == "c" and specs and _text(reply[1]) == "none":
            return ("charged", self._charge_once(name, specs, actual))
        return reply

    def _replay(self, entry: tuple[Any, ...]) -> Any:
        kind = entry[0]
        if kind == "settle":  # commit / release / tombstone-release of a Redis lease
            _, name, keys, specs, mode, actual = entry
            reply = self._settle_op(name, keys, specs, mode, actual)
            if mode == "t" and not isinstance(reply, tuple) and _text(reply[1]) == "released":
                self.stats["ghosts_released"] += 1
            return reply
        _, name, specs, amount = entry  # charge
        return self._charge_once(name, specs, amount)

    def flush(self, timeout: float = 5.0) -> bool:
        """Send the queued settlements, then wait until the journal is replayed (True) or
        ``timeout`` passes (False)."""
        self._drain()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._journal:
                    return True
            self._wake.set()
            time.sleep(0.01)
        return self.pending == 0

    # -- scripts ---------------------------------------------------------------------------
    def _reserve_once(
        self, name: str, scopes: Sequence[ScopeLimit], minimum: int, maximum: int,
        pause_keys: Sequence[str], want: bool,
    ) -> Any:  # fmt: skip
        if self._own_client:
            packed = self._reserve_packed(name, scopes, minimum, maximum, pause_keys, want)
            return self._evalsha("reserve", (), (), packed)
        keys, args = self._reserve_command(name, scopes, minimum, maximum, pause_keys, want)
        return self._evalsha("reserve", keys, args)

    def _reserve_packed(
        self, name: str, scopes: Sequence[ScopeLimit], minimum: int, maximum: int,
        pause_keys: Sequence[str], want: bool,
    ) -> bytes:  # fmt: skip
        """The reserve script's ``EVALSHA`` in RESP, as ``_reserve_command`` has it. Only the
        lease (its record's key, its name) and the amounts change from call to call: the
        rest is packed once per scope set and spliced (packing every argument, ~20k
        instructions per reserve with hiredis' packer, was a tenth of a queued call's CPU)."""
        cache_key = (
            tuple(scopes), tuple(pause_keys), want, self._clock_offset_ms, os.getpid()
        )  # fmt: skip
        parts = self._reserve_resp.get(cache_key)
        if parts is None:
            keys, args = self._reserve_command(name, scopes, minimum, maximum, pause_keys, want)
            head = b"*%d\r\n" % (3 + len(keys) + len(args)) + b"".join(
                [_bulk("EVALSHA"), _bulk(self._scripts["reserve"].sha), _bulk(len(keys)), _bulk(keys[0])]
            )  # fmt: skip
            parts = (  # (KEYS: pause set, lease record, scopes; ARGV: lease, amounts, the rest)
                head, b"".join([_bulk(key) for key in keys[2:]]),
                b"".join([_bulk(arg) for arg in args[2:]]),
            )  # fmt: skip
            if len(self._reserve_resp) >= 1024:
                self._reserve_resp.clear()
            self._reserve_resp[cache_key] = parts
        return b"".join((
            parts[0], _bulk(self._rkey(name)), parts[1], _bulk(name),
            _bulk(f"{minimum}:{maximum}"), parts[2],
        ))  # fmt: skip

    def _reserve_command(
        self, name: str, scopes: Sequence[ScopeLimit], minimum: int, maximum: int,
        pause_keys: Sequence[str], want: bool,
    ) -> tuple[list[str], list[Any]]:  # fmt: skip
        """The reserve script's ``KEYS`` and ``ARGV``."""
        # What depends only on the scopes (their keys, their JSON, their specs) is cached:
        # a process makes its calls on few distinct scope sets (per pid: the process scope).
        cache_key = (tuple(scopes), os.getpid())
        cached = self._reserve_parts.get(cache_key)
        if cached is None:
            names = [s.key for s in scopes]
            cached = (self._scope_keys(names), json.dumps(names), [self._spec(s) for s in scopes])
            if len(self._reserve_parts) >= 1024:
                self._reserve_parts.clear()
            self._reserve_parts[cache_key] = cached
        scope_keys, names_json, specs = cached
        keys = [self._pause_key, self._rkey(name), *scope_keys]
        config = (
            f"{self._lease_ms}:{self._clock_offset_ms}:{self._record_ms}:{self._sweep}:"
            f"{1 if want else 0}"
        )
        args: list[Any] = [
            name, f"{minimum}:{maximum}", config, names_json,
            len(pause_keys) + 1, GLOBAL_PAUSE_KEY, *pause_keys, *specs,
        ]  # fmt: skip
        return keys, args

    def _evalsha(
        self, script: str, keys: Sequence[str], args: Sequence[Any], packed: bytes | None = None
    ) -> Any:
        """One script call, on this thread's own connection when the client is ours: the
        pool's checkout costs a ``poll`` syscall and its bookkeeping per command (about a
        third of the client's CPU per reserve, measured in bench/bench_redis.py). A client
        passed in goes through redis-py as it is. ``packed``: the whole ``EVALSHA`` in RESP
        already (own client only)."""
        if not self._own_client:
            return self._scripts[script](keys=keys, args=args, client=self.client)
        conn = self._connection()
        if packed is None:
            packed = _pack(conn, ("EVALSHA", self._scripts[script].sha, len(keys), *keys, *args))
        for stale in (True, False):
            try:
                try:
                    conn.send_packed_command([packed])
                    return conn.read_response()
                except _redis.exceptions.NoScriptError:  # a restarted server forgot it
                    self.client.script_load(SCRIPTS[script])
                    conn.send_packed_command([packed])
                    return conn.read_response()
            except _redis.exceptions.ResponseError:
                raise  # the whole reply was read: the connection is fine
            except _redis.ConnectionError:
                conn.disconnect()
                if stale:
                    # Closed by the server while idle (a restart; the pool would have
                    # polled for it): one fresh connection, at once (idempotent calls).
                    continue
                raise
            except BaseException:
                conn.disconnect()  # a reply may still be on its way: never reuse the socket
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _settle_once(
        self, name: str, keys: Sequence[str] | None, mode: str, actual: int, client: Any = None
    ) -> Any:
        """Settle one lease; with ``client`` (a pipeline) the call is only queued on it and
        the reply comes from its ``execute`` (raw: ``_settle_many`` reads it)."""
        if keys is None:  # reserved by another instance (or forgotten here): ask the record
            stored = self.client.hget(self._rkey(name), "k")
            keys = json.loads(_text(stored)) if stored else []
        redis_keys = [self._rkey(name), *self._scope_keys(keys)]
        args = [name, mode, str(actual), self._settled_ms]
        if client is not None:
            # EVALSHA itself: a pipeline running a Script object sends SCRIPT EXISTS first
            # (one more round trip per batch); NOSCRIPT is handled by _settle_many.
            client.evalsha(self._scripts["settle"].sha, len(redis_keys), *redis_keys, *args)
            return keys
        reply = self._evalsha("settle", redis_keys, args)
        return [keys, *_text(reply).split(" ")]

    def _charge_once(
        self, name: str, specs: Sequence[ScopeLimit], amount: int, client: Any = None
    ) -> Any:
        """Charge without a reservation; ``client`` (a pipeline) as in ``_settle_once``."""
        keys = [self._rkey(name), *self._scope_keys([s.key for s in specs])]
        args: list[Any] = [name, str(amount), self._settled_ms]
        args.extend(self._spec(s) for s in specs)
        if client is not None:
            client.evalsha(self._scripts["charge"].sha, len(keys), *keys, *args)
            return None
        return self._evalsha("charge", keys, args)

    def _settle_many(self, entries: Sequence[tuple[Any, ...]]) -> None:
        """Send queued settlements (``("settle", lease, keys, specs, mode, actual)`` and
        ``("charge", lease, specs, amount)``) in one round trip: every settle in ONE call of
        ``settle_many.lua`` (the same ``settle_one`` per lease, in order: one script call per
        batch instead of one per lease, the Redis server's CPU per call), each charge in its
        own ``charge.lua`` call in the same write. Raises if any failed: the caller journals
        the whole batch (idempotent: the ones that landed count once)."""
        settles = [e for e in entries if e[0] == "settle"]
        charges = [e for e in entries if e[0] != "settle"]
        keys: list[str] = []
        args: list[Any] = [self._settled_ms]
        for entry in settles:
            lease_keys = entry[2]
            if lease_keys is None:  # reserved by another instance: ask the record
                stored = self.client.hget(self._rkey(entry[1]), "k")
                lease_keys = json.loads(_text(stored)) if stored else []
            redis_keys = [self._rkey(entry[1]), *self._scope_keys(lease_keys)]
            keys.extend(redis_keys)
            args.extend((entry[1], entry[4], str(entry[5]), len(redis_keys)))
        for attempt in range(2):
            pipe: Any = (
                _Commands() if self._own_client else self.client.pipeline(transaction=False)
            )
            if settles:
                # EVALSHA itself: a pipeline running a Script object sends SCRIPT EXISTS
                # first (one more round trip); NOSCRIPT is handled below.
                pipe.evalsha(self._scripts["settle_many"].sha, len(keys), *keys, *args)
            for entry in charges:
                self._charge_once(entry[1], entry[2], entry[3], client=pipe)
            if self._own_client:
                replies = self._send_commands(pipe.commands)
            else:
                replies = pipe.execute(raise_on_error=False)
            errors = [r for r in replies if isinstance(r, Exception)]
            if not errors:
                break
            if attempt == 0 and all(isinstance(e, _redis.exceptions.NoScriptError) for e in errors):
                for script in ("settle_many", "charge"):  # a server restart forgot them
                    self.client.script_load(SCRIPTS[script])
                continue
            raise errors[0]
        settled = replies[0] if settles else []
        for entry, reply in zip(settles, settled, strict=True):
            if entry[4] == "c" and entry[3] and _text(reply) == "none":
                # Its record is gone (see _settle_op): charged instead, never dropped.
                self._charge_once(entry[1], entry[3], entry[5])

    def _connection(self) -> Any:
        """This thread's own connection (a new one after a fork)."""
        local = self._thread_conn
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self.client.connection_pool.make_connection()
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._thread_conns.add(conn)  # weak: it goes with its thread
        return conn

    def _send_commands(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Commands in one write on this thread's connection, then their replies (an error
        reply in its place, as ``pipeline.execute(raise_on_error=False)`` gives): the same
        round trip as redis-py's pipeline without its per-command machinery."""
        conn = self._connection()
        for stale in (True, False):
            try:
                conn.send_packed_command(
                    [b"".join(_pack(conn, c) for c in commands)]
                    if _hiredis_pack is not None else conn.pack_commands(commands)
                )  # fmt: skip
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(conn.read_response())
                    except _redis.exceptions.ResponseError as exc:
                        replies.append(exc)
                return replies
            except _redis.ConnectionError:
                conn.disconnect()
                if stale:  # closed by the server while idle: once more (idempotent)
                    continue
                raise
            except BaseException:
                conn.disconnect()  # replies may still be on their way: never reuse it
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- settlements off the critical path ------------------------------------------------
    def _enqueue(self, entry: tuple[Any, ...]) -> None:
        """Journal ``entry`` durably, then queue it for the writer thread."""
        seq = -1
        durable = self._durable
        if durable is None:
            with self._lock:
                durable = self._durable_journal()
        if durable is not None:
            try:
                seq = durable.append_json(self._entry_json(entry))
            except (OSError, TypeError, ValueError) as exc:
                logger.error("otel-budget: cannot write the ledger journal: %s", exc)
        queue = self._queue
        queue.append((entry, seq))
        self.stats["queued"] += 1
        if self._writer_pid != os.getpid():
            self._start_writer()
        size = len(queue)
        if size == 1 or size >= self._settle_batch:
            self._queue_wake.set()

    def _entry_json(self, entry: tuple[Any, ...]) -> str:
        """``json.dumps(self._encode(entry))`` for a queued settle, its scopes' part cached
        (encoding them was most of a queued commit's CPU)."""
        _, name, _keys, specs, mode, actual = entry
        cache = self._specs_json
        cached = cache.get(specs)
        if cached is None:
            cached = ",".join(
                (json.dumps([s.key for s in specs]), json.dumps([list(s) for s in specs]))
            )
            if len(cache) >= 1024:
                cache.clear()
            cache[specs] = cached
        # An int lease's name is hex digits (and '-'): JSON as it is, quoted.
        quoted = f'"{name}"' if name[:1] != "~" else json.dumps(name)
        return f'["settle",{quoted},{cached},"{mode}",{int(actual)}]'

    def _start_writer(self) -> None:
        with self._lock:
            if self._closed or self._writer_pid == os.getpid():
                return
            self._writer_pid = os.getpid()  # a forked child starts its own
            self._writer = threading.Thread(
                target=self._writer_loop, name="otel-budget-redis-settle", daemon=True
            )
            self._writer.start()
        _drain_at_exit(self)

    def _writer_loop(self) -> None:
        queue, wake = self._queue, self._queue_wake
        while not self._closed:
            wake.wait()
            wake.clear()
            if self._settle_interval and len(queue) < self._settle_batch:
                # Coalesce: more settlements arrive meanwhile; a full batch wakes us early.
                # Woken by a new first one instead (someone else drained the queue
                # meanwhile: a reserve's read-your-writes, flush), the interval starts
                # again from it: a batch is never cut down to the one that just came.
                while wake.wait(self._settle_interval) and not self._closed:
                    wake.clear()
                    if len(queue) >= self._settle_batch:
                        break
            with self._send_lock:
                self._send_batch()
            # Full batches go at once; what arrived during the send (the first of it set
            # the event) waits for its own interval, so a batch is never just one settle.
            while len(queue) >= self._settle_batch and not self._closed:
                with self._send_lock:
                    self._send_batch()

    def _send_batch(self) -> None:
        """Send up to ``settle_batch`` queued settlements (call with ``_send_lock`` held).
        If Redis does not take them they move to the replay journal, kept durable."""
        queue = self._queue
        batch: list[tuple[tuple[Any, ...], int]] = []
        while queue and len(batch) < self._settle_batch:
            batch.append(queue.popleft())
        if not batch:
            return
        try:
            self._call(functools.partial(self._settle_many, [e for e, _ in batch]), settle=True)
        except Exception as exc:
            if not isinstance(exc, LedgerUnavailableError):  # our bug: still never lost
                logger.error("otel-budget: a settlement batch failed: %r", exc)
            with self._lock:
                self._journal.extend(batch)
                self.stats["journaled"] += len(batch)
                self._start_flusher()
            self._wake.set()
            return
        self.stats["batches"] += 1
        self.stats["batched"] += len(batch)
        durable = self._durable
        if durable is not None:
            durable.done_many([seq for _, seq in batch])

    def _drain(self) -> None:
        """Send every queued settlement now, after any batch in flight (read-your-writes
        for this instance; bounded: one attempt per batch, none while Redis is failing)."""
        if not self._queue and not self._send_lock.locked():
            return
        with self._send_lock:
            while self._queue:
                self._send_batch()

    def _queued_settle(self, lease_id: LeaseId, mode: str, actual: int) -> CommitResult | None:
        """Queue the settle of a lease this instance reserved and return its result,
        computed locally; None when it must go the synchronous way (async settles off, Redis
        failing, a lease reserved elsewhere or near its deadline, a fallback lease)."""
        if not self.settle_async or self._closed or self._breaker.failures:
            return None
        name = lease_name(lease_id)
        with self._lock:
            if name in self._settled:
                return CommitResult(CommitStatus.DUPLICATE)
            entry = self._local.get(name)
            # Spend above the reservation would be invisible to other reservations until
            # it lands (they could take room already spent): such a commit goes at once.
            if (
                entry is None
                or actual > entry[1]
                or time.monotonic() + self._clock_offset_ms / 1000 >= entry[2]
            ):
                return None
            del self._local[name]
            self._mark_settled(name)
            specs, amount = entry[0], entry[1]
            # The usage this instance last saw, with this settle applied (exact for one
            # instance; other processes' settles show from this instance's next reserve).
            known = self._known
            usages = []
            for spec in specs:
                seen = known.get(spec.key)
                if seen is not None:
                    seen = _new_tuple(ScopeUsage, (
                        spec.key, seen[1], seen[2] + actual,  # limit, spent
                        seen[3] - amount if seen[3] > amount else 0,  # reserved
                    ))  # fmt: skip
                    known[spec.key] = seen
                    usages.append(seen)
        self._enqueue(("settle", name, [s.key for s in specs], specs, mode, actual))
        return _new_tuple(CommitResult, (
            CommitStatus.RELEASED if mode == "r" else CommitStatus.OK, amount, 0, tuple(usages)
        ))  # fmt: skip

    def _mark_settled(self, name: str) -> None:
        settled = self._settled
        settled[name] = None
        if len(settled) > self._max_local:
            settled.popitem(last=False)

    # -- degraded mode -----------------------------------------------------------------------
    def _remember(self, usages: Sequence[ScopeUsage]) -> None:
        if self._fallback is None and not self.settle_async:
            return
        with self._lock:
            known = self._known
            for usage in usages:
                known[usage.key] = usage
                known.move_to_end(usage.key)
            while len(known) > 10_000:
                known.popitem(last=False)

    def _sync_pauses(self, text: str) -> None:
        fallback = self._fallback
        if fallback is None or text == self._last_pauses:
            return
        with self._lock:
            before = set(self._last_pauses.split("\n")) - {""}
            self._last_pauses = text
        now = set(text.split("\n")) - {""}
        for key in now - before:
            fallback.pause(key)
        for key in before - now:
            fallback.resume(key)

    def _fallback_reserve(
        self, lease_id: LeaseId, name: str, scopes: tuple[ScopeLimit, ...], minimum: int,
        maximum: int, pause_keys: Sequence[str],
    ) -> ReserveResult:  # fmt: skip
        fallback = self._fallback
        assert fallback is not None
        seeds: list[tuple[ScopeLimit, int]] = []
        with self._lock:
            outage = self._outage
            for spec in scopes:
                self._fallback_keys.add(spec.key)
                if spec.key in self._seeded:
                    continue
                self._seeded.add(spec.key)
                known = self._known.get(spec.key)
                if known is not None:
                    seeds.append(
                        (spec._replace(limit=known.limit, cap=None), known.spent + known.reserved)
                    )
        for spec, spent in seeds:
            if fallback.usage(spec.key) is None:  # start from the last usage seen in Redis
                fallback.charge(("otel-budget-seed", spec.key, outage), [spec], spent)
        result = fallback.reserve_up_to(lease_id, scopes, minimum, maximum, pause_keys)
        self.stats["fallback_reserves"] += 1
        if result.ok:
            with self._lock:
                self._fallback_leases[lease_id] = (name, scopes)
                if len(self._fallback_leases) > self._max_local:
                    self._fallback_leases.popitem(last=False)
        return result

    def _take_fallback_lease(
        self, lease_id: LeaseId
    ) -> tuple[str, tuple[ScopeLimit, ...]] | None:
        if self._fallback is None:
            return None
        with self._lock:
            return self._fallback_leases.pop(lease_id, None)

    # -- LedgerStorage ---------------------------------------------------------------------
    def reserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        # Above 2**53 Lua's doubles are not exact; such an amount is refused by any limit
        # anyway (limits are at most MAX_BUDGET_USD), so clamping changes no decision.
        minimum, maximum = reserve_range(minimum, maximum)
        scopes = tuple(scopes)
        name = lease_name(lease_id)
        want = self._fallback is not None or self.settle_async
        try:
            reply = self._call(
                lambda: self._reserve_once(name, scopes, minimum, maximum, pause_keys, want)
            )
            if _text(reply[0]) == "denied" and (self._queue or self._send_lock.locked()):
                # This instance's own queued settlements may free the room: a denial is
                # decided after they land (read-your-writes; a round trip more only then).
                self._drain()
                reply = self._call(
                    lambda: self._reserve_once(name, scopes, minimum, maximum, pause_keys, want)
                )
        except LedgerUnavailableError as exc:
            self._reserve_unknown(exc, name, scopes)
            if self._fallback is None:
                raise
            return self._fallback_reserve(
                lease_id, name, scopes, minimum, maximum, pause_keys
            )
        return self._reserve_result(name, scopes, reply)

    async def areserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """``reserve_up_to`` as a coroutine on the caller's event loop (``redis.asyncio``, a
        connection per loop: ``storage/redis_aio.py``): the same script, retries, breaker,
        journal and fallback. A cancellation after the script may have been sent journals
        the lease's release, as a timeout does (a tombstone against a late arrival). A
        client passed in (``client=``), or a cluster, runs the blocking call in a thread."""
        conns = self._aconns if self._aconns is not None else self._async_connections()
        if conns is None:
            return await super().areserve_up_to(lease_id, scopes, minimum, maximum, pause_keys)
        minimum, maximum = reserve_range(minimum, maximum)
        scopes = tuple(scopes)
        name = lease_name(lease_id)
        want = self._fallback is not None or self.settle_async
        packed = self._reserve_packed(name, scopes, minimum, maximum, pause_keys, want)
        sha = self._scripts["reserve"].sha

        def send() -> Awaitable[Any]:
            return conns.evalsha(sha, SCRIPTS["reserve"], (), (), packed)

        try:
            reply = await self._acall(send)
            if _text(reply[0]) == "denied" and (self._queue or self._send_lock.locked()):
                # As in reserve_up_to: this instance's queued settlements land first (the
                # blocking drain in a thread: it waits for a batch in flight).
                await asyncio.to_thread(self._drain)
                reply = await self._acall(send)
        except LedgerUnavailableError as exc:
            self._reserve_unknown(exc, name, scopes)
            if self._fallback is None:
                raise
            return await asyncio.to_thread(
                self._fallback_reserve, lease_id, name, scopes, minimum, maximum, pause_keys
            )
        except asyncio.CancelledError:
            # Cancelled while the script may have reached Redis: its reservation is
            # released when Redis answers (idempotent: a release of nothing leaves only the
            # tombstone), never held until the lease's deadline.
            self._reserve_unknown(LedgerUnavailableError("cancelled"), name, scopes)
            raise
        return self._reserve_result(name, scopes, reply)

    def _async_connections(self) -> LoopConnections | None:
        """The per-loop ``redis.asyncio`` connections, made on first use; None when the
        client is not ours (or a cluster's): the thread path then."""
        if not self._own_client or self._raw_url is None or _aio is None:
            return None
        with self._lock:
            if self._aconns is None:
                self._aconns = _aio.LoopConnections(
                    self._raw_url, self._socket_timeout, self._socket_connect_timeout
                )
            return self._aconns

    def _reserve_unknown(
        self, exc: LedgerUnavailableError, name: str, scopes: tuple[ScopeLimit, ...]
    ) -> None:
        if exc.attempted:
            # Unknown outcome: the command may still run when the server wakes up (a
            # ghost). Release it later, leaving a tombstone against a later arrival.
            self._journal_add(("settle", name, [s.key for s in scopes], scopes, "t", 0))

    def _reserve_result(
        self, name: str, scopes: tuple[ScopeLimit, ...], reply: Any
    ) -> ReserveResult:
        """The reserve script's reply as a ``ReserveResult`` (and this instance's records)."""
        want = self._fallback is not None or self.settle_async
        status = _text(reply[0])
        swept = int(reply[1])
        if swept:
            self.stats["expired_leases"] += swept
        if status == "ok" or status == "dup":
            granted = int(reply[3] if status == "ok" else reply[2])
            until = time.monotonic() + self.lease_seconds - self._queue_margin
            with self._lock:
                local = self._local
                local[name] = (scopes, granted, until)
                if len(local) > self._max_local:
                    local.popitem(last=False)
            if status == "dup":
                return ReserveResult(ReserveStatus.DUPLICATE, None, granted)
            if want:
                if self._fallback is not None:
                    self._sync_pauses(_text(reply[2]))
                # (ScopeUsage and ReserveResult built by tuple.__new__: their NamedTuple
                # constructors are a Python call each, on every reserve.)
                self._remember([
                    _new_tuple(ScopeUsage, (
                        spec.key, int(reply[4 + 3 * i]), int(reply[5 + 3 * i]),
                        int(reply[6 + 3 * i]),
                    ))
                    for i, spec in enumerate(scopes)
                ])  # fmt: skip
            return _new_tuple(ReserveResult, (_RESERVED, None, granted))
        if status == "paused":
            return ReserveResult(ReserveStatus.PAUSED, ScopeUsage(_text(reply[2]), 0, 0, 0))
        spec = scopes[int(reply[2]) - 1]
        usage = ScopeUsage(spec.key, int(reply[3]), int(reply[4]), int(reply[5]))
        self._remember([usage])  # the stored limit; the denial reports the one that applied
        return ReserveResult(
            ReserveStatus.DENIED, usage._replace(limit=_effective(usage.limit, spec))
        )

    def reserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        return self.reserve_up_to(lease_id, scopes, amount, amount, pause_keys)

    def _settle(self, lease_id: LeaseId, mode: str, actual: int) -> CommitResult:
        name = lease_name(lease_id)
        with self._lock:
            entry = self._local.pop(name, None)
        specs = entry[0] if entry is not None else None
        keys = [s.key for s in specs] if specs is not None else None
        amount = entry[1] if entry is not None else 0
        try:
            reply = self._call(
                lambda: self._settle_op(name, keys, specs, mode, actual), settle=True
            )
        except LedgerUnavailableError:
            # Never lose spend: replay when Redis answers (idempotent: a ghost counts once).
            self._journal_add(("settle", name, keys, specs, mode, actual))
            if mode == "r":
                return CommitResult(CommitStatus.RELEASED, amount, 0, ())
            return CommitResult(CommitStatus.OK, amount, max(0, actual - amount), ())
        if isinstance(reply, tuple):  # the lease's record was gone: charged instead
            charged = reply[1]
            if _text(charged[0]) == "dup":
                return CommitResult(CommitStatus.DUPLICATE)
            assert specs is not None
            values = [int(v) for v in charged[1:]]
            usages_ = tuple(
                ScopeUsage(sp.key, *values[3 * i : 3 * i + 3]) for i, sp in enumerate(specs)
            )
            self._remember(usages_)
            return CommitResult(CommitStatus.LATE, amount, max(0, actual - amount), usages_)
        keys = reply[0]
        status = _text(reply[1])
        if status == "dup" or status == "none":
            return CommitResult(CommitStatus.DUPLICATE)
        amount = int(reply[2])
        usages = []
        rest = reply[3:]
        for i in range(0, len(rest), 4):
            key = keys[int(rest[i]) - 1]
            usages.append(ScopeUsage(key, int(rest[i + 1]), int(rest[i + 2]), int(rest[i + 3])))
        self._remember(usages)
        if status == "released":
            return CommitResult(CommitStatus.RELEASED, amount, 0, tuple(usages))
        return CommitResult(
            CommitStatus.LATE if status == "late" else CommitStatus.OK,
            amount,
            actual - amount if actual > amount else 0,
            tuple(usages),
        )

    def commit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        actual = settle_amount(actual)  # never an error: the lease must be settled
        queued = self._queued_settle(lease_id, "c", actual)
        if queued is not None:
            return queued
        held = self._take_fallback_lease(lease_id)
        if held is not None:
            assert self._fallback is not None
            result = self._fallback.commit(lease_id, actual)
            if result.status is not CommitStatus.DUPLICATE:
                # Spend made during the outage reaches the shared ledger when it is back,
                # under its own id (the Redis lease of the same id, if any, is a ghost).
                name, specs = held
                self._journal_add(("charge", "!" + name, specs, actual))
            return result
        return self._settle(lease_id, "c", actual)

    def release(self, lease_id: LeaseId) -> CommitResult:
        queued = self._queued_settle(lease_id, "r", 0)
        if queued is not None:
            return queued
        held = self._take_fallback_lease(lease_id)
        if held is not None:
            assert self._fallback is not None
            return self._fallback.release(lease_id)
        return self._settle(lease_id, "r", 0)

    def charge(self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int) -> CommitResult:
        amount = settle_amount(amount)
        specs = tuple(scopes)
        name = lease_name(lease_id)
        try:
            reply = self._call(lambda: self._charge_once(name, specs, amount), settle=True)
        except LedgerUnavailableError:
            self._journal_add(("charge", name, specs, amount))  # same id: a ghost counts once
            if self._fallback is not None:
                return self._fallback.charge(lease_id, specs, amount)
            return CommitResult(CommitStatus.OK, 0, amount, ())
        if _text(reply[0]) == "dup":
            return CommitResult(CommitStatus.DUPLICATE)
        values = [int(v) for v in reply[1:]]
        usages = tuple(
            ScopeUsage(s.key, *values[3 * i : 3 * i + 3]) for i, s in enumerate(specs)
        )
        self._remember(usages)
        return CommitResult(CommitStatus.OK, 0, amount, usages)

    # acommit/arelease queue inline (a file append, no network): a thread only when they go
    # the synchronous way.
    async def acommit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        queued = self._queued_settle(lease_id, "c", settle_amount(actual))
        if queued is not None:
            return queued
        return await asyncio.to_thread(self.commit, lease_id, actual)

    async def arelease(self, lease_id: LeaseId) -> CommitResult:
        queued = self._queued_settle(lease_id, "r", 0)
        if queued is not None:
            return queued
        return await asyncio.to_thread(self.release, lease_id)

    # -- call tokens -----------------------------------------------------------------------
    def _token_command(
        self, token: str, ttl_seconds: float | None, amount: int = 0
    ) -> tuple[list[str], list[Any]]:
        if ttl_seconds is None:
            check_token(token)
            return [self.token_key(token)], ["take"]
        ttl_ms = max(1, math.ceil(token_ttl(token, ttl_seconds, amount) * 1000))
        return [self.token_key(token)], ["put", ttl_ms, str(amount)]

    def put_token(self, token: str, ttl_seconds: float, amount: int = 0) -> None:
        keys, args = self._token_command(token, ttl_seconds, amount)
        self._call(lambda: self._evalsha("token", keys, args))

    def take_token(self, token: str) -> int | None:
        keys, args = self._token_command(token, None)
        return _token_amount(self._call(lambda: self._evalsha("token", keys, args)))

    async def _atoken(self, keys: list[str], args: list[Any]) -> Any:
        """The token script as a coroutine on the caller's loop (as ``areserve_up_to``);
        a worker thread when the client is not ours (or a cluster's)."""
        conns = self._aconns if self._aconns is not None else self._async_connections()
        if conns is None:
            return await asyncio.to_thread(
                self._call, lambda: self._evalsha("token", keys, args)
            )
        sha = self._scripts["token"].sha
        return await self._acall(lambda: conns.evalsha(sha, SCRIPTS["token"], keys, args))

    async def aput_token(self, token: str, ttl_seconds: float, amount: int = 0) -> None:
        await self._atoken(*self._token_command(token, ttl_seconds, amount))

    async def atake_token(self, token: str) -> int | None:
        return _token_amount(await self._atoken(*self._token_command(token, None)))

    def usage(self, key: str) -> ScopeUsage | None:
        self._drain()  # this instance's settlements first
        try:
            values = self._call(
                lambda: self.client.hmget(self.scope_key(key), "limit", "spent", "reserved")
            )
        except LedgerUnavailableError:
            if self._fallback is None:
                raise
            return self._fallback.usage(key)
        if values[0] is None:
            return None
        return ScopeUsage(key, int(values[0]), int(values[1] or 0), int(values[2] or 0))

    def scopes(self, prefix: str = "") -> list[ScopeUsage]:
        """Every scope whose key starts with ``prefix`` (SCAN: for operators, not hot paths)."""
        self._drain()  # this instance's settlements first
        try:
            found: list[ScopeUsage] = self._call(lambda: self._scan_scopes(prefix))
        except LedgerUnavailableError:
            if self._fallback is None:
                raise
            return self._fallback.scopes(prefix)
        return found

    def _scan_scopes(self, prefix: str) -> list[ScopeUsage]:
        head = self.prefix + "s:"
        pattern = _GLOB.sub(r"\\\1", head + prefix) + "*"
        names = sorted({_text(k) for k in self.client.scan_iter(match=pattern, count=1000)})
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, "limit", "spent", "reserved")
        out = []
        for name, values in zip(names, pipe.execute(), strict=True):
            if values[0] is not None:
                out.append(
                    ScopeUsage(name[len(head):], int(values[0]), int(values[1] or 0),
                               int(values[2] or 0))
                )  # fmt: skip
        return out

    def set_limit(self, key: str, limit: int) -> None:
        if limit < 0:
            raise ValueError("a limit cannot be negative")
        self._drain()
        if self._fallback is not None:
            self._fallback.set_limit(key, limit)
        self._call(
            lambda: self._scripts["set_limit"](
                keys=[self.scope_key(key)], args=[str(int(limit))], client=self.client
            )
        )

    def pause(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        if self._fallback is not None:
            self._fallback.pause(key)
        self._call(lambda: self.client.sadd(self._pause_key, key))

    def resume(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        if self._fallback is not None:
            self._fallback.resume(key)
        self._call(lambda: self.client.srem(self._pause_key, key))

    def paused(self) -> frozenset[str]:
        try:
            members = self._call(lambda: self.client.smembers(self._pause_key))
        except LedgerUnavailableError:
            if self._fallback is None:
                raise
            return self._fallback.paused()
        return frozenset(_text(m) for m in members)

    def evict(self, key: str) -> None:
        # Best effort: a scope that is not evicted still goes when its TTL runs out.
        self._drain()  # a queued settle still holds its reservation: it would keep the scope
        if self._fallback is not None:
            self._fallback.evict(key)
        try:
            self._call(
                lambda: self._scripts["evict"](
                    keys=[self.scope_key(key), self._zkey(key)], client=self.client
                )
            )
        except LedgerUnavailableError:
            pass

    def reset(self, key: str) -> bool:
        """Set a scope's spent and reserved to 0, keeping its limit (an operator decision;
        commits of leases open at the time still count, as late spend). False if unknown."""
        self._drain()
        if self._fallback is not None:
            self._fallback.reset(key)
        return bool(
            self._call(
                lambda: self._scripts["reset"](
                    keys=[self.scope_key(key), self._zkey(key)], args=["reset"],
                    client=self.client,
                )
            )
        )  # fmt: skip

    def delete(self, key: str) -> bool:
        """Forget a scope entirely (limit override included), even with open leases. False if
        it did not exist."""
        self._drain()
        if self._fallback is not None:
            self._fallback.delete(key)
        return bool(
            self._call(
                lambda: self._scripts["reset"](
                    keys=[self.scope_key(key), self._zkey(key)], args=["delete"],
                    client=self.client,
                )
            )
        )  # fmt: skip

    def ping(self) -> bool:
        """True if Redis answers (through the same retry and breaker as every call)."""
        try:
            return bool(self._call(self.client.ping))
        except LedgerUnavailableError:
            return False

    def close(self) -> None:
        """Stop the replay thread and close our connections (a client passed in by the
        caller is left open). Unreplayed entries stay in the durable journal, replayed by the
        next ``RedisStorage`` on this ledger (without one, they are lost: logged). Queued
        settlements are sent first."""
        if not self._closed:
            self._drain()
        with self._lock:
            self._closed = True
            flusher = self._flusher
            writer = self._writer
        self._queue_wake.set()
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=self.max_settle_block_seconds + 1.0)
        with self._send_lock, self._lock:
            self._journal.extend(self._queue)  # raced with close: kept durable like these
            self._queue.clear()
        self._wake.set()
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=2 * self.max_block_seconds + 1.0)
        with self._lock:
            left = len(self._journal)
            durable, self._durable = self._durable, None
        if durable is not None:
            durable.close()
        if left:
            logger.error(
                "otel-budget: %d ledger operations could not reach Redis before close; %s",
                left, f"kept in {durable.path} for the next start" if durable is not None
                else "they are lost (no durable journal)",
            )  # fmt: skip
        if self._aconns is not None:
            self._aconns.close()
        if self._own_client:
            with self._lock:
                conns = list(self._thread_conns)
            for conn in conns:
                try:
                    conn.disconnect()
                except Exception:  # pragma: no cover - closing a dead connection
                    pass
            try:
                self.client.close()
            except Exception:  # pragma: no cover - closing a dead connection
                pass
            try:
                self.client.connection_pool.disconnect()
            except Exception:  # pragma: no cover
                pass


__all__ = ["ENV_URL", "LedgerUnavailableError", "RedisStorage", "lease_name", "redact"]
