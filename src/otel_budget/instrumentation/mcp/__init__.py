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
yet, the wrappers are applied by a post-import hook the moment each module is.
``uninstrument()`` unwraps exactly what was wrapped, and a hook that fires later does nothing.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Collection
from typing import Any

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap

from otel_budget.instrumentation.mcp import client, server
from otel_budget.instrumentation.mcp.client import Switch
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")

_INSTRUMENTS = ("mcp >= 1.30",)

_WRAPPERS = (wrapt.FunctionWrapper, wrapt.BoundFunctionWrapper)
Factory = Callable[[trace.Tracer, RuntimeSource, Switch, Any], Callable[..., Any]]


def _client_call_tool(
    tracer: trace.Tracer, source: RuntimeSource, switch: Switch, original: Any
) -> Callable[..., Any]:
    try:
        inject = "meta" in inspect.signature(original).parameters
    except (TypeError, ValueError):
        inject = False
    return client.call_tool(tracer, source, switch, inject_meta=inject)


def _server_call_tool(
    tracer: trace.Tracer, source: RuntimeSource, switch: Switch, original: Any
) -> Callable[..., Any]:
    return server.call_tool(tracer, source, switch)


# (module, class, method, wrapper factory): each wrapped when its module is imported.
_TARGETS: tuple[tuple[str, str, str, Factory], ...] = (
    ("mcp.client.session", "ClientSession", "call_tool", _client_call_tool),
    ("mcp.server.mcpserver.server", "MCPServer", "call_tool", _server_call_tool),  # mcp 2
    ("mcp.server.fastmcp.server", "FastMCP", "call_tool", _server_call_tool),  # mcp 1
)


class MCPInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments the MCP SDK's tool calls (client and server) with budgeted spans."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        from otel_budget import __version__

        self._tracer = trace.get_tracer(
            __name__, __version__, kwargs.get("tracer_provider"),
            schema_url="https://opentelemetry.io/schemas/1.37.0",
        )  # fmt: skip
        self._source = RuntimeSource(kwargs.get("runtime"))  # the runtime the wrappers enforce
        self._switch = Switch()
        self._lock = threading.Lock()
        self._wrapped: list[tuple[Any, str]] = []  # (class, method) of every wrapper applied
        switch = self._switch
        for module_name in dict.fromkeys(target[0] for target in _TARGETS):
            if module_name in sys.modules:
                self._wrap_module(module_name, switch)
            else:
                hook = functools.partial(self._on_import, module_name, switch)
                wrapt.register_post_import_hook(hook, module_name)

    def _on_import(self, module_name: str, switch: Switch, _module: Any) -> None:
        # A post-import hook that raises would fail the application's own import.
        try:
            self._wrap_module(module_name, switch)
        except Exception as exc:  # pragma: no cover - defensive
            logger.error("otel-budget: could not instrument %s: %s", module_name, exc, exc_info=exc)

    def _wrap_module(self, module_name: str, switch: Switch) -> None:
        with self._lock:
            if switch is not self._switch or not switch.on:
                return  # uninstrumented (or instrumented again) since the hook was registered
            module = importlib.import_module(module_name)
            for target_module, cls_name, method, factory in _TARGETS:
                if target_module != module_name:
                    continue
                owner = getattr(module, cls_name, None)
                original = getattr(owner, method, None) if owner is not None else None
                if original is None or isinstance(original, _WRAPPERS):
                    continue  # absent in this SDK version, or wrapped already
                wrapper = factory(self._tracer, self._source, switch, original)
                wrapt.wrap_function_wrapper(owner, method, wrapper)
                self._wrapped.append((owner, method))

    def _uninstrument(self, **kwargs: Any) -> None:
        switch = getattr(self, "_switch", None)
        if switch is not None:
            switch.on = False  # wrappers still referenced somewhere now pass straight through
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            for owner, method in self._wrapped:
                unwrap(owner, method)
            self._wrapped = []


__all__ = ["MCPInstrumentor"]
