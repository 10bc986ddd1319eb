"""The MCP server wrapper: each tool an ``MCPServer`` (``FastMCP`` in mcp 1) runs is budgeted.

    wrap_function_wrapper("mcp.server.mcpserver.server", "MCPServer.call_tool",
                          call_tool(tracer, source))

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

Charged once: a call whose client is instrumented is metered by the client, which puts a
random 128-bit token in ``params._meta`` (``io.github.otel-budget/call``) and registers it,
for the duration of the call, in the ledger it meters the call on (``call_token``). The
server takes the token (atomically, once): from this process's open calls when its own
client sends it (an in-process ``Client(server)``: no ledger round trip, no second span),
else from its own ledger, which finds it when client and server share one (Redis), with
what the client reserved. Taken, and reserved at no less than this server's own price for
the tool, the tool runs unmetered but traced: an ``execute_tool`` span with
``otel_budget.tool.metered_by="client"``, charged $0 here, no reservation, no loop check
(the client did both). Not found (no token, a made-up or replayed one, expired, another
ledger), reserved below the server's price (a client that prices the tool lower or not at
all; logged once per tool), or the ledger did not answer (logged), the server meters the
call as any other: a remote client without write access to the ledger cannot dodge the
server's budget, and an outage charges the call twice rather than not at all.

Unknown tools are not metered (the SDK answers "Unknown tool" without running anything).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context

from otel_budget.instrumentation.mcp.call_token import IN_PROCESS, taken
from otel_budget.instrumentation.mcp.outcome import (
    CALL_META_KEY,
    MCP_METHOD_NAME,
    MCP_PROTOCOL_VERSION,
    METHOD_TOOLS_CALL,
)
from otel_budget.instrumentation.mcp.tool_call import metered, runtime_of
from otel_budget.runtime import RuntimeSource
from otel_budget.tools import ToolPrice

#: ``gen_ai.tool.type`` of a tool the server runs: the function the agent asked for.
SERVER_TOOL_TYPE = "function"
JSONRPC_REQUEST_ID = "jsonrpc.request.id"
#: On a server's tool span whose client metered the call (its call token was taken).
METERED_BY = "otel_budget.tool.metered_by"
#: What ``_metered_by_client`` answers for a token taken from the ledger and trusted.
FROM_LEDGER = "ledger"


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


async def _metered_by_client(source: RuntimeSource, meta: Mapping[str, Any], name: Any) -> str | None:
    """Whether the call's client metered it: its call token, taken now (see the module doc),
    from this process's client (``IN_PROCESS``), or from the ledger with a reservation of at
    least the server's own price (``FROM_LEDGER``). ``None`` (the server meters it) for
    anything else, our own failures included (logged)."""
    if CALL_META_KEY not in meta:
        return None
    try:
        runtime = runtime_of(source)
        found = await taken(runtime, meta, name)
        if not isinstance(found, int):
            return found  # IN_PROCESS, or None
        own = ToolPrice(str(name)).projected(runtime)
        if found >= own:
            return FROM_LEDGER
        runtime.engine.log_once.warning(
            f"mcp client price {name}",
            f"otel-budget: an MCP client metered tool {name!r} at {found} nano-USD, below "
            f"this server's price ({own}): the server charges it too (price the tool alike "
            "on both sides, or on the client only)",
        )  # fmt: skip
        return None
    except Exception as exc:  # our bug: the call is metered here
        runtime_ = source.get()
        if runtime_ is not None:
            runtime_.engine.log_once("mcp server call token", exc)
        return None


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


def call_tool(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    """The wrapt wrapper of ``MCPServer.call_tool(name, arguments, context=None)`` (mcp 2)
    and ``FastMCP.call_tool(name, arguments)`` (mcp 1)."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        name = args[0] if args else kwargs.get("name")
        arguments = args[1] if len(args) > 1 else kwargs.get("arguments")
        try:
            request_context = _request_context(instance, args, kwargs)
            meta = _meta(request_context)
            skip = _is_unknown(instance, name)
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
            by = await _metered_by_client(source, meta, name)
            if by == IN_PROCESS:  # this process's own client metered and traced it
                return await wrapped(*args, **kwargs)
            if by == FROM_LEDGER:
                attributes[METERED_BY] = "client"
            return await metered(
                tracer, source, name, arguments, lambda: wrapped(*args, **kwargs),
                tool_type=SERVER_TOOL_TYPE, attributes=attributes, free=by == FROM_LEDGER,
            )  # fmt: skip
        finally:
            if token is not None:
                otel_context.detach(token)

    return wrapper


__all__ = ["METERED_BY", "SERVER_TOOL_TYPE", "call_tool"]
