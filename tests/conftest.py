"""Shared fixtures: one global SDK TracerProvider whose processors each test swaps in.

The OpenTelemetry API lets a process set the global provider once, so the tests install a
provider with a switchable processor chain: each test gets a fresh ``BudgetSpanProcessor``
and a fresh in-memory exporter, in the order a user would register them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_budget import BudgetSpanProcessor, ModelPrice, PriceBook
from otel_budget.processor import _ACTIVE
from otel_budget.runtime import _CURRENT
from tests.helpers import StartRecorder


@pytest.fixture(autouse=True, scope="session")
def _journal_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Redis ledgers journal into a temporary directory, never the user's state directory
    (subprocesses inherit it)."""
    before = os.environ.get("OTEL_BUDGET_JOURNAL_DIR")
    os.environ["OTEL_BUDGET_JOURNAL_DIR"] = str(tmp_path_factory.mktemp("journal"))
    yield
    if before is None:
        os.environ.pop("OTEL_BUDGET_JOURNAL_DIR", None)
    else:
        os.environ["OTEL_BUDGET_JOURNAL_DIR"] = before


class SwitchProcessor(SpanProcessor):
    def __init__(self) -> None:
        self.chain: list[SpanProcessor] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        for processor in list(self.chain):
            processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: Any) -> None:
        for processor in list(self.chain):
            processor.on_end(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


SWITCH = SwitchProcessor()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SWITCH)
trace.set_tracer_provider(PROVIDER)

# Round numbers make expected costs easy to read: $1/MTok in, $2/MTok out.
TEST_PRICES = {
    "test-model": ModelPrice(input=1, output=2),
    "big-model": ModelPrice(input=1000, output=2000),
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    yield exp
    exp.clear()


@pytest.fixture
def make_processor(exporter: InMemorySpanExporter) -> Iterator[Any]:
    created: list[BudgetSpanProcessor] = []

    def make(max_usd: Any = None, **kwargs: Any) -> BudgetSpanProcessor:
        kwargs.setdefault("prices", PriceBook(overrides=TEST_PRICES))
        processor = BudgetSpanProcessor(max_usd, **kwargs)
        created.append(processor)
        SWITCH.chain[:] = [processor, SimpleSpanProcessor(exporter)]
        return processor

    yield make
    SWITCH.chain[:] = []
    for processor in created:
        processor.shutdown()
    _ACTIVE.clear()
    _CURRENT.clear()


@pytest.fixture
def tracer() -> trace.Tracer:
    return trace.get_tracer("tests")


@pytest.fixture
def starts() -> StartRecorder:
    return StartRecorder()


@pytest.fixture
def setup(make_processor: Any, starts: StartRecorder, instrumented: Any) -> Any:
    """For the instrumentor suites (each defines ``instrumented``): a budget processor on the
    global provider, a recorder of span attributes at start, the library instrumented."""

    def make(max_usd: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("prices", PriceBook())
        processor = make_processor(max_usd, **kwargs)
        SWITCH.chain.insert(0, starts)  # first: sees spans a refusal in on_start would hide
        return processor

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The test that waits for the CrewAI suite (built and run in a venv of its own, in the
    background, by tests/run.sh) runs last: by then that run has long finished, and the main
    suite never sits idle waiting for it."""
    waits = [item for item in items if item.name == "test_crewai_suite_in_its_own_venv"]
    if waits:
        items[:] = [item for item in items if item not in waits] + waits


@pytest.fixture
def private_server() -> Iterator[Any]:
    """A redis-server of its own, for tests that kill or freeze it (thawed, then removed)."""
    from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer

    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    srv = RedisServer().start()
    yield srv
    srv.thaw()
    srv.cleanup()
