"""Rate-limited logging of otel-budget's own failures and refusals.

    >>> from otel_budget.logs import RateLimitedLog
    >>> log = RateLimitedLog(interval=60.0)
    >>> log("reserve", ConnectionError("redis down"))       # first: logged with its traceback
    True
    >>> log("reserve", ConnectionError("redis down"))       # counted, logged later as "N more"
    False

A broken dependency on the hot path (the Redis ledger down, a bug in a price plan) fails
every LLM call: one log line per call would bury the operator (200 calls printed 871 lines,
a 4 s outage at 32 threads 5,560). So each (site, error type) is logged in full once, with
its traceback; later occurrences are only counted, and at most one line per ``interval``
(per key) says how many more there were. Memory is bounded: past ``max_keys`` distinct keys,
new ones are counted together under one overflow line. ``flush()`` logs what is still
counted (e.g. at shutdown).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["DEFAULT_LOG_INTERVAL", "RateLimitedLog"]

DEFAULT_LOG_INTERVAL = 60.0
_MAX_KEYS = 1024
_OVERFLOW = ("(other sites)", "")

_default_logger = logging.getLogger("otel_budget")


class _Entry:
    __slots__ = ("last", "pending", "label", "level")

    def __init__(self, now: float, label: str, level: int) -> None:
        self.last = now  # when this key last wrote a line
        self.pending = 0  # occurrences since then, not yet reported
        self.label = label  # what the summary line says it counts
        self.level = level


class RateLimitedLog:
    """Log the first occurrence of a (site, error type) in full, then count; at most one
    summary line per ``interval`` seconds and key. Thread-safe; ``clock`` is injectable."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        interval: float = DEFAULT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = _MAX_KEYS,
    ) -> None:
        self.logger = logger if logger is not None else _default_logger
        self.interval = float(interval)
        self.clock = clock
        self.max_keys = max_keys
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def __call__(self, site: str, exc: BaseException | None = None, message: str = "") -> bool:
        """An internal error at ``site`` (or, without ``exc``, a warning ``message``).
        Returns True when this occurrence was logged in full (the first of its key)."""
        if exc is not None:
            kind = type(exc).__name__
            if not self._count((site, kind), f"{kind} in {site}", logging.ERROR):
                return False
            self.logger.error(
                "otel-budget internal error in %s: %s (further %s errors here are counted, "
                "one line per %gs)", site, message or exc, kind, self.interval, exc_info=exc,
            )  # fmt: skip
            return True
        if not self._count((site, message), message, logging.WARNING):
            return False
        self.logger.warning("otel-budget: %s", message)
        return True

    def warning(self, key: str, message: str) -> bool:
        """A warning line (e.g. a refusal) under ``key``: the first in full, then counted."""
        if not self._count(("warning", key), key, logging.WARNING):
            return False
        self.logger.warning("%s", message)
        return True

    def flush(self) -> None:
        """Log every count not reported yet (one line per key)."""
        now = self.clock()
        with self._lock:
            pending = [(e.level, e.pending, e.label) for e in self._entries.values() if e.pending]
            for entry in self._entries.values():
                entry.pending = 0
                entry.last = now
        for level, count, label in pending:
            self._summarise(level, count, label)

    def _count(self, key: tuple[str, str], label: str, level: int) -> bool:
        """True for the first occurrence of ``key`` (the caller logs it in full); otherwise
        count it, and write the summary line when the key's interval has passed."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if len(self._entries) < self.max_keys:
                    self._entries[key] = _Entry(now, label, level)
                    return True
                entry = self._entries.get(_OVERFLOW)
                if entry is None:  # one more seat, shared by every key past max_keys
                    label = "occurrences at other sites (too many distinct ones to track)"
                    entry = _Entry(now - self.interval, label, logging.ERROR)
                    self._entries[_OVERFLOW] = entry
            entry.pending += 1
            if now - entry.last < self.interval:
                return False
            count, entry.pending, entry.last = entry.pending, 0, now
        self._summarise(entry.level, count, entry.label)
        return False

    def _summarise(self, level: int, count: int, label: str) -> None:
        self.logger.log(
            level, "otel-budget: %d more in the last %gs: %s", count, self.interval, label
        )
