"""Budget-enforcing instrumentation of LangChain and LangGraph runs.

    from otel_budget import BudgetInstrumentor, budget
    from otel_budget.instrumentation.langchain import LangChainInstrumentor, protect_graph

    BudgetInstrumentor().instrument()            # the provider SDKs (optional, see below)
    LangChainInstrumentor().instrument()         # every LangChain run gets our handler
    with budget(max_usd=0.25) as run:
        graph.invoke({"messages": [("user", "plan my trip")]})
    print(run.report().format())                 # per model, per tool, per agent (node)

    agent = protect_graph(graph, max_usd=0.25)   # or: each run of this graph is one budget

``LangChainInstrumentor`` wraps ``BaseCallbackManager.__init__``, ``set_handlers`` and
``add_handler`` so that every callback manager LangChain builds carries our handler,
inherited by every child run: ``BudgetCallbackHandler`` on sync managers,
``AsyncBudgetCallbackHandler`` on async ones (a manager LangChain copies from one kind to the
other gets the right twin). ``_uninstrument`` unwraps the three methods (the frame:
``instrumentation._sdk``); managers built before keep the handler until they are dropped, so
the handler checks nothing else.

What the handler does with each run is in ``handler``: ``invoke_agent`` spans for the graph
and its nodes, model calls metered through the one LLM path (or by our provider instrumentor
underneath, which then takes the call over: charged once), tools through ``begin_tool``
(refused before they run, loops detected). ``protect_graph`` puts a graph's every run under
one budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from otel_budget.instrumentation._sdk import SDKInstrumentor
from otel_budget.instrumentation.langchain.handler import (
    AsyncBudgetCallbackHandler,
    BudgetCallbackHandler,
)
from otel_budget.instrumentation.langchain.protect import BudgetedGraph, protect_graph
from otel_budget.logs import RateLimitedLog

_INSTRUMENTS = ("langchain-core >= 0.3",)
_LOG = RateLimitedLog(logging.getLogger("otel_budget"))


def _with_our_handler(
    sync_handler: BudgetCallbackHandler, async_handler: AsyncBudgetCallbackHandler
) -> Callable[..., Any]:
    """The wrapper of the manager methods that set its handlers: afterwards the manager
    carries (and passes on to its children) the twin that fits it, never the other."""
    from langchain_core.callbacks.manager import AsyncCallbackManager

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            mine, other = (
                (async_handler, sync_handler) if isinstance(instance, AsyncCallbackManager)
                else (sync_handler, async_handler)
            )  # fmt: skip
            if other in instance.handlers or other in instance.inheritable_handlers:
                instance.handlers = [h for h in instance.handlers if h is not other]
                instance.inheritable_handlers = [
                    h for h in instance.inheritable_handlers if h is not other
                ]
            if mine not in instance.inheritable_handlers:
                instance.inheritable_handlers.append(mine)
            if mine not in instance.handlers:
                instance.handlers.append(mine)
        except Exception as exc:  # ours: logged; the manager works as LangChain built it
            _LOG("langchain callback manager", exc)
        return result

    return wrapper


class LangChainInstrumentor(SDKInstrumentor):
    """Puts ``BudgetCallbackHandler`` on every LangChain run (see the module docstring).
    ``instrument(runtime=..., tracer_provider=...)`` as the provider instrumentors."""

    _SDK = "langchain_core"
    _TARGETS = tuple(
        ("langchain_core.callbacks.base", "BaseCallbackManager", method, _with_our_handler)
        for method in ("__init__", "set_handlers", "add_handler")
    )

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _wiring(self, **kwargs: Any) -> tuple[Any, ...]:
        runtime = kwargs.get("runtime")
        provider = kwargs.get("tracer_provider")
        return (
            BudgetCallbackHandler(runtime=runtime, tracer_provider=provider),
            AsyncBudgetCallbackHandler(runtime=runtime, tracer_provider=provider),
        )


__all__ = [
    "AsyncBudgetCallbackHandler",
    "BudgetCallbackHandler",
    "BudgetedGraph",
    "LangChainInstrumentor",
    "protect_graph",
]
