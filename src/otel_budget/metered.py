"""The one metered-call path: reserve, start the span, settle or release, exactly once.

    call = begin(runtime, tracer, "chat gpt-4o-mini", attributes, minimum=floor,
                 maximum=worst_case, name="gpt-4o-mini", provider="openai")
    try:
        response = send()                 # only reached when the ledger granted the call
    except Exception as exc:
        call.fail(exc)                    # releases the reservation, records the error
        raise
    call.settle(actual_nanos, input_tokens=..., output_tokens=...)

Every kind of call goes through here: our provider wrappers (``instrumentation._call``),
``track_tool``, and the processor's handling of other instrumentations' spans
(``adopt_span``). One place reserves (``BudgetEngine.reserve_steps``, an atomic "reserve up
to" in the ledger), one settles (``BudgetEngine.settle_steps``), one registry
(``BudgetRuntime.calls``) knows which spans are metered so that nothing is charged twice.

``begin`` reserves *before* the span starts, so that an output cap derived from what the
ledger granted is on the span from its start. It is written once as a generator of ledger
operations (``otel_budget.steps``): ``begin`` runs it with blocking storage calls,
``abegin`` with the storage's coroutines, so a slow shared ledger never blocks an event loop.

Enforcement does not depend on a span processor seeing the span: a sampler that drops the
span, or a process without an SDK ``TracerProvider``, still reserves and settles here.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget.context import CURRENT_AGENT
from otel_budget.engine import KIND_LLM, Charge
from otel_budget.errors import BudgetExceededError
from otel_budget.money import to_usd
from otel_budget.runtime import (
    BudgetRuntime,
    CallRegistry,
    Deferred,
    current_runtime,
    span_lease,
)
from otel_budget.steps import Steps, arun, run

_ABORTED = "BudgetExceededError"
_NO_PARENT_ATTR = object()

# True while one of our metered spans is being started: span processors (ours, on any
# provider) leave that span to this module.
STARTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "otel_budget_starting", default=False
)
# The metered call whose request is being sent: an instrumented library that calls another
# instrumented library (litellm calling the openai SDK) is metered once, by the outer call.
CURRENT_CALL: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "otel_budget_current_call", default=None
)


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


def start_span(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, Any], kind: SpanKind
) -> Any:
    """Start one of our metered spans (span processors leave it to this module)."""
    token = STARTING.set(True)
    try:
        return tracer.start_span(name, kind=kind, attributes=attributes)
    finally:
        STARTING.reset(token)


def attach_span(span: Any) -> contextvars.Token[Context]:
    """Make ``span`` the current span until ``opentelemetry.context.detach(token)``: what
    ``trace.use_span(span, end_on_exit=False, record_exception=False,
    set_status_on_exception=False)`` does, without its generator-based context manager
    (four Python-level calls per use, on every metered call)."""
    return context.attach(trace.set_span_in_context(span))


def refuse(
    tracer: trace.Tracer, name: str, attributes: Mapping[str, Any], error: BudgetExceededError,
    kind: SpanKind = SpanKind.CLIENT,
) -> BudgetExceededError:  # fmt: skip
    """Record a call refused before any reservation on an ended span; returns the error."""
    mark_refused(start_span(tracer, name, attributes, kind), error)
    return error


class MeteredCall:
    """A span plus its charge; settle it exactly once (``settle`` or ``fail``)."""

    __slots__ = ("runtime", "span", "charge", "done", "span_lease", "delegated", "span_ended")

    def __init__(self, span: Any, charge: Charge | None, runtime: BudgetRuntime | None) -> None:
        self.runtime = runtime
        self.span = span
        self.charge = charge
        self.done = False
        self.span_lease = 0
        self.delegated = False  # another metered call (ours, inside this span) took it over
        self.span_ended = False  # (a taken-over span, ended by ``end_taken_over``)

    @property
    def processor(self) -> BudgetRuntime | None:
        """The runtime (named as the processor was: it has the same ``engine``/``prices``)."""
        return self.runtime

    @property
    def projected_nanos(self) -> int:
        return self.charge.projected if self.charge is not None else 0

    # -- settling: written once (``_settle_start``/``_settle_end``), driven sync or async ------
    def _settle_start(self, end: bool, error: BaseException | None) -> bool:
        """Whether this call still has to be settled (once: ``settle`` or ``fail``); a call
        settled already only has its taken-over span ended."""
        if self.done:
            if end:
                end_taken_over(self, error)
            return False
        self.done = True
        return True

    def _settle_end(
        self, actual_nanos: int | None, outcome: int | Exception,
        attributes: Mapping[str, Any] | None, end: bool, error: BaseException | None,
    ) -> None:  # fmt: skip
        """Record the settled cost on the span (with ``error``, if the call failed after it
        was billed) and end it. ``outcome``: the overshoot, or our own error while settling.
        A release (``actual_nanos`` None) records a cost of 0 and the call's error."""
        span = self.span
        try:
            if isinstance(outcome, Exception):
                raise outcome
            if span.is_recording():
                if actual_nanos is None:
                    span.set_attribute(attrs.COST_USD, 0.0)
                    if error is not None:
                        _record_error(span, error)
                    return
                extra: dict[str, Any] = dict(attributes) if attributes else {}
                extra[attrs.COST_USD] = to_usd(actual_nanos)
                if outcome:
                    extra[attrs.COST_OVERSHOOT_USD] = to_usd(outcome)
                span.set_attributes(extra)
                if error is not None:
                    _record_error(span, error)
        except Exception as exc:
            if self.runtime is not None:
                where = "release" if actual_nanos is None else "settle"
                self.runtime.engine.internal_error(f"MeteredCall.{where}", exc)
        finally:
            if end:
                span.end()

    def _abandon(self, end: bool) -> None:
        """Cancelled while the ledger answered: the span ends, nothing is recorded on it."""
        if end:
            self.span.end()

    def _ledger(self) -> tuple[Charge, Any] | None:
        """(the charge, the engine) when the ledger has something to settle."""
        charge, runtime = self.charge, self.runtime
        return None if charge is None or runtime is None else (charge, runtime.engine)

    def settle_steps(
        self,
        actual_nanos: int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        attributes: Mapping[str, Any] | None = None,
        end: bool = True,
        error: BaseException | None = None,
    ) -> Steps[None]:
        """Commit the actual cost, record it on the span (with ``error``, if the call failed
        after it was billed), end the span. (``settle``: the same, with the blocking ledger
        call.)"""
        if not self._settle_start(end, error):
            return None
        outcome: int | Exception = 0
        ledger = self._ledger()
        try:
            if ledger is not None:
                outcome = yield from ledger[1].settle_steps(
                    ledger[0], actual_nanos, input_tokens, output_tokens
                )
        except Exception as exc:
            outcome = exc
        except BaseException:  # cancelled while the ledger answered: the span still ends
            self._abandon(end)
            raise
        self._settle_end(actual_nanos, outcome, attributes, end, error)
        return None

    def settle(
        self,
        actual_nanos: int,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        attributes: Mapping[str, Any] | None = None,
        end: bool = True,
        error: BaseException | None = None,
    ) -> None:
        if not self._settle_start(end, error):
            return
        outcome: int | Exception = 0
        ledger = self._ledger()
        try:
            if ledger is not None:
                outcome = ledger[1].settle(ledger[0], actual_nanos, input_tokens, output_tokens)
        except Exception as exc:
            outcome = exc
        except BaseException:
            self._abandon(end)
            raise
        self._settle_end(actual_nanos, outcome, attributes, end, error)

    def release_steps(self, error: BaseException, *, end: bool = True) -> Steps[None]:
        """The call failed before it was billed: give the reservation back, charge nothing,
        record the error on the span. (``release``: the same, with the blocking call.)"""
        if not self._settle_start(end, error):
            return None
        outcome: int | Exception = 0
        try:
            ledger = self._ledger()
            if ledger is not None:
                yield from ledger[1].release_steps(ledger[0])
        except Exception as exc:
            outcome = exc
        except BaseException:
            self._abandon(end)
            raise
        self._settle_end(None, outcome, None, end, error)
        return None

    def release(self, error: BaseException, *, end: bool = True) -> None:
        if not self._settle_start(end, error):
            return
        outcome: int | Exception = 0
        try:
            ledger = self._ledger()
            if ledger is not None:
                ledger[1].release(ledger[0])
        except Exception as exc:
            outcome = exc
        except BaseException:
            self._abandon(end)
            raise
        self._settle_end(None, outcome, None, end, error)

    def _storage(self) -> Any:
        return self.runtime.storage if self.runtime is not None else None

    async def asettle(self, actual_nanos: int, **kw: Any) -> None:
        await arun(self.settle_steps(actual_nanos, **kw), self._storage())

    def fail(self, error: BaseException, *, billed_nanos: int | None = None, **kw: Any) -> None:
        """Failed: release, or (``billed_nanos``) charge what was billed anyway."""
        if billed_nanos is None:
            self.release(error, end=kw.get("end", True))
        else:
            self.settle(billed_nanos, error=error, **kw)

    async def afail(
        self, error: BaseException, *, billed_nanos: int | None = None, **kw: Any
    ) -> None:
        if billed_nanos is None:
            await arun(self.release_steps(error, end=kw.get("end", True)), self._storage())
        else:
            await self.asettle(billed_nanos, error=error, **kw)

    # Compatibility with the earlier ``BudgetedCall`` name of the same operation.
    def finish(self, actual_nanos: int, **kw: Any) -> None:
        self.settle(actual_nanos, **kw)


def end_taken_over(call: MeteredCall, error: BaseException | None = None) -> bool:
    """End the span of a call that a metered call inside it took over (``begin_steps``: it
    was released then, and the inner call charged the money): once, with ``error`` recorded
    the way the conventions record errors. False when the call was not taken over."""
    if not call.delegated:
        return False
    if call.span_ended:
        return True
    call.span_ended = True
    span = call.span
    try:
        if getattr(span, "end_time", None) is not None:
            return True  # its owner ended it (another instrumentation's span)
        if error is not None and span.is_recording():
            span.set_attribute(attrs.ERROR_TYPE, error_type(error))
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()
    except Exception as exc:  # a misbehaving span never reaches the app
        if call.runtime is not None:
            call.runtime.engine.log_once("end taken-over span", exc)
    return True


def error_type(error: BaseException) -> str:
    """The ``error.type`` of an exception, as the official GenAI instrumentations (and the
    SDK's ``exception.type``) spell it: the ``_gen_ai_error_type`` it declares (util-genai's
    convention, e.g. ``_OTHER`` for an abandoned stream), else the fully qualified class name
    (``openai.APITimeoutError``; builtins unqualified: ``TimeoutError``). A refusal is
    ``BudgetExceededError``, as ``mark_refused`` records it."""
    declared = getattr(error, "_gen_ai_error_type", None)
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(error, BudgetExceededError):
        return _ABORTED
    cls = type(error)
    module = cls.__module__
    return cls.__qualname__ if not module or module == "builtins" else f"{module}.{cls.__qualname__}"


def _record_error(span: Any, error: BaseException) -> None:
    """A failed call's span, as the official GenAI instrumentations record it: ERROR status
    and ``error.type`` (no exception event; refusals, ours alone, keep theirs)."""
    span.set_attribute(attrs.ERROR_TYPE, error_type(error))
    if isinstance(error, BudgetExceededError):
        span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, str(error)))


def _live_attributes(span: Any, fallback: Mapping[str, Any]) -> Mapping[str, Any]:
    """The span's attributes as the SDK holds them right after start, with what span
    processors added (a baggage processor copying ``user.id``, say): scope identities are
    read from there. Falls back to the attributes we started it with."""
    bounded = getattr(span, "_attributes", None)
    raw = getattr(bounded, "_dict", None)
    if type(raw) is dict:
        return raw
    try:
        live = span.attributes
    except Exception:
        live = None
    return live if isinstance(live, Mapping) and live else fallback


def begin_steps(
    runtime: BudgetRuntime | None,
    tracer: trace.Tracer,
    span_name: str,
    attributes: dict[str, Any],
    *,
    minimum: int,
    maximum: int | None = None,
    name: str,
    provider: str,
    operation: str | None = None,
    span_kind: SpanKind = SpanKind.CLIENT,
    charge_kind: str = KIND_LLM,
    on_grant: Callable[[int, dict[str, Any]], int] | None = None,
    loop: tuple[str, bytes] | None = None,
    free: bool = False,
) -> Steps[MeteredCall]:
    """Start the span, reserve between ``minimum`` and ``maximum`` (as much as the budget
    affords, in one atomic ledger step), and let ``on_grant(granted, late)`` shape the
    request to what was granted: it returns the request's final projected cost and puts the
    attributes that say so (the output cap) in ``late``, which are set on the span before
    anything is sent. Raises ``BudgetExceededError`` after recording the refusal on the
    ended span. ``loop`` (kind, fingerprint) is checked by loop detection before the
    reservation. ``free``: a call that costs nothing (a prompt-cache hit): no reservation
    and no ledger operation, only the run's report. Without a runtime the call is only
    traced."""
    if maximum is None:
        maximum = minimum
    attributes[attrs.COST_PROJECTED_USD] = to_usd(maximum)
    agent = CURRENT_AGENT.get()
    if agent is not None:
        attributes[attrs.AGENT_NAME] = agent
    if runtime is None:
        return MeteredCall(start_span(tracer, span_name, attributes, span_kind), None, None)
    operation = operation or attributes.get(attrs.GEN_AI_OPERATION_NAME) or "chat"
    engine = runtime.engine
    calls = runtime.calls
    parent_ctx: Any = None
    parentless = False
    if len(calls):
        parent_ctx = trace.get_current_span().get_span_context()
        parentless = not parent_ctx.is_valid
    if parent_ctx is not None and not parentless:
        outer_lease = span_lease(parent_ctx.trace_id, parent_ctx.span_id)
        outer = calls.get(outer_lease)
        if (
            isinstance(outer, MeteredCall) and outer.charge is not None and not outer.done
            and outer.charge.kind == charge_kind
        ):  # fmt: skip
            # Another instrumentation's GenAI span around ours describes the same call: this
            # call, which knows the request, meters it; the outer span is charged nothing.
            # (Only a call of the same kind: a model call made inside a priced tool is a
            # second cost, not the tool's.)
            outer.delegated = True
            outer.done = True
            loop = None  # the outer call was loop-checked already: one call, counted once
            yield from engine.release_steps(outer.charge)
            parentless = getattr(outer.span, "parent", 0) is None
        elif outer is not None:
            # Unreserved GenAI spans around ours: charged here, not when they end; when they
            # started the trace, this call is as parentless as a bare script's.
            parentless = calls.cover(outer_lease)
    span = start_span(tracer, span_name, attributes, span_kind)
    ctx = span.get_span_context()
    recording = ctx.is_valid and span.is_recording()
    if parent_ctx is None:
        # No open metered call to look up: the SDK span says whether it has a parent (its
        # ``parent`` is None exactly when the current span was invalid), which saves the
        # context lookup; any other span, the current span says it.
        parent = getattr(span, "parent", _NO_PARENT_ATTR) if recording else _NO_PARENT_ATTR
        if parent is None or isinstance(parent, SpanContext):
            parentless = parent is None
        else:
            parent_ctx = trace.get_current_span().get_span_context()
            parentless = not parent_ctx.is_valid
    if recording:
        trace_id = ctx.trace_id
        lease: int = (trace_id << 64) | ctx.span_id  # span_lease(trace_id, span_id), inline
        seen = _live_attributes(span, attributes)
    else:
        # Not a real span of its own: the API's no-op tracer hands back the *parent's*
        # context, whose id every call under that parent would share.
        lease = engine.new_lease_id()
        trace_id = parent_ctx.trace_id if parent_ctx is not None and parent_ctx.is_valid else 0
        seen = attributes
    late: dict[str, Any] = {}
    refusal: BudgetExceededError | None = None
    charge: Charge | None = None
    try:
        if free:
            charge = engine.free(
                lease, trace_id, parentless, seen, kind=charge_kind, name=name,
                provider=provider, operation=operation,
            )  # fmt: skip
            free_call = MeteredCall(span, charge, runtime)
            if recording:
                free_call.span_lease = lease
                calls.add(lease, free_call)
            return free_call
        charge = yield from engine.reserve_steps(
            lease, trace_id, parentless, seen, minimum, maximum,
            kind=charge_kind, name=name, provider=provider, operation=operation, loop=loop,
        )  # fmt: skip
        if on_grant is not None:
            charge.projected = on_grant(charge.projected, late)
    except BudgetExceededError as error:
        refusal = error
    except Exception as exc:
        refusal = engine.internal_error("reserve", exc)
        if refusal is None:
            # fail_open: the call goes ahead unmetered, its cost recorded when it settles.
            projected = maximum
            if on_grant is not None:
                try:
                    projected = on_grant(maximum, late)
                except Exception as inner:
                    engine.log_once("on_grant", inner)
            charge = engine.unmetered(
                lease, trace_id, projected, kind=charge_kind, name=name, provider=provider,
                operation=operation, parentless=parentless, attributes=seen,
            )  # fmt: skip
        else:
            refusal.__cause__ = exc
    if refusal is not None:
        mark_refused(span, refusal)
        raise refusal
    assert charge is not None
    call = MeteredCall(span, charge, runtime)
    if recording:
        if charge.projected != maximum:
            late[attrs.COST_PROJECTED_USD] = to_usd(charge.projected)
        if late:
            span.set_attributes(late)
        call.span_lease = lease
        calls.add(lease, call)
    return call


def begin(runtime: BudgetRuntime | None, tracer: trace.Tracer, span_name: str,
          attributes: dict[str, Any], **kw: Any) -> MeteredCall:  # fmt: skip
    """``begin_steps`` with blocking ledger calls."""
    return run(
        begin_steps(runtime, tracer, span_name, attributes, **kw),
        runtime.storage if runtime is not None else None,
    )  # fmt: skip


async def abegin(runtime: BudgetRuntime | None, tracer: trace.Tracer, span_name: str,
                 attributes: dict[str, Any], **kw: Any) -> MeteredCall:  # fmt: skip
    """``begin_steps`` with the ledger's coroutines: never blocks the event loop."""
    return await arun(
        begin_steps(runtime, tracer, span_name, attributes, **kw),
        runtime.storage if runtime is not None else None,
    )  # fmt: skip


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
    runtime: BudgetRuntime | None = None,
    processor: Any = None,
) -> MeteredCall:
    """Begin a call of a known projected cost (a tool, a hand-made GenAI call), on the given
    runtime (or processor's), else the process's current one."""
    if runtime is None:
        runtime = processor.runtime if processor is not None else current_runtime()
    return begin(
        runtime, tracer, span_name, attributes, minimum=projected_nanos, name=name,
        provider=provider, operation=operation, span_kind=span_kind, charge_kind=charge_kind,
    )  # fmt: skip


def adopt_span(
    runtime: BudgetRuntime,
    span: Any,
    attributes: Mapping[str, Any],
    projected: int,
    *,
    kind: str,
    name: str,
    provider: str,
    operation: str,
) -> MeteredCall:
    """Meter a span another instrumentation started (the processor's ``on_start``): reserve
    its projection, or end it as refused and raise ``BudgetExceededError``."""
    engine = runtime.engine
    ctx = span.get_span_context()
    parent = span.parent
    parentless = parent is None
    lease = engine.new_lease_id()
    try:
        charge = engine.reserve(
            lease, ctx.trace_id, parentless, attributes, projected,
            kind=kind, name=name, provider=provider, operation=operation,
        )  # fmt: skip
    except BudgetExceededError as error:
        mark_refused(span, error)
        raise
    except Exception as exc:
        refusal = engine.internal_error("reserve", exc)
        if refusal is not None:
            mark_refused(span, refusal)
            raise refusal from exc
        charge = engine.unmetered(
            lease, ctx.trace_id, projected, kind=kind, name=name, provider=provider,
            operation=operation, parentless=parentless, attributes=attributes,
        )  # fmt: skip
    call = MeteredCall(span, charge, runtime)
    call.span_lease = span_lease(ctx.trace_id, ctx.span_id)
    runtime.calls.add(call.span_lease, call)
    if parent is not None and not parent.is_remote:
        runtime.calls.cover(span_lease(parent.trace_id, parent.span_id))
    return call


def is_nested(runtime: BudgetRuntime, span: Any) -> bool:
    """A GenAI span started inside one of our metered calls (an SDK's own span, or another
    instrumentation under ours) describes the same money: note it, so it is not charged."""
    calls = runtime.calls
    nested = CURRENT_CALL.get() is not None
    if not nested and len(calls):
        parent = span.parent
        if parent is not None and not parent.is_remote:
            entry = calls.get(span_lease(parent.trace_id, parent.span_id))
            # (Under an unreserved GenAI span it is judged on its own: see ``Deferred``.)
            nested = entry is not None and not isinstance(entry, Deferred)
    if nested:
        ctx = span.get_span_context()
        calls.add(span_lease(ctx.trace_id, ctx.span_id), CallRegistry.NESTED)
    return nested


__all__ = [
    "CURRENT_CALL",
    "STARTING",
    "MeteredCall",
    "abegin",
    "adopt_span",
    "attach_span",
    "begin",
    "begin_call",
    "begin_steps",
    "end_taken_over",
    "error_type",
    "is_nested",
    "mark_refused",
    "refuse",
    "start_span",
]
