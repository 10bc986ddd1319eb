"""The output bound of a request: the most output tokens it can be billed for.

    >>> from otel_budget.token_output import output_bound
    >>> output_bound({"max_tokens": 1024}, default=4096)
    (1024, False)
    >>> output_bound({}, default=4096)      # absent: the configured default, flagged as assumed
    (4096, True)

Reads every output-limit parameter the SDKs accept (``max_tokens``, ``max_completion_tokens``,
``max_output_tokens``, nested generation configs); the largest wins. Re-exported by
``otel_budget.tokens``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

from otel_budget.token_walk import _check_count

__all__ = ["output_bound", "output_bound_ints", "output_limits_are_ints", "token_limit", "wants_audio_output"]


def wants_audio_output(params: Mapping[str, Any]) -> bool:
    """True when a chat request asks for spoken output (``modalities`` containing ``"audio"``,
    or an ``audio`` parameter): project its output bound at the audio output rate, every
    output token as audio (``TokenUsage(output_tokens=cap, output_audio_tokens=cap)``).
    An unreadable ``modalities`` value counts as audio (the worst case)."""
    if type(params) is not dict and not isinstance(params, Mapping):
        return False
    if not _is_absent(params.get("audio")):
        return True
    modalities = params.get("modalities")
    if _is_absent(modalities):
        return False
    if isinstance(modalities, str):
        return "audio" in modalities.lower()
    try:
        return any(
            not isinstance(m, str) or m.strip().lower() == "audio"
            for m in modalities  # type: ignore[union-attr]  # any iterable; else the except
        )
    except Exception:
        return True


# Every spelling of "at most this many output tokens" (reasoning/thinking included for OpenAI
# and Anthropic). Several present: the largest wins.
_OUTPUT_KEYS = (
    "max_completion_tokens", "max_tokens", "max_output_tokens", "maxOutputTokens",
    "max_tokens_to_sample", "maxTokens",
)  # fmt: skip
# Gemini generation_config / google-genai config / Bedrock Converse inferenceConfig.
_OUTPUT_CONTAINERS = (
    "generation_config",
    "generationConfig",
    "config",
    "inferenceConfig",
    "inference_config",
)


def _is_absent(value: Any) -> bool:
    # openai/anthropic SDK sentinels (NOT_GIVEN, omit) mean "not set", as does None.
    return value is None or type(value).__name__ in ("NotGiven", "Omit")


_OUTPUT_KEY_SET = frozenset(_OUTPUT_KEYS)
_OUTPUT_CONTAINER_SET = frozenset(_OUTPUT_CONTAINERS)


def _output_values(params: Any, where: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    if type(params) is dict:
        # (A plain dict holds one spelling, if any: looked up in one C call, in key order.)
        present = params.keys() & _OUTPUT_KEY_SET
        for key in present if len(present) < 2 else [k for k in _OUTPUT_KEYS if k in present]:
            value = params[key]
            if value is not None and not _is_absent(value):
                found.append((f"{where}{key}", value))
        return found
    mapping = isinstance(params, Mapping)
    for key in _OUTPUT_KEYS:
        value = params.get(key) if mapping else getattr(params, key, None)
        if value is not None and not _is_absent(value):
            found.append((f"{where}{key}", value))
    return found


_NUMERIC_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def token_limit(key: str, value: Any) -> int:
    """One output limit as the tokens it allows: an int as it is, a finite non-negative
    float or numeric ASCII string rounded up (the SDKs send those as they are, and lenient
    servers read them as numbers). Anything else raises ``ValueError`` naming ``key``."""
    # Integral admits numpy ints; bool is an int subclass but ``max_tokens=True`` is a bug.
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number of tokens, got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{key} must not be negative, got {value!r}")
        return int(value)
    number: float | None = None
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str) and _NUMERIC_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
    if number is None or not math.isfinite(number):
        raise ValueError(f"{key} must be a number of tokens, got {value!r}")
    if number < 0:
        raise ValueError(f"{key} must not be negative, got {value!r}")
    return math.ceil(number)


def _output_limits(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    found = _output_values(params, "")
    if type(params) is dict and params.keys().isdisjoint(_OUTPUT_CONTAINER_SET):
        return found  # (the usual request: no nested generation config)
    if type(params) is dict or isinstance(params, Mapping):
        for container in _OUTPUT_CONTAINERS:
            nested = params.get(container)
            if nested is not None and not _is_absent(nested):
                found.extend(_output_values(nested, f"{container}."))
    return found


def output_bound(params: Mapping[str, Any], default: int) -> tuple[int, bool]:
    """``(max output tokens, assumed)`` for a request's parameters.

    Reads ``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens`` (and Gemini's
    ``generation_config.max_output_tokens`` / ``maxOutputTokens``, google-genai ``config``,
    Bedrock ``inferenceConfig.maxTokens``). When none is set, returns ``(default, True)``.
    A float or numeric string (``3000.0``, ``"3000"``) counts as the tokens it allows, rounded
    up. A bool, negative, NaN, infinite or non-numeric value raises ``ValueError`` naming the
    parameter: a typo in the limit must not silently become the default.
    """
    bound, assumed, _ = output_bound_ints(params, default)
    return bound, assumed


def output_bound_ints(params: Mapping[str, Any], default: int) -> tuple[int, bool, bool]:
    """``output_bound`` plus ``output_limits_are_ints``, from one reading of ``params``."""
    if type(default) is not int or default < 0:
        default = _check_count(default, "default max output tokens")
    found = _output_limits(params)
    if not found:
        return default, True, True
    if len(found) == 1:  # the usual request: one limit, an int (as ``token_limit`` reads it)
        value = found[0][1]
        if type(value) is int and value >= 0:
            return value, False, True
    bound = max(token_limit(key, value) for key, value in found)
    return bound, False, _all_ints(found)


def _all_ints(found: list[tuple[str, Any]]) -> bool:
    return all(
        type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))
        for _, value in found
    )


def output_limits_are_ints(params: Mapping[str, Any]) -> bool:
    """True when every output limit ``params`` carries is an int (or there is none): a
    float or numeric string limit is one an enforced cap should replace with an int."""
    return _all_ints(_output_limits(params))
