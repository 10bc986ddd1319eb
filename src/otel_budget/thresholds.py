"""Soft limits: tell when a scope's spend crosses a fraction of its budget (50/80/95% default).

    >>> from otel_budget.settings import BudgetSettings
    >>> settings = BudgetSettings(max_usd=1, thresholds=(0.5, 0.8), on_warning=print)
    >>> engine.settle(charge, actual_nanos)   # crossing 50% calls on_warning  # doctest: +SKIP

``ThresholdAlerts`` is the part of ``BudgetEngine`` (``otel_budget.engine``) that runs after
each settled call. Each threshold fires once per scope: the ``on_warning`` callback, the
``otel_budget.budget.warnings`` counter and, for runs, a ``TraceStats`` event and an event on
the run's root span.

Logging: a run (a trace ``t:`` or a ``budget()`` block ``b:``) is one of thousands, so its
crossings go to spans, events, metrics and the callback only, never one log line per run.
Named scopes (``user:alice``, ``tenant:acme``) and the process scope log one line per
crossing, every amount with one precision.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from otel_budget import attributes as attrs
from otel_budget.logs import RateLimitedLog
from otel_budget.money import format_usds, to_usd
from otel_budget.report import TraceStats
from otel_budget.scopes import PROCESS_SCOPE
from otel_budget.settings import BudgetSettings
from otel_budget.storage import ScopeUsage

if TYPE_CHECKING:
    from otel_budget.engine import Charge

__all__ = ["MAX_NAMED_THRESHOLD_STATE", "RUN_SCOPE_PREFIXES", "ThresholdAlerts", "threshold_due"]

logger = logging.getLogger("otel_budget")

MAX_NAMED_THRESHOLD_STATE = 100_000
# Scopes of one run: their crossings are never logged (one line per trace would flood).
RUN_SCOPE_PREFIXES = ("t:", "b:")


def _next_alert(thresholds: Sequence[float], index: int, limit: int) -> float:
    """The spend from which ``thresholds[index]`` fires (inf: none left; 0: check always)."""
    if index >= len(thresholds):
        return math.inf
    return thresholds[index] * limit if limit else 0


def threshold_due(charge: Charge, usages: tuple[ScopeUsage, ...]) -> bool:
    """Whether a settled call may have crossed a threshold, or reached a named scope (its
    remaining-budget gauge): only then is ``_check_thresholds`` run. Runs' spend only grows,
    so a run below its ``alert_at`` crossed nothing."""
    for stats in charge.stats:
        if stats.spent >= stats.alert_at:
            return True
    for usage in usages:  # noqa: SIM110 (a loop: any() would build a generator per call)
        if not usage.key.startswith(RUN_SCOPE_PREFIXES):
            return True
    return False


class ThresholdAlerts:
    """Soft-limit checks; mixed into ``BudgetEngine``."""

    settings: BudgetSettings
    metrics: Any
    log_once: RateLimitedLog
    _lock: threading.Lock
    _named_thresholds: OrderedDict[str, int]

    def _check_thresholds(self, charge: Charge, usages: tuple[ScopeUsage, ...]) -> None:
        """Fire the thresholds a settled ``charge`` crossed."""
        thresholds = self.settings.thresholds
        if not thresholds and self.metrics is None:
            return
        # Runs (traces and budget blocks) keep their own index in their stats.
        for stats in charge.stats:
            limit = stats.limit
            if limit is None or stats.spent < stats.alert_at:  # (nothing crossed: see _fire)
                continue
            self._fire(stats.label, stats.spent, limit, stats, None)
        metrics = self.metrics
        for usage in usages:
            if usage.key.startswith(RUN_SCOPE_PREFIXES):
                continue  # covered by the stats above
            if metrics is not None:
                metrics.record_remaining(usage.key, to_usd(usage.limit - usage.spent))
            if usage.key != PROCESS_SCOPE:
                self._fire(usage.key, usage.spent, usage.limit, None, usage.key)

    def _fire(
        self, scope: str, spent: int, limit: int, stats: TraceStats | None, named_key: str | None
    ) -> None:
        thresholds = self.settings.thresholds
        if stats is not None:
            index = stats.threshold_index
        else:
            index = self._named_thresholds.get(named_key or "", 0)
        if index >= len(thresholds) or (limit and spent < thresholds[index] * limit):
            if stats is not None:
                stats.alert_at = _next_alert(thresholds, index, limit)
            return  # the common case: nothing new crossed, nothing allocated
        fired: list[float] = []
        while index < len(thresholds) and (
            limit == 0 or spent >= thresholds[index] * limit
        ):
            fired.append(thresholds[index])
            index += 1
        if stats is not None:
            stats.threshold_index = index
            stats.alert_at = _next_alert(thresholds, index, limit)
        else:
            with self._lock:
                self._named_thresholds[named_key or ""] = index
                if len(self._named_thresholds) > MAX_NAMED_THRESHOLD_STATE:
                    self._named_thresholds.popitem(last=False)
        log_it = not scope.startswith(RUN_SCOPE_PREFIXES)
        for threshold in fired:
            if self.metrics is not None:
                try:
                    self.metrics.record_warning(named_key or scope, threshold)
                except Exception as exc:
                    self.log_once("metrics", exc)
            info = {
                "scope": scope,
                "threshold": threshold,
                "spent_usd": to_usd(spent),
                "budget_usd": to_usd(limit),
                "remaining_usd": to_usd(limit - spent),
            }
            if log_it:
                shown_spent, shown_limit = format_usds(spent, limit)
                logger.warning(
                    "otel-budget: scope %s crossed %d%% of its budget (%s of %s)",
                    scope, round(threshold * 100), shown_spent, shown_limit,
                )  # fmt: skip
            if stats is not None:
                stats.add_event(attrs.EVENT_THRESHOLD, **info)
                root = stats.root_span
                if root is not None:
                    try:
                        root.add_event(attrs.EVENT_THRESHOLD, {
                            "otel_budget.threshold": threshold,
                            attrs.TRACE_SPENT_USD: info["spent_usd"],
                            attrs.TRACE_BUDGET_USD: info["budget_usd"],
                        })  # fmt: skip
                    except Exception as exc:
                        self.log_once("threshold event", exc)
            callback = self.settings.on_warning
            if callback is not None:
                try:
                    callback(info)
                except Exception as exc:
                    self.log_once("on_warning callback", exc)
