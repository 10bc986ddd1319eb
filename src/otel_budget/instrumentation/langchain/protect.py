"""``protect_graph``: every run of a LangGraph graph (or any LangChain runnable) is one budget.

    from otel_budget import BudgetExceededError
    from otel_budget.instrumentation.langchain import protect_graph

    agent = protect_graph(create_react_agent(llm, tools), max_usd=0.25)
    try:
        agent.invoke({"messages": [("user", "plan my trip")]})   # also ainvoke, stream, astream
    except BudgetExceededError as exc:
        print("stopped:", exc.reason)                            # "limit", "loop_detected", ...
    print(agent.report().format())                               # the last run's spend

Each ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` opens a fresh ``budget(max_usd)``
(a root span ``budget {name}``) and runs the graph with ``BudgetCallbackHandler`` added to its
callbacks, so it works with or without ``LangChainInstrumentor`` and our provider
instrumentors (with them too, each call is charged once). A stream's budget is open from its
first chunk until it is exhausted or closed. The methods that run the graph on several inputs
at once or re-emit its events (``batch``, ``astream_events``, ...) are not offered: each
input is its own run, so call ``invoke`` per input; anything else (``get_state``,
``get_graph``, ...) is the graph's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from otel_budget.api import budget
from otel_budget.instrumentation.langchain.handler import BudgetCallbackHandler
from otel_budget.report import CostReport

# Ways to run the graph that this wrapper does not put under a budget: refused, never
# passed through unbudgeted.
_UNBUDGETED = frozenset({
    "batch", "abatch", "batch_as_completed", "abatch_as_completed", "astream_events",
    "astream_log", "transform", "atransform", "with_config", "with_retry", "with_fallbacks",
    "pipe", "bind", "assign",
})  # fmt: skip


def _with_handler(config: Any, handler: BudgetCallbackHandler) -> dict[str, Any]:
    """``config`` with ``handler`` added to its callbacks (a list, a callback manager, or
    none); the caller's config is not changed."""
    out: dict[str, Any] = dict(config or {})
    callbacks = out.get("callbacks")
    if callbacks is None:
        out["callbacks"] = [handler]
    elif isinstance(callbacks, list):
        out["callbacks"] = [*callbacks, handler]
    else:  # a BaseCallbackManager
        manager = callbacks.copy()
        manager.add_handler(handler, inherit=True)
        out["callbacks"] = manager
    return out


class BudgetedGraph:
    """A runnable whose every run is one budget (``protect_graph``)."""

    def __init__(
        self, runnable: Any, *, max_usd: Any, name: str | None = None, processor: Any = None
    ) -> None:
        self.runnable = runnable
        self.name = name or getattr(runnable, "name", None) or type(runnable).__name__
        self.max_usd = max_usd
        self._processor = processor
        budget(max_usd)  # an invalid limit raises here, not at the first run
        runtime = processor.runtime if processor is not None else None
        # Sync, inline: safe under async managers too (the async twin would be dropped by a
        # sync manager LangChain makes inside an async run, refusals included).
        self.handler = BudgetCallbackHandler(runtime=runtime)
        self.last_run: budget | None = None

    def _budget(self) -> budget:
        block = budget(self.max_usd, name=f"budget {self.name}", processor=self._processor)
        self.last_run = block
        return block

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:  # noqa: A002
        with self._budget():
            return self.runnable.invoke(input, _with_handler(config, self.handler), **kwargs)

    async def ainvoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:  # noqa: A002
        async with self._budget():
            return await self.runnable.ainvoke(
                input, _with_handler(config, self.handler), **kwargs
            )

    def stream(self, input: Any, config: Any = None, **kwargs: Any) -> Iterator[Any]:  # noqa: A002
        with self._budget():
            yield from self.runnable.stream(input, _with_handler(config, self.handler), **kwargs)

    async def astream(
        self, input: Any, config: Any = None, **kwargs: Any  # noqa: A002
    ) -> AsyncIterator[Any]:
        async with self._budget():
            async for chunk in self.runnable.astream(
                input, _with_handler(config, self.handler), **kwargs
            ):
                yield chunk

    def report(self) -> CostReport:
        """The last run's cost report (live while it runs)."""
        if self.last_run is None:
            return budget(self.max_usd).report()
        return self.last_run.report()

    def __getattr__(self, name: str) -> Any:
        if name in _UNBUDGETED:
            raise AttributeError(
                f"protect_graph: {name}() would run the graph outside its budget; call "
                "invoke/ainvoke/stream/astream (one budget per run)"
            )
        return getattr(self.runnable, name)


def protect_graph(
    graph: Any, *, max_usd: Any, name: str | None = None, processor: Any = None
) -> BudgetedGraph:
    """``graph`` (a compiled LangGraph graph, or any LangChain runnable) with every
    ``invoke`` / ``ainvoke`` / ``stream`` / ``astream`` run inside ``budget(max_usd)``."""
    return BudgetedGraph(graph, max_usd=max_usd, name=name, processor=processor)


__all__ = ["BudgetedGraph", "protect_graph"]
