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

import sys
from collections.abc import Callable, Collection
from functools import partial
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap
from wrapt import register_post_import_hook, wrap_function_wrapper

from otel_budget.instrumentation.crewai import llm, wrappers
from otel_budget.instrumentation.crewai.run import last_report, protect
from otel_budget.instrumentation.crewai.telemetry import quiet_crewai
from otel_budget.runtime import RuntimeSource

_INSTRUMENTS = ("crewai >= 1.0",)

Factory = Callable[[trace.Tracer, RuntimeSource], Callable[..., Any]]
_LLM_MODULES = (
    ("crewai.llm", "LLM"),
    ("crewai.llms.providers.openai.completion", "OpenAICompletion"),
    ("crewai.llms.providers.anthropic.completion", "AnthropicCompletion"),
    ("crewai.llms.providers.azure.completion", "AzureCompletion"),
    ("crewai.llms.providers.gemini.completion", "GeminiCompletion"),
    ("crewai.llms.providers.bedrock.completion", "BedrockCompletion"),
)


def _targets() -> list[tuple[str, str, str, Factory]]:
    """(module, class, method, wrapper factory) of everything wrapped."""
    kickoff, akickoff = wrappers.kickoff()
    task, atask = wrappers.agent_task()
    tool, atool = wrappers.tool_run()

    def fixed(wrapper: Callable[..., Any]) -> Factory:
        return lambda _tracer, _source: wrapper

    out: list[tuple[str, str, str, Factory]] = [
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
    return out


class CrewAIInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments CrewAI: crews, agents' tasks, tools and model calls (see the module)."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        from otel_budget import __version__

        quiet_crewai()
        tracer = trace.get_tracer(
            __name__, __version__, kwargs.get("tracer_provider"),
            schema_url="https://opentelemetry.io/schemas/1.37.0",
        )  # fmt: skip
        source = RuntimeSource(kwargs.get("runtime"))
        self._wrapped: list[tuple[str, str, str]] = []
        generation = self._generation = object()
        by_module: dict[str, list[tuple[str, str, Factory]]] = {}
        for module, cls, method, factory in _targets():
            by_module.setdefault(module, []).append((cls, method, factory))
        for name, targets in by_module.items():
            # Wrapped when CrewAI imports the module (now, if it already has): instrumenting
            # never imports CrewAI, nor a provider SDK the application does not use.
            register_post_import_hook(
                partial(self._wrap_module, generation, targets, tracer, source), name
            )

    def _wrap_module(
        self, generation: object, targets: list[tuple[str, str, Factory]],
        tracer: trace.Tracer, source: RuntimeSource, module: Any,
    ) -> None:  # fmt: skip
        if generation is not getattr(self, "_generation", None):
            return  # uninstrumented (or instrumented again) since this hook was registered
        for cls, method, factory in targets:
            owner = getattr(module, cls, None)
            if owner is None or method not in owner.__dict__:
                continue  # absent from this CrewAI version, or inherited: wrapped where defined
            wrap_function_wrapper(module, f"{cls}.{method}", factory(tracer, source))
            self._wrapped.append((module.__name__, cls, method))

    def _uninstrument(self, **kwargs: Any) -> None:
        self._generation = None
        for module, cls, method in getattr(self, "_wrapped", []):
            unwrap(getattr(sys.modules[module], cls), method)
        self._wrapped = []


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
