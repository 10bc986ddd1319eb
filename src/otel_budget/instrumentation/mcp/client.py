"""The MCP client wrapper: ``ClientSession.call_tool`` as a budgeted ``execute_tool`` span.

    wrap_function_wrapper("mcp.client.session", "ClientSession.call_tool",
                          call_tool(tracer, source, inject_meta=True))

Each call is loop-checked and reserved before the request is written (a refused call never
reaches the server), runs with its ``execute_tool {name}`` span current, and is settled as
``outcome`` says. The span follows the GenAI ``execute_tool`` conventions
(``gen_ai.tool.type=extension``: the agent calls an external server's tool) and, as the MCP
conventions ask of an instrumentation that already traces the tool execution, carries the MCP
attributes it knows: ``mcp.method.name=tools/call`` and ``mcp.protocol.version`` (the SDK's
own ``MCP send tools/call`` client span, mcp 2, nests under it with the JSON-RPC id).

Trace context: mcp 2 injects the W3C ``traceparent`` (and ``baggage``) of its client span
into ``params._meta`` itself; mcp 1 does not, so with ``inject_meta`` the wrapper adds the
current context (our span's) to the call's ``meta`` (keys the caller set win; the caller's
dict is never modified). The server continues the trace, and an otel-budget ``budget()`` in
baggage reaches it.

Charged once: with ``inject_meta``, each metered call also carries a random token under
``params._meta["io.github.otel-budget/call"]`` (ours replaces one the caller set),
registered in the ledger the call is metered on from its reservation until it settles
(``call_token``): an instrumented server on the same ledger, or in this process, takes it
and does not charge the call again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import propagate, trace

from otel_budget.instrumentation.mcp.call_token import new_token
from otel_budget.instrumentation.mcp.outcome import (
    CALL_META_KEY,
    MCP_METHOD_NAME,
    MCP_PROTOCOL_VERSION,
    METHOD_TOOLS_CALL,
)
from otel_budget.instrumentation.mcp.tool_call import metered
from otel_budget.runtime import RuntimeSource

#: ``gen_ai.tool.type`` of a tool an agent calls on an MCP server: the spec's ``extension``
#: ("executed on the agent-side to directly call external APIs").
CLIENT_TOOL_TYPE = "extension"


def with_trace_context(kwargs: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """``kwargs`` with the current trace context (and baggage) added to ``meta`` (keys the
    caller set win), and ``token`` under ``CALL_META_KEY`` (ours wins: it is the one
    registered for this call)."""
    carrier: dict[str, Any] = {}
    propagate.inject(carrier)
    if not carrier and token is None:
        return kwargs
    meta = kwargs.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return kwargs  # a type we do not know how to extend: sent as given
    merged = dict(meta) if meta else {}
    for key, value in carrier.items():
        merged.setdefault(key, value)
    if token is not None:
        merged[CALL_META_KEY] = token
    return {**kwargs, "meta": merged}


def session_attributes(session: Any) -> dict[str, Any]:
    """The MCP attributes of the call's span that the session knows."""
    attributes: dict[str, Any] = {MCP_METHOD_NAME: METHOD_TOOLS_CALL}
    try:
        version = getattr(session, "protocol_version", None)  # mcp 2 (None before initialize)
    except Exception:
        version = None
    if isinstance(version, str) and version:
        attributes[MCP_PROTOCOL_VERSION] = version
    return attributes


def call_tool(
    tracer: trace.Tracer, source: RuntimeSource, *, inject_meta: bool
) -> Callable[..., Any]:
    """The wrapt wrapper of ``ClientSession.call_tool(name, arguments=None, ...)``."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if args:
            name = args[0]
            arguments = args[1] if len(args) > 1 else kwargs.get("arguments")
        elif "name" in kwargs:
            name, arguments = kwargs["name"], kwargs.get("arguments")
        else:
            return await wrapped(*args, **kwargs)  # no tool named: the SDK's TypeError

        token = new_token() if inject_meta else None

        async def send() -> Any:
            if token is None:
                return await wrapped(*args, **kwargs)
            sent = kwargs
            try:  # inside the span: the context injected is the call's
                sent = with_trace_context(kwargs, token)
            except Exception as exc:  # a broken propagator: sent without context
                runtime = source.get()
                if runtime is not None:
                    runtime.engine.log_once("mcp trace context", exc)
            return await wrapped(*args, **sent)

        return await metered(
            tracer, source, name, arguments, send,
            tool_type=CLIENT_TOOL_TYPE, attributes=session_attributes(instance), token=token,
        )  # fmt: skip

    return wrapper


__all__ = ["CLIENT_TOOL_TYPE", "call_tool", "session_attributes", "with_trace_context"]
