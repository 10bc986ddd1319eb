"""A trace-level budget carried across services in W3C baggage, parsed as untrusted input.

    from otel_budget.propagation import trace_budget

    with trace_budget(max_usd=2.00):          # this trace, here and in every service it calls
        httpx.post(worker_url, json=task)     # the HTTP instrumentation injects the baggage

Downstream, the standard propagators (``OTEL_PROPAGATORS`` defaults to
``tracecontext,baggage``) and the HTTP server instrumentations extract it; every
``BudgetSpanProcessor`` on that trace then limits the trace to the smaller of its own
``max_usd`` and the baggage value. Baggage can only lower a budget, never raise it.

Whether services *share* the spend depends on the ledger: with ``RedisStorage`` every service
reserves in the same trace scope (``t:<trace id>``), so the trace as a whole stays within the
budget; with the in-process ledger each service enforces the limit on its own spend.

The value is parsed strictly: a plain decimal number of USD (``"2"``, ``"0.25"``; at most 9
decimals and 32 characters), no sign, exponent, NaN, infinity, unit or whitespace, at most
``MAX_BUDGET_USD``. Anything else is ignored (the local configuration applies) and logged
once per distinct value.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

from opentelemetry import baggage, context

from otel_budget.money import MAX_BUDGET_USD, NANOS_PER_USD, parse_usd

logger = logging.getLogger("otel_budget")

BAGGAGE_KEY = "otel_budget.max_usd"
_VALUE = re.compile(r"(0|[1-9][0-9]{0,6})(\.[0-9]{1,9})?", re.ASCII)
_MAX_LEN = 32
_CACHE_MAX = 256

_cache: dict[str, int | None] = {}
_rejected_logged: set[str] = set()
_lock = threading.Lock()


def parse_baggage_budget(raw: Any) -> int | None:
    """The budget in a baggage value, in nano-USD, or None if the value is not acceptable."""
    if not isinstance(raw, str):
        return None
    cached = _cache.get(raw)
    if cached is not None or raw in _cache:
        return cached
    value: int | None = None
    # fullmatch: ``$`` would also match before a trailing newline ('5\n').
    if len(raw) <= _MAX_LEN and _VALUE.fullmatch(raw):
        number = Decimal(raw)
        if number <= MAX_BUDGET_USD:
            value = int(number * NANOS_PER_USD)
    with _lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        _cache[raw] = value
        if value is None and raw not in _rejected_logged and len(_rejected_logged) < _CACHE_MAX:
            _rejected_logged.add(raw)
            logger.warning(
                "otel-budget: ignoring baggage %s=%r (expected a plain decimal USD amount "
                "up to %d); the local budget applies", BAGGAGE_KEY, raw[:64], MAX_BUDGET_USD,
            )  # fmt: skip
    return value


# The context key under which the baggage API keeps its entries: read directly, this skips
# the read-only mapping the public ``get_baggage`` builds on every call (this runs on every
# GenAI span). Falls back to the public API if the SDK ever stops exposing it.
_CONTEXT_KEY: str | None = getattr(baggage, "_BAGGAGE_KEY", None)


def baggage_limit(ctx: context.Context | None = None) -> int | None:
    """The trace budget carried in the current (or given) context's baggage, if valid."""
    if _CONTEXT_KEY is not None:
        # (``context.get_value`` without its extra call: a Context is a dict)
        entries = (context.get_current() if ctx is None else ctx).get(_CONTEXT_KEY)
        if not entries:
            return None
        raw = entries.get(BAGGAGE_KEY) if isinstance(entries, dict) else None
    else:  # pragma: no cover - older/newer API without the private key
        raw = baggage.get_baggage(BAGGAGE_KEY, ctx)
    if raw is None:
        return None
    return parse_baggage_budget(raw)


def format_budget(nanos: int) -> str:
    text = f"{Decimal(nanos) / NANOS_PER_USD:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def set_trace_budget(max_usd: Any, ctx: context.Context | None = None) -> context.Context:
    """A context whose baggage carries ``max_usd`` (never above one already carried:
    a service can tighten the budget it passes on, not loosen it)."""
    nanos = parse_usd(max_usd, what="max_usd")
    inherited = baggage_limit(ctx)
    if inherited is not None and inherited < nanos:
        nanos = inherited
    return baggage.set_baggage(BAGGAGE_KEY, format_budget(nanos), ctx)


@contextmanager
def trace_budget(max_usd: Any) -> Iterator[None]:
    """Set the trace's budget in baggage for the calls made (and propagated) in the block."""
    token = context.attach(set_trace_budget(max_usd))
    try:
        yield
    finally:
        context.detach(token)
