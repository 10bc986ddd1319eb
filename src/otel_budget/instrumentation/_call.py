"""One instrumented LLM request: attributes at start, projection, output cap, reserve, settle.

    request = LLMRequest(provider="openai", operation="chat", model=kwargs["model"],
                         output_param="max_completion_tokens",
                         estimate=lambda: estimate_input_tokens(model, messages=messages))
    call = start_call(tracer, request, kwargs)      # may raise BudgetExceededError
    ...                                             # send (kwargs may now carry a cap)
    call.succeed(usage, response_attributes)        # or call.fail(exc)

Provider patches only know their SDK's shapes; everything budget-related lives here, so the
OpenAI, Anthropic and LiteLLM wrappers make the same decision the same way.

The hard cap: a reservation is only a guarantee if the call cannot cost more than it. When a
request has no output cap, one is set (the configured default); when its cap costs more than
the remaining budget affords, it is lowered to what is affordable (and the span says so);
when fewer than ``min_output_tokens`` are affordable the call is refused instead. Opt out
with ``cap_output_tokens=False`` (then the reservation is a projection, and an overshoot is
recorded truthfully when it happens).
"""

from __future__ import annotations

import contextvars
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_budget import attributes as attrs
from otel_budget.engine import KIND_LLM
from otel_budget.errors import REASON_UNKNOWN_MODEL, BudgetExceededError
from otel_budget.guard import BudgetedCall, begin_call
from otel_budget.instrumentation._attempts import is_transport_error, may_be_billed
from otel_budget.money import to_usd
from otel_budget.pricing import TokenUsage, UnknownModelError
from otel_budget.processor import BudgetSpanProcessor, get_active_processor, mark_refused
from otel_budget.tokens import InputEstimate, bytes_rule

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
COST_OUTPUT_CAPPED = "otel_budget.cost.output_capped"
COST_ATTEMPTS_CHARGED = "otel_budget.cost.attempts_charged"
EVENT_ATTEMPT_CHARGED = "otel_budget.attempt.charged"
#: Reported token counts above this are garbage (no context window is near it): clamped.
MAX_TOKENS = 100_000_000
_MTOK = 1_000_000

# Set while one instrumented call is in flight, so that a library instrumented at two levels
# (litellm calling the openai SDK) is charged once, by the outer wrapper.
IN_METERED_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "otel_budget_in_metered_call", default=False
)


def capture_content() -> bool:
    value = os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower()
    return value in ("true", "1", "yes", "span_only", "span_and_event")


@dataclass
class LLMRequest:
    """What a provider patch extracted from the SDK call."""

    provider: str
    operation: str
    model: str
    estimate: Callable[[], InputEstimate]
    output_param: str | None = None  # kwarg that caps output tokens; None for embeddings
    server_address: str | None = None
    server_port: int | None = None
    service_tier: str | None = None
    stream: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)
    choices: int = 1  # completions requested (OpenAI ``n``): the output cap applies to each


class LLMCall:
    """A started, reserved call. Settle it once: ``succeed``, ``fail``, ``fail_after_response``
    or ``fail_after_output``.

    The SDK hooks of ``_attempts`` report each HTTP attempt: ``begin_attempt`` (reserves the
    projection again after an attempt that may have been billed), ``attempt_answered`` and
    ``attempt_may_be_billed`` (charges the attempt its projection at once). The call's cost
    (``otel_budget.cost.usd``) is the sum of every attempt charged.
    """

    __slots__ = (
        "budgeted", "request", "processor", "input_tokens", "input_method", "started",
        "attempts", "charged_attempts", "charged_nanos", "needs_reservation", "status",
        "response",
    )  # fmt: skip

    def __init__(
        self, budgeted: BudgetedCall, request: LLMRequest, processor: BudgetSpanProcessor | None,
        input_tokens: int, input_method: str,
    ) -> None:  # fmt: skip
        self.budgeted = budgeted
        self.request = request
        self.processor = processor
        self.input_tokens = input_tokens
        self.input_method = input_method
        self.started = time.monotonic()
        self.attempts = 0  # HTTP attempts the SDK hooks saw
        self.charged_attempts = 0  # attempts that may have been billed, charged already
        self.charged_nanos = 0  # what those were charged
        self.needs_reservation = False  # the reservation went to a charged attempt
        self.status: int | None = None  # HTTP status of the last attempt (None: no answer)
        self.response: Any = None  # the last 2xx HTTP response

    @property
    def span(self) -> Any:
        return self.budgeted.span

    @property
    def done(self) -> bool:
        return self.budgeted.done

    @property
    def answered_ok(self) -> bool:
        """The provider answered 2xx: the call was billed, whatever happens next."""
        return self.status is not None and 200 <= self.status < 300

    # -- attempts (reported by the SDK hooks in ``_attempts``) ---------------------------------
    def begin_attempt(self) -> None:
        """The SDK is about to send an attempt. After one that may have been billed, reserve
        the projection again (raises ``BudgetExceededError`` when it no longer fits)."""
        self.attempts += 1
        self.status = None
        self.response = None
        if self.needs_reservation and not self.budgeted.done:
            self.reserve_next_attempt()

    def attempt_answered(self, status: int, response: Any = None) -> None:
        self.status = status
        self.response = response if 200 <= status < 300 else None

    def attempt_may_be_billed(self, exc: BaseException | None = None) -> None:
        """The attempt ended without an answer after it was sent (timeout, lost connection):
        the provider may have billed it. Charge it its projection now; never release it."""
        budgeted = self.budgeted
        if budgeted.done or self.needs_reservation:
            return
        projected = budgeted.projected_nanos
        charge = budgeted.charge
        processor = self.processor
        if charge is not None and processor is not None:
            try:
                processor.engine.settle(charge, projected, self.input_tokens, 0)
            except Exception as inner:
                processor.engine.internal_error("LLMCall.attempt_may_be_billed", inner)
        self.charged_attempts += 1
        self.charged_nanos += projected
        self.needs_reservation = True
        try:
            span = budgeted.span
            if span.is_recording():
                span.add_event(EVENT_ATTEMPT_CHARGED, {
                    attrs.COST_USD: to_usd(projected),
                    attrs.ERROR_TYPE: type(exc).__qualname__ if exc is not None else "unknown",
                })  # fmt: skip
        except Exception as inner:  # pragma: no cover - a misbehaving span
            if processor is not None:
                processor.engine.log_once("attempt event", inner)

    def reserve_next_attempt(self) -> None:
        """Reserve the projection again for another attempt, atomically through the engine
        (a new lease). Raises ``BudgetExceededError`` when it does not fit."""
        processor = self.processor
        old = self.budgeted.charge
        if processor is None or old is None:
            self.needs_reservation = False
            return
        engine = processor.engine
        parentless, attributes = self._scope_of(old.trace_id)
        lease = engine.new_lease_id()
        try:
            charge = engine.reserve(
                lease, old.trace_id, parentless, attributes, old.projected, kind=old.kind,
                name=old.name, provider=old.provider, operation=old.operation,
            )  # fmt: skip
        except BudgetExceededError:
            raise
        except Exception as exc:
            refusal = engine.internal_error("reserve", exc)
            if refusal is not None:
                raise refusal from exc
            charge = engine.unmetered(
                lease, old.trace_id, old.projected, kind=old.kind, name=old.name,
                provider=old.provider, operation=old.operation, parentless=parentless,
                attributes=attributes,
            )  # fmt: skip
        self.budgeted.charge = charge
        self.needs_reservation = False

    def _scope_of(self, trace_id: int) -> tuple[bool, Any]:
        """(parentless, start attributes) of the call, as its first reservation saw them."""
        span = self.budgeted.span
        if span.is_recording():
            return getattr(span, "parent", None) is None, getattr(span, "attributes", None)
        return not trace_id, None

    def _unreserved_charge(self) -> None:
        """Cost to commit with no live reservation (the last one went to a charged attempt):
        charge it to the ledger without one rather than lose it."""
        processor = self.processor
        old = self.budgeted.charge
        if not self.needs_reservation or processor is None or old is None:
            return
        engine = processor.engine
        parentless, attributes = self._scope_of(old.trace_id)
        try:
            self.budgeted.charge = engine.unmetered(
                engine.new_lease_id(), old.trace_id, old.projected, kind=old.kind,
                name=old.name, provider=old.provider, operation=old.operation,
                parentless=parentless, attributes=attributes,
            )  # fmt: skip
        except Exception as exc:
            engine.internal_error("LLMCall unreserved charge", exc)
        self.needs_reservation = False

    def _end_span(self, actual: int) -> None:
        """Record the whole call's cost (``actual`` plus every charged attempt) and end the
        span."""
        span = self.budgeted.span
        try:
            if self.charged_attempts and span.is_recording():
                span.set_attributes({
                    attrs.COST_USD: to_usd(actual + self.charged_nanos),
                    COST_ATTEMPTS_CHARGED: self.charged_attempts,
                })  # fmt: skip
        except Exception as exc:
            if self.processor is not None:
                self.processor.engine.internal_error("LLMCall end span", exc)
        finally:
            span.end()

    # -- pricing -------------------------------------------------------------------------------
    def price(self, usage: TokenUsage, response_model: str | None = None) -> tuple[int, dict[str, Any]]:
        """Actual cost of ``usage`` (nano-USD) and the provenance attributes."""
        processor = self.processor
        if processor is None:
            return 0, {}
        request = self.request
        model = response_model or request.model
        try:
            quote = processor.prices.quote(
                request.provider, model, usage, server_address=request.server_address,
                service_tier=request.service_tier,
            )  # fmt: skip
        except UnknownModelError:
            if model == request.model:
                raise
            quote = processor.prices.quote(
                request.provider, request.model, usage, server_address=request.server_address,
                service_tier=request.service_tier,
            )  # fmt: skip
        return quote.nanos, {attrs.PRICE_SOURCE: quote.source, attrs.PRICE_MODEL: quote.model}

    def checked_usage(
        self, usage: TokenUsage | None, output_text: str | None, output_units: int
    ) -> tuple[TokenUsage, bool]:
        """The usage to charge, and whether it is (partly) estimated. Reported usage that is
        missing, zero or absurd is never trusted below what the call evidently used: each
        such count is raised to the estimate (input from the projection's estimate, output
        from the output seen); counts beyond what is possible (an output above the request's
        cap, an input above ``MAX_TOKENS``) are clamped."""
        estimate = self.estimated_usage(output_text, output_units)
        if usage is None:
            return estimate, True
        estimated = False
        inp, out = usage.input_tokens, usage.output_tokens
        if inp <= 0 and estimate.input_tokens > 0:
            inp, estimated = estimate.input_tokens, True
        if out <= 0 and estimate.output_tokens > 0:
            out, estimated = estimate.output_tokens, True
        if inp > MAX_TOKENS:
            inp, estimated = MAX_TOKENS, True
        bound = self._output_bound()
        if out > bound:  # more than the request let the provider generate: garbage
            out, estimated = bound, True
        if not estimated:
            return usage, False
        return TokenUsage(
            input_tokens=inp, output_tokens=out,
            cache_read_tokens=min(usage.cache_read_tokens, inp),
            cache_write_tokens=min(usage.cache_write_tokens, max(0, inp - usage.cache_read_tokens)),
            reasoning_tokens=min(usage.reasoning_tokens, out),
        ), True  # fmt: skip

    def _output_bound(self) -> int:
        """The most output tokens the provider could have generated: the request's cap (per
        choice) when it sent one, else ``MAX_TOKENS``."""
        span = self.budgeted.span
        try:
            cap = (getattr(span, "attributes", None) or {}).get(attrs.GEN_AI_REQUEST_MAX_TOKENS)
        except Exception:
            cap = None
        if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
            return min(MAX_TOKENS, cap * max(1, self.request.choices))
        return MAX_TOKENS

    def _actual(
        self, usage: TokenUsage | None, output_text: str | None, output_units: int,
        response_model: str | None, out: dict[str, Any],
    ) -> tuple[int, TokenUsage]:  # fmt: skip
        """(nano-USD, usage) to commit; fills ``out`` with the usage attributes. Falls back
        to the reservation when the usage cannot be priced; never raises."""
        try:
            usage, estimated = self.checked_usage(usage, output_text, output_units)
            if estimated:
                out[attrs.COST_ESTIMATED] = True
            out.update(usage_attributes(usage))
            try:
                actual, provenance = self.price(usage, response_model)
                out.update(provenance)
            except Exception as exc:  # unpriceable after the fact: keep the reservation
                if self.processor is not None:
                    self.processor.engine.log_once("price after call", exc)
                actual = self.budgeted.projected_nanos
        except Exception as exc:
            if self.processor is not None:
                self.processor.engine.internal_error("LLMCall settle", exc)
            return self.budgeted.projected_nanos, TokenUsage()
        return actual, usage

    # -- settling ------------------------------------------------------------------------------
    def succeed(
        self,
        usage: TokenUsage | None,
        response_attributes: Mapping[str, Any] | None = None,
        *,
        response_model: str | None = None,
        output_text: str | None = None,
        output_units: int = 0,
        floor_nanos: int = 0,
    ) -> None:
        """Commit the actual cost. Without usage (the provider did not report it, or reported
        zeros or garbage), the cost is estimated from the input estimate and the output
        seen, never zero, and never below ``floor_nanos`` (a stream left early is charged its
        reservation)."""
        if self.budgeted.done:
            return
        out: dict[str, Any] = dict(response_attributes or {})
        actual, usage = self._actual(usage, output_text, output_units, response_model, out)
        actual = max(actual, floor_nanos)
        self._unreserved_charge()
        self.budgeted.finish(
            actual, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            attributes=out, end=False,
        )  # fmt: skip
        self._end_span(actual)
        self.record_metrics(usage, out.get(attrs.GEN_AI_RESPONSE_MODEL), None)

    def record_metrics(
        self, usage: TokenUsage | None, response_model: Any, error: BaseException | None
    ) -> None:
        """The GenAI client metrics: duration always, token usage on success."""
        processor = self.processor
        if processor is None:
            return
        request = self.request
        try:
            processor.metrics.record_call(
                operation=request.operation, provider=request.provider, model=request.model,
                response_model=response_model if isinstance(response_model, str) else None,
                server_address=request.server_address, server_port=request.server_port,
                duration_s=time.monotonic() - self.started,
                input_tokens=usage.input_tokens if usage is not None else None,
                output_tokens=usage.output_tokens if usage is not None else None,
                error_type=type(error).__qualname__ if error is not None else None,
            )  # fmt: skip
        except Exception as exc:
            processor.engine.log_once("metrics", exc)

    def estimated_usage(self, output_text: str | None, output_units: int) -> TokenUsage:
        output = max(output_units, bytes_rule(output_text) if output_text else 0)
        return TokenUsage(input_tokens=self.input_tokens, output_tokens=output)

    def fail(self, exc: BaseException) -> None:
        """The call raised. Nothing is charged for attempts the provider answered with an
        error status or never received; an attempt that may have been billed (timed out or
        lost after sending) was charged when it ended, and is never released. When no SDK
        hook saw the attempts (an HTTP layer not hooked), a timeout or lost connection is
        charged the reservation."""
        if self.budgeted.done:
            return
        if self.answered_ok:  # billed, then the SDK raised (parsing): never free
            self.fail_after_response(exc, None)
            return
        if self.attempts == 0 and is_transport_error(exc) and may_be_billed(exc):
            self.attempt_may_be_billed(exc)
        self.budgeted.fail(exc, end=False)
        self._end_span(0)
        self.record_metrics(None, None, exc)

    def fail_after_response(
        self,
        exc: BaseException,
        usage: TokenUsage | None,
        response_attributes: Mapping[str, Any] | None = None,
        *,
        response_model: str | None = None,
        output_text: str | None = None,
    ) -> None:
        """The provider answered 2xx (billed), then the SDK raised (a length or content-filter
        finish, a structured output that does not validate): charge the usage the response
        carried, or without it the reservation."""
        if self.budgeted.done:
            return
        out: dict[str, Any] = dict(response_attributes or {})
        if usage is None and not output_text:
            actual = self.budgeted.projected_nanos
            out[attrs.COST_ESTIMATED] = True
            usage = self.estimated_usage(None, 0)
        else:
            actual, usage = self._actual(usage, output_text, 0, response_model, out)
        self._unreserved_charge()
        self.budgeted.fail(
            exc, billed_nanos=actual, attributes=out, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, end=False,
        )  # fmt: skip
        self._end_span(actual)
        self.record_metrics(None, None, exc)

    def fail_after_output(
        self, exc: BaseException, usage: TokenUsage | None, output_text: str | None, units: int
    ) -> None:
        """A stream broke after producing output: that output was billed, so charge it. When
        the connection was lost (rather than the provider sending an error event), the
        provider may have gone on generating: charge at least the reservation."""
        if self.budgeted.done:
            return
        out: dict[str, Any] = {}
        actual, usage = self._actual(usage, output_text, units, None, out)
        if is_transport_error(exc) and actual < self.budgeted.projected_nanos:
            actual = self.budgeted.projected_nanos
            out[attrs.COST_ESTIMATED] = True
        self._unreserved_charge()
        self.budgeted.fail(
            exc, billed_nanos=actual, attributes=out, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, end=False,
        )  # fmt: skip
        self._end_span(actual)
        self.record_metrics(None, None, exc)


def usage_attributes(usage: TokenUsage) -> dict[str, Any]:
    out: dict[str, Any] = {
        attrs.GEN_AI_USAGE_INPUT_TOKENS: usage.input_tokens,
        attrs.GEN_AI_USAGE_OUTPUT_TOKENS: usage.output_tokens,
    }
    if usage.cache_read_tokens:
        out[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = usage.cache_read_tokens
    if usage.cache_write_tokens:
        out[attrs.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = usage.cache_write_tokens
    if usage.reasoning_tokens:
        out[attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = usage.reasoning_tokens
    return out


def _quote(processor: BudgetSpanProcessor, request: LLMRequest, model: str, inp: int, out: int) -> Any:
    return processor.prices.quote(
        request.provider, model, TokenUsage(input_tokens=inp, output_tokens=out),
        server_address=request.server_address, service_tier=request.service_tier,
    )  # fmt: skip


def _affordable_output(
    processor: BudgetSpanProcessor, request: LLMRequest, inp: int, room: int
) -> int:
    """Output tokens whose cost, with the input, fits in ``room`` nano-USD."""
    base = _quote(processor, request, request.model, inp, 0).nanos
    per_mtok = _quote(processor, request, request.model, inp, _MTOK).nanos - base
    if per_mtok <= 0:
        return 1 << 30  # output is free for this model
    if room <= base:
        return 0
    return ((room - base) * _MTOK) // per_mtok


def start_call(
    tracer: trace.Tracer,
    request: LLMRequest,
    kwargs: dict[str, Any],
    *,
    processor: BudgetSpanProcessor | None = None,
) -> LLMCall:
    """Project, cap, start the span and reserve. Raises ``BudgetExceededError`` (after
    recording it on an ended span) when the call may not be sent."""
    processor = processor if processor is not None else get_active_processor()
    span_attributes: dict[str, Any] = {
        attrs.GEN_AI_OPERATION_NAME: request.operation,
        attrs.GEN_AI_PROVIDER_NAME: request.provider,
        attrs.GEN_AI_REQUEST_MODEL: request.model,
    }
    if request.server_address:
        span_attributes[attrs.SERVER_ADDRESS] = request.server_address
    if request.server_port:
        span_attributes[attrs.SERVER_PORT] = request.server_port
    span_attributes.update(request.attributes)
    span_name = f"{request.operation} {request.model}"
    if processor is None:  # only tracing: no budget configured anywhere
        span = tracer.start_span(span_name, kind=SpanKind.CLIENT, attributes=span_attributes)
        return LLMCall(BudgetedCall(span, None, None), request, None, 0, "none")

    settings = processor.settings
    projected = 0
    estimate = InputEstimate(0, "none")
    refusal: BudgetExceededError | None = None
    try:
        estimate = request.estimate()
        span_attributes[attrs.COST_INPUT_ESTIMATED] = estimate.method
        if request.output_param is None:
            out_tokens, assumed = 0, False
        else:
            from otel_budget.tokens import output_bound

            out_tokens, assumed = output_bound(kwargs, settings.default_max_output_tokens)
        choices = max(1, request.choices)
        try:
            projected = _quote(
                processor, request, request.model, estimate.tokens, out_tokens * choices
            ).nanos
        except UnknownModelError as exc:
            refusal = _unknown_model_refusal(processor, request, exc)
        if refusal is None and request.output_param is not None and settings.cap_output_tokens:
            cap = out_tokens
            parent = trace.get_current_span().get_span_context()
            room = processor.engine.remaining(
                parent.trace_id if parent.is_valid else 0, not parent.is_valid, span_attributes
            )
            if room is not None and projected > room:
                affordable = _affordable_output(processor, request, estimate.tokens, room) // choices
                if affordable >= settings.min_output_tokens:
                    cap = min(out_tokens, affordable)
                    span_attributes[COST_OUTPUT_CAPPED] = cap
            if cap != out_tokens or assumed:
                kwargs[request.output_param] = cap
                out_tokens = cap
                assumed = False
                projected = _quote(
                    processor, request, request.model, estimate.tokens, cap * choices
                ).nanos
        if request.output_param is not None:
            if assumed:  # projected with a default the request does not carry
                span_attributes[attrs.COST_OUTPUT_ASSUMED] = True
            else:
                span_attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] = out_tokens
    except BudgetExceededError:
        raise
    except ValueError as exc:
        # A request we cannot project (a malformed max_tokens, say): the SDK will reject it
        # too; let it, without reserving, rather than raising a different error.
        processor.engine.log_once("projection", exc)
    except Exception as exc:
        error = processor.engine.internal_error("projection", exc)
        if error is not None:
            refusal = error
    if refusal is not None:
        # (No projected cost on this span: the processor must not reserve it again.)
        span = tracer.start_span(span_name, kind=SpanKind.CLIENT, attributes=span_attributes)
        mark_refused(span, refusal)
        raise refusal
    budgeted = begin_call(
        tracer, span_name, attributes=span_attributes, projected_nanos=projected,
        name=request.model, provider=request.provider, operation=request.operation,
        span_kind=SpanKind.CLIENT, charge_kind=KIND_LLM, processor=processor,
    )  # fmt: skip
    return LLMCall(budgeted, request, processor, estimate.tokens, estimate.method)


def _unknown_model_refusal(
    processor: BudgetSpanProcessor, request: LLMRequest, exc: UnknownModelError
) -> BudgetExceededError:
    from otel_budget.engine import Charge

    parent = trace.get_current_span().get_span_context()
    _, stats, _ = processor.engine.scopes_for(
        parent.trace_id if parent.is_valid else 0, not parent.is_valid, None
    )
    charge = Charge(None, parent.trace_id, (), 0, KIND_LLM, request.model, request.provider,
                    request.operation, stats)  # fmt: skip
    return processor.engine.refusal(REASON_UNKNOWN_MODEL, charge, None, str(exc))


def substitute_or_raise(error: BudgetExceededError) -> Any:
    """An ``on_exceeded`` callback may answer ``Substitute(value)``: return that instead."""
    if error.substitute is not None:
        return error.substitute.value
    raise error


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


__all__ = [
    "IN_METERED_CALL",
    "LLMCall",
    "LLMRequest",
    "capture_content",
    "math",
    "start_call",
    "substitute_or_raise",
    "usage_attributes",
]
