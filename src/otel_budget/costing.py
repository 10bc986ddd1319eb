"""Read a GenAI span's usage attributes and price them; weigh a provider's own bill.

    >>> usage = usage_from_attributes(span.attributes)         # doctest: +SKIP
    >>> quote = price_span(prices, span.attributes, usage)      # doctest: +SKIP
    >>> cost = reconcile(quote.nanos, reported_usd(0.0042))     # doctest: +SKIP
    >>> cost.nanos, cost.source                                 # doctest: +SKIP
    (4200000, 'provider')

Token accounting follows the GenAI semantic conventions: ``gen_ai.usage.input_tokens``
includes cached and cache-written tokens, ``output_tokens`` includes reasoning tokens. Both
cache-write spellings (``cache_creation`` and the newer ``cache_write``) are read, and the
deprecated ``prompt_tokens``/``completion_tokens`` are accepted from older instrumentations.
Values that are not non-negative integers are treated as missing, never as zero cost.

A provider that reports what a call cost (OpenRouter's ``usage.cost``) is the bill, and
``reconcile`` settles with it, with one guard for a budget: it never lowers the charge far
below our own price of the usage that provider reported. The rule, ``charged``:

* no sane report (absent, not a number, NaN, negative, above ``MAX_REPORTED_USD``): our price;
* our price unknown (a model the price book does not know): the report;
* the report at or above ``TRUSTED_PERCENT`` (90 %) of our price: the report (the bill:
  small discounts and drift, or a surcharge and a stale price book, either way);
* the report further below: our price. A figure that low is more often not the whole bill
  (OpenRouter BYOK reports only its own fee in ``cost``; a proxy may report a partial or
  unit-shifted figure) than a discount; an under-charge is the one error a budget must not
  make, and ``otel_budget.cost.price_delta_usd`` shows the gap so a price override can close
  it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.money import to_usd, usd_to_nanos
from otel_budget.pricing import PriceQuote, TokenUsage, UnknownModelError

#: ``otel_budget.cost.source`` / ``gen_ai.usage.cost.source``: the provider's bill, or ours.
SOURCE_PROVIDER = "provider"
SOURCE_LOCAL = "local"
#: A reported cost above this (USD) for one call is garbage (no single call costs that much).
MAX_REPORTED_USD = 10_000.0
#: A reported cost at least this percentage of our price is charged as the bill; below, ours.
TRUSTED_PERCENT = 90


def _count(attributes: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = attributes.get(key)
        if value is None:
            continue
        if type(value) is int:  # the usual count, answered as below
            return value if value >= 0 else None
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


# -- a cost the provider reported ----------------------------------------------------------------
def reported_usd(value: Any, *, text: bool = False) -> float | None:
    """A cost a provider reported for one call, in USD, or None when it is no sane amount:
    a number (with ``text``, for an HTTP header, also a decimal string), finite, not
    negative, at most ``MAX_REPORTED_USD``. A JSON string where a number belongs is a
    malformed report, not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and text:
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    usd = float(value)
    return usd if math.isfinite(usd) and 0.0 <= usd <= MAX_REPORTED_USD else None


@dataclass(frozen=True, slots=True)
class CallCost:
    """What a call is charged (``nanos``; None: neither a price nor a report) and why."""

    nanos: int | None
    source: str
    local_nanos: int | None  # our price of the reported usage (None: no price)
    reported_nanos: int | None  # the provider's report (None: none, or not sane)

    @property
    def distrusted(self) -> bool:
        """A sane report that was not charged: too far below our price."""
        return self.reported_nanos is not None and self.source == SOURCE_LOCAL

    def attributes(self) -> dict[str, Any]:
        """``otel_budget.cost.source``, and with a report, the report and its difference
        from our price."""
        out: dict[str, Any] = {attrs.COST_SOURCE: self.source}
        if self.reported_nanos is not None:
            out[attrs.COST_PROVIDER_REPORTED_USD] = to_usd(self.reported_nanos)
            if self.local_nanos is not None:
                out[attrs.COST_PRICE_DELTA_USD] = to_usd(self.reported_nanos - self.local_nanos)
        return out

    def semconv_attributes(self, usage_estimated: bool) -> dict[str, Any]:
        """The proposed ``gen_ai.usage.cost.*`` (PR #443): the provider's report when there is
        one, else our price of the usage it reported; nothing when the usage was estimated
        (a standard attribute never carries our estimate) or there is no cost."""
        if self.reported_nanos is not None:
            amount, source = self.reported_nanos, SOURCE_PROVIDER
        elif self.local_nanos is not None and not usage_estimated:
            amount, source = self.local_nanos, SOURCE_LOCAL
        else:
            return {}
        return {
            attrs.GEN_AI_USAGE_COST_AMOUNT: to_usd(amount),
            attrs.GEN_AI_USAGE_COST_CURRENCY: "USD",
            attrs.GEN_AI_USAGE_COST_SOURCE: source,
        }


def reconcile(local_nanos: int | None, reported: Any) -> CallCost:
    """The cost to charge for a call, from our price of its usage (``local_nanos``; None
    when the price book has none) and what the provider reported (any value: checked with
    ``reported_usd``). See the module docstring for the rule."""
    usd = reported_usd(reported) if reported is not None else None
    reported_nanos = usd_to_nanos(Decimal(repr(usd))) if usd is not None else None
    if reported_nanos is None:
        return CallCost(local_nanos, SOURCE_LOCAL, local_nanos, None)
    if local_nanos is None or reported_nanos * 100 >= local_nanos * TRUSTED_PERCENT:
        return CallCost(reported_nanos, SOURCE_PROVIDER, local_nanos, reported_nanos)
    return CallCost(local_nanos, SOURCE_LOCAL, local_nanos, reported_nanos)
