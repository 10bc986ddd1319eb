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

The span and the metrics say what the official GenAI instrumentations say of the same
stream: a ``with`` block left by the caller's exception ends the span in ERROR with that
exception's ``error.type`` (also the ``with`` of an SDK stream helper, ``messages.stream()``,
``responses.stream()``, ``chat.completions.stream()``: ``manager_exit`` / ``manager_aexit``
wrap their managers' exits), a stream dropped unfinished with ``error.type=_OTHER``
("abandoned stream"); ``close()`` and exhaustion end it OK. The usage on the span is what the
provider reported (an estimate goes to ``otel_budget.usage.*``). Each chunk is timed:
``gen_ai.response.time_to_first_chunk`` on the span, and the
``gen_ai.client.operation.time_to_first_chunk`` / ``time_per_output_chunk`` histograms.

The settlement is one decision (``settle_steps``), run with the ledger's blocking methods by
``settle`` (the sync proxy, a finalizer, a sync ``close()``) or with its coroutines by
``asettle`` (the async proxy's ``__anext__``, ``__aexit__``, ``close()``, ``aclose()``): an
async stream never blocks the event loop on the ledger. The one exception is a task being
cancelled, which may be cancelled again at any ``await`` (anyio's cancel scopes): it settles
without awaiting, so a cancellation never leaves the call reserved.

The proxy never makes the LLM span the current span: spans the caller creates while
iterating are not parented to the LLM call (openai-v2 leaks its span as current there).
"""

from __future__ import annotations

import asyncio
import inspect
import time
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

import wrapt

from otel_budget import attributes as attrs
from otel_budget.instrumentation._call import LLMCall
from otel_budget.instrumentation._util import usage_only
from otel_budget.pricing import TokenUsage
from otel_budget.steps import Steps, arun, run


class AbandonedStreamError(Exception):
    """A stream dropped before it was exhausted, closed or left (never raised: recorded on the
    span as util-genai records it)."""

    _gen_ai_error_type = "_OTHER"

    def __init__(self, message: str = "abandoned stream") -> None:
        super().__init__(message)


class Accumulator(Protocol):
    """Provider-specific reader of stream items. One whose ``usage`` adds estimates to what
    the provider reported also has ``reported`` (the reported part; None: nothing)."""

    usage: TokenUsage | None
    response_model: str | None
    units: int  # content-bearing items seen (a lower bound on output tokens)

    def add(self, item: Any) -> None: ...

    def text(self) -> str: ...

    def attributes(self) -> dict[str, Any]: ...


def settle_steps(
    call: LLMCall, acc: Accumulator, error: BaseException | None, complete: bool = True,
    ended_by: BaseException | None = None,
) -> Steps[None]:  # fmt: skip
    """The settlement of a stream's call, written once.

    ``complete=False`` (closed early, left, abandoned): without usage, what the caller read
    under-states the bill (SDKs buffer ahead, and a provider may keep generating after the
    client stops reading), so the call is charged at least its reservation. ``ended_by``:
    what ended it early (the caller's exception, or abandonment), recorded on the span; it
    changes nothing in the cost.
    """
    usage = acc.usage
    reported = getattr(acc, "reported", usage)
    if error is None:
        floor = 0 if complete or usage is not None else call.budgeted.projected_nanos
        yield from call.succeed_steps(
            usage, acc.attributes(), response_model=acc.response_model,
            output_text=acc.text(), output_units=acc.units, floor_nanos=floor,
            reported_usage=reported, error=ended_by,
        )  # fmt: skip
    else:
        yield from call.fail_after_output_steps(
            error, usage, acc.text(), acc.units, acc.attributes(), reported
        )
    return None


def settle(
    call: LLMCall, acc: Accumulator, error: BaseException | None, complete: bool = True,
    ended_by: BaseException | None = None,
) -> None:  # fmt: skip
    """Settle a stream's call once with blocking ledger calls; never raises (it may run in a
    finalizer)."""
    if call.done:
        return
    try:
        run(settle_steps(call, acc, error, complete, ended_by), _storage(call))
    except Exception as exc:  # pragma: no cover - settle must not raise into iteration
        _internal_error(call, exc)


async def asettle(
    call: LLMCall, acc: Accumulator, error: BaseException | None, complete: bool = True,
    ended_by: BaseException | None = None,
) -> None:  # fmt: skip
    """``settle`` with the ledger's coroutines; never raises."""
    if call.done:
        return
    if _cancelling():
        settle(call, acc, error, complete, ended_by)  # an await could be cancelled half-way
        return
    try:
        await arun(settle_steps(call, acc, error, complete, ended_by), _storage(call))
    except Exception as exc:  # pragma: no cover - settle must not raise into iteration
        _internal_error(call, exc)


def _cancelling() -> bool:
    """The current task is being cancelled (Python 3.11+ knows; 3.10 never says so)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _storage(call: LLMCall) -> Any:
    return call.processor.storage if call.processor is not None else None


def _internal_error(call: LLMCall, exc: Exception) -> None:
    if call.processor is not None:
        call.processor.engine.internal_error("stream settle", exc)


#: The caller's exception while an SDK stream helper's manager exits (set by ``manager_exit``):
#: the stream the manager closes then was ended by it.
_ENDING_WITH: ContextVar[BaseException | None] = ContextVar("otel_budget_ending_with", default=None)


def _exc_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseException | None:
    exc = args[1] if len(args) > 1 else kwargs.get("exc", kwargs.get("exc_val"))
    return exc if isinstance(exc, BaseException) else None


def manager_exit(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:  # fmt: skip
    """wrapt wrapper of a stream manager's ``__exit__``: the stream it closes is ended by the
    caller's exception, if any."""
    exc = _exc_of(args, kwargs)
    if exc is None:
        return wrapped(*args, **kwargs)
    token = _ENDING_WITH.set(exc)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _ENDING_WITH.reset(token)


def manager_aexit(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:  # fmt: skip
    """``manager_exit`` for an async manager's ``__aexit__``."""
    exc = _exc_of(args, kwargs)
    if exc is None:
        return wrapped(*args, **kwargs)

    async def aexit() -> Any:
        token = _ENDING_WITH.set(exc)
        try:
            return await wrapped(*args, **kwargs)
        finally:
            _ENDING_WITH.reset(token)

    return aexit()


def _settle_abandoned(call: LLMCall, acc: Accumulator) -> None:
    settle(call, acc, None, complete=False, ended_by=AbandonedStreamError())


class _StreamProxy(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """What both proxies share: the call, its accumulator, the finalizer of an abandoned
    stream, the reading and timing of each item, and the blocking ending (``_self_end``).
    ``hide_usage``: the usage-only chunk the wrapper asked for (``include_usage``) is read,
    then not passed on to a caller who did not ask for it."""

    def __init__(self, stream: Any, call: LLMCall, acc: Accumulator, hide_usage: bool = False) -> None:
        super().__init__(stream)
        self._self_call = call
        self._self_acc = acc
        self._self_hide_usage = hide_usage
        self._self_finalizer = weakref.finalize(self, _settle_abandoned, call, acc)
        self._self_last_chunk: float | None = None  # when the previous chunk arrived
        self._self_labels: dict[str, Any] | None = None  # of the chunk metrics

    def _self_end(
        self, error: BaseException | None, complete: bool = True,
        ended_by: BaseException | None = None,
    ) -> None:  # fmt: skip
        """End the stream from sync code (blocking ledger calls)."""
        self._self_finalizer.detach()
        if ended_by is None and not complete:
            ended_by = _ENDING_WITH.get()  # closed by a stream helper left by an exception
        settle(self._self_call, self._self_acc, error, complete, ended_by)

    def _self_passes(self, item: Any) -> bool:
        """Whether the caller sees ``item`` (it has been read and metered either way)."""
        return not (self._self_hide_usage and usage_only(item))

    def _self_feed(self, item: Any) -> Any:
        now = time.monotonic()
        call = self._self_call
        try:
            self._self_acc.add(item)
        except Exception as exc:  # a shape we do not know must not break the caller's loop
            if call.processor is not None:
                call.processor.engine.log_once("stream item", exc)
        try:
            self._self_time_chunk(call, now)
        except Exception as exc:  # pragma: no cover - telemetry never breaks the loop
            if call.processor is not None:
                call.processor.engine.log_once("stream chunk metrics", exc)
        return item

    def _self_time_chunk(self, call: LLMCall, now: float) -> None:
        """The first chunk's delay since the call started (span attribute and histogram),
        each later one's gap since the previous chunk (histogram), as util-genai times them:
        after the chunk is read, so its response model is on the points."""
        last = self._self_last_chunk
        self._self_last_chunk = now
        first = last is None
        gap = max(now - (call.started if last is None else last), 0.0)
        if first:
            span = call.span
            if span.is_recording():
                span.set_attribute(attrs.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, gap)
        runtime = call.processor
        if runtime is None:
            return
        labels = self._self_labels
        if labels is None or (
            attrs.GEN_AI_RESPONSE_MODEL not in labels and self._self_acc.response_model
        ):
            labels = self._self_labels = call.metric_labels(self._self_acc.response_model)
        runtime.metrics.record_chunk(gap, labels, first)


class SyncStreamProxy(_StreamProxy):
    """Wraps a sync SDK stream; behaves like it (attributes, iteration, ``with``, close)."""

    def __iter__(self) -> SyncStreamProxy:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = next(self.__wrapped__)
            except StopIteration:
                self._self_end(None)
                raise
            except Exception as exc:
                self._self_end(exc)
                raise
            if self._self_passes(self._self_feed(item)):
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
            # An exception here is the caller's own (stream errors settle in __next__): the
            # call ended early (charged as such), and the span says by what.
            self._self_end(None, complete=False, ended_by=exc)

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_end(None, complete=False)


class AsyncStreamProxy(_StreamProxy):
    """Wraps an async SDK stream (``async for``, ``async with``, ``await close()``); ends with
    the ledger's coroutines (``_self_aend``)."""

    async def _self_aend(
        self, error: BaseException | None, complete: bool = True,
        ended_by: BaseException | None = None,
    ) -> None:  # fmt: skip
        """End the stream from a coroutine: never blocks the event loop on the ledger."""
        self._self_finalizer.detach()
        if ended_by is None and not complete:
            ended_by = _ENDING_WITH.get()  # closed by a stream helper left by an exception
        await asettle(self._self_call, self._self_acc, error, complete, ended_by)

    def __aiter__(self) -> AsyncStreamProxy:
        return self

    async def __anext__(self) -> Any:
        while True:
            try:
                item = await self.__wrapped__.__anext__()
            except StopAsyncIteration:
                await self._self_aend(None)
                raise
            except Exception as exc:
                await self._self_aend(exc)
                raise
            if self._self_passes(self._self_feed(item)):
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
            await self._self_aend(None, complete=False, ended_by=exc)  # see __exit__

    async def close(self) -> None:
        try:
            result = self.__wrapped__.close()
            if inspect.isawaitable(result):  # some SDK streams close synchronously
                await result
        finally:
            await self._self_aend(None, complete=False)

    async def aclose(self) -> None:
        try:
            closer = getattr(self.__wrapped__, "aclose", None) or self.__wrapped__.close
            result = closer()
            if inspect.isawaitable(result):
                await result
        finally:
            await self._self_aend(None, complete=False)
