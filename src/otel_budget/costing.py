"""Read a GenAI span's usage attributes and price them.

    >>> usage = usage_from_attributes(span.attributes)         # doctest: +SKIP
    >>> quote = price_span(prices, span.attributes, usage)      # doctest: +SKIP

Token accounting follows the GenAI semantic conventions: ``gen_ai.usage.input_tokens``
includes cached and cache-written tokens, ``output_tokens`` includes reasoning tokens. Both
cache-write spellings (``cache_creation`` and the newer ``cache_write``) are read, and the
deprecated ``prompt_tokens``/``completion_tokens`` are accepted from older instrumentations.
Values that are not non-negative integers are treated as missing, never as zero cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.pricing import PriceQuote, TokenUsage, UnknownModelError


def _count(attributes: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = attributes.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and value >= 0:
            return value
        return None
    return None


def usage_from_attributes(attributes: Mapping[str, Any]) -> TokenUsage | None:
    """The usage a span reports, or None when it reports no input or output tokens."""
    inp = _count(
        attributes, attrs.GEN_AI_USAGE_INPUT_TOKENS, attrs.GEN_AI_USAGE_PROMPT_TOKENS_DEPRECATED
    )
    out = _count(
        attributes,
        attrs.GEN_AI_USAGE_OUTPUT_TOKENS,
        attrs.GEN_AI_USAGE_COMPLETION_TOKENS_DEPRECATED,
    )
    if inp is None and out is None:
        return None
    cache_read = _count(attributes, attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS) or 0
    cache_write = (
        _count(
            attributes,
            attrs.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
            attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS,
        )
        or 0
    )
    inp = inp or 0
    # The conventions say cache tokens are part of input_tokens; an instrumentation that
    # reports them separately (Anthropic's raw shape) would otherwise be under-charged.
    if cache_read + cache_write > inp:
        inp += cache_read + cache_write
    return TokenUsage(
        input_tokens=inp,
        output_tokens=out or 0,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        reasoning_tokens=_count(attributes, attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS) or 0,
    )


def model_of(attributes: Mapping[str, Any]) -> str | None:
    """The model to price: the response model (usually dated and exact) first."""
    for key in (attrs.GEN_AI_RESPONSE_MODEL, attrs.GEN_AI_REQUEST_MODEL):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def provider_of(attributes: Mapping[str, Any]) -> str | None:
    for key in (attrs.GEN_AI_PROVIDER_NAME, attrs.GEN_AI_SYSTEM_DEPRECATED):
        value = attributes.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def price_call(
    prices: Any,
    provider: str | None,
    usage: TokenUsage,
    models: Sequence[str | None],
    *,
    server_address: str | None = None,
    service_tier: str | None = None,
) -> PriceQuote:
    """The one pricing of a call's usage, for our calls and other instrumentations' spans:
    by the first of ``models`` the price book knows (the response model, usually dated and
    exact, then the requested one). Raises the price book's ``UnknownModelError`` when it
    knows none of them (the caller then keeps the call's reservation: never free)."""
    tried: list[str] = []
    error: Exception | None = None
    for model in models:
        if not model or model in tried:
            continue
        tried.append(model)
        try:
            return prices.quote(  # type: ignore[no-any-return]
                provider, model, usage, server_address=server_address, service_tier=service_tier
            )
        except UnknownModelError as exc:
            error = exc
    if error is None:
        return prices.quote(  # type: ignore[no-any-return]
            provider, "unknown", usage, server_address=server_address, service_tier=service_tier
        )
    raise error


def price_span(prices: Any, attributes: Mapping[str, Any], usage: TokenUsage) -> PriceQuote:
    """Price a span's usage (raises the price book's UnknownModelError when unpriced)."""
    server = attributes.get(attrs.SERVER_ADDRESS)
    tier = attributes.get(attrs.OPENAI_REQUEST_SERVICE_TIER)
    response = attributes.get(attrs.GEN_AI_RESPONSE_MODEL)
    request = attributes.get(attrs.GEN_AI_REQUEST_MODEL)
    return price_call(
        prices,
        provider_of(attributes),
        usage,
        [m if isinstance(m, str) else None for m in (response, request)],
        server_address=server if isinstance(server, str) else None,
        service_tier=tier if isinstance(tier, str) and tier != "auto" else None,
    )
