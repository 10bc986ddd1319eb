"""Ledger decisions written once, run sync or async.

    def reserve_steps(storage_args):                  # a generator: the decision, once
        result = yield Op("reserve_up_to", storage_args)
        return result.granted

    granted = run(reserve_steps(args), storage)       # blocking storage methods
    granted = await arun(reserve_steps(args), storage) # their ``a``-prefixed coroutines

A decision that talks to the ledger is a generator that yields the storage operations it
needs (``Op``) and receives their results; ``run`` drives it with the storage's blocking
methods, ``arun`` with its coroutine twins (``areserve_up_to``, ``acommit``, ...), so a slow
shared ledger never blocks an event loop. Sync and async callers therefore share one
definition of every decision, never two copies of it. A storage error is thrown back into
the generator at the point of the ``yield``, so the decision handles it in one place too.

A decision of one operation (reserve, settle, release) is also written
as the work before its operation and the work after it, which its generator puts around the
``yield``; its blocking form puts them around ``call_op`` instead. That form costs no
generator; the work itself is still written once (``BudgetEngine.reserve_plan``/
``reserved``, and so on).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


class Op(NamedTuple):
    """One storage operation: the name of a ``LedgerStorage`` method and its arguments."""

    name: str
    args: tuple[Any, ...]


Steps = Generator[Op, Any, T]


def call_op(storage: Any, op: Op) -> Any:
    """One operation with the storage's blocking method: what ``run`` does at each step, for a
    decision written as the work before and after its one operation (no generator)."""
    return getattr(storage, op.name)(*op.args)


def run(steps: Steps[T], storage: Any) -> T:
    """Drive ``steps`` with the storage's blocking methods."""
    try:
        op = next(steps)
        while True:
            try:
                result = getattr(storage, op.name)(*op.args)
            except Exception as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def arun(steps: Steps[T], storage: Any) -> T:
    """Drive ``steps`` with the storage's coroutine methods (``a`` + the method name)."""
    try:
        op = next(steps)
        while True:
            try:
                result = await getattr(storage, "a" + op.name)(*op.args)
            except Exception as exc:
                op = steps.throw(exc)
            else:
                op = steps.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


__all__ = ["Op", "Steps", "arun", "call_op", "run"]
