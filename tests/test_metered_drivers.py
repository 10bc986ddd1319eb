"""The blocking drivers of the one metered-call path give the generators' answers.

    pytest tests/test_metered_drivers.py

``MeteredCall.settle``/``release`` and ``BudgetEngine.reserve``/``settle``/``release`` call
the ledger directly, without a generator (the processor's path for other instrumentations'
spans, and every sync settlement); the ``*_steps`` generators are the same decisions around
a ``yield`` (the async path, and larger decisions composed of them, such as ``begin_steps``).
Each scenario below runs through both and must leave the same trace: what was raised, what
was reserved and spent in the ledger, what the span says, what the run's report says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_budget import BudgetExceededError
from otel_budget.metered import MeteredCall, begin, begin_steps
from otel_budget.money import parse_usd
from otel_budget.scopes import trace_key
from otel_budget.steps import run
from otel_budget.storage import MemoryStorage

DRIVERS = ("blocking", "steps")
CAP = {"gen_ai.request.max_tokens": 77}


def _begin(driver: str, runtime: Any, tracer: trace.Tracer, **kw: Any) -> MeteredCall:
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model"}
    kw.setdefault("name", "test-model")
    kw.setdefault("provider", "openai")
    if driver == "blocking":
        return begin(runtime, tracer, "chat test-model", attributes, **kw)
    storage = runtime.storage if runtime is not None else None
    return run(begin_steps(runtime, tracer, "chat test-model", attributes, **kw), storage)


def _settle(driver: str, call: MeteredCall, actual: int, **kw: Any) -> None:
    if driver == "blocking":
        call.settle(actual, **kw)
    else:
        run(call.settle_steps(actual, **kw), call._storage())


def _release(driver: str, call: MeteredCall, error: BaseException) -> None:
    if driver == "blocking":
        call.release(error)
    else:
        run(call.release_steps(error), call._storage())


class _Broken(MemoryStorage):
    """A ledger whose ``fail`` operations raise (an outage, as the caller sees it)."""

    def __init__(self, fail: tuple[str, ...]) -> None:
        super().__init__()
        self.fail = fail

    def reserve_up_to(self, *args: Any, **kw: Any) -> Any:
        if "reserve_up_to" in self.fail:
            raise ConnectionError("ledger down")
        return super().reserve_up_to(*args, **kw)

    def commit(self, *args: Any, **kw: Any) -> Any:
        if "commit" in self.fail:
            raise ConnectionError("ledger down")
        return super().commit(*args, **kw)


def _outcome(
    processor: Any, exporter: InMemorySpanExporter, trace_id: int, error: BaseException | None
) -> dict[str, Any]:
    usage = processor.storage.usage(trace_key(trace_id))
    report = processor.trace_report(trace_id)
    spans = [
        (
            s.name,
            {k: v for k, v in (s.attributes or {}).items() if k != "otel_budget.budget.scope"},
            s.status.status_code.name,
            [e.name for e in s.events],
            s.end_time is not None,
        )
        for s in exporter.get_finished_spans()
        if s.name != "agent"
    ]
    return {
        "error": None if error is None else (type(error).__name__, getattr(error, "reason", None)),
        "ledger": None if usage is None else (usage.spent, usage.reserved),
        "report": None if report is None else (report.total_usd, report.calls, report.aborts, report.overshoot_usd),
        "spans": spans,
    }


def _scenario(
    name: str, driver: str, make_processor: Any, tracer: trace.Tracer,
    exporter: InMemorySpanExporter,
) -> dict[str, Any]:  # fmt: skip
    kwargs: dict[str, Any] = {}
    if name == "ledger_down_reserve_closed":
        kwargs = {"failure_policy": "fail_closed", "storage": _Broken(("reserve_up_to",))}
    elif name == "ledger_down_reserve_open":
        kwargs = {"storage": _Broken(("reserve_up_to",))}
    elif name == "ledger_down_commit":
        kwargs = {"storage": _Broken(("commit",))}
    processor = make_processor(max_usd=1.0, **kwargs)
    runtime = processor.runtime
    if name == "paused":
        processor.pause()
    error: BaseException | None = None
    with tracer.start_as_current_span("agent") as root:
        trace_id = root.get_span_context().trace_id
        try:
            if name == "over_budget":
                _begin(driver, runtime, tracer, minimum=parse_usd(2.0))
            elif name == "released":
                call = _begin(driver, runtime, tracer, minimum=parse_usd(0.3))
                _release(driver, call, TimeoutError("no answer"))
            elif name == "free":
                call = _begin(driver, runtime, tracer, minimum=parse_usd(0.3), free=True)
                _settle(driver, call, 0)
            elif name == "on_grant":
                def shape(granted: int, late: dict[str, Any]) -> int:
                    late.update(CAP)
                    return granted // 2

                call = _begin(
                    driver, runtime, tracer, minimum=parse_usd(0.1), maximum=parse_usd(0.6),
                    on_grant=shape,
                )  # fmt: skip
                _settle(driver, call, parse_usd(0.05), input_tokens=10, output_tokens=3)
            elif name == "taken_over":
                # Another instrumentation's span, reserved by the processor at start: ours,
                # inside it, meters the same call and releases it.
                with tracer.start_as_current_span(
                    "chat outer", attributes={
                        "gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model",
                        "gen_ai.provider.name": "openai", "otel_budget.cost.projected_usd": 0.4,
                    },
                ):  # fmt: skip
                    call = _begin(driver, runtime, tracer, minimum=parse_usd(0.3))
                    _settle(driver, call, parse_usd(0.2))
            elif name == "no_runtime":
                call = _begin(driver, None, tracer, minimum=parse_usd(0.3))
                _settle(driver, call, parse_usd(0.2))
            elif name == "settled_twice":
                call = _begin(driver, runtime, tracer, minimum=parse_usd(0.3))
                _settle(driver, call, parse_usd(0.2))
                _settle(driver, call, parse_usd(0.9))
                _release(driver, call, ValueError("late"))
            else:  # granted, paused, overshoot, ledger_down_*
                call = _begin(driver, runtime, tracer, minimum=parse_usd(0.3))
                actual = parse_usd(0.5 if name == "overshoot" else 0.2)
                _settle(driver, call, actual, attributes={"gen_ai.usage.input_tokens": 9})
        except BudgetExceededError as exc:
            error = exc
        return _outcome(processor, exporter, trace_id, error)  # (before the root evicts it)


SCENARIOS = (
    "granted", "overshoot", "over_budget", "paused", "released", "free", "on_grant",
    "taken_over", "no_runtime", "settled_twice", "ledger_down_reserve_closed",
    "ledger_down_reserve_open", "ledger_down_commit",
)  # fmt: skip


@pytest.mark.parametrize("name", SCENARIOS)
def test_both_drivers_leave_the_same_trace(
    name: str, make_processor: Callable[..., Any], tracer: trace.Tracer,
    exporter: InMemorySpanExporter,
) -> None:  # fmt: skip
    outcomes = {}
    for driver in DRIVERS:
        exporter.clear()
        outcomes[driver] = _scenario(name, driver, make_processor, tracer, exporter)
    assert outcomes["blocking"] == outcomes["steps"]
    # And what both say is what the scenario means (so that both being wrong fails too).
    outcome = outcomes["blocking"]
    expected_error = {
        "over_budget": ("BudgetExceededError", "limit"),
        "paused": ("BudgetExceededError", "paused"),
        "ledger_down_reserve_closed": ("BudgetExceededError", "internal_error"),
    }.get(name)
    assert outcome["error"] == expected_error
    spent = {
        "granted": parse_usd(0.2), "overshoot": parse_usd(0.5), "on_grant": parse_usd(0.05),
        "taken_over": parse_usd(0.2), "settled_twice": parse_usd(0.2), "released": 0,
    }.get(name)  # fmt: skip
    if spent is not None:
        assert outcome["ledger"] == (spent, 0)
    if name == "ledger_down_reserve_open":  # unmetered, then charged when it settled
        assert outcome["report"][1] == 1
    for span in outcome["spans"]:
        assert span[4], f"span {span[0]} was never ended"
    if name == "on_grant":
        assert outcome["spans"][0][1]["gen_ai.request.max_tokens"] == 77
