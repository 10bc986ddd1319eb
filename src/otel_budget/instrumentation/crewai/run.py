"""One CrewAI kickoff: its budget, and the refusal that stops it wherever CrewAI catches it.

    run = Run(crew)                       # opened by the kickoff wrapper (see ``wrappers``)
    token = RUN.set(run)
    ...
    run.stop(error)                       # a metered call or tool of the run was refused
    run.raise_if_stopped()                # every later call, agent retry and the kickoff's
                                          # return raise that same BudgetExceededError

CrewAI turns a tool's exception into text for the model ("Error executing tool: ...") and
retries an agent's task after an error (``max_retry_limit``). A refusal must stop the run,
not become one more message in the loop: the first ``BudgetExceededError`` of a run is kept
here, every metered step that follows in the same kickoff raises it again before anything is
sent or run, and the kickoff raises it if CrewAI returned normally all the same. The run is
held in a ``ContextVar``: CrewAI runs agents and tools in threads and tasks that copy the
context, so they all see (and share) the one ``Run``.

``protect`` records a crew's budget (``protect_crew``); the registry holds crews weakly.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from otel_budget.errors import BudgetExceededError
from otel_budget.money import parse_usd
from otel_budget.report import CostReport


@dataclass
class Protection:
    """A crew's budget: each kickoff runs inside ``budget(max_usd, name=name)``."""

    max_usd: Any
    name: str | None = None
    last: Any = None  # the last kickoff's ``budget`` block (its report)


class Run:
    """The state of one kickoff shared by everything it runs."""

    __slots__ = ("crew", "refusal", "_lock")

    def __init__(self, crew: Any) -> None:
        self.crew = crew
        self.refusal: BudgetExceededError | None = None
        self._lock = threading.Lock()

    def stop(self, error: BudgetExceededError) -> BudgetExceededError:
        """Keep the run's first refusal (later ones say the same: the run is over); returns
        that first one."""
        with self._lock:
            if self.refusal is None:
                self.refusal = error
            return self.refusal

    def raise_if_stopped(self) -> None:
        refusal = self.refusal
        if refusal is not None:
            raise refusal


RUN: contextvars.ContextVar[Run | None] = contextvars.ContextVar("otel_budget_crewai_run", default=None)

_PROTECTED: weakref.WeakKeyDictionary[Any, Protection] = weakref.WeakKeyDictionary()
_PROTECTED_LOCK = threading.Lock()


def protect(crew: Any, max_usd: Any, name: str | None = None) -> Protection:
    """Give ``crew`` a budget per kickoff (replacing any earlier one); validates ``max_usd``."""
    parse_usd(max_usd, what="max_usd")  # a bad limit fails here, not at the first kickoff
    protection = Protection(max_usd, name)
    with _PROTECTED_LOCK:
        _PROTECTED[crew] = protection
    return protection


def protect_copy(crew: Any, copy: Any) -> None:
    """A copy of a protected crew (``Crew.copy()``) has the same budget per kickoff."""
    protection = protection_of(crew)
    if protection is not None and copy is not crew:
        try:
            protect(copy, protection.max_usd, protection.name)
        except TypeError:  # not a crew we can hold
            pass


def protection_of(crew: Any) -> Protection | None:
    try:
        return _PROTECTED.get(crew)
    except TypeError:  # an unhashable object is never protected
        return None


def stop_run(error: BudgetExceededError) -> None:
    """Record a refusal on the current run, if any."""
    run = RUN.get()
    if run is not None:
        run.stop(error)


def raise_if_stopped() -> None:
    """Raise the current run's refusal, if it was stopped."""
    run = RUN.get()
    if run is not None and run.refusal is not None:
        raise run.refusal


def last_report(crew: Any) -> CostReport | None:
    """The cost report of ``crew``'s last (or current) protected kickoff; None before one."""
    protection = protection_of(crew)
    if protection is None or protection.last is None:
        return None
    report: CostReport = protection.last.report()
    return report


__all__ = [
    "RUN",
    "Protection",
    "Run",
    "last_report",
    "protect",
    "protect_copy",
    "protection_of",
    "raise_if_stopped",
    "stop_run",
]
