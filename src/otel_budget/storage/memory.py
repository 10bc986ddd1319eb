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
* Scopes live in an ``OrderedDict`` in least-recently-used order. Scopes with a TTL (traces,
  budget blocks, sessions) that stay idle are dropped from the front, a bounded number per
  operation, and a hard cap evicts the least recently used idle scope: memory stays flat
  over millions of traces even when root spans never end (unsampled traces).
* Leases expire: their deadlines go into a FIFO (the lease time is constant, so deadlines
  are in order). Settled leases leave stale FIFO entries, which are skipped, and the FIFO
  is compacted when it holds more than twice the open leases.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from otel_budget.storage.base import (
    GLOBAL_PAUSE_KEY,
    CommitResult,
    CommitStatus,
    LeaseId,
    LedgerStorage,
    ReserveResult,
    ReserveStatus,
    ScopeLimit,
    ScopeUsage,
)

_SWEEP_PER_OP = 8  # bound on expired leases/scopes handled per call: no latency spikes
_RESERVED = ReserveResult(ReserveStatus.OK)  # immutable: one instance for every success
_DUPLICATE = ReserveResult(ReserveStatus.DUPLICATE)
_NOTHING = CommitResult(CommitStatus.DUPLICATE)


class _Scope:
    __slots__ = ("key", "limit", "spent", "reserved", "ttl", "expires_at")

    def __init__(self, key: str, limit: int, ttl: float | None, now: float) -> None:
        self.key = key
        self.limit = limit
        self.spent = 0
        self.reserved = 0
        self.ttl = ttl
        self.expires_at = now + ttl if ttl is not None else None

    def snapshot(self) -> ScopeUsage:
        return ScopeUsage(self.key, self.limit, self.spent, self.reserved)


class _Lease:
    __slots__ = ("amount", "scopes", "deadline")

    def __init__(self, amount: int, scopes: tuple[_Scope, ...], deadline: float) -> None:
        self.amount = amount
        self.scopes = scopes
        self.deadline = deadline


class MemoryStorage(LedgerStorage):
    """The default ledger: exact, thread-safe, bounded; shared only within one process."""

    def __init__(
        self,
        *,
        lease_seconds: float = 3600.0,
        max_scopes: int = 200_000,
        max_settled: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_seconds <= 0 or max_scopes <= 0 or max_settled <= 0:
            raise ValueError("lease_seconds, max_scopes and max_settled must be positive")
        self._lock = threading.Lock()
        self._clock = clock
        self._lease_seconds = float(lease_seconds)
        self._max_scopes = int(max_scopes)
        self._max_settled = int(max_settled)
        self._scopes: OrderedDict[str, _Scope] = OrderedDict()
        self._leases: dict[LeaseId, _Lease] = {}
        self._deadlines: deque[tuple[float, LeaseId]] = deque()
        # Leases that expired before their commit: a late commit still counts as spend.
        self._expired: OrderedDict[LeaseId, _Lease] = OrderedDict()
        # Recently settled lease ids, so a retried reserve/commit/charge counts nothing twice.
        self._settled: OrderedDict[LeaseId, None] = OrderedDict()
        self._paused: set[str] = set()
        self._ops = 0
        self.expired_leases = 0  # counters, for tests and metrics
        self.evicted_scopes = 0

    # -- internals (called with the lock held) ------------------------------------------------
    def _scope(self, spec: ScopeLimit, now: float) -> _Scope:
        scope = self._scopes.get(spec.key)
        if scope is None:
            scope = _Scope(spec.key, spec.limit, spec.ttl, now)
            self._scopes[spec.key] = scope
            if len(self._scopes) > self._max_scopes:
                self._evict_lru(now)
        else:
            self._scopes.move_to_end(spec.key)
            if spec.lower_only:
                if spec.limit < scope.limit:
                    scope.limit = spec.limit
            if scope.ttl is not None:
                scope.expires_at = now + scope.ttl
        return scope

    def _evict_lru(self, now: float) -> None:
        # Evict idle scopes from the LRU end; a scope with open reservations, or one without
        # a TTL (a named cap), is never dropped by the cap: it is moved to the back instead.
        for _ in range(_SWEEP_PER_OP):
            if len(self._scopes) <= self._max_scopes:
                return
            key, scope = next(iter(self._scopes.items()))
            if scope.reserved == 0 and scope.ttl is not None:
                del self._scopes[key]
                self.evicted_scopes += 1
            else:
                self._scopes.move_to_end(key)

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
        scopes = self._scopes
        for _ in range(_SWEEP_PER_OP):
            if not scopes:
                break
            key, scope = next(iter(scopes.items()))
            if scope.expires_at is None or scope.expires_at > now or scope.reserved:
                break
            del scopes[key]
            self.evicted_scopes += 1

    def _mark_settled(self, lease_id: LeaseId) -> None:
        self._settled[lease_id] = None
        if len(self._settled) > self._max_settled:
            self._settled.popitem(last=False)

    # -- LedgerStorage ------------------------------------------------------------------------
    def reserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        return self.reserve_up_to(lease_id, scopes, amount, amount, pause_keys)

    def reserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        if minimum < 0 or maximum < minimum:
            raise ValueError("a reservation needs 0 <= minimum <= maximum")
        with self._lock:
            now = self._clock()
            deadlines = self._deadlines
            self._ops += 1
            if (
                (deadlines and deadlines[0][0] <= now)
                or not self._ops & 15
                or len(deadlines) > 2 * len(self._leases) + 1024
            ):
                self._sweep(now)
            held = self._leases.get(lease_id)
            if held is not None:
                return ReserveResult(ReserveStatus.DUPLICATE, None, held.amount)
            if lease_id in self._settled:
                return _DUPLICATE
            if self._paused:
                for key in (GLOBAL_PAUSE_KEY, *pause_keys):
                    if key in self._paused:
                        return ReserveResult(ReserveStatus.PAUSED, ScopeUsage(key, 0, 0, 0))
            resolved = tuple([self._scope(spec, now) for spec in scopes])
            amount = maximum
            tightest = None
            for scope in resolved:
                room = scope.limit - scope.spent - scope.reserved
                if room < amount:
                    amount = room
                    tightest = scope
            if amount < minimum:
                assert tightest is not None
                return ReserveResult(ReserveStatus.DENIED, tightest.snapshot())
            for scope in resolved:
                scope.reserved += amount
            deadline = now + self._lease_seconds
            self._leases[lease_id] = _Lease(amount, resolved, deadline)
            self._deadlines.append((deadline, lease_id))
            return ReserveResult(ReserveStatus.OK, None, amount)

    async def areserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        return self.reserve_up_to(lease_id, scopes, minimum, maximum, pause_keys)

    async def acommit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        return self.commit(lease_id, actual)

    async def arelease(self, lease_id: LeaseId) -> CommitResult:
        return self.release(lease_id)

    async def acharge(
        self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int
    ) -> CommitResult:
        return self.charge(lease_id, scopes, amount)

    def commit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        if actual < 0:
            raise ValueError("an actual cost cannot be negative")
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
                    scope.reserved -= lease.amount
                    scope.spent += actual
            self._mark_settled(lease_id)
            return CommitResult(
                status,
                lease.amount,
                actual - lease.amount if actual > lease.amount else 0,
                tuple([scope.snapshot() for scope in lease.scopes]),
            )

    def release(self, lease_id: LeaseId) -> CommitResult:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                self._expired.pop(lease_id, None)
                return CommitResult(CommitStatus.DUPLICATE)
            for scope in lease.scopes:
                scope.reserved -= lease.amount
            self._mark_settled(lease_id)
            return CommitResult(
                CommitStatus.RELEASED,
                lease.amount,
                0,
                tuple(scope.snapshot() for scope in lease.scopes),
            )

    def charge(self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int) -> CommitResult:
        if amount < 0:
            raise ValueError("a charge cannot be negative")
        with self._lock:
            if lease_id in self._settled or lease_id in self._leases:
                return CommitResult(CommitStatus.DUPLICATE)
            now = self._clock()
            resolved = tuple([self._scope(spec, now) for spec in scopes])
            for scope in resolved:
                scope.spent += amount
            self._mark_settled(lease_id)
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
                scope = _Scope(key, limit, None, self._clock())
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

    def evict(self, key: str) -> None:
        with self._lock:
            scope = self._scopes.get(key)
            # A scope with open reservations stays until they settle or expire.
            if scope is not None and not scope.reserved:
                del self._scopes[key]

    # -- introspection (tests, benchmarks) ----------------------------------------------------
    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "scopes": len(self._scopes),
                "leases": len(self._leases),
                "deadlines": len(self._deadlines),
                "expired": len(self._expired),
                "settled": len(self._settled),
            }
