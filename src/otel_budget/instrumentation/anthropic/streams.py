"""Anthropic Messages streams: the event reader and the raw-response wrappers.

    stream = wrapped(*args, **kwargs)             # stream=True: the SDK's Stream / AsyncStream
    return metered_stream(stream, call)           # settles call however the stream ends
    return raw_stream_response(raw, call)         # with_raw_response: parse() gives the above

In a stream, ``message_start`` carries the input side of the usage and ``message_delta`` the
final, cumulative ``output_tokens``; ``MessagesAccumulator`` reads both, and estimates what a
stream cut short never said. The stream proxies of ``instrumentation._stream`` settle the call
however the stream ends.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, cast

import wrapt

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._call import LLMCall
from otel_budget.instrumentation._stream import Accumulator, AsyncStreamProxy, SyncStreamProxy
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.instrumentation._util import response_attributes
from otel_budget.pricing import TokenUsage
from otel_budget.tokens import bytes_rule


class MessagesAccumulator:
    """Reads raw Messages stream events (``RawMessageStreamEvent`` / beta / dicts).

    ``usage`` is exact once ``message_delta`` has carried the final output count. Before that
    (a stream closed early, dropped or broken) the input side is still exact (from
    ``message_start``) and the output is estimated from what was streamed, never below the
    placeholder ``message_start`` reports; ``fallback_input`` (the projection's estimate) is
    used when the stream never said. ``reported`` is the part the stream did say.
    """

    __slots__ = (
        "response_model", "units", "_parts", "_id", "_reasons", "_fallback_input", "_input",
        "_cache_read", "_cache_write", "_output", "_thinking", "_final", "_seen", "_content",
    )  # fmt: skip

    def __init__(self, fallback_input: int = 0) -> None:
        self.response_model: str | None = None
        self.units = 0
        self._parts: list[str] = []
        self._id: str | None = None
        self._reasons: list[str] = []
        self._fallback_input = fallback_input
        self._input: int | None = None
        self._cache_read = 0
        self._cache_write = 0
        self._output = 0
        self._thinking = 0
        self._final = False
        self._seen = False
        self._content = _content.anthropic_stream_content()  # None: content not captured

    def _read_usage(self, usage: Any) -> None:
        if usage is None:
            return
        raw_input = _get(usage, "input_tokens")
        if isinstance(raw_input, int) and not isinstance(raw_input, bool):
            self._input = _int(raw_input)
        for field, slot in (("cache_read_input_tokens", "_cache_read"),
                            ("cache_creation_input_tokens", "_cache_write")):  # fmt: skip
            value = _get(usage, field)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, slot, _int(value))
        output = _get(usage, "output_tokens")
        if isinstance(output, int) and not isinstance(output, bool):
            self._output = _int(output)
        thinking = _get(_get(usage, "output_tokens_details"), "thinking_tokens")
        if isinstance(thinking, int) and not isinstance(thinking, bool):
            self._thinking = _int(thinking)

    def add(self, event: Any) -> None:
        if self._content is not None:
            self._content.add(event)
        kind = _get(event, "type")
        if kind == "content_block_delta":
            delta = _get(event, "delta")
            delta_kind = _get(delta, "type")
            if delta_kind == "text_delta":
                text = _get(delta, "text")
            elif delta_kind == "input_json_delta":
                text = _get(delta, "partial_json")
            elif delta_kind == "thinking_delta":
                text = _get(delta, "thinking")
            else:
                text = None
            if isinstance(text, str) and text:
                self._parts.append(text)
                self.units += 1
            return
        if kind == "message_start":
            message = _get(event, "message")
            self._seen = True
            rid = _get(message, "id")
            self._id = rid if isinstance(rid, str) else self._id
            model = _get(message, "model")
            self.response_model = model if isinstance(model, str) else self.response_model
            self._read_usage(_get(message, "usage"))
        elif kind == "message_delta":
            self._seen = True
            reason = _get(_get(event, "delta"), "stop_reason")
            if isinstance(reason, str):
                self._reasons = [reason]
            usage = _get(event, "usage")
            if usage is not None:
                self._read_usage(usage)  # cumulative counts
                self._final = True

    @property
    def usage(self) -> TokenUsage | None:
        if not self._seen:
            return None  # nothing said: the call estimates from its projection and the text
        output = self._output if self._final else max(self._output, self.units, bytes_rule(self.text()))
        raw_input = self._input if self._input is not None else self._fallback_input
        return TokenUsage(
            input_tokens=raw_input + self._cache_read + self._cache_write,
            output_tokens=max(output, self._thinking), cache_read_tokens=self._cache_read,
            cache_write_tokens=self._cache_write, reasoning_tokens=self._thinking,
        )  # fmt: skip

    @property
    def reported(self) -> TokenUsage | None:
        """The usage as the stream reported it (the span's ``gen_ai.usage.*``): the input
        side of ``message_start``, the last output count sent (before ``message_delta``, the
        placeholder ``message_start`` carries, as genai-anthropic reports it)."""
        if not self._seen or self._input is None:
            return None
        return TokenUsage(
            input_tokens=self._input + self._cache_read + self._cache_write,
            output_tokens=self._output, cache_read_tokens=self._cache_read,
            cache_write_tokens=self._cache_write, reasoning_tokens=self._thinking,
        )  # fmt: skip

    @property
    def estimated(self) -> bool:
        return not self._final or self._input is None

    def text(self) -> str:
        return "".join(self._parts)

    def attributes(self) -> dict[str, Any]:
        out = response_attributes(self._id, self.response_model, self._reasons)
        if self._seen and self.estimated:
            out[attrs.COST_ESTIMATED] = True
        if self._content is not None and self._seen:
            self._content.into(out)
        return out


def _settle_abandoned_raw(call: LLMCall) -> None:
    if not call.done:
        call.succeed(None)


class RawStreamResponse(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """A raw response of a ``stream=True`` request: ``parse()`` returns the metered stream."""

    def __init__(self, response: Any, call: LLMCall) -> None:
        super().__init__(response)
        self._self_call = call
        self._self_stream: Any = None
        self._self_finalizer = weakref.finalize(self, _settle_abandoned_raw, call)

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return self.__wrapped__.parse(*args, **kwargs)
        if self._self_stream is None:
            stream = self.__wrapped__.parse()
            self._self_finalizer.detach()
            call = self._self_call
            _forget_response(call)
            self._self_stream = SyncStreamProxy(stream, call, _accumulator(call))
        return self._self_stream


class AsyncRawStreamResponse(wrapt.ObjectProxy):  # type: ignore[type-arg]
    def __init__(self, response: Any, call: LLMCall) -> None:
        super().__init__(response)
        self._self_call = call
        self._self_stream: Any = None
        self._self_finalizer = weakref.finalize(self, _settle_abandoned_raw, call)

    async def parse(self, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return await self.__wrapped__.parse(*args, **kwargs)
        if self._self_stream is None:
            stream = await self.__wrapped__.parse()
            self._self_finalizer.detach()
            call = self._self_call
            _forget_response(call)
            self._self_stream = AsyncStreamProxy(stream, call, _accumulator(call))
        return self._self_stream


def _accumulator(call: LLMCall) -> Accumulator:
    # (``usage`` is a read-only property here; the protocol names it as a plain attribute)
    return cast(Accumulator, MessagesAccumulator(call.input_tokens))


def _forget_response(call: LLMCall) -> None:
    """A streamed call is read from its stream, never from the HTTP response ``call`` keeps
    for billed failures. Kept, it would pin an abandoned stream alive (the proxy's finalizer
    holds the call; the SDK's span bookkeeping on the response holds the ``MessageStream``
    helper that reads the proxy), so the finalizer that settles it would never run."""
    call.response = None


def metered_stream(stream: Any, call: LLMCall) -> Any:
    """The SDK's ``Stream`` / ``AsyncStream`` wrapped in the proxy that settles ``call``."""
    _forget_response(call)
    proxy = AsyncStreamProxy if hasattr(stream, "__anext__") else SyncStreamProxy
    return proxy(stream, call, _accumulator(call))


def raw_stream_response(response: Any, call: LLMCall) -> Any:
    """A raw response of a ``stream=True`` request, whose ``parse()`` gives the metered stream."""
    if inspect.iscoroutinefunction(response.parse):
        return AsyncRawStreamResponse(response, call)
    return RawStreamResponse(response, call)


__all__ = [
    "AsyncRawStreamResponse",
    "MessagesAccumulator",
    "RawStreamResponse",
    "metered_stream",
    "raw_stream_response",
]
