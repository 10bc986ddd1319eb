"""The wrapt wrappers of anthropic ``Messages.create`` / ``parse`` / ``stream`` (and beta).

    wrap_function_wrapper(
        "anthropic.resources.messages.messages", "Messages.create", messages_create(tracer, source)
    )

``create`` / ``parse`` read the request, reserve (the cap the budget affords lands in the
kwargs), send under the call's span with ``CURRENT_CALL`` set, then settle from the response's
``usage``; ``stream=True`` returns the SDK's stream wrapped in a proxy that settles however the
stream ends. That logic is written once, as a flow (``create_flow``), driven as the sync
wrapper by ``run_flow`` and as the async one by ``arun_flow``: the async wrapper awaits the
ledger's coroutines and never blocks the event loop.

``messages.stream()`` does not go through ``create``: it builds the request and hands it to a
stream manager that sends it on entry. The sending part (``sending``: under the call's span,
failed or charged when it raises, the raw events wrapped in the proxy the ``MessageStream``
helper reads through) is one flow for both. What differs, and why:

* ``Messages.stream`` (sync) reserves when ``stream()`` is called, so a refusal is raised
  there and the lowered cap is in the body of the ``partial(self._post, ...)`` the manager
  holds; the partial is replaced by one that sends it metered. A manager dropped without being
  entered sent nothing: its reservation is released. Entered again, it sends a new request,
  metered on its own.
* ``AsyncMessages.stream`` is a plain function that returns a manager holding an un-awaited
  ``_post`` coroutine: reserving there would block the event loop on the ledger. So the
  manager is wrapped, and the call is reserved when it is entered (``async with`` raises the
  refusal, or gives an ``on_exceeded`` substitute); the request is then built again with the
  cap (by calling ``stream()`` again with the capped kwargs) and sent. A manager never
  entered reserved nothing; its unsent coroutine is closed when it is dropped.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import context, trace

from otel_budget import attributes as attrs
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._cache import cache_of, plan_for, unusable_hit
from otel_budget.instrumentation._call import CURRENT_CALL, LLMCall, substitute_or_raise
from otel_budget.instrumentation._flow import Flow, Step, arun_flow, run_flow, send, step
from otel_budget.instrumentation.anthropic.request import astart, messages_request, start
from otel_budget.instrumentation.anthropic.response import (
    afail,
    fail,
    is_raw_response,
    log_unreadable,
    message_outcome,
)
from otel_budget.instrumentation.anthropic.streams import metered_stream, raw_stream_response
from otel_budget.metered import attach_span
from otel_budget.runtime import BudgetRuntime, RuntimeSource

Wrapper = Callable[..., Any]
KIND = "messages"  # the endpoint, for the prompt cache


class StreamManagerNotEnteredError(Exception):
    """Recorded on the span of a ``messages.stream()`` whose manager was dropped without being
    entered: no request was sent, and the reservation was released."""


def sending(call: LLMCall, request: Step) -> Flow[Any]:
    """Send ``request`` as ``call``: under its span, with ``CURRENT_CALL`` set (the SDK's
    attempt hooks and its own span see the call). When it raises, the call is released, or
    charged if it was billed, and the exception propagates."""
    token = CURRENT_CALL.set(call)
    try:
        active = attach_span(call.span)
        try:
            return (yield request)
        finally:
            context.detach(active)
    except BaseException as exc:
        yield step(fail, afail, call, exc)
        raise
    finally:
        CURRENT_CALL.reset(token)


# -- create / parse --------------------------------------------------------------------------
def create_flow(
    tracer: trace.Tracer, source: RuntimeSource, wrapped: Wrapper, instance: Any,
    args: tuple[Any, ...], kwargs: dict[str, Any], use_cache: bool = True,
) -> Flow[Any]:  # fmt: skip
    """One ``create`` / ``parse`` call, for the sync and the async wrapper."""
    if CURRENT_CALL.get() is not None or args:
        # Metered by an outer wrapper (litellm), or a positional call we cannot read.
        return (yield send(wrapped, args, kwargs))
    request = messages_request(instance, kwargs)
    runtime = source.get()
    cache = cache_of(source, runtime)
    if cache is not None and use_cache:
        request.cache = plan_for(cache, request, KIND, runtime)
    try:
        call: LLMCall = yield step(start, astart, tracer, runtime, request, kwargs)
    except BudgetExceededError as error:
        return substitute_or_raise(error)
    try:
        result = yield from sending(call, send(wrapped, args, kwargs))
    except BudgetExceededError as error:  # a retry the budget no longer affords
        return substitute_or_raise(error)
    except Exception:
        if not unusable_hit(call):
            raise
        # The SDK could not use the cached answer: a miss (the ordinary call), not an error.
        return (yield from create_flow(tracer, source, wrapped, instance, args, kwargs, False))
    if call.request.stream:
        if hasattr(result, "__next__") or hasattr(result, "__anext__"):
            return metered_stream(result, call)
        if is_raw_response(result):
            return raw_stream_response(result, call)
    try:
        message = (yield send(result.parse)) if is_raw_response(result) else result
    except Exception as exc:
        log_unreadable(call, exc)
        yield step(call.succeed, call.asucceed, None)  # billed: estimated, never zero
        return result
    usage, attributes, extra = message_outcome(message)
    yield step(call.succeed, call.asucceed, usage, attributes, **extra)
    return result


def messages_create(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    """``Messages.create`` / ``parse`` (and the beta ones): JSON or ``stream=True``."""

    def wrapper(wrapped: Wrapper, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return run_flow(create_flow(tracer, source, wrapped, instance, args, kwargs))

    return wrapper


def async_messages_create(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    """``AsyncMessages.create`` / ``parse`` (and the beta ones)."""

    async def wrapper(wrapped: Wrapper, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await arun_flow(create_flow(tracer, source, wrapped, instance, args, kwargs))

    return wrapper


# -- messages.stream() -----------------------------------------------------------------------
def _request_slot(manager: Any) -> str | None:
    """The manager's private request attribute (``_MessageStreamManager__api_request``, ...)."""
    try:
        names = vars(manager)
    except TypeError:
        return None
    for name in names:
        if isinstance(name, str) and name.endswith("__api_request"):
            return name
    return None


def _unhookable(call: LLMCall) -> Step:
    """A manager shape we do not know: the request will be sent unseen; charge the
    reservation (never free) rather than release it."""
    if call.processor is not None:
        call.processor.engine.log_once(
            "anthropic stream manager", None,
            "unknown MessageStreamManager shape; charging the projected cost",
        )  # fmt: skip
    budgeted = call.budgeted
    return step(budgeted.settle, budgeted.asettle, budgeted.projected_nanos,
                attributes={attrs.COST_ESTIMATED: True})  # fmt: skip


def _release_unsent(call: LLMCall) -> None:
    """A sync stream manager dropped without being entered: nothing was sent."""
    if not call.done:
        call.fail(StreamManagerNotEnteredError("messages.stream() was never entered; nothing sent"))


def messages_stream(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    """``Messages.stream`` (and beta): returns a manager that sends on ``__enter__``."""

    def wrapper(wrapped: Wrapper, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            return wrapped(*args, **kwargs)
        request = messages_request(instance, kwargs, stream=True)
        runtime = source.get()
        cache = cache_of(source, runtime)
        if cache is not None:
            request.cache = plan_for(cache, request, KIND, runtime)
        try:
            call = start(tracer, runtime, request, kwargs)  # before the body is built: the cap lands in it
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        try:
            manager = wrapped(*args, **kwargs)  # builds the request, sends nothing
        except BaseException as exc:
            call.fail(exc)
            raise
        slot = _request_slot(manager)
        original = getattr(manager, slot, None) if slot else None
        if not callable(original):
            _unhookable(call).blocking()
            return manager
        body = getattr(original, "keywords", {}).get("body")
        pending: list[LLMCall] = [call]

        def api_request() -> Any:
            if pending:
                current = pending.pop()
                finalizer.detach()
            else:
                # The manager entered again: a new request, metered on its own (the cap goes
                # into the body the partial sends).
                current = start(tracer, runtime, request, body if isinstance(body, dict) else {})
            raw = run_flow(sending(current, send(original)))
            return metered_stream(raw, current)

        finalizer = weakref.finalize(manager, _release_unsent, call)
        setattr(manager, slot, api_request)  # type: ignore[arg-type]
        return manager

    return wrapper


def _close(coroutine: Any) -> None:
    try:
        coroutine.close()  # never started: closing it silences "never awaited"
    except Exception:
        pass


class _AsyncStreamManager(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """An ``AsyncMessageStreamManager`` whose call is reserved on ``__aenter__``."""

    def __init__(
        self, manager: Any, tracer: trace.Tracer, runtime: BudgetRuntime | None,
        wrapped: Wrapper, instance: Any, kwargs: dict[str, Any], cache: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(manager)
        self._self_cache = cache
        self._self_tracer = tracer
        self._self_runtime = runtime
        self._self_wrapped = wrapped
        self._self_instance = instance
        self._self_kwargs = kwargs
        self._self_entered: Any = None
        slot = _request_slot(manager)
        unsent = getattr(manager, slot, None) if slot else None
        self._self_unsent = unsent
        self._self_finalizer = (
            weakref.finalize(self, _close, unsent) if hasattr(unsent, "close") else None
        )

    def _discard_unsent(self) -> None:
        if self._self_finalizer is not None:
            self._self_finalizer()  # closes the coroutine built without the cap, once

    async def __aenter__(self) -> Any:
        if self._self_entered is not None:  # entered again: the SDK's own behaviour
            return await self._self_entered.__aenter__()
        kwargs = dict(self._self_kwargs)
        request = messages_request(self._self_instance, kwargs, stream=True)
        if self._self_cache is not None:
            request.cache = plan_for(self._self_cache, request, KIND, self._self_runtime)
        self._discard_unsent()
        try:
            call = await astart(self._self_tracer, self._self_runtime, request, kwargs)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        try:
            manager = self._self_wrapped(**kwargs)  # the request again, with the cap
        except BaseException as exc:
            await call.afail(exc)
            raise
        self._self_entered = manager
        slot = _request_slot(manager)
        original = getattr(manager, slot, None) if slot else None
        if slot is None or not hasattr(original, "__await__"):
            await _unhookable(call).coroutine()
            return await manager.__aenter__()

        async def api_request() -> Any:
            raw = await arun_flow(sending(call, Step(lambda: original, lambda: original)))
            return metered_stream(raw, call)

        setattr(manager, slot, api_request())
        return await manager.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> Any:
        manager = self._self_entered if self._self_entered is not None else self.__wrapped__
        return await manager.__aexit__(*exc_info)


def async_messages_stream(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    """``AsyncMessages.stream`` (and beta): the manager awaits a ``_post`` coroutine."""

    def wrapper(wrapped: Wrapper, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            return wrapped(*args, **kwargs)
        messages_request(instance, kwargs, stream=True)  # one-shot iterators made lists, once
        manager = wrapped(*args, **kwargs)  # the SDK's own checks; sends nothing
        runtime = source.get()
        return _AsyncStreamManager(
            manager, tracer, runtime, wrapped, instance, kwargs, cache_of(source, runtime)
        )

    return wrapper


__all__ = [
    "StreamManagerNotEnteredError",
    "async_messages_create",
    "async_messages_stream",
    "create_flow",
    "messages_create",
    "messages_stream",
    "sending",
]
