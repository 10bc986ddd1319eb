"""The public price types: token usage, a user price, a quote, the unknown-model error.

    >>> from otel_budget.price_types import ModelPrice, TokenUsage
    >>> ModelPrice(input="2.50", output=10)._nanos[:2]      # nano-USD per million tokens
    (2500000000, 10000000000)
    >>> TokenUsage(input_tokens=1_000, output_tokens=100).output_tokens
    100

Re-exported by ``otel_budget.pricing`` (import them from there); ``PriceBook`` uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from otel_budget.money import parse_usd, to_usd

__all__ = ["ModelPrice", "Number", "PriceQuote", "TokenUsage", "UnknownModelError", "coerce_price"]

Number = int | float | Decimal | str


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
        i, o, cr, cw, r, ia, oa = (self.input_tokens, self.output_tokens, self.cache_read_tokens,
                                   self.cache_write_tokens, self.reasoning_tokens,
                                   self.input_audio_tokens, self.output_audio_tokens)  # fmt: skip
        # The common case, in straight-line checks (no generator: built ~3 times per call).
        if (type(i) is int and type(o) is int and type(cr) is int and type(cw) is int
                and type(r) is int and type(ia) is int and type(oa) is int
                and i >= 0 and o >= 0 and cr >= 0 and cw >= 0 and r >= 0 and ia >= 0 and oa >= 0):  # fmt: skip
            return
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


coerce_price = _coerce_price
