"""Budget CrewAI crews: one budget per kickoff, spend per agent, task and tool.

    from otel_budget import BudgetExceededError
    from otel_budget.instrumentation.crewai import last_report, protect_crew

    crew = protect_crew(Crew(agents=[...], tasks=[...]), max_usd=0.50)
    try:
        crew.kickoff()                    # also kickoff_async(), akickoff(), kickoff_for_each()
    except BudgetExceededError as exc:    # a call that would overshoot, or a tool loop
        print(exc.reason, exc.spent_usd)
    print(last_report(crew).format())     # per model, per tool, per agent

``protect_crew`` returns the same crew (it stays a ``Crew``) and makes each kickoff run inside
one ``budget(max_usd)``; it instruments CrewAI once (``CrewAIInstrumentor``), which is also
what ``BudgetInstrumentor`` / zero-code does when crewai is installed, for crews without a
budget of their own (they then follow the processor's per-trace limit and any enclosing
``budget()``).

What is on the trace: the crew as ``invoke_agent {crew name}``, each agent's work on a task
as ``invoke_agent {role}`` (``gen_ai.agent.name``, ``gen_ai.agent.id``; the task's name and
id as ``otel_budget.task.name`` / ``.id``), each model call as ``chat {model}`` and each tool
as ``execute_tool {name}``. Model calls are metered by otel-budget's provider instrumentor
when it is active, else here, never both (see ``llm``); tools through ``begin_tool``, priced
by the price book's ``tools=`` entries, reserved and checked for a loop before they run.

A refusal stops the crew: CrewAI catches a tool's exception and feeds it to the model, and
retries a failed task, so the run keeps its first refusal and every later model call, tool
and task retry of the kickoff raises it before doing anything (see ``run``).

CrewAI's own telemetry, platform tracing and version check are switched off (see
``telemetry``): a run makes no connection but to the model's server.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, TypeVar

from otel_budget.instrumentation._sdk import Factory, SDKInstrumentor, Target, tracer_of
from otel_budget.instrumentation.crewai import llm, wrappers
from otel_budget.instrumentation.crewai.run import last_report, protect
from otel_budget.instrumentation.crewai.telemetry import quiet_crewai
from otel_budget.runtime import RuntimeSource

_INSTRUMENTS = ("crewai >= 1.0",)

_LLM_MODULES = (
    ("crewai.llm", "LLM"),
    ("crewai.llms.providers.openai.completion", "OpenAICompletion"),
    ("crewai.llms.providers.anthropic.completion", "AnthropicCompletion"),
    ("crewai.llms.providers.azure.completion", "AzureCompletion"),
    ("crewai.llms.providers.gemini.completion", "GeminiCompletion"),
    ("crewai.llms.providers.bedrock.completion", "BedrockCompletion"),
)


def _targets() -> tuple[Target, ...]:
    """(module, class, method, wrapper factory) of everything wrapped."""
    kickoff, akickoff = wrappers.kickoff()
    task, atask = wrappers.agent_task()
    tool, atool = wrappers.tool_run()

    def fixed(wrapper: Callable[..., Any]) -> Factory:
        return lambda _tracer, _source: wrapper

    out: list[Target] = [
        ("crewai.crew", "Crew", "kickoff", fixed(kickoff)),
        ("crewai.crew", "Crew", "kickoff_for_each", fixed(kickoff)),
        ("crewai.crew", "Crew", "kickoff_async", fixed(akickoff)),
        ("crewai.crew", "Crew", "kickoff_for_each_async", fixed(akickoff)),
        ("crewai.crew", "Crew", "akickoff", fixed(akickoff)),
        ("crewai.crew", "Crew", "akickoff_for_each", fixed(akickoff)),
        ("crewai.crew", "Crew", "copy", fixed(wrappers.crew_copy)),
        ("crewai.agent.core", "Agent", "execute_task", fixed(task)),
        ("crewai.agent.core", "Agent", "aexecute_task", fixed(atask)),
        ("crewai.tools.base_tool", "BaseTool", "run", fixed(tool)),
        ("crewai.tools.base_tool", "BaseTool", "arun", fixed(atool)),
        ("crewai.tools.base_tool", "Tool", "run", fixed(tool)),
        ("crewai.tools.base_tool", "Tool", "arun", fixed(atool)),
        ("crewai.tools.structured_tool", "CrewStructuredTool", "invoke", fixed(tool)),
        ("crewai.tools.structured_tool", "CrewStructuredTool", "ainvoke", fixed(atool)),
        ("crewai.llms.base_llm", "BaseLLM", "_track_token_usage_internal",
         lambda _tracer, source: llm.track_usage(source)),
        ("crewai.llms.providers.bedrock.completion", "BedrockCompletion",
         "_track_token_usage_internal", lambda _tracer, source: llm.track_usage(source)),
    ]  # fmt: skip
    for module, cls in _LLM_MODULES:
        out.append((module, cls, "call", llm.llm_call))
        out.append((module, cls, "acall", llm.llm_acall))
    return tuple(out)


class CrewAIInstrumentor(SDKInstrumentor):
    """Instruments CrewAI: crews, agents' tasks, tools and model calls (see the module)."""

    _SDK = "crewai"
    # Each module wrapped when CrewAI imports it (now, if it has): instrumenting never imports
    # CrewAI, nor a provider SDK the application does not use.
    _EACH_MODULE = True
    _TARGETS = _targets()

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _wiring(self, **kwargs: Any) -> tuple[Any, ...]:
        quiet_crewai()
        return tracer_of(self, kwargs), RuntimeSource(kwargs.get("runtime"))


C = TypeVar("C")


def protect_crew(crew: C, max_usd: Any, *, name: str | None = None) -> C:
    """Run each kickoff of ``crew`` inside one ``budget(max_usd)``; returns ``crew``.

    ``name`` names the crew's spans (default: the crew's ``name``). Called again, the new
    limit replaces the old one. Raises ``ValueError`` for a limit that is no amount of USD.
    """
    protect(crew, max_usd, name)
    instrumentor = CrewAIInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
    return crew


__all__ = ["CrewAIInstrumentor", "last_report", "protect_crew", "quiet_crewai"]
