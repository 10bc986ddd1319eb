"""The budget engine: reserve, settle, release, refuse, account; one per runtime.

    >>> engine = runtime.engine                                     # doctest: +SKIP
    >>> charge = engine.reserve(lease_id, trace_id, False, attributes, projected_nanos)  # doctest: +SKIP
    >>> engine.settle(charge, actual_nanos)                         # doctest: +SKIP

The engine does not depend on spans reaching a span processor: instrumentors call it
directly, keyed by the trace id of the span context, so that a sampler that drops a span,
or a process with no SDK ``TracerProvider`` at all, does not switch enforcement off.
``BudgetSpanProcessor`` is the OpenTelemetry face of the same engine.

Its parts: ``otel_budget.scopes`` (which scopes a call belongs to, per-trace totals),
``otel_budget.thresholds`` (soft limits) and ``otel_budget.logs`` (the rate-limited log of
our own failures and of refusals); this module keeps the decisions.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.context import CURRENT_AGENT
from otel_budget.errors import (
    REASON_CONFIGURATION,
    REASON_INTERNAL_ERROR,
    REASON_INVALID_REQUEST,
    REASON_LIMIT,
    REASON_LOOP,
    REASON_PAUSED,
    REASON_UNKNOWN_MODEL,
    BudgetExceededError,
    Substitute,
)
from otel_budget.logs import RateLimitedLog
from otel_budget.loops import ACTION_REFUSE, LoopDetector
from otel_budget.loops import KIND_TOOL as KIND_TOOL_LOOP
from otel_budget.money import NANOS_PER_USD, format_usds, to_usd
from otel_budget.report import (
    TERMINATED_BY_BUDGET,
    TERMINATED_BY_CONFIGURATION,
    TERMINATED_BY_INTERNAL_ERROR,
    TERMINATED_BY_INVALID_REQUEST,
    TERMINATED_BY_LOOP,
    TERMINATED_BY_PAUSE,
    TERMINATED_BY_UNKNOWN_MODEL,
    TraceStats,
)
from otel_budget.scopes import PROCESS_SCOPE, ScopeResolution, trace_key
from otel_budget.settings import FAIL_CLOSED, BudgetSettings
from otel_budget.steps import Op, Steps, call_op
from otel_budget.storage import (
    CommitStatus,
    LedgerStorage,
    ReserveStatus,
    ScopeLimit,
    ScopeUsage,
)
from otel_budget.thresholds import ThresholdAlerts, threshold_due

__all__ = [
    "KIND_LLM", "KIND_TOOL", "MAX_AMOUNT", "PROCESS_SCOPE", "BudgetEngine", "Charge",
    "RateLimitedLog", "clamp_amount", "trace_key",
]  # fmt: skip

logger = logging.getLogger("otel_budget")

KIND_LLM = "llm"
KIND_TOOL = "tool"
_TERMINATION = {
    REASON_LIMIT: TERMINATED_BY_BUDGET,
    REASON_PAUSED: TERMINATED_BY_PAUSE,
    REASON_UNKNOWN_MODEL: TERMINATED_BY_UNKNOWN_MODEL,
    REASON_INTERNAL_ERROR: TERMINATED_BY_INTERNAL_ERROR,
    REASON_INVALID_REQUEST: TERMINATED_BY_INVALID_REQUEST,
    REASON_CONFIGURATION: TERMINATED_BY_CONFIGURATION,
    REASON_LOOP: TERMINATED_BY_LOOP,
}
# Ops and results are built with tuple.__new__ on the hot path: a NamedTuple's generated
# __new__ is a Python call per ledger operation.
_new_tuple = tuple.__new__
_RESERVED = ReserveStatus.OK
_DUPLICATE = ReserveStatus.DUPLICATE
# The largest amount a single call may move (nano-USD, about $9M): a ledger whose numbers are
# doubles (Lua) stays exact below 2**53, and an absurd reported usage never fails a commit.
MAX_AMOUNT = (1 << 53) - 1


def clamp_amount(amount: Any) -> int:
    """An amount the ledger can always record: an int in ``[0, MAX_AMOUNT]``."""
    try:
        value = int(amount)
    except (TypeError, ValueError, OverflowError):
        return MAX_AMOUNT
    return 0 if value < 0 else MAX_AMOUNT if value > MAX_AMOUNT else value


def _refusal_kind(reason: str, usage: ScopeUsage | None) -> str:
    """What refusals are counted together in the log: per reason, and per named scope (a
    run's own scope, ``t:``/``b:``, is one of thousands: counted under its kind)."""
    if usage is None:
        return f"calls refused ({reason})"
    key = usage.key
    if key.startswith(("t:", "b:")):
        key = "trace" if key.startswith("t:") else "budget block"
    return f"calls refused ({reason}, scope {key})"


class Charge:
    """One call's reservation: what it reserved where, and whom to report to."""

    __slots__ = (
        "lease_id", "trace_id", "scopes", "projected", "kind", "name", "provider",
        "operation", "stats", "settled", "input_tokens", "output_tokens", "reserved", "agent",
    )  # fmt: skip

    def __init__(
        self, lease_id: Any, trace_id: int, scopes: tuple[ScopeLimit, ...], projected: int,
        kind: str, name: str, provider: str, operation: str, stats: tuple[TraceStats, ...],
    ) -> None:  # fmt: skip
        self.lease_id = lease_id
        self.trace_id = trace_id
        self.scopes = scopes
        self.projected = projected
        self.kind = kind
        self.name = name  # model for LLM calls, tool name for tools
        self.provider = provider
        self.operation = operation
        self.stats = stats
        self.settled = False
        self.input_tokens = 0
        self.output_tokens = 0
        self.reserved = False  # holds a lease in the storage (settle it there)
        self.agent: str | None = CURRENT_AGENT.get()  # the agent the call is made for


class BudgetEngine(ScopeResolution, ThresholdAlerts):
    """Budget decisions for one processor; safe to call from any thread or task."""

    def __init__(
        self,
        settings: BudgetSettings,
        storage: LedgerStorage,
        prices: Any,
        *,
        clock: Callable[[], float] = time.time,
        log_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.prices = prices
        self.clock = clock
        self.log_once = RateLimitedLog(
            logger, interval=settings.log_interval_seconds, clock=log_clock
        )
        self._lock = threading.Lock()
        self._traces: OrderedDict[int, TraceStats] = OrderedDict()
        self._named_thresholds: OrderedDict[str, int] = OrderedDict()
        self._scope_overrides: dict[tuple[str, str], int] = {}
        self._process_stats = TraceStats(None, settings.limit_nanos)
        self._process_spec: ScopeLimit | None = None
        self.metrics: Any = None  # a BudgetMetrics, set by the processor
        policy = settings.loop_detection
        self.loops = LoopDetector(policy) if policy is not None else None

    def new_lease_id(self) -> int:
        """A lease id for a call whose span has no usable id (no SDK, or an invalid span).
        Random, so that processes sharing a ledger cannot collide; negative, so that it
        cannot collide with span-derived ids."""
        return -(random.getrandbits(126) + 1)

    # -- the decision -------------------------------------------------------------------------
    # Each ledger decision is written once, as the work before its one storage operation
    # (``reserve_plan``, ``settle_plan``) and the work after it (``reserved``, ``settled``).
    # ``reserve_steps``/``settle_steps`` put them around a ``yield`` of that operation (see
    # ``otel_budget.steps``: run sync or async, and composed by larger decisions);
    # ``reserve``/``settle`` put them around the blocking call itself, without a generator:
    # the per-call path of every sync wrapper.
    def reserve_plan(
        self,
        lease_id: Any,
        trace_id: int,
        parentless: bool,
        attributes: Mapping[str, Any] | None,
        minimum: int,
        maximum: int,
        kind: str = KIND_LLM,
        name: str = "unknown",
        provider: str = "unknown",
        operation: str = "chat",
        loop: tuple[str, bytes] | None = None,
    ) -> tuple[Charge, Op]:
        """The charge of one call and the ledger operation that reserves it (between
        ``minimum`` and ``maximum``, as much as every scope affords, in one atomic step).
        ``loop`` (kind, fingerprint) is first checked by loop detection, which may refuse the
        call (``BudgetExceededError``)."""
        scopes, stats, pause_keys = self.scopes_for(trace_id, parentless, attributes)
        charge = Charge(lease_id, trace_id, scopes, minimum, kind, name, provider, operation, stats)
        if loop is not None and self.loops is not None:
            self.check_loop(charge, loop[0], loop[1])
        return charge, _new_tuple(Op, ("reserve_up_to", (lease_id, scopes, minimum, maximum, pause_keys)))

    def reserved(self, charge: Charge, result: Any, minimum: int, maximum: int) -> Charge:
        """The charge once the ledger answered its reservation; or ``BudgetExceededError``.
        The charge's ``projected`` is what was granted."""
        status = result.status
        if status is _RESERVED or status is _DUPLICATE:  # ``result.ok``, without a property call
            charge.reserved = True
            charge.projected = result.granted if result.granted else maximum
            return charge
        usage = result.denied
        assert usage is not None
        if status is ReserveStatus.PAUSED:
            raise self.refusal(
                REASON_PAUSED, charge, usage,
                f"otel-budget: calls are paused by the kill switch {usage.key!r}",
            )  # fmt: skip
        projected, spent, reserved, limit = format_usds(
            minimum, usage.spent, usage.reserved, usage.limit
        )
        raise self.refusal(
            REASON_LIMIT, charge, usage,
            f"otel-budget: {charge.name} call projected at {projected} would exceed the budget "
            f"of scope {usage.key!r}: {spent} spent + {reserved} reserved of {limit}",
        )  # fmt: skip

    def reserve_steps(
        self,
        lease_id: Any,
        trace_id: int,
        parentless: bool,
        attributes: Mapping[str, Any] | None,
        minimum: int,
        maximum: int | None = None,
        *,
        kind: str = KIND_LLM,
        name: str = "unknown",
        provider: str = "unknown",
        operation: str = "chat",
        loop: tuple[str, bytes] | None = None,
    ) -> Steps[Charge]:
        """Reserve between ``minimum`` and ``maximum`` nano-USD for one call (``reserve_plan``,
        then ``reserved``), as a step of a larger decision. (Its keywords are spelled out, here
        and in ``reserve``: passed on as ``**kw`` they cost ~10k instructions per call.)"""
        if maximum is None:
            maximum = minimum
        charge, op = self.reserve_plan(
            lease_id, trace_id, parentless, attributes, minimum, maximum,
            kind, name, provider, operation, loop,
        )  # fmt: skip
        result = yield op
        return self.reserved(charge, result, minimum, maximum)

    def reserve(
        self,
        lease_id: Any,
        trace_id: int,
        parentless: bool,
        attributes: Mapping[str, Any] | None,
        minimum: int,
        maximum: int | None = None,
        *,
        kind: str = KIND_LLM,
        name: str = "unknown",
        provider: str = "unknown",
        operation: str = "chat",
        loop: tuple[str, bytes] | None = None,
    ) -> Charge:
        """``reserve_steps`` with the blocking ledger call."""
        if maximum is None:
            maximum = minimum
        charge, op = self.reserve_plan(
            lease_id, trace_id, parentless, attributes, minimum, maximum,
            kind, name, provider, operation, loop,
        )  # fmt: skip
        return self.reserved(charge, call_op(self.storage, op), minimum, maximum)

    def unmetered(
        self, lease_id: Any, trace_id: int, projected: int, *, kind: str, name: str,
        provider: str, operation: str, parentless: bool = False,
        attributes: Mapping[str, Any] | None = None,
    ) -> Charge:  # fmt: skip
        """A call let through without a reservation (fail_open after an internal error).
        Its cost still shows in the run's report and, best effort, is charged to the ledger
        when the call settles (a shared ledger journals it until it is reachable again)."""
        try:
            scopes, stats, _ = self.scopes_for(trace_id, parentless, attributes)
        except Exception:
            scopes = ()
            one = self.trace_stats(trace_id) if trace_id else self._process_stats
            stats = (one,) if one is not None else ()
        return Charge(lease_id, trace_id, scopes, projected, kind, name, provider, operation, stats)

    def free(
        self, lease_id: Any, trace_id: int, parentless: bool,
        attributes: Mapping[str, Any] | None, *, kind: str, name: str, provider: str,
        operation: str,
    ) -> Charge:  # fmt: skip
        """A call that costs nothing (a prompt-cache hit): it reports to its runs' totals and
        touches no ledger scope (settling it makes no storage operation)."""
        charge = self.unmetered(
            lease_id, trace_id, 0, kind=kind, name=name, provider=provider,
            operation=operation, parentless=parentless, attributes=attributes,
        )  # fmt: skip
        charge.scopes = ()
        return charge

    def unreserved(
        self, lease_id: Any, trace_id: int, parentless: bool,
        attributes: Mapping[str, Any] | None, *, kind: str, name: str, provider: str,
        operation: str,
    ) -> Charge:  # fmt: skip
        """A call seen only when it ended (another instrumentation's span that started before
        this processor saw it): settling it charges the ledger without a reservation."""
        scopes, stats, _ = self.scopes_for(trace_id, parentless, attributes)
        return Charge(lease_id, trace_id, scopes, 0, kind, name, provider, operation, stats)

    def refusal(
        self, reason: str, charge: Charge, usage: ScopeUsage | None, message: str
    ) -> BudgetExceededError:
        """Build the error, record the abort in every report, fire ``on_exceeded``."""
        primary = charge.stats[0] if charge.stats else None
        if self.metrics is not None:
            try:
                self.metrics.record_abort(usage.key if usage is not None else "unknown", reason)
            except Exception as exc:
                self.log_once("metrics", exc)
        for stats in charge.stats:
            stats.record_abort(
                _TERMINATION[reason], scope=usage.key if usage else "", model=charge.name,
                projected_usd=to_usd(charge.projected),
            )  # fmt: skip
        limit = usage.limit if usage is not None and reason == REASON_LIMIT else None
        error = BudgetExceededError(
            message,
            budget_usd=None if limit is None else to_usd(limit),
            spent_usd=to_usd(usage.spent) if usage else 0.0,
            reserved_usd=to_usd(usage.reserved) if usage else 0.0,
            projected_usd=to_usd(charge.projected),
            remaining_usd=None if limit is None else to_usd(usage.remaining),  # type: ignore[union-attr]
            scope=usage.key if usage else "",
            trace_id=f"{charge.trace_id:032x}" if charge.trace_id else None,
            reason=reason,
            report=primary.report() if primary is not None else None,
        )
        for stats in charge.stats:
            root = stats.root_span
            if root is not None:
                try:
                    root.add_event(attrs.EVENT_EXCEEDED, {
                        "otel_budget.reason": reason,
                        attrs.BUDGET_SCOPE: error.scope,
                        attrs.COST_PROJECTED_USD: error.projected_usd,
                    })  # fmt: skip
                except Exception as exc:  # a misbehaving span must not hide the refusal
                    self.log_once("root_event", exc)
        # One line per refusal would flood the log in an outage (fail_closed refuses every
        # call) or when many runs hit their limit: the first of a kind in full, then counts.
        self.log_once.warning(_refusal_kind(reason, usage), message)
        callback = self.settings.on_exceeded
        if callback is not None:
            try:
                answer = callback(error.to_dict())
                if isinstance(answer, Substitute):
                    error.substitute = answer
            except Exception as exc:
                self.log_once("on_exceeded callback", exc)
        return error

    def settle_plan(
        self, charge: Charge, actual: int, input_tokens: int = 0, output_tokens: int = 0
    ) -> tuple[int, Op | None] | None:
        """Settle a charge once: (the actual cost as the ledger records it, the operation that
        records it: a commit, a charge without reservation, or None), or None when it was
        settled already. The one place where spend reaches the ledger."""
        if charge.settled:
            return None
        charge.settled = True
        charge.input_tokens = input_tokens
        charge.output_tokens = output_tokens
        if type(actual) is not int or not 0 <= actual <= MAX_AMOUNT:  # (what it returns, inline)
            actual = clamp_amount(actual)
        if charge.reserved:
            return actual, _new_tuple(Op, ("commit", (charge.lease_id, actual)))
        if charge.scopes:  # unreserved: let through under fail_open, or seen only at span end
            return actual, _new_tuple(Op, ("charge", (charge.lease_id, charge.scopes, actual)))
        return actual, None

    def settled(self, charge: Charge, actual: int, result: Any) -> int:
        """Account a settled charge once the ledger answered (``result``: None without an
        operation, or the exception the operation raised: raised again for a commit, logged
        for a charge without reservation); returns the overshoot over its reservation."""
        if isinstance(result, Exception):
            if charge.reserved:
                raise result
            self.log_once("charge without reservation", result)
            result = None
        usages: tuple[ScopeUsage, ...] = ()
        if charge.reserved:
            if result.status is CommitStatus.DUPLICATE:
                return 0
            overshoot: int = result.overshoot
            usages = result.scopes
        else:
            overshoot = actual - charge.projected if actual > charge.projected else 0
            if result is not None:
                if result.status is CommitStatus.DUPLICATE:
                    return 0
                usages = result.scopes
        self._account(charge, actual, overshoot)
        if overshoot:
            cost, more = format_usds(actual, overshoot)
            logger.info(
                "otel-budget: %s cost %s, %s more than its reservation", charge.name, cost, more
            )
        if (usages or charge.stats) and threshold_due(charge, usages):
            self._check_thresholds(charge, usages)
        return overshoot

    def settle_steps(
        self, charge: Charge, actual: int, input_tokens: int = 0, output_tokens: int = 0
    ) -> Steps[int]:
        """Commit the actual cost of a call (reserved or not); returns the overshoot."""
        planned = self.settle_plan(charge, actual, input_tokens, output_tokens)
        if planned is None or planned[1] is None:
            return 0 if planned is None else self.settled(charge, planned[0], None)
        try:
            result = yield planned[1]
        except Exception as exc:
            result = exc
        return self.settled(charge, planned[0], result)

    def settle(
        self, charge: Charge, actual: int, input_tokens: int = 0, output_tokens: int = 0
    ) -> int:
        """``settle_steps`` with the blocking ledger call."""
        planned = self.settle_plan(charge, actual, input_tokens, output_tokens)
        if planned is None or planned[1] is None:
            return 0 if planned is None else self.settled(charge, planned[0], None)
        try:
            result = call_op(self.storage, planned[1])
        except Exception as exc:
            result = exc
        return self.settled(charge, planned[0], result)

    def release_plan(self, charge: Charge) -> Op | None:
        """The call failed before it was billed: the operation that gives the reservation
        back, charging nothing (None: settled already, or nothing reserved)."""
        if charge.settled:
            return None
        charge.settled = True
        return _new_tuple(Op, ("release", (charge.lease_id,))) if charge.reserved else None

    def release_steps(self, charge: Charge) -> Steps[None]:
        op = self.release_plan(charge)
        if op is not None:
            yield op
        return None

    def release(self, charge: Charge) -> None:
        op = self.release_plan(charge)
        if op is not None:
            call_op(self.storage, op)

    def _account(self, charge: Charge, actual: int, overshoot: int) -> None:
        if self.metrics is not None:
            try:
                self.metrics.record_cost(
                    actual / NANOS_PER_USD, kind=charge.kind, provider=charge.provider,
                    name=charge.name, operation=charge.operation,
                )  # fmt: skip
            except Exception as exc:
                self.log_once("metrics", exc)
        for stats in charge.stats:
            if charge.kind == KIND_TOOL:
                stats.add_tool(actual, charge.name, overshoot, charge.agent)
            else:
                stats.add_llm(
                    actual, charge.name, charge.provider, charge.operation,
                    charge.input_tokens, charge.output_tokens, overshoot, charge.agent,
                )  # fmt: skip

    # -- loops --------------------------------------------------------------------------------
    def check_loop(self, charge: Charge, kind: str, digest: bytes) -> None:
        """Remember this call in its run's history; when it completes a loop, report it (root
        span event, metric, ``on_loop_detected``) and, under ``action="refuse"``, raise."""
        detector = self.loops
        assert detector is not None
        run_key = charge.stats[0].key if charge.stats else PROCESS_SCOPE
        hit = detector.observe(run_key, kind, charge.name, digest)
        if hit is None:
            return
        info = hit.to_dict()
        if self.metrics is not None:
            try:
                self.metrics.record_loop(kind, charge.name, hit.action)
            except Exception as exc:
                self.log_once("metrics", exc)
        event = {
            "otel_budget.loop.kind": kind,
            "otel_budget.loop.name": charge.name,
            "otel_budget.loop.repeats": hit.repeats,
            "otel_budget.loop.window_seconds": hit.window_seconds,
            "otel_budget.loop.fingerprint": hit.fingerprint,
            "otel_budget.loop.action": hit.action,
        }
        for stats in charge.stats:
            stats.add_loop(kind=kind, subject=charge.name, repeats=hit.repeats, action=hit.action)
            root = stats.root_span
            if root is not None:
                try:
                    root.add_event(attrs.EVENT_LOOP, event)
                except Exception as exc:
                    self.log_once("root_event", exc)
        substitute = None
        callback = self.settings.on_loop_detected
        if callback is not None:
            try:
                answer = callback(dict(info))
                if isinstance(answer, Substitute):
                    substitute = answer
            except Exception as exc:
                self.log_once("on_loop_detected callback", exc)
        what = f"tool {charge.name!r}" if kind == KIND_TOOL_LOOP else f"model {charge.name!r}"
        message = (
            f"otel-budget: loop detected: {what} called {hit.repeats} times with the same "
            f"{'arguments' if kind == KIND_TOOL_LOOP else 'request'} within "
            f"{hit.elapsed_seconds:.1f}s (run {run_key!r})"
        )
        if hit.action != ACTION_REFUSE:
            self.log_once.warning(f"loop warned ({kind})", message + "; action='warn' lets it through")
            return
        error = self.refusal(REASON_LOOP, charge, None, message)
        error.scope = run_key
        error.loop = info
        if substitute is not None:
            error.substitute = substitute
        raise error

    # -- failures of our own ------------------------------------------------------------------
    def internal_error(self, site: str, exc: BaseException, charge: Charge | None = None) -> BudgetExceededError | None:
        """Apply the failure policy: log (rate-limited); under fail_closed, return the refusal
        to raise."""
        self.log_once(site, exc)
        if self.settings.failure_policy != FAIL_CLOSED:
            return None
        if charge is None:
            charge = Charge(None, 0, (), 0, KIND_LLM, "unknown", "unknown", "chat", ())
        error = self.refusal(
            REASON_INTERNAL_ERROR, charge, None,
            f"otel-budget could not meter this call ({type(exc).__name__}: {exc}); "
            "failure_policy='fail_closed' refuses it",
        )  # fmt: skip
        error.__cause__ = exc
        return error
