"""Logs an operator can read: our own failures, refusals and soft limits, rate-limited."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace

from otel_budget import BudgetExceededError, ScopeRule, scope
from otel_budget import attributes as attrs
from otel_budget.logs import RateLimitedLog
from otel_budget.metered import begin_call
from otel_budget.money import format_usds, parse_usd
from otel_budget.storage import MemoryStorage

LOGGER = "otel_budget"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class BrokenStorage(MemoryStorage):
    """A ledger whose backend is down: every reservation fails."""

    def reserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("ledger down")


def llm_call(tracer: trace.Tracer, usd: float, processor: Any = None) -> None:
    call = begin_call(
        tracer, "chat test-model", attributes={
            attrs.GEN_AI_OPERATION_NAME: "chat", attrs.GEN_AI_PROVIDER_NAME: "openai",
            attrs.GEN_AI_REQUEST_MODEL: "test-model",
        }, projected_nanos=parse_usd(usd), name="test-model", provider="openai",
        processor=processor,
    )  # fmt: skip
    call.finish(parse_usd(usd), input_tokens=10, output_tokens=5)


def records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[Any]:
    return [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= level]


def in_threads(n: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# -- the rate-limited log ---------------------------------------------------------------------


def test_first_occurrence_in_full_then_one_count_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    log = RateLimitedLog(interval=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        try:
            raise ConnectionError("redis down")
        except ConnectionError as exc:
            assert log("reserve", exc) is True
            for _ in range(99):
                assert log("reserve", exc) is False
            clock.now += 59
            log("reserve", exc)  # still inside the interval: counted only
            clock.now += 1
            log("reserve", exc)  # the interval passed: one line with the count
            log("reserve", exc)
    lines = records(caplog)
    assert len(lines) == 2
    first, summary = lines
    assert first.exc_info is not None and "redis down" in first.getMessage()
    assert "logged once" not in first.getMessage()
    assert summary.exc_info is None
    assert "101 more" in summary.getMessage() and "ConnectionError in reserve" in summary.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        log.flush()  # the one counted after the summary
    assert ["1 more" in r.getMessage() for r in records(caplog)] == [True]


def test_distinct_sites_and_types_each_get_their_first_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RateLimitedLog(interval=60, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(10):
            log("reserve", ConnectionError("a"))
            log("reserve", TimeoutError("b"))
            log("commit", ConnectionError("c"))
            log("identity user.id", message="bad identity")
    assert len(records(caplog)) == 4


def test_memory_is_bounded_by_max_keys(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RateLimitedLog(interval=60, clock=clock, max_keys=8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for i in range(10_000):
            log(f"site {i}", ValueError("x"))
        clock.now += 60
        log("site 99999", ValueError("x"))
    assert len(log._entries) <= 9
    # 8 first lines, the overflow's first count, and one count a minute later.
    assert len(records(caplog)) == 10


# -- through the engine -------------------------------------------------------------------------


def test_storm_of_5000_failures_from_32_threads_logs_a_handful_of_lines(
    make_processor: Any, tracer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis down under fail_closed: every call is refused; each refusal and each internal
    # error used to write its own line (5,560 lines for a 4 s outage at 32 threads).
    make_processor(max_usd=1.0, storage=BrokenStorage(), failure_policy="fail_closed")
    refused = [0] * 32

    def work(i: int) -> None:
        for _ in range(5000 // 32 + (i < 5000 % 32)):
            with tracer.start_as_current_span("agent"):
                try:
                    llm_call(tracer, 0.01)
                except BudgetExceededError as exc:
                    assert exc.reason == "internal_error"
                    refused[i] += 1

    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        in_threads(32, work)
    assert sum(refused) == 5000
    lines = records(caplog)
    assert 1 <= len(lines) <= 6, [r.getMessage()[:80] for r in lines]
    tracebacks = [r for r in lines if r.exc_info]
    assert len(tracebacks) == 1 and "ledger down" in tracebacks[0].getMessage()


def test_the_count_of_an_outage_is_logged_after_the_interval(
    make_processor: Any, tracer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    processor = make_processor(max_usd=1.0, storage=BrokenStorage(), failure_policy="fail_open")
    clock = FakeClock()
    processor.runtime.engine.log_once.clock = clock
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(20):
            with tracer.start_as_current_span("agent"):
                llm_call(tracer, 0.01)
        clock.now += 60
        with tracer.start_as_current_span("agent"):
            llm_call(tracer, 0.01)
    messages = [r.getMessage() for r in records(caplog)]
    assert len(messages) == 2 and "20 more" in messages[1], messages


def test_500_traces_crossing_thresholds_log_no_line_per_trace(
    make_processor: Any, tracer: Any, exporter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    warnings: list[dict[str, Any]] = []
    make_processor(max_usd=0.10, on_warning=warnings.append)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(500):
            with tracer.start_as_current_span("agent"):
                llm_call(tracer, 0.06)  # 60 %: crosses 50 % of the trace's budget
    assert len(warnings) == 500  # every crossing still reaches the callback ...
    roots = [s for s in exporter.get_finished_spans() if s.name == "agent"]
    assert all(
        any(e.name == attrs.EVENT_THRESHOLD for e in s.events) for s in roots
    )  # ... and the root span's events
    assert [r.getMessage() for r in records(caplog)] == []


def test_500_budget_blocks_crossing_thresholds_log_nothing(
    make_processor: Any, tracer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from otel_budget import budget

    make_processor()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(500):
            with budget(max_usd=0.10):
                llm_call(tracer, 0.06)
    # (Only the once-per-process note that no LLM library is instrumented, when first.)
    lines = [r.getMessage() for r in records(caplog)]
    assert [line for line in lines if "no LLM library is instrumented" not in line] == []


def test_named_scope_logs_each_crossing_once_with_one_precision(
    make_processor: Any, tracer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    make_processor(scopes=[ScopeRule("user", max_usd=0.01)])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with scope(user="alice"):
            for _ in range(9):  # $0.0099 of $0.01
                with tracer.start_as_current_span("agent"):
                    llm_call(tracer, 0.0011)
    crossed = [r.getMessage() for r in records(caplog) if "crossed" in r.getMessage()]
    assert len(crossed) == 3, crossed  # 50 %, 80 %, 95 %: once each
    assert "user:alice" in crossed[0]
    # both amounts with 6 decimals (the limit used to read "$0.0100" beside "$0.005500")
    assert crossed[0].endswith("($0.005500 of $0.010000)"), crossed[0]


def test_refusal_message_uses_one_precision(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=1.0)
    with tracer.start_as_current_span("agent"):
        llm_call(tracer, 0.995)
        with pytest.raises(BudgetExceededError) as info:
            llm_call(tracer, 0.006)
    # every amount with 6 decimals, because one of them is below a cent
    assert "projected at $0.006000" in str(info.value)
    assert "$0.995000 spent + $0.000000 reserved of $1.000000" in str(info.value)


def test_format_usds_shares_one_precision() -> None:
    assert format_usds(5_000_000, 2_000_000_000) == ("$0.005000", "$2.000000")
    assert format_usds(50_000_000, 2_000_000_000) == ("$0.0500", "$2.0000")
    assert format_usds(0, 1) == ("$0.000000", "$0.000000")


def test_processor_passes_its_log_interval(make_processor: Any) -> None:
    processor = make_processor(1.0, log_interval_seconds=5)
    assert processor.settings.log_interval_seconds == 5
    assert processor.engine.log_once.interval == 5
    with pytest.raises(ValueError, match="log_interval_seconds"):
        make_processor(1.0, log_interval_seconds=-1)
