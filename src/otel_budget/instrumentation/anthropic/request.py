"""What an anthropic Messages call sends, and starting its metered call.

    request = messages_request(instance, kwargs)          # reads kwargs + extra_body
    call = start(tracer, runtime, request, kwargs)        # or: await astart(...)
    # kwargs now carry the cap the budget affords (and a thinking budget under it)

``messages_request`` reads a ``create`` / ``parse`` / ``stream`` call (GA or beta): model,
messages, system and tools for the input estimate, sampling parameters for the span, the
client's provider name and address. ``start`` / ``astart`` reserve the projection (blocking or
with the ledger's coroutines) and keep extended thinking valid under a lowered cap.

``max_tokens`` is required by the Messages API and by the SDK. A call without it is projected
with ``default_max_output_tokens`` (the span says ``otel_budget.cost.output_assumed``) but is
not given one: the SDK raises its own error as it would uninstrumented, nothing is sent, and
the reservation is released.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._call import (
    LLMCall,
    LLMRequest,
    astart_call,
    start_call,
)
from otel_budget.instrumentation._util import RequestParams, server_of
from otel_budget.runtime import BudgetRuntime
from otel_budget.tokens import estimate_input_tokens

PROVIDER_ANTHROPIC = "anthropic"
_REQUEST_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
}
_MIN_THINKING_BUDGET = 1024  # Anthropic's minimum thinking.budget_tokens


def _leave_out(_kwargs: dict[str, Any], _cap: int) -> bool:
    """The output writer of a request without ``max_tokens``: writes nothing (the SDK
    requires it and refuses the call itself: otel-budget does not change what it accepts)."""
    return False


def client_info(instance: Any) -> tuple[str, str | None, int | None]:
    """(provider, server.address, server.port) of a resource's client. Bedrock and Vertex
    clients reuse the same resources and name their provider (``aws.bedrock``, ...)."""
    client = getattr(instance, "_client", None)
    provider = getattr(client, "_gen_ai_provider_name", None)
    if not isinstance(provider, str) or not provider:
        provider = PROVIDER_ANTHROPIC
    return (provider, *server_of(client))


def messages_request(instance: Any, kwargs: dict[str, Any], stream: bool | None = None) -> LLMRequest:
    """What a Messages call (``create``/``parse``/``stream``, GA or beta) sends: the kwargs
    with ``extra_body`` merged over them (the SDK merges it into the JSON body), one-shot
    iterators (a generator of messages) materialised into lists first, written back."""
    sent = RequestParams(kwargs)
    sent.materialise("messages", "system", "tools")
    params = sent.params
    provider, host, port = client_info(instance)
    model = str(params.get("model") or "unknown")
    messages = params.get("messages")
    system = params.get("system")
    tools = params.get("tools")
    attributes: dict[str, Any] = {}
    for key, name in _REQUEST_ATTRIBUTES.items():
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attributes[name] = value
    stops = params.get("stop_sequences")
    if isinstance(stops, (list, tuple)) and all(isinstance(s, str) for s in stops):
        attributes["gen_ai.request.stop_sequences"] = list(stops)
    streaming = bool(params.get("stream")) if stream is None else stream
    if streaming:
        attributes["gen_ai.request.stream"] = True
    content = _content.request_content(
        _content.content_mode(), lambda: _content.anthropic_input(messages),
        lambda: _content.anthropic_system(system), lambda: _content.anthropic_tools(tools),
    )  # fmt: skip
    # max_tokens is required by the SDK and the API: left out, it stays out (see above).
    writer = sent.output_writer("max_tokens") if params.get("max_tokens") is not None else _leave_out
    return LLMRequest(
        provider=provider, operation=attrs.OP_CHAT, model=model,
        estimate=lambda: estimate_input_tokens(model, messages=messages, system=system, tools=tools),
        output_param="max_tokens", server_address=host, server_port=port,
        stream=streaming, attributes=attributes, params=params, write_output=writer,
        content=content,
    )  # fmt: skip


def fit_thinking(asked: Any, kwargs: dict[str, Any]) -> None:
    """Keep extended thinking valid under a lowered ``max_tokens``: ``thinking.budget_tokens``
    counts inside ``max_tokens`` and must stay below it, so when the budget lowered the cap
    under it, the thinking budget is lowered too (when the cap is too small for the API's
    minimum, the request is left for the API to reject: nothing is billed and the
    reservation is released). Reads what is sent (extra_body wins)."""
    sent = RequestParams(kwargs)
    cap = sent.get("max_tokens")
    thinking = sent.get("thinking")
    if cap != asked and isinstance(cap, int) and isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and budget >= cap and cap - 1 >= _MIN_THINKING_BUDGET:
            sent.set("thinking", {**thinking, "budget_tokens": cap - 1})  # the caller's dict is kept


def _asked(request: LLMRequest, kwargs: dict[str, Any]) -> Any:
    # (extra_body wins, as in the body sent; the reader replaced it with our copy)
    return (request.params if request.params is not None else kwargs).get("max_tokens")


def start(
    tracer: trace.Tracer, runtime: BudgetRuntime | None, request: LLMRequest, kwargs: dict[str, Any]
) -> LLMCall:
    """Project and reserve with blocking ledger calls; the cap lands in ``kwargs``."""
    asked = _asked(request, kwargs)
    call = start_call(tracer, request, kwargs, runtime=runtime)
    fit_thinking(asked, kwargs)
    return call


async def astart(
    tracer: trace.Tracer, runtime: BudgetRuntime | None, request: LLMRequest, kwargs: dict[str, Any]
) -> LLMCall:
    """``start`` with the ledger's coroutines."""
    asked = _asked(request, kwargs)
    call = await astart_call(tracer, request, kwargs, runtime=runtime)
    fit_thinking(asked, kwargs)
    return call


__all__ = [
    "PROVIDER_ANTHROPIC",
    "astart",
    "client_info",
    "fit_thinking",
    "messages_request",
    "start",
]
