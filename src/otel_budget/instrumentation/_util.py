"""Small readers shared by the provider patches: SDK objects and dicts alike.

    usage = get(response, "usage")                  # works on a pydantic model or a dict
    tokens = nonneg_int(get(usage, "prompt_tokens"))
    params = given(kwargs)                          # without the SDKs' omit/NOT_GIVEN

``ChatChunkAccumulator`` reads OpenAI-compatible chat stream chunks (the openai SDK's and
LiteLLM's), for the stream proxies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.pricing import TokenUsage

_SENTINELS = ("Omit", "NotGiven")


def given(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs without the SDKs' ``omit`` / ``NOT_GIVEN`` sentinels (their helpers pass every
    parameter, given or not)."""
    return {k: v for k, v in kwargs.items() if type(v).__name__ not in _SENTINELS}


def is_given(value: Any) -> bool:
    return value is not None and type(value).__name__ not in _SENTINELS


def get(obj: Any, name: str) -> Any:
    """``obj[name]`` for a dict, ``obj.name`` otherwise; None when absent or unreadable."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:  # some pydantic models raise other errors for unknown fields
        return None


def _attr(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def nonneg_int(value: Any) -> int:
    """A token count from a response: non-negative ints only (bools and garbage are 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _jsonable(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return dump(mode="json", exclude_none=True)
        except Exception:
            pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)  # never iterate anything else: an iterator is the SDK's to consume


def content_attribute(value: Any) -> str:
    """Messages as a JSON string attribute (only ever called when content capture is on)."""
    try:
        return json.dumps(value, default=_jsonable, ensure_ascii=False)
    except Exception:
        return str(value)


def request_attributes(params: dict[str, Any], numeric: dict[str, str]) -> dict[str, Any]:
    """The GenAI request attributes of an OpenAI-style request (``numeric`` maps parameter
    names to attribute names), plus stop sequences, choice count, service tier, stream."""
    out: dict[str, Any] = {}
    for key, name in numeric.items():
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    stop = params.get("stop")
    if isinstance(stop, str):
        out["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, (list, tuple)) and stop and all(isinstance(s, str) for s in stop):
        out["gen_ai.request.stop_sequences"] = list(stop)
    n = params.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n != 1:
        out["gen_ai.request.choice.count"] = n
    tier = params.get("service_tier")
    if isinstance(tier, str):
        out[attrs.OPENAI_REQUEST_SERVICE_TIER] = tier
    if params.get("stream"):
        out["gen_ai.request.stream"] = True
    return out


def response_attributes(rid: Any, model: Any, reasons: Any = None) -> dict[str, Any]:
    """``gen_ai.response.{id,model,finish_reasons}`` from what a response or stream carried;
    values of the wrong type are left out."""
    out: dict[str, Any] = {}
    if isinstance(rid, str):
        out[attrs.GEN_AI_RESPONSE_ID] = rid
    if isinstance(model, str):
        out[attrs.GEN_AI_RESPONSE_MODEL] = model
    if reasons:
        out[attrs.GEN_AI_RESPONSE_FINISH_REASONS] = list(reasons)
    return out


def output_messages(text: str) -> str:
    return content_attribute([{"role": "assistant", "parts": [{"type": "text", "content": text}]}])


class ChatChunkAccumulator:
    """Reads OpenAI-compatible chat completion chunks: text, tool-call arguments, finish
    reasons, the final usage chunk. ``delta_fields`` name the delta keys holding text."""

    __slots__ = ("usage", "response_model", "units", "_parts", "_id", "_reasons",
                 "_read_usage", "_fields", "_capture")  # fmt: skip

    def __init__(
        self,
        read_usage: Callable[[Any], TokenUsage | None],
        delta_fields: tuple[str, ...] = ("content", "refusal"),
        capture: bool = False,
    ) -> None:
        self.usage: TokenUsage | None = None
        self.response_model: str | None = None
        self.units = 0
        self._parts: list[str] = []
        self._id: str | None = None
        self._reasons: list[str] = []
        self._read_usage = read_usage
        self._fields = delta_fields
        self._capture = capture

    def add(self, chunk: Any) -> None:
        # Runs for every chunk of every stream: plain getattr on SDK objects (the common
        # case), the generic reader only for dicts and odd shapes.
        g = get if type(chunk) is dict else _attr
        if self._id is None:
            rid = g(chunk, "id")
            self._id = rid if isinstance(rid, str) else None
            model = g(chunk, "model")
            self.response_model = model if isinstance(model, str) and model else None
        choices = g(chunk, "choices")
        if choices:
            parts = self._parts
            for choice in choices:
                gc = get if type(choice) is dict else _attr
                delta = gc(choice, "delta")
                if delta is not None:
                    gd = get if type(delta) is dict else _attr
                    for name in self._fields:
                        text = gd(delta, name)
                        if text and type(text) is str:
                            parts.append(text)
                            self.units += 1
                    tool_calls = gd(delta, "tool_calls")
                    if tool_calls:
                        for tool_call in tool_calls:
                            arguments = get(get(tool_call, "function"), "arguments")
                            if isinstance(arguments, str) and arguments:
                                parts.append(arguments)
                                self.units += 1
                else:  # legacy completions: text on the choice, no delta
                    text = gc(choice, "text")
                    if text and type(text) is str:
                        parts.append(text)
                        self.units += 1
                reason = gc(choice, "finish_reason")
                if reason is not None and isinstance(reason, str):
                    self._reasons.append(reason)
        usage = g(chunk, "usage")
        if usage is not None:
            self.usage = self._read_usage(usage)

    def text(self) -> str:
        return "".join(self._parts)

    def attributes(self) -> dict[str, Any]:
        out = response_attributes(self._id or None, self.response_model, self._reasons)
        if self._capture and self._parts:
            out["gen_ai.output.messages"] = output_messages(self.text())
        return out


def usage_only(chunk: Any) -> bool:
    """The chunk ``include_usage`` adds at the end of a chat stream: usage, no choices."""
    return not get(chunk, "choices") and get(chunk, "usage") is not None
