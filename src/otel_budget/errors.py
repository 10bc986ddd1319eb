"""The one exception otel-budget lets reach an application: ``BudgetExceededError``.

    >>> from otel_budget import BudgetExceededError, budget
    >>> try:
    ...     with budget(max_usd=0.50):
    ...         run_agent()                                    # doctest: +SKIP
    ... except BudgetExceededError as exc:
    ...     print(exc.scope, exc.spent_usd, exc.remaining_usd)  # doctest: +SKIP

Everything else that goes wrong inside otel-budget is logged once and handled by the
``failure_policy`` setting (see ``otel_budget.settings``), never raised into the app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from otel_budget.report import CostReport

# Why a call was refused (``BudgetExceededError.reason``).
REASON_LIMIT = "limit"  # the projected cost does not fit in the remaining budget
REASON_PAUSED = "paused"  # a kill switch is on for the scope or globally
REASON_UNKNOWN_MODEL = "unknown_model"  # no price and the unknown-model policy is "block"
REASON_INTERNAL_ERROR = "internal_error"  # failure_policy="fail_closed" and otel-budget failed
# A limit or the ledger could not be configured (an invalid OTEL_BUDGET_MAX_USD, an unusable
# OTEL_BUDGET_REDIS_URL) and the failure policy refuses every paid call until it is fixed.
REASON_CONFIGURATION = "configuration"
# A parameter the cost depends on is not a number we can project (max_tokens="lots", n=True).
REASON_INVALID_REQUEST = "invalid_request"
# The same tool (or, on opt-in, the same LLM request) repeated too often in one run: a loop
# (``otel_budget.loops``). ``BudgetExceededError.loop`` says what repeated.
REASON_LOOP = "loop_detected"


class BudgetExceededError(Exception):
    """A call was refused before it was sent, because it would overshoot a budget.

    Attributes are in USD (floats, for display); ``report`` is the cost report of the run
    (trace or ``budget()`` block) at the moment of refusal, or ``None`` when unavailable.
    """

    def __init__(
        self,
        message: str,
        *,
        budget_usd: float | None = None,
        spent_usd: float = 0.0,
        projected_usd: float = 0.0,
        remaining_usd: float | None = None,
        reserved_usd: float = 0.0,
        scope: str = "",
        trace_id: str | None = None,
        reason: str = REASON_LIMIT,
        report: CostReport | None = None,
    ) -> None:
        super().__init__(message)
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd
        self.projected_usd = projected_usd
        self.remaining_usd = remaining_usd
        self.reserved_usd = reserved_usd
        self.scope = scope
        self.trace_id = trace_id
        self.reason = reason
        self.report = report
        # Set when an ``on_exceeded`` callback answered ``Substitute(value)``: instrumented
        # calls then return ``value`` instead of raising.
        self.substitute: Substitute | None = None
        # For ``reason="loop_detected"``: what repeated (``LoopHit.to_dict()``).
        self.loop: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The refusal as plain data, for ``on_exceeded`` callbacks and logs."""
        return {
            "reason": self.reason,
            "scope": self.scope,
            "budget_usd": self.budget_usd,
            "spent_usd": self.spent_usd,
            "reserved_usd": self.reserved_usd,
            "projected_usd": self.projected_usd,
            "remaining_usd": self.remaining_usd,
            "trace_id": self.trace_id,
            "loop": None if self.loop is None else dict(self.loop),
        }


class Substitute:
    """What an ``on_exceeded`` callback returns to make a refused call return ``value``
    instead of raising ``BudgetExceededError`` (e.g. ``Substitute(None)``)."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Substitute({self.value!r})"
