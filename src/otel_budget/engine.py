"""The budget engine: which scopes a call belongs to, reserve, settle, warn, refuse.

    >>> engine = processor.engine                                   # doctest: +SKIP
    >>> charge = engine.reserve(lease_id, trace_id, attributes, projected_nanos)  # doctest: +SKIP
    >>> engine.settle(charge, actual_nanos)                         # doctest: +SKIP

The engine does not depend on spans reaching a span processor: instrumentors call it
directly, keyed by the trace id of the span context, so that a sampler that drops a span,
or a process with no SDK ``TracerProvider`` at all, does not switch enforcement off.
``BudgetSpanProcessor`` is the OpenTelemetry face of the same engine.

Scopes of a call (each must have room for the projected cost):

* the innermost-to-outermost open ``budget()`` blocks, if any; otherwise the trace, with the
  processor's ``max_usd``; a span with no parent at all (a bare script, where every call
  starts its own trace) is charged to one process-wide scope with that same limit, so that
  a loop of parentless calls is stopped in total;
* one scope per ``ScopeRule`` whose identity is known (context or span attribute), per UTC
  window when the rule has one.
"""

from __future__ import annotations

import random
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.propagation import baggage_limit
from otel_budget.context import BUDGET_FRAMES, SCOPE_IDENTITIES, BudgetFrame
from otel_budget.errors import (
    Substitute,
    REASON_INTERNAL_ERROR,
    REASON_INVALID_REQUEST,
    REASON_LIMIT,
    REASON_PAUSED,
    REASON_UNKNOWN_MODEL,
    BudgetExceededError,
)
from otel_budget.money import NANOS_PER_USD, format_usd, to_usd
from otel_budget.report import (
    TERMINATED_BY_BUDGET,
    TERMINATED_BY_INTERNAL_ERROR,
    TERMINATED_BY_INVALID_REQUEST,
    TERMINATED_BY_PAUSE,
    TERMINATED_BY_UNKNOWN_MODEL,
    TraceStats,
)
from otel_budget.settings import FAIL_CLOSED, BudgetSettings
from otel_budget.storage import (
    CommitStatus,
    LedgerStorage,
    ReserveStatus,
    ScopeLimit,
    ScopeUsage,
)

logger = logging.getLogger("otel_budget")

PROCESS_SCOPE = "process"
KIND_LLM = "llm"
KIND_TOOL = "tool"
_TERMINATION = {
    REASON_LIMIT: TERMINATED_BY_BUDGET,
    REASON_PAUSED: TERMINATED_BY_PAUSE,
    REASON_UNKNOWN_MODEL: TERMINATED_BY_UNKNOWN_MODEL,
    REASON_INTERNAL_ERROR: TERMINATED_BY_INTERNAL_ERROR,
    REASON_INVALID_REQUEST: TERMINATED_BY_INVALID_REQUEST,
}
_MAX_NAMED_THRESHOLD_STATE = 100_000
_LOGGED_ONCE_MAX = 1024
_MAX_OPEN_CHARGES = 100_000


class LogOnce:
    """Log an internal error once per (site, exception type): a broken dependency on the
    hot path must not turn into one log line per LLM call."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, site: str, exc: BaseException | None = None, message: str = "") -> bool:
        key = (site, type(exc).__name__ if exc is not None else message)
        with self._lock:
            if key in self._seen or len(self._seen) >= _LOGGED_ONCE_MAX:
                return False
            self._seen.add(key)
        if exc is not None:
            logger.error(
                "otel-budget internal error in %s (logged once): %s", site, message or exc,
                exc_info=exc,
            )  # fmt: skip
        else:
            logger.warning("otel-budget: %s (logged once)", message)
        return True


class Charge:
    """One call's reservation: what it reserved where, and whom to report to."""

    __slots__ = (
        "lease_id", "trace_id", "scopes", "projected", "kind", "name", "provider",
        "operation", "stats", "settled", "input_tokens", "output_tokens", "reserved",
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


def _window_suffix(window: str | None, now: float) -> str:
    if window is None:
        return ""
    day = datetime.fromtimestamp(now, tz=timezone.utc)
    return day.strftime("@d%Y%m%d") if window == "day" else day.strftime("@m%Y%m")


def _window_ttl(window: str | None) -> float | None:
    # Long enough to cover the whole window plus late commits; then the key may go.
    return {"day": 2 * 86400.0, "month": 62 * 86400.0}.get(window or "", None)


def trace_key(trace_id: int) -> str:
    return f"t:{trace_id:032x}"


class BudgetEngine:
    """Budget decisions for one processor; safe to call from any thread or task."""

    def __init__(
        self,
        settings: BudgetSettings,
        storage: LedgerStorage,
        prices: Any,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.prices = prices
        self.clock = clock
        self.log_once = LogOnce()
        self._lock = threading.Lock()
        self._traces: OrderedDict[int, TraceStats] = OrderedDict()
        self._open: dict[Any, Charge] = {}
        self._named_thresholds: OrderedDict[str, int] = OrderedDict()
        self._scope_overrides: dict[tuple[str, str], int] = {}
        self._process_stats = TraceStats(None, settings.limit_nanos)
        self.metrics: Any = None  # a BudgetMetrics, set by the processor
        self._metered_parents: dict[Any, None] = {}

    # -- trace bookkeeping --------------------------------------------------------------------
    def trace_stats(self, trace_id: int, create: bool = True) -> TraceStats | None:
        """Running totals of a trace; bounded LRU, so abandoned traces cannot pile up."""
        traces = self._traces
        stats = traces.get(trace_id)  # the hot path: a plain dict read, no lock
        if stats is not None or not create:
            return stats
        with self._lock:
            stats = traces.get(trace_id)
            if stats is not None:
                return stats
            stats = TraceStats(f"{trace_id:032x}", self.settings.limit_nanos)
            traces[trace_id] = stats
            if len(traces) > self.settings.max_tracked_traces:
                traces.popitem(last=False)
            return stats

    def adopt_trace(self, trace_id: int, stats: TraceStats) -> None:
        """Make ``stats`` (a ``budget()`` block that started this trace) the trace's totals,
        so the root span's breakdown is the block's."""
        with self._lock:
            previous = self._traces.get(trace_id)
            if previous is not None and previous is not stats and stats.root_span is None:
                stats.root_span = previous.root_span
            self._traces[trace_id] = stats
            self._traces.move_to_end(trace_id)

    def finish_trace(self, trace_id: int, evict: bool = True) -> TraceStats | None:
        """The trace's local root ended: forget its totals here and, when it was the trace's
        root (``evict``), its ledger scope."""
        with self._lock:
            stats = self._traces.pop(trace_id, None)
        if stats is not None:
            stats.ended = time.time()
            stats.root_span = None
        if evict:
            self.storage.evict(trace_key(trace_id))
        return stats

    def new_lease_id(self) -> int:
        """A lease id for a call whose span has no usable id (no SDK, or an invalid span).
        Random, so that processes sharing a ledger cannot collide; negative, so that it
        cannot collide with span-derived ids."""
        return -(random.getrandbits(126) + 1)

    def open_charge(self, lease_id: Any) -> Charge | None:
        return self._open.get(lease_id)

    # A GenAI span that wraps one of our metered calls (another instrumentation outside
    # ours), or that one of our calls wraps (an SDK's own span inside ours), describes the
    # same money: it is never charged again. Bounded: entries leave when the span ends.
    def note_metered_parent(self, lease_id: Any) -> None:
        metered = self._metered_parents
        metered[lease_id] = None
        if len(metered) > _MAX_NAMED_THRESHOLD_STATE:
            metered.pop(next(iter(metered)), None)

    def is_duplicate_span(self, lease_id: Any) -> bool:
        """True once for a GenAI span that wrapped one of our metered calls."""
        return bool(self._metered_parents) and self._metered_parents.pop(lease_id, 0) is None

    # -- scope resolution ---------------------------------------------------------------------
    def scopes_for(
        self, trace_id: int, parentless: bool, attributes: Mapping[str, Any] | None
    ) -> tuple[tuple[ScopeLimit, ...], tuple[TraceStats, ...], tuple[str, ...]]:
        """(ledger scopes, stats to update, pause keys) for one call in the current context."""
        settings = self.settings
        frames: tuple[BudgetFrame, ...] = BUDGET_FRAMES.get()
        if frames:
            frames = tuple(frame for frame in frames if frame.owner is self)
        elif trace_id and not parentless and not settings.scopes:
            # The common case (a call inside a trace, no budget() block, no named scopes),
            # kept allocation-light: it runs on every GenAI span.
            trace_limit = settings.limit_nanos
            carried = baggage_limit()
            trace_stats = self.trace_stats(trace_id)
            if carried is not None and (trace_limit is None or carried < trace_limit):
                trace_limit = carried
                if trace_stats is not None and (trace_stats.limit is None or carried < trace_stats.limit):
                    trace_stats.limit = carried
            stats_tuple = (trace_stats,) if trace_stats is not None else ()
            if trace_limit is None:
                return (), stats_tuple, ()
            key = trace_stats.key if trace_stats is not None else trace_key(trace_id)
            return (
                (ScopeLimit(key, trace_limit, True, settings.trace_ttl_seconds),),
                stats_tuple,
                (),
            )
        scopes: list[ScopeLimit] = []
        stats: list[TraceStats] = []
        pause_keys: list[str] = []
        trace_limit = settings.limit_nanos
        # A budget carried in baggage (untrusted, strictly parsed) can only lower the limit.
        carried = baggage_limit()
        if carried is not None and (trace_limit is None or carried < trace_limit):
            trace_limit = carried
        if frames:
            ttl = settings.trace_ttl_seconds
            for frame in frames:
                scopes.append(ScopeLimit(frame.key, frame.limit, True, ttl))
                stats.append(frame.stats)
            if carried is not None and trace_id:
                scopes.append(ScopeLimit(trace_key(trace_id), carried, True, ttl))
            if trace_id:
                trace_stats = self.trace_stats(trace_id)
                if trace_stats is not None and all(trace_stats is not s for s in stats):
                    stats.append(trace_stats)
        elif parentless or not trace_id:
            # (A parentless span has no upstream, so no baggage budget applies to it.)
            if settings.limit_nanos is not None:
                scopes.append(ScopeLimit(PROCESS_SCOPE, settings.limit_nanos))
            stats.append(self._process_stats)
            if trace_id:
                trace_stats = self.trace_stats(trace_id)
                if trace_stats is not None:
                    stats.append(trace_stats)
        else:
            if trace_limit is not None:
                scopes.append(
                    ScopeLimit(trace_key(trace_id), trace_limit, True, settings.trace_ttl_seconds)
                )
            trace_stats = self.trace_stats(trace_id)
            if trace_stats is not None:
                if carried is not None and (trace_stats.limit is None or carried < trace_stats.limit):
                    trace_stats.limit = carried
                stats.append(trace_stats)
        if settings.scopes:
            identities = SCOPE_IDENTITIES.get()
            now = self.clock()
            for rule in settings.scopes:
                ident = identities.get(rule.kind)
                if ident is None and attributes is not None and rule.attribute:
                    value = attributes.get(rule.attribute)
                    if isinstance(value, str) and value:
                        ident = value
                if ident is None:
                    continue
                base = f"{rule.kind}:{ident}"
                limit = self._scope_overrides.get((rule.kind, ident), rule.limit_nanos)
                scopes.append(
                    ScopeLimit(base + _window_suffix(rule.window, now), limit, False,
                               _window_ttl(rule.window))
                )  # fmt: skip
                pause_keys.append(base)
                pause_keys.append(f"{rule.kind}:*")
        return tuple(scopes), tuple(stats), tuple(pause_keys)

    def set_scope_limit(self, kind: str, ident: str, limit_nanos: int) -> None:
        """Give one identity its own cap (e.g. a paying tenant); applies to new windows too."""
        self._scope_overrides[(kind, ident)] = limit_nanos
        for rule in self.settings.scopes:
            if rule.kind == kind:
                key = f"{kind}:{ident}" + _window_suffix(rule.window, self.clock())
                self.storage.set_limit(key, limit_nanos)

    # -- the decision -------------------------------------------------------------------------
    def reserve(
        self,
        lease_id: Any,
        trace_id: int,
        parentless: bool,
        attributes: Mapping[str, Any] | None,
        projected: int,
        *,
        kind: str = KIND_LLM,
        name: str = "unknown",
        provider: str = "unknown",
        operation: str = "chat",
    ) -> Charge:
        """Reserve ``projected`` nano-USD for one call, or raise ``BudgetExceededError``."""
        scopes, stats, pause_keys = self.scopes_for(trace_id, parentless, attributes)
        charge = Charge(lease_id, trace_id, scopes, projected, kind, name, provider, operation, stats)
        result = self.storage.reserve(lease_id, scopes, projected, pause_keys)
        if result.ok:
            charge.reserved = True
            opened = self._open
            opened[lease_id] = charge
            if len(opened) > _MAX_OPEN_CHARGES:
                # A call whose span never ends (an instrumentation bug elsewhere) must not
                # grow memory forever; its ledger lease expires on its own.
                opened.pop(next(iter(opened)), None)
            return charge
        usage = result.denied
        assert usage is not None
        if result.status is ReserveStatus.PAUSED:
            raise self.refusal(
                REASON_PAUSED, charge, usage,
                f"otel-budget: calls are paused by the kill switch {usage.key!r}",
            )  # fmt: skip
        raise self.refusal(
            REASON_LIMIT, charge, usage,
            f"otel-budget: {name} call projected at {format_usd(projected)} would exceed the "
            f"budget of scope {usage.key!r}: {format_usd(usage.spent)} spent + "
            f"{format_usd(usage.reserved)} reserved of {format_usd(usage.limit)}",
        )  # fmt: skip

    def remaining(
        self, trace_id: int, parentless: bool, attributes: Mapping[str, Any] | None
    ) -> int | None:
        """The smallest room left among the scopes a call would reserve in (None: no limit).
        Advisory (another call may reserve meanwhile); the reservation stays the decision."""
        scopes, _, _ = self.scopes_for(trace_id, parentless, attributes)
        room: int | None = None
        for spec in scopes:
            usage = self.storage.usage(spec.key)
            left = spec.limit if usage is None else min(usage.limit, spec.limit) - usage.spent - usage.reserved
            if room is None or left < room:
                room = left
        return room

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
        charge = Charge(lease_id, trace_id, scopes, projected, kind, name, provider, operation, stats)
        self._open[lease_id] = charge
        return charge

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
        logger.warning("%s", message)
        callback = self.settings.on_exceeded
        if callback is not None:
            try:
                answer = callback(error.to_dict())
                if isinstance(answer, Substitute):
                    error.substitute = answer
            except Exception as exc:
                self.log_once("on_exceeded callback", exc)
        return error

    def settle(
        self, charge: Charge, actual: int, input_tokens: int = 0, output_tokens: int = 0
    ) -> int:
        """Commit the actual cost of a reserved call; returns the overshoot (nano-USD)."""
        if charge.settled:
            return 0
        charge.settled = True
        charge.input_tokens = input_tokens
        charge.output_tokens = output_tokens
        self._open.pop(charge.lease_id, None)
        if charge.reserved:
            result = self.storage.commit(charge.lease_id, actual)
            if result.status is CommitStatus.DUPLICATE:
                return 0
            overshoot = result.overshoot
            usages = result.scopes
        else:
            overshoot = actual - charge.projected if actual > charge.projected else 0
            usages = ()
            if charge.scopes:  # let through unmetered (fail_open): record the spend anyway
                try:
                    usages = self.storage.charge(charge.lease_id, charge.scopes, actual).scopes
                except Exception as exc:
                    self.log_once("charge after fail_open", exc)
        self._account(charge, actual, overshoot)
        if overshoot:
            logger.info(
                "otel-budget: %s cost %s, %s more than its reservation",
                charge.name, format_usd(actual), format_usd(overshoot),
            )  # fmt: skip
        if usages or charge.stats:
            self._check_thresholds(charge, usages)
        return overshoot

    def release(self, charge: Charge) -> None:
        """The call failed before it was billed: give the reservation back, charge nothing."""
        if charge.settled:
            return
        charge.settled = True
        self._open.pop(charge.lease_id, None)
        if charge.reserved:
            self.storage.release(charge.lease_id)

    def charge_unreserved(
        self,
        lease_id: Any,
        trace_id: int,
        parentless: bool,
        attributes: Mapping[str, Any] | None,
        actual: int,
        *,
        kind: str,
        name: str,
        provider: str,
        operation: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """Record a cost seen only at span end (e.g. another instrumentation's span)."""
        scopes, stats, _ = self.scopes_for(trace_id, parentless, attributes)
        charge = Charge(lease_id, trace_id, scopes, 0, kind, name, provider, operation, stats)
        charge.settled = True
        charge.input_tokens = input_tokens
        charge.output_tokens = output_tokens
        usages: tuple[ScopeUsage, ...] = ()
        if scopes:
            result = self.storage.charge(lease_id, scopes, actual)
            if result.status is CommitStatus.DUPLICATE:
                return
            usages = result.scopes
        self._account(charge, actual, 0)
        self._check_thresholds(charge, usages)

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
                stats.add_tool(actual, charge.name, overshoot)
            else:
                stats.add_llm(
                    actual, charge.name, charge.provider, charge.operation,
                    charge.input_tokens, charge.output_tokens, overshoot,
                )  # fmt: skip

    # -- soft limits --------------------------------------------------------------------------
    def _check_thresholds(self, charge: Charge, usages: tuple[ScopeUsage, ...]) -> None:
        thresholds = self.settings.thresholds
        if not thresholds and self.metrics is None:
            return
        # Runs (traces and budget blocks) keep their own index in their stats.
        for stats in charge.stats:
            limit = stats.limit
            if limit is None:
                continue
            self._fire(stats.label, stats.spent, limit, stats, None)
        metrics = self.metrics
        for usage in usages:
            if usage.key.startswith(("t:", "b:")):
                continue  # covered by the stats above
            if metrics is not None:
                metrics.record_remaining(usage.key, to_usd(usage.limit - usage.spent))
            if usage.key != PROCESS_SCOPE:
                self._fire(usage.key, usage.spent, usage.limit, None, usage.key)

    def _fire(
        self, scope: str, spent: int, limit: int, stats: TraceStats | None, named_key: str | None
    ) -> None:
        thresholds = self.settings.thresholds
        if stats is not None:
            index = stats.threshold_index
        else:
            index = self._named_thresholds.get(named_key or "", 0)
        if index >= len(thresholds) or (limit and spent < thresholds[index] * limit):
            return  # the common case: nothing new crossed, nothing allocated
        fired: list[float] = []
        while index < len(thresholds) and (
            limit == 0 or spent >= thresholds[index] * limit
        ):
            fired.append(thresholds[index])
            index += 1
        if stats is not None:
            stats.threshold_index = index
        else:
            with self._lock:
                self._named_thresholds[named_key or ""] = index
                if len(self._named_thresholds) > _MAX_NAMED_THRESHOLD_STATE:
                    self._named_thresholds.popitem(last=False)
        for threshold in fired:
            if self.metrics is not None:
                self.metrics.record_warning(named_key or scope, threshold)
            info = {
                "scope": scope,
                "threshold": threshold,
                "spent_usd": to_usd(spent),
                "budget_usd": to_usd(limit),
                "remaining_usd": to_usd(limit - spent),
            }
            logger.warning(
                "otel-budget: scope %s crossed %d%% of its budget (%s of %s)",
                scope, round(threshold * 100), format_usd(spent), format_usd(limit),
            )  # fmt: skip
            if stats is not None:
                stats.add_event(attrs.EVENT_THRESHOLD, **info)
                root = stats.root_span
                if root is not None:
                    try:
                        root.add_event(attrs.EVENT_THRESHOLD, {
                            "otel_budget.threshold": threshold,
                            attrs.TRACE_SPENT_USD: info["spent_usd"],
                            attrs.TRACE_BUDGET_USD: info["budget_usd"],
                        })  # fmt: skip
                    except Exception as exc:
                        self.log_once("threshold event", exc)
            callback = self.settings.on_warning
            if callback is not None:
                try:
                    callback(info)
                except Exception as exc:
                    self.log_once("on_warning callback", exc)

    # -- failures of our own ------------------------------------------------------------------
    def internal_error(self, site: str, exc: BaseException, charge: Charge | None = None) -> BudgetExceededError | None:
        """Apply the failure policy: log once; under fail_closed, return the refusal to raise."""
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
