"""Helpers shared by the instrumentor test suites (real SDKs against the fake provider)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import StatusCode

from otel_budget import attributes as attrs
from otel_budget.engine import PROCESS_SCOPE
from otel_budget.testing import FakeLLMServer

NANOS = 1_000_000_000


class StartRecorder(SpanProcessor):
    """Keeps a copy of every span's attributes as they are when the span starts."""

    def __init__(self) -> None:
        self.at_start: dict[int, dict[str, Any]] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.at_start[span.get_span_context().span_id] = dict(span.attributes or {})


def spans_named(exporter: Any, name: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def only_span(exporter: Any, name: str) -> Any:
    found = spans_named(exporter, name)
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def nanos(usd: float) -> int:
    return round(usd * NANOS)


def ledger(processor: Any, key: str = PROCESS_SCOPE) -> tuple[int, int]:
    """(spent, reserved) of one ledger scope, in nano-USD."""
    usage = processor.storage.usage(key)
    return (0, 0) if usage is None else (usage.spent, usage.reserved)


def assert_error_span(span: Any, error_type: str) -> None:
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes[attrs.ERROR_TYPE] == error_type
    # An exception event on refusals only (the official instrumentations record none).
    recorded = any(event.name == "exception" for event in span.events)
    assert recorded is (error_type == "BudgetExceededError"), span.events


def assert_settled_from_server(span: Any, server: FakeLLMServer) -> None:
    """The span's cost is exactly what the fake provider billed for that request."""
    record = server.last_call
    assert record is not None and record.billed
    assert span.attributes[attrs.COST_USD] == pytest.approx(record.billed_nanos / NANOS, abs=1e-9)
    assert nanos(span.attributes[attrs.COST_USD]) == record.billed_nanos


def hammer(
    store: Any, scopes: Sequence[Any], seed: int, lease_base: int, rounds: int
) -> tuple[int, int]:
    """One concurrent client of a ledger: reserve a random amount, then release 10 % of the
    admitted calls and commit the rest twice (a retried commit must count once). Returns
    (calls admitted, nano-USD committed)."""
    rng = random.Random(seed)
    admitted = committed = 0
    for n in range(rounds):
        lease = lease_base | n
        amount = rng.randint(1, 20_000_000)
        if store.reserve(lease, scopes, amount).ok:
            admitted += 1
            if rng.random() < 0.1:
                store.release(lease)
            else:
                actual = rng.randint(0, amount)
                store.commit(lease, actual)
                store.commit(lease, actual)
                committed += actual
    return admitted, committed
