"""A whole Agents SDK run (``Runner.run``, ``run_sync``, ``run_streamed``) under one budget.

    wrap_function_wrapper("agents.run", "AgentRunner.run", run(tracer, max_nanos))

A top-level run opens ``budget(max_usd_per_run)`` (when the instrumentor was given one), or,
without one and outside any span, a root span, so that the run is one trace whose root span
carries the cost breakdown and the per-trace limit applies to the run as a whole. A run
started inside another (``Agent.as_tool()``, a guardrail's own agent) shares the outer one's
budget. ``run_sync`` goes through ``run``. A streamed run's loop runs in a task: the budget
is opened in a copy of the caller's context that the task inherits, and closed when the task
ends (however it ends: exhausted, failed, cancelled).

The SDK wraps what a tool raises in its own ``UserError`` ("Error running tool ..."); a
refusal is raised as the ``BudgetExceededError`` it is, from ``Runner.run`` / ``run_sync``
and from ``RunResultStreaming.stream_events()``.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget.api import budget
from otel_budget.instrumentation._attempts import budget_refusal_in

logger = logging.getLogger("otel_budget")
DEFAULT_WORKFLOW_NAME = "Agent workflow"  # the SDK's own default trace name

# True inside a run we opened: a nested run shares its budget.
_IN_RUN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "otel_budget_agents_run", default=False
)


def refusal_in(error: BaseException | None) -> BaseException | None:
    """The ``BudgetExceededError`` the SDK wrapped (in a ``UserError``), else None."""
    if error is None:
        return None
    return budget_refusal_in(error)


def _workflow_name(kwargs: dict[str, Any]) -> str:
    name = getattr(kwargs.get("run_config"), "workflow_name", None)
    return name if isinstance(name, str) and name else DEFAULT_WORKFLOW_NAME


class RunScope:
    """What one top-level run runs in: a ``budget()`` block, or a root span, or (inside an
    existing trace, without a per-run limit) nothing of its own."""

    __slots__ = ("tracer", "max_usd", "name", "block", "span", "token")

    def __init__(self, tracer: trace.Tracer, max_usd: Any, name: str) -> None:
        self.tracer = tracer
        self.max_usd = max_usd
        self.name = name
        self.block: budget | None = None
        self.span: Any = None
        self.token: object | None = None

    def enter(self) -> None:
        if self.max_usd is not None:
            self.block = budget(self.max_usd, name=self.name)
            self.block.__enter__()
        elif not trace.get_current_span().get_span_context().is_valid:
            self.span = self.tracer.start_span(self.name, kind=SpanKind.INTERNAL)
            self.token = otel_context.attach(trace.set_span_in_context(self.span))

    def exit(self, error: BaseException | None) -> None:
        if self.block is not None:
            block, self.block = self.block, None
            block.__exit__(type(error) if error is not None else None, error, None)
            return
        span, self.span = self.span, None
        if span is None:
            return
        try:
            if error is not None and span.is_recording():
                span.set_attribute(attrs.ERROR_TYPE, type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR, str(error)))
        finally:
            span.end()
            if self.token is not None:
                otel_context.detach(self.token)  # type: ignore[arg-type]
                self.token = None


def run(tracer: trace.Tracer, max_usd: Any) -> Callable[..., Any]:
    """Wrapper of ``AgentRunner.run`` (what ``Runner.run`` and ``Runner.run_sync`` call)."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        scope: RunScope | None = None
        token = None
        if not _IN_RUN.get():
            token = _IN_RUN.set(True)
            scope = RunScope(tracer, max_usd, _workflow_name(kwargs))
        try:
            if scope is not None:
                scope.enter()
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            refusal = refusal_in(exc)
            if scope is not None:
                scope.exit(refusal or exc)
            if refusal is not None and refusal is not exc:
                raise refusal from None
            raise
        else:
            if scope is not None:
                scope.exit(None)
        finally:
            if token is not None:
                _IN_RUN.reset(token)
        return result

    return wrapper


def _loop_task(result: Any) -> Any:
    """The task running a streamed run's loop (its name in 0.2x, then in earlier versions)."""
    for name in ("run_loop_task", "_run_impl_task"):
        task = getattr(result, name, None)
        if task is not None and hasattr(task, "add_done_callback"):
            return task
    return None


def run_streamed(tracer: trace.Tracer, max_usd: Any) -> Callable[..., Any]:
    """Wrapper of ``AgentRunner.run_streamed``: the budget lives as long as the run's task."""

    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if _IN_RUN.get():
            return wrapped(*args, **kwargs)  # its task inherits the outer run's budget
        scope = RunScope(tracer, max_usd, _workflow_name(kwargs))
        ctx = contextvars.copy_context()

        def start() -> Any:
            _IN_RUN.set(True)
            scope.enter()
            try:
                return wrapped(*args, **kwargs)
            except BaseException as exc:
                scope.exit(exc)
                raise

        result = ctx.run(start)  # the run's task is created in (a copy of) ctx
        task = _loop_task(result)
        if task is None:
            ctx.run(scope.exit, None)
            logger.error(
                "otel-budget: this Agents SDK version's streamed run has no loop task we "
                "know; max_usd_per_run does not apply to its streamed runs (the per-trace "
                "limit and every call's own enforcement still do)"
            )
            return result

        def done(finished: Any) -> None:
            error = None if finished.cancelled() else finished.exception()
            ctx.run(scope.exit, refusal_in(error) or error)

        task.add_done_callback(done)
        return result

    return wrapper


def stream_events() -> Callable[..., Any]:
    """Wrapper of ``RunResultStreaming.stream_events``: a refusal the SDK wrapped is raised
    as the ``BudgetExceededError`` it is."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        events = wrapped(*args, **kwargs)
        try:
            async for event in events:
                yield event
        except Exception as exc:
            refusal = refusal_in(exc)
            if refusal is not None and refusal is not exc:
                raise refusal from None
            raise
        finally:
            await events.aclose()

    return wrapper


__all__ = ["DEFAULT_WORKFLOW_NAME", "RunScope", "refusal_in", "run", "run_streamed", "stream_events"]
