"""What an openai request sends: one reader per API, giving the ``LLMRequest`` to meter.

    request = chat_request(instance, kwargs)   # instance: the SDK's ``Completions`` resource
    call = start_call(tracer, request, kwargs, runtime=runtime)

Each reader reads what the request *sends*: the kwargs with ``extra_body`` merged over them
(the SDK merges it into the JSON body, so ``extra_body={"n": 8}`` generates 8 choices).
One-shot iterators (a generator of messages) are materialised into lists, written back, then
projected. The output cap goes where it takes effect (``RequestParams.output_writer``).
``prepare_stream`` asks a chat stream for its usage chunk before it is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._call import LLMRequest
from otel_budget.instrumentation._util import (
    RequestParams,
    count_param,
    refuse_if,
    request_attributes,
    server_of,
    with_history,
)
from otel_budget.instrumentation.openai import history
from otel_budget.runtime import BudgetRuntime
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
_LEGACY_DEFAULT_MAX_TOKENS = 16  # what the completions API generates when max_tokens is absent


def _is_azure(client: Any) -> bool:
    """``AzureOpenAI`` / ``AsyncAzureOpenAI`` or any subclass, whatever its name."""
    if not _AZURE:  # the import looked up once, not per call
        try:
            from openai.lib.azure import BaseAzureClient
        except Exception:  # an SDK without it: fall back to the class names
            _AZURE.append(None)
        else:
            _AZURE.append(BaseAzureClient)
    base = _AZURE[0]
    if base is None:
        return any("Azure" in klass.__name__ for klass in type(client).__mro__)
    return isinstance(client, base)


_AZURE: list[Any] = []


def client_info(instance: Any) -> tuple[str, str | None, int | None]:
    """(provider, server host, server port) of the client a resource belongs to."""
    client = getattr(instance, "_client", None)
    provider = PROVIDER_OPENAI
    if client is not None and _is_azure(client):
        provider = PROVIDER_AZURE
    return (provider, *server_of(client))


def _common_attributes(params: dict[str, Any]) -> dict[str, Any]:
    return request_attributes(params, _REQUEST_ATTRIBUTES)


def _output_type(response_format: Any) -> str | None:
    """``gen_ai.output.type`` of a ``response_format`` / Responses ``text.format``, as
    genai-openai reads it: a pydantic class or a JSON format is ``json``; another type as
    named."""
    if response_format is None:
        return None
    if isinstance(response_format, type):
        return "json"
    kind = response_format.get("type") if isinstance(response_format, Mapping) else response_format
    if not isinstance(kind, str) or not kind:
        return None
    return "json" if kind in ("json_object", "json_schema") else kind


def _choices(params: dict[str, Any], *names: str) -> tuple[int, str | None]:
    """How many completions the request generates (``n``, legacy ``best_of``): each may use
    the whole output cap, and each is billed. ``(1, problem)`` for a value that is no count."""
    return count_param(params, *names)


def _tier(sent: RequestParams) -> str | None:
    tier = sent.get("service_tier")
    return tier if isinstance(tier, str) and tier != "auto" else None


def chat_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    """``chat.completions.create`` / ``parse``."""
    sent = RequestParams(kwargs)
    sent.materialise("messages", "tools", "functions")
    params = sent.params
    provider, host, port = client_info(instance)
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
    output_type = _output_type(params.get("response_format"))
    if output_type is not None:
        attributes[attrs.GEN_AI_OUTPUT_TYPE] = output_type
    content = _content.request_content(
        _content.content_mode(), lambda: _content.openai_chat_input(messages),
        tools=lambda: _content.openai_chat_tools(params.get("tools")),
    )  # fmt: skip
    choices, problem = _choices(params, "n")
    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=refuse_if(problem, lambda: estimate_input_tokens(model, messages=messages, tools=tools)),
        output_param=output_param, server_address=host, server_port=port,
        service_tier=_tier(sent), stream=bool(params.get("stream")), attributes=attributes,
        choices=choices, params=params, write_output=sent.output_writer(output_param),
        output_audio=wants_audio_output(params), content=content,
    )  # fmt: skip


def responses_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    """``responses.create`` / ``parse`` (and ``stream()``)."""
    sent = RequestParams(kwargs)
    sent.materialise("input", "tools")
    params = sent.params
    provider, host, port = client_info(instance)
    model = str(params.get("model") or "unknown")
    inp = params.get("input")
    instructions = params.get("instructions")
    tools = params.get("tools")
    attributes = _common_attributes(params)
    attributes[attrs.OPENAI_API_TYPE] = "responses"
    text = params.get("text")
    output_type = _output_type(text.get("format") if isinstance(text, Mapping) else None)
    if output_type is None and isinstance(params.get("text_format"), type):
        output_type = "json"
    if output_type is not None:
        attributes[attrs.GEN_AI_OUTPUT_TYPE] = output_type
    content = _content.request_content(
        _content.content_mode(), lambda: _content.responses_input(inp),
        lambda: [_content.text_part(instructions)] if isinstance(instructions, str) else None,
        lambda: _content.responses_tools(tools),
    )  # fmt: skip
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
        write_output=sent.output_writer("max_output_tokens"), content=content,
    )  # fmt: skip


def completions_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    """Legacy ``completions.create`` (gpt-3.5-turbo-instruct, OpenAI-compatible servers)."""
    sent = RequestParams(kwargs)
    sent.materialise("prompt")
    params = sent.params
    provider, host, port = client_info(instance)
    model = str(params.get("model") or "unknown")
    if params.get("max_tokens") is None:
        # Absent means 16 here, not "up to the model's limit": send that default explicitly, so
        # the bound is exact and the configured default cap does not lengthen the answer.
        sent.set("max_tokens", _LEGACY_DEFAULT_MAX_TOKENS)
    prompt = params.get("prompt")
    attributes = _common_attributes(params)
    # (No official instrumentation records legacy completions: the prompt as user text.)
    content = _content.request_content(
        _content.content_mode(),
        lambda: [_content.input_message("user", [_content.text_part(p)])
                 for p in ([prompt] if isinstance(prompt, str) else prompt or ())
                 if isinstance(p, str)],
    )  # fmt: skip
    # best_of: generated (and billed) server-side
    choices, problem = _choices(params, "n", "best_of")
    return LLMRequest(
        provider=provider, operation=attrs.OP_TEXT_COMPLETION, model=model,
        estimate=refuse_if(problem, lambda: estimate_input_tokens(model, prompt=prompt)),
        output_param="max_tokens", server_address=host, server_port=port,
        service_tier=_tier(sent), stream=bool(params.get("stream")), attributes=attributes,
        choices=choices, params=params, write_output=sent.output_writer("max_tokens"),
        content=content,
    )  # fmt: skip


def embeddings_request(instance: Any, kwargs: dict[str, Any]) -> LLMRequest:
    """``embeddings.create``."""
    sent = RequestParams(kwargs)
    sent.materialise("input")
    params = sent.params
    provider, host, port = client_info(instance)
    model = str(params.get("model") or "unknown")
    inp = params.get("input")
    attributes: dict[str, Any] = {}
    dimensions = params.get("dimensions")
    if isinstance(dimensions, int) and not isinstance(dimensions, bool):
        attributes[attrs.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = dimensions
    encoding = params.get("encoding_format")
    if isinstance(encoding, str) and encoding:
        attributes[attrs.GEN_AI_REQUEST_ENCODING_FORMATS] = [encoding]
    return LLMRequest(
        provider=provider, operation=attrs.OP_EMBEDDINGS, model=model,
        estimate=lambda: estimate_input_tokens(model, input=inp), output_param=None,
        server_address=host, server_port=port, params=params, attributes=attributes,
    )  # fmt: skip


def prepare_stream(kwargs: dict[str, Any], kind: str, runtime: BudgetRuntime | None) -> bool:
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


__all__ = [
    "PROVIDER_AZURE",
    "PROVIDER_OPENAI",
    "chat_request",
    "client_info",
    "completions_request",
    "embeddings_request",
    "prepare_stream",
    "responses_request",
]
