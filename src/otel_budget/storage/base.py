"""The storage interface every ledger backend implements.

    >>> class MyStorage(LedgerStorage):
    ...     def reserve_up_to(self, lease_id, scopes, minimum, maximum, pause_keys=()): ...

Contract (what the property and concurrency tests check for every implementation):

* Money is integer nano-USD. ``reserve_up_to`` is all-or-nothing across the scopes it is
  given: in one atomic step it grants ``g = min(maximum, smallest room over the scopes)``
  when ``g >= minimum`` and reserves ``g`` in every scope, or reserves nothing (``DENIED``
  names the first scope, in the caller's order, whose room is below ``minimum``); so
  ``spent + reserved <= limit`` holds in each scope at every instant (as long as commits do
  not exceed their reservation). ``reserve(lease, scopes, amount)`` is exactly
  ``reserve_up_to(lease, scopes, amount, amount)``.
* The room of a scope is ``min(stored limit, cap) - spent - reserved``. ``cap`` narrows one
  reservation's check only and is never stored (baggage may narrow a check, never rewrite
  shared state); a scope that exists only because of a cap is written
  ``ScopeLimit(key, UNLIMITED, lower_only=True, cap=...)`` (``UNLIMITED`` never changes a
  stored limit and refuses nothing by itself).
* Everything is idempotent by ``lease_id`` (the span): a retried reserve returns
  ``DUPLICATE`` (with ``granted``: what that lease was granted) and reserves nothing more;
  a retried commit or release counts nothing twice.
* ``commit`` records the actual cost truthfully, even above the reservation (never clamped
  to the reservation, never dropped); the overshoot is returned so it can be reported. A bad
  amount never fails a commit or a charge: negative (or NaN, or not a number) counts 0, an
  absurd one (``10**30``, ``float('inf')``) counts ``MAX_AMOUNT``; the lease is settled.
* A reservation is a lease with a deadline: when it expires its amount is freed, and a
  commit that arrives later is still recorded as spend (``LATE``).
* Stored limits are lowered only when ``lower_only`` is set (trusted configuration, e.g. a
  trace's configured budget): a stored limit is then never raised by a later call.
* Scopes go away by their own ``ttl`` (idle time; ``None``: never), by ``evict``, or, in a
  bounded local ledger, by a size cap that only ever drops ``evictable`` scopes (traces):
  a named or windowed scope keeps its spend until its TTL says its window is over.
* ``shared`` is True for a ledger shared by several processes (Redis): a trace scope there
  ends by its TTL, since one service's root ending does not end the trace elsewhere.
* Call tokens (``put_token`` / ``take_token``): a random token registered with an
  ``amount`` (nano-USD, what the call was metered at) for at most ``ttl_seconds`` is taken
  at most once, atomically: the first ``take_token`` before it expires gets the amount,
  every other gets ``None`` (as for an unknown or expired token). A backend that cannot hold them raises ``NotImplementedError`` (optional: the
  caller then charges the call where it would have trusted the token). Used by the MCP
  instrumentation so that a tool call metered by its client is not charged again by a
  server on the same ledger.
* The ``a*`` methods are the same operations for asyncio code: by default the sync method
  runs in a worker thread (``asyncio.to_thread``), so a slow backend never blocks the loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, NamedTuple

GLOBAL_PAUSE_KEY = "*"
# The scope of calls outside any trace (a bare script). A shared ledger keeps it per process
# (Redis: ``process:<host>:<pid>:<start>`` with an idle TTL), never shared across processes.
PROCESS_SCOPE_KEY = "process"

# Every amount is clamped to this (Lua numbers are doubles: integers are exact below 2**53;
# nano-USD: ~$9.0M, far above MAX_BUDGET_USD). Also the limit of a scope that only exists
# because of a cap: UNLIMITED refuses nothing by itself.
MAX_AMOUNT = 2**53 - 1
UNLIMITED = MAX_AMOUNT

logger = logging.getLogger("otel_budget.storage")


def settle_amount(value: Any) -> int:
    """An actual cost as the ledger records it: never fails. Negative, NaN or not a number:
    0; above ``MAX_AMOUNT`` (or infinite): ``MAX_AMOUNT``; a fractional one is rounded up."""
    try:
        if isinstance(value, float):
            if math.isnan(value):
                raise ValueError("NaN")
            if value > 0 and not math.isinf(value):
                value = math.ceil(value)
        if value <= 0:
            return 0
        if value >= MAX_AMOUNT:
            if value > MAX_AMOUNT:
                logger.warning(
                    "otel-budget: an amount of %r nano-USD was clamped to %d", value, MAX_AMOUNT
                )
            return MAX_AMOUNT
        return int(value)
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        logger.warning("otel-budget: an amount of %r nano-USD is not a number; counted 0", value)
        return 0


# A call token: what ``put_token`` / ``take_token`` accept (a random hex string in practice;
# the bound keeps a ledger key small whatever a caller hands in).
MAX_TOKEN_CHARS = 128


def token_ttl(token: str, ttl_seconds: float, amount: int = 0) -> float:
    """Validated arguments of ``put_token``: the TTL in seconds. ``ValueError`` for a token
    that is not a string of 1 to ``MAX_TOKEN_CHARS`` characters, a TTL that is not a positive
    finite number, or an amount that is not an int in ``[0, MAX_AMOUNT]``."""
    check_token(token)
    if type(amount) is not int or not 0 <= amount <= MAX_AMOUNT:
        raise ValueError(f"a token's amount is an int of nano-USD in [0, 2**53), not {amount!r}")
    if (
        isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float))
        or not math.isfinite(ttl_seconds) or ttl_seconds <= 0
    ):  # fmt: skip
        raise ValueError(f"a token's ttl_seconds must be a positive number, not {ttl_seconds!r}")
    return float(ttl_seconds)


def check_token(token: str) -> None:
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
        raise ValueError(f"a call token is a string of 1 to {MAX_TOKEN_CHARS} characters")


def reserve_range(minimum: int, maximum: int) -> tuple[int, int]:
    """Validated ``(minimum, maximum)`` of a reservation, clamped to ``MAX_AMOUNT`` (above it
    every limit refuses anyway, so clamping changes no decision)."""
    if minimum < 0 or maximum < 0:
        raise ValueError("a reservation cannot be negative")
    if minimum > maximum:
        raise ValueError(f"a reservation's minimum ({minimum}) is above its maximum ({maximum})")
    return int(min(minimum, MAX_AMOUNT)), int(min(maximum, MAX_AMOUNT))


class ScopeLimit(NamedTuple):
    """One scope a reservation must fit in: its storage key and limit (nano-USD)."""

    key: str
    limit: int
    # Trusted configuration (a trace's budget): the stored limit becomes min(stored, limit),
    # never higher. Without it, the backend's rule for named scopes applies.
    lower_only: bool = False
    # Seconds the scope may stay idle before a backend may forget it (None: keep). Traces
    # and budget blocks get a TTL so that traces whose root never ends still go away.
    ttl: float | None = None
    # A limit for this one reservation's check only, never stored (e.g. a budget carried in
    # baggage: it may narrow this request's check, never another request's).
    cap: int | None = None
    # The scope may be dropped by a bounded local ledger's size cap (trace scopes). A scope
    # that is not evictable (named, windowed) goes only by its TTL or by ``evict``.
    evictable: bool = False


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
    DENIED = "denied"  # ``minimum`` does not fit in ``denied`` (the first scope that refused)
    PAUSED = "paused"  # a kill switch is on (``denied.key`` names it)


class ReserveResult(NamedTuple):
    status: ReserveStatus
    # For DENIED: the usage of the first scope (in the caller's order) whose room is below
    # ``minimum``, its ``limit`` being the one that applied to this check (min(stored, cap));
    # PAUSED: ``key`` names the switch.
    denied: ScopeUsage | None = None
    # OK: what was reserved; DUPLICATE: what that lease id was granted; otherwise 0.
    granted: int = 0

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

    # True when several processes share the ledger (Redis): a trace scope is then not
    # evicted when one process's local root ends (other services of the trace keep calling);
    # it ends by its TTL.
    shared: ClassVar[bool] = False

    @abstractmethod
    def reserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """In one atomic step, reserve ``g = min(maximum, smallest room over scopes)`` in
        every scope when ``g >= minimum`` (``OK``, ``granted=g``), else nothing (``DENIED``,
        with the first scope, in the given order, whose room is below ``minimum``). Checks the global kill switch and each of
        ``pause_keys`` first (``PAUSED``). ``ValueError`` if an amount is negative or
        ``minimum > maximum``; both are clamped to ``MAX_AMOUNT``."""

    def reserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """Reserve exactly ``amount`` in every scope, or in none:
        ``reserve_up_to(lease_id, scopes, amount, amount, pause_keys)``."""
        return self.reserve_up_to(lease_id, scopes, amount, amount, pause_keys)

    @abstractmethod
    def commit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        """Settle a reservation with the actual cost (recorded even above the lease; a bad
        amount is recorded as ``settle_amount(actual)``, never an error)."""

    @abstractmethod
    def release(self, lease_id: LeaseId) -> CommitResult:
        """Give a reservation back without spending (the call failed before billing)."""

    @abstractmethod
    def charge(self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int) -> CommitResult:
        """Record spend that had no reservation (a cost only known at span end, e.g. from
        another instrumentation). Idempotent by ``lease_id``; never refused (a bad amount is
        recorded as ``settle_amount(amount)``)."""

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

    def reset(self, key: str) -> bool:
        """Set a scope's spent and reserved to 0, keeping its limit (an operator decision).
        Commits of leases open at the time still count there as spend. False if the ledger
        does not know the scope. Optional for a backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot reset a scope")

    def delete(self, key: str) -> bool:
        """Forget a scope entirely, even with open reservations (an operator decision).
        False if the ledger does not know it. Optional for a backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete a scope")

    def put_token(self, token: str, ttl_seconds: float, amount: int = 0) -> None:
        """Register a call token with ``amount`` (nano-USD) for at most ``ttl_seconds`` (put
        again: replaced, the TTL starts over). ``ValueError`` for a bad argument
        (``token_ttl``). Optional for a backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold call tokens")

    def take_token(self, token: str) -> int | None:
        """Take a registered token, atomically: its amount for the first taker before it
        expires, ``None`` for every other (unknown, expired, taken). Optional for a backend."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold call tokens")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the in-memory storage has none."""

    # -- asyncio ------------------------------------------------------------------------------
    # Defaults run the sync operation in a worker thread, so a slow or frozen backend never
    # blocks the event loop (its own timeouts still bound the wait). A backend without I/O
    # overrides them with direct calls.
    async def areserve_up_to(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        minimum: int,
        maximum: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """``reserve_up_to`` for asyncio code."""
        return await asyncio.to_thread(
            self.reserve_up_to, lease_id, scopes, minimum, maximum, pause_keys
        )

    async def areserve(
        self,
        lease_id: LeaseId,
        scopes: Sequence[ScopeLimit],
        amount: int,
        pause_keys: Sequence[str] = (),
    ) -> ReserveResult:
        """``reserve`` for asyncio code."""
        return await self.areserve_up_to(lease_id, scopes, amount, amount, pause_keys)

    async def acommit(self, lease_id: LeaseId, actual: int) -> CommitResult:
        """``commit`` for asyncio code."""
        return await asyncio.to_thread(self.commit, lease_id, actual)

    async def arelease(self, lease_id: LeaseId) -> CommitResult:
        """``release`` for asyncio code."""
        return await asyncio.to_thread(self.release, lease_id)

    async def acharge(
        self, lease_id: LeaseId, scopes: Sequence[ScopeLimit], amount: int
    ) -> CommitResult:
        """``charge`` for asyncio code."""
        return await asyncio.to_thread(self.charge, lease_id, scopes, amount)

    async def aput_token(self, token: str, ttl_seconds: float, amount: int = 0) -> None:
        """``put_token`` for asyncio code."""
        await asyncio.to_thread(self.put_token, token, ttl_seconds, amount)

    async def atake_token(self, token: str) -> int | None:
        """``take_token`` for asyncio code."""
        return await asyncio.to_thread(self.take_token, token)
