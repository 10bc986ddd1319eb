"""What the current context says about budgets: open ``budget()`` blocks and scope identities.

    >>> import otel_budget
    >>> with otel_budget.scope(user="alice", session="s-42"):
    ...     agent.run()            # doctest: +SKIP  (calls count against alice's and s-42's caps)

Both live in ``contextvars``, like the OpenTelemetry context itself, so they follow asyncio
tasks and ``contextvars.copy_context()`` exactly as the current span does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from otel_budget.report import TraceStats

_EMPTY: Mapping[str, str] = MappingProxyType({})


class BudgetFrame:
    """One open ``budget()`` block: its ledger key, limit and running totals."""

    __slots__ = ("key", "limit", "stats", "owner")

    def __init__(self, key: str, limit: int, stats: TraceStats, owner: object) -> None:
        self.key = key
        self.limit = limit
        self.stats = stats
        # The engine that enforces this block: another budget processor in the same
        # process (one per tracer provider, say) must not count the block's calls twice.
        self.owner = owner


BUDGET_FRAMES: ContextVar[tuple[BudgetFrame, ...]] = ContextVar("otel_budget_frames", default=())
SCOPE_IDENTITIES: ContextVar[Mapping[str, str]] = ContextVar("otel_budget_scopes", default=_EMPTY)


@contextmanager
def scope(**identities: str) -> Iterator[Mapping[str, str]]:
    """Attribute the calls made inside the block to named scopes (``user="alice"``).

    Inner blocks add to (and may override) the identities of outer ones. Identities must be
    non-empty strings without control characters; anything else is a ``ValueError``.
    """
    for kind, ident in identities.items():
        if not isinstance(ident, str) or not ident or len(ident) > 256 or not ident.isprintable():
            raise ValueError(f"scope identity {kind}={ident!r} must be a printable string (1-256 chars)")
    merged = MappingProxyType({**SCOPE_IDENTITIES.get(), **identities})
    token = SCOPE_IDENTITIES.set(merged)
    try:
        yield merged
    finally:
        SCOPE_IDENTITIES.reset(token)
