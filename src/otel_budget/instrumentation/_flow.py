"""A wrapper's flow written once, run as the sync or the async wrapper.

    def chat_flow(call_args):                       # a generator: the wrapper's logic, once
        call = yield start(tracer, request, kwargs, runtime)
        result = yield send(wrapped, args, kwargs)  # wrapped(...) or await wrapped(...)
        yield settle(call.succeed, call.asucceed, usage)
        return result

    sync_wrapper = lambda *a: run_flow(chat_flow(*a))
    async def async_wrapper(*a): return await arun_flow(chat_flow(*a))

An SDK has a sync and an async client whose wrappers differ only where they wait: the
request, the ledger, a body to parse. The flow yields a ``Step`` at each such point; the
sync driver runs the step's blocking form, the async driver awaits its coroutine form, and
sends the result back (or throws the exception in, at the ``yield``). Everything else, from
reading the request to settling the call, is one definition for both.

Context managers and ``contextvars`` set inside a flow behave as in a plain function: the
generator runs in the caller's context (the caller's task, for the async driver).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")


_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})


class Step(NamedTuple):
    """One waiting point of a flow: ``fn(*args, **kwargs)`` for the sync driver, ``afn`` with
    the same arguments (awaited when it returns an awaitable) for the async driver. The
    arguments are kept as they are, not bound in ``functools.partial`` objects (a driver runs
    one of the two forms), and ``step``/``send`` build it without a Python-level
    constructor: 8.5k and 3.9k instructions per openai call, measured."""

    fn: Callable[..., Any]
    afn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = _NO_KWARGS

    def blocking(self) -> Any:
        return self.fn(*self.args, **self.kwargs)

    def coroutine(self) -> Awaitable[Any] | Any:
        return self.afn(*self.args, **self.kwargs)


_new_step = tuple.__new__  # (a NamedTuple's own ``__new__`` is a Python-level call)


def step(sync_fn: Callable[..., Any], async_fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Step:
    """A step calling ``sync_fn(*args, **kwargs)`` or awaiting ``async_fn(*args, **kwargs)``."""
    return _new_step(Step, (sync_fn, async_fn, args, kwargs))


def send(
    wrapped: Callable[..., Any], args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] = _NO_KWARGS
) -> Step:
    """The SDK method itself, ``wrapped(*args, **kwargs)``: awaited by the async driver when
    it returns an awaitable (an async SDK method returns its coroutine). The caller's
    ``kwargs`` as they are when the step runs (the flow's own dict, not a copy)."""
    return _new_step(Step, (wrapped, wrapped, args, kwargs))


Flow = Generator[Step, Any, T]


def run_flow(flow: Flow[T]) -> T:
    """Drive a flow with blocking calls (the sync wrapper)."""
    try:
        current = next(flow)
        while True:
            try:
                result = current.fn(*current.args, **current.kwargs)  # (``blocking``, inlined)
            except BaseException as exc:
                current = flow.throw(exc)
            else:
                current = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def arun_flow(flow: Flow[T]) -> T:
    """Drive a flow with coroutines (the async wrapper): never blocks the event loop."""
    try:
        current = next(flow)
        while True:
            try:
                result = current.afn(*current.args, **current.kwargs)
                if hasattr(result, "__await__"):
                    result = await result
            except BaseException as exc:
                current = flow.throw(exc)
            else:
                current = flow.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


__all__ = ["Flow", "Step", "arun_flow", "run_flow", "send", "step"]
