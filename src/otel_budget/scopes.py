"""Which ledger scopes a call belongs to: budget blocks, the trace, the process, named scopes.

    >>> from otel_budget.scopes import trace_key
    >>> trace_key(0xABC)
    't:00000000000000000000000000000abc'
    >>> scopes, stats, pause_keys = engine.scopes_for(trace_id, False, attributes)  # doctest: +SKIP

``ScopeResolution`` is the part of ``BudgetEngine`` (``otel_budget.engine``) that maps one call
in the current context to its scopes; the engine decides on them (reserve, settle, refuse).

Scopes of a call (each must have room for the projected cost):

* the innermost-to-outermost open ``budget()`` blocks, if any; otherwise the trace, with the
  processor's ``max_usd``; a span with no parent at all (a bare script, where every call
  starts its own trace) is charged to one process-wide scope with that same limit, so that
  a loop of parentless calls is stopped in total;
* one scope per ``ScopeRule`` whose identity is known (context or span attribute), per UTC
  window when the rule has one.

The running totals of each trace (``TraceStats``) are kept here too, in a bounded LRU.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from otel_budget.context import (
    BUDGET_FRAMES,
    INVALID_IDENTITY,
    INVALID_IDENTITY_ATTRIBUTE,
    MAX_IDENTITY_CHARS,
    SCOPE_IDENTITIES,
    BudgetFrame,
    valid_identity,
)
from otel_budget.logs import RateLimitedLog
from otel_budget.propagation import baggage_limit
from otel_budget.report import TraceStats
from otel_budget.settings import BudgetSettings
from otel_budget.storage import UNLIMITED, LedgerStorage, ScopeLimit

__all__ = ["PROCESS_SCOPE", "ScopeResolution", "trace_key", "window_suffix", "window_ttl"]

PROCESS_SCOPE = "process"


def window_suffix(window: str | None, now: float) -> str:
    """The key suffix of a UTC window: ``@d20260102`` (day), ``@m202601`` (month), or ''."""
    if window is None:
        return ""
    day = datetime.fromtimestamp(now, tz=timezone.utc)
    return day.strftime("@d%Y%m%d") if window == "day" else day.strftime("@m%Y%m")


def window_ttl(window: str | None) -> float | None:
    """Long enough to cover the whole window plus late commits; then the key may go."""
    return {"day": 2 * 86400.0, "month": 62 * 86400.0}.get(window or "")


_window_suffix = window_suffix  # the names engine.py used
_window_ttl = window_ttl


def trace_key(trace_id: int) -> str:
    """The ledger key of a trace's scope."""
    return f"t:{trace_id:032x}"


class ScopeResolution:
    """Scope resolution and per-trace totals; mixed into ``BudgetEngine``."""

    settings: BudgetSettings
    storage: LedgerStorage
    clock: Callable[[], float]
    log_once: RateLimitedLog
    _lock: threading.Lock
    _traces: OrderedDict[int, TraceStats]
    _scope_overrides: dict[tuple[str, str], int]
    _process_stats: TraceStats
    _process_spec: ScopeLimit | None  # the process scope's spec, built once per limit

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
            limit = self.settings.limit_nanos
            stats = TraceStats(f"{trace_id:032x}", limit)
            thresholds = self.settings.thresholds
            if limit:  # no threshold check before the first can fire (thresholds.py)
                stats.alert_at = thresholds[0] * limit if thresholds else math.inf
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
            trace_stats = self._traces.get(trace_id) or self.trace_stats(trace_id)
            stats_tuple = (trace_stats,) if trace_stats is not None else ()
            if trace_stats is not None:
                # ``_trace_scope``'s common case inlined: no baggage budget, the spec built
                # for this trace's first call still matches the settings.
                spec = trace_stats.scope_spec
                if (
                    spec is not None
                    and spec.limit == settings.limit_nanos
                    and spec.ttl == settings.trace_ttl_seconds
                    and baggage_limit() is None
                ):
                    return (spec,), stats_tuple, ()
            spec = self._trace_scope(trace_id, trace_stats)
            return ((spec,) if spec is not None else ()), stats_tuple, ()
        elif (parentless or not trace_id) and not settings.scopes:
            # The other common case (a call with no parent: a bare script), as the general
            # path below builds it, with the process scope's spec built once.
            limit = settings.limit_nanos
            process = self._process_stats
            trace_stats = self.trace_stats(trace_id) if trace_id else None
            stats_pair = (process, trace_stats) if trace_stats is not None else (process,)
            if limit is None:
                return (), stats_pair, ()
            spec = self._process_spec
            if spec is None or spec.limit != limit:
                spec = self._process_spec = ScopeLimit(PROCESS_SCOPE, limit)
            return (spec,), stats_pair, ()
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
                    ScopeLimit(base + window_suffix(rule.window, now), limit, False,
                               window_ttl(rule.window))
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
        ttl = self.settings.trace_ttl_seconds
        if carried is None and trace_stats is not None:
            # The common case: the same scope for every call of the trace, built once.
            spec = trace_stats.scope_spec
            if spec is not None and spec.limit == limit and spec.ttl == ttl:
                return spec  # type: ignore[no-any-return]
            spec = trace_stats.scope_spec = ScopeLimit(
                trace_stats.key, limit, True, ttl, None, True  # type: ignore[arg-type]
            )
            return spec
        key = trace_stats.key if trace_stats is not None else trace_key(trace_id)
        cap = carried if carried is not None and (limit is None or carried < limit) else None
        return ScopeLimit(
            key, UNLIMITED if limit is None else limit, True, ttl, cap=cap, evictable=True,
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
            return value
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
                key = f"{kind}:{ident}" + window_suffix(rule.window, self.clock())
                self.storage.set_limit(key, limit_nanos)
