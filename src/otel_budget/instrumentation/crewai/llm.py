"""CrewAI's model calls on the one LLM path, charged once whoever else sees them.

    wrap_function_wrapper("crewai.llms.providers.openai.completion", "OpenAICompletion.call",
                          llm_call(tracer, source))
    wrap_function_wrapper("crewai.llms.base_llm", "BaseLLM._track_token_usage_internal",
                          track_usage)

A CrewAI LLM (``OpenAICompletion``, ``AnthropicCompletion``, the litellm-backed ``LLM``, ...)
builds its own provider request. ``llm_call`` meters ``call`` / ``acall`` with
``instrumentation._call.start_call``: the input is counted from the messages and tools, the
output bound is the LLM's own cap (``max_tokens`` / ``max_completion_tokens``), else
``default_max_output_tokens``; the call is refused before CrewAI sends anything when that
does not fit. It settles from the usage CrewAI itself records for the call
(``_track_token_usage_internal``, read by ``track_usage``), or, without usage, from an
estimate of the output, never zero.

Charged once: when otel-budget's provider instrumentor (openai, anthropic, litellm) also
sees the request, the inner, provider-level call takes this one over
(``metered.begin_steps``: the span of this call is current while CrewAI sends), so it is
charged there, with the provider's exact request and the hard output cap, and this span ends
with no charge of its own. When this call's span is not recording (a sampler dropped it) the
provider wrappers cannot find it, so the call is marked as being sent (``CURRENT_CALL``) and
the provider wrappers let it through: it is charged here. Either way, once.

At this level the reservation is a projection, not a hard cap: CrewAI sends its own request,
whose output cap otel-budget cannot lower (``write_output`` declines); instrument the
provider as well for the hard cap. A tool CrewAI runs inside ``call`` (``available_functions``)
is charged as a tool, outside this call (``tool_context``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace

from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._call import (
    CURRENT_CALL,
    LLMCall,
    LLMRequest,
    astart_call,
    start_call,
    substitute_or_raise,
)
from otel_budget.instrumentation._flow import Flow, Step, arun_flow, run_flow, send, step
from otel_budget.instrumentation.crewai.run import raise_if_stopped, stop_run
from otel_budget.instrumentation.litellm.request import PROVIDER_NAMES, resolve_provider
from otel_budget.pricing import TokenUsage
from otel_budget.runtime import RuntimeSource
from otel_budget.tokens import InputEstimate, estimate_input_tokens


class ActiveCall:
    """A CrewAI ``call`` in progress: the metered call, the context it started in (where a
    tool run inside it belongs), and the usage CrewAI recorded for it."""

    __slots__ = ("call", "outer_context", "usage")

    def __init__(self, call: LLMCall, outer_context: otel_context.Context) -> None:
        self.call = call
        self.outer_context = outer_context
        self.usage: TokenUsage | None = None

    def add_usage(self, usage: TokenUsage) -> None:
        """One provider response's usage (a call that retried or fell back sends several)."""
        before = self.usage
        if before is None:
            self.usage = usage
            return
        self.usage = TokenUsage(
            input_tokens=before.input_tokens + usage.input_tokens,
            output_tokens=before.output_tokens + usage.output_tokens,
            cache_read_tokens=before.cache_read_tokens + usage.cache_read_tokens,
            cache_write_tokens=before.cache_write_tokens + usage.cache_write_tokens,
            reasoning_tokens=before.reasoning_tokens + usage.reasoning_tokens,
        )  # fmt: skip


ACTIVE: contextvars.ContextVar[ActiveCall | None] = contextvars.ContextVar(
    "otel_budget_crewai_llm_call", default=None
)


# -- the request ---------------------------------------------------------------------------------
def _provider_and_model(llm: Any) -> tuple[str, str]:
    model = str(getattr(llm, "model", "") or "")
    if getattr(llm, "is_litellm", False) or type(llm).__name__ == "LLM":
        provider, name, _ = resolve_provider(model, getattr(llm, "custom_llm_provider", None))
        return provider, name
    native = str(getattr(llm, "provider", "") or "openai")
    if model.startswith(native + "/"):
        model = model[len(native) + 1 :]
    return PROVIDER_NAMES.get(native, native), model


def _output_cap(llm: Any) -> Any:
    """The output cap CrewAI sends: ``_effective_max_tokens()`` (``max_completion_tokens`` on
    OpenAI, ``max_output_tokens`` on Gemini, else ``max_tokens``)."""
    effective = getattr(llm, "_effective_max_tokens", None)
    if callable(effective):
        return effective()
    return getattr(llm, "max_tokens", None)


def _never_written(kwargs: dict[str, Any], cap: int) -> bool:
    """CrewAI builds its own request: the cap the ledger granted cannot be written into it."""
    return False


def read_request(llm: Any, messages: Any, tools: Any) -> LLMRequest:
    """The ``LLMRequest`` of one CrewAI LLM call."""
    provider, model = _provider_and_model(llm)
    cap = _output_cap(llm)
    params: dict[str, Any] = {} if cap is None else {"max_tokens": cap}
    attributes: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        value = getattr(llm, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[f"gen_ai.request.{name}"] = value
    host = port = None
    base_url = getattr(llm, "base_url", None) or getattr(llm, "api_base", None)
    if isinstance(base_url, str) and base_url:
        try:
            parts = urlsplit(base_url)
            host, port = parts.hostname, parts.port
        except ValueError:
            pass

    def estimate() -> InputEstimate:
        if isinstance(messages, str):
            return estimate_input_tokens(model, messages=[{"role": "user", "content": messages}],
                                         tools=tools)  # fmt: skip
        return estimate_input_tokens(model, messages=messages, tools=tools)

    return LLMRequest(
        provider=provider, operation="chat", model=model, estimate=estimate,
        output_param="max_tokens", server_address=host, server_port=port,
        attributes=attributes, params=params, write_output=_never_written,
    )  # fmt: skip


def usage_of(data: Any) -> TokenUsage | None:
    """A ``TokenUsage`` from the usage dict a CrewAI provider records (OpenAI, Anthropic,
    Gemini and litellm shapes through CrewAI's own ``UsageMetrics``; Bedrock's camelCase)."""
    if not isinstance(data, Mapping) or not data:
        return None
    if "inputTokens" in data or "outputTokens" in data:  # Bedrock Converse
        cached = data.get("cacheReadInputTokens") or data.get("cacheReadInputTokenCount") or 0
        return TokenUsage(
            input_tokens=int(data.get("inputTokens") or 0),
            output_tokens=int(data.get("outputTokens") or 0),
            cache_read_tokens=int(cached) if isinstance(cached, int) else 0,
        )
    from crewai.types.usage_metrics import UsageMetrics

    metrics = UsageMetrics.from_provider_dict(dict(data))
    if metrics is None:
        return None
    return TokenUsage(
        input_tokens=metrics.prompt_tokens, output_tokens=metrics.completion_tokens,
        cache_read_tokens=metrics.cached_prompt_tokens,
        cache_write_tokens=metrics.cache_creation_tokens,
        reasoning_tokens=metrics.reasoning_tokens,
    )  # fmt: skip


# -- the flow ------------------------------------------------------------------------------------
def _messages_and_tools(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    messages = kwargs["messages"] if "messages" in kwargs else (args[0] if args else None)
    tools = kwargs["tools"] if "tools" in kwargs else (args[1] if len(args) > 1 else None)
    return messages, tools


def _settle(call: LLMCall, active: ActiveCall, result: Any) -> Step | None:
    # (A call that one inside it took over: ``succeed`` only ends its span.)
    text = result if isinstance(result, str) else None
    return step(call.succeed, call.asucceed, active.usage, output_text=text)


def _fail(call: LLMCall, active: ActiveCall, exc: BaseException) -> Step | None:
    if active.usage is not None:  # answered (and billed) before CrewAI failed
        return step(call.fail_after_response, call.afail_after_response, exc, active.usage)
    return step(call.fail, call.afail, exc)


def call_flow(
    tracer: trace.Tracer, source: RuntimeSource, wrapped: Callable[..., Any], instance: Any,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> Flow[Any]:  # fmt: skip
    """One metered CrewAI LLM call, for both wrappers."""
    raise_if_stopped()  # the run was stopped: nothing more is sent
    if ACTIVE.get() is not None:
        # A provider's call() calling another's (a subclass's super().call()): metered once,
        # by the outer one.
        return (yield send(wrapped, args, kwargs))
    runtime = source.get()
    try:
        request = read_request(instance, *_messages_and_tools(args, kwargs))
    except Exception as exc:  # ours: the failure policy decides, never the app's problem
        refusal = runtime.engine.internal_error("crewai request", exc) if runtime else None
        if refusal is not None:
            stop_run(refusal)
            raise refusal from None
        return (yield send(wrapped, args, kwargs))  # fail_open: unmetered
    try:
        call: LLMCall = yield step(start_call, astart_call, tracer, request, {}, runtime=runtime)
    except BudgetExceededError as error:
        stop_run(error)
        return substitute_or_raise(error)
    active = ActiveCall(call, otel_context.get_current())
    token = ACTIVE.set(active)
    # A span the provider wrappers cannot look up (not recording): they let the request
    # through as already metered, and it is charged here.
    sending = None if call.span.is_recording() else CURRENT_CALL.set(call)
    try:
        with trace.use_span(call.span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):  # fmt: skip
            result = yield send(wrapped, args, kwargs)
    except BaseException as exc:
        if isinstance(exc, BudgetExceededError):
            stop_run(exc)  # refused underneath (by the provider wrapper that took it over)
        failing = _fail(call, active, exc)
        if failing is not None:
            yield failing
        raise
    finally:
        if sending is not None:
            CURRENT_CALL.reset(sending)
        ACTIVE.reset(token)
    settling = _settle(call, active, result)
    if settling is not None:
        yield settling
    return result


def llm_call(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    """The wrapt wrapper of a CrewAI LLM's ``call``."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:  # fmt: skip
        return run_flow(call_flow(tracer, source, wrapped, instance, args, kwargs))

    return wrapper


def llm_acall(tracer: trace.Tracer, source: RuntimeSource) -> Callable[..., Any]:
    """The wrapt wrapper of a CrewAI LLM's ``acall``."""

    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:  # fmt: skip
        return await arun_flow(call_flow(tracer, source, wrapped, instance, args, kwargs))

    return wrapper


def track_usage(source: RuntimeSource) -> Callable[..., Any]:
    """The wrapt wrapper of ``_track_token_usage_internal``: the usage of the call in progress."""

    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:  # fmt: skip
        active = ACTIVE.get()
        if active is not None:
            data = args[0] if args else next(iter(kwargs.values()), None)
            try:
                usage = usage_of(data)
                if usage is not None:
                    active.add_usage(usage)
            except Exception as exc:  # ours: the call settles from an estimate instead
                runtime = source.get()
                if runtime is not None:
                    runtime.engine.log_once("crewai usage", exc)
        return wrapped(*args, **kwargs)

    return wrapper


def tool_context() -> otel_context.Context | None:
    """The context a tool run inside a CrewAI ``call`` belongs in (the call's own parent: a
    tool is not part of the model call's cost), or None outside one."""
    active = ACTIVE.get()
    return None if active is None else active.outer_context


__all__ = [
    "ACTIVE",
    "ActiveCall",
    "call_flow",
    "llm_acall",
    "llm_call",
    "read_request",
    "tool_context",
    "track_usage",
    "usage_of",
]
