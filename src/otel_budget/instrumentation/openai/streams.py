"""openai streams: their accumulators and the metered proxies the wrappers return.

    proxy = stream_proxy(result, call, "chat", hide_usage)   # None: not a stream
    return proxy if proxy is not None else result

``stream_proxy`` wraps an SDK ``Stream`` in ``SyncStream`` and an ``AsyncStream`` in
``AsyncStream`` (the proxies of ``_stream.py``, which settle however the stream ends), with
the accumulator of its API (``ResponsesAccumulator`` for Responses events, the shared chat
chunk accumulator otherwise). Their ``response`` is a ``ClosingResponse``: the SDK's stream
helpers close a stream left early through it. ``raw_stream_response`` wraps the HTTP
response of a ``with_raw_response`` / ``with_streaming_response`` stream, whose ``parse()``
then gives the metered proxy.

When the wrapper asked for a stream's usage (``stream_options.include_usage``, which the
caller did not set), the usage-only chunk the provider then appends (``choices == []``) is
read and not passed on: the caller sees the stream it asked for, and the usual
``chunk.choices[0].delta`` loop does not meet an empty ``choices``.
"""

from __future__ import annotations

import inspect
from typing import Any

import wrapt

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._call import LLMCall
from otel_budget.instrumentation._finish_reasons import responses_finish_reasons
from otel_budget.instrumentation._stream import AsyncStreamProxy, SyncStreamProxy
from otel_budget.instrumentation._util import ChatChunkAccumulator, response_attributes, usage_cost
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation.openai import history
from otel_budget.instrumentation.openai.response import chat_usage, responses_usage
from otel_budget.pricing import TokenUsage


# -- accumulators ----------------------------------------------------------------------------
class ResponsesAccumulator:
    """Reads Responses stream events: text and argument deltas, and the final response (its
    finish reasons and service tier are those of the last response an event carried: none
    for a stream closed while in progress)."""

    __slots__ = ("_cost", "_id", "_parts", "_response", "response_model", "units", "usage")

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.response_model: str | None = None
        self.units = 0
        self._parts: list[str] = []
        self._id: str | None = None
        self._cost: float | None = None
        self._response: Any = None  # the last response an event carried (the final one)

    def add(self, event: Any) -> None:
        kind = _get(event, "type")
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            delta = _get(event, "delta")
            if isinstance(delta, str) and delta:
                self._parts.append(delta)
                self.units += 1
            return
        response = _get(event, "response")
        if response is not None:
            self._id = _get(response, "id") or self._id
            self.response_model = _get(response, "model") or self.response_model
            self._response = response
            usage = _get(response, "usage")
            if usage is not None:
                self.usage = responses_usage(usage)
                self._cost = usage_cost(response)
                history.remember(self._id, self.usage)  # its context, for previous_response_id

    def text(self) -> str:
        return "".join(self._parts)

    def attributes(self) -> dict[str, Any]:
        response = self._response
        out = response_attributes(self._id, self.response_model, responses_finish_reasons(response))
        tier = _get(response, "service_tier")
        if isinstance(tier, str) and tier and _get(response, "status") not in ("queued", "in_progress"):
            out[attrs.OPENAI_RESPONSE_SERVICE_TIER] = tier
        if self._cost is not None:
            out[attrs.COST_PROVIDER_REPORTED_USD] = self._cost
        if response is not None:
            _content.output_into(out, lambda: _content.responses_output(response))
        return out


def accumulator(kind: str) -> Any:
    """The accumulator of a stream of ``kind`` ("responses", "chat", "completions")."""
    if kind == "responses":
        return ResponsesAccumulator()
    return ChatChunkAccumulator(
        chat_usage, capture=_content.chat_stream_content(),
        tier_attribute=attrs.OPENAI_RESPONSE_SERVICE_TIER,
    )  # fmt: skip


# -- stream proxies that also settle when the SDK's helpers close the response ----------------
class ClosingResponse(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """A stream's HTTP response: closing it settles the call.

    The SDK's stream helpers (``chat.completions.stream()``, ``responses.stream()``) close a
    stream they leave early through ``stream.response.close()``, not through the stream; and
    their stream object sits in a reference cycle (it holds its own generator), so without
    this the call would stay reserved, its span open, until the cyclic GC ran."""

    def __init__(self, response: Any, stream: Any) -> None:
        super().__init__(response)
        self._self_stream = stream  # our stream proxy: closing it settles the call

    def close(self) -> Any:
        try:
            return self.__wrapped__.close()
        finally:
            _close_sync(self._self_stream)

    async def aclose(self) -> Any:
        try:
            return await self.__wrapped__.aclose()
        finally:
            await self._self_stream.close()


def _close_sync(stream: Any) -> None:
    """Close a stream proxy from sync code: the stream's own ``close()`` (the shared ending of
    a stream left early), or for an async stream, which cannot be awaited here, its blocking
    ending."""
    if isinstance(stream, SyncStreamProxy):
        stream.close()
    else:
        stream._self_end(None, complete=False)


class SyncStream(SyncStreamProxy):
    """A metered SDK ``Stream``, whose ``response`` settles the call when closed."""

    @property
    def response(self) -> Any:
        response = self.__wrapped__.response
        return ClosingResponse(response, self) if response is not None else None


class AsyncStream(AsyncStreamProxy):
    """A metered SDK ``AsyncStream``, whose ``response`` settles the call when closed."""

    @property
    def response(self) -> Any:
        response = self.__wrapped__.response
        return ClosingResponse(response, self) if response is not None else None


def is_stream(result: Any) -> bool:
    """An SDK stream, sync (``__next__``) or async (``__anext__``)."""
    return hasattr(result, "__next__") or hasattr(result, "__anext__")


def stream_proxy(result: Any, call: LLMCall, kind: str, hide_usage: bool) -> Any:
    """The metered proxy of an SDK stream, or None when ``result`` is no stream."""
    if hasattr(result, "__next__"):
        return SyncStream(result, call, accumulator(kind), hide_usage)
    if hasattr(result, "__anext__"):
        return AsyncStream(result, call, accumulator(kind), hide_usage)
    return None


# -- with_raw_response / with_streaming_response of a stream ----------------------------------
class RawStreamResponse(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """``with_raw_response`` / ``with_streaming_response`` of a ``stream=True`` call: the SDK
    returns an HTTP response wrapper and the stream only comes out of ``parse()``; that
    stream is the metered proxy (without this the call was settled at once, from the input
    estimate alone, and the streamed output was never charged)."""

    def __init__(self, raw: Any, stream: Any) -> None:
        super().__init__(raw)
        self._self_stream = stream

    def parse(self, *, to: Any = None) -> Any:
        return self._self_stream if to is None else self.__wrapped__.parse(to=to)

    def close(self) -> Any:
        # with_streaming_response's block exit: the stream ends here, settle it now.
        try:
            return self.__wrapped__.close()
        finally:
            _close_sync(self._self_stream)


class AsyncRawStreamResponse(RawStreamResponse):
    """The same for ``AsyncAPIResponse``, whose ``parse()`` and ``close()`` are coroutines."""

    async def parse(self, *, to: Any = None) -> Any:
        return self._self_stream if to is None else await self.__wrapped__.parse(to=to)

    async def close(self) -> Any:
        try:
            return await self.__wrapped__.close()
        finally:
            await self._self_stream.close()


def raw_stream_response(raw: Any, proxy: Any) -> RawStreamResponse:
    """``raw`` whose ``parse()`` gives ``proxy``; async when ``raw.parse`` is a coroutine."""
    async_parse = inspect.iscoroutinefunction(raw.parse)
    return (AsyncRawStreamResponse if async_parse else RawStreamResponse)(raw, proxy)


__all__ = [
    "AsyncRawStreamResponse",
    "AsyncStream",
    "ClosingResponse",
    "RawStreamResponse",
    "ResponsesAccumulator",
    "SyncStream",
    "accumulator",
    "is_stream",
    "raw_stream_response",
    "stream_proxy",
]
