"""The flow drivers: one generator, run with blocking calls or with coroutines."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from otel_budget.instrumentation._flow import Flow, Step, arun_flow, run_flow, send, step


def _sync_add(a: int, b: int = 0) -> int:
    return a + b


async def _async_add(a: int, b: int = 0) -> int:
    await asyncio.sleep(0)
    return a + b + 1000  # tells the drivers apart


def _sdk(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def _boom(*_: Any) -> None:
    raise KeyError("from the step")


def flow(log: list[Any]) -> Flow[Any]:
    total = yield step(_sync_add, _async_add, 1, b=2)
    log.append(total)
    # Keyword arguments pass through whatever their names (even the parameters' own: the
    # first parameters of ``step`` are positional-only; ``send`` takes the SDK call's dict).
    named = yield step(_sdk, _sdk, sync_fn=3, async_fn=4, args=5, kwargs=6)
    sent = yield send(_sdk, (), {"wrapped": 1, "fn": 2, **named})
    log.append(sent)
    try:
        yield Step(_boom, _boom, ("x",))
    except KeyError as exc:
        log.append(f"caught {exc.args[0]}")
    plain = yield Step(_sync_add, _sync_add, (5,), {"b": 5})  # an async form that is no coroutine
    log.append(plain)
    return "done"


def test_both_drivers_run_one_flow_the_same_way() -> None:
    blocking: list[Any] = []
    assert run_flow(flow(blocking)) == "done"
    coroutines: list[Any] = []
    assert asyncio.run(arun_flow(flow(coroutines))) == "done"
    kwargs = {"wrapped": 1, "fn": 2, "sync_fn": 3, "async_fn": 4, "args": 5, "kwargs": 6}
    assert blocking == [3, kwargs, "caught from the step", 10]
    assert coroutines == [1003, kwargs, "caught from the step", 10]


def test_a_step_error_the_flow_does_not_catch_reaches_the_caller() -> None:
    def failing() -> Flow[Any]:
        yield Step(_boom, _boom)
        raise AssertionError("not reached")

    with pytest.raises(KeyError):
        run_flow(failing())
    with pytest.raises(KeyError):
        asyncio.run(arun_flow(failing()))


def test_send_runs_with_the_flows_own_dict() -> None:
    # ``send`` keeps the flow's kwargs dict (no copy per call): what the flow writes into it
    # before the step runs is sent, and the callee gets a dict of its own.
    kwargs: dict[str, Any] = {"model": "m"}

    def sending() -> Flow[Any]:
        made = send(_sdk, (), kwargs)
        kwargs["max_tokens"] = 5
        got = yield made
        return got

    got = run_flow(sending())
    assert got == {"model": "m", "max_tokens": 5} and got is not kwargs


def test_step_arguments_are_the_callers_at_creation() -> None:
    # A step keeps its own kwargs dict: changing the dict passed in afterwards changes nothing.
    kwargs = {"b": 1}
    made = step(_sync_add, _async_add, 1, **kwargs)
    kwargs["b"] = 100
    assert made.blocking() == 2
    assert asyncio.run(made.coroutine()) == 1002
