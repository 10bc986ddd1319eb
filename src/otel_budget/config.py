"""Read ``OTEL_BUDGET_*`` environment variables into processor arguments, strictly.

    >>> kwargs = settings_from_env({"OTEL_BUDGET_MAX_USD": "0.05",
    ...                             "OTEL_BUDGET_SCOPES": "user:20/day"})
    >>> kwargs["max_usd"], kwargs["scopes"][0].window
    ('0.05', 'day')

Every value is validated; a bad one raises ``ValueError`` naming the variable, so that a typo
never turns into "no budget" silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from otel_budget import environment_variables as env
from otel_budget.money import parse_usd
from otel_budget.pricing import ModelPrice, PriceBook
from otel_budget.settings import FAIL_CLOSED, FAIL_OPEN, ScopeRule, _thresholds

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
SUPPORTED_LIBRARIES = ("openai", "anthropic", "litellm")


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def _int(name: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a positive integer") from None
    if number <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return number


def parse_scopes(value: str, name: str = env.OTEL_BUDGET_SCOPES) -> list[ScopeRule]:
    """``user:20/day,tenant:500/month,session:2`` -> ScopeRules."""
    rules = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, rest = item.partition(":")
        if not sep:
            raise ValueError(f"{name}: {item!r} must look like kind:usd[/day|/month]")
        usd, _, window = rest.partition("/")
        try:
            rules.append(ScopeRule(kind.strip(), max_usd=usd.strip(), window=window.strip() or None))
        except ValueError as exc:
            raise ValueError(f"{name}: {item!r}: {exc}") from None
    return rules


def parse_unknown_model(value: str, name: str = env.OTEL_BUDGET_UNKNOWN_MODEL) -> Any:
    value = value.strip()
    if value == "block" or value.startswith("price_as:"):
        return value
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 2:
        try:
            return ModelPrice(input=parts[0], output=parts[1])
        except ValueError as exc:
            raise ValueError(f"{name}={value!r}: {exc}") from None
    raise ValueError(f"{name}={value!r}: expected block, price_as:<model> or '<in>,<out>' $/MTok")


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Processor keyword arguments from the environment (only the variables that are set)."""
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}

    def get(name: str) -> str | None:
        value = environ.get(name)
        return value if value is not None and value.strip() != "" else None

    if (value := get(env.OTEL_BUDGET_MAX_USD)) is not None:
        parse_usd(value, what=env.OTEL_BUDGET_MAX_USD)
        out["max_usd"] = value.strip()
    if (value := get(env.OTEL_BUDGET_SCOPES)) is not None:
        out["scopes"] = parse_scopes(value)
    if (value := get(env.OTEL_BUDGET_FAILURE_POLICY)) is not None:
        if value.strip() not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(f"{env.OTEL_BUDGET_FAILURE_POLICY}={value!r}: expected fail_open or fail_closed")
        out["failure_policy"] = value.strip()
    if (value := get(env.OTEL_BUDGET_THRESHOLDS)) is not None:
        try:
            out["thresholds"] = list(_thresholds(float(v) for v in value.split(",") if v.strip()))
        except ValueError:
            raise ValueError(
                f"{env.OTEL_BUDGET_THRESHOLDS}={value!r}: expected fractions in (0, 1] like 0.5,0.8"
            ) from None
    if (value := get(env.OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS)) is not None:
        out["default_max_output_tokens"] = _int(env.OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS, value)
    if (value := get(env.OTEL_BUDGET_ASSUMED_INPUT_TOKENS)) is not None:
        out["assumed_input_tokens"] = _int(env.OTEL_BUDGET_ASSUMED_INPUT_TOKENS, value)
    if (value := get(env.OTEL_BUDGET_CAP_OUTPUT_TOKENS)) is not None:
        out["cap_output_tokens"] = _bool(env.OTEL_BUDGET_CAP_OUTPUT_TOKENS, value)
    if (value := get(env.OTEL_BUDGET_MIN_OUTPUT_TOKENS)) is not None:
        out["min_output_tokens"] = _int(env.OTEL_BUDGET_MIN_OUTPUT_TOKENS, value)
    if (value := get(env.OTEL_BUDGET_STREAM_INCLUDE_USAGE)) is not None:
        out["stream_include_usage"] = _bool(env.OTEL_BUDGET_STREAM_INCLUDE_USAGE, value)
    prices_file = get(env.OTEL_BUDGET_PRICES_FILE)
    unknown = get(env.OTEL_BUDGET_UNKNOWN_MODEL)
    if (value := get(env.OTEL_BUDGET_REDIS_URL)) is not None:
        from otel_budget.storage import MemoryStorage
        from otel_budget.storage.redis import RedisStorage

        fallback = get(env.OTEL_BUDGET_REDIS_FALLBACK)
        if fallback is not None and fallback.strip() != "local":
            raise ValueError(f"{env.OTEL_BUDGET_REDIS_FALLBACK}={fallback!r}: expected 'local' or unset")
        try:
            out["storage"] = RedisStorage(
                value.strip(), fallback=MemoryStorage() if fallback is not None else None
            )
        except ValueError as exc:
            raise ValueError(f"{env.OTEL_BUDGET_REDIS_URL}: {exc}") from None
    if prices_file is not None and unknown is not None:
        raise ValueError(
            f"set the unknown-model policy in {env.OTEL_BUDGET_PRICES_FILE} ('unknown_model') "
            f"or in {env.OTEL_BUDGET_UNKNOWN_MODEL}, not both"
        )
    if prices_file is not None:
        out["prices"] = PriceBook.from_file(prices_file)
    elif unknown is not None:
        out["prices"] = PriceBook(unknown_model=parse_unknown_model(unknown))
    return out


def libraries_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    environ = os.environ if environ is None else environ
    value = environ.get(env.OTEL_BUDGET_INSTRUMENT, "").strip()
    if not value:
        return SUPPORTED_LIBRARIES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in SUPPORTED_LIBRARIES]
    if unknown:
        raise ValueError(
            f"{env.OTEL_BUDGET_INSTRUMENT}: unknown libraries {unknown}; supported: "
            f"{', '.join(SUPPORTED_LIBRARIES)}"
        )
    return names
