"""What a litellm call returned: its usage, its response attributes, the cost it reported.

    usage = litellm_usage(reply.usage)             # a TokenUsage (cache, reasoning, audio)
    done = settlement(reply, KIND_CHAT)            # what LLMCall.succeed / asucceed settle
    call.succeed(done.usage, done.attributes, response_model=done.response_model,
                 output_text=done.output_text)

``litellm_usage`` reads litellm's OpenAI-shaped ``Usage`` (every provider's usage mapped by
litellm into it) and also serves the stream accumulator of ``streams``. A cost the provider
reported itself (``reported_cost_usd``: OpenRouter's ``usage.cost``, or the cost header of a
LiteLLM proxy upstream) goes to the span as ``otel_budget.cost.provider_reported_usd``, and
``LLMCall`` settles with it (``costing.reconcile``).

litellm's own ``_hidden_params["response_cost"]`` is not read: it is litellm's price map
(the upstream's figure only when there was one, which is read at its source), and litellm
writes it over ``usage.cost`` on the usage chunk of a stream, keeping the upstream's figure as
``_hidden_params["upstream_usage_cost"]``, which is then read instead.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from otel_budget import attributes as attrs
from otel_budget.costing import reported_usd
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.instrumentation._util import response_attributes
from otel_budget.instrumentation.litellm.request import KIND_CHAT
from otel_budget.pricing import TokenUsage

#: The cost (USD, double) a provider reported for the call (kept here under its first name).
COST_PROVIDER_REPORTED_USD = attrs.COST_PROVIDER_REPORTED_USD
_COST_HEADER = "llm_provider-x-litellm-response-cost"
# Where litellm keeps the upstream's usage.cost once it wrote its own bill over it.
_UPSTREAM_COST = "upstream_usage_cost"
# Message fields holding generated text (the reasoning is billed as output too).
_TEXT_FIELDS = ("content", "reasoning_content")


def litellm_usage(usage: Any) -> TokenUsage | None:
    """A litellm ``Usage`` (OpenAI shape: ``prompt_tokens`` includes cached, cache-write and
    audio tokens, ``completion_tokens`` includes reasoning and audio) as a ``TokenUsage``.
    Anthropic's cache counts come as ``prompt_tokens_details.cached_tokens`` /
    ``cache_creation_tokens`` and as ``cache_read_input_tokens`` /
    ``cache_creation_input_tokens``; either spelling is read. Audio tokens
    (``*_tokens_details.audio_tokens``) are passed on as the audio part of the totals, priced
    at the audio rates. ``PriceBook.quote`` adds cache / reasoning tokens when a provider
    reported them apart."""
    if usage is None:
        return None
    prompt = _int(_get(usage, "prompt_tokens"))
    completion = _int(_get(usage, "completion_tokens"))
    details = _get(usage, "prompt_tokens_details")
    completion_details = _get(usage, "completion_tokens_details")
    cache_read = max(_int(_get(details, "cached_tokens")), _int(_get(usage, "cache_read_input_tokens")))
    cache_write = max(
        _int(_get(details, "cache_creation_tokens")),
        _int(_get(details, "cache_write_tokens")),
        _int(_get(usage, "cache_creation_input_tokens")),
    )
    reasoning = _int(_get(completion_details, "reasoning_tokens"))
    audio_in = _int(_get(details, "audio_tokens"))
    audio_out = _int(_get(completion_details, "audio_tokens"))
    return TokenUsage(
        input_tokens=max(prompt, audio_in), output_tokens=max(completion, audio_out),
        cache_read_tokens=cache_read, cache_write_tokens=cache_write, reasoning_tokens=reasoning,
        input_audio_tokens=audio_in, output_audio_tokens=audio_out,
    )  # fmt: skip


def reported_cost_usd(result: Any) -> float | None:
    """The cost the provider reported for a response or a stream's usage chunk (USD), as
    litellm passed it on: the upstream's ``usage.cost`` (OpenRouter), from the hidden params
    when litellm wrote its own bill over it, else the cost header of a LiteLLM proxy
    upstream. None when there is none, or it is no sane amount (``costing.reported_usd``)."""
    hidden = _get(result, "_hidden_params")
    if isinstance(hidden, dict) and _UPSTREAM_COST in hidden:
        cost = reported_usd(hidden[_UPSTREAM_COST])  # usage.cost is litellm's bill now
    else:
        cost = reported_usd(_get(_get(result, "usage"), "cost"))
    if cost is not None:
        return cost
    return reported_usd(_get(_get(hidden, "additional_headers"), _COST_HEADER), text=True)


def result_attributes(result: Any) -> dict[str, Any]:
    """``gen_ai.response.{id,model,finish_reasons}`` and the provider-reported cost."""
    reasons = [
        r for r in (_get(c, "finish_reason") for c in (_get(result, "choices") or ()))
        if isinstance(r, str)
    ]  # fmt: skip
    # (empty ids and models, which some providers send through litellm, are left out)
    out = response_attributes(_get(result, "id") or None, _get(result, "model") or None, reasons)
    reported = reported_cost_usd(result)
    if reported is not None:
        out[COST_PROVIDER_REPORTED_USD] = reported
    return out


def _output_text(result: Any) -> str:
    """Every generated text of a chat response: contents, reasoning, tool-call arguments."""
    parts: list[str] = []
    for choice in _get(result, "choices") or ():
        message = _get(choice, "message")
        for name in _TEXT_FIELDS:
            value = _get(message, name)
            if isinstance(value, str):
                parts.append(value)
        for tool_call in _get(message, "tool_calls") or ():
            arguments = _get(_get(tool_call, "function"), "arguments")
            if isinstance(arguments, str):
                parts.append(arguments)
    return "".join(parts)


class Settlement(NamedTuple):
    """The arguments of ``LLMCall.succeed`` / ``asucceed`` for a litellm response."""

    usage: TokenUsage | None
    attributes: dict[str, Any]
    response_model: str | None
    output_text: str | None


def settlement(result: Any, kind: str) -> Settlement:
    """What a litellm response of ``kind`` settles its call with."""
    usage = litellm_usage(_get(result, "usage"))
    attributes = result_attributes(result)
    text: str | None = None
    if kind == KIND_CHAT:
        text = _output_text(result)
        _content.output_into(attributes, lambda: _content.openai_chat_output(_get(result, "choices")))
    model = attributes.get(attrs.GEN_AI_RESPONSE_MODEL)
    return Settlement(usage, attributes, model if isinstance(model, str) else None, text)


__all__ = [
    "COST_PROVIDER_REPORTED_USD",
    "Settlement",
    "litellm_usage",
    "reported_cost_usd",
    "result_attributes",
    "settlement",
]
