"""One agent turn of the Agents SDK's run loop: an ``invoke_agent {name}`` span around it.

    wrap_function_wrapper("agents.run", "run_single_turn", turn())

A turn is one model call of the current agent and the tools (and handoff) it asked for; the
run loop calls one function per turn, streamed or not. Its wrapper runs the turn inside
``otel_budget.agents.agent_span(agent.name)``, so every metered call of the turn (the model
call, each tool, an LLM call inside a tool, a nested run of ``Agent.as_tool()``) is
attributed to that agent in the root span's breakdown and ``report()``. After a handoff the
next turn runs under the agent handed to, so handoffs show as separate agents.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def _agent_of(wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The turn's agent: ``bindings.public_agent`` (0.2x), else an ``agent`` argument
    (by keyword, or positional: the streamed turn is called with positional arguments)."""
    named = kwargs
    if args:
        try:
            named = inspect.signature(wrapped).bind_partial(*args, **kwargs).arguments
        except (TypeError, ValueError):
            return None
    bindings = named.get("bindings")
    agent = getattr(bindings, "public_agent", None) if bindings is not None else None
    return agent if agent is not None else named.get("agent")


def turn() -> Callable[..., Any]:
    """Wrapper of the run loop's single-turn coroutine functions (keyword arguments)."""
    from otel_budget.agents import agent_span

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        agent = _agent_of(wrapped, args, kwargs)
        name = getattr(agent, "name", None)
        if not isinstance(name, str) or not name:
            return await wrapped(*args, **kwargs)
        description = getattr(agent, "handoff_description", None)
        with agent_span(name, description=description if isinstance(description, str) else None):
            return await wrapped(*args, **kwargs)

    return wrapper


__all__ = ["turn"]
