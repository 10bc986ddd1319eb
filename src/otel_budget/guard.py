"""A metered call: start a GenAI span, reserve its projected cost, settle or release it.

    call = begin_call(tracer, "chat gpt-4o-mini", attributes=request_attrs,
                      projected_nanos=projection, name="gpt-4o-mini", provider="openai")
    try:
        response = send()                      # only reached when the budget had room
    except Exception as exc:
        call.fail(exc)                         # releases the reservation, records the error
        raise
    call.finish(actual_nanos, input_tokens=..., output_tokens=...)

This is what instrumentors and ``track_tool`` use. The reservation is made by the
``BudgetSpanProcessor`` when it sees the span start (so other instrumentations' spans get the
same treatment) and, when it does not see it (sampled out, no SDK provider, processor not
registered on this provider), by this module through the same engine, keyed by the trace of
the current context. A sampler can therefore not switch the budget off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget.engine import KIND_LLM, Charge
from otel_budget.errors import BudgetExceededError
from otel_budget.money import to_usd
from otel_budget.processor import (
    BudgetSpanProcessor,
    get_active_processor,
    lease_id_of,
    mark_refused,
)


class BudgetedCall:
    """A span plus its reservation; settle it exactly once with ``finish`` or ``fail``."""

    __slots__ = ("span", "charge", "processor", "done")

    def __init__(self, span: Any, charge: Charge | None, processor: BudgetSpanProcessor | None):
        self.span = span
        self.charge = charge
        self.processor = processor
        self.done = False

    @property
    def projected_nanos(self) -> int:
        return self.charge.projected if self.charge is not None else 0

    def finish(
        self,
        actual_nanos: int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        attributes: Mapping[str, Any] | None = None,
        end: bool = True,
    ) -> None:
        """Commit the actual cost, record it on the span, end the span."""
        if self.done:
            return
        self.done = True
        span = self.span
        try:
            overshoot = 0
            if self.charge is not None and self.processor is not None:
                overshoot = self.processor.engine.settle(
                    self.charge, actual_nanos, input_tokens, output_tokens
                )
            if span.is_recording():
                extra: dict[str, Any] = dict(attributes) if attributes else {}
                extra[attrs.COST_USD] = to_usd(actual_nanos)
                if overshoot:
                    extra[attrs.COST_OVERSHOOT_USD] = to_usd(overshoot)
                span.set_attributes(extra)
        except Exception as exc:
            if self.processor is not None:
                self.processor.engine.internal_error("BudgetedCall.finish", exc)
        finally:
            if end:
                span.end()

    def fail(
        self,
        exc: BaseException,
        *,
        billed_nanos: int | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        attributes: Mapping[str, Any] | None = None,
        end: bool = True,
    ) -> None:
        """The call failed: release the reservation (or commit what was billed anyway, e.g. a
        stream that broke after producing output) and record the error on the span."""
        if self.done:
            return
        if billed_nanos is not None:
            self.finish(
                billed_nanos, input_tokens=input_tokens, output_tokens=output_tokens,
                attributes=attributes, end=False,
            )  # fmt: skip
        self.done = True
        span = self.span
        try:
            if billed_nanos is None and self.charge is not None and self.processor is not None:
                self.processor.engine.release(self.charge)
            if span.is_recording():
                span.set_attribute(attrs.ERROR_TYPE, type(exc).__qualname__)
                if billed_nanos is None:
                    span.set_attribute(attrs.COST_USD, 0.0)
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
        except Exception as inner:
            if self.processor is not None:
                self.processor.engine.internal_error("BudgetedCall.fail", inner)
        finally:
            if end:
                span.end()


def _is_gen_ai_span(span: Any) -> bool:
    try:
        attributes = getattr(span, "attributes", None)
        return bool(attributes) and attributes.get(attrs.GEN_AI_OPERATION_NAME) is not None
    except Exception:
        return False


def begin_call(
    tracer: trace.Tracer,
    span_name: str,
    *,
    attributes: dict[str, Any],
    projected_nanos: int,
    name: str,
    provider: str,
    operation: str | None = None,
    span_kind: SpanKind = SpanKind.CLIENT,
    charge_kind: str = KIND_LLM,
    processor: BudgetSpanProcessor | None = None,
) -> BudgetedCall:
    """Start the span and reserve; raises ``BudgetExceededError`` (span already ended and
    marked) when the call does not fit. Without any processor the call is only traced."""
    processor = processor if processor is not None else get_active_processor()
    attributes[attrs.COST_PROJECTED_USD] = to_usd(projected_nanos)
    operation = operation or attributes.get(attrs.GEN_AI_OPERATION_NAME) or "chat"
    parent_span = trace.get_current_span()
    parent_ctx = parent_span.get_span_context()
    span = tracer.start_span(span_name, kind=span_kind, attributes=attributes)
    if processor is None:
        return BudgetedCall(span, None, None)
    engine = processor.engine
    if parent_ctx.is_valid and _is_gen_ai_span(parent_span):
        # Another GenAI instrumentation's span around ours describes the same call: the
        # processor must not charge it again when it ends.
        engine.note_metered_parent(lease_id_of(parent_ctx.trace_id, parent_ctx.span_id))
    lease: Any = None
    trace_id = 0
    try:
        ctx = span.get_span_context()
        charge = None
        if ctx.is_valid and span.is_recording():
            lease = lease_id_of(ctx.trace_id, ctx.span_id)
            charge = engine.open_charge(lease)
            trace_id = ctx.trace_id
        else:
            # Not a real span of its own: the API's no-op tracer hands back the *parent's*
            # context, so its id would be shared by every call under that parent.
            lease = engine.new_lease_id()
            trace_id = ctx.trace_id if ctx.is_valid else (
                parent_ctx.trace_id if parent_ctx.is_valid else 0
            )
        if charge is None:
            charge = engine.reserve(
                lease, trace_id, not parent_ctx.is_valid, attributes, projected_nanos,
                kind=charge_kind, name=name, provider=provider, operation=operation,
            )  # fmt: skip
    except BudgetExceededError as error:
        mark_refused(span, error)
        raise
    except Exception as exc:
        refusal = engine.internal_error("reserve", exc)
        if refusal is not None:
            mark_refused(span, refusal)
            raise refusal from exc
        # fail_open: the call goes ahead unmetered, its cost recorded when it settles.
        charge = None
        if lease is not None:
            charge = engine.unmetered(
                lease, trace_id, projected_nanos, kind=charge_kind, name=name,
                provider=provider, operation=operation, parentless=not parent_ctx.is_valid,
                attributes=attributes,
            )  # fmt: skip
    return BudgetedCall(span, charge, processor)
