"""Cached integer price plans: a (provider, model, variant) priced as integer coefficients.

    >>> from otel_budget.price_plans import _compute, _user_plan, _variant
    >>> from otel_budget.price_types import ModelPrice
    >>> plan = _user_plan(ModelPrice(input=3, output=15), source="override", model="m",
    ...                   provider=None, variant=_variant(None, False))
    >>> _compute(plan, 1_000, 0, 0, 100, 0)                 # nano-USD, rounded up
    4500000

Each (provider, model, server address, variant) is resolved once by
``otel_budget.pricing.PriceBook`` into a ``_Plan``: integer per-token coefficients (one set
per long-context tier band) checked against genai-prices' own calculation, valid for a time
window (some prices change by date or time of day). A quote is then eight integer
multiplications. genai-prices is imported on first use, and its bundled data only (never its
network updater).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

from otel_budget.money import usd_to_nanos
from otel_budget.price_types import ModelPrice

__all__ = ["genai_plan"]

_log = logging.getLogger("otel_budget.pricing")
_UTC = timezone.utc
_INF = math.inf

# service_tier values that mean "the standard price".
_STANDARD_TIERS = frozenset({"default", "standard", "auto", "on_demand", "on-demand"})
# Tiers that cost *more* than standard. When genai-prices has no variant for them it silently
# returns the standard price, which would under-charge; we charge 2x standard instead, the upper
# end of published premiums (OpenAI priority is 1.7-2x standard), so a circuit breaker errs on
# the side of stopping early rather than overspending.
_PREMIUM_TIERS = frozenset({"priority", "fast"})
_PREMIUM_FACTOR = 2


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
    # Quotes already computed with this plan, by token counts: a plan's prices are fixed
    # for its lifetime (a timed plan is replaced, memo and all, when its window ends), so a
    # memoised quote is never stale. Bounded: counts come from requests.
    memo: dict[tuple[int, ...], Any] = field(default_factory=dict, compare=False, repr=False)


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


# genai-prices glue

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
    scale = max([9, *(-int(d.as_tuple().exponent) for d in decimals)])

    def at(v: Any, total_input: int) -> Decimal | None:
        if isinstance(v, gp.TieredPrices):
            # Cliff tiers, as genai-prices: the highest tier whose start the TOTAL input exceeds
            # applies to every token.
            for tier in sorted(v.tiers, key=lambda t: t.start, reverse=True):
                if total_input > tier.start:
                    return cast(Decimal, tier.price)
            return cast(Decimal, v.base)
        return cast("Decimal | None", v)

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
    return int(-value if sign else value)


def _compute(plan: _Plan, i: int, cr: int, cw: int, o: int, r: int, ia: int = 0, oa: int = 0) -> int:
    if plan.fallback is not None:
        return plan.fallback(i, cr, cw, o, r, ia, oa)
    c = plan.coeffs
    for start, band in plan.bands:
        if i > start:
            c = band
            break
    total = c[0] * i + c[1] * cr + c[2] * cw + c[3] * o + c[4] * r + c[5] * ia + c[6] * oa + c[7]
    return int(-(-total // plan.divisor))


def _probes(bands: tuple[tuple[int, tuple[int, ...]], ...]) -> list[tuple[int, ...]]:
    lowest = min((s for s, _ in bands), default=None)
    i0 = 123_457 if lowest is None else min(lowest, 123_457)  # inside the base band
    # Audio counts leave room for the cache counts: genai-prices rejects usage whose leaves
    # (here: uncached text input) would be negative.
    probes: list[tuple[int, ...]] = [(i0, i0 // 4, i0 // 8, 5_003, 1_001, i0 // 3, 2_001)]
    for start, _ in bands:
        i = start + 1
        probes.append((i, i // 4, i // 8, 7_717, 1_111, i // 3, 3_003))
    return probes


def genai_plan(
    gp: Any, hit: tuple[Any, Any], variant: _Variant, source: str, now: float, reference: str = ""
) -> _Plan:
    """The plan of a (provider, model) genai-prices knows, valid around ``now``."""
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

    valid_from, valid_until, timed = _window(gp, info, bool(ctx), ts)
    lin = _linearise(gp, mp)
    fallback = None
    if lin is None or not _agrees(gp, mp, lin):
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
        rebuild=lambda t: genai_plan(gp, hit, variant, source, t, reference),
    )


def _agrees(gp: Any, mp: Any, lin: tuple[int, tuple[int, ...], tuple[tuple[int, tuple[int, ...]], ...]]) -> bool:
    """Check our coefficients against genai-prices' own calculation (once per plan)."""
    scale, base, bands = lin
    probe_plan = _Plan("", "", None, True, base, bands, 1)
    for probe in _probes(bands):
        try:
            theirs = mp.calc_price(_gp_usage(gp, *probe))["total_price"]
        except (ValueError, ArithmeticError):
            return False
        ours = Decimal(_compute(probe_plan, *probe)).scaleb(-(scale + 6))
        # Exact, up to genai-prices' 28-digit Decimal context.
        if abs(ours - theirs) > Decimal("1e-15"):
            return False
    return True


def _window(gp: Any, info: Any, with_variants: bool, ts: datetime) -> tuple[float, float, bool]:
    """The time span around ``ts`` in which no price condition of this model changes."""
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
