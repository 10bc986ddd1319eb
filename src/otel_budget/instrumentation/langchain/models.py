"""What a LangChain model run sends and what it reports, read from its callback events.

    request = chat_request(serialized, messages, invocation_params, metadata)
    call = start_call(tracer, request, {}, runtime=runtime)   # reserve before it is sent
    ...
    usage, model, text = result_usage(llm_result)             # on_llm_end
    call.succeed(usage, response_model=model, output_text=text)

LangChain hands a callback the model's messages (``BaseMessage`` lists), its
``invocation_params`` (the model id, the output cap, the tool definitions) and its
``ls_*`` metadata (the provider). The projection reads the messages as the OpenAI chat
format (``convert_to_openai_messages``), which the estimator walks for every provider.

A callback cannot change the request: the output cap the one LLM path would write into it
(``LLMRequest.write_output``) is never written here, and the span says only what the request
carries. A call metered here alone reserves what the budget affords for its output bound; an
overshoot beyond it is recorded when the call settles. With the provider's own instrumentor
underneath (``BudgetInstrumentor``), the provider call takes the metering over and its hard
cap applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.instrumentation._call import LLMRequest
from otel_budget.instrumentation._util import OUTPUT_KEYS
from otel_budget.pricing import TokenUsage
from otel_budget.tokens import InputEstimate, estimate_input_tokens

# LangChain's ``ls_provider`` -> ``gen_ai.provider.name`` (the others pass through).
_PROVIDERS = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "google_genai": "gcp.gen_ai",
    "google_vertexai": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "amazon_bedrock": "aws.bedrock",
    "mistralai": "mistral_ai",
    "groq": "groq",
    "deepseek": "deepseek",
    "xai": "x_ai",
    "cohere": "cohere",
    "ollama": "ollama",
}
_MODEL_KEYS = ("model", "model_name", "model_id", "deployment_name")


def _provider(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    name = metadata.get("ls_provider") or params.get("_type") or "unknown"
    name = str(name).strip().lower()
    return _PROVIDERS.get(name, name)


def _model(metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    for key in _MODEL_KEYS:
        value = params.get(key)
        if isinstance(value, str) and value:
            return value
    value = metadata.get("ls_model_name")
    return value if isinstance(value, str) and value else "unknown"


def _output_params(params: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The output cap the request sends, under the key the output bound reads."""
    for key in OUTPUT_KEYS:
        value = params.get(key)
        if value is not None:
            return {"max_tokens": value}
    value = metadata.get("ls_max_tokens")
    return {"max_tokens": value} if value is not None else {}


def _openai_messages(messages: Any) -> Any:
    """LangChain messages as OpenAI chat dicts (what the estimator walks); as they are when
    they are not messages."""
    from langchain_core.messages import BaseMessage, convert_to_openai_messages

    if isinstance(messages, Sequence) and all(isinstance(m, BaseMessage) for m in messages):
        return convert_to_openai_messages(list(messages))
    return messages


def chat_request(
    messages: Sequence[Sequence[Any]] | None,
    prompts: Sequence[str] | None,
    params: Mapping[str, Any] | None,
    metadata: Mapping[str, Any] | None,
) -> LLMRequest:
    """The ``LLMRequest`` of a chat model run (``messages``: one list per prompt of the batch)
    or of a completion model run (``prompts``)."""
    params = params or {}
    metadata = metadata or {}
    model = _model(metadata, params)
    tools = params.get("tools") or params.get("functions")
    sent = _output_params(params, metadata)
    choices = params.get("n")
    batches = list(messages) if messages is not None else [[p] for p in (prompts or [])]

    def estimate() -> InputEstimate:
        total, method = 0, "none"
        for batch in batches:
            if messages is not None:
                got = estimate_input_tokens(model, messages=_openai_messages(batch), tools=tools)
            else:
                got = estimate_input_tokens(model, prompt=list(batch), tools=tools)
            total += got.tokens
            method = got.method
        return InputEstimate(total, method)

    operation = attrs.OP_CHAT if messages is not None else attrs.OP_TEXT_COMPLETION
    return LLMRequest(
        provider=_provider(metadata, params), operation=operation, model=model,
        estimate=estimate, output_param="max_tokens", params=sent,
        # A callback cannot change the request: the cap is never written (nor claimed).
        write_output=lambda _kwargs, _cap: False,
        choices=(choices if isinstance(choices, int) and choices > 0 else 1) * max(1, len(batches)),
        stream=bool(params.get("stream")),
    )  # fmt: skip


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _usage_of(usage: Mapping[str, Any]) -> TokenUsage:
    """A LangChain ``usage_metadata`` (input total including cache reads, output including
    reasoning, as the GenAI conventions count them)."""
    inp = usage.get("input_token_details") or {}
    out = usage.get("output_token_details") or {}
    return TokenUsage(
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        cache_read_tokens=_int(inp.get("cache_read")),
        cache_write_tokens=_int(inp.get("cache_creation")),
        reasoning_tokens=_int(out.get("reasoning")),
        input_audio_tokens=_int(inp.get("audio")),
        output_audio_tokens=_int(out.get("audio")),
    )


def _token_usage(usage: Mapping[str, Any]) -> TokenUsage | None:
    """An OpenAI-shaped ``llm_output["token_usage"]`` (completion models have no
    ``usage_metadata``)."""
    inp, out = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    if not inp and not out:
        return None
    return TokenUsage(input_tokens=inp, output_tokens=out)


def result_usage(result: Any) -> tuple[TokenUsage | None, str | None, str]:
    """(usage summed over the generations, the response model, the output text) of an
    ``LLMResult``; usage None when the provider reported none."""
    total: TokenUsage | None = None
    texts: list[str] = []
    model: str | None = None
    for generations in getattr(result, "generations", None) or []:
        for generation in generations:
            texts.append(str(getattr(generation, "text", "") or ""))
            message = getattr(generation, "message", None)
            usage = getattr(message, "usage_metadata", None)
            meta = getattr(message, "response_metadata", None) or {}
            if model is None and isinstance(meta.get("model_name"), str):
                model = meta["model_name"]
            if isinstance(usage, Mapping):
                total = _add(total, _usage_of(usage))
    output = getattr(result, "llm_output", None) or {}
    if isinstance(output, Mapping):
        if model is None and isinstance(output.get("model_name"), str):
            model = output["model_name"]
        if total is None and isinstance(output.get("token_usage"), Mapping):
            total = _token_usage(output["token_usage"])
    return total, model, "".join(texts)


def _add(a: TokenUsage | None, b: TokenUsage) -> TokenUsage:
    if a is None:
        return b
    return TokenUsage(
        input_tokens=a.input_tokens + b.input_tokens,
        output_tokens=a.output_tokens + b.output_tokens,
        cache_read_tokens=a.cache_read_tokens + b.cache_read_tokens,
        cache_write_tokens=a.cache_write_tokens + b.cache_write_tokens,
        reasoning_tokens=a.reasoning_tokens + b.reasoning_tokens,
        input_audio_tokens=a.input_audio_tokens + b.input_audio_tokens,
        output_audio_tokens=a.output_audio_tokens + b.output_audio_tokens,
    )


__all__ = ["chat_request", "result_usage"]
