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

What is wrapped once the application imports ``agents`` (``instrument()`` imports nothing; each
hook point is skipped, and logged, when an SDK version lacks it):

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

import logging
from collections.abc import Collection, Sequence
from typing import Any

from otel_budget.instrumentation._sdk import SDKInstrumentor, Target, tracer_of
from otel_budget.instrumentation.openai_agents import models, runs, tools, turns
from otel_budget.money import parse_usd
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")
_INSTRUMENTS = ("openai-agents >= 0.2",)

_RUN = "agents.run"
_LOOP = "agents.run_internal.run_loop"
_TOOLS = "agents.run_internal.tool_execution"
_RESPONSES = "agents.models.openai_responses"
_CHAT = "agents.models.openai_chatcompletions"
_FORMATTER = "maybe_invoke_function_tool_failure_error_function"

# (module, class, attribute, wrapper factory, what is lost without it); the factories get
# (tracer, runtime source, max_usd_per_run).
_HOOK_POINTS: tuple[tuple[str, str, str, Any, str], ...] = (
    (_RUN, "AgentRunner", "run", lambda t, s, m: runs.run(t, m), "runs"),
    (_RUN, "AgentRunner", "run_streamed", lambda t, s, m: runs.run_streamed(t, m), "streamed runs"),
    ("agents.result", "RunResultStreaming", "stream_events", lambda t, s, m: runs.stream_events(),
     "refusals of streamed runs"),
    (_RUN, "", "run_single_turn", lambda t, s, m: turns.turn(s), "agent spans"),
    (_LOOP, "", "run_single_turn_streamed", lambda t, s, m: turns.turn(s), "streamed agent spans"),
    (_TOOLS, "", "_invoke_function_tool_with_metadata", lambda t, s, m: tools.invoke_tool(s), "tools"),
    ("agents.tool", "", "_invoke_function_tool_with_metadata", lambda t, s, m: tools.invoke_tool(s),
     "tools invoked outside the run loop"),
    ("agents.tool", "", _FORMATTER, lambda t, s, m: tools.failure_formatter(), "tool refusals"),
    (_TOOLS, "", _FORMATTER, lambda t, s, m: tools.failure_formatter(), "tool refusals"),
    (_RESPONSES, "OpenAIResponsesModel", "get_response",
     lambda t, s, m: models.get_response(t, s, "responses"), "model calls"),
    (_RESPONSES, "OpenAIResponsesModel", "stream_response",
     lambda t, s, m: models.stream_response(t, s, "responses"), "model calls"),
    (_CHAT, "OpenAIChatCompletionsModel", "get_response",
     lambda t, s, m: models.get_response(t, s, "chat_completions"), "model calls"),
    (_CHAT, "OpenAIChatCompletionsModel", "stream_response",
     lambda t, s, m: models.stream_response(t, s, "chat_completions"), "model calls"),
)  # fmt: skip
_TARGETS: tuple[Target, ...] = tuple(point[:4] for point in _HOOK_POINTS)
_LOSES = {point[:3]: point[4] for point in _HOOK_POINTS}


class OpenAIAgentsInstrumentor(SDKInstrumentor):
    """Runs, agent turns, function tools and model calls of the OpenAI Agents SDK, budgeted.

    ``instrument()`` keyword arguments: ``max_usd_per_run`` (each top-level run gets a
    ``budget()`` of that many USD; default: none, the run is one trace under the processor's
    per-trace ``max_usd``), ``tracer_provider``, ``runtime`` (the budget runtime to enforce;
    default: the process's current one, e.g. ``BudgetInstrumentor``'s)."""

    _SDK = "agents"
    _TARGETS = _TARGETS

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _wiring(self, **kwargs: Any) -> tuple[Any, ...]:
        max_usd = kwargs.get("max_usd_per_run")
        if max_usd is not None:
            parse_usd(max_usd, what="max_usd_per_run")  # invalid: the caller's ValueError
        tracer = tracer_of(self, kwargs, schema_url=None)
        return tracer, RuntimeSource(kwargs.get("runtime")), max_usd

    def _absent(self, targets: Sequence[Target]) -> None:
        missing = [
            f"{module}.{owner + '.' if owner else ''}{name} ({_LOSES[module, owner, name]})"
            for module, owner, name, _ in targets
        ]  # fmt: skip
        logger.error(
            "otel-budget: this openai-agents version lacks %s: not instrumented there "
            "(calls made through instrumented provider SDKs are still budgeted)",
            ", ".join(missing),
        )


__all__ = ["OpenAIAgentsInstrumentor"]
