"""Stream proxies: the span ends and the reservation settles however a stream ends.

    stream = wrapped(*args, **kwargs)                   # the SDK's Stream / AsyncStream
    return SyncStreamProxy(stream, call, OpenAIChatAccumulator())

A stream can end five ways: exhausted, an error mid-stream, ``close()`` / ``with`` exit, an
early ``break`` followed by the caller dropping it, or abandonment (never iterated at all).
Each settles the call exactly once:

* exhausted: the usage the provider sent (or, without usage, an estimate from the input
  estimate and the output that was streamed; never zero);
* error mid-stream: the provider billed the input and the output produced so far, so that is
  committed, and the span records the error;
* closed early or abandoned: committed from what was streamed (a finalizer catches streams
  that are dropped without being closed).

The proxy never makes the LLM span the current span: spans the caller creates while
iterating are not parented to the LLM call (openai-v2 leaks its span as current there).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Protocol

import wrapt

from otel_budget.instrumentation._call import LLMCall
from otel_budget.pricing import TokenUsage


class Accumulator(Protocol):
    """Provider-specific reader of stream items."""

    usage: TokenUsage | None
    response_model: str | None
    units: int  # content-bearing items seen (a lower bound on output tokens)

    def add(self, item: Any) -> None: ...

    def text(self) -> str: ...

    def attributes(self) -> dict[str, Any]: ...


def settle(
    call: LLMCall, acc: Accumulator, error: BaseException | None, complete: bool = True
) -> None:
    """Settle a stream's call once; never raises (it may run in a finalizer).

    ``complete=False`` (closed early, left, abandoned): without usage, what the caller read
    under-states the bill (SDKs buffer ahead, and a provider may keep generating after the
    client stops reading), so the call is charged at least its reservation.
    """
    if call.done:
        return
    try:
        if error is None:
            floor = 0 if complete or acc.usage is not None else call.budgeted.projected_nanos
            call.succeed(
                acc.usage, acc.attributes(), response_model=acc.response_model,
                output_text=acc.text(), output_units=acc.units, floor_nanos=floor,
            )  # fmt: skip
        else:
            call.fail_after_output(error, acc.usage, acc.text(), acc.units)
    except Exception as exc:  # pragma: no cover - settle must not raise into iteration
        if call.processor is not None:
            call.processor.engine.internal_error("stream settle", exc)


def _settle_abandoned(call: LLMCall, acc: Accumulator) -> None:
    settle(call, acc, None, complete=False)


def _feed(call: LLMCall, acc: Accumulator, item: Any) -> None:
    try:
        acc.add(item)
    except Exception as exc:  # a shape we do not know must not break the caller's loop
        if call.processor is not None:
            call.processor.engine.log_once("stream item", exc)


class SyncStreamProxy(wrapt.ObjectProxy):  # type: ignore[misc]
    """Wraps a sync SDK stream; behaves like it (attributes, iteration, ``with``, close)."""

    def __init__(self, stream: Any, call: LLMCall, acc: Accumulator) -> None:
        super().__init__(stream)
        self._self_call = call
        self._self_acc = acc
        self._self_finalizer = weakref.finalize(self, _settle_abandoned, call, acc)

    def _self_end(self, error: BaseException | None, complete: bool = True) -> None:
        self._self_finalizer.detach()
        settle(self._self_call, self._self_acc, error, complete)

    def __iter__(self) -> SyncStreamProxy:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self.__wrapped__)
        except StopIteration:
            self._self_end(None)
            raise
        except Exception as exc:
            self._self_end(exc)
            raise
        _feed(self._self_call, self._self_acc, item)
        return item

    def __enter__(self) -> SyncStreamProxy:
        enter = getattr(self.__wrapped__, "__enter__", None)
        if enter is not None:
            enter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        try:
            leave = getattr(self.__wrapped__, "__exit__", None)
            return leave(exc_type, exc, tb) if leave is not None else None
        finally:
            # An exception here is the caller's own (stream errors settle in __next__):
            # the call itself ended early, not in error.
            self._self_end(None, complete=False)

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_end(None, complete=False)


class AsyncStreamProxy(wrapt.ObjectProxy):  # type: ignore[misc]
    """Wraps an async SDK stream (``async for``, ``async with``, ``await close()``)."""

    def __init__(self, stream: Any, call: LLMCall, acc: Accumulator) -> None:
        super().__init__(stream)
        self._self_call = call
        self._self_acc = acc
        self._self_finalizer = weakref.finalize(self, _settle_abandoned, call, acc)

    def _self_end(self, error: BaseException | None, complete: bool = True) -> None:
        self._self_finalizer.detach()
        settle(self._self_call, self._self_acc, error, complete)

    def __aiter__(self) -> AsyncStreamProxy:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self.__wrapped__.__anext__()
        except StopAsyncIteration:
            self._self_end(None)
            raise
        except Exception as exc:
            self._self_end(exc)
            raise
        _feed(self._self_call, self._self_acc, item)
        return item

    async def __aenter__(self) -> AsyncStreamProxy:
        enter = getattr(self.__wrapped__, "__aenter__", None)
        if enter is not None:
            await enter()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        try:
            leave = getattr(self.__wrapped__, "__aexit__", None)
            return await leave(exc_type, exc, tb) if leave is not None else None
        finally:
            self._self_end(None, complete=False)  # the caller's exception (see __exit__)

    async def close(self) -> None:
        try:
            result = self.__wrapped__.close()
            if inspect.isawaitable(result):  # some SDK streams close synchronously
                await result
        finally:
            self._self_end(None, complete=False)

    async def aclose(self) -> None:
        try:
            closer = getattr(self.__wrapped__, "aclose", None) or self.__wrapped__.close
            result = closer()
            if inspect.isawaitable(result):
                await result
        finally:
            self._self_end(None, complete=False)
