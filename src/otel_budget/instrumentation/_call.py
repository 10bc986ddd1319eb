"""One instrumented LLM request: attributes at start, projection, output cap, reserve, settle.

    request = LLMRequest(provider="openai", operation="chat", model=kwargs["model"],
                         output_param="max_completion_tokens",
                         estimate=lambda: estimate_input_tokens(model, messages=messages))
    call = start_call(tracer, request, kwargs)      # may raise BudgetExceededError
    ...                                             # send (kwargs may now carry a cap)
    call.succeed(usage, response_attributes)        # or call.fail(exc)

Provider patches only know their SDK's shapes; everything budget-related lives here, so the
OpenAI, Anthropic and LiteLLM wrappers make the same decision the same way.

The prompt cache is a step of the same path: ``start_call`` looks the request's key up first
(``LLMRequest.cache``, see ``_cache``); a hit starts a ``CachedCall`` (a span, no
projection, no reservation, no ledger operation) that settles at cost 0; a miss is the
ordinary call, whose successful answer is stored when it settles.

The hard cap: a reservation is only a guarantee if the call cannot cost more than it. When a
request has no output cap, one is set (the configured default); when its cap costs more than
the remaining budget affords, it is lowered to what is affordable (and the span says so);
when fewer than ``min_output_tokens`` are affordable the call is refused instead. Opt out
with ``cap_output_tokens=False`` (then the reservation is a projection, and an overshoot is
recorded truthfully when it happens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_budget import attributes as attrs
from otel_budget.costing import price_call, reconcile
from otel_budget.engine import KIND_LLM, Charge
from otel_budget.errors import REASON_INVALID_REQUEST, REASON_UNKNOWN_MODEL, BudgetExceededError
from otel_budget.instrumentation import _cache
from otel_budget.instrumentation._attempts import is_transport_error, may_be_billed
from otel_budget.instrumentation._content import (
    OUTPUT_MESSAGES,
    CallContent,
    SpanKeeper,
    content_mode,
    emit_event,
)
from otel_budget.instrumentation._flow import arun_flow, run_flow
from otel_budget.loops import KIND_PROMPT as LOOP_KIND_PROMPT
from otel_budget.metered import (
    CURRENT_CALL,
    MeteredCall,
    begin_steps,
    end_taken_over,
    error_type,
    refuse,
    start_span,
)
from otel_budget.metrics import BudgetMetrics
from otel_budget.misconfigured import MisconfiguredEngine, configuration_error
from otel_budget.money import to_usd
from otel_budget.pricing import TokenUsage, UnknownModelError
from otel_budget.runtime import BudgetRuntime
from otel_budget.steps import Steps, arun, run
from otel_budget.token_output import output_bound_ints
from otel_budget.tokens import InputEstimate, bytes_rule

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
COST_OUTPUT_CAPPED = "otel_budget.cost.output_capped"
COST_ATTEMPTS_CHARGED = "otel_budget.cost.attempts_charged"
EVENT_ATTEMPT_CHARGED = "otel_budget.attempt.charged"
#: Reported token counts above this are garbage (no context window is near it): clamped.
MAX_TOKENS = 100_000_000
_MTOK = 1_000_000
_INT64_MAX = 2**63 - 1

# Kept under its earlier name: set while a metered call is being sent (see CURRENT_CALL).
IN_METERED_CALL = CURRENT_CALL
UNKNOWN_MODEL_ENV = "OTEL_BUDGET_UNKNOWN_MODEL"
#: ``otel_budget.price.source`` of a call let through without a price (no limit applied).
PRICE_SOURCE_UNKNOWN = "unknown"


_NOTHING = TokenUsage()  # a cache hit's billed usage
_NO_ESTIMATE = InputEstimate(0, "none")  # a call not projected (yet)


class _Reported:
    """``reported_usage`` default: the usage given is what the provider reported."""


_SAME = _Reported()


def capture_content() -> bool:
    """Whether message content goes on spans (``SPAN_ONLY`` / ``SPAN_AND_EVENT``, or the
    ``true`` this repository accepted first); see ``_content`` for the modes and events."""
    return content_mode().span


@dataclass
class LLMRequest:
    """What a provider patch extracted from the SDK call."""

    provider: str
    operation: str
    model: str
    estimate: Any  # Callable[[], InputEstimate]
    output_param: str | None = None  # kwarg that caps output tokens; None for embeddings
    server_address: str | None = None
    server_port: int | None = None
    service_tier: str | None = None
    stream: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)
    choices: int = 1  # completions requested (OpenAI ``n``): the output cap applies to each
    # What the request sends (kwargs merged with ``extra_body``), for the output bound; None:
    # the kwargs given to ``start_call``.
    params: Mapping[str, Any] | None = None
    # Writes the cap where it takes effect (``extra_body`` when it carries the key) and
    # returns whether it wrote it; None: ``kwargs[output_param] = cap``.
    write_output: Callable[[dict[str, Any], int], bool] | None = None
    output_audio: bool = False  # spoken output asked for: every output token priced as audio
    content: CallContent | None = None  # message content / event (None: both off)
    # The prompt cache's plan (``_cache.plan_for``): None when no cache applies; looked up
    # by ``start_call`` / ``astart_call`` before anything is reserved.
    cache: Any = None


class LLMCall:
    """A started, reserved call. Settle it once: ``succeed``, ``fail``,
    ``fail_after_response`` or ``fail_after_output`` (each also as an ``a``-prefixed
    coroutine that never blocks the event loop on the ledger: one definition, driven sync or
    async, see ``otel_budget.steps``).

    The SDK hooks of ``_attempts`` report each HTTP attempt: ``begin_attempt`` (reserves the
    projection again after an attempt that may have been billed), ``attempt_answered`` and
    ``attempt_may_be_billed`` (charges the attempt its projection at once). The call's cost
    (``otel_budget.cost.usd``) is the sum of every attempt charged.
    """

    __slots__ = (
        "budgeted", "request", "processor", "input_tokens", "input_method", "started",
        "attempts", "charged_attempts", "charged_nanos", "needs_reservation", "status",
        "response", "metric_attributes", "cache",
    )  # fmt: skip

    def __init__(
        self, budgeted: MeteredCall, request: LLMRequest, runtime: BudgetRuntime | None,
        input_tokens: int, input_method: str,
    ) -> None:  # fmt: skip
        self.budgeted = budgeted
        self.request = request
        self.processor = runtime  # the runtime (it has the processor's engine/prices/metrics)
        self.input_tokens = input_tokens
        self.input_method = input_method
        self.started = time.monotonic()
        self.attempts = 0  # HTTP attempts the SDK hooks saw
        self.charged_attempts = 0  # attempts that may have been billed, charged already
        self.charged_nanos = 0  # what those were charged
        self.needs_reservation = False  # the reservation went to a charged attempt
        self.status: int | None = None  # HTTP status of the last attempt (None: no answer)
        self.response: Any = None  # the last 2xx HTTP response
        # Provider-specific attributes of the gen_ai.client.* points (the response readers
        # add those the official instrumentation records, e.g. openai.response.service_tier).
        self.metric_attributes: dict[str, Any] = {}
        self.cache: Any = None  # the prompt cache's plan (its ``entry``: a hit)

    @property
    def runtime(self) -> BudgetRuntime | None:
        return self.processor

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

    def _storage(self) -> Any:
        return self.processor.storage if self.processor is not None else None

    # -- attempts (reported by the SDK hooks in ``_attempts``) ---------------------------------
    def _next_attempt(self) -> bool:
        """Count an attempt; True when it needs a reservation (the last may have been billed)."""
        self.attempts += 1
        self.status = None
        self.response = None
        return self.needs_reservation and not self.budgeted.done

    def begin_attempt_steps(self) -> Steps[None]:
        """The SDK is about to send an attempt. After one that may have been billed, reserve
        the projection again (raises ``BudgetExceededError`` when it no longer fits)."""
        if self._next_attempt():
            yield from self._reserve_next_steps()
        return None

    # (The usual attempt reserves nothing: no steps driver is started for it.)
    def begin_attempt(self) -> None:
        if self._next_attempt():
            run(self._reserve_next_steps(), self._storage())

    async def abegin_attempt(self) -> None:
        if self._next_attempt():
            await arun(self._reserve_next_steps(), self._storage())

    def attempt_answered(self, status: int, response: Any = None) -> None:
        self.status = status
        self.response = response if 200 <= status < 300 else None
        if self.cache is not None and self.response is not None:
            _cache.watch(self.cache, response)  # a cacheable miss: keep the streamed bytes

    def attempt_may_be_billed_steps(self, exc: BaseException | None = None) -> Steps[None]:
        """The attempt ended without an answer after it was sent (timeout, lost connection):
        the provider may have billed it. Charge it its projection now; never release it."""
        budgeted = self.budgeted
        if budgeted.done or self.needs_reservation:
            return None
        projected = budgeted.projected_nanos
        charge = budgeted.charge
        runtime = self.processor
        if charge is not None and runtime is not None:
            try:
                yield from runtime.engine.settle_steps(charge, projected, self.input_tokens, 0)
            except Exception as inner:
                runtime.engine.internal_error("LLMCall.attempt_may_be_billed", inner)
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
            if runtime is not None:
                runtime.engine.log_once("attempt event", inner)
        return None

    def attempt_may_be_billed(self, exc: BaseException | None = None) -> None:
        run(self.attempt_may_be_billed_steps(exc), self._storage())

    async def aattempt_may_be_billed(self, exc: BaseException | None = None) -> None:
        await arun(self.attempt_may_be_billed_steps(exc), self._storage())

    def _reserve_next_steps(self) -> Steps[None]:
        """Reserve the projection again for another attempt, atomically through the engine
        (a new lease). Raises ``BudgetExceededError`` when it does not fit."""
        runtime = self.processor
        old = self.budgeted.charge
        if runtime is None or old is None:
            self.needs_reservation = False
            return None
        engine = runtime.engine
        parentless, attributes = self._scope_of(old.trace_id)
        lease = engine.new_lease_id()
        try:
            charge = yield from engine.reserve_steps(
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
        return None

    def _scope_of(self, trace_id: int) -> tuple[bool, Any]:
        """(parentless, attributes) of the call, as its first reservation saw them."""
        span = self.budgeted.span
        if span.is_recording():
            return getattr(span, "parent", None) is None, getattr(span, "attributes", None)
        return not trace_id, None

    def _unreserved_charge(self) -> None:
        """Cost to commit with no live reservation (the last one went to a charged attempt):
        charge it to the ledger without one rather than lose it."""
        runtime = self.processor
        old = self.budgeted.charge
        if not self.needs_reservation or runtime is None or old is None:
            return
        engine = runtime.engine
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

    def _end_span(self, actual: int, error: BaseException | None = None) -> None:
        """Record the whole call's cost (``actual`` plus every charged attempt), emit the
        operation-details event (when asked for) and end the span."""
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
            content = self.request.content
            if content is not None:
                if error is not None:
                    content.base.setdefault(attrs.ERROR_TYPE, error_type(error))
                emit_event(content, span, content.base)
            span.end()

    def _settle_steps(
        self, actual: int, usage: TokenUsage, out: dict[str, Any], error: BaseException | None
    ) -> Steps[None]:
        """Commit ``actual`` (and any attempt charged unreserved), then end the span (with
        its event) and record the metrics: the last step of every settlement."""
        self._unreserved_charge()
        if self.cache is not None and error is None:  # a cacheable miss: store its answer
            _cache.store(self, self.cache, out)
        yield from self.budgeted.settle_steps(
            actual, error=error, attributes=out, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, end=False,
        )  # fmt: skip
        self._end_span(actual, error)
        self.record_metrics(out, error)
        return None

    def _take_content(self, out: dict[str, Any]) -> None:
        """The output messages a response reader left in ``out`` (see ``_content``)."""
        content = self.request.content
        if content is None:
            out.pop(OUTPUT_MESSAGES, None)
            return
        content.take_output(out)
        content.base.update(out)

    # -- pricing -------------------------------------------------------------------------------
    def price(self, usage: TokenUsage, response_model: str | None = None) -> tuple[int, dict[str, Any]]:
        """Actual cost of ``usage`` (nano-USD) and the provenance attributes."""
        runtime = self.processor
        if runtime is None:
            return 0, {}
        request = self.request
        quote = price_call(
            runtime.prices, request.provider, usage, (response_model, request.model),
            server_address=request.server_address, service_tier=request.service_tier,
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
        if usage is None:
            return self.estimated_usage(output_text, output_units), True
        estimated = False
        inp, out = usage.input_tokens, usage.output_tokens
        if inp <= 0 and self.input_tokens > 0:
            inp, estimated = self.input_tokens, True
        if out <= 0:  # (the output estimate reads the whole text: only when it is needed)
            seen = self.estimated_usage(output_text, output_units).output_tokens
            if seen > 0:
                out, estimated = seen, True
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
            input_audio_tokens=min(usage.input_audio_tokens, inp),
            output_audio_tokens=min(usage.output_audio_tokens, out),
        ), True  # fmt: skip

    def _output_bound(self) -> int:
        """The most output tokens the provider could have generated: the request's cap (per
        choice) when it sent one, else ``MAX_TOKENS``."""
        span = self.budgeted.span
        try:
            # (The SDK span's own attribute dict when it has one: the public mapping proxy
            # costs a Python-level ``Mapping.get`` per read.)
            raw = getattr(getattr(span, "_attributes", None), "_dict", None)
            held = raw if type(raw) is dict else getattr(span, "attributes", None) or {}
            cap = held.get(attrs.GEN_AI_REQUEST_MAX_TOKENS)
        except Exception:
            cap = None
        if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
            return min(MAX_TOKENS, cap * max(1, self.request.choices))
        return MAX_TOKENS

    def _actual(
        self, usage: TokenUsage | None, output_text: str | None, output_units: int,
        response_model: str | None, out: dict[str, Any], reported: Any = _SAME,
    ) -> tuple[int, TokenUsage]:  # fmt: skip
        """(nano-USD, usage) to commit; fills ``out`` with the usage attributes: the standard
        ``gen_ai.usage.*`` from what the provider reported (``reported``, by default
        ``usage``), and, when the usage charged is (partly) estimated, its counts as
        ``otel_budget.usage.*`` with ``otel_budget.cost.estimated``. Falls back to the
        reservation when the usage cannot be priced; never raises."""
        try:
            if reported is _SAME:
                reported = usage
            charged, estimated = self.checked_usage(usage, output_text, output_units)
            if reported is not None:
                out.update(usage_attributes(reported, self.request.operation != attrs.OP_EMBEDDINGS))
            if estimated or reported is None or (
                (charged.input_tokens, charged.output_tokens)
                != (reported.input_tokens, reported.output_tokens)
            ):
                out[attrs.COST_ESTIMATED] = True
                out[attrs.USAGE_INPUT_TOKENS] = charged.input_tokens
                out[attrs.USAGE_OUTPUT_TOKENS] = charged.output_tokens
            usage = charged
            local: int | None = None
            try:
                local, provenance = self.price(usage, response_model)
                out.update(provenance)
            except Exception as exc:  # unpriceable after the fact: a report, or the reservation
                if self.processor is not None and attrs.COST_PROVIDER_REPORTED_USD not in out:
                    self.processor.engine.log_once("price after call", exc)
            actual = self._reconciled(local, out, estimated)
        except Exception as exc:
            if self.processor is not None:
                self.processor.engine.internal_error("LLMCall settle", exc)
            return self.budgeted.projected_nanos, TokenUsage()
        return actual, usage

    def _reconciled(self, local: int | None, out: dict[str, Any], estimated: bool) -> int:
        """What to charge: our price ``local``, or the provider's own bill when the response
        reported one (``otel_budget.cost.provider_reported_usd`` in ``out``, put there by the
        response readers), by the one rule of ``costing.reconcile``; recorded in ``out``.
        Neither known: the reservation (never free)."""
        runtime = self.processor
        if runtime is None:
            return local or 0
        cost = reconcile(local, out.pop(attrs.COST_PROVIDER_REPORTED_USD, None))
        out.update(cost.attributes())
        if runtime.settings.semconv_cost:
            out.update(cost.semconv_attributes(estimated))
        if cost.distrusted:
            runtime.engine.log_once.warning(
                f"reported cost {self.request.provider} {self.request.model}",
                f"otel-budget: {self.request.provider} reported a cost for {self.request.model} "
                f"far below its price (${to_usd(cost.reported_nanos or 0):.9f} < "
                f"${to_usd(local or 0):.9f}): charging the price; add a price override if "
                "the report is the whole bill",
            )  # fmt: skip
        return cost.nanos if cost.nanos is not None else self.budgeted.projected_nanos

    # -- settling ------------------------------------------------------------------------------
    def succeed_steps(
        self,
        usage: TokenUsage | None,
        response_attributes: Mapping[str, Any] | None = None,
        *,
        response_model: str | None = None,
        output_text: str | None = None,
        output_units: int = 0,
        floor_nanos: int = 0,
        reported_usage: Any = _SAME,
        error: BaseException | None = None,
    ) -> Steps[None]:
        """Commit the actual cost. Without usage (the provider did not report it, or reported
        zeros or garbage), the cost is estimated from the input estimate and the output
        seen, never zero, and never below ``floor_nanos`` (a stream left early is charged its
        reservation). ``reported_usage``: what the provider reported, when ``usage`` adds
        estimates to it (the span's ``gen_ai.usage.*`` carry only the reported counts).
        ``error``: the caller's exception that ended a stream early, recorded on the span and
        the duration metric as the official instrumentations do (the cost is that of an early
        end all the same)."""
        if self.budgeted.done:
            end_taken_over(self.budgeted, error)
            return None
        if usage is None and self.request.output_audio:
            # A transcript says little about the audio billed: at least the reservation.
            floor_nanos = max(floor_nanos, self.budgeted.projected_nanos)
        out: dict[str, Any] = dict(response_attributes or {})
        self._take_content(out)
        actual, usage = self._actual(
            usage, output_text, output_units, response_model, out, reported_usage
        )
        actual = max(actual, floor_nanos)
        yield from self._settle_steps(actual, usage, out, error)
        return None

    def succeed(self, usage: TokenUsage | None, *args: Any, **kw: Any) -> None:
        run(self.succeed_steps(usage, *args, **kw), self._storage())

    async def asucceed(self, usage: TokenUsage | None, *args: Any, **kw: Any) -> None:
        await arun(self.succeed_steps(usage, *args, **kw), self._storage())

    def fail_steps(self, exc: BaseException) -> Steps[None]:
        """The call raised. Nothing is charged for attempts the provider answered with an
        error status or never received; an attempt that may have been billed (timed out or
        lost after sending) was charged when it ended, and is never released. When no SDK
        hook saw the attempts (an HTTP layer not hooked), a timeout or lost connection is
        charged the reservation."""
        if self.budgeted.done:
            end_taken_over(self.budgeted, exc)
            return None
        if self.answered_ok:  # billed, then the SDK raised (parsing): never free
            yield from self.fail_after_response_steps(exc, None)
            return None
        if self.attempts == 0 and is_transport_error(exc) and may_be_billed(exc):
            yield from self.attempt_may_be_billed_steps(exc)
        yield from self.budgeted.release_steps(exc, end=False)
        self._end_span(0, exc)
        self.record_metrics({}, exc)
        return None

    def fail(self, exc: BaseException) -> None:
        run(self.fail_steps(exc), self._storage())

    async def afail(self, exc: BaseException) -> None:
        await arun(self.fail_steps(exc), self._storage())

    def fail_after_response_steps(
        self,
        exc: BaseException,
        usage: TokenUsage | None,
        response_attributes: Mapping[str, Any] | None = None,
        *,
        response_model: str | None = None,
        output_text: str | None = None,
    ) -> Steps[None]:
        """The provider answered 2xx (billed), then the SDK raised (a length or content-filter
        finish, a structured output that does not validate): charge the usage the response
        carried, or without it the reservation."""
        if self.budgeted.done:
            end_taken_over(self.budgeted, exc)
            return None
        out: dict[str, Any] = dict(response_attributes or {})
        self._take_content(out)
        if usage is None and not output_text:
            actual = self.budgeted.projected_nanos
            out[attrs.COST_ESTIMATED] = True
            usage = self.estimated_usage(None, 0)
        else:
            actual, usage = self._actual(usage, output_text, 0, response_model, out)
        yield from self._settle_steps(actual, usage, out, exc)
        return None

    def fail_after_response(self, exc: BaseException, usage: TokenUsage | None, *args: Any,
                            **kw: Any) -> None:  # fmt: skip
        run(self.fail_after_response_steps(exc, usage, *args, **kw), self._storage())

    async def afail_after_response(self, exc: BaseException, usage: TokenUsage | None,
                                   *args: Any, **kw: Any) -> None:  # fmt: skip
        await arun(self.fail_after_response_steps(exc, usage, *args, **kw), self._storage())

    def fail_after_output_steps(
        self, exc: BaseException, usage: TokenUsage | None, output_text: str | None, units: int,
        response_attributes: Mapping[str, Any] | None = None, reported_usage: Any = _SAME,
    ) -> Steps[None]:
        """A stream broke after producing output: that output was billed, so charge it. When
        the connection was lost (rather than the provider sending an error event), the
        provider may have gone on generating: charge at least the reservation."""
        if self.budgeted.done:
            end_taken_over(self.budgeted, exc)
            return None
        out: dict[str, Any] = dict(response_attributes or {})
        actual, usage = self._actual(
            usage, output_text, units, None, out, reported_usage
        )
        if is_transport_error(exc) and actual < self.budgeted.projected_nanos:
            actual = self.budgeted.projected_nanos
            out[attrs.COST_ESTIMATED] = True
        yield from self._settle_steps(actual, usage, out, exc)
        return None

    def fail_after_output(
        self, exc: BaseException, usage: TokenUsage | None, output_text: str | None, units: int,
        *args: Any, **kw: Any,
    ) -> None:  # fmt: skip
        run(self.fail_after_output_steps(exc, usage, output_text, units, *args, **kw),
            self._storage())  # fmt: skip

    def metric_labels(self, response_model: Any) -> dict[str, Any]:
        """The attributes of this call's ``gen_ai.client.*`` points."""
        request = self.request
        return BudgetMetrics.call_labels(
            operation=request.operation, provider=request.provider, model=request.model,
            response_model=response_model if isinstance(response_model, str) else None,
            server_address=request.server_address, server_port=request.server_port,
            extra=self.metric_attributes,
        )  # fmt: skip

    def record_metrics(self, span_attributes: Mapping[str, Any], error: BaseException | None) -> None:
        """The GenAI client metrics: the duration, and the token counts the span reports
        (those the provider reported; never an estimate)."""
        runtime = self.processor
        if runtime is None:
            return
        try:
            inp = span_attributes.get(attrs.GEN_AI_USAGE_INPUT_TOKENS)
            out = span_attributes.get(attrs.GEN_AI_USAGE_OUTPUT_TOKENS)
            response_model = span_attributes.get(attrs.GEN_AI_RESPONSE_MODEL)
            request = self.request
            metrics = runtime.metrics
            labels, inp_labels, out_labels = metrics.call_label_sets(
                operation=request.operation, provider=request.provider, model=request.model,
                response_model=response_model if isinstance(response_model, str) else None,
                server_address=request.server_address, server_port=request.server_port,
                extra=self.metric_attributes,
            )  # fmt: skip
            metrics.record_call(
                labels, duration_s=time.monotonic() - self.started,
                input_tokens=inp if isinstance(inp, int) else None,
                output_tokens=out if isinstance(out, int) else None,
                error_type=error_type(error) if error is not None else None,
                token_labels=(inp_labels, out_labels),
            )  # fmt: skip
        except Exception as exc:
            runtime.engine.log_once("metrics", exc)

    def estimated_usage(self, output_text: str | None, output_units: int) -> TokenUsage:
        output = max(output_units, bytes_rule(output_text) if output_text else 0)
        audio = output if self.request.output_audio else 0
        return TokenUsage(
            input_tokens=self.input_tokens, output_tokens=output, output_audio_tokens=audio
        )


class CachedCall(LLMCall):
    """A prompt-cache hit (``_cache``): a metered call that costs nothing. It settles like
    any call (the cached body's usage, priced), then commits 0 and records the price as
    what it saved; the price is that of the model asked for, whatever the entry claims."""

    __slots__ = ()

    def price(self, usage: TokenUsage, response_model: str | None = None) -> tuple[int, dict[str, Any]]:
        return super().price(usage, None)

    def _settle_steps(
        self, actual: int, usage: TokenUsage, out: dict[str, Any], error: BaseException | None
    ) -> Steps[None]:
        _cache.settle_hit(self, out, actual)
        yield from super()._settle_steps(0, _NOTHING, out, error)
        return None


def usage_attributes(usage: TokenUsage, output: bool = True) -> dict[str, Any]:
    """The ``gen_ai.usage.*`` span attributes of a reported usage (no output count for an
    operation without output, such as embeddings; cache and reasoning counts when nonzero,
    as util-genai writes them)."""
    # (a count no int64 attribute can hold is garbage: left out rather than break export)
    out: dict[str, Any] = {}
    if usage.input_tokens <= _INT64_MAX:
        out[attrs.GEN_AI_USAGE_INPUT_TOKENS] = usage.input_tokens
    if output and usage.output_tokens <= _INT64_MAX:
        out[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] = usage.output_tokens
    for key, count in (
        (attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, usage.cache_read_tokens),
        (attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS, usage.cache_write_tokens),
        (attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, usage.reasoning_tokens),
    ):
        if count and count <= _INT64_MAX:
            out[key] = count
    return out


def _quote(runtime: BudgetRuntime, request: LLMRequest, inp: int, out: int) -> Any:
    audio = out if request.output_audio else 0  # worst case: every output token is audio
    key = (inp, out, audio)
    usage = _PROJECTED.get(key)
    if usage is None:  # (a TokenUsage is immutable: one per token bounds, shared)
        usage = TokenUsage(input_tokens=inp, output_tokens=out, output_audio_tokens=audio)
        if len(_PROJECTED) >= 1024:
            _PROJECTED.clear()
        _PROJECTED[key] = usage
    return runtime.prices.quote(
        request.provider, request.model, usage,
        server_address=request.server_address, service_tier=request.service_tier,
    )  # fmt: skip


_PROJECTED: dict[tuple[int, int, int], TokenUsage] = {}


def _affordable_output(runtime: BudgetRuntime, request: LLMRequest, inp: int, room: int) -> int:
    """Output tokens whose cost, with the input, fits in ``room`` nano-USD."""
    base = _quote(runtime, request, inp, 0).nanos
    per_mtok = _quote(runtime, request, inp, _MTOK).nanos - base
    if per_mtok <= 0:
        return 1 << 30  # output is free for this model
    if room <= base:
        return 0
    return int(((room - base) * _MTOK) // per_mtok)


def start_steps(
    runtime: BudgetRuntime | None,
    tracer: trace.Tracer,
    request: LLMRequest,
    kwargs: dict[str, Any],
) -> Steps[LLMCall]:
    """Project, reserve up to the worst case (at least the smallest useful call), derive the
    output cap from what the ledger granted, start the span. Raises ``BudgetExceededError``
    (after recording it on an ended span) when the call may not be sent.

    The hard cap: a request without an output cap gets one (the configured default); one
    whose cap costs more than the budget affords is lowered to what the ledger granted (the
    span says so); when not even ``min_output_tokens`` fit, the call is refused."""
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
    content = request.content
    if content is not None:
        span_attributes.update(content.span_attributes())
        content.base = span_attributes
        content.logger = getattr(tracer, "_self_otel_budget_logger", None)
        if content.mode.emit:  # a refused call's event goes in its span's context
            tracer = cast(trace.Tracer, SpanKeeper(tracer))
    span_name = f"{request.operation} {request.model}"
    plan = request.cache
    if plan is not None:
        span_attributes[attrs.CACHE_HIT] = hit = plan.entry is not None
        if hit:
            # A cache hit: a metered call that costs nothing. No projection, no reservation,
            # no ledger operation: answered even when the budget is spent.
            budgeted = yield from begin_steps(
                runtime, tracer, span_name, span_attributes, minimum=0, name=request.model,
                provider=request.provider, operation=request.operation,
                span_kind=SpanKind.CLIENT, charge_kind=KIND_LLM, free=True,
            )  # fmt: skip
            hit_call = CachedCall(budgeted, request, runtime, 0, "cache")
            _cache.started(hit_call, plan)
            return hit_call
    if runtime is None:  # only tracing: no budget configured anywhere
        span = start_span(tracer, span_name, span_attributes, SpanKind.CLIENT)
        call = LLMCall(MeteredCall(span, None, None), request, None, 0, "none")
        if plan is not None:
            _cache.started(call, plan)  # (a miss: its answer is stored all the same)
        return call

    settings = runtime.settings
    estimate = _NO_ESTIMATE
    refusal: BudgetExceededError | None = None
    minimum = maximum = 0
    out_tokens, assumed, int_limits = 0, False, True
    choices = max(1, request.choices)
    capping = False
    sent: Mapping[str, Any] = request.params if request.params is not None else kwargs
    try:
        estimate = request.estimate()
        span_attributes[attrs.COST_INPUT_ESTIMATED] = estimate.method
        if request.output_param is not None:
            out_tokens, assumed, int_limits = output_bound_ints(
                sent, settings.default_max_output_tokens
            )
        capping = request.output_param is not None and settings.cap_output_tokens
        try:
            maximum = _quote(runtime, request, estimate.tokens, out_tokens * choices).nanos
            minimum = maximum
            if capping and out_tokens > settings.min_output_tokens:
                minimum = _quote(
                    runtime, request, estimate.tokens, settings.min_output_tokens * choices
                ).nanos
        except UnknownModelError as exc:
            # Refused where a limit applies (an unpriced call cannot be budgeted); with no
            # limit on the call (a local or fine-tuned model, an Azure deployment name under
            # plain zero-code) it goes through unpriced, flagged, warned about once per model.
            if _limit_applies(runtime, span_attributes):
                refusal = _unknown_model_refusal(runtime, request, exc, span_attributes)
            else:
                span_attributes[attrs.PRICE_SOURCE] = PRICE_SOURCE_UNKNOWN
                runtime.engine.log_once(
                    f"unknown model {request.model!r}", None,
                    f"no price for model {request.model!r} ({request.provider}); no budget "
                    "applies to its calls, so they go through unpriced. Price it with "
                    f"{UNKNOWN_MODEL_ENV}=price_as:<model> or '<in>,<out>' $/MTok",
                )  # fmt: skip
    except ValueError as exc:
        # A request we cannot project (max_tokens="lots", n=True, ...) is never sent
        # unreserved: refused, with a message naming the parameter.
        refusal = _invalid_request_refusal(runtime, request, exc)
    except Exception as exc:
        refusal = runtime.engine.internal_error("projection", exc)
        # fail_open: reserve nothing up front; the cost is charged when the call settles.
    if refusal is not None:
        # (No projected cost on this span: nothing was reserved for it.)
        raise _refused_event(content, refuse(tracer, span_name, span_attributes, refusal), tracer)

    if request.output_param is not None:
        if assumed:  # projected with a default the request does not carry
            span_attributes[attrs.COST_OUTPUT_ASSUMED] = True
        else:
            span_attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] = out_tokens

    def on_grant(granted: int, late: dict[str, Any]) -> int:
        """Shape the request to what the ledger granted; returns its projected cost."""
        if request.output_param is None or not capping:
            return granted if request.output_param is None else maximum
        cap = out_tokens
        projected = maximum
        if granted < maximum:
            affordable = _affordable_output(runtime, request, estimate.tokens, granted)
            cap = max(min(out_tokens, affordable // choices), 0)
            projected = _quote(runtime, request, estimate.tokens, cap * choices).nanos
            while cap > 0 and projected > granted:  # rounding: stay within the grant
                cap -= 1
                projected = _quote(runtime, request, estimate.tokens, cap * choices).nanos
            late[COST_OUTPUT_CAPPED] = cap
            if request.cache is not None:
                request.cache.storable = False  # an answer the budget may have cut short
        if cap != out_tokens or assumed or not int_limits:
            # The cap is what the request now carries: injected, lowered, or the int a float
            # or numeric-string limit rounds up to; written where it takes effect.
            wrote = True
            if request.write_output is not None:
                wrote = request.write_output(kwargs, cap)
            else:
                kwargs[request.output_param] = cap
            if wrote:  # (a limit the SDK requires is never filled in: see write_output)
                late[attrs.GEN_AI_REQUEST_MAX_TOKENS] = cap
        return projected

    loop = None
    detector = runtime.engine.loops
    if detector is not None and detector.policy.prompts:
        # Opt-in: the request as sent (model, messages, every parameter), hashed.
        try:
            loop = (LOOP_KIND_PROMPT, detector.key(LOOP_KIND_PROMPT, request.model, dict(sent)))
        except Exception as exc:
            runtime.engine.log_once("prompt fingerprint", exc)
    try:
        budgeted = yield from begin_steps(
            runtime, tracer, span_name, span_attributes, minimum=minimum, maximum=maximum,
            name=request.model, provider=request.provider, operation=request.operation,
            span_kind=SpanKind.CLIENT, charge_kind=KIND_LLM, on_grant=on_grant, loop=loop,
        )  # fmt: skip
    except BudgetExceededError as error:
        _refused_event(content, error, tracer)
        raise
    call = LLMCall(budgeted, request, runtime, estimate.tokens, estimate.method)
    if plan is not None:
        _cache.started(call, plan)
    return call


def _refused_event(
    content: CallContent | None, error: BudgetExceededError, tracer: Any
) -> BudgetExceededError:
    """A refused call is an operation that failed: its event (in the refused span's context)
    carries the request and ``error.type``."""
    if content is not None:
        content.base[attrs.ERROR_TYPE] = "BudgetExceededError"  # as mark_refused records it
        emit_event(content, getattr(tracer, "last_span", None), content.base)
    return error


def start_call(
    tracer: trace.Tracer,
    request: LLMRequest,
    kwargs: dict[str, Any],
    *,
    runtime: BudgetRuntime | None = None,
    processor: Any = None,
) -> LLMCall:
    """``start_steps`` with blocking ledger calls."""
    if runtime is None and processor is not None:
        runtime = processor.runtime
    if request.cache is not None:
        run_flow(request.cache.lookup_flow())
    return run(
        start_steps(runtime, tracer, request, kwargs),
        runtime.storage if runtime is not None else None,
    )  # fmt: skip


async def astart_call(
    tracer: trace.Tracer,
    request: LLMRequest,
    kwargs: dict[str, Any],
    *,
    runtime: BudgetRuntime | None = None,
) -> LLMCall:
    """``start_steps`` with the ledger's coroutines."""
    if request.cache is not None:
        await arun_flow(request.cache.lookup_flow())
    return await arun(
        start_steps(runtime, tracer, request, kwargs),
        runtime.storage if runtime is not None else None,
    )  # fmt: skip


def _scopeless_charge(runtime: BudgetRuntime, request: LLMRequest) -> Charge:
    parent = trace.get_current_span().get_span_context()
    _, stats, _ = runtime.engine.scopes_for(
        parent.trace_id if parent.is_valid else 0, not parent.is_valid, None
    )
    return Charge(None, parent.trace_id, (), 0, KIND_LLM, request.model, request.provider,
                  request.operation, stats)  # fmt: skip


def _limit_applies(runtime: BudgetRuntime, attributes: Mapping[str, Any]) -> bool:
    """Whether any limit applies to a call in the current context: a scope of
    ``engine.scopes_for``, or a configuration failure that refuses every paid call."""
    if configuration_error(runtime) is not None:
        return True
    parent = trace.get_current_span().get_span_context()
    scopes, _, _ = runtime.engine.scopes_for(
        parent.trace_id if parent.is_valid else 0, not parent.is_valid, attributes
    )
    return bool(scopes)


def _unknown_model_refusal(
    runtime: BudgetRuntime, request: LLMRequest, exc: UnknownModelError,
    attributes: Mapping[str, Any] | None = None,
) -> BudgetExceededError:  # fmt: skip
    charge = _scopeless_charge(runtime, request)
    engine = runtime.engine
    if isinstance(engine, MisconfiguredEngine):
        return engine.configuration_refusal(charge)
    parent = trace.get_current_span().get_span_context()
    scopes, _, _ = engine.scopes_for(
        parent.trace_id if parent.is_valid else 0, not parent.is_valid, attributes
    )
    error = engine.refusal(
        REASON_UNKNOWN_MODEL, charge, None,
        f"{exc} (set {UNKNOWN_MODEL_ENV}=price_as:<model> or '<in>,<out>' $/MTok to price "
        "unknown models)",
    )  # fmt: skip
    error.scope = scopes[0].key if scopes else ""
    return error


def _invalid_request_refusal(
    runtime: BudgetRuntime, request: LLMRequest, exc: ValueError
) -> BudgetExceededError:
    charge = _scopeless_charge(runtime, request)
    return runtime.engine.refusal(
        REASON_INVALID_REQUEST, charge, None,
        f"otel-budget: refused {request.operation} {request.model}: cannot project its cost: {exc}",
    )  # fmt: skip


def substitute_or_raise(error: BudgetExceededError) -> Any:
    """An ``on_exceeded`` callback may answer ``Substitute(value)``: return that instead."""
    if error.substitute is not None:
        return error.substitute.value
    raise error


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0


__all__ = [
    "CURRENT_CALL",
    "IN_METERED_CALL",
    "CachedCall",
    "LLMCall",
    "LLMRequest",
    "astart_call",
    "capture_content",
    "start_call",
    "start_steps",
    "substitute_or_raise",
    "usage_attributes",
]
