"""A processor whose configuration failed under ``fail_closed``: every paid call is refused.

    from otel_budget.misconfigured import refuse_paid_calls

    processor = BudgetSpanProcessor(**config.kwargs)
    refuse_paid_calls(processor, "OTEL_BUDGET_MAX_USD='nan' is invalid (...)", "OTEL_BUDGET_MAX_USD")
    # every call that would cost something now raises
    # BudgetExceededError(reason="configuration", scope="configuration")

A limit that cannot be read or a ledger that cannot be built is not "no budget": zero-code
runs cannot raise the configuration error into the app, so each paid call is refused
instead, with a message naming the variable to fix. Calls that cost nothing (a projection
of zero: a free model) still go through; the rest of the processor (the breakdown, the
settling of calls already sent) works as configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otel_budget.engine import KIND_LLM, BudgetEngine, Charge
from otel_budget.errors import REASON_CONFIGURATION, BudgetExceededError
from otel_budget.steps import Op

CONFIGURATION_SCOPE = "configuration"


class MisconfiguredEngine(BudgetEngine):
    """A ``BudgetEngine`` that refuses every reservation of a paid call, because a limit or
    the ledger could not be configured (``problem`` says which variable and why)."""

    def __init__(self, engine: BudgetEngine, problem: str, variable: str) -> None:
        super().__init__(engine.settings, engine.storage, engine.prices, clock=engine.clock)
        self.metrics = engine.metrics
        self.configuration_error = problem
        self.variable = variable

    def configuration_refusal(self, charge: Charge) -> BudgetExceededError:
        error = self.refusal(
            REASON_CONFIGURATION, charge, None,
            f"otel-budget: refused {charge.operation} {charge.name}: the budget is not "
            f"configured: {self.configuration_error}",
        )  # fmt: skip
        error.scope = CONFIGURATION_SCOPE
        return error

    def reserve_plan(
        self,
        lease_id: Any,
        trace_id: int,
        parentless: bool,
        attributes: Mapping[str, Any] | None,
        minimum: int,
        maximum: int,
        kind: str = KIND_LLM,
        name: str = "unknown",
        provider: str = "unknown",
        operation: str = "chat",
        loop: tuple[str, bytes] | None = None,
    ) -> tuple[Charge, Op]:
        if max(minimum, maximum) <= 0:  # costs nothing: nothing to refuse
            return super().reserve_plan(
                lease_id, trace_id, parentless, attributes, minimum, maximum,
                kind, name, provider, operation, loop,
            )  # fmt: skip
        try:
            _, stats, _ = self.scopes_for(trace_id, parentless, attributes)
        except Exception:
            stats = ()
        charge = Charge(lease_id, trace_id, (), minimum, kind, name, provider, operation, stats)
        raise self.configuration_refusal(charge)


def refuse_paid_calls(processor: Any, problem: str, variable: str) -> None:
    """Make ``processor`` (its runtime) refuse every paid call with reason ``configuration``.
    Call it right after creating the processor, before any call is metered."""
    runtime = processor.runtime
    runtime.engine = MisconfiguredEngine(runtime.engine, problem, variable)


def configuration_error(runtime: Any) -> str | None:
    """The configuration problem that makes ``runtime`` refuse paid calls, if any."""
    return getattr(getattr(runtime, "engine", None), "configuration_error", None)


__all__ = [
    "CONFIGURATION_SCOPE",
    "MisconfiguredEngine",
    "configuration_error",
    "refuse_paid_calls",
]
