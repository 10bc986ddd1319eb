"""wrapt wrappers for the ``anthropic`` SDK: Messages ``create`` / ``parse`` / ``stream``.

    wrap_function_wrapper("anthropic.resources.messages", "Messages.create",
                          messages_create(tracer))

Every wrapper reads the request, lets ``_call.start_call`` project and reserve (it may lower
``max_tokens`` in ``kwargs`` to what the budget affords), sends, then settles from the
response's ``usage``. Streams (``stream=True``) are wrapped in the shared stream proxies, which
settle however the stream ends.

``messages.stream()`` does not go through ``create``: it builds a ``partial(self._post, ...)``
(an un-awaited ``_post`` coroutine for the async client) and hands it to a
``MessageStreamManager`` that sends it on ``__enter__``. So ``stream()`` is wrapped on its own:
the call is projected and reserved when ``stream()`` is called (so a lowered ``max_tokens``
is in the body it builds), and the manager's request is replaced by one that sends under the
call's span and returns the raw event stream wrapped in a proxy. The ``MessageStream`` helper
reads every raw event through that proxy, so ``get_final_message()``, ``text_stream``,
``until_done()``, iteration, ``close()`` / context exit and abandonment all settle it. A
manager that is never entered sends nothing: its reservation is released when it is dropped.

Usage: Anthropic's ``input_tokens`` excludes the cache; the GenAI conventions (and
``TokenUsage``) count it in, so ``input = input_tokens + cache_read + cache_creation``. In a
stream, ``message_start`` carries the input side and ``message_delta`` the final, cumulative
``output_tokens``.

The SDK (2.x) emits its own GenAI ``chat`` span for every call. Inside a call metered here it
would be a second inference span for the same request, and the budget processor would charge
it a second time; so, while a metered call is in flight, the SDK is handed a non-recording
span carrying the metered span's context (its trace headers still propagate). Pass
``keep_sdk_spans=True`` to ``instrument()`` to keep them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import trace

from otel_budget import attributes as attrs
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._attempts import response_json
from otel_budget.instrumentation._call import (
    CURRENT_CALL,
    LLMCall,
    LLMRequest,
    astart_call,
    capture_content,
    start_call,
    substitute_or_raise,
)
from otel_budget.instrumentation._stream import AsyncStreamProxy, SyncStreamProxy
from otel_budget.instrumentation._util import RequestParams, response_attributes
from otel_budget.instrumentation._util import content_attribute as _content_attribute
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.pricing import TokenUsage
from otel_budget.runtime import BudgetRuntime, RuntimeSource
from otel_budget.tokens import bytes_rule, estimate_input_tokens

PROVIDER_ANTHROPIC = "anthropic"
_REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
}


class StreamManagerNotEnteredError(Exception):
    """Recorded on the span of a ``messages.stream()`` whose manager was dropped without being
    entered: no request was sent, and the reservation was released."""


# -- small readers ---------------------------------------------------------------------------

def _client_info(instance: Any) -> tuple[str, str | None, int | None]:
    """(provider, server.address, server.port) of a resource's client. Bedrock and Vertex
    clients reuse the same resources and name their provider (``aws.bedrock``, ...)."""
    client = getattr(instance, "_client", None)
    provider = getattr(client, "_gen_ai_provider_name", None)
    if not isinstance(provider, str) or not provider:
        provider = PROVIDER_ANTHROPIC
    host: str | None = None
    port: int | None = None
    base_url = getattr(client, "base_url", None)
    if base_url is not None:
        host = getattr(base_url, "host", None) or None
        port = getattr(base_url, "port", None)
        if port is None:
            port = 443 if getattr(base_url, "scheme", "https") == "https" else 80
    return provider, host, port


# -- usage and response ----------------------------------------------------------------------
def anthropic_usage(usage: Any) -> TokenUsage | None:
    """A Messages ``usage`` (``Usage``/``BetaUsage``/dict) as semconv ``TokenUsage``: the input
    includes the cache-read and cache-write tokens Anthropic reports apart."""
    if usage is None:
        return None
    raw_input = _int(_get(usage, "input_tokens"))
    cache_read = _int(_get(usage, "cache_read_input_tokens"))
    cache_write = _int(_get(usage, "cache_creation_input_tokens"))
    output = _int(_get(usage, "output_tokens"))
    thinking = _int(_get(_get(usage, "output_tokens_details"), "thinking_tokens"))
    return TokenUsage(
        input_tokens=raw_input + cache_read + cache_write, output_tokens=max(output, thinking),
        cache_read_tokens=cache_read, cache_write_tokens=cache_write, reasoning_tokens=thinking,
    )  # fmt: skip


def _block_text(block: Any) -> str | None:
    kind = _get(block, "type")
    if kind == "text":
        value = _get(block, "text")
    elif kind == "thinking":
        value = _get(block, "thinking")
    elif kind in ("tool_use", "server_tool_use"):
        value = _content_attribute(_get(block, "input"))
    else:
        return None
    return value if isinstance(value, str) else None


def _message_text(message: Any) -> str:
    return "".join(t for t in (_block_text(b) for b in (_get(message, "content") or ())) if t)


def _output_messages(message: Any) -> str:
    parts: list[dict[str, Any]] = []
    for block in _get(message, "content") or ():
        kind = _get(block, "type")
        if kind == "text":
            parts.append({"type": "text", "content": _get(block, "text")})
        elif kind == "thinking":
            parts.append({"type": "reasoning", "content": _get(block, "thinking")})
        elif kind == "tool_use":
            parts.append({
                "type": "tool_call", "id": _get(block, "id"), "name": _get(block, "name"),
                "arguments": _get(block, "input"),
            })  # fmt: skip
    reason = _get(message, "stop_reason")
    out: dict[str, Any] = {"role": "assistant", "parts": parts}
    if isinstance(reason, str):
        out["finish_reason"] = reason
    return _content_attribute([out])


def _message_attributes(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rid = _get(message, "id")
    if isinstance(rid, str):
        out[attrs.GEN_AI_RESPONSE_ID] = rid
    model = _get(message, "model")
    if isinstance(model, str):
        out[attrs.GEN_AI_RESPONSE_MODEL] = model
    reason = _get(message, "stop_reason")
    if isinstance(reason, str):
        out[attrs.GEN_AI_RESPONSE_FINISH_REASONS] = [reason]
    if capture_content():
        out["gen_ai.output.messages"] = _output_messages(message)
    return out


class MessagesAccumulator:
    """Reads raw Messages stream events (``RawMessageStreamEvent`` / beta / dicts).

    ``usage`` is exact once ``message_delta`` has carried the final output count. Before that
    (a stream closed early, dropped or broken) the input side is still exact (from
    ``message_start``) and the output is estimated from what was streamed, never below the
    placeholder ``message_start`` reports; ``fallback_input`` (the projection's estimate) is
    used when the stream never said.
    """

    __slots__ = (
        "response_model", "units", "_parts", "_id", "_reasons", "_fallback_input", "_input",
        "_cache_read", "_cache_write", "_output", "_thinking", "_final", "_seen",
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
    def estimated(self) -> bool:
        return not self._final or self._input is None

    def text(self) -> str:
        return "".join(self._parts)

    def attributes(self) -> dict[str, Any]:
        out = response_attributes(self._id, self.response_model, self._reasons)
        if self._seen and self.estimated:
            out[attrs.COST_ESTIMATED] = True
        if capture_content() and self._parts:
            out["gen_ai.output.messages"] = _content_attribute(
                [{"role": "assistant", "parts": [{"type": "text", "content": self.text()}]}]
            )
        return out


# -- request reader --------------------------------------------------------------------------
def messages_request(instance: Any, kwargs: dict[str, Any], stream: bool | None = None) -> LLMRequest:
    """What a Messages call (``create``/``parse``/``stream``, GA or beta) sends: the kwargs
    with ``extra_body`` merged over them (the SDK merges it into the JSON body), one-shot
    iterators (a generator of messages) materialised into lists first, written back."""
    sent = RequestParams(kwargs)
    sent.materialise("messages", "system", "tools")
    params = sent.params
    provider, host, port = _client_info(instance)
    model = str(params.get("model") or "unknown")
    messages = params.get("messages")
    system = params.get("system")
    tools = params.get("tools")
    attributes: dict[str, Any] = {}
    for key, name in _REQUEST_ATTRIBUTES.items():
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[name] = value
    stops = params.get("stop_sequences")
    if isinstance(stops, (list, tuple)) and all(isinstance(s, str) for s in stops):
        attributes["gen_ai.request.stop_sequences"] = list(stops)
    streaming = bool(params.get("stream")) if stream is None else stream
    if streaming:
        attributes["gen_ai.request.stream"] = True
    if capture_content():
        if messages is not None:
            attributes["gen_ai.input.messages"] = _content_attribute(messages)
        if system is not None:
            attributes["gen_ai.system_instructions"] = _content_attribute(system)
    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=lambda: estimate_input_tokens(model, messages=messages, system=system, tools=tools),
        output_param="max_tokens", server_address=host, server_port=port,
        stream=streaming, attributes=attributes, params=params,
        write_output=sent.output_writer("max_tokens"),
    )  # fmt: skip


_MIN_THINKING_BUDGET = 1024  # Anthropic's minimum thinking.budget_tokens


def _fit_thinking(request: LLMRequest, asked: Any, kwargs: dict[str, Any]) -> None:
    """Keep extended thinking valid under a lowered ``max_tokens``: ``thinking.budget_tokens``
    counts inside ``max_tokens`` and must stay below it, so when the budget lowered the cap
    under it, the thinking budget is lowered too (when the cap is too small for the API's
    minimum, the request is left for the API to reject: nothing is billed and the
    reservation is released). Reads what is sent (extra_body wins)."""
    sent = RequestParams(kwargs)
    cap = sent.get("max_tokens")
    thinking = sent.get("thinking")
    if cap != asked and isinstance(cap, int) and isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and budget >= cap and cap - 1 >= _MIN_THINKING_BUDGET:
            sent.set("thinking", {**thinking, "budget_tokens": cap - 1})  # the caller's dict is kept


def _asked(request: LLMRequest, kwargs: dict[str, Any]) -> Any:
    # (extra_body wins, as in the body sent; the reader replaced it with our copy)
    return (request.params if request.params is not None else kwargs).get("max_tokens")


def _start(
    tracer: trace.Tracer, runtime: BudgetRuntime | None, request: LLMRequest, kwargs: dict[str, Any]
) -> LLMCall:
    asked = _asked(request, kwargs)
    call = start_call(tracer, request, kwargs, runtime=runtime)
    _fit_thinking(request, asked, kwargs)
    return call


async def _astart(
    tracer: trace.Tracer, runtime: BudgetRuntime | None, request: LLMRequest, kwargs: dict[str, Any]
) -> LLMCall:
    asked = _asked(request, kwargs)
    call = await astart_call(tracer, request, kwargs, runtime=runtime)
    _fit_thinking(request, asked, kwargs)
    return call


# -- settling --------------------------------------------------------------------------------
def _is_raw_response(result: Any) -> bool:
    """``with_raw_response`` / ``with_streaming_response`` return an HTTP wrapper."""
    return _get(result, "usage") is None and hasattr(result, "http_response") and hasattr(result, "parse")


def _message_outcome(message: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    attributes = _message_attributes(message) if message is not None else {}
    text = _message_text(message) if message is not None else None
    extra = {"response_model": attributes.get(attrs.GEN_AI_RESPONSE_MODEL), "output_text": text}
    return anthropic_usage(_get(message, "usage")), attributes, extra


def _settle_message(call: LLMCall, message: Any) -> None:
    usage, attributes, extra = _message_outcome(message)
    call.succeed(usage, attributes, **extra)


async def _asettle_message(call: LLMCall, message: Any) -> None:
    usage, attributes, extra = _message_outcome(message)
    await call.asucceed(usage, attributes, **extra)


def _settle_unreadable(call: LLMCall, exc: BaseException) -> None:
    """A 2xx response whose body we could not read: it was billed; estimate, never zero."""
    if call.processor is not None:
        call.processor.engine.log_once("anthropic response", exc)
    call.succeed(None)


def _billed_failure(call: LLMCall) -> tuple[Any, ...] | None:
    """A call the SDK raised out of after a 2xx answer was billed, whatever the SDK's parsing
    then did (``messages.parse`` whose output does not validate): the arguments to charge it
    the usage the response body carries (else its reservation). None: not answered."""
    if not call.answered_ok:
        return None
    usage: TokenUsage | None = None
    attributes: dict[str, Any] = {}
    text: str | None = None
    try:
        body = response_json(call.response)
        if body is not None:
            usage = anthropic_usage(_get(body, "usage"))
            attributes = _message_attributes(body)
            text = _message_text(body)
    except Exception as inner:
        if call.processor is not None:
            call.processor.engine.log_once("anthropic response", inner)
    return usage, attributes, attributes.get(attrs.GEN_AI_RESPONSE_MODEL), text


def _fail(call: LLMCall, exc: BaseException) -> None:
    billed = _billed_failure(call)
    if billed is None:
        call.fail(exc)
        return
    usage, attributes, model, text = billed
    call.fail_after_response(exc, usage, attributes, response_model=model, output_text=text)


async def _afail(call: LLMCall, exc: BaseException) -> None:
    billed = _billed_failure(call)
    if billed is None:
        await call.afail(exc)
        return
    usage, attributes, model, text = billed
    await call.afail_after_response(
        exc, usage, attributes, response_model=model, output_text=text
    )


def _settle_abandoned_raw(call: LLMCall) -> None:
    if not call.done:
        call.succeed(None)


class _RawStreamResponse(wrapt.ObjectProxy):  # type: ignore[misc]
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
            self._self_stream = SyncStreamProxy(stream, call, MessagesAccumulator(call.input_tokens))
        return self._self_stream


class _AsyncRawStreamResponse(wrapt.ObjectProxy):  # type: ignore[misc]
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
            self._self_stream = AsyncStreamProxy(stream, call, MessagesAccumulator(call.input_tokens))
        return self._self_stream


def _use_span(call: LLMCall) -> Any:
    return trace.use_span(call.span, end_on_exit=False, record_exception=False,
                          set_status_on_exception=False)  # fmt: skip


# -- create / parse --------------------------------------------------------------------------
def messages_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    """``Messages.create`` / ``parse`` (and the beta ones): JSON or ``stream=True``."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            # Metered by an outer wrapper (litellm), or a positional call we cannot read.
            return wrapped(*args, **kwargs)
        try:
            call = _start(tracer, source.get(), messages_request(instance, kwargs), kwargs)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        token = CURRENT_CALL.set(call)
        try:
            with _use_span(call):
                result = wrapped(*args, **kwargs)
        except BudgetExceededError as error:  # a retry the budget no longer affords
            _fail(call, error)
            return substitute_or_raise(error)
        except BaseException as exc:
            _fail(call, exc)
            raise
        finally:
            CURRENT_CALL.reset(token)
        if call.request.stream:
            if hasattr(result, "__next__"):
                return SyncStreamProxy(result, call, MessagesAccumulator(call.input_tokens))
            if _is_raw_response(result):
                return _RawStreamResponse(result, call)
        try:
            message = result.parse() if _is_raw_response(result) else result
        except Exception as exc:
            _settle_unreadable(call, exc)
            return result
        _settle_message(call, message)
        return result

    return wrapper


def async_messages_create(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            return await wrapped(*args, **kwargs)
        try:
            call = await _astart(tracer, source.get(), messages_request(instance, kwargs), kwargs)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        token = CURRENT_CALL.set(call)
        try:
            with _use_span(call):
                result = await wrapped(*args, **kwargs)
        except BudgetExceededError as error:  # a retry the budget no longer affords
            await _afail(call, error)
            return substitute_or_raise(error)
        except BaseException as exc:
            await _afail(call, exc)
            raise
        finally:
            CURRENT_CALL.reset(token)
        if call.request.stream:
            if hasattr(result, "__anext__"):
                return AsyncStreamProxy(result, call, MessagesAccumulator(call.input_tokens))
            if _is_raw_response(result):
                return _AsyncRawStreamResponse(result, call)
        try:
            message = await result.parse() if _is_raw_response(result) else result
        except Exception as exc:
            _settle_unreadable(call, exc)
            return result
        await _asettle_message(call, message)
        return result

    return wrapper


# -- messages.stream() -----------------------------------------------------------------------
def _request_slot(manager: Any) -> str | None:
    """The manager's private request attribute (``_MessageStreamManager__api_request``, ...)."""
    try:
        names = vars(manager)
    except TypeError:
        return None
    for name in names:
        if name.endswith("__api_request"):
            return name
    return None


def _release_unsent(call: LLMCall, coroutines: tuple[Any, ...] = ()) -> None:
    """A stream manager dropped without being entered: nothing was sent."""
    for coroutine in coroutines:
        try:
            coroutine.close()  # never started: closing it silences "never awaited"
        except Exception:
            pass
    if not call.done:
        call.fail(StreamManagerNotEnteredError("messages.stream() was never entered; nothing sent"))


def _unhookable(call: LLMCall) -> None:
    """A manager shape we do not know: the request will be sent unseen; charge the
    reservation (never free) rather than release it."""
    if call.processor is not None:
        call.processor.engine.log_once(
            "anthropic stream manager", None,
            "unknown MessageStreamManager shape; charging the projected cost",
        )  # fmt: skip
    call.budgeted.finish(call.budgeted.projected_nanos, attributes={attrs.COST_ESTIMATED: True})


def messages_stream(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    """``Messages.stream`` (and beta): returns a manager that sends on ``__enter__``."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            return wrapped(*args, **kwargs)
        request = messages_request(instance, kwargs, stream=True)
        runtime = source.get()
        try:
            call = _start(tracer, runtime, request, kwargs)  # before the body is built: the cap lands in it
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        try:
            manager = wrapped(*args, **kwargs)  # builds the request, sends nothing
        except BaseException as exc:
            call.fail(exc)
            raise
        slot = _request_slot(manager)
        original = getattr(manager, slot, None) if slot else None
        if not callable(original):
            _unhookable(call)
            return manager
        body = getattr(original, "keywords", {}).get("body")
        pending: list[LLMCall] = [call]

        def api_request() -> Any:
            if pending:
                current = pending.pop()
                finalizer.detach()
            else:
                # The manager entered again: a new request, metered on its own (the cap goes
                # into the body the partial sends).
                current = _start(tracer, runtime, request, body if isinstance(body, dict) else {})
            token = CURRENT_CALL.set(current)
            try:
                with _use_span(current):
                    raw = original()
            except BaseException as exc:
                _fail(current, exc)
                raise
            finally:
                CURRENT_CALL.reset(token)
            return SyncStreamProxy(raw, current, MessagesAccumulator(current.input_tokens))

        finalizer = weakref.finalize(manager, _release_unsent, call)
        setattr(manager, slot, api_request)  # type: ignore[arg-type]
        return manager

    return wrapper


def async_messages_stream(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    """``AsyncMessages.stream`` (and beta): the manager awaits a ``_post`` coroutine."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if CURRENT_CALL.get() is not None or args:
            return wrapped(*args, **kwargs)
        try:
            call = _start(tracer, source.get(), messages_request(instance, kwargs, stream=True), kwargs)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        try:
            manager = wrapped(*args, **kwargs)  # creates the _post coroutine, sends nothing
        except BaseException as exc:
            call.fail(exc)
            raise
        slot = _request_slot(manager)
        original = getattr(manager, slot, None) if slot else None
        if original is None or not hasattr(original, "__await__"):
            _unhookable(call)
            return manager

        async def api_request() -> Any:
            finalizer.detach()
            token = CURRENT_CALL.set(call)
            try:
                with _use_span(call):
                    raw = await original
            except BaseException as exc:
                await _afail(call, exc)
                raise
            finally:
                CURRENT_CALL.reset(token)
            return AsyncStreamProxy(raw, call, MessagesAccumulator(call.input_tokens))

        hooked = api_request()
        finalizer = weakref.finalize(manager, _release_unsent, call, (hooked, original))
        setattr(manager, slot, hooked)
        return manager

    return wrapper


# -- the SDK's own spans ---------------------------------------------------------------------
def sdk_span_guard(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Wraps ``anthropic._base_client.start_api_call_span``: inside a metered call the SDK
    gets a non-recording span with the metered span's context (so its trace headers still
    name the call), instead of a second GenAI span the processor would charge again."""
    if CURRENT_CALL.get() is not None:
        context = trace.get_current_span().get_span_context()
        return trace.NonRecordingSpan(context) if context.is_valid else None
    return wrapped(*args, **kwargs)
