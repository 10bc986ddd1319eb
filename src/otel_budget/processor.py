"""``BudgetSpanProcessor``: per-trace budgets, enforced at GenAI span start, on any exporter.

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from otel_budget import BudgetSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BudgetSpanProcessor(max_usd=0.50))   # $0.50 per trace
    trace.set_tracer_provider(provider)

What it does with each span:

* ``on_start``: a local root span (no parent, or a remote one) gets a running cost
  breakdown. A GenAI span that carries ``otel_budget.cost.projected_usd`` at start (ours, or
  any instrumentation that sets it) reserves that amount in every scope it belongs to; when
  it does not fit, the span is ended with ERROR status, ``error.type`` and an exception
  event (so it is exported, never leaked) and ``BudgetExceededError`` is raised, before the
  instrumented call sends anything.
* ``on_end``: a GenAI span (any instrumentation following the GenAI conventions) is priced
  from ``gen_ai.usage.*`` and committed; spans our own instrumentors settled already are not
  counted twice.
* The breakdown (``otel_budget.trace.*``) is written on the local root span just before it
  ends, with the public ``set_attributes`` (``on_end`` only sees a frozen span, and the SDK's
  ``_on_ending`` hook cannot mutate either: opentelemetry-python#5614).

Nothing but ``BudgetExceededError`` ever leaves these methods: internal failures follow the
``failure_policy`` setting and are logged once.

Enforcement does not depend on this processor seeing a span: our instrumentors call the same
engine directly when a span is not sampled or no SDK provider is configured (``guard.py``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget.costing import model_of, price_span, provider_of, usage_from_attributes
from otel_budget.engine import KIND_LLM, KIND_TOOL, BudgetEngine, Charge
from otel_budget.errors import BudgetExceededError
from otel_budget.metrics import BudgetMetrics
from otel_budget.money import NANOS_PER_USD, parse_usd, to_usd, usd_to_nanos
from otel_budget.pricing import PriceBook
from otel_budget.report import TraceStats
from otel_budget.settings import DEFAULT_THRESHOLDS, FAIL_OPEN, BudgetSettings, ScopeRule
from otel_budget.span_projection import reserve_arguments, supersede_outer_projection
from otel_budget.storage import LedgerStorage, MemoryStorage

_ACTIVE_LOCK = threading.Lock()
_ACTIVE: list[BudgetSpanProcessor] = []

_ABORTED = "BudgetExceededError"
_HUGE = 1e12  # USD; anything above goes through the strict parser (and its error)


def _attribute_dict(span: Any) -> Mapping[str, Any]:
    """A span's attributes for reading. The SDK keeps them in ``BoundedAttributes._dict``:
    reading that plain dict directly saves ~0.5 us per lookup over the public mapping proxy,
    and the processor makes about ten lookups per GenAI span. Falls back to the public API."""
    bounded = getattr(span, "_attributes", None)
    raw = getattr(bounded, "_dict", None)
    return raw if type(raw) is dict else span.attributes


def get_active_processor() -> BudgetSpanProcessor | None:
    """The processor instrumentors and ``budget()`` use: the most recently created one
    that is not shut down."""
    return _ACTIVE[-1] if _ACTIVE else None


def lease_id_of(trace_id: int, span_id: int) -> int:
    return (trace_id << 64) | span_id


def mark_refused(span: Any, error: BudgetExceededError) -> None:
    """Record a refusal on a span the way the GenAI conventions record errors, and end it."""
    try:
        if span.is_recording():
            span.set_attributes({
                attrs.ERROR_TYPE: _ABORTED,
                attrs.BUDGET_SCOPE: error.scope,
                "otel_budget.budget.reason": error.reason,
                **({attrs.BUDGET_LIMIT_USD: error.budget_usd} if error.budget_usd is not None else {}),
                **({attrs.BUDGET_REMAINING_USD: error.remaining_usd}
                   if error.remaining_usd is not None else {}),
            })  # fmt: skip
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
    finally:
        span.end()


class BudgetSpanProcessor(SpanProcessor):
    """Keeps budgets per trace (and per named scope) and enforces them at GenAI span start.

    ``max_usd`` is the budget of each trace (None: no per-trace limit, only ``scopes`` and
    ``budget()`` blocks). See ``BudgetSettings`` for the other arguments.
    """

    def __init__(
        self,
        max_usd: Any = None,
        *,
        scopes: Sequence[ScopeRule] = (),
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        failure_policy: str = FAIL_OPEN,
        default_max_output_tokens: int = 4096,
        assumed_input_tokens: int = 8192,
        on_warning: Callable[[dict[str, Any]], Any] | None = None,
        on_exceeded: Callable[[dict[str, Any]], Any] | None = None,
        prices: PriceBook | None = None,
        storage: LedgerStorage | None = None,
        trace_ttl_seconds: float = 3600.0,
        max_tracked_traces: int = 100_000,
        cap_output_tokens: bool = True,
        min_output_tokens: int = 16,
        stream_include_usage: bool = True,
        meter_provider: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = BudgetSettings(
            max_usd=max_usd,
            scopes=scopes,
            thresholds=thresholds,
            failure_policy=failure_policy,
            default_max_output_tokens=default_max_output_tokens,
            assumed_input_tokens=assumed_input_tokens,
            on_warning=on_warning,
            on_exceeded=on_exceeded,
            trace_ttl_seconds=trace_ttl_seconds,
            max_tracked_traces=max_tracked_traces,
            cap_output_tokens=cap_output_tokens,
            min_output_tokens=min_output_tokens,
            stream_include_usage=stream_include_usage,
        )
        self.prices = prices if prices is not None else PriceBook()
        self.storage = storage if storage is not None else MemoryStorage()
        self.engine = BudgetEngine(self.settings, self.storage, self.prices, clock=clock)
        self.metrics = BudgetMetrics(meter_provider)
        self.engine.metrics = self.metrics
        self._shutdown = False
        self._nested: set[int] = set()  # GenAI spans inside our metered calls (not charged)
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)

    # -- SpanProcessor ------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self._shutdown:
            return
        try:
            parent = span.parent
            attributes = _attribute_dict(span)
            if (parent is None or parent.is_remote) and (
                attributes.get(attrs.GEN_AI_OPERATION_NAME) is None
            ):
                # A GenAI span that is its own root (a bare script's call) carries its cost
                # itself; a breakdown of one call would only repeat it.
                self._track_root(span)
            projected = attributes.get(attrs.COST_PROJECTED_USD)
            if projected is None:
                if (
                    parent is not None
                    and not parent.is_remote
                    and attributes.get(attrs.GEN_AI_OPERATION_NAME) is not None
                    and self.engine.open_charge(lease_id_of(parent.trace_id, parent.span_id))
                ):
                    # A GenAI span inside one of our metered calls (an SDK's own span, say)
                    # describes the same money: never charge it again. Marked at start,
                    # since for streams it may end after our call has settled.
                    ctx = span.get_span_context()
                    self._nested.add(lease_id_of(ctx.trace_id, ctx.span_id))
                    return
                # Another instrumentation's GenAI span: project it from what it carries.
                foreign = reserve_arguments(self, span, parent is None, attributes)
                if foreign is None:
                    return
                attributes, projected = foreign
            elif parent is not None and not parent.is_remote:
                supersede_outer_projection(
                    self.engine, lease_id_of(parent.trace_id, parent.span_id),
                    attributes.get(attrs.GEN_AI_OPERATION_NAME),
                )  # fmt: skip
            operation = attributes.get(attrs.GEN_AI_OPERATION_NAME)
            if operation is None:
                return
            self._reserve_at_start(span, parent is None, attributes, projected, operation)
        except BudgetExceededError:
            raise
        except Exception as exc:  # our bug must not reach the app
            refusal = self.engine.internal_error("BudgetSpanProcessor.on_start", exc)
            if refusal is not None:
                mark_refused(span, refusal)
                raise refusal from exc

    def _reserve_at_start(
        self, span: Span, parentless: bool, attributes: Any, projected: Any, operation: str
    ) -> None:
        ctx = span.get_span_context()
        lease = lease_id_of(ctx.trace_id, ctx.span_id)
        # Untrusted if it comes from another instrumentation: NaN/negative -> ValueError.
        if type(projected) is float and 0.0 <= projected < _HUGE:
            amount = math.ceil(projected * NANOS_PER_USD)  # hot path: skip Decimal
        elif isinstance(projected, bool) or not isinstance(projected, (int, float)):
            raise ValueError(f"{attrs.COST_PROJECTED_USD} must be a number, got {projected!r}")
        else:
            amount = parse_usd(projected, what=attrs.COST_PROJECTED_USD, allow_huge=True)
        if operation == attrs.OP_EXECUTE_TOOL:
            kind, name, provider = KIND_TOOL, str(attributes.get(attrs.GEN_AI_TOOL_NAME, "tool")), "tool"
        else:
            kind = KIND_LLM
            name = model_of(attributes) or "unknown"
            provider = provider_of(attributes) or "unknown"
        try:
            self.engine.reserve(
                lease, ctx.trace_id, parentless, attributes, amount,
                kind=kind, name=name, provider=provider, operation=operation,
            )  # fmt: skip
        except BudgetExceededError as error:
            mark_refused(span, error)
            raise
        except Exception as exc:
            refusal = self.engine.internal_error("reserve", exc)
            if refusal is not None:
                mark_refused(span, refusal)
                raise refusal from exc
            # fail_open: the call goes ahead unmetered; remember that, so the instrumentor
            # does not try (and wait on a dead ledger) a second time.
            self.engine.unmetered(
                lease, ctx.trace_id, amount, kind=kind, name=name, provider=provider,
                operation=operation, parentless=parentless, attributes=attributes,
            )  # fmt: skip

    def _track_root(self, span: Span) -> None:
        trace_id = span.get_span_context().trace_id
        stats = self.engine.trace_stats(trace_id)
        if stats is None or stats.root_span is not None:
            return
        stats.root_span = span
        original_end = span.end
        engine = self.engine

        # Written just before the root ends, once, with the public API: the exported root
        # then carries the final breakdown whatever the exporter and processor order. The
        # stats are looked up at that moment because ``budget()`` may have adopted the trace.
        def end(end_time: int | None = None) -> None:
            try:
                current = engine.trace_stats(trace_id, create=False)
                if current is not None and span.is_recording():
                    span.set_attributes(current.root_attributes())
            except Exception as exc:
                engine.log_once("root breakdown", exc)
            original_end(end_time)

        span.end = end  # type: ignore[method-assign]

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown:
            return
        try:
            attributes = _attribute_dict(span)
            operation = attributes.get(attrs.GEN_AI_OPERATION_NAME)
            ctx = span.context
            if operation is not None and ctx is not None:
                self._settle_at_end(span, attributes, operation, ctx.trace_id, ctx.span_id)
            parent = span.parent
            if (parent is None or parent.is_remote) and ctx is not None:
                # Only the trace's true root ends the trace everywhere; a service's local root
                # (remote parent) ends its part, while the trace may go on elsewhere on a
                # shared ledger, or come back here: its ledger scope then expires by TTL.
                self.engine.finish_trace(ctx.trace_id, evict=parent is None)
        except Exception as exc:  # never raise from on_end: it would break other exporters
            self.engine.internal_error("BudgetSpanProcessor.on_end", exc)

    def _settle_at_end(
        self, span: ReadableSpan, attributes: Any, operation: str, trace_id: int, span_id: int
    ) -> None:
        lease = lease_id_of(trace_id, span_id)
        engine = self.engine
        if self._nested:
            try:
                self._nested.remove(lease)
                return
            except KeyError:
                pass
        charge = engine.open_charge(lease)
        if charge is None and engine.is_duplicate_span(lease):
            return  # it wrapped one of our metered calls, which was charged
        if attributes.get(attrs.ERROR_TYPE) == _ABORTED and charge is None:
            return  # refused before it was sent: nothing was spent
        cost = attributes.get(attrs.COST_USD)
        if charge is None and cost is not None:
            return  # settled by our own instrumentation before the span ended
        status = span.status
        if cost is not None or operation == attrs.OP_EXECUTE_TOOL:
            # The span states its actual cost (a tool, or an instrumentation that priced
            # its own call): trust it if it is a sane number, else keep the projection.
            if type(cost) is float and 0.0 <= cost < _HUGE:
                actual: int | None = math.ceil(cost * NANOS_PER_USD)
            elif isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
                actual = usd_to_nanos(cost)
            else:
                actual = charge.projected if charge is not None else None
            if actual is None:
                return
            inp = attributes.get(attrs.GEN_AI_USAGE_INPUT_TOKENS)
            out = attributes.get(attrs.GEN_AI_USAGE_OUTPUT_TOKENS)
            self._settle(
                charge, span, attributes, operation, trace_id, lease, actual,
                inp if type(inp) is int else 0, out if type(out) is int else 0,
            )  # fmt: skip
            return
        usage = usage_from_attributes(attributes)
        if usage is None:
            if charge is not None:
                if status is not None and status.status_code is StatusCode.ERROR:
                    engine.release(charge)  # failed call with no usage: nothing billed
                else:
                    # Success without usage: never count it as free; keep the projection.
                    engine.settle(charge, charge.projected)
            return
        try:
            quote = price_span(self.prices, attributes, usage)
            actual = quote.nanos
        except LookupError as exc:
            engine.log_once(
                "price", None,
                f"no price for model {model_of(attributes)!r} ({exc}); charging its projection",
            )  # fmt: skip
            actual = charge.projected if charge is not None else 0
            if charge is None:
                return
        self._settle(
            charge, span, attributes, operation, trace_id, lease, actual,
            usage.input_tokens, usage.output_tokens,
        )  # fmt: skip

    def _settle(
        self, charge: Charge | None, span: ReadableSpan, attributes: Any, operation: str,
        trace_id: int, lease: int, actual: int, inp: int, out: int,
    ) -> None:  # fmt: skip
        if charge is not None:
            self.engine.settle(charge, actual, inp, out)
            return
        tool = operation == attrs.OP_EXECUTE_TOOL
        parent = span.parent
        self.engine.charge_unreserved(
            lease, trace_id, parent is None, attributes, actual,
            kind=KIND_TOOL if tool else KIND_LLM,
            name=str(attributes.get(attrs.GEN_AI_TOOL_NAME, "tool")) if tool
            else (model_of(attributes) or "unknown"),
            provider="tool" if tool else (provider_of(attributes) or "unknown"),
            operation=operation, input_tokens=inp, output_tokens=out,
        )  # fmt: skip

    def shutdown(self) -> None:
        self._shutdown = True
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        self.storage.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    # -- operator API -------------------------------------------------------------------------
    def pause(self, scope: str = "*") -> None:
        """Kill switch: refuse every new call (``"*"``) or those of one scope
        (``"user:alice"``, or ``"user:*"`` for every user)."""
        self.storage.pause(scope)

    def resume(self, scope: str = "*") -> None:
        self.storage.resume(scope)

    def set_scope_limit(self, kind: str, ident: str, max_usd: Any) -> None:
        """Give one identity its own cap, e.g. ``set_scope_limit("tenant", "acme", 900)``."""
        self.engine.set_scope_limit(kind, ident, parse_usd(max_usd, what="max_usd"))

    def trace_report(self, trace_id: int) -> Any:
        stats = self.engine.trace_stats(trace_id, create=False)
        return None if stats is None else stats.report()

    def process_report(self) -> Any:
        """Totals of calls charged to the process-wide scope (spans without any parent)."""
        return self.engine._process_stats.report()

    def spent_usd(self, key: str) -> float:
        usage = self.storage.usage(key)
        return 0.0 if usage is None else to_usd(usage.spent)


__all__ = ["BudgetSpanProcessor", "TraceStats", "get_active_processor", "mark_refused"]
