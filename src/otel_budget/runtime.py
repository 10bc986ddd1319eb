"""The budget runtime: everything a metered call needs, with no OpenTelemetry SDK dependency.

    from otel_budget.runtime import BudgetRuntime
    from otel_budget.settings import BudgetSettings

    runtime = BudgetRuntime(BudgetSettings(max_usd=0.50))
    OpenAIBudgetInstrumentor().instrument(runtime=runtime)   # wrappers get it in a closure
    runtime.engine.trace_stats(trace_id)                     # running totals of one trace

One runtime holds the settings, the price book, the ledger storage and its engine, the
metrics, and the registry of open metered calls (the one place that knows which spans are
already metered, so that nothing is charged twice). ``BudgetSpanProcessor`` is a thin
OpenTelemetry adapter over one runtime; instrumentors receive the runtime they enforce
through their ``instrument(runtime=...)`` call.

An instrumentor given no runtime follows the process's current one (``RuntimeSource``): the
runtime of the most recently created processor that is not shut down, or none (then its
calls are only traced).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from otel_budget.engine import BudgetEngine
from otel_budget.metrics import BudgetMetrics
from otel_budget.pricing import PriceBook
from otel_budget.settings import BudgetSettings
from otel_budget.storage import LedgerStorage, MemoryStorage

_MAX_REGISTERED = 100_000


class Deferred:
    """Another instrumentation's GenAI span that was not reserved at start (ours meters that
    SDK's calls, or it was not a paid call we could project): it is charged from its usage
    when it ends, unless one of our metered calls ran inside it (``covered``), which then
    charged the same money."""

    __slots__ = ("parent", "root", "covered")

    def __init__(self, parent: int, root: bool) -> None:
        self.parent = parent  # the span lease of its local parent (0: none)
        self.root = root  # it has no parent at all (the call's own trace)
        self.covered = False


class CallRegistry(dict):  # type: ignore[type-arg]
    """Open metered calls by span (``trace_id << 64 | span_id``), and GenAI spans nested in
    one (another instrumentation's span inside our call describes the same money).

    A dict: ``get``, ``pop(lease, None)`` and ``len`` are the C methods, no Python call on
    the per-span path. Bounded: an entry leaves when its span ends; a span that never ends
    (a bug elsewhere) is dropped past the bound rather than growing memory forever."""

    NESTED = "nested"

    __slots__ = ()

    def add(self, span_lease: int, entry: Any) -> None:
        self[span_lease] = entry
        if len(self) > _MAX_REGISTERED:
            self.pop(next(iter(self)), None)

    def cover(self, span_lease: int) -> bool:
        """One of our metered calls runs under ``span_lease``: every deferred GenAI span on
        the way up describes the same call and is not charged when it ends. Returns True when
        that chain of wrappers is the root of its trace: the call is then as parentless as a
        bare script's (charged to the process-wide scope), not the first call of a new
        trace that another instrumentation's span happened to start."""
        entries = self
        for _ in range(64):  # a chain of wrappers, never a cycle
            entry = entries.get(span_lease)
            if not isinstance(entry, Deferred):
                return False
            entry.covered = True
            if entry.root:
                return True
            span_lease = entry.parent
        return False


def span_lease(trace_id: int, span_id: int) -> int:
    return (trace_id << 64) | span_id


class BudgetRuntime:
    """Settings, prices, ledger, engine, metrics and the registry of metered calls."""

    def __init__(
        self,
        settings: BudgetSettings,
        *,
        prices: PriceBook | None = None,
        storage: LedgerStorage | None = None,
        meter_provider: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.prices = prices if prices is not None else PriceBook()
        self.storage = storage if storage is not None else MemoryStorage()
        self.engine = BudgetEngine(settings, self.storage, self.prices, clock=clock)
        self.metrics = BudgetMetrics(meter_provider)
        self.engine.metrics = self.metrics
        self.calls = CallRegistry()
        self.closed = False
        # The prompt cache (``otel_budget.cache.ResponseCache``): None, the default, is off.
        self.cache: Any = None

    # -- the root-span breakdown: written here only ---------------------------------------------
    def track_root(self, span: Any, trace_id: int) -> None:
        """Write the trace's cost breakdown on ``span`` just before it ends, once, with the
        public API (``on_end`` only sees a frozen span). Idempotent per span; the stats are
        looked up when the span ends, since a ``budget()`` block may adopt the trace."""
        if getattr(span.end, "_otel_budget_root", False):
            return
        stats = self.engine.trace_stats(trace_id)
        if stats is None:
            return
        if stats.root_span is None:
            stats.root_span = span
        original_end = span.end
        engine = self.engine

        def end(end_time: int | None = None) -> None:
            try:
                current = engine.trace_stats(trace_id, create=False)
                if current is not None and span.is_recording():
                    span.set_attributes(current.root_attributes())
            except Exception as exc:
                engine.log_once("root breakdown", exc)
            original_end(end_time)

        end._otel_budget_root = True  # type: ignore[attr-defined]
        span.end = end

    def close(self) -> None:
        self.closed = True
        self.storage.close()


class RuntimeSource:
    """Where an instrumentor's wrappers get their runtime: a fixed one (``instrument(
    runtime=...)``), or the process's current one (the most recent live processor's)."""

    __slots__ = ("cache", "fixed")

    def __init__(self, fixed: BudgetRuntime | None = None, cache: Any = None) -> None:
        self.fixed = fixed
        # ``instrument(cache=...)`` of this instrumentor; None: the runtime's (if any).
        self.cache = cache

    def get(self) -> BudgetRuntime | None:
        fixed = self.fixed
        if fixed is not None:
            return None if fixed.closed else fixed
        return current_runtime()


_CURRENT_LOCK = threading.Lock()
_CURRENT: list[BudgetRuntime] = []


def register_runtime(runtime: BudgetRuntime) -> None:
    with _CURRENT_LOCK:
        _CURRENT.append(runtime)


def unregister_runtime(runtime: BudgetRuntime) -> None:
    with _CURRENT_LOCK:
        if runtime in _CURRENT:
            _CURRENT.remove(runtime)


def current_runtime() -> BudgetRuntime | None:
    """The runtime of the most recently created live processor, if any."""
    return _CURRENT[-1] if _CURRENT else None


__all__ = [
    "BudgetRuntime",
    "CallRegistry",
    "Deferred",
    "RuntimeSource",
    "current_runtime",
    "register_runtime",
    "span_lease",
    "unregister_runtime",
]
