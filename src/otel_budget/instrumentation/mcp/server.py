"""The MCP server wrapper: each tool an ``MCPServer`` (``FastMCP`` in mcp 1) runs is budgeted.

    wrap_function_wrapper("mcp.server.mcpserver.server", "MCPServer.call_tool",
                          call_tool(tracer, source, switch))

A server can enforce its own budgets on the tools it serves: each call is an
``execute_tool {name}`` span (``gen_ai.tool.type=function``: the server runs the function),
priced from the server's price book, loop-checked, and refused before the tool body runs.
A refusal raises ``BudgetExceededError`` out of ``call_tool``; the SDK answers it to the
client as a tool error (``isError``) with its message, so the agent sees why.

The span continues the client's trace: under mcp 2 the SDK's own ``tools/call`` server span
(parented on ``params._meta``'s ``traceparent``) is current already, and the wrapper adds the
``baggage`` the SDK drops; under mcp 1 the wrapper extracts both from ``params._meta``. A ``budget()`` the
client carries in baggage therefore narrows the server's trace budget (never widens it), and
``user.id``-style scopes apply per trace, user or tenant as configured on the server.

Charged once: a call whose client runs in this same process (an in-process
``Client(server)``) is already metered by the client's wrapper, which puts a random token in
``params._meta`` (``io.github.otel-budget/call``); the server then runs the tool unmetered.
The token is only believed while this process's own client is sending it, so a remote
client cannot use it to dodge the server's budget. With
one shared ledger (Redis) for an instrumented client and an instrumented server of the same
trace, each side charges the call: instrument one side, or price the tool on one only.

Unknown tools are not metered (the SDK answers "Unknown tool" without running anything).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context

from otel_budget.instrumentation.mcp.client import OPEN_CALLS
from otel_budget.instrumentation.mcp.outcome import (
    CALL_META_KEY,
    MCP_METHOD_NAME,
    MCP_PROTOCOL_VERSION,
    METHOD_TOOLS_CALL,
)
from otel_budget.instrumentation.mcp.tool_call import metered
from otel_budget.runtime import RuntimeSource

#: ``gen_ai.tool.type`` of a tool the server runs: the function the agent asked for.
SERVER_TOOL_TYPE = "function"
JSONRPC_REQUEST_ID = "jsonrpc.request.id"


def _request_context(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The SDK's request context of the call being served: mcp 2 passes a ``Context`` as the
    third argument; mcp 1's ``FastMCP`` has ``get_context()``."""
    ctx = args[2] if len(args) > 2 else kwargs.get("context")
    if ctx is None:
        get_context = getattr(instance, "get_context", None)
        ctx = get_context() if callable(get_context) else None
    try:
        return getattr(ctx, "request_context", None)
    except Exception:  # outside a request: the SDK raises
        return None


def _meta(request_context: Any) -> dict[str, Any]:
    meta = getattr(request_context, "meta", None)
    if meta is None:
        return {}
    if hasattr(meta, "model_dump"):  # mcp 1: a pydantic model with extra fields
        meta = meta.model_dump(by_alias=True, exclude_none=True)
    return dict(meta) if isinstance(meta, Mapping) else {}


def _metered_by_client(meta: Mapping[str, Any]) -> bool:
    """A client wrapper in this process is sending this call, metered (see the module doc)."""
    marker = meta.get(CALL_META_KEY)
    return isinstance(marker, str) and marker in OPEN_CALLS


def _continued(meta: Mapping[str, Any]) -> otel_context.Context:
    """The context the tool's span starts in: the client's trace and baggage from
    ``params._meta``. Under mcp 2 the SDK's server span is current already (parented on the
    same ``traceparent``) but the SDK drops the extracted baggage: it is added back."""
    extracted = propagate.extract(meta)
    if not trace.get_current_span().get_span_context().is_valid:
        return extracted  # mcp 1: no SDK span continues the client's trace; the tool's does
    ctx = otel_context.get_current()
    for key, value in baggage.get_all(extracted).items():
        if baggage.get_baggage(key, ctx) is None:
            ctx = baggage.set_baggage(key, value, ctx)
    return ctx


def _attributes(request_context: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {MCP_METHOD_NAME: METHOD_TOOLS_CALL}
    request_id = getattr(request_context, "request_id", None)
    if request_id is not None:
        attributes[JSONRPC_REQUEST_ID] = str(request_id)
    version = getattr(request_context, "protocol_version", None)
    if isinstance(version, str) and version:
        attributes[MCP_PROTOCOL_VERSION] = version
    return attributes


def _is_unknown(instance: Any, name: Any) -> bool:
    manager = getattr(instance, "_tool_manager", None)
    get_tool = getattr(manager, "get_tool", None)
    if not callable(get_tool) or not isinstance(name, str):
        return False
    try:
        return get_tool(name) is None
    except Exception:
        return False


def call_tool(tracer: trace.Tracer, source: RuntimeSource, switch: Any) -> Callable[..., Any]:
    """The wrapt wrapper of ``MCPServer.call_tool(name, arguments, context=None)`` (mcp 2)
    and ``FastMCP.call_tool(name, arguments)`` (mcp 1)."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not switch.on:
            return await wrapped(*args, **kwargs)
        name = args[0] if args else kwargs.get("name")
        arguments = args[1] if len(args) > 1 else kwargs.get("arguments")
        try:
            request_context = _request_context(instance, args, kwargs)
            meta = _meta(request_context)
            skip = _is_unknown(instance, name) or _metered_by_client(meta)
            attributes = _attributes(request_context)
        except Exception as exc:  # our bug: meter it without what we could not read
            runtime = source.get()
            if runtime is not None:
                runtime.engine.log_once("mcp server request", exc)
            meta, skip, attributes = {}, False, {MCP_METHOD_NAME: METHOD_TOOLS_CALL}
        if skip:
            return await wrapped(*args, **kwargs)
        token = None
        if meta:
            try:
                token = otel_context.attach(_continued(meta))
            except Exception as exc:  # our bug (a broken propagator): the current context
                runtime = source.get()
                if runtime is not None:
                    runtime.engine.log_once("mcp server trace context", exc)
        try:
            return await metered(
                tracer, source, name, arguments, lambda: wrapped(*args, **kwargs),
                tool_type=SERVER_TOOL_TYPE, attributes=attributes,
            )  # fmt: skip
        finally:
            if token is not None:
                otel_context.detach(token)

    return wrapper


__all__ = ["SERVER_TOOL_TYPE", "call_tool"]
