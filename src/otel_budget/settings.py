"""Validated settings of a budget processor, and the named-scope rules.

    >>> from otel_budget.settings import BudgetSettings, ScopeRule
    >>> settings = BudgetSettings(
    ...     max_usd="$2.00",                                   # per trace
    ...     scopes=[ScopeRule("user", max_usd=20, window="day"),
    ...             ScopeRule("tenant", max_usd=500, window="month")],
    ...     failure_policy="fail_closed",
    ... )

Failure policy (``failure_policy``) decides what happens when otel-budget itself fails
(a bug, a dead ledger backend, a price that cannot be computed for a reason other than an
unknown model):

* ``"fail_open"`` (default): the call goes ahead unmetered for that decision; the error is
  logged in full once per error site and type, then counted (one "N more" line per
  ``log_interval_seconds``), not logged per call. The app never sees our failure.
* ``"fail_closed"``: the call is refused with ``BudgetExceededError(reason="internal_error")``
  chained to the cause. Choose this where an unmetered call is worse than a failed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from otel_budget.loops import policy_of
from otel_budget.money import parse_usd

FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"
WINDOWS = (None, "day", "month")
DEFAULT_THRESHOLDS = (0.5, 0.8, 0.95)
# Identity attributes read from spans when the context does not name a scope.
DEFAULT_SCOPE_ATTRIBUTES: dict[str, str] = {
    "session": "session.id",
    "user": "user.id",
    "tenant": "tenant.id",
}


@dataclass(frozen=True)
class ScopeRule:
    """A cap for every identity of one kind, e.g. each user at $20 per UTC day.

    ``kind`` names the scope ("session", "user", "tenant", "api_key", ...). The identity of a
    call comes from ``otel_budget.scope(user="alice")`` in the context, or from the span
    attribute named by ``attribute`` (default: ``user.id`` for "user", ``session.id`` for
    "session", ``tenant.id`` for "tenant"). ``window`` is None (the lifetime of the scope),
    "day" or "month" (UTC calendar windows).
    """

    kind: str
    max_usd: Any
    window: str | None = None
    attribute: str | None = None
    limit_nanos: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind or ":" in self.kind:
            raise ValueError(f"scope kind must be a non-empty name without ':', got {self.kind!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be None, 'day' or 'month', got {self.window!r}")
        object.__setattr__(
            self, "limit_nanos", parse_usd(self.max_usd, what=f"max_usd of scope {self.kind!r}")
        )
        if self.attribute is None:
            object.__setattr__(self, "attribute", DEFAULT_SCOPE_ATTRIBUTES.get(self.kind))


def _thresholds(values: Iterable[float]) -> tuple[float, ...]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"thresholds must be fractions like 0.8, got {value!r}")
        if math.isnan(value) or not 0 < value <= 1:
            raise ValueError(f"thresholds must be in (0, 1], got {value!r}")
        out.append(float(value))
    return tuple(sorted(set(out)))


@dataclass
class BudgetSettings:
    """Everything a ``BudgetSpanProcessor`` is configured with, validated at construction."""

    max_usd: Any = None  # default budget per trace (None: no per-trace limit)
    scopes: Sequence[ScopeRule] = ()
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    failure_policy: str = FAIL_OPEN
    default_max_output_tokens: int = 4096
    # Input bound for another instrumentation's GenAI span that does not carry its messages
    # at start (content capture off, or set at end): see ``span_projection.py``.
    assumed_input_tokens: int = 8192
    on_warning: Callable[[dict[str, Any]], Any] | None = None
    on_exceeded: Callable[[dict[str, Any]], Any] | None = None
    trace_ttl_seconds: float = 3600.0
    max_tracked_traces: int = 100_000
    # A reservation is only a guarantee if the call cannot cost more: cap the request's
    # output tokens to what the remaining budget affords (and set a cap when there is none).
    cap_output_tokens: bool = True
    # Below this many affordable output tokens the call is refused rather than truncated.
    min_output_tokens: int = 16
    # Ask providers for usage on streams (stream_options.include_usage) unless the caller
    # decided otherwise.
    stream_include_usage: bool = True
    # Our own failures and refusals are logged in full once per (site, error type), then
    # counted: at most one "N more" line per key and interval (``otel_budget.logs``).
    log_interval_seconds: float = 60.0
    # Also emit the proposed gen_ai.usage.cost.{amount,currency,source} (semantic-conventions
    # -genai PR #443) on our GenAI spans, beside otel_budget.cost.*.
    semconv_cost: bool = False
    # Loop detection (``otel_budget.loops``): a ``LoopPolicy``, True (the defaults), "warn"
    # (the defaults, reporting only) or False/"off". On by default for tool calls.
    loop_detection: Any = True
    on_loop_detected: Callable[[dict[str, Any]], Any] | None = None

    limit_nanos: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.max_usd is not None:
            self.limit_nanos = parse_usd(self.max_usd, what="max_usd")
        self.scopes = tuple(self.scopes)
        for rule in self.scopes:
            if not isinstance(rule, ScopeRule):
                raise ValueError(f"scopes must be ScopeRule objects, got {rule!r}")
        kinds = [rule.kind for rule in self.scopes]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each scope kind may have one rule, got {kinds}")
        self.thresholds = _thresholds(self.thresholds)
        if self.failure_policy not in (FAIL_OPEN, FAIL_CLOSED):
            raise ValueError(
                f"failure_policy must be {FAIL_OPEN!r} or {FAIL_CLOSED!r}, got {self.failure_policy!r}"
            )
        if (
            isinstance(self.default_max_output_tokens, bool)
            or not isinstance(self.default_max_output_tokens, int)
            or self.default_max_output_tokens <= 0
        ):
            raise ValueError(
                "default_max_output_tokens must be a positive int, "
                f"got {self.default_max_output_tokens!r}"
            )
        if (
            isinstance(self.assumed_input_tokens, bool)
            or not isinstance(self.assumed_input_tokens, int)
            or self.assumed_input_tokens <= 0
        ):
            raise ValueError(
                f"assumed_input_tokens must be a positive int, got {self.assumed_input_tokens!r}"
            )
        if (
            isinstance(self.min_output_tokens, bool)
            or not isinstance(self.min_output_tokens, int)
            or self.min_output_tokens < 1
        ):
            raise ValueError(f"min_output_tokens must be a positive int, got {self.min_output_tokens!r}")
        interval = self.log_interval_seconds
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not math.isfinite(interval)
            or interval < 0
        ):
            raise ValueError(f"log_interval_seconds must be a number >= 0, got {interval!r}")
        if not isinstance(self.semconv_cost, bool):
            raise ValueError(f"semconv_cost must be True or False, got {self.semconv_cost!r}")
        self.loop_detection = policy_of(self.loop_detection)
        for name in ("on_warning", "on_exceeded", "on_loop_detected"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be callable, got {value!r}")
        if not self.trace_ttl_seconds > 0 or not self.max_tracked_traces > 0:
            raise ValueError("trace_ttl_seconds and max_tracked_traces must be positive")
