"""Every HTTP attempt of a metered call is seen: reserved before it is sent, charged if billed.

    with metered_send(call):                     # the SDK wrapper, around the SDK call
        result = wrapped(*args, **kwargs)
    # and, once, on the SDK's own attempt layer (inside its retry loop):
    wrap_function_wrapper("openai._base_client", "SyncAPIClient._send_request", sync_attempt)

The openai and anthropic SDKs retry inside the call (``max_retries=2`` by default), so one
metered call may send several requests. Each attempt is classified when it ends:

* an HTTP answer: a 2xx was billed (the call settles it from its usage, even when the SDK's
  parsing raises afterwards); an error status (429, 5xx, 4xx) was not billed;
* no connection at all (``ConnectError``, ``ConnectTimeout``, a pool timeout): never sent,
  not billed;
* a prompt-cache hit (``_cache``): nothing is sent; the attempt answers with the cached
  body, which the SDK parses as it would the provider's;
* anything else (a read timeout, a connection lost after sending, a cancellation): the
  provider may have billed it, so it is charged its projection at once
  (``LLMCall.attempt_may_be_billed``), and before the SDK sends another attempt the
  projection is reserved again (``LLMCall.begin_attempt``); when it no longer fits,
  ``BudgetExceededError`` leaves the SDK's retry loop and reaches the caller.

The current call is a ``ContextVar`` set by the outermost metered wrapper (litellm's, when
litellm sends through the openai SDK), so threads and asyncio tasks each see their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otel_budget.instrumentation._call import LLMCall

from otel_budget.instrumentation._cache import serve_flow
from otel_budget.instrumentation._flow import arun_flow, run_flow
from otel_budget.metered import CURRENT_CALL  # the one "call being sent" of the process

# Transport errors raised before the request left the client: the provider never saw it.
_NOT_SENT = frozenset({
    "ConnectError", "ConnectTimeout", "PoolTimeout", "UnsupportedProtocol", "InvalidURL",
    "LocalProtocolError", "ProxyError", "ConnectionRefusedError", "BudgetExceededError",
})  # fmt: skip
# Transport errors (the connection failed, not the provider's answer), by class name so that
# httpx, httpx2, httpcore, anyio and the SDKs' wrappers are all recognised.
_TRANSPORT = frozenset({
    "TransportError", "TimeoutException", "NetworkError", "ProtocolError", "ReadError",
    "ReadTimeout", "RemoteProtocolError", "APIConnectionError", "APITimeoutError",
    "ConnectionError", "TimeoutError", "EndOfStream", "BrokenResourceError",
    "ClosedResourceError", "IncompleteRead", "Timeout",
})  # fmt: skip


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _names(exc: BaseException) -> set[str]:
    return {klass.__name__ for klass in type(exc).__mro__}


def never_sent(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says the request never reached the provider."""
    return any(_names(e) & _NOT_SENT for e in _chain(exc))


def is_transport_error(exc: BaseException) -> bool:
    """True for a lost connection or a timeout (as opposed to an answer of the provider)."""
    return any(_names(e) & _TRANSPORT for e in _chain(exc))


def budget_refusal_in(exc: BaseException) -> BaseException | None:
    """The ``BudgetExceededError`` a library wrapped in its own error (litellm), if any."""
    for error in _chain(exc):
        if "BudgetExceededError" in _names(error):
            return error
    return None


def may_be_billed(exc: BaseException) -> bool:
    """An attempt that ended with ``exc`` instead of an HTTP answer: was it possibly billed?"""
    return not never_sent(exc)


@contextlib.contextmanager
def metered_send(call: LLMCall) -> Iterator[None]:
    """Make ``call`` the one whose attempts the SDK hooks see while the SDK call runs."""
    token = CURRENT_CALL.set(call)
    try:
        yield
    finally:
        CURRENT_CALL.reset(token)


def _response_of(result: Any) -> Any:
    """openai's ``_send_request`` returns the response; anthropic's ``_attempt_request`` a
    ``(response, options)`` pair."""
    if isinstance(result, tuple) and result:
        return result[0]
    return result


def _answered(call: LLMCall, result: Any) -> None:
    response = _response_of(result)
    status = getattr(response, "status_code", None)
    call.attempt_answered(status if isinstance(status, int) else 200, response)


def sync_attempt(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Wraps one HTTP attempt of a sync SDK client (see the module docstring)."""
    call = CURRENT_CALL.get()
    if not hasattr(call, "begin_attempt") or call.done:
        return wrapped(*args, **kwargs)
    if call.cache is not None and call.cache.entry is not None:  # a prompt-cache hit
        return run_flow(serve_flow(instance, args, kwargs, call.cache.entry))
    call.begin_attempt()  # may raise BudgetExceededError: the SDK's loop lets it through
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        if may_be_billed(exc):
            call.attempt_may_be_billed(exc)
        raise
    _answered(call, result)
    return result


async def async_attempt(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Wraps one HTTP attempt of an async SDK client."""
    call = CURRENT_CALL.get()
    if not hasattr(call, "abegin_attempt") or call.done:
        return await wrapped(*args, **kwargs)
    if call.cache is not None and call.cache.entry is not None:  # a prompt-cache hit
        return await arun_flow(serve_flow(instance, args, kwargs, call.cache.entry))
    await call.abegin_attempt()  # never blocks the event loop on the ledger
    try:
        result = await wrapped(*args, **kwargs)
    except BaseException as exc:
        if may_be_billed(exc):
            await call.aattempt_may_be_billed(exc)
        raise
    _answered(call, result)
    return result


def response_json(response: Any) -> Any:
    """The JSON body of a 2xx response the SDK already read (None for a stream, or garbage)."""
    if response is None or not getattr(response, "is_closed", False):
        return None  # a streamed body: reading it here would take it from the SDK
    try:
        return response.json()
    except Exception:
        return None


__all__ = [
    "CURRENT_CALL",
    "async_attempt",
    "budget_refusal_in",
    "is_transport_error",
    "may_be_billed",
    "metered_send",
    "never_sent",
    "response_json",
    "sync_attempt",
]
