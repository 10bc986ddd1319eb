"""What a litellm call asks for: its provider, model, server, output cap and keyword arguments.

    params = Binder()(litellm.completion, args, kwargs)    # positional arguments as keywords
    request = read_request(KIND_CHAT, params)              # an LLMRequest for start_call
    call = start_call(tracer, request, params, runtime=runtime)
    sync_output_caps(request, params)                      # a second cap never above the first
    hide_usage = prepare_stream(params, runtime)           # ask for the usage chunk

The provider comes from ``custom_llm_provider`` or a ``provider/`` prefix litellm knows (mapped
to ``gen_ai.provider.name``), the server from ``api_base``; the request read is what litellm
sends (``extra_body`` merged over the keyword arguments, one-shot iterators materialised), and
a request asking for spoken output (``modalities``, ``audio``) is projected at the audio rate.

This module never imports litellm at import time (only ``litellm.provider_list`` and
``litellm.model_cost`` are read, once litellm is imported).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._call import LLMRequest
from otel_budget.instrumentation._util import (
    RequestParams,
    count_param,
    refuse_if,
    request_attributes,
)
from otel_budget.runtime import BudgetRuntime
from otel_budget.tokens import estimate_input_tokens, wants_audio_output

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
ASYNC_FLAGS = {KIND_CHAT: "acompletion", KIND_EMBEDDINGS: "aembedding"}


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


def sync_output_caps(request: LLMRequest, params: dict[str, Any]) -> None:
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
    content = _content.request_content(  # litellm speaks the OpenAI chat shape
        _content.content_mode(), lambda: _content.openai_chat_input(messages),
        tools=lambda: _content.openai_chat_tools(merged.get("tools")),
    )  # fmt: skip
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
        output_audio=wants_audio_output(merged), content=content,
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


def read_request(kind: str, params: dict[str, Any]) -> LLMRequest:
    """The ``LLMRequest`` of a litellm call of ``kind`` (``KIND_CHAT``, ``KIND_EMBEDDINGS``);
    ``params`` may be changed (``extra_body`` copied, iterators materialised)."""
    return _READERS[kind](params)


def prepare_stream(params: dict[str, Any], runtime: BudgetRuntime | None) -> bool:
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


# -- positional arguments ------------------------------------------------------------------
class Binder:
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


__all__ = [
    "ASYNC_FLAGS",
    "KIND_CHAT",
    "KIND_EMBEDDINGS",
    "PROVIDER_NAMES",
    "UNKNOWN_PROVIDER",
    "Binder",
    "prepare_stream",
    "read_request",
    "resolve_provider",
    "sync_output_caps",
]
