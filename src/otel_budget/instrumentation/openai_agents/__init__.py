"""Budgets for the OpenAI Agents SDK (``openai-agents``, import ``agents``).

    from agents import Agent, Runner
    from otel_budget import BudgetExceededError, BudgetInstrumentor, budget
    from otel_budget.instrumentation.openai_agents import OpenAIAgentsInstrumentor

    BudgetInstrumentor().instrument(max_usd=1.00)              # the processor, openai, ...
    OpenAIAgentsInstrumentor().instrument(max_usd_per_run=0.25)  # every run: one budget
    try:
        result = await Runner.run(agent, "plan my trip")        # also run_sync, run_streamed
    except BudgetExceededError as exc:                          # refused before overspending,
        print(exc.reason, exc.spent_usd)                        # or "loop_detected"
    with budget(max_usd=0.10) as run:                           # a run's own report
        Runner.run_sync(agent, "plan my trip")
    print(run.report().format())                                # per agent, model and tool

What is wrapped (each hook point is skipped, and logged, when an SDK version lacks it):

* ``AgentRunner.run`` / ``run_streamed`` (behind ``Runner.run``, ``run_sync``,
  ``run_streamed``): a top-level run under ``budget(max_usd_per_run)``, or a root span
  (``runs``); a refusal the SDK wrapped in its ``UserError`` is raised as the
  ``BudgetExceededError`` it is, also from ``RunResultStreaming.stream_events()``.
* The run loop's single turn, streamed or not: an ``invoke_agent {agent.name}`` span per
  turn (``turns``), so spend is attributed per agent, handoffs included.
* The function-tool invocation: ``execute_tool {name}`` with the model's call id, reserved
  and loop-checked before the tool runs (``tools``); the SDK's tool failure formatter, so a
  refusal is never handed to the model as a tool error.
* ``OpenAIResponsesModel`` / ``OpenAIChatCompletionsModel`` ``get_response`` and
  ``stream_response``: metered on the one LLM path, unless our openai instrumentor meters
  the same request underneath (then it alone charges it; see ``models``).

The SDK's own tracing exports to OpenAI's servers by default; otel-budget leaves it as
configured. Offline, or to keep traces in OpenTelemetry only, set
``OPENAI_AGENTS_DISABLE_TRACING=1`` (or call ``agents.set_tracing_disabled(True)``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from otel_budget.instrumentation.openai_agents import models, runs, tools, turns
from otel_budget.money import parse_usd
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")
_INSTRUMENTS = ("openai-agents >= 0.2",)

Factory = Callable[[trace.Tracer, RuntimeSource, Any], Callable[..., Any]]
_RUN = "agents.run"
_LOOP = "agents.run_internal.run_loop"
_TOOLS = "agents.run_internal.tool_execution"
_RESPONSES = "agents.models.openai_responses"
_CHAT = "agents.models.openai_chatcompletions"
_FORMATTER = "maybe_invoke_function_tool_failure_error_function"

# (module, attribute path, wrapper factory, what is lost without it)
_TARGETS: tuple[tuple[str, str, Factory, str], ...] = (
    (_RUN, "AgentRunner.run", lambda t, s, m: runs.run(t, m), "runs"),
    (_RUN, "AgentRunner.run_streamed", lambda t, s, m: runs.run_streamed(t, m), "streamed runs"),
    ("agents.result", "RunResultStreaming.stream_events", lambda t, s, m: runs.stream_events(),
     "refusals of streamed runs"),
    (_RUN, "run_single_turn", lambda t, s, m: turns.turn(s), "agent spans"),
    (_LOOP, "run_single_turn_streamed", lambda t, s, m: turns.turn(s), "streamed agent spans"),
    (_TOOLS, "_invoke_function_tool_with_metadata", lambda t, s, m: tools.invoke_tool(s), "tools"),
    ("agents.tool", "_invoke_function_tool_with_metadata", lambda t, s, m: tools.invoke_tool(s),
     "tools invoked outside the run loop"),
    ("agents.tool", _FORMATTER, lambda t, s, m: tools.failure_formatter(), "tool refusals"),
    (_TOOLS, _FORMATTER, lambda t, s, m: tools.failure_formatter(), "tool refusals"),
    (_RESPONSES, "OpenAIResponsesModel.get_response",
     lambda t, s, m: models.get_response(t, s, "responses"), "model calls"),
    (_RESPONSES, "OpenAIResponsesModel.stream_response",
     lambda t, s, m: models.stream_response(t, s, "responses"), "model calls"),
    (_CHAT, "OpenAIChatCompletionsModel.get_response",
     lambda t, s, m: models.get_response(t, s, "chat_completions"), "model calls"),
    (_CHAT, "OpenAIChatCompletionsModel.stream_response",
     lambda t, s, m: models.stream_response(t, s, "chat_completions"), "model calls"),
)  # fmt: skip


def _owner(module: str, path: str) -> tuple[Any, str] | None:
    """(object holding the attribute, attribute name), or None when this SDK lacks it."""
    try:
        owner: Any = importlib.import_module(module)
    except ImportError:
        return None
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
        if owner is None:
            return None
    return (owner, name) if callable(getattr(owner, name, None)) else None


class OpenAIAgentsInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Runs, agent turns, function tools and model calls of the OpenAI Agents SDK, budgeted.

    ``instrument()`` keyword arguments: ``max_usd_per_run`` (each top-level run gets a
    ``budget()`` of that many USD; default: none, the run is one trace under the processor's
    per-trace ``max_usd``), ``tracer_provider``, ``runtime`` (the budget runtime to enforce;
    default: the process's current one, e.g. ``BudgetInstrumentor``'s)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        from otel_budget import __version__

        max_usd = kwargs.get("max_usd_per_run")
        if max_usd is not None:
            parse_usd(max_usd, what="max_usd_per_run")  # invalid: the caller's ValueError
        tracer = trace.get_tracer(__name__, __version__, kwargs.get("tracer_provider"))
        source = RuntimeSource(kwargs.get("runtime"))
        self._wrapped: list[tuple[Any, str]] = []
        missing: list[str] = []
        for module, path, factory, loses in _TARGETS:
            found = _owner(module, path)
            if found is None:
                missing.append(f"{module}.{path} ({loses})")
                continue
            wrap_function_wrapper(module, path, factory(tracer, source, max_usd))
            self._wrapped.append(found)
        if missing:
            logger.error(
                "otel-budget: this openai-agents version lacks %s: not instrumented there "
                "(calls made through instrumented provider SDKs are still budgeted)",
                ", ".join(missing),
            )

    def _uninstrument(self, **kwargs: Any) -> None:
        for owner, name in getattr(self, "_wrapped", []):
            unwrap(owner, name)
        self._wrapped = []


__all__ = ["OpenAIAgentsInstrumentor"]
