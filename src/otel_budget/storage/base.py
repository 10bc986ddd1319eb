"""The storage interface every ledger backend implements.

    >>> class MyStorage(LedgerStorage):
    ...     def reserve(self, lease_id, scopes, amount, pause_keys=()): ...

Contract (what the property and concurrency tests check for every implementation):

* Money is integer nano-USD. ``reserve`` is all-or-nothing across the scopes it is given:
  it reserves ``amount`` in every scope or in none, so ``spent + reserved <= limit`` holds
  in each scope at every instant (as long as commits do not exceed their reservation).
* Everything is idempotent by ``lease_id`` (the span): a retried reserve returns
  ``DUPLICATE`` and reserves nothing more; a retried commit or release counts nothing twice.
* ``commit`` records the actual cost truthfully, even above the reservation (never clamped,
  never dropped); the overshoot is returned so it can be reported.
* A reservation is a lease with a deadline: when it expires its amount is freed, and a
  commit that arrives later is still recorded as spend (``LATE``).
* Trace scopes are limited *downwards only* when ``lower_only`` is set: a stored limit is
  never raised by a later call (baggage may lower a budget, never raise it).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import NamedTuple

GLOBAL_PAUSE_KEY = "*"


class ScopeLimit(NamedTuple):
    """One scope a reservation must fit in: its storage key and limit (nano-USD)."""

    key: str
    limit: int
    # True for trace scopes: the stored limit becomes min(stored, limit), never higher.
    lower_only: bool = False
    # Seconds the scope may stay idle before a backend may forget it (None: keep). Traces
    # and budget blocks get a TTL so that traces whose root never ends still go away.
    ttl: float | None = None


class ScopeUsage(NamedTuple):
    key: str
    limit: int
    spent: int
    reserved: int

    @property
    def remaining(self) -> int:
        return self.limit - self.spent - self.reserved


class ReserveStatus(enum.Enum):
    OK = "ok"
    DUPLICATE = "duplicate"  # this lease id already holds a reservation: nothing added
    DENIED = "denied"  # the amount does not fit in ``denied`` (the first scope that refused)
    PAUSED = "paused"  # a kill switch is on (``denied.key`` names it)


class ReserveResult(NamedTuple):
    status: ReserveStatus
    # For DENIED/PAUSED: the usage of the scope that refused; otherwise None.
    denied: ScopeUsage | None = None
    granted: int = 0  # OK: what was reserved; DUPLICATE: what the lease holds

    @property
    def ok(self) -> bool:
        return self.status is ReserveStatus.OK or self.status is ReserveStatus.DUPLICATE


class CommitStatus(enum.Enum):
    OK = "ok"
    LATE = "late"  # the lease had expired; the spend was still recorded
    DUPLICATE = "duplicate"  # unknown or already settled lease: nothing counted
    RELEASED = "released"  # the reservation was given back, nothing spent


class CommitResult(NamedTuple):
    status: CommitStatus
    reserved: int = 0  # what the lease had reserved
    overshoot: int = 0  # max(0, actual - reserved)
    scopes: tuple[ScopeUsage, ...] = ()  # usage of each scope after the operation


LeaseId = Hashable


class LedgerStorage(ABC):
    """Atomic integer bookkeeping of budgets, shared by every caller of one backend."""

    @abstractmethod
    def reserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """Reserve ``amount`` in every scope, or in none. Checks the global kill switch
        and each of ``pause_keys`` first."""

    def reserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """Reserve as much as fits between ``minimum`` and ``maximum``, atomically."""
        raise NotImplementedError

    async def areserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        import asyncio

        return await asyncio.to_thread(
            self.reserve_up_to, lease_id, scopes, minimum, maximum, pause_keys
        )

    async def acommit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        import asyncio

        return await asyncio.to_thread(self.commit, lease_id, actual)

    async def arelease(self, lease_id: LeaseId) -> CommitResult:
        import asyncio

        return await asyncio.to_thread(self.release, lease_id)

    async def acharge(
        self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int
    ) -> CommitResult:
        import asyncio

        return await asyncio.to_thread(self.charge, lease_id, scopes, amount)

    @abstractmethod
    def commit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        """Settle a reservation with the actual cost (recorded even above the lease)."""

    @abstractmethod
    def release(self, lease_id: LeaseId) -> CommitResult:
        """Give a reservation back without spending (the call failed before billing)."""

    @abstractmethod
    def charge(self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int) -> CommitResult:
        """Record spend that had no reservation (a cost only known at span end, e.g. from
        another instrumentation). Idempotent by ``lease_id``; never refused."""

    @abstractmethod
    def usage(self, key: str) -> ScopeUsage | None:
        """Current usage of one scope, or None if the ledger does not know it."""

    @abstractmethod
    def set_limit(self, key: str, limit: int) -> None:
        """Set a scope's limit (an operator decision: may raise or lower it)."""

    @abstractmethod
    def pause(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        """Turn a kill switch on: every reservation that checks ``key`` is refused."""

    @abstractmethod
    def resume(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        """Turn a kill switch off."""

    @abstractmethod
    def paused(self) -> frozenset[str]:
        """The kill switches that are on."""

    @abstractmethod
    def evict(self, key: str) -> None:
        """Forget a scope that is finished (a trace whose root span ended)."""

    def scopes(self, prefix: str = "") -> list[ScopeUsage]:
        """Usage of every scope whose key starts with ``prefix``, sorted by key (an operator
        view, e.g. ``otel-budget show``; not for hot paths). Optional for a backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its scopes")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the in-memory storage has none."""
