"""The wrapt wrappers of litellm's entry points: one flow, run as the sync or the async wrapper.

    wrapt.wrap_function_wrapper("litellm", "completion", completion(tracer, source))
    wrapt.wrap_function_wrapper("litellm", "acompletion", acompletion(tracer, source))

``call_flow`` is the whole wrapper, written once (see ``instrumentation._flow``): read the
request (``request``), reserve with ``start_call`` / ``astart_call`` (refused:
``BudgetExceededError``, or an ``on_exceeded`` substitute), send with ``CURRENT_CALL`` set (so
the openai / anthropic wrappers litellm may reach underneath pass through: one span, one
charge), then settle from the response (``response``) with ``succeed`` / ``asucceed``, or
``fail`` / ``afail`` when litellm raised; a stream is handed back in a proxy (``streams``)
that settles however it ends. ``run_flow`` drives it for ``completion`` / ``embedding``;
``arun_flow`` for ``acompletion`` / ``aembedding`` and ``completion(..., acompletion=True)``,
never calling a blocking ledger method on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._attempts import budget_refusal_in
from otel_budget.instrumentation._call import (
    CURRENT_CALL,
    astart_call,
    start_call,
    substitute_or_raise,
)
from otel_budget.instrumentation._flow import Flow, arun_flow, run_flow, send, step
from otel_budget.instrumentation.litellm.request import (
    ASYNC_FLAGS,
    KIND_CHAT,
    KIND_EMBEDDINGS,
    Binder,
    prepare_stream,
    read_request,
    sync_output_caps,
)
from otel_budget.instrumentation.litellm.response import settlement
from otel_budget.instrumentation.litellm.streams import stream_proxy
from otel_budget.runtime import RuntimeSource

Wrapper = Callable[..., Any]


def _raise_refusal(exc: BaseException) -> None:
    """A retry the budget refused inside the openai SDK, which litellm wrapped in its own
    error type: the caller gets the ``BudgetExceededError``."""
    refusal = budget_refusal_in(exc)
    if refusal is not None and refusal is not exc:
        raise refusal from None


def call_flow(
    tracer: trace.Tracer, source: RuntimeSource, kind: str, binder: Binder, wrapped: Wrapper, args: tuple[Any, ...], kwargs: dict[str, Any], asynchronous: bool,
) -> Flow[Any]:  # fmt: skip
    """One metered litellm call of ``kind``; ``asynchronous``: the entry point returns a
    coroutine (its stream iterates with ``async for``)."""
    if CURRENT_CALL.get() is not None:
        return (yield send(wrapped, args, kwargs))
    params = binder(wrapped, args, kwargs)
    if params is None:  # arguments litellm itself will reject
        return (yield send(wrapped, args, kwargs))
    runtime = source.get()
    request = read_request(kind, params)
    try:
        call = yield step(start_call, astart_call, tracer, request, params, runtime=runtime)
    except BudgetExceededError as error:
        return substitute_or_raise(error)
    if request.output_param is not None:
        sync_output_caps(request, params)
    hide_usage = prepare_stream(params, runtime) if kind == KIND_CHAT else False
    token = CURRENT_CALL.set(call)
    try:
        with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):  # fmt: skip
            result = yield send(wrapped, (), params)
    except BaseException as exc:
        yield step(call.fail, call.afail, exc)
        _raise_refusal(exc)
        raise
    finally:
        CURRENT_CALL.reset(token)
    if request.stream:
        proxy = stream_proxy(result, call, hide_usage, asynchronous)
        if proxy is not None:
            return proxy
    done = settlement(result, kind)
    yield step(
        call.succeed, call.asucceed, done.usage, done.attributes,
        response_model=done.response_model, output_text=done.output_text,
    )  # fmt: skip
    return result


def make_sync_wrapper(tracer: trace.Tracer, source: RuntimeSource, kind: str) -> Wrapper:
    """The wrapper of a sync entry point (``completion``, ``embedding``). Called with its
    async flag (``acompletion=True``), it returns a coroutine: metered when awaited."""
    binder = Binder()
    async_flag = ASYNC_FLAGS[kind]

    def wrapper(wrapped: Wrapper, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None:
            return wrapped(*args, **kwargs)
        asynchronous = kwargs.get(async_flag) is True
        flow = call_flow(tracer, source, kind, binder, wrapped, args, kwargs, asynchronous)
        return arun_flow(flow) if asynchronous else run_flow(flow)

    return wrapper


def make_async_wrapper(tracer: trace.Tracer, source: RuntimeSource, kind: str) -> Wrapper:
    """The wrapper of an async entry point (``acompletion``, ``aembedding``)."""
    binder = Binder()

    async def wrapper(wrapped: Wrapper, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        flow = call_flow(tracer, source, kind, binder, wrapped, args, kwargs, True)
        return await arun_flow(flow)

    return wrapper


def completion(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    return make_sync_wrapper(tracer, source, KIND_CHAT)


def acompletion(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    return make_async_wrapper(tracer, source, KIND_CHAT)


def embedding(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    return make_sync_wrapper(tracer, source, KIND_EMBEDDINGS)


def aembedding(tracer: trace.Tracer, source: RuntimeSource) -> Wrapper:
    return make_async_wrapper(tracer, source, KIND_EMBEDDINGS)


__all__ = [
    "acompletion",
    "aembedding",
    "call_flow",
    "completion",
    "embedding",
    "make_async_wrapper",
    "make_sync_wrapper",
]
