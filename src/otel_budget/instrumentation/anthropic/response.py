"""Reading an anthropic Messages response: usage, span attributes, text, billed failures.

    usage, attributes, extra = message_outcome(message)   # a Message, BetaMessage or dict
    call.succeed(usage, attributes, **extra)
    yield step(fail, afail, call, exc)                    # in a flow: charged if billed

Anthropic's ``input_tokens`` excludes the cache; the GenAI conventions (and ``TokenUsage``)
count it in, so ``input = input_tokens + cache_read + cache_creation``. A call the SDK raised
out of after a 2xx answer (``messages.parse`` whose output does not validate) was billed:
``fail`` / ``afail`` charge it the usage the response body carries, else its reservation.
"""

from __future__ import annotations

from typing import Any

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._attempts import response_json
from otel_budget.instrumentation._call import LLMCall
from otel_budget.instrumentation._finish_reasons import normalize_finish_reason
from otel_budget.instrumentation._util import content_attribute as _content_attribute
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.pricing import TokenUsage


def anthropic_usage(usage: Any) -> TokenUsage | None:
    """A Messages ``usage`` (``Usage``/``BetaUsage``/dict) as semconv ``TokenUsage``: the input
    includes the cache-read and cache-write tokens Anthropic reports apart."""
    if usage is None:
        return None
    raw_input = _int(_get(usage, "input_tokens"))
    cache_read = _int(_get(usage, "cache_read_input_tokens"))
    cache_write = _int(_get(usage, "cache_creation_input_tokens"))
    output = _int(_get(usage, "output_tokens"))
    thinking = _int(_get(_get(usage, "output_tokens_details"), "thinking_tokens"))
    return TokenUsage(
        input_tokens=raw_input + cache_read + cache_write, output_tokens=max(output, thinking),
        cache_read_tokens=cache_read, cache_write_tokens=cache_write, reasoning_tokens=thinking,
    )  # fmt: skip


def _block_text(block: Any) -> str | None:
    kind = _get(block, "type")
    if kind == "text":
        value = _get(block, "text")
    elif kind == "thinking":
        value = _get(block, "thinking")
    elif kind in ("tool_use", "server_tool_use"):
        value = _content_attribute(_get(block, "input"))
    else:
        return None
    return value if isinstance(value, str) else None


def message_text(message: Any) -> str:
    return "".join(t for t in (_block_text(b) for b in (_get(message, "content") or ())) if t)


def message_attributes(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rid = _get(message, "id")
    if isinstance(rid, str):
        out[attrs.GEN_AI_RESPONSE_ID] = rid
    model = _get(message, "model")
    if isinstance(model, str):
        out[attrs.GEN_AI_RESPONSE_MODEL] = model
    reason = _get(message, "stop_reason")
    if isinstance(reason, str) and reason:
        out[attrs.GEN_AI_RESPONSE_FINISH_REASONS] = [normalize_finish_reason(reason)]
    _content.output_into(out, lambda: _content.anthropic_output(message))
    return out


def is_raw_response(result: Any) -> bool:
    """``with_raw_response`` / ``with_streaming_response`` return an HTTP wrapper."""
    return _get(result, "usage") is None and hasattr(result, "http_response") and hasattr(result, "parse")


def message_outcome(message: Any) -> tuple[TokenUsage | None, dict[str, Any], dict[str, Any]]:
    """(usage, span attributes, ``succeed`` keywords) of a response message (None: unread)."""
    attributes = message_attributes(message) if message is not None else {}
    text = message_text(message) if message is not None else None
    extra = {"response_model": attributes.get(attrs.GEN_AI_RESPONSE_MODEL), "output_text": text}
    return anthropic_usage(_get(message, "usage")), attributes, extra


def log_unreadable(call: LLMCall, exc: BaseException) -> None:
    """A 2xx response whose body we could not read: it was billed; the call is then settled
    with ``succeed(None)`` (estimated, never zero)."""
    if call.processor is not None:
        call.processor.engine.log_once("anthropic response", exc)


def billed_failure(call: LLMCall) -> tuple[Any, ...] | None:
    """A call the SDK raised out of after a 2xx answer was billed, whatever the SDK's parsing
    then did (``messages.parse`` whose output does not validate): the arguments to charge it
    the usage the response body carries (else its reservation). None: not answered."""
    if not call.answered_ok:
        return None
    usage: TokenUsage | None = None
    attributes: dict[str, Any] = {}
    text: str | None = None
    try:
        body = response_json(call.response)
        if body is not None:
            usage = anthropic_usage(_get(body, "usage"))
            attributes = message_attributes(body)
            text = message_text(body)
    except Exception as inner:
        if call.processor is not None:
            call.processor.engine.log_once("anthropic response", inner)
    return usage, attributes, attributes.get(attrs.GEN_AI_RESPONSE_MODEL), text


def fail(call: LLMCall, exc: BaseException) -> None:
    """The call raised: released when nothing was billed, else charged (``billed_failure``)."""
    billed = billed_failure(call)
    if billed is None:
        call.fail(exc)
        return
    usage, attributes, model, text = billed
    call.fail_after_response(exc, usage, attributes, response_model=model, output_text=text)


async def afail(call: LLMCall, exc: BaseException) -> None:
    """``fail`` with the ledger's coroutines."""
    billed = billed_failure(call)
    if billed is None:
        await call.afail(exc)
        return
    usage, attributes, model, text = billed
    await call.afail_after_response(
        exc, usage, attributes, response_model=model, output_text=text
    )


__all__ = [
    "afail",
    "anthropic_usage",
    "billed_failure",
    "fail",
    "is_raw_response",
    "log_unreadable",
    "message_attributes",
    "message_outcome",
    "message_text",
]
