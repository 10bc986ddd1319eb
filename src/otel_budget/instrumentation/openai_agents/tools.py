"""The Agents SDK's function tools: each call an ``execute_tool {name}`` span, reserved first.

    wrap_function_wrapper("agents.run_internal.tool_execution",
                          "_invoke_function_tool_with_metadata", invoke_tool(source))

The SDK invokes every ``FunctionTool`` (``@function_tool``, ``Agent.as_tool()``, hand-built
ones) through one function; its wrapper calls ``otel_budget.tools.abegin_tool`` with the
tool's name, the model's call id and the call's JSON arguments (loop detection hashes them)
before the tool runs, makes the span current while it runs, and settles it with the result.

A refusal is never turned into a reply to the model. The SDK's default tool failure handler
answers any exception of a tool with "An error occurred while running the tool" and lets the
model go on; ``failure_formatter`` wraps the SDK's formatter so that a
``BudgetExceededError`` (a refusal of the tool itself, or of an LLM call made inside it)
propagates instead, and stops the run. Another exception the SDK handles is recorded as the
tool's failure (nothing charged), as ``track_tool`` does for a tool that raises.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._attempts import budget_refusal_in
from otel_budget.runtime import RuntimeSource

# The exception the SDK's failure handler turned into a reply, for the tool call running.
_HANDLED: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "otel_budget_agents_tool_error", default=None
)


def _arguments(raw: Any) -> Any:
    """The tool call's arguments, parsed when they are JSON (so that the same arguments
    spelled with other whitespace or key order hash alike), else as sent."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _output(result: Any) -> Any:
    """The tool's output (the SDK returns it inside an invocation-result record)."""
    return getattr(result, "output", result)


def invoke_tool(source: RuntimeSource) -> Callable[..., Any]:
    """Wrapper of the SDK's function-tool invocation (keyword arguments ``function_tool``,
    ``context`` (a ``ToolContext``), ``arguments`` (JSON text))."""
    from otel_budget.tools import abegin_tool

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        tool = kwargs.get("function_tool")
        name = getattr(tool, "name", None)
        if args or not isinstance(name, str) or not name:
            return await wrapped(*args, **kwargs)
        context = kwargs.get("context")
        call_id = getattr(context, "tool_call_id", None)
        description = getattr(tool, "description", None)
        runtime = source.get()
        try:  # raises BudgetExceededError before the tool runs
            call = await abegin_tool(
                name, arguments=_arguments(kwargs.get("arguments")),
                call_id=call_id if isinstance(call_id, str) else None,
                description=description if isinstance(description, str) and description else None,
                runtime=runtime,
            )  # fmt: skip
        except BudgetExceededError:
            raise
        except Exception as exc:  # ours: the failure policy decides, visibly
            if runtime is None:
                raise
            refusal = runtime.engine.internal_error("openai_agents tool", exc)
            if refusal is not None:
                raise refusal from exc
            return await wrapped(*args, **kwargs)
        handled: list[BaseException] = []
        token = _HANDLED.set(handled)
        try:
            with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                                set_status_on_exception=False):  # fmt: skip
                result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            await call.afail(exc)
            raise
        finally:
            _HANDLED.reset(token)
        if handled:  # the tool raised; the SDK answered the model with an error message
            await call.afail(handled[0])
        else:
            await call.afinish(_output(result))
        return result

    return wrapper


def failure_formatter() -> Callable[..., Any]:
    """Wrapper of the SDK's tool failure formatting (``maybe_invoke_function_tool_failure_
    error_function``, keyword ``error``): a refusal propagates instead of becoming a reply to
    the model; another handled exception is noted as the running tool call's failure."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        error = kwargs.get("error")
        if isinstance(error, BaseException):
            refusal = budget_refusal_in(error)
            if isinstance(refusal, BudgetExceededError):
                raise refusal
        result = await wrapped(*args, **kwargs)
        handled = _HANDLED.get()
        if result is not None and handled is not None and isinstance(error, BaseException):
            handled.append(error)
        return result

    return wrapper


__all__ = ["failure_formatter", "invoke_tool"]
