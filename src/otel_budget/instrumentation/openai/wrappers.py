"""The openai wrappers: one flow per call, run as the sync or the async wrapper.

    wrap_function_wrapper("openai.resources.chat.completions", "Completions.create",
                          chat_create(tracer, source))

Every wrapper does the same thing, written once in ``call_flow``: read the request, project
and reserve (``start_call`` may lower or set the output cap in ``kwargs``), send, then settle
from the response's ``usage``; a stream is wrapped in a proxy that settles however it ends.
The flow yields a ``Step`` wherever the sync and the async wrapper differ (starting the call,
sending it, parsing a raw response, settling, failing): ``make_sync_wrapper`` runs it with
blocking calls, ``make_async_wrapper`` with the ledger's and the SDK's coroutines, so the
async wrapper never blocks the event loop on the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context, trace

from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._cache import plan_for, unusable_hit
from otel_budget.instrumentation._call import (
    CURRENT_CALL,
    LLMCall,
    LLMRequest,
    astart_call,
    start_call,
    substitute_or_raise,
)
from otel_budget.instrumentation._flow import Flow, Step, arun_flow, run_flow, send, step
from otel_budget.instrumentation.openai.request import (
    chat_request,
    completions_request,
    embeddings_request,
    prepare_stream,
    responses_request,
)
from otel_budget.instrumentation.openai.response import (
    aparsed,
    billed_failure,
    is_raw,
    parsed,
    success_args,
)
from otel_budget.instrumentation.openai.streams import (
    is_stream,
    raw_stream_response,
    stream_proxy,
)
from otel_budget.metered import attach_span
from otel_budget.runtime import RuntimeSource

Reader = Callable[[Any, dict[str, Any]], LLMRequest]
_UNREAD = object()  # the body of a response not parsed yet


def _settle(call: LLMCall, body: Any, kind: str) -> Step:
    """Settle a non-stream call from its response body."""
    usage, attributes, model, text = success_args(call, body, kind)
    return step(
        call.succeed, call.asucceed, usage, attributes, response_model=model, output_text=text
    )


def _fail(call: LLMCall, exc: BaseException, kind: str) -> Step:
    """The call raised: charged what a 2xx answer billed (``billed_failure``), else failed."""
    billed = billed_failure(call, exc, kind)
    if billed is None:
        return step(call.fail, call.afail, exc)
    usage, attributes, model, text = billed
    return step(
        call.fail_after_response, call.afail_after_response, exc, usage, attributes,
        response_model=model, output_text=text,
    )  # fmt: skip


def call_flow(
    tracer: trace.Tracer, source: RuntimeSource, read: Reader, kind: str,
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
    use_cache: bool = True,
) -> Flow[Any]:  # fmt: skip
    """One metered SDK call, for both wrappers."""
    if CURRENT_CALL.get() is not None or args:
        # Metered by an outer wrapper (litellm), or a positional call we cannot read.
        return (yield send(wrapped, args, kwargs))
    runtime = source.get()
    request = read(instance, kwargs)
    cache = source.cache
    if cache is None and runtime is not None:
        cache = runtime.cache  # (inlined ``_cache.cache_of``: every call reads it)
    if cache is not None and use_cache:
        request.cache = plan_for(cache, request, kind, runtime)
    try:
        call: LLMCall = yield step(start_call, astart_call, tracer, request, kwargs, runtime=runtime)
    except BudgetExceededError as error:
        return substitute_or_raise(error)
    hide_usage = prepare_stream(kwargs, kind, runtime)
    token = CURRENT_CALL.set(call)  # the call being sent (its attempts are seen)
    body: Any = _UNREAD
    retry = False
    try:
        active = attach_span(call.span)
        try:
            result = yield send(wrapped, args, kwargs)
        finally:
            context.detach(active)
        raw = is_raw(result)
        if raw and not is_stream(result):
            # with_raw_response (sync parse) or with_streaming_response (async parse, async)
            if call.request.stream:
                stream = yield send(result.parse)  # does not read the body: SSE is lazy
                proxy = stream_proxy(stream, call, kind, hide_usage)
                if proxy is not None:
                    return raw_stream_response(result, proxy)
            else:  # parsed now (cached: the caller's parse() gets the same); never raises
                body = yield Step(parsed, aparsed, (result,))
    except BudgetExceededError as error:  # a retry the budget no longer affords
        yield _fail(call, error, kind)
        return substitute_or_raise(error)
    except BaseException as exc:
        yield _fail(call, exc, kind)
        if not (isinstance(exc, Exception) and unusable_hit(call)):
            raise
        retry = True  # the SDK could not use the cached answer: a miss, not an error
    finally:
        CURRENT_CALL.reset(token)
    if retry:
        return (yield from call_flow(
            tracer, source, read, kind, wrapped, instance, args, kwargs, use_cache=False
        ))  # fmt: skip
    if call.request.stream:
        proxy = stream_proxy(result, call, kind, hide_usage)
        if proxy is not None:
            return proxy
    if body is _UNREAD:  # (a parsed body is its own body: ``parsed`` would say so)
        body = parsed(result) if raw else result
    yield _settle(call, body, kind)
    return result


def make_sync_wrapper(
    tracer: trace.Tracer, source: RuntimeSource, read: Reader, kind: str
) -> Callable[..., Any]:
    """The wrapt wrapper of a sync SDK method: ``call_flow`` with blocking calls."""

    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return run_flow(call_flow(tracer, source, read, kind, wrapped, instance, args, kwargs))

    return wrapper


def make_async_wrapper(
    tracer: trace.Tracer, source: RuntimeSource, read: Reader, kind: str
) -> Callable[..., Any]:
    """The wrapt wrapper of an async SDK method: ``call_flow`` with coroutines."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        flow = call_flow(tracer, source, read, kind, wrapped, instance, args, kwargs)
        return await arun_flow(flow)

    return wrapper


def chat_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, chat_request, "chat")


def async_chat_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, chat_request, "chat")


def responses_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, responses_request, "responses")


def async_responses_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, responses_request, "responses")


def completions_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, completions_request, "completions")


def async_completions_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, completions_request, "completions")


def embeddings_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, embeddings_request, "embeddings")


def async_embeddings_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, embeddings_request, "embeddings")


__all__ = [
    "async_chat_create",
    "async_completions_create",
    "async_embeddings_create",
    "async_responses_create",
    "call_flow",
    "chat_create",
    "completions_create",
    "embeddings_create",
    "make_async_wrapper",
    "make_sync_wrapper",
    "responses_create",
]
