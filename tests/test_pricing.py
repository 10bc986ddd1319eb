"""Tests for otel_budget.pricing: prices, normalisation, policies, variants, caches, threads."""

from __future__ import annotations

import json
import math
import random
import socket
import threading
import warnings
from datetime import datetime, timezone
from decimal import Decimal

import genai_prices
import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices import types as gp_types

from otel_budget import price_plans, pricing
from otel_budget.money import usd_to_nanos
from otel_budget.pricing import ModelPrice, PriceBook, PriceQuote, TokenUsage, UnknownModelError

UTC = timezone.utc
# Batch/priority variants in genai-prices 0.2.3 start on 2026-10-12/14: pin a date after that.
AFTER_VARIANTS = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
BEFORE_VARIANTS = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
M = 1_000_000  # tokens
USD = 1_000_000_000  # nanos
GP_SOURCE = f"genai-prices {genai_prices.__version__}"


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook(aliases={"my-gpt4o-deployment": "gpt-4o"})


def usd(nanos: int) -> Decimal:
    return Decimal(nanos) / USD


# --------------------------------------------------------------------------- known prices


def test_gpt_4o_list_price(book: PriceBook) -> None:
    q = book.quote("openai", "gpt-4o", TokenUsage(input_tokens=M, output_tokens=M))
    assert q == PriceQuote(nanos=12_500_000_000, source=GP_SOURCE, model="gpt-4o", provider="openai")
    assert q.usd == 12.5
    assert book.quote("openai", "gpt-4o", TokenUsage(input_tokens=M)).nanos == 2_500_000_000
    assert book.quote("openai", "gpt-4o", TokenUsage(output_tokens=M)).nanos == 10 * USD


def test_claude_sonnet_4_5_list_price(book: PriceBook) -> None:
    # Below the 200k long-context tier: $3 input, $15 output per MTok.
    q = book.quote("anthropic", "claude-sonnet-4-5", TokenUsage(input_tokens=100_000, output_tokens=100_000))
    assert q.nanos == 1_800_000_000
    assert (q.model, q.provider, q.source) == ("claude-sonnet-4-5", "anthropic", GP_SOURCE)


def test_anthropic_cache_read_and_write(book: PriceBook) -> None:
    # Total input 10k = 1k fresh + 8k cache read + 1k cache write (OTel rule: input is the total).
    u = TokenUsage(input_tokens=10_000, cache_read_tokens=8_000, cache_write_tokens=1_000, output_tokens=1_000)
    q = book.quote("anthropic", "claude-sonnet-4-5", u)
    # 1k x $3 + 8k x $0.30 + 1k x $3.75 + 1k x $15 per MTok
    assert q.nanos == (1_000 * 3 + 8_000 * 0.3 + 1_000 * 3.75 + 1_000 * 15) * 1_000
    assert q.nanos == 24_150_000
    # genai-prices subtracts the cache keys from the total input itself: same number.
    gp = calc_price(
        Usage(input_tokens=10_000, cache_read_tokens=8_000, cache_write_tokens=1_000, output_tokens=1_000),
        "claude-sonnet-4-5",
        provider_id="anthropic",
    )
    assert usd_to_nanos(gp.total_price) == q.nanos


def test_anthropic_raw_usage_without_cache_in_input_is_not_undercharged(book: PriceBook) -> None:
    # Anthropic's raw input_tokens excludes cache tokens; cache_read > input can only mean that.
    total = TokenUsage(input_tokens=10_000, cache_read_tokens=8_000, cache_write_tokens=1_000)
    raw = TokenUsage(input_tokens=1_000, cache_read_tokens=8_000, cache_write_tokens=1_000)
    assert book.quote("anthropic", "claude-sonnet-4-5", raw).nanos == book.quote(
        "anthropic", "claude-sonnet-4-5", total
    ).nanos


def test_openai_cached_input(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=10_000, cache_read_tokens=8_000)
    # 2k x $2.50 + 8k x $1.25 per MTok
    assert book.quote("openai", "gpt-4o", u).nanos == 15_000_000


def test_reasoning_tokens_are_output_unless_the_model_has_a_reasoning_rate(book: PriceBook) -> None:
    with_reasoning = TokenUsage(input_tokens=0, output_tokens=1_000, reasoning_tokens=400)
    plain = TokenUsage(output_tokens=1_000)
    assert book.quote("openai", "gpt-5", with_reasoning).nanos == book.quote("openai", "gpt-5", plain).nanos
    # sonar-deep-research: $8 output, $3 reasoning per MTok.
    q = book.quote("perplexity", "sonar-deep-research", with_reasoning)
    assert q.nanos == 600 * 8_000 + 400 * 3_000
    # Gemini reports thoughts outside the output count: reasoning > output means "add them".
    gem = book.quote("gcp.gemini", "gemini-2.5-flash", TokenUsage(output_tokens=100, reasoning_tokens=900))
    assert gem.nanos == book.quote("gcp.gemini", "gemini-2.5-flash", TokenUsage(output_tokens=1_000)).nanos


def test_per_request_price_from_genai_prices(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=1_000, output_tokens=1_000)
    q = book.quote("perplexity", "sonar", u)
    gp = calc_price(Usage(input_tokens=1_000, output_tokens=1_000), "sonar", provider_id="perplexity")
    assert q.nanos == usd_to_nanos(gp.total_price)
    assert q.nanos > book.quote("perplexity", "sonar", TokenUsage()).nanos > 0  # the request fee


def test_rounding_is_up(book: PriceBook) -> None:
    # gpt-4o-mini input: $0.15/MTok = 150 nano-USD per token.
    assert book.quote("openai", "gpt-4o-mini", TokenUsage(input_tokens=1)).nanos == 150
    assert book.quote("openai", "gpt-4o-mini", TokenUsage()).nanos == 0
    # gpt-5 flex cache read: $0.0625/MTok = 62.5 nano-USD per token -> 63.
    q = book.quote("openai", "gpt-5", TokenUsage(input_tokens=1, cache_read_tokens=1), service_tier="flex",
                   timestamp=AFTER_VARIANTS)
    assert q.nanos == 63
    # A tenth of a nano-dollar is still one nano-dollar, never zero.
    tiny = PriceBook(overrides={"tiny": ModelPrice(input="0.0001", output="0.0001")})
    assert tiny.quote(None, "tiny", TokenUsage(input_tokens=1)).nanos == 1
    assert tiny.quote(None, "tiny", TokenUsage(input_tokens=11)).nanos == 2  # 1.1 -> 2


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("provider", "model", "server_address", "want_model", "want_provider"),
    [
        ("openai", "gpt-4o", None, "gpt-4o", "openai"),
        ("OpenAI", "GPT-4o", None, "gpt-4o", "openai"),
        ("openai", "openai/gpt-4o", None, "gpt-4o", "openai"),
        (None, "openai/gpt-4o", None, "gpt-4o", "openai"),
        ("litellm", "openai/gpt-4o", None, "gpt-4o", "openai"),
        ("anthropic", "anthropic/claude-sonnet-4-5", None, "claude-sonnet-4-5", "anthropic"),
        (None, "anthropic/claude-sonnet-4-5", None, "claude-sonnet-4-5", "anthropic"),
        # OpenRouter refs are "vendor/model" and must stay whole.
        ("openrouter", "anthropic/claude-sonnet-4.5", None, "anthropic/claude-sonnet-4.5", "openrouter"),
        ("openrouter", "openai/gpt-4o", None, "openai/gpt-4o", "openrouter"),
        # Host-native "org/model" ids are not provider prefixes.
        ("together_ai", "meta-llama/Llama-3.3-70B-Instruct-Turbo", None,
         "meta-llama/Llama-3.3-70B-Instruct-Turbo", "together"),
        ("groq", "openai/gpt-oss-120b", None, "openai/gpt-oss-120b", "groq"),
        # Google SDK and Vertex resource forms.
        ("gcp.gen_ai", "models/gemini-2.5-flash", None, "gemini-2.5-flash", "google"),
        ("gcp.gemini", "gemini-2.5-flash", None, "gemini-2.5-flash", "google"),
        ("gcp.vertex_ai", "publishers/google/models/gemini-2.5-pro", None, "gemini-2.5-pro", "google"),
        ("gcp.vertex_ai", "projects/p1/locations/us-central1/publishers/google/models/gemini-2.5-pro", None,
         "gemini-2.5-pro", "google"),
        ("gcp.vertex_ai", "claude-sonnet-4-5@20250929", None, "claude-sonnet-4-5", "google"),
        # OTel provider names genai-prices does not know.
        ("x_ai", "grok-4", None, "grok-4-0709", "x-ai"),
        ("fireworks_ai", "accounts/fireworks/models/llama-v3p1-8b-instruct", None,
         "llama-v3p1-8b-instruct", "fireworks"),
        ("mistral_ai", "mistral-large-latest", None, "mistral-large", "mistral"),
        ("aws.bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0", None,
         "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "aws"),
        (None, "us.anthropic.claude-sonnet-4-5-20250929-v1:0", None,
         "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "aws"),
        ("azure.ai.inference", "gpt-4o", None, "gpt-4o", "azure"),
        ("azure.ai.openai", "gpt-4o", None, "gpt-4o", "azure"),
        # Dated snapshots.
        ("openai", "gpt-4o-2024-08-06", None, "gpt-4o", "openai"),
        ("openai", "gpt-4o-2024-11-20", None, "gpt-4o", "openai"),
        ("openai", "gpt-5-2025-08-07", None, "gpt-5", "openai"),
        ("anthropic", "claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5", "anthropic"),
        ("openai", "ft:gpt-4o-mini-2024-07-18:org::abc", None, "ft:gpt-4o-mini", "openai"),
        # Unknown provider name: the server address identifies the host.
        ("some-gateway", "llama-3.3-70b-versatile", "api.groq.com", "llama-3.3-70b-versatile", "groq"),
        (None, "gpt-4o-mini", "api.openai.com", "gpt-4o-mini", "openai"),
        # Model not listed under the given provider: retried without it.
        ("openai", "claude-sonnet-4-5", None, "claude-sonnet-4-5", "anthropic"),
        ("ibm.watsonx.ai", "gpt-4o", None, "gpt-4o", "openai"),
    ],
)
def test_normalisation(
    book: PriceBook, provider: str | None, model: str, server_address: str | None, want_model: str, want_provider: str
) -> None:
    q = book.quote(provider, model, TokenUsage(input_tokens=1_000, output_tokens=1_000), server_address=server_address)
    assert (q.model, q.provider, q.source) == (want_model, want_provider, GP_SOURCE)
    assert q.nanos > 0


def test_prefixed_and_plain_names_cost_the_same(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=12_345, output_tokens=678)
    plain = book.quote("openai", "gpt-4o", u).nanos
    assert book.quote(None, "openai/gpt-4o", u).nanos == plain
    assert book.quote("openai", "gpt-4o-2024-08-06", u).nanos == plain
    assert book.quote("gcp.gen_ai", "models/gemini-2.5-pro", u).nanos == book.quote(
        "google", "gemini-2.5-pro", u
    ).nanos


def test_azure_deployment_alias(book: PriceBook) -> None:
    q = book.quote("azure.ai.openai", "my-gpt4o-deployment", TokenUsage(input_tokens=M, output_tokens=M),
                   server_address="myres.openai.azure.com")
    assert (q.nanos, q.model, q.provider) == (12_500_000_000, "gpt-4o", "azure")
    scoped = PriceBook(aliases={"azure.ai.openai/prod": "gpt-4o-mini"})
    assert scoped.quote("azure.ai.openai", "prod", TokenUsage(input_tokens=M)).nanos == 150_000_000
    with pytest.raises(UnknownModelError):
        scoped.quote("openai", "prod", TokenUsage(input_tokens=M))  # alias is scoped to Azure


# --------------------------------------------------------------------------- unknown models


def test_unknown_model_blocks_with_a_helpful_message(book: PriceBook) -> None:
    for _ in range(2):  # the second raise comes from the negative cache
        with pytest.raises(UnknownModelError) as ei:
            book.quote("openai", "my-private-model-xyz", TokenUsage(input_tokens=10))
        err = ei.value
        assert isinstance(err, LookupError)
        assert (err.model, err.provider) == ("my-private-model-xyz", "openai")
        msg = str(err)
        assert "my-private-model-xyz" in msg and "openai" in msg
        assert "PriceBook(overrides={'my-private-model-xyz': ModelPrice(input=..., output=...)})" in msg
        assert 'unknown_model="price_as:<model>"' in msg


def test_unknown_model_price_as() -> None:
    b = PriceBook(unknown_model="price_as:gpt-4o")
    u = TokenUsage(input_tokens=M, output_tokens=M)
    q = b.quote("vllm", "my-finetune", u)
    assert q == PriceQuote(12_500_000_000, "price_as:gpt-4o", "gpt-4o", "openai", True)
    # Known models still get their own price.
    assert b.quote("openai", "gpt-4o-mini", u).source == GP_SOURCE
    with pytest.raises(ValueError, match="no-such-model-abc"):
        PriceBook(unknown_model="price_as:no-such-model-abc")


def test_unknown_model_default_price() -> None:
    b = PriceBook(unknown_model=ModelPrice(input=5, output=25))
    q = b.quote("ollama", "llama3.1:8b", TokenUsage(input_tokens=M, output_tokens=M))
    assert (q.nanos, q.source, q.model, q.provider) == (30 * USD, "default", "llama3.1:8b", "ollama")
    m = PriceBook(unknown_model={"input": "1", "output": "2"})
    assert m.quote(None, "whatever", TokenUsage(input_tokens=M, output_tokens=M)).nanos == 3 * USD


@pytest.mark.parametrize("policy", ["block", "price_as:gpt-4o-mini", ModelPrice(input=1, output=1)])
@pytest.mark.parametrize("model", ["unknown-model-xyz", "", "   "])
def test_unknown_models_are_never_free(policy: object, model: str) -> None:
    b = PriceBook(unknown_model=policy)  # type: ignore[arg-type]
    try:
        q = b.quote("openai", model, TokenUsage(input_tokens=1_000, output_tokens=1_000))
    except UnknownModelError:
        assert policy == "block"
    else:
        assert q.nanos > 0 and q.source != GP_SOURCE


def test_without_genai_prices_only_overrides_price() -> None:
    b = PriceBook(use_genai_prices=False, overrides={"gpt-4o": ModelPrice(input=1, output=1)})
    assert b.quote("openai", "gpt-4o", TokenUsage(input_tokens=M)).nanos == USD
    with pytest.raises(UnknownModelError):
        b.quote("openai", "gpt-4o-mini", TokenUsage(input_tokens=M))


@pytest.mark.parametrize("policy", ["allow", "price_as:", "price_as", 3, None])
def test_bad_unknown_model_policy(policy: object) -> None:
    with pytest.raises(ValueError):
        PriceBook(unknown_model=policy)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- overrides


def test_override_wins_over_genai_prices() -> None:
    b = PriceBook(overrides={"gpt-4o": ModelPrice(input=1, output=2)})
    q = b.quote("openai", "gpt-4o", TokenUsage(input_tokens=M, output_tokens=M))
    assert (q.nanos, q.source, q.model, q.provider) == (3 * USD, "override", "gpt-4o", "openai")
    # Other models are untouched.
    assert b.quote("openai", "gpt-4o-mini", TokenUsage(input_tokens=M)).source == GP_SOURCE


def test_override_globs_and_provider_keys() -> None:
    b = PriceBook(
        overrides={
            "ft:gpt-4o*": ModelPrice(input="3.75", output=15),
            "ollama/*": {"input": 0.5, "output": 0.5},
            "azure.ai.openai/gpt-4o": ModelPrice(input=10, output=10),
            "gpt-4o-mini": ModelPrice(input=9, output=9),
            "gpt-4o-m*": ModelPrice(input=7, output=7),
        }
    )
    u = TokenUsage(input_tokens=M)
    q = b.quote("openai", "ft:gpt-4o-mini-2024-07-18:org::abc", u)  # genai-prices knows it too
    assert (q.nanos, q.source) == (3_750_000_000, "override")
    assert b.quote("ollama", "llama3.1:8b", u).nanos == 500_000_000
    local = b.quote(None, "ollama/llama3.1:8b", u)
    assert (local.nanos, local.model, local.provider) == (500_000_000, "llama3.1:8b", "ollama")
    assert b.quote("azure.ai.openai", "gpt-4o", u).nanos == 10 * USD
    assert b.quote("openai", "gpt-4o", u).source == GP_SOURCE  # provider-scoped key
    assert b.quote("openai", "gpt-4o-mini", u).nanos == 9 * USD  # exact beats glob
    assert b.quote("openai", "GPT-4o-Mini", u).nanos == 9 * USD  # case-insensitive


def test_override_defaults_and_per_call() -> None:
    b = PriceBook(overrides={"m": ModelPrice(input=2, output=4, per_call_usd="0.001"),
                             "c": ModelPrice(input=2, output=4, cache_read=0.2, cache_write=2.5)})
    # cache_read/cache_write default to the input rate.
    u = TokenUsage(input_tokens=M, cache_read_tokens=M // 2, cache_write_tokens=M // 4, output_tokens=M)
    assert b.quote(None, "m", u).nanos == (2 + 4 + 0.001) * USD
    c = b.quote(None, "c", u).nanos
    assert c == (M // 4 * 2 + M // 2 * Decimal("0.2") + M // 4 * Decimal("2.5") + M * 4) * 1_000


@pytest.mark.parametrize(
    "bad",
    [
        {"input": float("nan"), "output": 1},
        {"input": float("inf"), "output": 1},
        {"input": -1, "output": 1},
        {"input": True, "output": 1},
        {"input": "abc", "output": 1},
        {"input": None, "output": 1},
        {"input": [1], "output": 1},
        {"input": 1, "output": 1, "cache_read": Decimal("NaN")},
        {"input": 1, "output": 1, "cache_write": -0.5},
        {"input": 1, "output": 1, "per_call_usd": "-1"},
        {"input": 1, "output": 1, "reasoning": 1},  # unknown field
        {"input": 1},  # missing output
    ],
)
def test_bad_override_values_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PriceBook(overrides={"m": bad})


def test_bad_model_price_is_rejected_directly() -> None:
    with pytest.raises(ValueError, match="input"):
        ModelPrice(input=float("nan"), output=1)
    with pytest.raises(ValueError, match="output"):
        ModelPrice(input=1, output=False)
    with pytest.raises(ValueError):
        PriceBook(overrides={"": ModelPrice(input=1, output=1)})
    with pytest.raises(ValueError):
        PriceBook(overrides={"m": 5})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        PriceBook(aliases={"a": ""})


@pytest.mark.parametrize("field_name", list(TokenUsage.__slots__))
@pytest.mark.parametrize("bad", [-1, True, 1.5, "10", None])
def test_token_usage_validation(field_name: str, bad: object) -> None:
    with pytest.raises(ValueError):
        TokenUsage(**{field_name: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("field_name", list(TokenUsage.__slots__))
def test_token_usage_takes_int_subclasses_and_big_counts(field_name: str) -> None:
    class Count(int):
        pass

    assert getattr(TokenUsage(**{field_name: Count(5)}), field_name) == 5
    assert getattr(TokenUsage(**{field_name: 2**70}), field_name) == 2**70
    with pytest.raises(ValueError):
        TokenUsage(**{field_name: Count(-1)})
    with pytest.raises(ValueError):  # one bad field among good ones
        TokenUsage(**{name: (-3 if name == field_name else 4) for name in TokenUsage.__slots__})


# --------------------------------------------------------------------------- tiers, variants, time


def test_long_context_tier_cliff(book: PriceBook) -> None:
    assert book.quote("anthropic", "claude-sonnet-4-5", TokenUsage(input_tokens=200_000)).nanos == 600_000_000
    # Above 200k input the whole input is billed at $6/MTok (and output at $22.50).
    assert book.quote("anthropic", "claude-sonnet-4-5", TokenUsage(input_tokens=200_001)).nanos == 200_001 * 6_000
    assert book.quote(
        "anthropic", "claude-sonnet-4-5", TokenUsage(input_tokens=200_001, output_tokens=1_000)
    ).nanos == 200_001 * 6_000 + 1_000 * 22_500
    # The threshold counts total input, cache reads included (cache reads then $0.60).
    u = TokenUsage(input_tokens=250_000, cache_read_tokens=200_000)
    assert book.quote("anthropic", "claude-sonnet-4-5", u).nanos == 50_000 * 6_000 + 200_000 * 600
    gp = calc_price(Usage(input_tokens=250_000, cache_read_tokens=200_000), "claude-sonnet-4-5",
                    provider_id="anthropic")
    assert usd_to_nanos(gp.total_price) == 50_000 * 6_000 + 200_000 * 600


def test_batch_halves_gpt_5(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=M, output_tokens=M)
    std = book.quote("openai", "gpt-5", u, timestamp=AFTER_VARIANTS)
    bat = book.quote("openai", "gpt-5", u, batch=True, timestamp=AFTER_VARIANTS)
    assert std.nanos == 11_250_000_000  # $1.25 + $10
    assert bat.nanos == 5_625_000_000  # $0.625 + $5
    assert bat.variant_matched and std.variant_matched
    flex = book.quote("openai", "gpt-5", u, service_tier="flex", timestamp=AFTER_VARIANTS)
    prio = book.quote("openai", "gpt-5", u, service_tier="priority", timestamp=AFTER_VARIANTS)
    assert (flex.nanos, flex.variant_matched) == (5_625_000_000, True)
    assert (prio.nanos, prio.variant_matched) == (22_500_000_000, True)  # $2.50 + $20
    assert book.quote("openai", "gpt-5", u, service_tier="default", timestamp=AFTER_VARIANTS) == std
    # Claude: batch halves every rate, tiers included; "batch" as Anthropic's service_tier too.
    c = TokenUsage(input_tokens=300_000, output_tokens=1_000)
    full = book.quote("anthropic", "claude-sonnet-4-5", c, timestamp=AFTER_VARIANTS).nanos
    half = book.quote("anthropic", "claude-sonnet-4-5", c, batch=True, timestamp=AFTER_VARIANTS).nanos
    assert half * 2 == full
    assert book.quote("anthropic", "claude-sonnet-4-5", c, service_tier="batch", timestamp=AFTER_VARIANTS).nanos == half


def test_variant_not_yet_active_is_reported_unmatched(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=M, output_tokens=M)
    q = book.quote("openai", "gpt-5", u, batch=True, timestamp=BEFORE_VARIANTS)
    assert (q.nanos, q.variant_matched) == (11_250_000_000, False)
    # Same book, later date: the time window is re-evaluated.
    assert book.quote("openai", "gpt-5", u, batch=True, timestamp=AFTER_VARIANTS).variant_matched


def test_unmatched_priority_is_not_undercharged(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=M, output_tokens=M)
    std = book.quote("gcp.gemini", "gemini-2.5-flash", u, timestamp=AFTER_VARIANTS)
    prio = book.quote("gcp.gemini", "gemini-2.5-flash", u, service_tier="priority", timestamp=AFTER_VARIANTS)
    assert std.variant_matched
    assert (prio.nanos, prio.variant_matched) == (2 * std.nanos, False)
    # genai-prices alone silently returns the standard price here.
    gp = calc_price(Usage(input_tokens=M, output_tokens=M), "gemini-2.5-flash", provider_id="google",
                    genai_request_timestamp=AFTER_VARIANTS, price_context={"service_tier": "priority"})
    assert usd_to_nanos(gp.total_price) == std.nanos
    # Unmatched discounts fall back to the (higher) standard price, flagged.
    flex = book.quote("gcp.gemini", "gemini-2.5-flash", u, service_tier="flex", timestamp=AFTER_VARIANTS)
    assert (flex.nanos, flex.variant_matched) == (std.nanos, False)
    # Overrides have no variants: same rules.
    ob = PriceBook(overrides={"m": ModelPrice(input=1, output=1)})
    o = ob.quote(None, "m", u, service_tier="priority")
    assert (o.nanos, o.variant_matched) == (4 * USD, False)
    assert ob.quote(None, "m", u, batch=True) == PriceQuote(2 * USD, "override", "m", None, False)


def test_fallback_provider_variants_are_unmatched(book: PriceBook) -> None:
    # Azure borrows OpenAI's gpt-4o price; genai-prices ignores variants then, so do we.
    u = TokenUsage(input_tokens=M, output_tokens=M)
    q = book.quote("azure.ai.openai", "gpt-4o", u, batch=True, timestamp=AFTER_VARIANTS)
    assert (q.nanos, q.variant_matched) == (12_500_000_000, False)


def test_time_of_day_prices(book: PriceBook) -> None:
    # DeepSeek off-peak (16:30-00:30 UTC) is half price; alternate to exercise plan windows.
    u = TokenUsage(input_tokens=M)
    for _ in range(2):
        peak = book.quote("deepseek", "deepseek-chat", u, timestamp=datetime(2026, 11, 22, 3, 0, tzinfo=UTC))
        off = book.quote("deepseek", "deepseek-chat", u, timestamp=datetime(2026, 11, 22, 17, 0, tzinfo=UTC))
        naive = book.quote("deepseek", "deepseek-chat", u, timestamp=datetime(2026, 11, 22, 17, 0))  # UTC
        assert (peak.nanos, off.nanos, naive.nanos) == (270_000_000, 135_000_000, 135_000_000)


def test_memoised_quotes_follow_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-plan quote memo never serves a price past its window: the same counts quoted
    at peak, then (the clock moved, no timestamp given) off-peak, then peak again."""
    book = PriceBook()
    u = TokenUsage(input_tokens=M)
    clock = [datetime(2026, 11, 22, 3, 0, tzinfo=UTC).timestamp()]
    monkeypatch.setattr(pricing.time, "time", lambda: clock[0])
    seen = []
    for hour in (3, 3, 17, 17, 3):
        clock[0] = datetime(2026, 11, 22, hour, 0, tzinfo=UTC).timestamp()
        seen.append(book.quote("deepseek", "deepseek-chat", u).nanos)
    assert seen == [270_000_000, 270_000_000, 135_000_000, 135_000_000, 270_000_000]
    # A repeated quote is the memoised one; other counts are priced afresh.
    assert book.quote("deepseek", "deepseek-chat", u) is book.quote("deepseek", "deepseek-chat", u)
    assert book.quote("deepseek", "deepseek-chat", TokenUsage(input_tokens=2 * M)).nanos == 540_000_000


def test_quote_memo_is_bounded() -> None:
    book = PriceBook()
    for n in range(3 * pricing._MEMO_SIZE):
        assert book.quote("openai", "gpt-4o-mini", TokenUsage(input_tokens=n)).nanos == 150 * n
    assert all(len(plan.memo) <= pricing._MEMO_SIZE for plan in book._plans.values())


def test_fast_path_matches_genai_prices_on_a_sample() -> None:
    """Our integer coefficients against genai-prices' own Decimal calculation."""
    rnd = random.Random(7)
    b = PriceBook(cache_size=10_000)
    snapshot = data_snapshot.get_snapshot()
    models = [(p, m) for p in snapshot.providers if p.id in {"openai", "anthropic", "google", "mistral", "deepseek", "perplexity", "x-ai"} for m in p.models]
    checked = 0
    for provider, info in rnd.sample(models, 80):
        for ctx in ({}, {"processing": "batch"}):
            i = rnd.choice([0, 1, 999, 150_000, 200_001, 300_000, 2_000_000])
            cr = rnd.randint(0, i // 2)
            cw = rnd.randint(0, i - cr) if provider.id == "anthropic" else 0
            o = rnd.choice([0, 7, 5_000])
            r = rnd.randint(0, o)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    want = info.calc_price(
                        Usage(input_tokens=i, cache_read_tokens=cr, cache_write_tokens=cw, output_tokens=o,
                              output_reasoning_tokens=r),
                        provider, genai_request_timestamp=AFTER_VARIANTS, price_context=ctx or None,
                    ).total_price
                except ValueError:
                    continue
            variant = pricing._variant(None, bool(ctx))
            plan = b._genai_plan((provider, info), variant, "t", AFTER_VARIANTS.timestamp())
            assert plan.fallback is None
            assert pricing._compute(plan, i, cr, cw, o, r) == usd_to_nanos(want), (provider.id, info.id, ctx)
            checked += 1
    assert checked > 100


def test_fallback_to_genai_prices_own_calculation(monkeypatch: pytest.MonkeyPatch, caplog) -> None:  # type: ignore[no-untyped-def]
    # A price shape our integer path does not model is computed by genai-prices itself.
    monkeypatch.setattr(price_plans, "_linearise", lambda gp, mp: None)
    b = PriceBook()
    u = TokenUsage(input_tokens=250_000, cache_read_tokens=100_000, output_tokens=1_000)
    with caplog.at_level("WARNING", logger="otel_budget.pricing"):
        q = b.quote("anthropic", "claude-sonnet-4-5", u)
    assert "genai-prices' own calculation" in caplog.text
    gp = calc_price(Usage(input_tokens=250_000, cache_read_tokens=100_000, output_tokens=1_000),
                    "claude-sonnet-4-5", provider_id="anthropic")
    assert q.nanos == usd_to_nanos(gp.total_price)
    prio = b.quote("gcp.gemini", "gemini-2.5-flash", u, service_tier="priority", timestamp=AFTER_VARIANTS)
    std = b.quote("gcp.gemini", "gemini-2.5-flash", u, timestamp=AFTER_VARIANTS)
    assert (prio.nanos, prio.variant_matched) == (2 * std.nanos, False)


def test_module_docstring_example() -> None:
    import doctest

    assert doctest.testmod(pricing).failed == 0


# --------------------------------------------------------------------------- caches


@pytest.fixture
def genai_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count every call into genai-prices' lookup and price calculation."""
    calls: list[str] = []

    def counting(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    counting(data_snapshot.DataSnapshot, "find_provider_model")
    counting(data_snapshot.DataSnapshot, "find_provider")
    counting(data_snapshot.DataSnapshot, "calc")
    counting(gp_types.ModelInfo, "get_prices")
    counting(gp_types.ModelInfo, "calc_price")
    counting(gp_types.ModelPrice, "calc_price")
    counting(gp_types.Provider, "find_model")
    return calls


def test_second_quote_does_not_call_genai_prices(genai_calls: list[str]) -> None:
    b = PriceBook()
    u = TokenUsage(input_tokens=1_234, output_tokens=56)
    first = b.quote("anthropic", "claude-sonnet-4-5-20250929", u)
    assert genai_calls, "the first quote resolves through genai-prices"
    genai_calls.clear()
    for n in range(50):
        assert b.quote("anthropic", "claude-sonnet-4-5-20250929", u) == first
        b.quote("anthropic", "claude-sonnet-4-5-20250929", TokenUsage(input_tokens=250_000 + n))  # tier band
    assert genai_calls == []


def test_negative_cache(genai_calls: list[str]) -> None:
    b = PriceBook()
    with pytest.raises(UnknownModelError):
        b.quote("openrouter", "nobody/unknown-model-xyz", TokenUsage(input_tokens=1))
    assert genai_calls
    genai_calls.clear()
    for _ in range(20):
        with pytest.raises(UnknownModelError):
            b.quote("openrouter", "nobody/unknown-model-xyz", TokenUsage(input_tokens=1))
    assert genai_calls == []


def test_cache_is_bounded() -> None:
    b = PriceBook(cache_size=3, unknown_model=ModelPrice(input=1, output=1))
    for n in range(20):
        b.quote("openai", f"model-{n}", TokenUsage(input_tokens=1))
    b.quote("openai", "gpt-4o", TokenUsage(input_tokens=1))
    assert len(b._plans) <= 3
    with pytest.raises(ValueError):
        PriceBook(cache_size=0)


def test_swapped_genai_prices_data_invalidates_the_cache() -> None:
    b = PriceBook()
    u = TokenUsage(input_tokens=M)
    assert b.quote("openai", "gpt-4o", u).nanos == 2_500_000_000
    custom = data_snapshot.DataSnapshot(
        providers=[
            gp_types.Provider(
                id="openai",
                name="OpenAI",
                api_pattern=r"https://api\.openai\.com",
                models=[
                    gp_types.ModelInfo(
                        id="gpt-4o",
                        match=gp_types.ClauseEquals(equals="gpt-4o"),
                        prices=gp_types.ModelPrice(input_mtok=Decimal(5), output_mtok=Decimal(20)),
                    )
                ],
            )
        ],
        from_auto_update=False,
    )
    data_snapshot.set_custom_snapshot(custom)
    try:
        assert b.quote("openai", "gpt-4o", u).nanos == 5 * USD
    finally:
        data_snapshot.set_custom_snapshot(None)
    assert b.quote("openai", "gpt-4o", u).nanos == 2_500_000_000


# --------------------------------------------------------------------------- threads, network


def test_thread_safety() -> None:
    cases = [
        ("openai", "gpt-4o", {}),
        ("anthropic", "claude-sonnet-4-5", {}),
        ("openai", "gpt-5", {"batch": True, "timestamp": AFTER_VARIANTS}),
        ("gcp.gen_ai", "models/gemini-2.5-pro", {}),
        ("ollama", "llama3", {}),
        ("openai", "unknown-xyz", {}),
    ]
    usages = [TokenUsage(input_tokens=n * 1_000, cache_read_tokens=n * 100, output_tokens=n * 10) for n in range(1, 300, 7)]
    reference = PriceBook(overrides={"ollama/*": ModelPrice(input=1, output=2)})

    def expected(p: str, m: str, kw: dict, u: TokenUsage) -> object:
        try:
            return reference.quote(p, m, u, **kw)
        except UnknownModelError as e:
            return type(e)

    want = {(c, u): expected(*cases[c], u) for c in range(len(cases)) for u in usages}
    # A tiny cache forces evictions and re-resolution while other threads read.
    shared = PriceBook(overrides={"ollama/*": ModelPrice(input=1, output=2)}, cache_size=2)
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            barrier.wait()
            for _ in range(400):
                c = rnd.randrange(len(cases))
                u = rnd.choice(usages)
                p, m, kw = cases[c]
                try:
                    got: object = shared.quote(p, m, u, **kw)
                except UnknownModelError as e:
                    got = type(e)
                assert got == want[(c, u)], (cases[c], u, got)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("pricing must never touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(genai_prices.UpdatePrices, "start", no_network)
    b = PriceBook(unknown_model="price_as:gpt-4o-mini")
    for provider, model in [("openai", "gpt-4o"), ("azure.ai.openai", "x"), (None, "new-model"),
                            ("openrouter", "a/b"), (None, "gemini-2.5-pro")]:
        b.quote(provider, model, TokenUsage(input_tokens=10), server_address="example.invalid")


# --------------------------------------------------------------------------- tools


def test_tool_costs() -> None:
    def per_result(result: object) -> float:
        return 0.001 * len(result)  # type: ignore[arg-type]

    def broken(result: object) -> float:
        raise RuntimeError("boom")

    b = PriceBook(
        tools={
            "web_search": 0.01,
            "geocode": "$0.005",
            "pages": per_result,
            "broken": broken,
            "nan": lambda r: float("nan"),
            "negative": lambda r: -1,
            "none": lambda r: None,
            "boolean": lambda r: True,
            "mcp.*": Decimal("0.002"),
        }
    )
    assert b.tool_cost_nanos("web_search") == 10_000_000
    assert b.tool_cost_nanos("geocode", {"anything": 1}) == 5_000_000
    assert b.tool_cost_nanos("pages", [1, 2, 3]) == 3_000_000
    assert b.tool_cost_nanos("mcp.github.search") == 2_000_000
    assert b.tool_cost_nanos("calculator") is None
    with pytest.raises(ValueError, match=r"broken.*RuntimeError: boom"):
        b.tool_cost_nanos("broken")
    for name in ("nan", "negative", "none", "boolean"):
        with pytest.raises(ValueError, match=name):
            b.tool_cost_nanos(name)
    for bad in (float("nan"), -0.01, True, "free", None):
        with pytest.raises(ValueError):
            PriceBook(tools={"t": bad})  # type: ignore[dict-item]


# --------------------------------------------------------------------------- from_file


def test_from_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "_comment": "USD per million tokens",
                "models": {
                    "ollama/*": {"input": 0.1, "output": 0.2},
                    "gpt-4o": {"input": "3", "output": "12", "cache_read": 1.5},
                },
                "aliases": {"my-gpt4o-deployment": "gpt-4o-mini"},
                "tools": {"web_search": 0.01},
                "unknown_model": {"input": 10, "output": 30},
            }
        )
    )
    b = PriceBook.from_file(path)
    u = TokenUsage(input_tokens=M, output_tokens=M)
    assert b.quote("ollama", "llama3", u).nanos == 300_000_000
    assert b.quote("openai", "gpt-4o", u) == PriceQuote(15 * USD, "override", "gpt-4o", "openai")
    assert b.quote("azure.ai.openai", "my-gpt4o-deployment", u).model == "gpt-4o-mini"
    assert b.quote(None, "mystery", u) == PriceQuote(40 * USD, "default", "mystery", None)
    assert b.tool_cost_nanos("web_search") == 10_000_000

    price_as = tmp_path / "price_as.json"
    price_as.write_text('{"unknown_model": "price_as:gpt-4o"}')
    assert PriceBook.from_file(str(price_as)).quote(None, "mystery", u).source == "price_as:gpt-4o"


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"modles": {}}',
        '{"models": {"m": {"input": -1, "output": 1}}}',
        '{"models": {"m": {"input": 1}}}',
        '{"models": []}',
        '{"tools": {"t": "free"}}',
        '{"unknown_model": "allow"}',
        '{"use_genai_prices": "yes"}',
    ],
)
def test_from_file_rejects_bad_tables(tmp_path, content: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        PriceBook.from_file(path)


def test_nan_never_leaks_into_quotes(book: PriceBook) -> None:
    q = book.quote("openai", "gpt-4o", TokenUsage(input_tokens=10**9, output_tokens=10**9))
    assert isinstance(q.nanos, int) and q.nanos == 12_500 * USD
    assert not math.isnan(q.usd)


# --------------------------------------------------------------------------- audio


def test_audio_output_is_priced_at_the_audio_rate(book: PriceBook) -> None:
    # OpenAI bills gpt-4o-audio-preview $2.50/$10 text, $40/$80 audio per MTok; genai-prices
    # 0.2.3 lists the text rates only (audio priced as text: 8x under for audio output).
    text = book.quote("openai", "gpt-4o-audio-preview", TokenUsage(output_tokens=1_000))
    audio = book.quote("openai", "gpt-4o-audio-preview", TokenUsage(output_tokens=1_000, output_audio_tokens=1_000))
    assert (text.nanos, audio.nanos) == (10_000_000, 80_000_000)
    mini = TokenUsage(input_tokens=1_000, input_audio_tokens=400, output_tokens=1_000, output_audio_tokens=700)
    # 600 x $0.15 + 400 x $10 + 300 x $0.60 + 700 x $20 per MTok
    assert book.quote("openai", "gpt-4o-mini-audio-preview-2024-12-17", mini).nanos == 90_000 + 4_000_000 + 180_000 + 14_000_000
    # The first snapshots cost $100/$200.
    first = book.quote("openai", "gpt-4o-audio-preview-2024-10-01", TokenUsage(output_tokens=10, output_audio_tokens=10))
    assert first.nanos == 2_000_000
    rt = book.quote("openai", "gpt-4o-realtime-preview-2024-10-01", TokenUsage(input_tokens=10, input_audio_tokens=10))
    assert rt.nanos == 1_000_000
    # Azure borrows OpenAI's entry: the same audio rates.
    az = book.quote("azure.ai.openai", "gpt-4o-audio-preview", TokenUsage(output_tokens=1_000, output_audio_tokens=1_000))
    assert az.nanos == 80_000_000


def test_audio_rates_genai_prices_has_are_used_as_is(book: PriceBook) -> None:
    u = TokenUsage(input_tokens=2_000, input_audio_tokens=1_000, output_tokens=500, output_audio_tokens=500)
    for model in ("gpt-audio", "gpt-realtime", "gpt-4o-mini-realtime-preview"):
        gp = calc_price(Usage(input_tokens=2_000, input_audio_tokens=1_000, output_tokens=500, output_audio_tokens=500),
                        model, provider_id="openai")
        assert book.quote("openai", model, u).nanos == usd_to_nanos(gp.total_price)
    # gpt-audio: 1k x $2.50 + 1k x $32 + 500 x $64 per MTok
    assert book.quote("openai", "gpt-audio", u).nanos == 2_500_000 + 32_000_000 + 32_000_000


def test_audio_counts_larger_than_the_totals_are_not_undercharged(book: PriceBook) -> None:
    # Audio is part of input/output; a reader that reports it beside the totals must not make
    # the text part negative (cheaper than the audio alone).
    alone = book.quote("openai", "gpt-audio", TokenUsage(input_audio_tokens=1_000, output_audio_tokens=1_000))
    assert alone.nanos == 32_000_000 + 64_000_000
    mixed = book.quote(
        "openai", "gpt-realtime",
        TokenUsage(input_tokens=1_000, cache_read_tokens=800, input_audio_tokens=600, output_tokens=10,
                   reasoning_tokens=10, output_audio_tokens=10),
    )  # fmt: skip
    # input raised to 800 + 600: 800 x $0.40 + 600 x $32; output raised to 20: 10 x $16 + 10 x $64
    assert mixed.nanos == 320_000 + 19_200_000 + 160_000 + 640_000


def test_audio_rates_of_user_prices() -> None:
    b = PriceBook(overrides={"a": ModelPrice(input=1, output=2, input_audio=10, output_audio=20),
                             "t": {"input": 1, "output": 2}})
    u = TokenUsage(input_tokens=M, input_audio_tokens=M // 2, output_tokens=M, output_audio_tokens=M // 4)
    assert b.quote(None, "a", u).nanos == (Decimal("0.5") + 5 + Decimal("1.5") + 5) * USD
    # Without audio rates, audio costs what text costs (like the cache rates default to input).
    assert b.quote(None, "t", u).nanos == 3 * USD
    with pytest.raises(ValueError):
        ModelPrice(input=1, output=1, output_audio=float("nan"))
    assert PriceBook(overrides={"x": {"input": 1, "output": 1, "input_audio": "2.5"}}).quote(
        None, "x", TokenUsage(input_tokens=M, input_audio_tokens=M)
    ).nanos == Decimal("2.5") * USD


def test_audio_rates_from_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"voice-*": {"input": 1, "output": 2, "output_audio": 40}}}))
    b = PriceBook.from_file(path)
    assert b.quote(None, "voice-1", TokenUsage(output_tokens=M, output_audio_tokens=M)).nanos == 40 * USD


def test_fast_path_matches_genai_prices_with_audio() -> None:
    """Our integer coefficients against genai-prices' own calculation, audio counts included,
    on every model that has an audio rate (and the audio previews we add rates to)."""
    rnd = random.Random(11)
    b = PriceBook(cache_size=10_000)
    snapshot = data_snapshot.get_snapshot()
    checked = 0
    for provider in snapshot.providers:
        for info in provider.models:
            mp = pricing._with_audio_rates(info.get_prices(AFTER_VARIANTS, None), info.id, info.id)
            if getattr(mp, "input_audio_mtok", None) is None and getattr(mp, "output_audio_mtok", None) is None:
                continue
            plan = b._genai_plan((provider, info), pricing._variant(None, False), "t", AFTER_VARIANTS.timestamp(), info.id)
            assert plan.fallback is None, (provider.id, info.id)
            for _ in range(4):
                i = rnd.choice([0, 1, 999, 150_000, 200_001, 300_000])
                cr = rnd.randint(0, i // 3)
                ia = rnd.randint(0, i - cr)
                o = rnd.choice([0, 7, 5_000])
                r = rnd.randint(0, o)
                oa = rnd.randint(0, o - r)
                want = mp.calc_price(pricing._gp_usage(pricing._genai(), i, cr, 0, o, r, ia, oa))["total_price"]
                assert pricing._compute(plan, i, cr, 0, o, r, ia, oa) == usd_to_nanos(want), (provider.id, info.id)
                checked += 1
    assert checked >= 80  # 23 models in genai-prices 0.2.3


# --------------------------------------------------------------------------- nesting depth


@pytest.mark.parametrize("depth", [40, 100_000])
@pytest.mark.parametrize("where", ["models", "_comment"])
def test_deeply_nested_price_file_is_a_clear_value_error(tmp_path, depth: int, where: str) -> None:  # type: ignore[no-untyped-def]
    # 100,000 levels made json raise RecursionError out of instrument(); 40 levels under a
    # comment key loaded, to fail later wherever the value is printed.
    path = tmp_path / "deep.json"
    path.write_text('{"' + where + '": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        PriceBook.from_file(path)


def test_deeply_nested_prices_file_from_env_is_a_value_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from otel_budget.config import settings_from_env

    path = tmp_path / "deep.json"
    path.write_text('{"models": {"m": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}}")
    with pytest.raises(ValueError, match="nested too deeply"):
        settings_from_env({"OTEL_BUDGET_PRICES_FILE": str(path)})


def test_a_normal_table_is_well_within_the_depth_bound(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from otel_budget.price_files import MAX_DEPTH

    path = tmp_path / "ok.json"
    path.write_text('{"models": {"m": {"input": 1, "output": 2}}, "_note": [[["fine"]]]}')
    assert PriceBook.from_file(path).quote(None, "m", TokenUsage(input_tokens=10**6)).nanos == 10**9
    assert MAX_DEPTH >= 8
