"""Agent spans: ``invoke_agent {name}``, and the spend of every call made inside one.

    from otel_budget import agent_span, budget

    with budget(max_usd=1.00) as run:
        with agent_span("planner"):
            plan = client.chat.completions.create(...)      # charged to "planner"
            with agent_span("researcher", agent_id="r-1"):
                search_tool(...)                            # charged to "researcher"
    run.report().by_agent["planner"].usd

Also ``async with agent_span(...)``, and ``@agent_span("name")`` on a function or coroutine
function. The span follows the GenAI conventions (``gen_ai.operation.name=invoke_agent``,
``gen_ai.agent.name`` / ``.id`` / ``.description``) and is current inside the block; an
exception ends it in ERROR with ``error.type`` and propagates unchanged.

Every metered call started inside the block (an LLM call of any instrumentation, a tool
call), in this task or thread or in the tasks and ``otel_budget.threads`` workers it starts,
is attributed to the innermost agent: ``report().by_agent``, the root span's
``otel_budget.trace.agents`` / ``agent_costs_usd``, and ``otel_budget.agent.name`` on the
call's span. An agent span costs nothing and reserves nothing itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextvars import Token
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget.context import CURRENT_AGENT
from otel_budget.metered import error_type

F = TypeVar("F", bound=Callable[..., Any])
_TRACER_NAME = "otel_budget"


def _tracer() -> trace.Tracer:
    from otel_budget import __version__

    return trace.get_tracer(_TRACER_NAME, __version__)


def agent_attributes(
    name: str, agent_id: str | None = None, description: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The attributes of an ``invoke_agent`` span."""
    out: dict[str, Any] = {
        attrs.GEN_AI_OPERATION_NAME: attrs.OP_INVOKE_AGENT,
        attrs.GEN_AI_AGENT_NAME: name,
    }
    if agent_id:
        out[attrs.GEN_AI_AGENT_ID] = str(agent_id)
    if description:
        out[attrs.GEN_AI_AGENT_DESCRIPTION] = str(description)
    if attributes:
        out.update(attributes)
    return out


class agent_span:  # noqa: N801 - a context manager/decorator reads best in lower case
    """An ``invoke_agent {name}`` span; the calls inside it are the agent's spend."""

    def __init__(
        self,
        name: str,
        *,
        agent_id: str | None = None,
        description: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.name = name if isinstance(name, str) and name else str(name or "agent")
        self.agent_id = agent_id
        self.description = description
        self.attributes = attributes
        self.tracer = tracer
        # One instance may be entered by several threads or tasks at once (a decorator):
        # each entry keeps its own span and tokens on this stack of its context.
        self._entries: list[tuple[Any, object, Token[str | None]]] = []

    def __enter__(self) -> Any:
        span = (self.tracer or _tracer()).start_span(
            f"invoke_agent {self.name}", kind=SpanKind.INTERNAL,
            attributes=agent_attributes(self.name, self.agent_id, self.description, self.attributes),
        )  # fmt: skip
        ctx_token = otel_context.attach(trace.set_span_in_context(span))
        agent_token = CURRENT_AGENT.set(self.name)
        self._entries.append((span, ctx_token, agent_token))
        return span

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        span, ctx_token, agent_token = self._entries.pop()
        try:
            CURRENT_AGENT.reset(agent_token)
        except ValueError:  # exited in another context than it was entered in
            CURRENT_AGENT.set(None)
        otel_context.detach(ctx_token)  # type: ignore[arg-type]
        try:
            if exc is not None and span.is_recording():
                span.set_attribute(attrs.ERROR_TYPE, error_type(exc))
                span.set_status(Status(StatusCode.ERROR, str(exc)))
        finally:
            span.end()

    async def __aenter__(self) -> Any:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    def _fresh(self) -> agent_span:
        return agent_span(
            self.name, agent_id=self.agent_id, description=self.description,
            attributes=self.attributes, tracer=self.tracer,
        )  # fmt: skip

    def __call__(self, fn: F) -> F:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                async with self._fresh():
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._fresh():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


__all__ = ["agent_attributes", "agent_span"]
