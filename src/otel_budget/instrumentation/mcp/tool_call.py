"""One MCP tool call on the one tool path: start it, run it under its span, settle it.

    call = await start(tracer, source, name, arguments, tool_type="extension",
                       attributes={"mcp.method.name": "tools/call"})   # may refuse
    result = await run(call, send)        # send(): the SDK's call_tool, under the span
    # settled from the result (or the exception), as ``outcome`` reads it

Client and server wrappers differ in what they read from the SDK; everything about the
budget (reserve before the tool runs, loop detection, how each ending is charged, the
span's error, the client's call token: ``call_token``) is here, once. A call whose client
metered it (``free=True``) is traced on the same path, without a reservation or a ledger
operation, and settles at $0. A failure of otel-budget's own (never the tool's, never a
refusal) is logged rate-limited and follows the failure policy: under ``fail_open`` the
tool runs unmetered, under ``fail_closed`` it is refused with
``BudgetExceededError(reason="internal_error")``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._call import substitute_or_raise
from otel_budget.instrumentation.mcp.call_token import register, release
from otel_budget.instrumentation.mcp.outcome import (
    NONE,
    RESERVED,
    RPC_RESPONSE_STATUS_CODE,
    RecordedError,
    error_outcome,
    result_outcome,
)
from otel_budget.processor import ensure_processor
from otel_budget.runtime import BudgetRuntime, RuntimeSource
from otel_budget.tools import ToolCall, abegin_tool


def runtime_of(source: RuntimeSource) -> BudgetRuntime:
    runtime = source.get()
    return runtime if runtime is not None else ensure_processor().runtime


def _usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)  # exact: the ledger charges the nano-dollars reserved


async def start(
    tracer: trace.Tracer, source: RuntimeSource, name: Any, arguments: Any, *,
    tool_type: str, attributes: Mapping[str, Any], free: bool = False,
) -> ToolCall | None:  # fmt: skip
    """The tool call, reserved and loop-checked before anything is sent; ``None`` when
    otel-budget failed and ``fail_open`` lets the tool run unmetered. Raises
    ``BudgetExceededError`` (refused: the span is ended as refused). ``free``: metered by
    its client, only traced here."""
    runtime = runtime_of(source)
    try:
        return await abegin_tool(
            name, arguments=arguments, tool_type=tool_type, attributes=attributes,
            runtime=runtime, tracer=tracer, free=free, cost_usd=0 if free else None,
        )  # fmt: skip
    except BudgetExceededError:
        raise
    except Exception as exc:  # our bug: the policy decides
        refusal = runtime.engine.internal_error("mcp tool call", exc)
        if refusal is not None:
            raise refusal from exc
        return None


async def run(call: ToolCall, send: Callable[[], Awaitable[Any]]) -> Any:
    """``send()`` under the call's span, then settle the call from how it ended. A failure
    of ours while settling is logged; the tool's own result or exception reaches the app."""
    try:
        with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):  # fmt: skip
            result = await send()
    except BaseException as exc:
        await _guarded(call, settle_error(call, exc))
        raise
    await _guarded(call, settle_result(call, result))
    return result


async def _guarded(call: ToolCall, settling: Awaitable[None]) -> None:
    try:
        await settling
    except Exception as exc:  # our bug: never instead of the tool's outcome
        runtime = call.call.runtime
        if runtime is not None:
            runtime.engine.log_once("mcp tool call settle", exc)


async def settle_result(call: ToolCall, result: Any) -> None:
    outcome = result_outcome(result)
    if outcome.charge == NONE:
        await call.afinish(result, cost_usd=0)
        return
    if outcome.error_type is not None:
        span = call.span
        if span.is_recording():
            span.set_attribute(attrs.ERROR_TYPE, outcome.error_type)
            span.set_status(Status(StatusCode.ERROR, outcome.message))
    await call.afinish(result)


async def settle_error(call: ToolCall, exc: BaseException) -> None:
    outcome = error_outcome(exc)
    if outcome.charge == RESERVED:
        await call.afail(exc, cost_usd=_usd(call.projected_nanos))
        return
    if outcome.status_code is None:
        await call.afail(exc)  # error.type: the exception's class
        return
    if call.span.is_recording():
        call.span.set_attribute(RPC_RESPONSE_STATUS_CODE, outcome.status_code)
    await call.afail(RecordedError(outcome.status_code, outcome.message))


async def metered(
    tracer: trace.Tracer, source: RuntimeSource, name: Any, arguments: Any,
    send: Callable[[], Awaitable[Any]], *, tool_type: str, attributes: Mapping[str, Any],
    token: str | None = None, free: bool = False,
) -> Any:  # fmt: skip
    """A whole metered tool call: ``start``, then ``run`` (or ``send`` unmetered under
    ``fail_open`` when otel-budget itself failed). A refusal that ``on_exceeded`` answered
    with ``Substitute(value)`` returns ``value`` without calling the tool. ``token``: the
    client's call token (``send`` puts it in the request), registered once the call is
    reserved and before ``send`` writes it, released when the call has settled; an
    unmetered call's token is never registered (a server meters that call itself)."""
    try:
        call = await start(tracer, source, name, arguments, tool_type=tool_type,
                           attributes=attributes, free=free)  # fmt: skip
    except BudgetExceededError as error:
        return substitute_or_raise(error)
    if call is None:
        return await send()
    runtime = call.call.runtime
    if token is None or runtime is None:
        return await run(call, send)

    async def registered_send() -> Any:
        await register(runtime, token, name, call.projected_nanos)
        return await send()

    try:
        return await run(call, registered_send)
    finally:
        await release(runtime, token, name)


__all__ = ["metered", "run", "runtime_of", "settle_error", "settle_result", "start"]
