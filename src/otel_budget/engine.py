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

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.context import (
    BUDGET_FRAMES,
    INVALID_IDENTITY,
    INVALID_IDENTITY_ATTRIBUTE,
    MAX_IDENTITY_CHARS,
    SCOPE_IDENTITIES,
    BudgetFrame,
    valid_identity,
)
from otel_budget.errors import (
    REASON_CONFIGURATION,
    REASON_INTERNAL_ERROR,
    REASON_INVALID_REQUEST,
    REASON_LIMIT,
    REASON_PAUSED,
    REASON_UNKNOWN_MODEL,
    BudgetExceededError,
    Substitute,
)
from otel_budget.money import NANOS_PER_USD, format_usd, to_usd
from otel_budget.propagation import baggage_limit
from otel_budget.report import (
    TERMINATED_BY_BUDGET,
    TERMINATED_BY_CONFIGURATION,
    TERMINATED_BY_INTERNAL_ERROR,
    TERMINATED_BY_INVALID_REQUEST,
    TERMINATED_BY_PAUSE,
    TERMINATED_BY_UNKNOWN_MODEL,
    TraceStats,
)
from otel_budget.settings import FAIL_CLOSED, BudgetSettings
from otel_budget.steps import Op, Steps, run
from otel_budget.storage import (
    UNLIMITED,
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
    REASON_CONFIGURATION: TERMINATED_BY_CONFIGURATION,
}
_MAX_NAMED_THRESHOLD_STATE = 100_000
_LOGGED_ONCE_MAX = 1024
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
    return {"day": 2 * 86400.0, "month": 62 * 86400.0}.get(window or "")


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
        self._named_thresholds: OrderedDict[str, int] = OrderedDict()
        self._scope_overrides: dict[tuple[str, str], int] = {}
        self._process_stats = TraceStats(None, settings.limit_nanos)
        self.metrics: Any = None  # a BudgetMetrics, set by the processor

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
        root (``evict``) and the ledger is this process's own, its ledger scope. On a shared
        ledger (``storage.shared``) other services of the trace may still call: the scope
        ends by its TTL."""
        with self._lock:
            stats = self._traces.pop(trace_id, None)
        if stats is not None:
            stats.ended = time.time()
            stats.root_span = None
        if evict and not self.storage.shared:
            self.storage.evict(trace_key(trace_id))
        return stats

    def new_lease_id(self) -> int:
        """A lease id for a call whose span has no usable id (no SDK, or an invalid span).
        Random, so that processes sharing a ledger cannot collide; negative, so that it
        cannot collide with span-derived ids."""
        return -(random.getrandbits(126) + 1)

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
            trace_stats = self.trace_stats(trace_id)
            stats_tuple = (trace_stats,) if trace_stats is not None else ()
            spec = self._trace_scope(trace_id, trace_stats)
            return ((spec,) if spec is not None else ()), stats_tuple, ()
        scopes: list[ScopeLimit] = []
        stats: list[TraceStats] = []
        pause_keys: list[str] = []
        if frames:
            ttl = settings.trace_ttl_seconds
            for frame in frames:
                # An open block never forgets its spend, however long it idles (no TTL; the
                # block evicts its scope when it exits). A thread the block started that
                # outlives it stays bounded by the block's limit, on a scope that expires.
                scopes.append(ScopeLimit(frame.key, frame.limit, True, None if frame.open else ttl))
                stats.append(frame.stats)
            if trace_id:
                trace_stats = self.trace_stats(trace_id)
                carried = baggage_limit()
                if carried is not None:
                    scopes.append(ScopeLimit(
                        trace_key(trace_id), UNLIMITED, True, ttl, cap=carried, evictable=True
                    ))  # fmt: skip
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
            trace_stats = self.trace_stats(trace_id)
            spec = self._trace_scope(trace_id, trace_stats)
            if spec is not None:
                scopes.append(spec)
            if trace_stats is not None:
                stats.append(trace_stats)
        if settings.scopes:
            identities = SCOPE_IDENTITIES.get()
            now = self.clock()
            for rule in settings.scopes:
                ident = identities.get(rule.kind)
                if ident is None and attributes is not None and rule.attribute:
                    ident = self._identity_from(attributes, rule.kind, rule.attribute)
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

    def _trace_scope(self, trace_id: int, trace_stats: TraceStats | None) -> ScopeLimit | None:
        """The ledger scope of a trace: the configured per-trace limit (trusted: it may only
        lower a stored limit), narrowed for this one check by a budget carried in baggage
        (untrusted, strictly parsed: it narrows the check of the requests that carry it, and
        never rewrites the stored limit another request of the trace sees). Evictable: a
        trace is the one scope a full in-memory ledger may forget (least recently used)."""
        limit = self.settings.limit_nanos
        carried = baggage_limit()
        if limit is None and carried is None:
            return None
        key = trace_stats.key if trace_stats is not None else trace_key(trace_id)
        cap = carried if carried is not None and (limit is None or carried < limit) else None
        return ScopeLimit(
            key, UNLIMITED if limit is None else limit, True, self.settings.trace_ttl_seconds,
            cap=cap, evictable=True,
        )  # fmt: skip

    def _identity_from(self, attributes: Mapping[str, Any], kind: str, name: str) -> str | None:
        """The identity a span attribute names for a scope rule, validated as ``scope()``
        validates it. A value that cannot be a ledger key (control characters, too long, not
        a string) is never used as one: the call is charged to ``<kind>:<invalid>``, which
        still has the rule's limit, the span is marked, and the fact is logged once."""
        value = attributes.get(name)
        if value is None:
            return None
        if type(value) is int:  # a numeric user id is an id too
            value = str(value)
        if valid_identity(value):
            return value  # type: ignore[no-any-return]
        self.log_once(  # once per attribute: the value itself is never logged
            f"identity {name}", message=(
                f"span attribute {name!r} held an identity that cannot be a scope key (it must "
                f"be a printable string of 1-{MAX_IDENTITY_CHARS} chars); such calls are "
                f"charged to scope {kind}:{INVALID_IDENTITY} and marked "
                f"{INVALID_IDENTITY_ATTRIBUTE}"
            ),
        )  # fmt: skip
        if type(attributes) is dict:  # the span's own attributes at start: mark the span
            try:
                marked = attributes.get(INVALID_IDENTITY_ATTRIBUTE)
                if not isinstance(marked, str) or not marked:
                    attributes[INVALID_IDENTITY_ATTRIBUTE] = name
                elif name not in marked.split(","):
                    attributes[INVALID_IDENTITY_ATTRIBUTE] = f"{marked},{name}"
            except Exception as exc:  # pragma: no cover - a read-only mapping
                self.log_once("mark invalid identity", exc)
        return INVALID_IDENTITY

    def set_scope_limit(self, kind: str, ident: str, limit_nanos: int) -> None:
        """Give one identity its own cap (e.g. a paying tenant); applies to new windows too."""
        self._scope_overrides[(kind, ident)] = limit_nanos
        for rule in self.settings.scopes:
            if rule.kind == kind:
                key = f"{kind}:{ident}" + _window_suffix(rule.window, self.clock())
                self.storage.set_limit(key, limit_nanos)

    # -- the decision -------------------------------------------------------------------------
    # Each ledger decision is written once, as a generator of storage operations (see
    # ``otel_budget.steps``); ``reserve``/``areserve`` etc. drive it sync or async.
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
    ) -> Steps[Charge]:
        """Reserve between ``minimum`` and ``maximum`` nano-USD for one call, as much as every
        scope affords, in one atomic ledger step; or raise ``BudgetExceededError``. The
        charge's ``projected`` is what was granted."""
        if maximum is None:
            maximum = minimum
        scopes, stats, pause_keys = self.scopes_for(trace_id, parentless, attributes)
        charge = Charge(lease_id, trace_id, scopes, minimum, kind, name, provider, operation, stats)
        result = yield Op("reserve_up_to", (lease_id, scopes, minimum, maximum, pause_keys))
        if result.ok:
            charge.reserved = True
            charge.projected = result.granted if result.granted else maximum
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
            f"otel-budget: {name} call projected at {format_usd(minimum)} would exceed the "
            f"budget of scope {usage.key!r}: {format_usd(usage.spent)} spent + "
            f"{format_usd(usage.reserved)} reserved of {format_usd(usage.limit)}",
        )  # fmt: skip

    def reserve(self, lease_id: Any, trace_id: int, parentless: bool,
                attributes: Mapping[str, Any] | None, projected: int, **kw: Any) -> Charge:  # fmt: skip
        """Reserve exactly ``projected`` (blocking)."""
        return run(
            self.reserve_steps(lease_id, trace_id, parentless, attributes, projected, **kw),
            self.storage,
        )  # fmt: skip

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

    def settle_steps(
        self, charge: Charge, actual: int, input_tokens: int = 0, output_tokens: int = 0
    ) -> Steps[int]:
        """Commit the actual cost of a call (reserved or not); returns the overshoot. The one
        place where spend reaches the ledger."""
        if charge.settled:
            return 0
        charge.settled = True
        charge.input_tokens = input_tokens
        charge.output_tokens = output_tokens
        actual = clamp_amount(actual)
        usages: tuple[ScopeUsage, ...] = ()
        if charge.reserved:
            result = yield Op("commit", (charge.lease_id, actual))
            if result.status is CommitStatus.DUPLICATE:
                return 0
            overshoot = result.overshoot
            usages = result.scopes
        else:
            # Unreserved: let through under fail_open, or seen only at span end.
            overshoot = actual - charge.projected if actual > charge.projected else 0
            if charge.scopes:
                try:
                    result = yield Op("charge", (charge.lease_id, charge.scopes, actual))
                    if result.status is CommitStatus.DUPLICATE:
                        return 0
                    usages = result.scopes
                except Exception as exc:
                    self.log_once("charge without reservation", exc)
        self._account(charge, actual, overshoot)
        if overshoot:
            logger.info(
                "otel-budget: %s cost %s, %s more than its reservation",
                charge.name, format_usd(actual), format_usd(overshoot),
            )  # fmt: skip
        if usages or charge.stats:
            self._check_thresholds(charge, usages)
        return overshoot

    def settle(
        self, charge: Charge, actual: int, input_tokens: int = 0, output_tokens: int = 0
    ) -> int:
        return run(self.settle_steps(charge, actual, input_tokens, output_tokens), self.storage)

    def release_steps(self, charge: Charge) -> Steps[None]:
        """The call failed before it was billed: give the reservation back, charge nothing."""
        if charge.settled:
            return None
        charge.settled = True
        if charge.reserved:
            yield Op("release", (charge.lease_id,))
        return None

    def release(self, charge: Charge) -> None:
        run(self.release_steps(charge), self.storage)

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
