"""The Agents SDK's model calls, metered on the one LLM path when nothing below meters them.

    wrap_function_wrapper("agents.models.openai_responses", "OpenAIResponsesModel.get_response",
                          get_response(tracer, source))

``Model.get_response`` / ``Model.stream_response`` of the SDK's OpenAI models (Responses and
Chat Completions) start an ``LLMCall`` (``_call.astart_call``): projected from what the model
is given (instructions, input items, tool, handoff and output schemas, a stored
``previous_response_id`` / conversation history), reserved, and capped: the output cap the
ledger granted is written into the call's ``ModelSettings.max_tokens``, which the SDK sends
as ``max_output_tokens`` / ``max_tokens``. Settled from the ``ModelResponse`` usage, or the
``response.completed`` event of a stream; a stream left early is charged its reservation.

Charged once: the call's span is current while the SDK sends the request, so when our openai
instrumentor is active underneath, its call (which sees the exact request) takes this one
over (``metered.begin_steps``) and this span is only ended. When this span is not recording
(no SDK provider, a sampler that drops it) that take-over cannot find it: then the call is
made ``CURRENT_CALL``, which the openai wrappers leave to the outer call, as they do for
litellm.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import trace

from otel_budget import attributes as attrs
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._call import (
    CURRENT_CALL,
    LLMCall,
    LLMRequest,
    astart_call,
    substitute_or_raise,
)
from otel_budget.instrumentation._util import with_history
from otel_budget.instrumentation.openai import history
from otel_budget.instrumentation.openai.request import client_info
from otel_budget.instrumentation.openai.response import responses_usage
from otel_budget.pricing import TokenUsage
from otel_budget.runtime import RuntimeSource
from otel_budget.steps import arun
from otel_budget.tokens import InputEstimate, estimate_input_tokens

#: Output-limit keys the SDK forwards from ``ModelSettings.extra_args`` to the request.
_EXTRA_LIMITS = ("max_output_tokens", "max_tokens", "max_completion_tokens")
_STREAM_TEXT = frozenset({"response.output_text.delta", "response.function_call_arguments.delta",
                          "response.refusal.delta", "response.reasoning_summary_text.delta"})
_STREAM_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _bind(wrapped: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (the run loop passes keywords; a user may not)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    return dict(bound.arguments)


def _tool_schema(tool: Any) -> Any:
    """What a tool definition sends: name, description and JSON schema (hosted tools: their
    fields)."""
    schema = getattr(tool, "params_json_schema", None)
    if schema is not None:
        return {"name": getattr(tool, "name", ""), "description": getattr(tool, "description", ""),
                "parameters": schema}  # fmt: skip
    schema = getattr(tool, "input_json_schema", None)  # a Handoff
    if schema is not None:
        return {"name": getattr(tool, "tool_name", ""),
                "description": getattr(tool, "tool_description", ""), "parameters": schema}  # fmt: skip
    if dataclasses.is_dataclass(tool) and not isinstance(tool, type):
        return {f.name: str(getattr(tool, f.name, "")) for f in dataclasses.fields(tool)}
    return str(tool)


def _output_schema(schema: Any) -> Any:
    if schema is None:
        return None
    try:
        if schema.is_plain_text():
            return None
        return {"name": "final_output", "parameters": schema.json_schema()}
    except Exception:
        return str(schema)


def _write_cap(settings: Any) -> Callable[[dict[str, Any], int], bool]:
    """Writes the granted output cap into a copy of the call's ``ModelSettings`` (and into
    any output limit its ``extra_args`` carries, which the SDK sends over the named one)."""

    def write(kwargs: dict[str, Any], cap: int) -> bool:
        extra = dict(getattr(settings, "extra_args", None) or {})
        for key in _EXTRA_LIMITS:
            if key in extra:
                extra[key] = cap
        changes: dict[str, Any] = {"max_tokens": cap}
        if extra:
            changes["extra_args"] = extra
        kwargs["model_settings"] = dataclasses.replace(settings, **changes)
        return True

    return write


def read_request(instance: Any, call: dict[str, Any], api: str, stream: bool) -> LLMRequest:
    """The ``LLMRequest`` of one model call: what the SDK will send, read from its arguments."""
    provider, host, port = client_info(instance)
    model = str(getattr(instance, "model", None) or "unknown")
    settings = call.get("model_settings")
    params: dict[str, Any] = {}
    if settings is not None:
        extra = getattr(settings, "extra_args", None) or {}
        params = {key: extra[key] for key in _EXTRA_LIMITS if key in extra}
        if getattr(settings, "max_tokens", None) is not None:
            params["max_tokens"] = settings.max_tokens
    items = call.get("input")
    instructions = call.get("system_instructions")
    tools = [_tool_schema(t) for t in (call.get("tools") or ())]
    tools += [_tool_schema(h) for h in (call.get("handoffs") or ())]
    output = _output_schema(call.get("output_schema"))
    if output is not None:
        tools.append(output)
    stored, assumed = history.history_tokens(provider, model, {
        "previous_response_id": call.get("previous_response_id"),
        "conversation": call.get("conversation_id"),
    })  # fmt: skip
    attributes: dict[str, Any] = {attrs.OPENAI_API_TYPE: api}
    if stored:
        attributes[history.COST_HISTORY_TOKENS] = stored
    if assumed:
        attributes[history.COST_INPUT_ASSUMED] = True

    def estimate() -> InputEstimate:
        return estimate_input_tokens(model, input=items, system=instructions, tools=tools or None)

    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=with_history(estimate, stored), output_param="max_tokens",
        server_address=host, server_port=port, stream=stream, attributes=attributes,
        params=params, write_output=_write_cap(settings) if settings is not None else None,
    )  # fmt: skip


def _usage(usage: Any) -> TokenUsage | None:
    """The reported usage, or None when the SDK has none (zeros: the provider sent none)."""
    found = responses_usage(usage) if usage is not None else None
    if found is None or (found.input_tokens <= 0 and found.output_tokens <= 0):
        return None
    return found


def _output_text(output: Any) -> str:
    """The response's output items as text (for the estimate when no usage was reported)."""
    parts = []
    for item in output or ():
        try:
            parts.append(json.dumps(item.model_dump(), default=str))
        except Exception:
            parts.append(str(item))
    return "".join(parts)


async def _fail(call: LLMCall, error: BaseException, text: str = "",
                usage: TokenUsage | None = None) -> None:  # fmt: skip
    if text or usage is not None:  # a stream broke after output: that output was billed
        runtime = call.runtime
        await arun(call.fail_after_output_steps(error, usage, text, 0),
                   runtime.storage if runtime is not None else None)  # fmt: skip
    else:
        await call.afail(error)


async def _succeed(call: LLMCall, usage: TokenUsage | None, response_id: Any, text: Any,
                   floor: int = 0) -> None:  # fmt: skip
    if call.budgeted.delegated:  # our openai call inside took it over: it remembered and charged
        await call.asucceed(usage)  # (which only ends this span)
        return
    out: dict[str, Any] = {}
    if isinstance(response_id, str) and response_id:
        out[attrs.GEN_AI_RESPONSE_ID] = response_id
        if usage is not None:
            history.remember(response_id, usage)
    await call.asucceed(
        usage, out, output_text=text() if callable(text) else text, floor_nanos=floor
    )


class _Sending:
    """The call's span current (so our openai call underneath takes it over) and, when it
    cannot be found that way, the call as ``CURRENT_CALL`` (the openai wrappers then defer)."""

    __slots__ = ("call", "span_cm", "token")

    def __init__(self, call: LLMCall) -> None:
        self.call = call

    def __enter__(self) -> None:
        self.token = None if self.call.span.is_recording() else CURRENT_CALL.set(self.call)
        self.span_cm = trace.use_span(self.call.span, end_on_exit=False, record_exception=False,
                                      set_status_on_exception=False)  # fmt: skip
        self.span_cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.span_cm.__exit__(*exc)
        finally:
            if self.token is not None:
                CURRENT_CALL.reset(self.token)


async def _start(
    tracer: trace.Tracer, source: RuntimeSource, api: str, stream: bool,
    wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
) -> tuple[LLMCall | None, dict[str, Any]]:  # fmt: skip
    """Start the metered call (``None``: not ours to meter); raises ``BudgetExceededError``."""
    runtime = source.get()
    if runtime is None or CURRENT_CALL.get() is not None:
        return None, kwargs  # no budget anywhere, or metered by an outer call
    bound = _bind(wrapped, args, kwargs)
    try:
        settings = bound.get("model_settings")
        if (stream and api == "chat_completions" and settings is not None
                and getattr(settings, "include_usage", False) is None
                and runtime.settings.stream_include_usage):  # fmt: skip
            # The SDK asks a chat stream for its usage only from api.openai.com: without it
            # the call would be charged an estimate, not what was billed.
            bound["model_settings"] = dataclasses.replace(settings, include_usage=True)
        request = read_request(instance, bound, api, stream)
    except Exception as exc:  # ours: the failure policy decides
        refusal = runtime.engine.internal_error("openai_agents model request", exc)
        if refusal is not None:
            raise refusal from exc
        return None, kwargs
    return await astart_call(tracer, request, bound, runtime=runtime), bound


def get_response(tracer: trace.Tracer, source: RuntimeSource, api: str) -> Callable[..., Any]:
    """Wrapper of ``Model.get_response``."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        try:
            call, bound = await _start(tracer, source, api, False, wrapped, instance, args, kwargs)
        except BudgetExceededError as error:
            return substitute_or_raise(error)
        if call is None:
            return await wrapped(*args, **kwargs)
        try:
            with _Sending(call):
                response = await wrapped(**bound)
        except BaseException as exc:
            await _fail(call, exc)
            raise
        output = getattr(response, "output", None)
        await _succeed(call, _usage(getattr(response, "usage", None)),
                       getattr(response, "response_id", None), lambda: _output_text(output))  # fmt: skip
        return response

    return wrapper


def stream_response(tracer: trace.Tracer, source: RuntimeSource, api: str) -> Callable[..., Any]:
    """Wrapper of ``Model.stream_response`` (an async generator of Responses stream events)."""

    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        try:
            call, bound = await _start(tracer, source, api, True, wrapped, instance, args, kwargs)
        except BudgetExceededError as error:
            for event in substitute_or_raise(error) or ():  # on_exceeded's Substitute(events)
                yield event
            return
        events = wrapped(**bound) if call is not None else wrapped(*args, **kwargs)
        if call is None:
            async for event in events:
                yield event
            return
        pieces: list[str] = []
        usage: TokenUsage | None = None
        response_id: Any = None
        finished = False
        try:
            while True:
                # Current only while the SDK runs (never across a yield to the consumer).
                with _Sending(call):
                    try:
                        event = await events.__anext__()
                    except StopAsyncIteration:
                        finished = True
                        break
                kind = getattr(event, "type", None)
                if kind in _STREAM_TEXT:
                    delta = getattr(event, "delta", None)
                    if isinstance(delta, str):
                        pieces.append(delta)
                elif kind in _STREAM_DONE:
                    response = getattr(event, "response", None)
                    usage = _usage(getattr(response, "usage", None)) or usage
                    response_id = getattr(response, "id", None)
                yield event
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):  # closed by the consumer
                # After the response's last event: its usage. Before: what may still be
                # generated is billed too, so at least the reservation.
                floor = 0 if usage is not None else call.budgeted.projected_nanos
                await _succeed(call, usage, response_id, "".join(pieces), floor=floor)
            else:
                await _fail(call, exc, "".join(pieces), usage)
            raise
        finally:
            if not finished:
                await events.aclose()
        await _succeed(call, usage, response_id, "".join(pieces))

    return wrapper


__all__ = ["get_response", "read_request", "stream_response"]
