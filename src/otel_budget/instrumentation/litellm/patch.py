"""wrapt wrappers for ``litellm``: chat completions and embeddings, sync and async, streams.

    wrap_function_wrapper("litellm", "completion", completion(tracer))

Every wrapper reads the litellm request (``"provider/model"`` or ``custom_llm_provider``,
``api_base``), lets ``_call.start_call`` project and reserve (it may set or lower
``max_tokens`` in the kwargs), sends with ``CURRENT_CALL`` set (so the openai / anthropic
wrappers litellm may reach underneath pass through: one span, one charge), then settles from
``ModelResponse.usage``; streams (``CustomStreamWrapper``) are wrapped in a proxy that settles
however they end.

This module never imports litellm: the instrumentor wraps it once it is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace

from otel_budget import attributes as attrs
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._attempts import budget_refusal_in
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
)
from otel_budget.instrumentation._util import content_attribute as _content_attribute
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.instrumentation._util import usage_only as _usage_only
from otel_budget.pricing import TokenUsage
from otel_budget.runtime import BudgetRuntime, RuntimeSource
from otel_budget.tokens import estimate_input_tokens

KIND_CHAT = "chat"
KIND_EMBEDDINGS = "embeddings"

# litellm provider ids -> OTel gen_ai.provider.name. Ids not listed are used as they are
# (``openrouter``, ``together_ai``, ``ollama``, ...): the PriceBook knows LiteLLM's spellings.
PROVIDER_NAMES: dict[str, str] = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "azure": "azure.ai.openai",
    "azure_text": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "anthropic": "anthropic",
    "anthropic_text": "anthropic",
    "bedrock": "aws.bedrock",
    "bedrock_converse": "aws.bedrock",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "gemini": "gcp.gemini",
    "mistral": "mistral_ai",
    "codestral": "mistral_ai",
    "groq": "groq",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "xai": "x_ai",
    "deepseek": "deepseek",
    "perplexity": "perplexity",
    "watsonx": "ibm.watsonx.ai",
    "watsonx_text": "ibm.watsonx.ai",
}
UNKNOWN_PROVIDER = "litellm"  # litellm could not route it either; genai-prices infers the owner

_REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
}
_OUTPUT_PARAMS = ("max_tokens", "max_completion_tokens")
# The async flag of litellm's sync entry points: completion(..., acompletion=True) returns a
# coroutine.
_ASYNC_FLAGS = {KIND_CHAT: "acompletion", KIND_EMBEDDINGS: "aembedding"}


# -- small readers ---------------------------------------------------------------------------
def _provider_ids() -> frozenset[str]:
    """litellm's provider ids (``litellm.provider_list``), read once litellm is imported."""
    global _PROVIDER_IDS
    if _PROVIDER_IDS is None:
        try:
            import litellm

            ids = {str(getattr(p, "value", p)) for p in getattr(litellm, "provider_list", ())}
        except Exception:
            ids = set()
        _PROVIDER_IDS = frozenset(ids | set(PROVIDER_NAMES))
    return _PROVIDER_IDS


_PROVIDER_IDS: frozenset[str] | None = None


def _model_cost_provider(model: str) -> str | None:
    try:
        import litellm

        entry = litellm.model_cost.get(model)
    except Exception:
        return None
    provider = entry.get("litellm_provider") if isinstance(entry, dict) else None
    return provider if isinstance(provider, str) and provider else None


def resolve_provider(model: Any, custom_llm_provider: Any = None) -> tuple[str, str, str | None]:
    """``(gen_ai.provider.name, model without the provider prefix, litellm provider id)``.

    Reads ``custom_llm_provider``, else a ``provider/`` prefix litellm knows, else litellm's
    model map for a bare model name. ``litellm.get_llm_provider`` is deliberately not used: for
    some providers it runs an OAuth device flow, and it prints to stdout on unknown models.
    """
    name = model if isinstance(model, str) else str(model or "unknown")
    provider_id: str | None = None
    if isinstance(custom_llm_provider, str) and custom_llm_provider:
        provider_id = custom_llm_provider
        if name.startswith(provider_id + "/"):
            name = name[len(provider_id) + 1 :]
    elif "/" in name:
        head, rest = name.split("/", 1)
        if head in _provider_ids() and rest:
            provider_id, name = head, rest
    if provider_id is None:
        provider_id = _model_cost_provider(name)
    if provider_id is None:
        return UNKNOWN_PROVIDER, name, None
    provider_id = provider_id.lower()
    return PROVIDER_NAMES.get(provider_id, provider_id), name, provider_id


def _server(params: dict[str, Any]) -> tuple[str | None, int | None]:
    base = params.get("api_base") or params.get("base_url")
    if not isinstance(base, str) or not base:
        return None, None
    try:
        parts = urlsplit(base if "://" in base else "https://" + base)
        host = parts.hostname or None
        port = parts.port or (443 if parts.scheme == "https" else 80 if parts.scheme == "http" else None)
    except ValueError:
        return None, None
    return host, port if host else None


def _common_attributes(params: dict[str, Any]) -> dict[str, Any]:
    return request_attributes(params, _REQUEST_ATTRIBUTES)


def _output_param(params: dict[str, Any]) -> str:
    """``max_tokens`` (litellm maps it per provider) unless the caller used
    ``max_completion_tokens`` alone."""
    if params.get("max_completion_tokens") is not None and params.get("max_tokens") is None:
        return "max_completion_tokens"
    return "max_tokens"


def _sync_output_caps(request: LLMRequest, params: dict[str, Any]) -> None:
    """``start_call`` lowered or set one cap; a second one the caller gave must not exceed it."""
    cap = params.get(request.output_param) if request.output_param else None
    if not isinstance(cap, int) or isinstance(cap, bool):
        return
    for key in _OUTPUT_PARAMS:
        other = params.get(key)
        if key != request.output_param and isinstance(other, int) and not isinstance(other, bool) and other > cap:
            params[key] = cap


# -- request readers -------------------------------------------------------------------------
# What the request sends: litellm's kwargs with ``extra_body`` merged over them (litellm hands
# it to the provider SDK, which merges it into the JSON body); one-shot iterators materialised
# into lists, written back, then projected.
def _chat_request(params: dict[str, Any]) -> LLMRequest:
    sent = RequestParams(params)
    sent.materialise("messages", "tools", "functions")
    merged = sent.params
    provider, model, _ = resolve_provider(merged.get("model"), merged.get("custom_llm_provider"))
    host, port = _server(merged)
    messages = merged.get("messages")
    tools = merged.get("tools") or merged.get("functions")
    attributes = _common_attributes(merged)
    if capture_content() and messages is not None:
        attributes["gen_ai.input.messages"] = _content_attribute(messages)
    tier = merged.get("service_tier")
    choices, problem = count_param(merged, "n")
    output_param = _output_param(merged)
    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=refuse_if(problem, lambda: estimate_input_tokens(model, messages=messages, tools=tools)),
        output_param=output_param, server_address=host, server_port=port,
        service_tier=tier if isinstance(tier, str) and tier != "auto" else None,
        stream=merged.get("stream") is True, attributes=attributes, choices=choices,
        params=merged, write_output=sent.output_writer(output_param),
    )  # fmt: skip


def _embeddings_request(params: dict[str, Any]) -> LLMRequest:
    sent = RequestParams(params)
    sent.materialise("input")
    merged = sent.params
    provider, model, _ = resolve_provider(merged.get("model"), merged.get("custom_llm_provider"))
    host, port = _server(merged)
    inp = merged.get("input")
    return LLMRequest(
        provider=provider, operation=attrs.OP_EMBEDDINGS, model=model,
        estimate=lambda: estimate_input_tokens(model, input=inp), output_param=None,
        server_address=host, server_port=port, params=merged,
    )  # fmt: skip


_READERS: dict[str, Callable[[dict[str, Any]], LLMRequest]] = {
    KIND_CHAT: _chat_request,
    KIND_EMBEDDINGS: _embeddings_request,
}


# -- usage and responses ---------------------------------------------------------------------
def litellm_usage(usage: Any) -> TokenUsage | None:
    """A litellm ``Usage`` (OpenAI shape: ``prompt_tokens`` includes cached and cache-write
    tokens, ``completion_tokens`` includes reasoning) as a ``TokenUsage``. Anthropic's cache
    counts come as ``prompt_tokens_details.cached_tokens`` / ``cache_creation_tokens`` and as
    ``cache_read_input_tokens`` / ``cache_creation_input_tokens``; either spelling is read.
    ``PriceBook.quote`` adds cache / reasoning tokens when a provider reported them apart."""
    if usage is None:
        return None
    prompt = _int(_get(usage, "prompt_tokens"))
    completion = _int(_get(usage, "completion_tokens"))
    details = _get(usage, "prompt_tokens_details")
    cache_read = max(_int(_get(details, "cached_tokens")), _int(_get(usage, "cache_read_input_tokens")))
    cache_write = max(
        _int(_get(details, "cache_creation_tokens")),
        _int(_get(details, "cache_write_tokens")),
        _int(_get(usage, "cache_creation_input_tokens")),
    )
    reasoning = _int(_get(_get(usage, "completion_tokens_details"), "reasoning_tokens"))
    return TokenUsage(
        input_tokens=prompt, output_tokens=completion, cache_read_tokens=cache_read,
        cache_write_tokens=cache_write, reasoning_tokens=reasoning,
    )  # fmt: skip


def _response_attributes(result: Any) -> dict[str, Any]:
    reasons = [
        r for r in (_get(c, "finish_reason") for c in (_get(result, "choices") or ()))
        if isinstance(r, str)
    ]  # fmt: skip
    # (empty ids and models, which some providers send through litellm, are left out)
    return response_attributes(_get(result, "id") or None, _get(result, "model") or None, reasons)


def _settle_response(call: LLMCall, result: Any, kind: str) -> None:
    usage = litellm_usage(_get(result, "usage"))
    attributes = _response_attributes(result)
    text: str | None = None
    if kind == KIND_CHAT:
        parts: list[str] = []
        for choice in _get(result, "choices") or ():
            message = _get(choice, "message")
            for value in (_get(message, "content"), _get(message, "reasoning_content")):
                if isinstance(value, str):
                    parts.append(value)
            for tool_call in _get(message, "tool_calls") or ():
                arguments = _get(_get(tool_call, "function"), "arguments")
                if isinstance(arguments, str):
                    parts.append(arguments)
        text = "".join(parts)
        if capture_content() and text:
            attributes["gen_ai.output.messages"] = _content_attribute(
                [{"role": "assistant", "parts": [{"type": "text", "content": text}]}]
            )
    call.succeed(
        usage, attributes, response_model=attributes.get(attrs.GEN_AI_RESPONSE_MODEL),
        output_text=text,
    )  # fmt: skip


# -- streams ---------------------------------------------------------------------------------
class LiteLLMStream(SyncStreamProxy):
    """A sync ``CustomStreamWrapper``; hides the usage chunk we asked for, if the caller did not."""

    def __init__(self, stream: Any, call: LLMCall, acc: ChatChunkAccumulator, hide_usage: bool) -> None:
        super().__init__(stream, call, acc)
        self._self_hide_usage = hide_usage

    def __next__(self) -> Any:
        while True:
            item = SyncStreamProxy.__next__(self)
            if not (self._self_hide_usage and _usage_only(item)):
                return item


class AsyncLiteLLMStream(AsyncStreamProxy):
    """An async ``CustomStreamWrapper``: ``async for``, ``async with``, ``aclose()``, and its
    synchronous ``close()``."""

    def __init__(self, stream: Any, call: LLMCall, acc: ChatChunkAccumulator, hide_usage: bool) -> None:
        super().__init__(stream, call, acc)
        self._self_hide_usage = hide_usage

    async def __anext__(self) -> Any:
        while True:
            item = await AsyncStreamProxy.__anext__(self)
            if not (self._self_hide_usage and _usage_only(item)):
                return item

    def close(self) -> None:  # type: ignore[override]  # CustomStreamWrapper.close is sync
        try:
            self.__wrapped__.close()
        finally:
            self._self_end(None, complete=False)

    async def aclose(self) -> None:
        try:
            await self.__wrapped__.aclose()
        finally:
            self._self_end(None, complete=False)


def _prepare_stream(params: dict[str, Any], runtime: BudgetRuntime | None) -> bool:
    """Ask for the usage chunk (litellm honours ``stream_options`` for every provider and never
    rejects it); True when the caller did not ask for it, so the proxy hides it again."""
    if params.get("stream") is not True:
        return False
    if runtime is None or not runtime.settings.stream_include_usage:
        return False
    options = params.get("stream_options")
    if options is None:
        params["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and "include_usage" not in options:
        params["stream_options"] = {**options, "include_usage": True}
        return True
    return False


# -- wrapper factories -----------------------------------------------------------------------
class _Binder:
    """Positional arguments to keywords, with the legacy signature litellm exposes."""

    __slots__ = ("_signature", "_var_keyword")

    def __init__(self) -> None:
        self._signature: inspect.Signature | None = None
        self._var_keyword: str | None = None

    def __call__(self, wrapped: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
        if not args:
            return kwargs
        try:
            if self._signature is None:
                signature = inspect.signature(wrapped)  # follows __wrapped__ to main.completion
                for param in signature.parameters.values():
                    if param.kind is inspect.Parameter.VAR_POSITIONAL:
                        return None
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        self._var_keyword = param.name
                self._signature = signature
            bound = self._signature.bind_partial(*args, **kwargs)
        except (TypeError, ValueError):
            return None  # litellm will raise the same TypeError itself
        params = dict(bound.arguments)
        if self._var_keyword is not None:
            params.update(params.pop(self._var_keyword, None) or {})
        return params


class _Switch:
    """On while instrumented. A wrapper that outlives ``uninstrument()`` (someone holds a
    reference, or wrapped it again) passes calls straight through."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


def _started(
    call: LLMCall, request: LLMRequest, kind: str, params: dict[str, Any],
    runtime: BudgetRuntime | None,
) -> tuple[LLMCall, Any, bool]:  # fmt: skip
    if request.output_param is not None:
        _sync_output_caps(request, params)
    return call, None, _prepare_stream(params, runtime) if kind == KIND_CHAT else False


def _begin(
    tracer: trace.Tracer, runtime: BudgetRuntime | None, kind: str, params: dict[str, Any]
) -> tuple[LLMCall | None, Any, bool]:
    """``(call, substitute, hide_usage)``: a started call, or an ``on_exceeded`` substitute."""
    request = _READERS[kind](params)
    try:
        call = start_call(tracer, request, params, runtime=runtime)
    except BudgetExceededError as error:
        return None, substitute_or_raise(error), False
    return _started(call, request, kind, params, runtime)


async def _abegin(
    tracer: trace.Tracer, runtime: BudgetRuntime | None, kind: str, params: dict[str, Any]
) -> tuple[LLMCall | None, Any, bool]:
    """``_begin`` without blocking the event loop on the ledger."""
    request = _READERS[kind](params)
    try:
        call = await astart_call(tracer, request, params, runtime=runtime)
    except BudgetExceededError as error:
        return None, substitute_or_raise(error), False
    return _started(call, request, kind, params, runtime)


def _raise_refusal(exc: BaseException) -> None:
    """A retry the budget refused inside the openai SDK, which litellm wrapped in its own
    error type: the caller gets the ``BudgetExceededError``."""
    refusal = budget_refusal_in(exc)
    if refusal is not None and refusal is not exc:
        raise refusal from None


def _after(call: LLMCall, result: Any, kind: str, hide: bool, asynchronous: bool) -> Any:
    if call.request.stream:
        if asynchronous and hasattr(result, "__anext__"):
            return AsyncLiteLLMStream(result, call, ChatChunkAccumulator(litellm_usage, ("content", "reasoning_content", "refusal"), capture_content()), hide)
        if not asynchronous and hasattr(result, "__next__"):
            return LiteLLMStream(result, call, ChatChunkAccumulator(litellm_usage, ("content", "reasoning_content", "refusal"), capture_content()), hide)
    _settle_response(call, result, kind)
    return result


async def _run_async(
    tracer: trace.Tracer, source: RuntimeSource, kind: str, switch: _Switch, binder: _Binder,
    wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
) -> Any:  # fmt: skip
    if CURRENT_CALL.get() is not None or not switch.on:
        result = wrapped(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result
    params = binder(wrapped, args, kwargs)
    if params is None:
        result = wrapped(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result
    call, substitute, hide = await _abegin(tracer, source.get(), kind, params)
    if call is None:
        return substitute
    token = CURRENT_CALL.set(call)
    try:
        with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):  # fmt: skip
            result = wrapped(**params)
            if inspect.isawaitable(result):
                result = await result
    except BaseException as exc:
        await call.afail(exc)
        _raise_refusal(exc)
        raise
    finally:
        CURRENT_CALL.reset(token)
    return _after(call, result, kind, hide, asynchronous=True)


def make_sync_wrapper(
    tracer: trace.Tracer, source: RuntimeSource, kind: str, switch: _Switch
) -> Callable[..., Any]:
    binder = _Binder()
    async_flag = _ASYNC_FLAGS[kind]

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or not switch.on:
            return wrapped(*args, **kwargs)
        if kwargs.get(async_flag) is True:  # returns a coroutine: meter it when awaited
            return _run_async(tracer, source, kind, switch, binder, wrapped, args, kwargs)
        params = binder(wrapped, args, kwargs)
        if params is None:
            return wrapped(*args, **kwargs)
        runtime = source.get()
        call, substitute, hide = _begin(tracer, runtime, kind, params)
        if call is None:
            return substitute
        token = CURRENT_CALL.set(call)
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):  # fmt: skip
                result = wrapped(**params)
        except BaseException as exc:
            call.fail(exc)
            _raise_refusal(exc)
            raise
        finally:
            CURRENT_CALL.reset(token)
        return _after(call, result, kind, hide, asynchronous=False)

    return wrapper


def make_async_wrapper(
    tracer: trace.Tracer, source: RuntimeSource, kind: str, switch: _Switch
) -> Callable[..., Any]:
    binder = _Binder()

    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return await _run_async(tracer, source, kind, switch, binder, wrapped, args, kwargs)

    return wrapper


def completion(tracer: trace.Tracer, source: RuntimeSource, switch: _Switch) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, KIND_CHAT, switch)


def acompletion(tracer: trace.Tracer, source: RuntimeSource, switch: _Switch) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, KIND_CHAT, switch)


def embedding(tracer: trace.Tracer, source: RuntimeSource, switch: _Switch) -> Callable[..., Any]:
    return make_sync_wrapper(tracer, source, KIND_EMBEDDINGS, switch)


def aembedding(tracer: trace.Tracer, source: RuntimeSource, switch: _Switch) -> Callable[..., Any]:
    return make_async_wrapper(tracer, source, KIND_EMBEDDINGS, switch)
