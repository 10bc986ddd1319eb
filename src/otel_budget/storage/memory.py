"""In-process ledger storage: one lock, O(1) per operation, bounded memory.

    >>> from otel_budget.storage import MemoryStorage, ScopeLimit
    >>> store = MemoryStorage(lease_seconds=600)
    >>> r = store.reserve(0xABC, [ScopeLimit("t:1", 10**9, lower_only=True, ttl=3600)], 250_000)
    >>> store.commit(0xABC, 180_000).scopes[0].spent
    180000

Why this shape:

* One ``threading.Lock`` held for a handful of dict operations: the critical section is a
  few hundred nanoseconds, so 32 threads do not queue behind it, and it is safe to call
  from asyncio code (nothing awaits while it is held).
* Scopes live in a dict; two ``OrderedDict`` keep them in least-recently-used order: the
  ``evictable`` ones (traces) and the others that have a TTL (named, windowed, blocks).
  Scopes whose TTL has run out while idle are dropped from the front of each, a bounded
  number per operation (the order is by last use, so a scope with a longer TTL in front may
  delay a shorter one behind it). The size cap ``max_scopes`` drops the least recently used
  idle *evictable* scope only: memory stays flat over millions of traces even when root
  spans never end (unsampled traces), and a user's daily budget is never forgotten before
  its day is over. When only scopes that must be kept are left, the ledger grows past
  ``max_scopes`` (logged once): the bound is then the number of live named scopes, each
  still dropped when its own TTL runs out (a scope with ``ttl=None`` stays for good).
* Leases expire: their deadlines go into a FIFO (the lease time is constant, so deadlines
  are in order). Settled leases leave stale FIFO entries, which are skipped, and the FIFO
  is compacted when it holds more than twice the open leases.
* Call tokens (``put_token`` / ``take_token``) live in an ``OrderedDict`` in the order they
  were put, with their deadlines and amounts: expired ones leave from the front (a bounded number per
  put), and at most ``max_tokens`` are held (the oldest go first, logged once: a token
  dropped early is only charged where it would have been trusted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from otel_budget.storage.base import (
    GLOBAL_PAUSE_KEY,
    MAX_AMOUNT,
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

logger = logging.getLogger("otel_budget.storage.memory")

_SWEEP_PER_OP = 8  # bound on expired leases/scopes handled per call: no latency spikes
_NOTHING = CommitResult(CommitStatus.DUPLICATE)
_OK = ReserveStatus.OK
# Results are built with tuple.__new__ on the hot path: a NamedTuple's generated __new__ is a
# Python call, about a microsecond per result on a slow machine.
_new_tuple = tuple.__new__


class _Scope:
    __slots__ = ("key", "limit", "spent", "reserved", "ttl", "expires_at", "home")

    def __init__(
        self, key: str, limit: int, ttl: float | None, now: float,
        home: OrderedDict[str, _Scope] | None,
    ) -> None:  # fmt: skip
        self.key = key
        self.limit = limit
        self.spent = 0
        self.reserved = 0
        self.ttl = ttl
        self.expires_at = now + ttl if ttl is not None else None
        self.home = home  # the LRU order it lives in (None: no TTL, never evictable)

    def snapshot(self) -> ScopeUsage:
        return ScopeUsage(self.key, self.limit, self.spent, self.reserved)


class _Lease:
    __slots__ = ("amount", "scopes", "deadline", "forgiven")

    def __init__(self, amount: int, scopes: tuple[_Scope, ...], deadline: float) -> None:
        self.amount = amount
        self.scopes = scopes
        self.deadline = deadline
        # Scopes reset by an operator while this lease was open: their ``reserved`` no longer
        # holds it (its commit still counts there as spend).
        self.forgiven: tuple[_Scope, ...] = ()


class MemoryStorage(LedgerStorage):
    """The default ledger: exact, thread-safe, bounded; shared only within one process."""

    shared = False  # one process: a trace scope is evicted when its local root ends

    def __init__(
        self,
        *,
        lease_seconds: float = 3600.0,
        max_scopes: int = 200_000,
        max_settled: int = 100_000,
        max_tokens: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_seconds <= 0 or max_scopes <= 0 or max_settled <= 0 or max_tokens <= 0:
            raise ValueError(
                "lease_seconds, max_scopes, max_settled and max_tokens must be positive"
            )
        self._lock = threading.Lock()
        self._clock = clock
        self._lease_seconds = float(lease_seconds)
        self._max_scopes = int(max_scopes)
        self._max_settled = int(max_settled)
        self._scopes: dict[str, _Scope] = {}
        self._evictable: OrderedDict[str, _Scope] = OrderedDict()  # LRU: cap and TTL
        self._kept: OrderedDict[str, _Scope] = OrderedDict()  # LRU, not evictable: TTL only
        self._leases: dict[LeaseId, _Lease] = {}
        self._deadlines: deque[tuple[float, LeaseId]] = deque()
        # Leases that expired before their commit: a late commit still counts as spend.
        self._expired: OrderedDict[LeaseId, _Lease] = OrderedDict()
        # Recently settled lease ids (-> what they were granted), so a retried
        # reserve/commit/charge counts nothing twice.
        self._settled: OrderedDict[LeaseId, int] = OrderedDict()
        self._paused: set[str] = set()
        # Call tokens -> (deadline, amount), in the order they were put.
        self._tokens: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._max_tokens = int(max_tokens)
        self._ops = 0
        self.expired_leases = 0  # counters, for tests and metrics
        self.evicted_scopes = 0
        self._warned_full = False
        self._warned_tokens = False

    # -- internals (called with the lock held) ------------------------------------------------
    def _scope(self, spec: ScopeLimit, now: float) -> _Scope:
        scope = self._scopes.get(spec.key)
        if scope is None:
            if spec.evictable:
                home: OrderedDict[str, _Scope] | None = self._evictable
            else:
                home = self._kept if spec.ttl is not None else None
            scope = _Scope(spec.key, spec.limit, spec.ttl, now, home)
            self._scopes[spec.key] = scope
            if home is not None:
                home[spec.key] = scope
            if len(self._scopes) > self._max_scopes:
                self._evict_lru(now)
        else:
            home = scope.home
            if home is not None:
                if home is self._evictable and not spec.evictable:
                    # Someone must keep it (e.g. a named scope sharing the key): never
                    # evictable again.
                    del home[spec.key]
                    home = scope.home = self._kept if scope.ttl is not None else None
                    if home is not None:
                        home[spec.key] = scope
                else:
                    home.move_to_end(spec.key)
            if spec.lower_only and spec.limit < scope.limit:
                scope.limit = spec.limit
            if scope.ttl is not None:
                scope.expires_at = now + scope.ttl
        return scope

    def _drop(self, scope: _Scope) -> None:
        del self._scopes[scope.key]
        if scope.home is not None:
            del scope.home[scope.key]

    def _evict_lru(self, now: float) -> None:
        # Evict idle evictable scopes from the LRU end; one with open reservations is moved
        # to the back instead. Scopes that are not evictable are never dropped by the cap.
        lru = self._evictable
        for _ in range(_SWEEP_PER_OP):
            if len(self._scopes) <= self._max_scopes or not lru:
                break
            key, scope = next(iter(lru.items()))
            if scope.reserved == 0:
                self._drop(scope)
                self.evicted_scopes += 1
            else:
                lru.move_to_end(key)
        if not lru and len(self._scopes) > self._max_scopes and not self._warned_full:
            self._warned_full = True
            logger.warning(
                "otel-budget: the in-memory ledger holds more than max_scopes=%d scopes that "
                "must be kept (named or windowed budgets); it grows past the cap, each scope "
                "still leaves when its own TTL runs out", self._max_scopes,
            )  # fmt: skip

    def _sweep(self, now: float) -> None:
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] <= now:
            for _ in range(_SWEEP_PER_OP):
                if not deadlines or deadlines[0][0] > now:
                    break
                _, lease_id = deadlines.popleft()
                lease = self._leases.get(lease_id)
                if lease is None or lease.deadline > now:
                    continue  # settled already, or re-reserved under the same id
                del self._leases[lease_id]
                for scope in lease.scopes:
                    scope.reserved -= lease.amount
                self._expired[lease_id] = lease
                self.expired_leases += 1
                if len(self._expired) > self._max_settled:
                    self._expired.popitem(last=False)
        if len(deadlines) > 2 * len(self._leases) + 1024:
            self._deadlines = deque(
                sorted((lease.deadline, lid) for lid, lease in self._leases.items())
            )
        # Idle scopes with a TTL leave from the LRU front; checked every few operations
        # only, which is plenty for a TTL measured in minutes.
        if self._ops & 15:
            return
        for order in (self._evictable, self._kept):
            for _ in range(_SWEEP_PER_OP):
                if not order:
                    break
                scope = next(iter(order.values()))
                if scope.expires_at is None or scope.expires_at > now or scope.reserved:
                    break
                self._drop(scope)
                self.evicted_scopes += 1

    def _mark_settled(self, lease_id: LeaseId, granted: int) -> None:
        self._settled[lease_id] = granted
        if len(self._settled) > self._max_settled:
            self._settled.popitem(last=False)

    # -- LedgerStorage ------------------------------------------------------------------------
    def reserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        if not (type(minimum) is int and type(maximum) is int and 0 <= minimum <= maximum < MAX_AMOUNT):
            minimum, maximum = reserve_range(minimum, maximum)
        specs = scopes if type(scopes) is tuple or isinstance(scopes, list) else tuple(scopes)
        with self._lock:
            now = self._clock()
            deadlines = self._deadlines
            self._ops += 1
            # The sweep only has work when a lease is due, the FIFO needs compacting, or
            # every 16th call (idle scopes); checked inline, it costs no call otherwise.
            if (
                (deadlines and deadlines[0][0] <= now)
                or not self._ops & 15
                or len(deadlines) > 2 * len(self._leases) + 1024
            ):
                self._sweep(now)
            held = self._leases.get(lease_id)
            if held is not None:
                return ReserveResult(ReserveStatus.DUPLICATE, None, held.amount)
            granted = self._settled.get(lease_id)
            if granted is not None:
                return ReserveResult(ReserveStatus.DUPLICATE, None, granted)
            if self._paused:
                for key in (GLOBAL_PAUSE_KEY, *pause_keys):
                    if key in self._paused:
                        return ReserveResult(ReserveStatus.PAUSED, ScopeUsage(key, 0, 0, 0))
            if len(specs) == 1:  # (the common case: one trace)
                resolved: tuple[_Scope, ...] = (self._scope(specs[0], now),)
            else:
                resolved = tuple([self._scope(spec, now) for spec in specs])
            grant = maximum
            for spec, scope in zip(specs, resolved, strict=True):
                limit = scope.limit
                cap = spec.cap
                if cap is not None and cap < limit:
                    limit = cap
                room = limit - scope.spent - scope.reserved
                if room < minimum:  # the first scope (in the caller's order) that refuses
                    return ReserveResult(
                        ReserveStatus.DENIED,
                        ScopeUsage(scope.key, limit, scope.spent, scope.reserved),
                    )
                if room < grant:
                    grant = room
            for scope in resolved:
                scope.reserved += grant
            deadline = now + self._lease_seconds
            self._leases[lease_id] = _Lease(grant, resolved, deadline)
            # (``self._deadlines``, not the local read before the sweep: compacting replaces it)
            self._deadlines.append((deadline, lease_id))
            return _new_tuple(ReserveResult, (_OK, None, grant))  # ReserveResult(OK, None, grant)

    def reserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        return self.reserve_up_to(lease_id, scopes, amount, amount, pause_keys)

    def commit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        if not (type(actual) is int and 0 <= actual < MAX_AMOUNT):
            actual = settle_amount(actual)
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            status = CommitStatus.OK
            if lease is None:
                lease = self._expired.pop(lease_id, None)
                if lease is None:
                    return _NOTHING
                status = CommitStatus.LATE
                for scope in lease.scopes:
                    scope.spent += actual
            else:
                for scope in lease.scopes:
                    if scope not in lease.forgiven:
                        scope.reserved -= lease.amount
                    scope.spent += actual
            self._mark_settled(lease_id, lease.amount)
            amount = lease.amount
            return _new_tuple(CommitResult, (  # CommitResult(...) without its Python __new__
                status, amount, actual - amount if actual > amount else 0,
                tuple([
                    _new_tuple(ScopeUsage, (scope.key, scope.limit, scope.spent, scope.reserved))
                    for scope in lease.scopes
                ]),
            ))  # fmt: skip

    def release(self, lease_id: LeaseId) -> CommitResult:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                self._expired.pop(lease_id, None)
                return CommitResult(CommitStatus.DUPLICATE)
            for scope in lease.scopes:
                if scope not in lease.forgiven:
                    scope.reserved -= lease.amount
            self._mark_settled(lease_id, lease.amount)
            return CommitResult(
                CommitStatus.RELEASED,
                lease.amount,
                0,
                tuple(scope.snapshot() for scope in lease.scopes),
            )

    def charge(self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int) -> CommitResult:
        amount = settle_amount(amount)
        with self._lock:
            if lease_id in self._settled or lease_id in self._leases:
                return CommitResult(CommitStatus.DUPLICATE)
            now = self._clock()
            resolved = tuple([self._scope(spec, now) for spec in scopes])
            for scope in resolved:
                scope.spent += amount
            self._mark_settled(lease_id, 0)
            return CommitResult(
                CommitStatus.OK, 0, amount, tuple(scope.snapshot() for scope in resolved)
            )

    def usage(self, key: str) -> ScopeUsage | None:
        with self._lock:
            scope = self._scopes.get(key)
            return None if scope is None else scope.snapshot()

    def set_limit(self, key: str, limit: int) -> None:
        if limit < 0:
            raise ValueError("a limit cannot be negative")
        with self._lock:
            scope = self._scopes.get(key)
            if scope is None:
                scope = _Scope(key, limit, None, self._clock(), None)
                self._scopes[key] = scope
            scope.limit = limit

    def pause(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        with self._lock:
            self._paused.add(key)

    def resume(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        with self._lock:
            self._paused.discard(key)

    def paused(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._paused)

    def scopes(self, prefix: str = "") -> list[ScopeUsage]:
        with self._lock:
            found = [s.snapshot() for key, s in self._scopes.items() if key.startswith(prefix)]
        found.sort(key=lambda usage: usage.key)
        return found

    def reset(self, key: str) -> bool:
        with self._lock:
            scope = self._scopes.get(key)
            if scope is None:
                return False
            if scope.reserved:
                for lease in self._leases.values():
                    if scope in lease.scopes and scope not in lease.forgiven:
                        lease.forgiven = (*lease.forgiven, scope)
            scope.spent = 0
            scope.reserved = 0
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            scope = self._scopes.get(key)
            if scope is None:
                return False
            self._drop(scope)  # open leases keep a detached copy: nothing reaches the ledger
            return True

    def evict(self, key: str) -> None:
        with self._lock:
            scope = self._scopes.get(key)
            # A scope with open reservations stays until they settle or expire.
            if scope is not None and not scope.reserved:
                self._drop(scope)

    def put_token(self, token: str, ttl_seconds: float, amount: int = 0) -> None:
        ttl = token_ttl(token, ttl_seconds, amount)
        with self._lock:
            now = self._clock()
            tokens = self._tokens
            tokens.pop(token, None)
            tokens[token] = (now + ttl, amount)
            for _ in range(_SWEEP_PER_OP):  # expired ones leave from the front
                if len(tokens) <= 1 or next(iter(tokens.values()))[0] > now:
                    break
                tokens.popitem(last=False)
            if len(tokens) > self._max_tokens:
                tokens.popitem(last=False)
                if not self._warned_tokens:
                    self._warned_tokens = True
                    logger.warning(
                        "otel-budget: the in-memory ledger holds max_tokens=%d call tokens; "
                        "the oldest are dropped (their calls are charged where they would "
                        "have been trusted)", self._max_tokens,
                    )  # fmt: skip

    def take_token(self, token: str) -> int | None:
        check_token(token)
        with self._lock:
            held = self._tokens.pop(token, None)
            return held[1] if held is not None and held[0] > self._clock() else None

    # -- asyncio: no I/O, so no thread hop (the lock is held for microseconds) ---------------
    async def areserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        return self.reserve_up_to(lease_id, scopes, minimum, maximum, pause_keys)

    async def areserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        return self.reserve_up_to(lease_id, scopes, amount, amount, pause_keys)

    async def acommit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        return self.commit(lease_id, actual)

    async def arelease(self, lease_id: LeaseId) -> CommitResult:
        return self.release(lease_id)

    async def acharge(
        self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int
    ) -> CommitResult:
        return self.charge(lease_id, scopes, amount)

    async def aput_token(self, token: str, ttl_seconds: float, amount: int = 0) -> None:
        self.put_token(token, ttl_seconds, amount)

    async def atake_token(self, token: str) -> int | None:
        return self.take_token(token)

    # -- introspection (tests, benchmarks) ----------------------------------------------------
    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "scopes": len(self._scopes),
                "leases": len(self._leases),
                "deadlines": len(self._deadlines),
                "expired": len(self._expired),
                "settled": len(self._settled),
                "tokens": len(self._tokens),
            }
