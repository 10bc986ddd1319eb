"""The CrewAI wrappers: a crew's kickoff, an agent's task, a tool's run, each one flow.

    wrap_function_wrapper("crewai.crew", "Crew.kickoff", kickoff(tracer))
    wrap_function_wrapper("crewai.agent.core", "Agent.execute_task", agent_task())
    wrap_function_wrapper("crewai.tools.base_tool", "Tool.run", tool_run())

* ``kickoff`` (``kickoff``, ``kickoff_async``, ``akickoff``, the ``*_for_each`` variants):
  a ``budget()`` block when the crew is protected (``protect_crew``), the crew as an
  ``invoke_agent {crew name}`` span, and the ``Run`` whose first refusal stops everything
  after it (see ``run``). A kickoff inside a kickoff of the same crew (``kickoff_async`` runs
  ``kickoff`` in a thread) is the same run.
* ``agent_task`` (``Agent.execute_task`` / ``aexecute_task``): the agent's work on one task as
  ``invoke_agent {role}`` (``agent_span``), the task's name and id as ``otel_budget.task.*``
  (its description too when message content is captured). CrewAI retries a failed task by
  calling ``execute_task`` again: a stopped run raises there instead.
* ``tool_run`` (``BaseTool.run`` / ``arun``, the ``@tool`` decorator's ``Tool.run`` / ``arun``,
  ``CrewStructuredTool.invoke`` / ``ainvoke``): ``begin_tool`` reserves the tool's cost and
  runs loop detection before the tool runs; a refusal stops the run (CrewAI would otherwise
  hand "Error executing tool" to the model and carry on).

Each wrapper is one generator (``_flow``), driven with blocking calls by the sync wrapper and
with coroutines by the async one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from otel_budget.agents import agent_span
from otel_budget.api import budget
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._call import CURRENT_CALL, substitute_or_raise
from otel_budget.instrumentation._content import content_mode
from otel_budget.instrumentation._flow import Flow, arun_flow, run_flow, send, step
from otel_budget.instrumentation.crewai import llm
from otel_budget.instrumentation.crewai.run import (
    RUN,
    Run,
    protect_copy,
    protection_of,
    raise_if_stopped,
    stop_run,
)
from otel_budget.tools import abegin_tool, begin_tool

TASK_NAME = "otel_budget.task.name"
TASK_ID = "otel_budget.task.id"
TASK_DESCRIPTION = "otel_budget.task.description"  # message content: only when captured
CREW_KICKOFF = "kickoff"  # the name of a protected kickoff's budget() block: "kickoff {crew}"

# The tool whose run is in progress: a tool's run that calls its own wrapped method again
# (a subclass's super().run()) is one tool call.
_TOOL: contextvars.ContextVar[Any] = contextvars.ContextVar("otel_budget_crewai_tool", default=None)

Flowing = Callable[[Callable[..., Any], Any, tuple[Any, ...], dict[str, Any]], Flow[Any]]


def _wrappers(flow: Flowing) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The sync and the async wrapt wrapper of one flow."""

    def sync_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:  # fmt: skip
        return run_flow(flow(wrapped, instance, args, kwargs))

    async def async_wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                            kwargs: dict[str, Any]) -> Any:  # fmt: skip
        return await arun_flow(flow(wrapped, instance, args, kwargs))

    return sync_wrapper, async_wrapper


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# -- the crew ------------------------------------------------------------------------------------
def crew_name(crew: Any) -> str:
    protection = protection_of(crew)
    return (protection.name if protection is not None else None) or _text(
        getattr(crew, "name", None)
    ) or "crew"


def kickoff_flow(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Flow[Any]:
    """One kickoff of a crew: its budget, its span, its run."""
    current = RUN.get()
    if current is not None and current.crew is instance:
        # kickoff_async running kickoff in a thread, kickoff_for_each's kickoffs: one run.
        return (yield send(wrapped, args, kwargs))
    protection = protection_of(instance)
    name = crew_name(instance)
    run = Run(instance)
    with ExitStack() as stack:
        if protection is not None:
            block = budget(protection.max_usd, name=f"{CREW_KICKOFF} {name}")
            protection.last = block
            stack.enter_context(block)
        crew_id = getattr(instance, "id", None)
        stack.enter_context(
            agent_span(name, agent_id=None if crew_id is None else str(crew_id))
        )
        token = RUN.set(run)
        stack.callback(RUN.reset, token)
        try:
            result = yield send(wrapped, args, kwargs)
        except BudgetExceededError as error:
            first = run.stop(error)
            if first is error:
                raise
            raise first from error  # (the run was stopped earlier)
        except Exception as exc:
            if run.refusal is not None:  # CrewAI turned the refusal into an error of its own
                raise run.refusal from exc
            raise
        if run.refusal is not None:  # CrewAI caught the refusal and finished all the same
            raise run.refusal
    return result


def crew_copy(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``Crew.copy()``: the copy of a protected crew is protected alike (CrewAI copies crews
    for ``kickoff_for_each`` and replays; an application may too)."""
    copy = wrapped(*args, **kwargs)
    protect_copy(instance, copy)
    return copy


def kickoff() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Wrappers of ``Crew.kickoff*`` (sync, async)."""
    return _wrappers(kickoff_flow)


# -- an agent's task -----------------------------------------------------------------------------
def task_attributes(task: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if task is None:
        return out
    name = _text(getattr(task, "name", None))
    if name is not None:
        out[TASK_NAME] = name
    task_id = getattr(task, "id", None)
    if task_id is not None:
        out[TASK_ID] = str(task_id)
    description = _text(getattr(task, "description", None))
    if description is not None and content_mode().span:
        out[TASK_DESCRIPTION] = description
    return out


def agent_flow(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Flow[Any]:
    """An agent working on one task, as ``invoke_agent {role}``."""
    raise_if_stopped()  # CrewAI's retry of a task the budget stopped: stop here
    task = kwargs["task"] if "task" in kwargs else (args[0] if args else None)
    role = _text(getattr(instance, "role", None)) or type(instance).__name__
    agent_id = getattr(instance, "id", None)
    with agent_span(role, agent_id=None if agent_id is None else str(agent_id),
                    attributes=task_attributes(task)):  # fmt: skip
        try:
            result = yield send(wrapped, args, kwargs)
        except BudgetExceededError as error:
            stop_run(error)
            raise
    return result


def agent_task() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Wrappers of ``Agent.execute_task`` / ``aexecute_task`` (sync, async)."""
    return _wrappers(agent_flow)


# -- a tool --------------------------------------------------------------------------------------
def _arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    if not args:
        return dict(kwargs)
    if len(args) == 1 and not kwargs:
        return args[0]  # CrewStructuredTool.invoke(input)
    return {"args": list(args), **kwargs}


def _did_not_run(result: Any) -> bool:
    """CrewAI's ``ToolFailure`` for a tool refused before it ran (usage limit, bad input)."""
    if type(result).__name__ != "ToolFailure":
        return False
    reason = getattr(result, "reason", None)
    return getattr(reason, "value", reason) in ("usage_limit", "invalid_input", "unknown_tool")


def tool_flow(
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Flow[Any]:
    """One tool call: reserved (and checked for a loop) before the tool runs."""
    raise_if_stopped()
    if _TOOL.get() is instance:
        return (yield send(wrapped, args, kwargs))
    name = _text(getattr(instance, "name", None)) or type(instance).__name__
    with ExitStack() as stack:
        outer = llm.tool_context()
        if outer is not None:
            # Run by CrewAI inside a model call (available_functions): the tool is its own
            # cost, beside the call, and the model call it may make is metered on its own.
            detach = otel_context.attach(outer)
            stack.callback(otel_context.detach, detach)
            stack.callback(llm.ACTIVE.reset, llm.ACTIVE.set(None))
            stack.callback(CURRENT_CALL.reset, CURRENT_CALL.set(None))
        try:
            call = yield step(
                begin_tool, abegin_tool, name, arguments=_arguments(args, kwargs),
                description=_text(getattr(instance, "description", None)),
            )  # fmt: skip
        except BudgetExceededError as error:
            stop_run(error)
            return substitute_or_raise(error)
        token = _TOOL.set(instance)
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):  # fmt: skip
                result = yield send(wrapped, args, kwargs)
        except BaseException as exc:
            yield step(call.fail, call.afail, exc)  # (taken over: only ends its span)
            raise
        finally:
            _TOOL.reset(token)
        # (An MCP call_tool of ours inside that took it over charged it: ``finish`` and
        # ``fail`` then only end its span.)
        if _did_not_run(result):
            yield step(call.fail, call.afail, RuntimeError(str(getattr(result, "message", ""))))
        else:
            yield step(call.finish, call.afinish, result)
    return result


def tool_run() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Wrappers of a CrewAI tool's ``run`` / ``arun`` (sync, async)."""
    return _wrappers(tool_flow)


__all__ = [
    "TASK_DESCRIPTION",
    "TASK_ID",
    "TASK_NAME",
    "agent_flow",
    "agent_task",
    "crew_copy",
    "crew_name",
    "kickoff",
    "kickoff_flow",
    "task_attributes",
    "tool_flow",
    "tool_run",
]
