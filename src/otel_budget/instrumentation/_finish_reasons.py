"""``gen_ai.response.finish_reasons`` in the values the official GenAI instrumentations emit.

    normalize_finish_reason("end_turn")            # -> "stop"   (Anthropic)
    normalize_finish_reason("tool_use")            # -> "tool_call"
    normalize_finish_reason("tool_calls")          # -> "tool_calls" (chat completions: as sent)
    responses_finish_reasons(response)             # a Responses body -> ["stop"], ["length"], ...

One mapping for every SDK (``response_attributes`` applies it): Anthropic's stop reasons
become the cross-provider values as ``opentelemetry-instrumentation-genai-anthropic`` maps
them; the chat-completions vocabulary (``stop``, ``length``, ``tool_calls``,
``content_filter``), which the OpenAI instrumentation and LiteLLM report as sent, passes
through; an unknown reason is kept as the provider said it. A Responses body has a status,
not a finish reason: ``responses_finish_reasons`` reads it as
``opentelemetry-instrumentation-genai-openai`` does (``completed`` is ``stop``, a finished tool
call ``tool_calls``, ``incomplete`` the reason it gives, ``failed``/``cancelled`` ``error``; a
response still in progress, such as a stream closed early, has none).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

_MAPPED = {
    # Anthropic stop_reason
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_call",
}
# Responses incomplete_details.reason
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
_TOOL_CALL_ITEMS = frozenset({"function_call", "custom_tool_call", "computer_call"})
_TERMINAL_TOOL_CALL = frozenset({"completed", "incomplete"})


def _get(obj: Any, name: str) -> Any:
    # (``_util.get``, which imports this module for ``response_attributes``)
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def normalize_finish_reason(reason: str) -> str:
    """The cross-provider value of a provider's finish (stop) reason."""
    return _MAPPED.get(reason, reason)


def normalize_finish_reasons(reasons: Iterable[Any]) -> list[str]:
    """Every string reason of ``reasons``, normalized (others left out)."""
    return [_MAPPED.get(r, r) for r in reasons if isinstance(r, str)]


def status_finish_reason(status: Any, incomplete_reason: Any = None) -> str | None:
    """The finish reason of a Responses status (of a body or of one output item)."""
    if status == "completed":
        return "stop"
    if status in ("failed", "cancelled"):
        return "error"
    if status == "incomplete":
        if not isinstance(incomplete_reason, str):
            return "incomplete"
        return _INCOMPLETE.get(incomplete_reason, incomplete_reason)
    return None


def responses_finish_reasons(response: Any) -> list[str]:
    """The finish reasons of a Responses body (SDK object or dict); [] while in progress."""
    status = _get(response, "status")
    overall = status_finish_reason(status, _get(_get(response, "incomplete_details"), "reason"))
    if status in ("failed", "cancelled", "incomplete"):
        return [overall] if overall else []
    if status in ("queued", "in_progress") or not isinstance(status, str):
        return []
    reasons: list[str] = []
    for item in _get(response, "output") or ():
        kind = _get(item, "type")
        item_status = _get(item, "status")
        if kind in _TOOL_CALL_ITEMS:
            if item_status is None or item_status in _TERMINAL_TOOL_CALL:
                reasons.append("tool_calls")
        elif kind == "message":
            reason = status_finish_reason(item_status)
            if reason is not None:
                reasons.append(reason)
    reasons = list(dict.fromkeys(reasons))
    return reasons or ([overall] if overall else [])


__all__ = [
    "normalize_finish_reason", "normalize_finish_reasons", "responses_finish_reasons",
    "status_finish_reason",
]
