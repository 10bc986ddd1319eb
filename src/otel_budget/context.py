"""What the current context says about budgets: open ``budget()`` blocks and scope identities.

    >>> import otel_budget
    >>> with otel_budget.scope(user="alice", session="s-42"):
    ...     agent.run()            # doctest: +SKIP  (calls count against alice's and s-42's caps)

Both live in ``contextvars``, like the OpenTelemetry context itself, so they follow asyncio
tasks and ``contextvars.copy_context()`` exactly as the current span does, and (with
``otel_budget.threads`` installed, as ``budget()`` and ``BudgetInstrumentor`` do) threads and
``ThreadPoolExecutor`` workers started inside a block or scope.
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


MAX_IDENTITY_CHARS = 256
# The identity a scope rule charges when the span attribute it reads holds something that
# cannot be a ledger key (a newline, an escape sequence, 10k characters, a list...).
INVALID_IDENTITY = "<invalid>"
# Set on a span whose identity attribute was invalid: the attribute names, comma-separated.
INVALID_IDENTITY_ATTRIBUTE = "otel_budget.scope.invalid_identity"


def valid_identity(value: object) -> bool:
    """True for what may name a scope: a printable string of 1 to 256 characters.

    The one check for every identity, from ``scope()`` or from a span attribute."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_IDENTITY_CHARS
        and value.isprintable()
    )


class BudgetFrame:
    """One ``budget()`` block: its ledger key, limit and running totals; ``open`` until the
    block exits (a thread the block started may outlive it)."""

    __slots__ = ("key", "limit", "open", "owner", "stats")

    def __init__(self, key: str, limit: int, stats: TraceStats, owner: object) -> None:
        self.key = key
        self.limit = limit
        self.stats = stats
        # The engine that enforces this block: another budget processor in the same
        # process (one per tracer provider, say) must not count the block's calls twice.
        self.owner = owner
        self.open = True


BUDGET_FRAMES: ContextVar[tuple[BudgetFrame, ...]] = ContextVar("otel_budget_frames", default=())
SCOPE_IDENTITIES: ContextVar[Mapping[str, str]] = ContextVar("otel_budget_scopes", default=_EMPTY)
# The innermost ``agent_span`` block's agent name: the calls made in it are its spend.
CURRENT_AGENT: ContextVar[str | None] = ContextVar("otel_budget_agent", default=None)


@contextmanager
def scope(**identities: str) -> Iterator[Mapping[str, str]]:
    """Attribute the calls made inside the block to named scopes (``user="alice"``).

    Inner blocks add to (and may override) the identities of outer ones. Identities must be
    non-empty strings without control characters; anything else is a ``ValueError``.
    """
    for kind, ident in identities.items():
        if not valid_identity(ident):
            raise ValueError(
                f"scope identity {kind}={ident!r:.80} must be a printable string "
                f"(1-{MAX_IDENTITY_CHARS} chars)"
            )
    merged = MappingProxyType({**SCOPE_IDENTITIES.get(), **identities})
    token = SCOPE_IDENTITIES.set(merged)
    try:
        yield merged
    finally:
        SCOPE_IDENTITIES.reset(token)
