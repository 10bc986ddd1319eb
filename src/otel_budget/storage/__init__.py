"""Ledger storage: one small interface, an in-memory and a Redis implementation.

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
    MAX_AMOUNT,
    PROCESS_SCOPE_KEY,
    UNLIMITED,
    CommitResult,
    CommitStatus,
    LedgerStorage,
    ReserveResult,
    ReserveStatus,
    ScopeLimit,
    ScopeUsage,
    settle_amount,
)
from otel_budget.storage.memory import MemoryStorage


def __getattr__(name: str) -> object:
    # RedisStorage needs the optional redis-py: imported only when asked for.
    if name in ("RedisStorage", "LedgerUnavailableError"):
        from otel_budget.storage import redis as _redis_storage

        return getattr(_redis_storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "GLOBAL_PAUSE_KEY",
    "MAX_AMOUNT",
    "PROCESS_SCOPE_KEY",
    "UNLIMITED",
    "CommitResult",
    "CommitStatus",
    "LedgerStorage",
    "MemoryStorage",
    "ReserveResult",
    "ReserveStatus",
    "ScopeLimit",
    "ScopeUsage",
    "settle_amount",
]
