"""What an openai response says: its usage, attributes and output text, and what a call the
SDK raised out of after a 2xx answer was billed.

    body = parsed(result)                      # the body, also behind with_raw_response
    usage, attributes, model, text = success_args(call, body, "chat")
    call.succeed(usage, attributes, response_model=model, output_text=text)

``chat_usage`` / ``responses_usage`` read the ``usage`` of a chat completion (or chunk,
or legacy completion) and of a Responses body; ``read_body`` reads any of them and never
raises (a shape this module does not know is charged as estimated, not lost). A body behind
``with_raw_response`` / ``with_streaming_response`` is parsed by ``parsed`` (a sync
``parse()``) or ``aparsed`` (awaits an async one).
"""

from __future__ import annotations

import inspect
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.instrumentation import _content
from otel_budget.instrumentation._attempts import response_json
from otel_budget.instrumentation._call import LLMCall
from otel_budget.instrumentation._finish_reasons import responses_finish_reasons
from otel_budget.instrumentation._util import Fields, is_model, reported_cost, response_attributes
from otel_budget.instrumentation._util import get as _get
from otel_budget.instrumentation._util import nonneg_int as _int
from otel_budget.instrumentation.openai import history
from otel_budget.pricing import TokenUsage

BodyArgs = tuple[TokenUsage | None, dict[str, Any], Any, str | None]
"""The arguments of ``LLMCall.succeed`` for a body: usage, attributes, response model, text."""


# The details the SDK always parses (``prompt_tokens_details``, ...), read in one step each.
_INPUT_DETAILS = Fields("cached_tokens", "audio_tokens")
_OUTPUT_DETAILS = Fields("reasoning_tokens", "audio_tokens")


def _usage(usage: Any, names: tuple[str, str, str, str]) -> TokenUsage | None:
    """Usage from an OpenAI usage object whose input, output, input-details and
    output-details fields are ``names``. Audio tokens (``*_details.audio_tokens``) are part of
    the input / output totals: passed on as their audio part, priced at the audio rates."""
    if usage is None:
        return None
    inp_key, out_key, inp_details_key, out_details_key = names
    fields = usage.__dict__ if is_model(usage) else None
    if fields is not None and inp_key in fields and out_key in fields and (
        inp_details_key in fields and out_details_key in fields
    ):
        # The SDK's parsed usage: its declared fields, read where pydantic keeps them (what
        # ``_get`` returns for each, in one step instead of four).
        inp, out = _int(fields[inp_key]), _int(fields[out_key])
        input_details, output_details = fields[inp_details_key], fields[out_details_key]
    else:
        inp = _int(_get(usage, inp_key))
        out = _int(_get(usage, out_key))
        input_details = _get(usage, inp_details_key)
        output_details = _get(usage, out_details_key)
    cached = audio_in = reasoning = audio_out = 0  # (no details: zeros, without the reads)
    if input_details is not None:
        cached, audio_in = _INPUT_DETAILS(input_details)
        cached, audio_in = _int(cached), _int(audio_in)
    if output_details is not None:
        reasoning, audio_out = _OUTPUT_DETAILS(output_details)
        reasoning, audio_out = _int(reasoning), _int(audio_out)
    return TokenUsage(
        input_tokens=max(inp, cached, audio_in), output_tokens=max(out, reasoning, audio_out),
        cache_read_tokens=cached, reasoning_tokens=reasoning,
        input_audio_tokens=audio_in, output_audio_tokens=audio_out,
    )  # fmt: skip


_CHAT_USAGE = ("prompt_tokens", "completion_tokens", "prompt_tokens_details",
               "completion_tokens_details")  # fmt: skip
_RESPONSES_USAGE = ("input_tokens", "output_tokens", "input_tokens_details",
                    "output_tokens_details")  # fmt: skip


def chat_usage(usage: Any) -> TokenUsage | None:
    """Usage of a chat completion (or chunk), or of a legacy completion."""
    return _usage(usage, _CHAT_USAGE)


def responses_usage(usage: Any) -> TokenUsage | None:
    """Usage of a Responses body (``input_tokens`` / ``output_tokens`` and their details)."""
    return _usage(usage, _RESPONSES_USAGE)


# -- bodies behind with_raw_response / with_streaming_response --------------------------------
def is_raw(result: Any) -> bool:
    """An HTTP response wrapper (``with_raw_response`` / ``with_streaming_response``). A
    parsed body (a pydantic model) is none: answered without ``hasattr``, which costs a
    pydantic ``__getattr__`` miss on every call."""
    if is_model(result):
        return False
    return hasattr(result, "http_response") and hasattr(result, "parse")


def _behind_raw(result: Any) -> bool:
    return _get(result, "usage") is None and is_raw(result)


def parsed(result: Any) -> Any:
    """The body of a response: ``result`` itself, or what a raw response's sync ``parse()``
    gives (None when it cannot: an async ``parse()``, or an error). Never raises."""
    try:
        if _behind_raw(result):
            if inspect.iscoroutinefunction(result.parse):
                return None  # AsyncAPIResponse: see ``aparsed``
            return result.parse()
    except Exception:
        return None
    return result


async def aparsed(result: Any) -> Any:
    """``parsed``, awaiting an async ``parse()`` (the SDK caches it: the caller's own
    ``parse()`` gets the same). Raises only a cancellation."""
    try:
        async_parse = _behind_raw(result) and inspect.iscoroutinefunction(result.parse)
    except Exception:
        return None
    if not async_parse:
        return parsed(result)
    try:
        return await result.parse()
    except Exception:
        return None  # the caller's own parse() raises it; charged as estimated


# -- reading a body ---------------------------------------------------------------------------
_BODY = Fields("id", "model", "service_tier", "system_fingerprint")
_CHAT_BODY = Fields("id", "model", "service_tier", "system_fingerprint", "choices")
_REASON = Fields("finish_reason")


def _response_attributes(result: Any, choices: bool) -> dict[str, Any]:
    """Span attributes of a chat / completions (``choices``) or Responses body, as
    genai-openai writes them: a choice without a finish reason is ``error``; the Responses
    status read by ``responses_finish_reasons``; service tier and system fingerprint."""
    if choices:
        rid, model, tier, fingerprint, listed = _CHAT_BODY(result)
        reasons: list[str] | None = [
            r if isinstance(r, str) and r else "error"
            for r in (_REASON(c)[0] for c in (listed or []))
        ]  # fmt: skip
    else:
        rid, model, tier, fingerprint = _BODY(result)
        reasons = responses_finish_reasons(result)
    out = response_attributes(rid, model, reasons)
    if isinstance(tier, str) and tier:
        out[attrs.OPENAI_RESPONSE_SERVICE_TIER] = tier
    if isinstance(fingerprint, str) and fingerprint:
        out[attrs.OPENAI_RESPONSE_SYSTEM_FINGERPRINT] = fingerprint
    return out


def _chat_metric_attributes(call: LLMCall, attributes: dict[str, Any]) -> None:
    """genai-openai also puts a chat completion's service tier and system fingerprint on its
    metric points (not a stream's, not a Responses body's)."""
    for key in (attrs.OPENAI_RESPONSE_SERVICE_TIER, attrs.OPENAI_RESPONSE_SYSTEM_FINGERPRINT):
        if key in attributes:
            call.metric_attributes[key] = attributes[key]


def _embeddings_attributes(body: Any) -> dict[str, Any]:
    """``gen_ai.response.model`` and ``gen_ai.embeddings.dimension.count`` (the length of the
    first vector; a base64 vector is not counted)."""
    out = response_attributes(None, _get(body, "model"))
    data = _get(body, "data")
    first = _get(data[0], "embedding") if isinstance(data, list) and data else None
    if isinstance(first, list) and first:
        out[attrs.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = len(first)
    return out


def _responses_text(body: dict[str, Any]) -> str:
    """The output text of a raw Responses body (the SDK's ``output_text`` is computed)."""
    parts: list[str] = []
    for item in body.get("output") or ():
        for content in _get(item, "content") or ():
            value = _get(content, "text")
            if isinstance(value, str):
                parts.append(value)
    return "".join(parts)


def _output_messages(body: Any, kind: str) -> list[dict[str, Any]] | None:
    if kind == "responses":
        return _content.responses_output(body)
    if kind == "chat":
        return _content.openai_chat_output(_get(body, "choices"))
    if kind == "completions":
        return [
            _content.output_message("assistant", [_content.text_part(text)],
                                    _content.openai_finish_reason(_get(c, "finish_reason")))
            for c in (_get(body, "choices") or ())
            if isinstance(text := _get(c, "text"), str)
        ]  # fmt: skip
    return None


def _needs_text(usage: TokenUsage | None) -> bool:
    """Whether the output text matters: ``LLMCall.checked_usage`` estimates the output from
    it only when the usage reports no output tokens (else it is never read)."""
    return usage is None or usage.output_tokens <= 0


def read_body(
    call: LLMCall, body: Any, kind: str
) -> tuple[TokenUsage | None, dict[str, Any], str | None]:
    """(usage, response attributes, output text) of a response body; never raises (a shape
    we do not know is charged as estimated, not lost). The text is read only when the usage
    lacks output tokens (``_needs_text``), else it is None."""
    try:
        text: Any = None
        raw_usage = _get(body, "usage")
        if kind == "responses":
            usage = responses_usage(raw_usage)
            history.remember(_get(body, "id"), usage)  # its context, for previous_response_id
            attributes = _response_attributes(body, choices=False)
            if _needs_text(usage):
                text = _get(body, "output_text") if body is not None else None
                if not isinstance(text, str) and isinstance(body, dict):
                    text = _responses_text(body)
        elif kind == "embeddings":
            usage = chat_usage(raw_usage)
            attributes = _embeddings_attributes(body)
        else:
            usage = chat_usage(raw_usage)
            attributes = _response_attributes(body, choices=kind in ("chat", "completions"))
            if kind == "chat":
                _chat_metric_attributes(call, attributes)
            if kind in ("chat", "completions") and _needs_text(usage):
                parts = [
                    _get(_get(c, "message"), "content") if kind == "chat" else _get(c, "text")
                    for c in (_get(body, "choices") or [])
                ]  # fmt: skip
                text = "".join(p for p in parts if isinstance(p, str))
        if (cost := reported_cost(raw_usage)) is not None:  # OpenRouter's own bill
            attributes[attrs.COST_PROVIDER_REPORTED_USD] = cost
        if call.request.content is not None:  # (else dropped by the call: not built)
            _content.output_into(attributes, lambda: _output_messages(body, kind))
    except Exception as exc:
        if call.processor is not None:
            call.processor.engine.log_once("openai response", exc)
        return None, {}, None
    return usage, attributes, text if isinstance(text, str) else None


def success_args(call: LLMCall, body: Any, kind: str) -> BodyArgs:
    """The arguments of ``call.succeed`` for a non-stream response body; never raises."""
    usage, attributes, text = read_body(call, body, kind)
    return usage, attributes, attributes.get(attrs.GEN_AI_RESPONSE_MODEL), text


def billed_failure(call: LLMCall, exc: BaseException, kind: str) -> BodyArgs | None:
    """A call the SDK raised out of after a 2xx answer was billed, whatever the SDK's parsing
    then did (``LengthFinishReasonError``, ``ContentFilterFinishReasonError``, a structured
    output that does not validate): the arguments to charge it the usage the exception's
    completion or the response body carries (else its reservation). None: not answered."""
    if not call.answered_ok:
        return None
    body = getattr(exc, "completion", None)
    if _get(body, "usage") is None:
        body = response_json(call.response) or body
    return success_args(call, body, kind)


__all__ = [
    "BodyArgs",
    "aparsed",
    "billed_failure",
    "chat_usage",
    "is_raw",
    "parsed",
    "read_body",
    "responses_usage",
    "success_args",
]
