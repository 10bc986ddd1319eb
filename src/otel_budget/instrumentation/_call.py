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
from otel_budget.pricing import TokenUsage, UnknownModelError
from otel_budget.processor import BudgetSpanProcessor, get_active_processor, mark_refused
from otel_budget.tokens import InputEstimate, bytes_rule

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
COST_OUTPUT_CAPPED = "otel_budget.cost.output_capped"
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
    output_audio: bool = False  # spoken output asked for: every output token priced as audio


class LLMCall:
    """A started, reserved call. Settle it once: ``succeed`` or ``fail``."""

    __slots__ = (
        "budgeted", "request", "processor", "input_tokens", "input_method", "started",
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

    @property
    def span(self) -> Any:
        return self.budgeted.span

    @property
    def done(self) -> bool:
        return self.budgeted.done

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
        """Commit the actual cost. Without usage (the provider did not report it), the cost
        is estimated from the input estimate and the output seen, never zero, and never
        below ``floor_nanos`` (a stream left early is charged its reservation)."""
        out: dict[str, Any] = dict(response_attributes or {})
        try:
            if usage is None:
                usage = self.estimated_usage(output_text, output_units)
                out[attrs.COST_ESTIMATED] = True
                if self.request.output_audio:  # a transcript says little about the audio billed
                    floor_nanos = max(floor_nanos, self.budgeted.projected_nanos)
            out.update(usage_attributes(usage))
            try:
                actual, provenance = self.price(usage, response_model)
                out.update(provenance)
            except Exception as exc:  # unpriceable after the fact: keep the reservation
                if self.processor is not None:
                    self.processor.engine.log_once("price after call", exc)
                actual = self.budgeted.projected_nanos
            if actual < floor_nanos:
                actual = floor_nanos
        except Exception as exc:
            if self.processor is not None:
                self.processor.engine.internal_error("LLMCall.succeed", exc)
            actual = self.budgeted.projected_nanos
            usage = TokenUsage()
        self.budgeted.finish(
            actual, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            attributes=out,
        )  # fmt: skip
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
        audio = output if self.request.output_audio else 0
        return TokenUsage(input_tokens=self.input_tokens, output_tokens=output, output_audio_tokens=audio)

    def fail(self, exc: BaseException) -> None:
        """The provider answered an error (or none at all): nothing billed, nothing charged."""
        if self.budgeted.done:
            return
        self.budgeted.fail(exc)
        self.record_metrics(None, None, exc)

    def fail_after_output(
        self, exc: BaseException, usage: TokenUsage | None, output_text: str | None, units: int
    ) -> None:
        """A stream broke after producing output: that output was billed, so charge it."""
        out: dict[str, Any] = {}
        try:
            if usage is None:
                usage = self.estimated_usage(output_text, units)
                out[attrs.COST_ESTIMATED] = True
            out.update(usage_attributes(usage))
            actual, provenance = self.price(usage)
            out.update(provenance)
        except Exception:
            actual = self.budgeted.projected_nanos
        if self.budgeted.done:
            return
        self.budgeted.fail(
            exc, billed_nanos=actual, attributes=out,
            input_tokens=usage.input_tokens if usage is not None else 0,
            output_tokens=usage.output_tokens if usage is not None else 0,
        )  # fmt: skip
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
    audio = out if request.output_audio else 0  # worst case: every output token is audio
    return processor.prices.quote(
        request.provider, model, TokenUsage(input_tokens=inp, output_tokens=out, output_audio_tokens=audio),
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
