"""Ledger storage: one small interface, an in-memory implementation (and Redis, later).

    >>> from otel_budget.storage import MemoryStorage, ScopeLimit
    >>> store = MemoryStorage()
    >>> store.reserve(1, (ScopeLimit("t:abc", 5_000_000_000),), 1_000_000).ok
    True
    >>> store.commit(1, 800_000).status.value
    'ok'

Modelled on the ``limits`` library: the storage only moves integers atomically; deciding
*which* scopes a call belongs to and what their limits are is the engine's job.
"""

from otel_budget.storage.base import (
    GLOBAL_PAUSE_KEY,
    CommitResult,
    CommitStatus,
    LedgerStorage,
    ReserveResult,
    ReserveStatus,
    ScopeLimit,
    ScopeUsage,
)
from otel_budget.storage.memory import MemoryStorage

__all__ = [
    "GLOBAL_PAUSE_KEY",
    "CommitResult",
    "CommitStatus",
    "LedgerStorage",
    "MemoryStorage",
    "ReserveResult",
    "ReserveStatus",
    "ScopeLimit",
    "ScopeUsage",
]
