"""The cost of an LLM call, from provider + model + token usage, in integer nano-USD.

    >>> from otel_budget.pricing import ModelPrice, PriceBook, TokenUsage
    >>> book = PriceBook(
    ...     overrides={"ollama/*": ModelPrice(input=0, output=0),          # local, free on purpose
    ...                "ft:gpt-4o*": ModelPrice(input="3.75", output=15)},  # USD per million tokens
    ...     aliases={"my-gpt4o-deployment": "gpt-4o"},                     # Azure deployment names
    ...     unknown_model="block",                                          # never price as free
    ... )
    >>> q = book.quote("openai", "gpt-4o-2024-08-06", TokenUsage(input_tokens=1_000, output_tokens=100))
    >>> q.nanos, q.source.startswith("genai-prices"), q.model
    (3500000, True, 'gpt-4o')
    >>> book.quote("azure.ai.openai", "my-gpt4o-deployment", TokenUsage(input_tokens=1_000)).nanos
    2500000

Prices come from ``genai-prices`` (bundled data, never its network updater) behind a thin layer:

1. **Overrides** (user table, ``"model"`` or ``"provider/model"`` keys, fnmatch globs) win.
2. **genai-prices**, after normalisation it does not do itself: OTel ``gen_ai.provider.name``
   values (``gcp.gen_ai``, ``azure.ai.openai``, ``x_ai`` ...) mapped to its provider ids;
   ``provider/`` prefixes (LiteLLM style), ``models/`` and ``publishers/*/models/`` (Google)
   stripped; ``server.address`` used to identify the host that bills; the provider dropped
   when the model is not listed under it.
3. The **unknown-model policy**: ``"block"`` (raise :class:`UnknownModelError`),
   ``"price_as:<model>"`` or a default :class:`ModelPrice`. An unknown model is never free.

Each (provider, model, server address, variant) is resolved once into a :class:`_Plan`: integer
per-token coefficients (one set per long-context tier band) checked against genai-prices' own
calculation, valid for a time window (some prices change by date or time of day). A cached quote
is a dict lookup and eight integer multiplications; misses are cached too. Audio tokens
(``TokenUsage.input_audio_tokens`` / ``output_audio_tokens``) pay the audio rates, with the
rates OpenAI bills for the gpt-4o(-mini) audio previews added where genai-prices lacks them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from .money import parse_usd, to_usd, usd_to_nanos

__all__ = [
    "ModelPrice",
    "PriceBook",
    "PriceQuote",
    "TokenUsage",
    "UnknownModelError",
]

_log = logging.getLogger(__name__)
_UTC = timezone.utc
_INF = math.inf

Number = int | float | Decimal | str


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one LLM call, following the OTel GenAI semantic conventions.

    ``input_tokens`` is the *total* input, including cache-read and cache-write tokens;
    ``output_tokens`` includes reasoning tokens. When the numbers cannot satisfy that rule
    (``cache_read + cache_write > input`` or ``reasoning > output``), the provider reported them
    the other way (Anthropic's raw input excludes cache tokens, Gemini's output excludes thoughts)
    and :meth:`PriceBook.quote` adds them up instead of under-charging.

    ``input_audio_tokens`` / ``output_audio_tokens`` are the audio part of the input / output
    totals (OpenAI ``prompt_tokens_details.audio_tokens`` / ``completion_tokens_details
    .audio_tokens``): they are priced at the model's audio rates, the rest at the text rates.
    To project a request that asks for audio output, price every output token as audio:
    ``TokenUsage(input_tokens=n, output_tokens=cap, output_audio_tokens=cap)``.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0

    def __post_init__(self) -> None:
        for name in TokenUsage.__slots__:
            value = getattr(self, name)
            # bool is an int subclass; True tokens is a bug, not one token.
            if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"TokenUsage.{name} must be a non-negative int, got {value!r}")
            if value < 0:
                raise ValueError(f"TokenUsage.{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class ModelPrice:
    """A user price in USD per million tokens (plus an optional fixed USD cost per call).

    ``cache_read`` and ``cache_write`` default to the input rate (no discount assumed), the
    audio rates ``input_audio`` / ``output_audio`` to the text rates. Values
    may be int, float, Decimal or strings like ``"2.50"``; NaN, infinities, negatives, booleans
    and garbage raise ``ValueError``. Rates are kept as integer nano-USD per million tokens,
    rounded up.
    """

    input: Number
    output: Number
    cache_read: Number | None = None
    cache_write: Number | None = None
    per_call_usd: Number = 0
    input_audio: Number | None = None
    output_audio: Number | None = None
    # (input, output, cache_read, cache_write) nano-USD per MTok, per_call nano-USD,
    # (input_audio, output_audio) nano-USD per MTok.
    _nanos: tuple[int, int, int, int, int, int, int] = field(
        init=False, repr=False, compare=False, default=(0, 0, 0, 0, 0, 0, 0)
    )

    def __post_init__(self) -> None:
        inp = _rate_nanos(self.input, "input")
        out = _rate_nanos(self.output, "output")
        cr = inp if self.cache_read is None else _rate_nanos(self.cache_read, "cache_read")
        cw = inp if self.cache_write is None else _rate_nanos(self.cache_write, "cache_write")
        call = parse_usd(self.per_call_usd, what="ModelPrice.per_call_usd")
        ia = inp if self.input_audio is None else _rate_nanos(self.input_audio, "input_audio")
        oa = out if self.output_audio is None else _rate_nanos(self.output_audio, "output_audio")
        object.__setattr__(self, "_nanos", (inp, out, cr, cw, call, ia, oa))


@dataclass(frozen=True, slots=True)
class PriceQuote:
    """The cost of one call and where its price came from (for span attributes)."""

    nanos: int
    source: str
    model: str
    provider: str | None
    variant_matched: bool = True

    @property
    def usd(self) -> float:
        return to_usd(self.nanos)


class UnknownModelError(LookupError):
    """No price for a model under the ``"block"`` policy; the message says how to add one."""

    def __init__(self, model: str, provider: str | None = None) -> None:
        self.model = model
        self.provider = provider
        where = f" (provider {provider!r})" if provider else ""
        name = model or "<model>"
        super().__init__(
            f"No price known for model {model!r}{where}; otel-budget blocks calls it cannot price. "
            f"Add a price in USD per million tokens: "
            f"PriceBook(overrides={{{name!r}: ModelPrice(input=..., output=...)}}), "
            f"or price unknown models like a known one: "
            f'PriceBook(unknown_model="price_as:<model>").'
        )


# --------------------------------------------------------------------------- normalisation

# OTel gen_ai.provider.name values (and LiteLLM / SDK spellings) -> genai-prices provider id.
# None: a provider with no public price list (self-hosted, or missing from genai-prices).
_PROVIDER_IDS: dict[str, str | None] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "deepseek": "deepseek",
    "groq": "groq",
    "perplexity": "perplexity",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "gcp.gen_ai": "google",
    "gcp.vertex_ai": "google",
    "gcp.gemini": "google",
    "google": "google",
    "gemini": "google",
    "google_genai": "google",
    "vertex_ai": "google",
    "vertex_ai_beta": "google",
    "azure.ai.inference": "azure",
    # genai-prices would map this to plain "openai" (substring match); Azure has its own table
    # and falls back to OpenAI's prices itself.
    "azure.ai.openai": "azure",
    "az.ai.inference": "azure",
    "az.ai.openai": "azure",
    "azure": "azure",
    "azure_ai": "azure",
    "aws.bedrock": "aws",
    "bedrock": "aws",
    "bedrock_converse": "aws",
    "x_ai": "x-ai",
    "xai": "x-ai",
    "x-ai": "x-ai",
    "mistral_ai": "mistral",
    "mistral": "mistral",
    "mistralai": "mistral",
    "fireworks_ai": "fireworks",
    "fireworks": "fireworks",
    "together_ai": "together",
    "together": "together",
    "togetherai": "together",
    "moonshot": "moonshotai",
    "moonshotai": "moonshotai",
    "ibm.watsonx.ai": None,
    "watsonx": None,
    "ollama": None,
    "ollama_chat": None,
    "vllm": None,
    "hosted_vllm": None,
    "lm_studio": None,
    "llamacpp": None,
    # genai-prices splits "litellm" + "openai/gpt-4o" itself; our prefix handling does the same.
    "litellm": None,
}

# Heads of "provider/model" references that are provider names (LiteLLM style), not model
# organisations such as "meta-llama/" or "deepseek-ai/" (those are real model ids on hosts).
_PREFIXES = frozenset(_PROVIDER_IDS) | {"openai", "anthropic", "google", "aws", "azure"}

# Google SDK / Vertex forms: "models/x", "publishers/google/models/x",
# "projects/p/locations/l/publishers/google/models/x".
_GOOGLE_PREFIX = re.compile(r"^(?:projects/[^/]+/locations/[^/]+/)?(?:publishers/[^/]+/)?models/")
# Bedrock model ids and cross-region inference profiles ("us.anthropic.claude-...").
_BEDROCK_ID = re.compile(
    r"^(?:(?:us|eu|apac|au|ca|jp|us-gov|global)\.)?"
    r"(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek|openai|qwen|writer|twelvelabs)\.[^/]"
)

# service_tier values that mean "the standard price".
_STANDARD_TIERS = frozenset({"default", "standard", "auto", "on_demand", "on-demand"})
# Tiers that cost *more* than standard. When genai-prices has no variant for them it silently
# returns the standard price, which would under-charge; we charge 2x standard instead, the upper
# end of published premiums (OpenAI priority is 1.7-2x standard), so a circuit breaker errs on
# the side of stopping early rather than overspending.
_PREMIUM_TIERS = frozenset({"priority", "fast"})
_PREMIUM_FACTOR = 2


@dataclass(frozen=True, slots=True)
class _Names:
    provider: str | None  # the caller's provider, lower-cased
    pid: str | None  # genai-prices provider id, if there is one
    model: str  # lower-cased, alias applied, Google prefixes stripped
    stripped: str  # ``model`` without a "provider/" prefix
    prefix: str | None  # that prefix ("openai", "ollama" ...), if any
    prefix_pid: str | None  # genai-prices provider id named by that prefix
    subjects: tuple[str, ...]  # strings override keys are matched against, in order


@dataclass(frozen=True, slots=True)
class _Variant:
    ctx: dict[str, str] | None  # genai-prices price_context
    wanted: tuple[tuple[str, str], ...]  # non-standard (key, value) pairs that must match
    premium: bool  # a premium tier was requested


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything a cached quote needs. Immutable; replaced as a whole when it expires."""

    source: str
    model: str
    provider: str | None
    variant_matched: bool
    # (input, cache_read, cache_write, output, reasoning, input_audio, output_audio, fixed),
    # scaled; all but input/output/fixed are the difference to the input/output rate.
    coeffs: tuple[int, ...]
    bands: tuple[tuple[int, tuple[int, ...]], ...]  # (tier start, coeffs), highest start first
    divisor: int  # nanos = ceil(total / divisor)
    timed: bool = False  # prices depend on the request time: check the window
    valid_from: float = -_INF  # epoch seconds, inclusive
    valid_until: float = _INF  # epoch seconds, exclusive
    fallback: Callable[..., int] | None = None  # genai-prices' own calc
    rebuild: Callable[[float], _Plan] | None = None  # new plan for another point in time
    blocked: bool = False  # unknown model under "block": raise


# --------------------------------------------------------------------------- helpers


def _rate_nanos(value: object, name: str) -> int:
    # parse_usd does the validation (NaN/inf/negative/bool/garbage) and rounds up.
    return parse_usd(value, what=f"ModelPrice.{name} (USD per million tokens)")


def _coerce_price(value: object, what: str) -> ModelPrice:
    if isinstance(value, ModelPrice):
        return value
    if isinstance(value, Mapping):
        allowed = (
            "input", "output", "cache_read", "cache_write", "per_call_usd", "input_audio",
            "output_audio",
        )  # fmt: skip
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ValueError(f"{what}: unknown price field(s) {unknown}; allowed: {list(allowed)}")
        if "input" not in value or "output" not in value:
            raise ValueError(f"{what}: 'input' and 'output' (USD per million tokens) are required")
        return ModelPrice(**value)
    raise ValueError(f"{what} must be a ModelPrice or a mapping of USD per million tokens, got {value!r}")


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def _epoch(ts: datetime) -> float:
    # Naive timestamps are UTC, as in genai-prices.
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=_UTC)
    return ts.timestamp()


def _utc_time(t: Any) -> Any:
    if t.tzinfo is None:
        return t.replace(tzinfo=_UTC)
    return datetime.combine(date(1970, 1, 1), t).astimezone(_UTC).timetz()


def _variant(service_tier: str | None, batch: bool) -> _Variant:
    # str(): an SDK enum must not silently become "no tier" (priority would be under-charged).
    tier = str(service_tier).strip().lower() if service_tier is not None else None
    if tier == "batch":  # Anthropic reports usage.service_tier == "batch"
        tier, batch = None, True
    if tier in _STANDARD_TIERS or not tier:
        tier = None
    wanted: list[tuple[str, str]] = []
    if tier:
        wanted.append(("service_tier", tier))
    if batch:
        wanted.append(("processing", "batch"))
    return _Variant(dict(wanted) or None, tuple(wanted), tier in _PREMIUM_TIERS)


def _user_plan(
    price: ModelPrice, *, source: str, model: str, provider: str | None, variant: _Variant
) -> _Plan:
    """A plan from a user price: integer nano-USD per MTok, so total / 10**6 is nanos."""
    inp, out, cr, cw, call, ia, oa = price._nanos
    # User prices have no batch/tier variants: a requested variant did not match.
    factor = _PREMIUM_FACTOR if variant.premium else 1
    coeffs = (inp, cr - inp, cw - inp, out, 0, ia - inp, oa - out, call * 1_000_000)
    return _Plan(
        source=source,
        model=model,
        provider=provider,
        variant_matched=not variant.wanted,
        coeffs=tuple(c * factor for c in coeffs),
        bands=(),
        divisor=1_000_000,
    )


# --------------------------------------------------------------------------- genai-prices glue

_gp: Any = None  # the genai_prices modules, imported on first use (data load is ~0.2 s)


def _genai() -> Any:
    global _gp
    if _gp is None:
        import genai_prices
        from genai_prices import data_snapshot, types

        class _Mods:
            version = genai_prices.__version__
            get_snapshot = staticmethod(data_snapshot.get_snapshot)
            find_provider_by_id = staticmethod(data_snapshot.find_provider_by_id)
            Usage = genai_prices.Usage
            TieredPrices = types.TieredPrices
            StartDateConstraint = types.StartDateConstraint
            TimeOfDateConstraint = types.TimeOfDateConstraint

        _gp = _Mods
    return _gp


_TOKEN_KEYS = (
    "input_mtok", "cache_read_mtok", "cache_write_mtok", "output_mtok", "output_reasoning_mtok",
    "input_audio_mtok", "output_audio_mtok",
)  # fmt: skip


def _gp_usage(gp: Any, i: int, cr: int, cw: int, o: int, r: int, ia: int = 0, oa: int = 0) -> Any:
    return gp.Usage(
        input_tokens=i,
        cache_read_tokens=cr,
        cache_write_tokens=cw,
        output_tokens=o,
        output_reasoning_tokens=r,
        input_audio_tokens=ia,
        output_audio_tokens=oa,
        # Overlaps of the units we report (genai-prices asks for them when a model prices
        # them): we report cached audio as cache reads and as audio, which prices it above
        # its cached-audio rate, never below.
        cache_audio_read_tokens=0,
        cache_audio_write_tokens=0,
        output_audio_reasoning_tokens=0,
    )


# Audio rates (USD per MTok) OpenAI bills that genai-prices 0.2.3 does not list: it prices the
# gpt-4o(-mini) audio previews at their text rates only, 8x under for audio output; the first
# (2024-10-01) snapshots of the audio and realtime previews cost 2.5x their successors.
# (model id in genai-prices, reference must contain or None) -> (input audio, output audio).
_AUDIO_SUPPLEMENT: tuple[tuple[str, str | None, Decimal, Decimal], ...] = (
    ("gpt-4o-audio-preview", "2024-10-01", Decimal(100), Decimal(200)),
    ("gpt-4o-realtime-preview", "2024-10-01", Decimal(100), Decimal(200)),
    ("gpt-4o-audio-preview", None, Decimal(40), Decimal(80)),
    ("gpt-4o-mini-audio-preview", None, Decimal(10), Decimal(20)),
)


def _with_audio_rates(mp: Any, model_id: str, reference: str) -> Any:
    """``mp`` with the audio rates of :data:`_AUDIO_SUPPLEMENT` where they are higher."""
    for mid, needle, ia, oa in _AUDIO_SUPPLEMENT:
        if mid != model_id or (needle is not None and needle not in reference):
            continue
        have_ia = getattr(mp, "input_audio_mtok", None)
        have_oa = getattr(mp, "output_audio_mtok", None)
        if isinstance(have_ia, Decimal) and have_ia >= ia and isinstance(have_oa, Decimal) and have_oa >= oa:
            return mp
        if not (have_ia is None or isinstance(have_ia, Decimal)) or not (
            have_oa is None or isinstance(have_oa, Decimal)
        ):
            return mp  # tiered audio rates: leave genai-prices' data alone
        values = {k: v for k, v in vars(mp).items() if not k.startswith("_") and v is not None}
        values["input_audio_mtok"] = max(ia, have_ia or ia)
        values["output_audio_mtok"] = max(oa, have_oa or oa)
        return type(mp)(**values)
    return mp


def _linearise(gp: Any, mp: Any) -> tuple[int, tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]] | None:
    """Turn a genai-prices ModelPrice into integer coefficients for our five usage numbers.

    genai-prices prices the *leaves* of a unit hierarchy: input tokens not counted as cache
    read/write/audio pay the input rate, output tokens not counted as reasoning or audio pay
    the output rate. Units we never report (cached audio, images, web searches, 1h cache writes
    ...) are always 0 and never ancestors of ours, so they add nothing (their overlaps, such as
    audio reasoning, are 0 too); ``requests`` is always 1. That makes the cost
    linear in our numbers within a tier band: cost = sum(coeff * count). Returns
    ``(scale, base_coeffs, bands)`` with coefficients in units of 10**-scale USD per MTok,
    or ``None`` when the price has a shape we do not model (then genai-prices computes).
    """
    values = {k: getattr(mp, k, None) for k in _TOKEN_KEYS}
    per_k_requests = getattr(mp, "requests_kcount", None)
    decimals: list[Decimal] = []
    starts: set[int] = set()
    for v in values.values():
        if isinstance(v, gp.TieredPrices):
            decimals.append(v.base)
            decimals.extend(t.price for t in v.tiers)
            starts.update(t.start for t in v.tiers)
        elif v is not None:
            decimals.append(v)
    if per_k_requests is not None:
        if not isinstance(per_k_requests, Decimal):
            return None
        decimals.append(per_k_requests)
    if not all(isinstance(d, Decimal) and d.is_finite() and d >= 0 for d in decimals):
        return None
    if not all(isinstance(s, int) and s >= 0 for s in starts):
        return None
    # Enough decimal places to make every rate an integer: exact arithmetic, no Decimal per quote.
    scale = max([9, *(-d.as_tuple().exponent for d in decimals)])

    def at(v: Any, total_input: int) -> Decimal | None:
        if isinstance(v, gp.TieredPrices):
            # Cliff tiers, as genai-prices: the highest tier whose start the TOTAL input exceeds
            # applies to every token.
            for tier in sorted(v.tiers, key=lambda t: t.start, reverse=True):
                if total_input > tier.start:
                    return tier.price
            return v.base
        return v

    def coeffs(total_input: int) -> tuple[int, ...]:
        p = {k: at(v, total_input) for k, v in values.items()}
        s = {k: (_scaled(d, scale) if d is not None else None) for k, d in p.items()}
        inp = s["input_mtok"] or 0
        out = s["output_mtok"] or 0
        cr = 0 if s["cache_read_mtok"] is None else s["cache_read_mtok"] - inp
        cw = 0 if s["cache_write_mtok"] is None else s["cache_write_mtok"] - inp
        reas = 0 if s["output_reasoning_mtok"] is None else s["output_reasoning_mtok"] - out
        ia = 0 if s["input_audio_mtok"] is None else s["input_audio_mtok"] - inp
        oa = 0 if s["output_audio_mtok"] is None else s["output_audio_mtok"] - out
        fixed = 0 if per_k_requests is None else _scaled(per_k_requests, scale + 3)
        return (inp, cr, cw, out, reas, ia, oa, fixed)

    base = coeffs(0)
    bands = tuple((start, coeffs(start + 1)) for start in sorted(starts, reverse=True))
    return scale, base, bands


def _scaled(d: Decimal, scale: int) -> int:
    """``d * 10**scale`` as an exact int (Decimal arithmetic would round at 28 digits)."""
    sign, digits, exponent = d.as_tuple()
    value = int("".join(map(str, digits)) or "0") * 10 ** (int(exponent) + scale)
    return -value if sign else value


def _compute(plan: _Plan, i: int, cr: int, cw: int, o: int, r: int, ia: int = 0, oa: int = 0) -> int:
    if plan.fallback is not None:
        return plan.fallback(i, cr, cw, o, r, ia, oa)
    c = plan.coeffs
    for start, band in plan.bands:
        if i > start:
            c = band
            break
    total = c[0] * i + c[1] * cr + c[2] * cw + c[3] * o + c[4] * r + c[5] * ia + c[6] * oa + c[7]
    return -(-total // plan.divisor)


def _probes(bands: tuple[tuple[int, tuple[int, ...]], ...]) -> list[tuple[int, ...]]:
    lowest = min((s for s, _ in bands), default=None)
    i0 = 123_457 if lowest is None else min(lowest, 123_457)  # inside the base band
    # Audio counts leave room for the cache counts: genai-prices rejects usage whose leaves
    # (here: uncached text input) would be negative.
    probes = [(i0, i0 // 4, i0 // 8, 5_003, 1_001, i0 // 3, 2_001)]
    for start, _ in bands:
        i = start + 1
        probes.append((i, i // 4, i // 8, 7_717, 1_111, i // 3, 3_003))
    return probes


# --------------------------------------------------------------------------- the price book


class PriceBook:
    """Prices for LLM calls and tool calls. Thread-safe; build one and share it."""

    def __init__(
        self,
        *,
        overrides: Mapping[str, ModelPrice | Mapping[str, Number]] | None = None,
        aliases: Mapping[str, str] | None = None,
        unknown_model: str | ModelPrice | Mapping[str, Number] = "block",
        tools: Mapping[str, Number | Callable[[Any], Number]] | None = None,
        use_genai_prices: bool = True,
        cache_size: int = 4096,
    ) -> None:
        self._exact: dict[str, ModelPrice] = {}
        self._globs: list[tuple[str, ModelPrice]] = []
        for key, value in (overrides or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"override keys must be non-empty model names, got {key!r}")
            price = _coerce_price(value, f"overrides[{key!r}]")
            k = key.strip().lower()
            if _is_glob(k):
                self._globs.append((k, price))
            else:
                self._exact[k] = price

        self._aliases: dict[str, str] = {}
        for key, target in (aliases or {}).items():
            if not (isinstance(key, str) and key.strip() and isinstance(target, str) and target.strip()):
                raise ValueError(f"aliases must map model names to model names, got {key!r}: {target!r}")
            self._aliases[key.strip().lower()] = target.strip()

        self._tools: dict[str, int | Callable[[Any], Any]] = {}
        self._tool_globs: list[tuple[str, int | Callable[[Any], Any]]] = []
        for name, cost in (tools or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool names must be non-empty strings, got {name!r}")
            value: int | Callable[[Any], Any]
            value = cost if callable(cost) else parse_usd(cost, what=f"cost of tool {name!r}")
            if _is_glob(name):
                self._tool_globs.append((name, value))
            else:
                self._tools[name] = value

        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self._cache_size = cache_size
        self._use_gp = bool(use_genai_prices)
        self._gp = _genai() if self._use_gp else None
        self._snapshot = self._gp.get_snapshot() if self._gp else None
        self._source = f"genai-prices {self._gp.version}" if self._gp else ""
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._lock = threading.Lock()

        self._policy_price: ModelPrice | None = None
        self._policy_target: str | None = None
        if isinstance(unknown_model, str):
            policy = unknown_model.strip()
            if policy == "block":
                pass  # the default: _unknown() returns a blocked plan
            elif policy.startswith("price_as:") and policy[len("price_as:"):].strip():
                self._policy_target = policy[len("price_as:"):].strip()
                # Fail at configuration time, not on the first unknown model in production.
                if self._resolve(None, self._policy_target, None, _variant(None, False), time.time()) is None:
                    raise ValueError(
                        f"unknown_model={unknown_model!r}: {self._policy_target!r} has no price either; "
                        "name a model genai-prices knows or add an override for it"
                    )
            else:
                raise ValueError(
                    f"unknown_model must be 'block', 'price_as:<model>' or a ModelPrice, got {unknown_model!r}"
                )
        else:
            self._policy_price = _coerce_price(unknown_model, "unknown_model")

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PriceBook:
        """Load a JSON price table::

            {"models": {"ollama/*": {"input": 0, "output": 0},
                        "ft:gpt-4o*": {"input": 3.75, "output": 15, "cache_read": 1.875}},
             "aliases": {"my-gpt4o-deployment": "gpt-4o"},
             "tools": {"web_search": 0.01},
             "unknown_model": "price_as:gpt-4o"}

        Keys starting with ``_`` or ``$`` are comments; any other unknown key is an error.
        """
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{os.fspath(path)}: expected a JSON object at the top level")
        allowed = {"models", "aliases", "tools", "unknown_model", "use_genai_prices"}
        unknown = sorted(k for k in data if k not in allowed and not k.startswith(("_", "$")))
        if unknown:
            raise ValueError(f"{os.fspath(path)}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        for section in ("models", "aliases", "tools"):
            if not isinstance(data.get(section, {}), dict):
                raise ValueError(f"{os.fspath(path)}: {section!r} must be an object")
        use_gp = data.get("use_genai_prices", True)
        if not isinstance(use_gp, bool):
            raise ValueError(f"{os.fspath(path)}: 'use_genai_prices' must be true or false")
        return cls(
            overrides=data.get("models"),
            aliases=data.get("aliases"),
            tools=data.get("tools"),
            unknown_model=data.get("unknown_model", "block"),
            use_genai_prices=use_gp,
        )

    # -- quoting --------------------------------------------------------------------------

    def quote(
        self,
        provider: str | None,
        model: str,
        usage: TokenUsage,
        *,
        server_address: str | None = None,
        service_tier: str | None = None,
        batch: bool = False,
        timestamp: datetime | None = None,
    ) -> PriceQuote:
        """The cost of a call, rounded up to the nano-USD.

        ``provider`` is ``gen_ai.provider.name`` (or a LiteLLM / genai-prices id), ``model`` the
        response model if known (dated snapshots price best), ``server_address`` the host called.
        ``timestamp`` (default: now) matters for prices that change by date or time of day.
        Raises :class:`UnknownModelError` for an unpriceable model under ``"block"``.
        """
        if self._gp is not None and self._gp.get_snapshot() is not self._snapshot:
            self._reset()  # someone swapped genai-prices' data: cached plans are stale
        key = (provider, model, server_address, service_tier, batch)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan_for(key, time.time() if timestamp is None else _epoch(timestamp))
        if plan.timed:
            now = time.time() if timestamp is None else _epoch(timestamp)
            if not plan.valid_from <= now < plan.valid_until:
                plan = plan.rebuild(now)  # type: ignore[misc]  # timed plans always have one
                self._store(key, plan)
        if plan.blocked:
            raise UnknownModelError(model, provider)

        i = usage.input_tokens
        cr = usage.cache_read_tokens
        cw = usage.cache_write_tokens
        o = usage.output_tokens
        r = usage.reasoning_tokens
        ia = usage.input_audio_tokens
        oa = usage.output_audio_tokens
        if cr + cw > i:  # input reported without cache tokens (Anthropic's raw usage)
            i += cr + cw
        if r > o:  # output reported without reasoning tokens (Gemini's raw usage)
            o += r
        if ia or oa:
            # Audio is part of the totals. Totals too small to hold every part would price a
            # negative number of text tokens: raise them to the sum (never under-charge).
            if cr + cw + ia > i:
                i = cr + cw + ia
            if r + oa > o:
                o = r + oa
        return PriceQuote(
            _compute(plan, i, cr, cw, o, r, ia, oa), plan.source, plan.model, plan.provider,
            plan.variant_matched,
        )  # fmt: skip

    def tool_cost_nanos(self, tool_name: str, result: object = None) -> int | None:
        """The cost of one tool call in nano-USD, or ``None`` when no price is configured.

        A callable price gets the tool result; if it raises or returns NaN, a negative number
        or a non-number, ``ValueError`` is raised (a tool cost is never silently dropped).
        """
        cost = self._tools.get(tool_name)
        if cost is None:
            for pattern, value in self._tool_globs:
                if fnmatch.fnmatchcase(tool_name, pattern):
                    cost = value
                    break
            else:
                return None
        if isinstance(cost, int):
            return cost
        try:
            usd = cost(result)
        except Exception as e:
            raise ValueError(f"cost function of tool {tool_name!r} raised {type(e).__name__}: {e}") from e
        return parse_usd(usd, what=f"cost of tool {tool_name!r}")

    # -- resolution (slow path, once per key) ---------------------------------------------

    def _plan_for(self, key: tuple[Any, ...], now: float) -> _Plan:
        provider, model, server_address, service_tier, batch = key
        variant = _variant(service_tier, bool(batch))
        plan = self._resolve(provider, model, server_address, variant, now)
        if plan is None:
            plan = self._unknown(provider, model, variant, now)
        self._store(key, plan)
        return plan

    def _store(self, key: tuple[Any, ...], plan: _Plan) -> None:
        with self._lock:
            if key not in self._plans and len(self._plans) >= self._cache_size:
                # Bounded FIFO: model names can come from untrusted input.
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan

    def _reset(self) -> None:
        with self._lock:
            self._plans.clear()
            self._snapshot = self._gp.get_snapshot()

    def _unknown(self, provider: str | None, model: str, variant: _Variant, now: float) -> _Plan:
        pl = provider.strip().lower() if isinstance(provider, str) and provider.strip() else None
        name = model.strip() if isinstance(model, str) else str(model)
        if self._policy_price is not None:
            return _user_plan(self._policy_price, source="default", model=name, provider=pl, variant=variant)
        if self._policy_target is not None:
            plan = self._resolve(None, self._policy_target, None, variant, now, source=f"price_as:{self._policy_target}")
            if plan is not None:
                return plan
        return _Plan("", name, pl, False, (0,) * 8, (), 1, blocked=True)

    def _names(self, provider: str | None, model: str) -> _Names:
        pl = provider.strip().lower() if isinstance(provider, str) and provider.strip() else None
        raw = model.strip().lower()
        target = None
        if pl:
            target = self._aliases.get(f"{pl}/{raw}")
        if target is None:
            target = self._aliases.get(raw)
        if target is None and "/" in raw and raw.split("/", 1)[0] in _PREFIXES:
            target = self._aliases.get(raw.split("/", 1)[1])
        m = _GOOGLE_PREFIX.sub("", (target or raw).lower(), count=1)

        pid = self._provider_id(pl) if pl else None
        stripped, prefix, prefix_pid = m, None, None
        head, sep, tail = m.partition("/")
        if sep and tail and head in _PREFIXES:
            stripped = _GOOGLE_PREFIX.sub("", tail, count=1)
            prefix, prefix_pid = head, self._provider_id(head)

        subjects: list[str] = []
        for s in (
            f"{pl}/{raw}" if pl else None,
            f"{pid}/{m}" if pid else None,
            f"{pl}/{m}" if pl else None,
            raw,
            m,
            f"{prefix_pid}/{stripped}" if prefix_pid else None,
            stripped,
        ):
            if s and s not in subjects:
                subjects.append(s)
        return _Names(pl, pid, m, stripped, prefix, prefix_pid, tuple(subjects))

    def _provider_id(self, name: str) -> str | None:
        if name in _PROVIDER_IDS:
            return _PROVIDER_IDS[name]
        if self._gp is None:
            return name
        found = self._gp.find_provider_by_id(self._snapshot.providers, name)
        return found.id if found is not None else None

    def _override(self, names: _Names) -> ModelPrice | None:
        # Exact keys first, then globs in the order given; each against the most specific name.
        for s in names.subjects:
            if s in self._exact:
                return self._exact[s]
        for pattern, price in self._globs:
            for s in names.subjects:
                if fnmatch.fnmatchcase(s, pattern):
                    return price
        return None

    def _resolve(
        self,
        provider: str | None,
        model: str,
        server_address: str | None,
        variant: _Variant,
        now: float,
        *,
        source: str | None = None,
    ) -> _Plan | None:
        if not isinstance(model, str) or not model.strip():
            return None
        names = self._names(provider, model)
        price = self._override(names)
        if price is not None:
            return _user_plan(
                price,
                source=source or "override",
                model=names.stripped,
                provider=names.pid or names.prefix_pid or names.provider or names.prefix,
                variant=variant,
            )
        if self._gp is None:
            return None
        hit = self._lookup(names, server_address)
        if hit is None:
            return None
        return self._genai_plan(hit, variant, source or self._source, now, names.model)

    def _lookup(self, names: _Names, server_address: str | None) -> tuple[Any, Any] | None:
        """Find (provider, model) in genai-prices, trying the most specific reading first."""
        m, stripped = names.model, names.stripped
        attempts: list[tuple[str | None, str | None, str]] = []
        if server_address and isinstance(server_address, str):
            # The host that was called is the one that bills (e.g. the OpenAI SDK pointed at
            # api.groq.com still reports provider "openai"); gateways on other hosts match
            # no provider pattern and fall through.
            url = f"https://{server_address.strip().lower()}"
            attempts += [(None, url, m), (None, url, stripped)]
        if names.pid:
            attempts += [(names.pid, None, m), (names.pid, None, stripped)]
        if names.prefix_pid:
            attempts.append((names.prefix_pid, None, stripped))
        if not names.pid and _BEDROCK_ID.match(stripped):
            attempts.append(("aws", None, stripped))
        # The model is not listed under the given provider: let genai-prices infer it.
        attempts += [(None, None, stripped), (None, None, m)]

        snapshot = self._snapshot
        seen: set[tuple[str | None, str | None, str]] = set()
        for attempt in attempts:
            if attempt in seen:
                continue
            seen.add(attempt)
            pid, url, ref = attempt
            try:
                return snapshot.find_provider_model(ref, None, pid, url)
            except LookupError:
                continue
        return None

    def _genai_plan(
        self, hit: tuple[Any, Any], variant: _Variant, source: str, now: float, reference: str = ""
    ) -> _Plan:
        gp = self._gp
        provider, info = hit
        ts = datetime.fromtimestamp(now, _UTC)
        # genai-prices ignores price variants for a model borrowed from a fallback provider
        # (Azure -> OpenAI); mirror that so "matched" tells the truth.
        own = any(info is m for m in provider.models)
        ctx = variant.ctx if own else None
        active = [
            v
            for v in (info.price_variants or ())
            if ctx and (v.constraint is None or v.constraint.active(ts))
        ]
        matched = all(
            any(
                v.when.get(k) == val and all(ctx.get(wk) == wv for wk, wv in v.when.items())  # type: ignore[union-attr]
                for v in active
            )
            for k, val in variant.wanted
        )
        mp = _with_audio_rates(info.get_prices(ts, ctx), info.id, reference)
        factor = _PREMIUM_FACTOR if variant.premium and not matched else 1

        valid_from, valid_until, timed = self._window(info, bool(ctx), ts)
        lin = _linearise(gp, mp)
        fallback = None
        if lin is None or not self._agrees(mp, lin):
            _log.warning("otel_budget.pricing: using genai-prices' own calculation for %s/%s", provider.id, info.id)

            def fallback(
                i: int, cr: int, cw: int, o: int, r: int, ia: int = 0, oa: int = 0,
                _mp: Any = mp, _f: int = factor,
            ) -> int:  # fmt: skip
                usage = _gp_usage(gp, i, cr, cw, o, r, ia, oa)
                return usd_to_nanos(_mp.calc_price(usage)["total_price"] * _f)

            lin = (9, (0,) * 8, ())
        scale, base, bands = lin
        return _Plan(
            source=source,
            model=info.id,
            provider=provider.id,
            variant_matched=matched,
            coeffs=tuple(c * factor for c in base),
            bands=tuple((s, tuple(c * factor for c in cs)) for s, cs in bands),
            divisor=10 ** (scale - 3),
            timed=timed,
            valid_from=valid_from,
            valid_until=valid_until,
            fallback=fallback,
            rebuild=lambda t: self._genai_plan(hit, variant, source, t, reference),
        )

    def _agrees(self, mp: Any, lin: tuple[int, tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]]) -> bool:
        """Check our coefficients against genai-prices' own calculation (once per plan)."""
        scale, base, bands = lin
        probe_plan = _Plan("", "", None, True, base, bands, 1)
        for probe in _probes(bands):
            try:
                theirs = mp.calc_price(_gp_usage(self._gp, *probe))["total_price"]
            except (ValueError, ArithmeticError):
                return False
            ours = Decimal(_compute(probe_plan, *probe)).scaleb(-(scale + 6))
            # Exact, up to genai-prices' 28-digit Decimal context.
            if abs(ours - theirs) > Decimal("1e-15"):
                return False
        return True

    def _window(self, info: Any, with_variants: bool, ts: datetime) -> tuple[float, float, bool]:
        """The time span around ``ts`` in which no price condition of this model changes."""
        gp = self._gp
        constraints = [cp.constraint for cp in info.prices] if isinstance(info.prices, list) else []
        if with_variants:
            constraints += [v.constraint for v in info.price_variants or ()]
        edges: list[float] = []
        for c in constraints:
            if isinstance(c, gp.StartDateConstraint):
                edges.append(datetime.combine(c.start_date, datetime.min.time(), _UTC).timestamp())
            elif isinstance(c, gp.TimeOfDateConstraint):
                day = ts.date()
                for d in (day - timedelta(days=1), day, day + timedelta(days=1)):
                    for t in (c.start_time, c.end_time):
                        edges.append(datetime.combine(d, _utc_time(t)).timestamp())
        if not edges:
            return -_INF, _INF, False
        now = ts.timestamp()
        before = [e for e in edges if e <= now]
        after = [e for e in edges if e > now]
        return (max(before) if before else -_INF), (min(after) if after else _INF), True

