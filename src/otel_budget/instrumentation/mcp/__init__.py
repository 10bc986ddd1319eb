"""Budget-enforcing instrumentation of MCP tool calls (the ``mcp`` Python SDK, 1.x and 2.x).

    from otel_budget import BudgetInstrumentor, PriceBook

    BudgetInstrumentor().instrument(                      # or MCPInstrumentor().instrument()
        max_usd=0.50, prices=PriceBook(tools={"search": 0.002, "fetch_*": 0.0005}))
    async with ClientSession(read, write) as session:
        await session.initialize()
        await session.call_tool("search", {"query": "x"})   # reserved, loop-checked first

Client: ``ClientSession.call_tool`` (so also mcp 2's ``Client.call_tool`` and
``ClientSessionGroup.call_tool``, which go through it) is an ``execute_tool {name}`` span on
the one tool path (``otel_budget.tools``): priced from the price book's ``tools=`` entry
(a function there gets the ``CallToolResult``), charged to the same budget as the LLM calls
of the trace, checked by loop detection on (name, arguments), refused before the request is
written. How each ending is charged: ``outcome``. Server: the tools an ``MCPServer`` (mcp 2)
or ``FastMCP`` (mcp 1) runs, as ``server`` describes.

``instrument()`` never imports ``mcp`` (an import of a second or so): when it is not imported
yet, the wrappers are applied by a post-import hook the moment each module is, so a server
module the application never imports is never loaded. ``uninstrument()`` unwraps exactly what
was wrapped, a wrapper still referenced passes straight through, and a hook that fires later
does nothing (the frame: ``instrumentation._sdk``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any

from opentelemetry import trace

from otel_budget.instrumentation._sdk import SDKInstrumentor, given_original, tracer_of
from otel_budget.instrumentation.mcp import client, server
from otel_budget.runtime import RuntimeSource

_INSTRUMENTS = ("mcp >= 1.30",)


def _client_call_tool(
    tracer: trace.Tracer, source: RuntimeSource, original: Any
) -> Callable[..., Any]:
    try:
        inject = "meta" in inspect.signature(original).parameters
    except (TypeError, ValueError):
        inject = False
    return client.call_tool(tracer, source, inject_meta=inject)


def _server_call_tool(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    return server.call_tool(tracer, source)


class MCPInstrumentor(SDKInstrumentor):
    """Instruments the MCP SDK's tool calls (client and server) with budgeted spans."""

    _SDK = "mcp"
    _EACH_MODULE = True  # each wrapped when the application imports its module
    _TARGETS = (
        ("mcp.client.session", "ClientSession", "call_tool", given_original(_client_call_tool)),
        ("mcp.server.mcpserver.server", "MCPServer", "call_tool", _server_call_tool),  # mcp 2
        ("mcp.server.fastmcp.server", "FastMCP", "call_tool", _server_call_tool),  # mcp 1
    )

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _wiring(self, **kwargs: Any) -> tuple[Any, ...]:
        return tracer_of(self, kwargs), RuntimeSource(kwargs.get("runtime"))


__all__ = ["MCPInstrumentor"]
