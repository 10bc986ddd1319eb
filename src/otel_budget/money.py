"""Money as integers: every amount in otel-budget is an ``int`` of nano-USD.

    >>> from otel_budget.money import parse_usd, to_usd
    >>> parse_usd("$5.00")
    5000000000
    >>> to_usd(parse_usd("0.000000150"))
    1.5e-07

Floats drift when thousands of tiny costs are summed (a float ledger keeps
``reserved = 2.7e-20`` after every reservation was released, not zero). Integers do not.
A nano-dollar is fine enough for the cheapest token prices (gpt-4o-mini input, $0.15 per
million tokens, is 150 nano-USD per token; micro-USD would round it to nothing), and costs
are rounded *up* to the next nano-dollar, never down.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
# A single budget above this is almost certainly a unit mistake (cents vs dollars, or
# nano-USD passed as USD); it also keeps amounts exact inside Redis' Lua doubles (2**53).
MAX_BUDGET_USD = 1_000_000
MAX_BUDGET_NANOS = MAX_BUDGET_USD * NANOS_PER_USD

# ASCII only (``re.ASCII``, ``[0-9]``): Unicode digits ('５', '٥') are not money here.
_USD_TEXT = re.compile(
    r"\s*\$?\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:usd)?\s*", re.IGNORECASE | re.ASCII
)


def parse_usd(value: object, *, what: str = "budget", allow_huge: bool = False) -> int:
    """Validate a USD amount and return it as nano-USD (rounded up).

    Accepts ``int``, ``float``, ``Decimal`` and strings such as ``"5"``, ``"$5.00"`` or
    ``"0.25 USD"`` (ASCII digits and whitespace only: ``"５"`` is not $5). Rejects NaN, infinities, negatives, booleans, other types and
    amounts above ``MAX_BUDGET_USD`` with a ``ValueError`` that names ``what``.
    """
    if isinstance(value, bool):
        # bool is an int subclass: ``max_usd=True`` is a bug, not one dollar.
        raise ValueError(f"{what} must be a number of USD, got a bool ({value!r})")
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"{what} must be a finite number of USD, got {value!r}")
        dec = Decimal(repr(value))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{what} must be a finite number of USD, got {value!r}")
        dec = value
    elif isinstance(value, str):
        match = _USD_TEXT.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{what} must look like '5', '5.00' or '$5.00' (USD), got {value!r}"
            )
        try:
            dec = Decimal(match.group(1))
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            raise ValueError(f"{what}: cannot parse {value!r} as USD") from None
    else:
        raise ValueError(
            f"{what} must be an int, float, Decimal or string of USD, "
            f"got {type(value).__name__}"
        )
    if dec < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    if not allow_huge and dec > MAX_BUDGET_USD:
        raise ValueError(
            f"{what} of {value!r} USD is above the {MAX_BUDGET_USD:,} USD sanity limit; "
            "check the unit (USD, not cents or nano-USD)"
        )
    return int((dec * NANOS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def usd_to_nanos(usd: Decimal | float | int) -> int:
    """Convert a computed (trusted, finite, non-negative) cost to nano-USD, rounding up."""
    if isinstance(usd, float):
        usd = Decimal(repr(usd))
    return int((Decimal(usd) * NANOS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def to_usd(nanos: int) -> float:
    """Nano-USD to a float in USD, for span attributes, reports and logs."""
    return nanos / NANOS_PER_USD


def usd_digits(*amounts: int) -> int:
    """The decimals that show every one of ``amounts`` (nano-USD): 6 when one of them is a
    sub-cent amount other than zero, else 4. One message uses one precision."""
    for nanos in amounts:
        if nanos and abs(nanos) < NANOS_PER_USD // 100:
            return 6
    return 4


def format_usd(nanos: int, digits: int | None = None) -> str:
    """Human-readable amount: ``$0.012345``; enough digits to show sub-cent calls. Pass
    ``digits=usd_digits(a, b, ...)`` (or use ``format_usds``) so that the amounts of one
    message share one precision."""
    if digits is None:
        digits = usd_digits(nanos)
    return f"${nanos / NANOS_PER_USD:.{digits}f}"


def format_usds(*amounts: int) -> tuple[str, ...]:
    """Several amounts of one message, formatted with one precision.

    >>> format_usds(5_000_000, 2_000_000_000)
    ('$0.005000', '$2.000000')
    """
    digits = usd_digits(*amounts)
    return tuple(format_usd(nanos, digits) for nanos in amounts)
