"""wrapt wrappers for the openai SDK (v1+): chat completions, Responses, embeddings, and
legacy completions.

    wrap_function_wrapper("openai.resources.chat.completions", "Completions.create",
                          chat_create(tracer))

Every wrapper does the same thing: read the request, let ``_call.start_call`` project and
reserve (it may lower or set the output cap in ``kwargs``), send, then settle from the
response's ``usage``; streams are wrapped in a proxy that settles however they end.

When the wrapper asks for a stream's usage (``stream_options.include_usage``, which the caller
did not set), the usage-only chunk the provider then appends (``choices == []``) is read and
not passed on: the caller sees the stream it asked for, and the usual
``chunk.choices[0].delta`` loop does not meet an empty ``choices``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import trace

from otel_budget import attributes as attrs
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._attempts import response_json
from otel_budget.instrumentation._call import (
    CURRENT_CALL,
    LLMCall,
    LLMRequest,
    astart_call,
    capture_content,
    start_call,
    substitute_or_raise,
)
from otel_budget.instrumentation._stream import AsyncStreamProxy, SyncStreamProxy
from otel_budget.instrumentation._util import (
    ChatChunkAccumulator,
    RequestParams,
    count_param,
    refuse_if,
    request_attributes,
    response_attributes,
    with_history,
)
from otel_budget.instrumentation._util import content_attribute as _content_attribute
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.instrumentation._util import usage_only as _usage_only
from otel_budget.instrumentation.openai import history
from otel_budget.pricing import TokenUsage
from otel_budget.runtime import BudgetRuntime, RuntimeSource
from otel_budget.tokens import InputEstimate, estimate_input_tokens, wants_audio_output

PROVIDER_OPENAI = "openai"
PROVIDER_AZURE = "azure.ai.openai"
_OPENAI_HOSTS = ("api.openai.com",)
_REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}


def _is_azure(client: Any) -> bool:
    """``AzureOpenAI`` / ``AsyncAzureOpenAI`` or any subclass, whatever its name."""
    try:
        from openai.lib.azure import BaseAzureClient
    except Exception:  # an SDK without it: fall back to the class names
        return any("Azure" in klass.__name__ for klass in type(client).__mro__)
    return isinstance(client, BaseAzureClient)


def _client_info(instance: Any) -> tuple[str, str | None, int | None]:
    client = getattr(instance, "_client", None)
    provider = PROVIDER_OPENAI
    if client is not None and _is_azure(client):
        provider = PROVIDER_AZURE
    host: str | None = None
    port: int | None = None
    base_url = getattr(client, "base_url", None)
    if base_url is not None:
        host = getattr(base_url, "host", None) or None
        port = getattr(base_url, "port", None)
        if port is None:
            scheme = getattr(base_url, "scheme", "https")
            port = 443 if scheme == "https" else 80
    return provider, host, port


def _common_attributes(params: dict[str, Any]) -> dict[str, Any]:
    return request_attributes(params, _REQUEST_ATTRIBUTES)


def _choices(params: dict[str, Any], *names: str) -> tuple[int, str | None]:
    """How many completions the request generates (``n``, legacy ``best_of``): each may use
    the whole output cap, and each is billed. ``(1, problem)`` for a value that is no count."""
    return count_param(params, *names)


def chat_usage(usage: Any) -> TokenUsage | None:
    """Usage of a chat completion (or chunk), or of a legacy completion.

    Audio tokens (``*_tokens_details.audio_tokens``) are part of the prompt / completion
    totals: they are passed on as the audio part of them, priced at the audio rates."""
    if usage is None:
        return None
    prompt = _int(_get(usage, "prompt_tokens"))
    completion = _int(_get(usage, "completion_tokens"))
    prompt_details = _get(usage, "prompt_tokens_details")
    completion_details = _get(usage, "completion_tokens_details")
    cached = _int(_get(prompt_details, "cached_tokens"))
    audio_in = _int(_get(prompt_details, "audio_tokens"))
    reasoning = _int(_get(completion_details, "reasoning_tokens"))
    audio_out = _int(_get(completion_details, "audio_tokens"))
    return TokenUsage(
        input_tokens=max(prompt, cached, audio_in), output_tokens=max(completion, reasoning, audio_out),
        cache_read_tokens=cached, reasoning_tokens=reasoning,
        input_audio_tokens=audio_in, output_audio_tokens=audio_out,
    )  # fmt: skip


def responses_usage(usage: Any) -> TokenUsage | None:
    if usage is None:
        return None
    inp = _int(_get(usage, "input_tokens"))
    out = _int(_get(usage, "output_tokens"))
    input_details = _get(usage, "input_tokens_details")
    output_details = _get(usage, "output_tokens_details")
    cached = _int(_get(input_details, "cached_tokens"))
    audio_in = _int(_get(input_details, "audio_tokens"))
    reasoning = _int(_get(output_details, "reasoning_tokens"))
    audio_out = _int(_get(output_details, "audio_tokens"))
    return TokenUsage(
        input_tokens=max(inp, cached, audio_in), output_tokens=max(out, reasoning, audio_out),
        cache_read_tokens=cached, reasoning_tokens=reasoning,
        input_audio_tokens=audio_in, output_audio_tokens=audio_out,
    )  # fmt: skip


def _parsed(result: Any) -> Any:
    """``with_raw_response`` returns an HTTP wrapper; its parsed body carries the usage."""
    if _get(result, "usage") is None and hasattr(result, "http_response") and hasattr(result, "parse"):
        if inspect.iscoroutinefunction(result.parse):
            return None  # AsyncAPIResponse: parsed (awaited) by the async wrapper, or not at all
        try:
            return result.parse()
        except Exception:
            return None
    return result


def _response_attributes(result: Any, choices: bool) -> dict[str, Any]:
    if choices:
        reasons: list[str] | None = [
            r for r in (_get(c, "finish_reason") for c in (_get(result, "choices") or []))
            if isinstance(r, str)
        ]  # fmt: skip
    else:
        status = _get(result, "status")
        reasons = [status] if isinstance(status, str) else None
    out = response_attributes(_get(result, "id"), _get(result, "model"), reasons)
    tier = _get(result, "service_tier")
    if isinstance(tier, str):
        out["openai.response.service_tier"] = tier
    return out


# -- stream accumulators ---------------------------------------------------------------------
class ResponsesAccumulator:
    __slots__ = ("usage", "response_model", "units", "_parts", "_id", "_status")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.response_model: str | None = None
        self.units = 0
        self._parts: list[str] = []
        self._id: str | None = None
        self._status: str | None = None

    def add(self, event: Any) -> None:
        kind = _get(event, "type")
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            delta = _get(event, "delta")
            if isinstance(delta, str) and delta:
                self._parts.append(delta)
                self.units += 1
            return
        response = _get(event, "response")
        if response is not None:
            self._id = _get(response, "id") or self._id
            self.response_model = _get(response, "model") or self.response_model
            self._status = _get(response, "status") or self._status
            usage = _get(response, "usage")
            if usage is not None:
                self.usage = responses_usage(usage)
                history.remember(self._id, self.usage)  # its context, for previous_response_id

    def text(self) -> str:
        return "".join(self._parts)

    def attributes(self) -> dict[str, Any]:
        status = self._status
        return response_attributes(
            self._id, self.response_model, [status] if isinstance(status, str) else None
        )


# -- stream proxies that also settle when the SDK's helpers close the response -------------------
class _ClosingResponse(wrapt.ObjectProxy):  # type: ignore[misc]
    """A stream's HTTP response: closing it settles the call.

    The SDK's stream helpers (``chat.completions.stream()``, ``responses.stream()``) close a
    stream they leave early through ``stream.response.close()``, not through the stream; and
    their stream object sits in a reference cycle (it holds its own generator), so without
    this the call would stay reserved, its span open, until the cyclic GC ran."""

    def __init__(self, response: Any, stream: Any) -> None:
        super().__init__(response)
        self._self_stream = stream  # our stream proxy: closing it settles the call

    def close(self) -> Any:
        try:
            return self.__wrapped__.close()
        finally:
            _close_sync(self._self_stream)

    async def aclose(self) -> Any:
        try:
            return await self.__wrapped__.aclose()
        finally:
            await self._self_stream.close()


def _close_sync(stream: Any) -> None:
    """Close a stream proxy from sync code: the stream's own ``close()`` (the shared ending of
    a stream left early), or for an async stream, which cannot be awaited here, its ending."""
    if isinstance(stream, SyncStreamProxy):
        stream.close()
    else:
        stream._self_end(None, complete=False)


class _SyncStream(SyncStreamProxy):
    def __init__(self, stream: Any, call: LLMCall, acc: Any, hide_usage: bool = False) -> None:
        super().__init__(stream, call, acc)
        self._self_hide_usage = hide_usage

    def __next__(self) -> Any:
        while True:
            item = super().__next__()  # read (and metered) first
            if not (self._self_hide_usage and _usage_only(item)):
                return item

    @property
    def response(self) -> Any:
        response = self.__wrapped__.response
        return _ClosingResponse(response, self) if response is not None else None


class _AsyncStream(AsyncStreamProxy):
    def __init__(self, stream: Any, call: LLMCall, acc: Any, hide_usage: bool = False) -> None:
        super().__init__(stream, call, acc)
        self._self_hide_usage = hide_usage

    async def __anext__(self) -> Any:
        while True:
            item = await super().__anext__()
            if not (self._self_hide_usage and _usage_only(item)):
                return item

    @property
    def response(self) -> Any:
        response = self.__wrapped__.response
        return _ClosingResponse(response, self) if response is not None else None


class _RawStreamResponse(wrapt.ObjectProxy):  # type: ignore[misc]
    """``with_raw_response`` / ``with_streaming_response`` of a ``stream=True`` call: the SDK
    returns an HTTP response wrapper and the stream only comes out of ``parse()``; that
    stream is the metered proxy (without this the call was settled at once, from the input
    estimate alone, and the streamed output was never charged)."""

    def __init__(self, raw: Any, stream: Any) -> None:
        super().__init__(raw)
        self._self_stream = stream

    def parse(self, *, to: Any = None) -> Any:
        return self._self_stream if to is None else self.__wrapped__.parse(to=to)

    def close(self) -> Any:
        # with_streaming_response's block exit: the stream ends here, settle it now.
        try:
            return self.__wrapped__.close()
        finally:
            _close_sync(self._self_stream)


class _AsyncRawStreamResponse(_RawStreamResponse):
    """The same for ``AsyncAPIResponse``, whose ``parse()`` and ``close()`` are coroutines."""

    async def parse(self, *, to: Any = None) -> Any:  # type: ignore[override]
        return self._self_stream if to is None else await self.__wrapped__.parse(to=to)

    async def close(self) -> Any:  # type: ignore[override]
        try:
            return await self.__wrapped__.close()
        finally:
            await self._self_stream.close()


def _is_raw(result: Any) -> bool:
    return hasattr(result, "http_response") and hasattr(result, "parse")


def _accumulator(kind: str) -> Any:
    return ResponsesAccumulator() if kind == "responses" else ChatChunkAccumulator(chat_usage, capture=capture_content())


# -- request readers -------------------------------------------------------------------------
# Each reads what the request *sends*: the kwargs with ``extra_body`` merged over them (the SDK
# merges it into the JSON body, so ``extra_body={"n": 8}`` generates 8 choices). One-shot
# iterators (a generator of messages) are materialised into lists, written back, then
# projected. The cap goes where it takes effect (``RequestParams.output_writer``).
def _tier(sent: RequestParams) -> str | None:
    tier = sent.get("service_tier")
    return tier if isinstance(tier, str) and tier != "auto" else None


def _chat_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    sent = RequestParams(kwargs)
    sent.materialise("messages", "tools", "functions")
    params = sent.params
    provider, host, port = _client_info(instance)
    model = str(params.get("model") or "unknown")
    # An explicit None (frameworks pass every parameter) is as good as absent: injecting a
    # cap as max_tokens because the caller sent max_tokens=None would fail on o-series models.
    if params.get("max_completion_tokens") is not None or (params.get("max_tokens") is None and (
        host in _OPENAI_HOSTS or provider == PROVIDER_AZURE
    )):
        output_param = "max_completion_tokens"  # o-series reject max_tokens
    else:
        output_param = "max_tokens"  # what OpenAI-compatible servers (vLLM, ...) understand
    messages = params.get("messages")
    tools = params.get("tools") or params.get("functions")
    attributes = _common_attributes(params)
    if capture_content() and messages is not None:
        attributes["gen_ai.input.messages"] = _content_attribute(messages)
    choices, problem = _choices(params, "n")
    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=refuse_if(problem, lambda: estimate_input_tokens(model, messages=messages, tools=tools)),
        output_param=output_param, server_address=host, server_port=port,
        service_tier=_tier(sent), stream=bool(params.get("stream")), attributes=attributes,
        choices=choices, params=params, write_output=sent.output_writer(output_param),
        output_audio=wants_audio_output(params),
    )  # fmt: skip


def _responses_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    sent = RequestParams(kwargs)
    sent.materialise("input", "tools")
    params = sent.params
    provider, host, port = _client_info(instance)
    model = str(params.get("model") or "unknown")
    inp = params.get("input")
    instructions = params.get("instructions")
    tools = params.get("tools")
    attributes = _common_attributes(params)
    if capture_content() and inp is not None:
        attributes["gen_ai.input.messages"] = _content_attribute(inp)
    # previous_response_id / conversation: the provider bills the stored history as input.
    stored, assumed = history.history_tokens(provider, model, params)
    if stored:
        attributes[history.COST_HISTORY_TOKENS] = stored
    if assumed:
        attributes[history.COST_INPUT_ASSUMED] = True

    def estimate() -> InputEstimate:
        return estimate_input_tokens(model, input=inp, system=instructions, tools=tools)

    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=with_history(estimate, stored), output_param="max_output_tokens",
        server_address=host, server_port=port, service_tier=_tier(sent),
        stream=bool(params.get("stream")), attributes=attributes, params=params,
        write_output=sent.output_writer("max_output_tokens"),
    )  # fmt: skip


_LEGACY_DEFAULT_MAX_TOKENS = 16  # what the completions API generates when max_tokens is absent


def _completions_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    """Legacy ``completions.create`` (gpt-3.5-turbo-instruct, OpenAI-compatible servers)."""
    sent = RequestParams(kwargs)
    sent.materialise("prompt")
    params = sent.params
    provider, host, port = _client_info(instance)
    model = str(params.get("model") or "unknown")
    if params.get("max_tokens") is None:
        # Absent means 16 here, not "up to the model's limit": send that default explicitly, so
        # the bound is exact and the configured default cap does not lengthen the answer.
        sent.set("max_tokens", _LEGACY_DEFAULT_MAX_TOKENS)
    prompt = params.get("prompt")
    attributes = _common_attributes(params)
    if capture_content() and prompt is not None:
        attributes["gen_ai.input.messages"] = _content_attribute(prompt)
    # best_of: generated (and billed) server-side
    choices, problem = _choices(params, "n", "best_of")
    return LLMRequest(
        provider=provider, operation=attrs.OP_TEXT_COMPLETION, model=model,
        estimate=refuse_if(problem, lambda: estimate_input_tokens(model, prompt=prompt)),
        output_param="max_tokens", server_address=host, server_port=port,
        service_tier=_tier(sent), stream=bool(params.get("stream")), attributes=attributes,
        choices=choices, params=params, write_output=sent.output_writer("max_tokens"),
    )  # fmt: skip


def _embeddings_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    sent = RequestParams(kwargs)
    sent.materialise("input")
    params = sent.params
    provider, host, port = _client_info(instance)
    model = str(params.get("model") or "unknown")
    inp = params.get("input")
    return LLMRequest(
        provider=provider, operation=attrs.OP_EMBEDDINGS, model=model,
        estimate=lambda: estimate_input_tokens(model, input=inp), output_param=None,
        server_address=host, server_port=port, params=params,
    )  # fmt: skip


# -- wrapper factories -----------------------------------------------------------------------
def _read_body(
    call: LLMCall, body: Any, kind: str
) -> tuple[TokenUsage | None, dict[str, Any], str | None]:
    """(usage, response attributes, output text) of a response body; never raises (a shape
    we do not know is charged as estimated, not lost)."""
    try:
        text: Any = None
        if kind == "responses":
            usage = responses_usage(_get(body, "usage"))
            history.remember(_get(body, "id"), usage)  # its context, for previous_response_id
            attributes = _response_attributes(body, choices=False)
            text = _get(body, "output_text") if body is not None else None
            if not isinstance(text, str) and isinstance(body, dict):
                text = _responses_text(body)
        else:
            usage = chat_usage(_get(body, "usage"))
            attributes = _response_attributes(body, choices=kind in ("chat", "completions"))
            if kind in ("chat", "completions"):
                parts = [
                    _get(_get(c, "message"), "content") if kind == "chat" else _get(c, "text")
                    for c in (_get(body, "choices") or [])
                ]  # fmt: skip
                text = "".join(p for p in parts if isinstance(p, str))
        if capture_content() and isinstance(text, str) and text:
            attributes["gen_ai.output.messages"] = _content_attribute(
                [{"role": "assistant", "parts": [{"type": "text", "content": text}]}]
            )
    except Exception as exc:
        if call.processor is not None:
            call.processor.engine.log_once("openai response", exc)
        return None, {}, None
    return usage, attributes, text if isinstance(text, str) else None


def _responses_text(body: dict[str, Any]) -> str:
    """The output text of a raw Responses body (the SDK's ``output_text`` is computed)."""
    parts: list[str] = []
    for item in body.get("output") or ():
        for content in _get(item, "content") or ():
            value = _get(content, "text")
            if isinstance(value, str):
                parts.append(value)
    return "".join(parts)


def _success(call: LLMCall, result: Any, kind: str, body: Any) -> tuple[Any, ...]:
    """The arguments of ``call.succeed`` for a non-stream response; never raises."""
    if body is None:
        try:
            body = _parsed(result)
        except Exception:
            body = None
    usage, attributes, text = _read_body(call, body, kind)
    return usage, attributes, attributes.get(attrs.GEN_AI_RESPONSE_MODEL), text


def _settle_response(call: LLMCall, result: Any, kind: str, body: Any = None) -> None:
    usage, attributes, model, text = _success(call, result, kind, body)
    call.succeed(usage, attributes, response_model=model, output_text=text)


async def _asettle_response(call: LLMCall, result: Any, kind: str, body: Any = None) -> None:
    usage, attributes, model, text = _success(call, result, kind, body)
    await call.asucceed(usage, attributes, response_model=model, output_text=text)


def _billed_failure(call: LLMCall, exc: BaseException, kind: str) -> tuple[Any, ...] | None:
    """A call the SDK raised out of after a 2xx answer was billed, whatever the SDK's parsing
    then did (``LengthFinishReasonError``, ``ContentFilterFinishReasonError``, a structured
    output that does not validate): the arguments to charge it the usage the exception's
    completion or the response body carries (else its reservation). None: not answered."""
    if not call.answered_ok:
        return None
    body = getattr(exc, "completion", None)
    if _get(body, "usage") is None:
        body = response_json(call.response) or body
    usage, attributes, text = _read_body(call, body, kind)
    return usage, attributes, attributes.get(attrs.GEN_AI_RESPONSE_MODEL), text


def _fail(call: LLMCall, exc: BaseException, kind: str) -> None:
    billed = _billed_failure(call, exc, kind)
    if billed is None:
        call.fail(exc)
        return
    usage, attributes, model, text = billed
    call.fail_after_response(exc, usage, attributes, response_model=model, output_text=text)


async def _afail(call: LLMCall, exc: BaseException, kind: str) -> None:
    billed = _billed_failure(call, exc, kind)
    if billed is None:
        await call.afail(exc)
        return
    usage, attributes, model, text = billed
    await call.afail_after_response(
        exc, usage, attributes, response_model=model, output_text=text
    )


def _prepare_stream(kwargs: dict[str, Any], kind: str, runtime: BudgetRuntime | None) -> bool:
    """Ask a chat (or legacy completions) stream for its usage; True when it was asked here
    (the caller did not set ``stream_options``), so the usage chunk is ours to hide."""
    if (
        kind in ("chat", "completions")
        and kwargs.get("stream") is True
        and runtime is not None
        and runtime.settings.stream_include_usage
        and type(kwargs.get("stream_options")).__name__ in ("NoneType", "Omit", "NotGiven")
    ):
        # Without usage a stream's cost must be estimated; ask for it (opt-out setting).
        kwargs["stream_options"] = {"include_usage": True}
        return True
    return False


def make_sync_wrapper(
    tracer: trace.Tracer, source: RuntimeSource,
    read: Callable[[Any, dict[str, Any]], LLMRequest], kind: str,
) -> Callable[..., Any]:  # fmt: skip
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            # Metered by an outer wrapper (litellm), or a positional call we cannot read.
            return wrapped(*args, **kwargs)
        runtime = source.get()
        try:
            call = start_call(tracer, read(instance, kwargs), kwargs, runtime=runtime)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        hide_usage = _prepare_stream(kwargs, kind, runtime)
        token = CURRENT_CALL.set(call)  # the call being sent (its attempts are seen)
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):  # fmt: skip
                result = wrapped(*args, **kwargs)
            if call.request.stream and _is_raw(result) and not hasattr(result, "__next__"):
                stream = result.parse()  # does not read the body: the SSE stream is lazy
                if hasattr(stream, "__next__"):
                    proxy = _SyncStream(stream, call, _accumulator(kind), hide_usage)
                    return _RawStreamResponse(result, proxy)
        except BudgetExceededError as error:  # a retry the budget no longer affords
            _fail(call, error, kind)
            return substitute_or_raise(error)
        except BaseException as exc:
            _fail(call, exc, kind)
            raise
        finally:
            CURRENT_CALL.reset(token)
        if call.request.stream and hasattr(result, "__next__"):
            return _SyncStream(result, call, _accumulator(kind), hide_usage)
        _settle_response(call, result, kind)
        return result

    return wrapper


def make_async_wrapper(
    tracer: trace.Tracer, source: RuntimeSource,
    read: Callable[[Any, dict[str, Any]], LLMRequest], kind: str,
) -> Callable[..., Any]:  # fmt: skip
    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            return await wrapped(*args, **kwargs)
        runtime = source.get()
        try:
            call = await astart_call(tracer, read(instance, kwargs), kwargs, runtime=runtime)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        hide_usage = _prepare_stream(kwargs, kind, runtime)
        token = CURRENT_CALL.set(call)  # the call being sent (its attempts are seen)
        body: Any = None
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):  # fmt: skip
                result = await wrapped(*args, **kwargs)
            if _is_raw(result) and not hasattr(result, "__anext__"):
                # with_raw_response (sync parse) or with_streaming_response (async parse)
                async_parse = inspect.iscoroutinefunction(result.parse)
                if call.request.stream:
                    stream = await result.parse() if async_parse else result.parse()
                    if hasattr(stream, "__anext__"):
                        proxy = _AsyncStream(stream, call, _accumulator(kind), hide_usage)
                        raw_class = _AsyncRawStreamResponse if async_parse else _RawStreamResponse
                        return raw_class(result, proxy)
                elif async_parse:
                    try:
                        body = await result.parse()  # cached: the caller's parse() gets the same
                    except Exception:
                        body = None  # the caller's own parse() raises it; charged as estimated
        except BudgetExceededError as error:  # a retry the budget no longer affords
            await _afail(call, error, kind)
            return substitute_or_raise(error)
        except BaseException as exc:
            await _afail(call, exc, kind)
            raise
        finally:
            CURRENT_CALL.reset(token)
        if call.request.stream and hasattr(result, "__anext__"):
            return _AsyncStream(result, call, _accumulator(kind), hide_usage)
        await _asettle_response(call, result, kind, body)
        return result

    return wrapper


def chat_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, _chat_request, "chat")


def async_chat_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, _chat_request, "chat")


def responses_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, _responses_request, "responses")


def async_responses_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, _responses_request, "responses")


def completions_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, _completions_request, "completions")


def async_completions_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, _completions_request, "completions")


def embeddings_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, _embeddings_request, "embeddings")


def async_embeddings_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, _embeddings_request, "embeddings")
