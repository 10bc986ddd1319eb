"""A real MCP server for the MCP instrumentation tests: in-process, or over stdio.

    server = build_server()                              # in-process (``mcp.Client(server)``)
    python -m tests.mcp_tool_server                      # the same server over stdio
    python -m tests.mcp_tool_server --instrument 0.05    # ... with MCPInstrumentor and a
                                                         #     $0.05 per-trace budget
        [--redis-url URL --prefix P]                     # on a shared ledger
        [--tool-usd where_am_i=0.002]                    # more priced tools

The server counts the tools it actually ran (``EXECUTIONS``, and the ``stats://executions``
resource for a server in another process), so a test can tell a refused call from a call
that reached a tool. ``where_am_i`` answers the trace and span ids the tool body runs under,
and the ``traceparent`` (and the client's call token) it received in ``params._meta``, to
check propagation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections import Counter
from typing import Any

from opentelemetry import baggage, trace

try:  # mcp 2: FastMCP is MCPServer
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as Server
    from mcp.shared.exceptions import MCPError

    def rpc_error(code: int, message: str) -> Exception:
        return MCPError(code=code, message=message)

except ImportError:  # pragma: no cover - mcp 1
    from mcp.server.fastmcp import Context  # type: ignore[no-redef]
    from mcp.server.fastmcp import FastMCP as Server  # type: ignore[no-redef]
    from mcp.shared.exceptions import McpError
    from mcp.types import ErrorData

    def rpc_error(code: int, message: str) -> Exception:
        return McpError(ErrorData(code=code, message=message))

INVALID_PARAMS = -32602

EXECUTIONS: Counter[str] = Counter()


def build_server() -> Any:
    server = Server("otel-budget-test-tools")

    @server.tool()
    def search(query: str) -> str:
        """Search the web (a fixed answer)."""
        EXECUTIONS["search"] += 1
        return f"3 results for {query}"

    @server.tool()
    def fetch_page(url: str) -> str:
        """Fetch a page: a long text, for computed costs."""
        EXECUTIONS["fetch_page"] += 1
        return "word " * 250

    @server.tool()
    def broken(reason: str) -> str:
        """Always fails: the SDK answers a CallToolResult with isError=True."""
        EXECUTIONS["broken"] += 1
        raise ValueError(f"broken: {reason}")

    @server.tool()
    def refuse(reason: str) -> str:
        """Answers a JSON-RPC error (the server refuses the request)."""
        EXECUTIONS["refuse"] += 1
        raise rpc_error(INVALID_PARAMS, f"refused: {reason}")

    @server.tool()
    async def slow(seconds: float) -> str:
        """Sleeps, for timeouts."""
        EXECUTIONS["slow"] += 1
        await asyncio.sleep(seconds)
        return "done"

    @server.tool()
    def where_am_i(ctx: Context) -> str:  # type: ignore[type-arg]
        """The trace context the tool body runs under, and the traceparent it was sent."""
        EXECUTIONS["where_am_i"] += 1
        span_context = trace.get_current_span().get_span_context()
        meta = _request_meta(ctx)
        return json.dumps({
            "trace_id": f"{span_context.trace_id:032x}",
            "span_id": f"{span_context.span_id:016x}",
            "traceparent": meta.get("traceparent"),
            "baggage": meta.get("baggage"),
            "call_token": meta.get("io.github.otel-budget/call"),
            "baggage_in_context": dict(baggage.get_all()),
        })  # fmt: skip

    @server.resource("stats://executions")
    def executions() -> str:
        return json.dumps(dict(EXECUTIONS))

    return server


def _request_meta(ctx: Any) -> dict[str, Any]:
    """``params._meta`` of the request being served, as a plain dict."""
    try:
        request_context = ctx.request_context
    except Exception:
        return {}
    meta = getattr(request_context, "meta", None)
    if meta is None:
        return {}
    if hasattr(meta, "model_dump"):
        meta = meta.model_dump(by_alias=True)
    return dict(meta)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instrument", metavar="MAX_USD", default=None)
    parser.add_argument("--search-usd", default="0.01", help="the server's price of search")
    parser.add_argument("--tool-usd", action="append", default=[], metavar="NAME=USD")
    parser.add_argument("--redis-url", default=None, help="the ledger (default: in memory)")
    parser.add_argument("--prefix", default="otb:", help="the Redis ledger's key prefix")
    args = parser.parse_args()
    logging.getLogger("mcp").setLevel(logging.CRITICAL)  # tracebacks of the broken tool
    if args.instrument is not None:
        from otel_budget import BudgetInstrumentor, PriceBook

        tools = {"search": args.search_usd}
        tools.update(item.split("=", 1) for item in args.tool_usd)
        storage = None
        if args.redis_url:
            from otel_budget.storage.redis import RedisStorage

            storage = RedisStorage(args.redis_url, prefix=args.prefix, socket_timeout=1.0,
                                   socket_connect_timeout=1.0)  # fmt: skip
        BudgetInstrumentor().instrument(
            max_usd=args.instrument, libraries=["mcp"], prices=PriceBook(tools=tools),
            storage=storage,
        )  # fmt: skip
    build_server().run("stdio")


if __name__ == "__main__":
    main()
