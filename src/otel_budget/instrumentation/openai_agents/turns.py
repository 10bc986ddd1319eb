"""One agent turn of the Agents SDK's run loop: an ``invoke_agent {name}`` span around it.

    wrap_function_wrapper("agents.run", "run_single_turn", turn(source))

A turn is one model call of the current agent and the tools (and handoff) it asked for; the
run loop calls one function per turn, streamed or not. Its wrapper runs the turn inside
``otel_budget.agents.agent_span(agent.name)``, so every metered call of the turn (the model
call, each tool, an LLM call inside a tool, a nested run of ``Agent.as_tool()``) is
attributed to that agent in the root span's breakdown and ``report()``. After a handoff the
next turn runs under the agent handed to, so handoffs show as separate agents.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from otel_budget.runtime import RuntimeSource


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


#: The model classes whose calls this integration meters (``models``).
METERED_MODELS = (
    ("agents.models.openai_responses", "OpenAIResponsesModel"),
    ("agents.models.openai_chatcompletions", "OpenAIChatCompletionsModel"),
)


def _metered_classes() -> tuple[type, ...]:
    found = []
    for module, name in METERED_MODELS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _check_model(agent: Any, metered: tuple[type, ...], source: RuntimeSource) -> None:
    """An agent given a ``Model`` instance of another class (LiteLLM, a custom model): its
    calls are budgeted only through a provider instrumentor it calls; say so, once."""
    model = getattr(agent, "model", None)
    if model is None or isinstance(model, (str, *metered)):
        return
    runtime = source.get()
    if runtime is not None:
        kind = type(model)
        runtime.engine.log_once.warning(
            f"openai_agents model {kind.__module__}.{kind.__qualname__}",
            f"otel-budget: agent {getattr(agent, 'name', '?')!r} uses a "
            f"{kind.__qualname__}, whose calls the Agents SDK integration does not meter: "
            "they are budgeted only if they go through an instrumented provider SDK "
            "(openai, anthropic, litellm)",
        )  # fmt: skip


def turn(source: RuntimeSource) -> Callable[..., Any]:
    """Wrapper of the run loop's single-turn coroutine functions."""
    from otel_budget.agents import agent_span

    metered = _metered_classes()

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        agent = _agent_of(wrapped, args, kwargs)
        _check_model(agent, metered, source)
        name = getattr(agent, "name", None)
        if not isinstance(name, str) or not name:
            return await wrapped(*args, **kwargs)
        description = getattr(agent, "handoff_description", None)
        with agent_span(name, description=description if isinstance(description, str) else None):
            return await wrapped(*args, **kwargs)

    return wrapper


__all__ = ["turn"]
