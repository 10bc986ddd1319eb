"""Message content in the GenAI semantic-convention schema, and the operation-details event.

    mode = content_mode()                         # from OTEL_INSTRUMENTATION_GENAI_*
    content = request_content(mode, openai_chat_input(messages), tools=openai_tools(tools))
    LLMRequest(..., content=content)              # None when content and events are off
    attributes[OUTPUT_MESSAGES] = openai_chat_output(choices)   # read by LLMCall at settle

What this repository records as content is what the official GenAI instrumentations
(``opentelemetry-instrumentation-genai-openai`` / ``-genai-anthropic`` on
``opentelemetry-util-genai``) record, byte for byte: messages as ``role`` + ``parts`` (text,
tool_call, tool_call_response, reasoning, blob, file, uri, server tool parts), output messages
with their ``finish_reason``, ``gen_ai.system_instructions`` and ``gen_ai.tool.definitions``;
compact JSON strings on spans, structured values on the event. ``tests/test_content_parity.py``
runs the official packages as the oracle.

The modes (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``, read as util-genai reads
it: case-insensitive, surrounding blanks ignored): ``NO_CONTENT`` (default), ``SPAN_ONLY``,
``EVENT_ONLY``, ``SPAN_AND_EVENT``. ``true`` / ``1`` / ``yes``, which this repository
accepted before the official modes existed, keep meaning ``SPAN_ONLY`` (util-genai rejects
them). Any other value is logged once and read as ``NO_CONTENT``.
``OTEL_INSTRUMENTATION_GENAI_EMIT_EVENT`` (``true`` / ``false``) forces the
``gen_ai.client.inference.operation.details`` event on or off; by default it is emitted in the
two event modes. With ``true`` and no content mode, the event carries no content.

Nothing here is computed unless a mode asks for it: with content and events off (the default)
a call pays one cached environment lookup.
"""

from __future__ import annotations

import binascii
import json
import logging
import mimetypes
import os
import urllib.parse
from base64 import b64decode, b64encode
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, cast

import wrapt
from opentelemetry.trace import Tracer

from otel_budget.instrumentation._finish_reasons import (
    normalize_finish_reason,
    status_finish_reason,
)
from otel_budget.instrumentation._util import get as _get

_logger = logging.getLogger(__name__)

CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
EMIT_EVENT_ENV = "OTEL_INSTRUMENTATION_GENAI_EMIT_EVENT"
EVENT_NAME = "gen_ai.client.inference.operation.details"
INPUT_MESSAGES = "gen_ai.input.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
TOOL_DEFINITIONS = "gen_ai.tool.definitions"
OUTPUT_MESSAGE_ATTRIBUTE = "gen_ai.output.messages"
#: Key under which response readers hand the structured output messages to ``LLMCall`` (in
#: the response attributes dict; never set on a span: the call takes it out).
OUTPUT_MESSAGES = "\x00otel_budget.output_messages"
_CONTENT_KEYS = (INPUT_MESSAGES, OUTPUT_MESSAGE_ATTRIBUTE, SYSTEM_INSTRUCTIONS, TOOL_DEFINITIONS)
_MODES = ("NO_CONTENT", "SPAN_ONLY", "EVENT_ONLY", "SPAN_AND_EVENT")
_LEGACY_TRUE = ("TRUE", "1", "YES")


class ContentMode(NamedTuple):
    """Where content goes, and whether the operation-details event is emitted."""

    span: bool  # content on spans (JSON strings)
    event: bool  # content on the event
    emit: bool  # the event is emitted

    @property
    def capture(self) -> bool:
        return self.span or self.event

    @property
    def active(self) -> bool:
        return self.span or self.emit


OFF = ContentMode(False, False, False)
_cache: dict[tuple[Any, Any], ContentMode] = {}


def _parse(raw_mode: str, raw_emit: str) -> ContentMode:
    value = raw_mode.strip().upper()
    if not value:
        value = "NO_CONTENT"
    elif value in _LEGACY_TRUE:
        value = "SPAN_ONLY"
    elif value not in _MODES:
        _logger.warning(
            "%s is not a valid option for `%s` environment variable. Must be one of %s. "
            "Defaulting to `NO_CONTENT`.", raw_mode, CAPTURE_CONTENT_ENV, ", ".join(_MODES),
        )  # fmt: skip
        value = "NO_CONTENT"
    span = value in ("SPAN_ONLY", "SPAN_AND_EVENT")
    event = value in ("EVENT_ONLY", "SPAN_AND_EVENT")
    emit = event
    flag = raw_emit.strip().lower()
    if flag == "true":
        emit = True
    elif flag == "false":
        emit = False
    elif flag:
        _logger.warning(
            "%s is not a valid option for `%s` environment variable. Must be one of true or "
            "false (case-insensitive). Defaulting based on content capturing mode.",
            raw_emit, EMIT_EVENT_ENV,
        )  # fmt: skip
    return ContentMode(span, event and emit, emit)


# The two variables as ``os.environ`` stores them: read on every call straight from its
# backing dict (what ``os.environ.get`` reads, without its five Python-level calls per read).
_CAPTURE_KEY = os.environ.encodekey(CAPTURE_CONTENT_ENV)
_EMIT_KEY = os.environ.encodekey(EMIT_EVENT_ENV)


def content_mode() -> ContentMode:
    """The mode the environment asks for now (parsed once per distinct value: an invalid
    value is logged once)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if type(data) is dict:  # os.environ itself: its raw values are the cache key
        key: tuple[Any, Any] = (data.get(_CAPTURE_KEY), data.get(_EMIT_KEY))
    else:  # a stand-in mapping (a test's patch)
        key = (environ.get(CAPTURE_CONTENT_ENV, ""), environ.get(EMIT_EVENT_ENV, ""))
    mode = _cache.get(key)
    if mode is None:
        if len(_cache) > 64:
            _cache.clear()
        mode = _cache[key] = _parse(*(_decoded(environ, raw) for raw in key))
    return mode


def _decoded(environ: Any, raw: Any) -> str:
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else str(environ.decodevalue(raw))


def capturing() -> bool:
    """Whether message content is captured at all (spans or events)."""
    return content_mode().capture


# -- serialisation ----------------------------------------------------------------------------
class _Encoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:
        if isinstance(o, (bytes, bytearray)):
            return b64encode(o).decode()
        dump = getattr(o, "model_dump", None)
        if callable(dump):
            return dump()
        return super().default(o)


def dumps(value: Any) -> str:
    """Compact JSON, bytes as base64: what the official instrumentations write on spans."""
    return json.dumps(value, separators=(",", ":"), cls=_Encoder)


# -- parts (the field order of util-genai's dataclasses: the JSON is compared byte for byte) ---
def text_part(content: Any) -> dict[str, Any]:
    return {"content": content, "type": "text"}


def reasoning_part(content: Any) -> dict[str, Any]:
    return {"content": content, "type": "reasoning"}


def tool_call_part(arguments: Any, name: Any, call_id: Any) -> dict[str, Any]:
    return {"arguments": arguments, "name": name, "id": call_id, "type": "tool_call"}


def tool_response_part(response: Any, call_id: Any) -> dict[str, Any]:
    return {"response": response, "id": call_id, "type": "tool_call_response"}


def server_tool_call_part(name: Any, call: Any, call_id: Any) -> dict[str, Any]:
    return {"name": name, "server_tool_call": call, "id": call_id, "type": "server_tool_call"}


def server_tool_response_part(response: Any, call_id: Any) -> dict[str, Any]:
    return {
        "server_tool_call_response": response, "id": call_id,
        "type": "server_tool_call_response",
    }  # fmt: skip


def blob_part(mime_type: Any, modality: str, content: bytes) -> dict[str, Any]:
    return {"mime_type": mime_type, "modality": modality, "content": content, "type": "blob"}


def file_part(mime_type: Any, modality: str, file_id: str) -> dict[str, Any]:
    return {"mime_type": mime_type, "modality": modality, "file_id": file_id, "type": "file"}


def uri_part(mime_type: Any, modality: str, uri: str) -> dict[str, Any]:
    return {"mime_type": mime_type, "modality": modality, "uri": uri, "type": "uri"}


def input_message(role: Any, parts: list[dict[str, Any]], name: Any = None) -> dict[str, Any]:
    return {"role": role, "parts": parts, "name": name}


def output_message(role: Any, parts: list[dict[str, Any]], finish_reason: Any) -> dict[str, Any]:
    return {"role": role, "parts": parts, "finish_reason": finish_reason, "name": None}


def function_tool(name: Any, description: Any, parameters: Any) -> dict[str, Any]:
    return {"name": name, "description": description, "parameters": parameters, "type": "function"}


def generic_tool(name: Any, tool_type: Any) -> dict[str, Any]:
    return {"name": name, "type": tool_type}


def _decode_base64(data: str) -> bytes | None:
    try:
        return b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _from_url(url: str, modality: str = "image") -> dict[str, Any] | None:
    if url.startswith("data:"):
        header, _, payload = url[len("data:"):].partition(",")
        mime_type = header.split(";", 1)[0] or None
        if ";base64" in header.lower():
            decoded = _decode_base64(payload)
            if decoded is None:
                return None
            content = decoded
        else:
            content = urllib.parse.unquote_to_bytes(payload)
        return blob_part(mime_type, modality, content)
    return uri_part(None, modality, url)


def _plain(value: Any) -> Any:
    """A tool result reduced to data (SDK models dumped; what is neither dropped)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_plain(v) for v in value]
    return None


def _json_arguments(arguments: Any) -> Any:
    if not arguments:
        return None
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


# -- OpenAI (chat completions; litellm speaks the same shape) ---------------------------------
_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg"}


def _openai_document(file_obj: Any) -> dict[str, Any] | None:
    if file_obj is None:
        return None
    filename = _get(file_obj, "filename")
    mime = mimetypes.guess_type(filename)[0] if isinstance(filename, str) and filename else None
    file_id = _get(file_obj, "file_id")
    if isinstance(file_id, str) and file_id:
        return file_part(mime, "document", file_id)
    data = _get(file_obj, "file_data")
    if not isinstance(data, str) or not data:
        return None
    if data.startswith("data:"):
        return _from_url(data, "document")
    decoded = _decode_base64(data)
    return None if decoded is None else blob_part(mime, "document", decoded)


def openai_parts(content: Any) -> list[dict[str, Any]]:
    """The parts of an OpenAI message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return [text_part(content)]
    if not isinstance(content, Sequence) or isinstance(content, (bytes, bytearray)):
        return []
    parts: list[dict[str, Any]] = []
    for item in content:
        if isinstance(item, str):
            parts.append(text_part(item))
            continue
        kind = _get(item, "type")
        text = _get(item, "text")
        if kind in ("text", "input_text", "output_text") or (kind is None and isinstance(text, str)):
            if isinstance(text, str):
                parts.append(text_part(text))
            continue
        if kind == "input_audio":
            audio = _get(item, "input_audio")
            data = _get(audio, "data") if audio is not None else None
            decoded = _decode_base64(data) if isinstance(data, str) else None
            if decoded is not None:
                fmt = _get(audio, "format")
                parts.append(blob_part(_AUDIO_MIME.get(fmt) if isinstance(fmt, str) else None,
                                       "audio", decoded))  # fmt: skip
            continue
        if kind in ("file", "input_file"):
            document = _openai_document(_get(item, "file") or item)
            if document is not None:
                parts.append(document)
            continue
        if kind == "refusal":
            refusal = _get(item, "refusal")
            if isinstance(refusal, str):
                parts.append(text_part(refusal))
            continue
        if kind not in ("image_url", "input_image"):
            continue
        url = _get(item, "image_url")
        if not isinstance(url, str):
            url = _get(url, "url")
        if isinstance(url, str) and url:
            image = _from_url(url)
            if image is not None:
                parts.append(image)
            continue
        file_id = _get(item, "file_id")
        if kind == "input_image" and isinstance(file_id, str) and file_id:
            parts.append(file_part(None, "image", file_id))
    return parts


def openai_tool_calls(tool_calls: Iterable[Any]) -> list[dict[str, Any]]:
    parts = []
    for tool_call in tool_calls:
        function = _get(tool_call, "function")
        name = (_get(function, "name") or "") if function else ""
        arguments = _json_arguments(_get(function, "arguments")) if function else None
        parts.append(tool_call_part(arguments, name, _get(tool_call, "id")))
    return parts


def openai_chat_input(messages: Any) -> list[dict[str, Any]]:
    """``gen_ai.input.messages`` of a chat completions request (system messages included, as
    the official instrumentation records them)."""
    out: list[dict[str, Any]] = []
    if not isinstance(messages, Iterable) or isinstance(messages, (str, bytes, Mapping)):
        return out
    for message in messages:
        role = _get(message, "role")
        name = _get(message, "name")
        content = _get(message, "content")
        parts: list[dict[str, Any]] = []
        if role == "assistant":
            tool_calls = _get(message, "tool_calls")
            if tool_calls:
                parts += openai_tool_calls(tool_calls)
            parts += openai_parts(content)
            refusal = _get(message, "refusal")
            if isinstance(refusal, str):
                parts.append(text_part(refusal))
        elif role == "tool":
            parts.append(tool_response_part(_plain(content), _get(message, "tool_call_id")))
        else:
            parts += openai_parts(content)
        if parts:
            out.append(input_message(str(role), parts, str(name) if name is not None else None))
    return out


def openai_chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """``gen_ai.tool.definitions`` of a chat completions request (function tools)."""
    if not tools:
        return None
    out = []
    for tool in tools:
        if _get(tool, "type") == "function":
            function = _get(tool, "function")
            if function:
                out.append(function_tool(_get(function, "name") or "",
                                         _get(function, "description"),
                                         _get(function, "parameters")))  # fmt: skip
    return out


def openai_finish_reason(reason: Any) -> Any:
    """A chat finish reason as output messages carry it."""
    if reason in ("tool_calls", "function_call"):
        return "tool_call"
    return reason or "error"


def openai_chat_output(choices: Any) -> list[dict[str, Any]]:
    """``gen_ai.output.messages`` of a chat completion's ``choices``."""
    out = []
    for choice in choices or ():
        message = _get(choice, "message")
        if not message:
            continue
        parts: list[dict[str, Any]] = []
        tool_calls = _get(message, "tool_calls")
        if tool_calls:
            parts += openai_tool_calls(tool_calls)
        parts += openai_parts(_get(message, "content"))
        refusal = _get(message, "refusal")
        if isinstance(refusal, str):
            parts.append(text_part(refusal))
        role = _get(message, "role") or ""
        out.append(output_message(role, parts, openai_finish_reason(_get(choice, "finish_reason"))))
    return out


class ChatStreamContent:
    """Accumulates what chat completion chunks deliver, per choice: text, refusal, tool calls
    (arguments joined), finish reason."""

    __slots__ = ("_choices",)

    def __init__(self) -> None:
        self._choices: dict[int, dict[str, Any]] = {}

    def add(self, chunk: Any) -> None:
        for choice in _get(chunk, "choices") or ():
            delta = _get(choice, "delta")
            if not delta:
                continue
            index = _get(choice, "index") or 0
            state = self._choices.get(index)
            if state is None:
                state = self._choices[index] = {"reason": None, "text": [], "refusal": [],
                                                "tools": {}}  # fmt: skip
            reason = _get(choice, "finish_reason")
            if reason:
                state["reason"] = reason
            text = _get(delta, "content")
            if text is not None:
                state["text"].append(text)
            refusal = _get(delta, "refusal")
            if isinstance(refusal, str):
                state["refusal"].append(refusal)
            for call in _get(delta, "tool_calls") or ():
                tindex = _get(call, "index") or 0
                function = _get(call, "function")
                buf = state["tools"].get(tindex)
                if buf is None:
                    name = _get(function, "name") if function else None
                    buf = state["tools"][tindex] = [_get(call, "id"), name, []]
                if function:
                    arguments = _get(function, "arguments")
                    if arguments is not None:
                        buf[2].append(arguments)

    def into(self, attributes: dict[str, Any]) -> None:
        output_into(attributes, self.output)

    def output(self) -> list[dict[str, Any]]:
        out = []
        for index in range(max(self._choices, default=-1) + 1):
            state = self._choices.get(index)
            if state is None:  # a choice the stream skipped: the official buffers do the same
                out.append(output_message("assistant", [], "error"))
                continue
            parts: list[dict[str, Any]] = []
            if state["text"]:
                parts.append(text_part("".join(state["text"])))
            refusal = "".join(state["refusal"])
            if refusal:
                parts.append(text_part(refusal))
            for tindex in sorted(state["tools"]):
                call_id, name, arguments = state["tools"][tindex]
                parts.append(tool_call_part(_json_arguments("".join(arguments)), name, call_id))
            out.append(output_message("assistant", parts, openai_finish_reason(state["reason"])))
        return out


# -- OpenAI Responses -------------------------------------------------------------------------
_TOOL_ARGUMENT_FIELDS = {"function_call": "arguments", "custom_tool_call": "input"}
_TOOL_OUTPUT_TYPES = ("function_call_output", "custom_tool_call_output", "computer_call_output")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _call_id(item: Any) -> str | None:
    return _str(_get(item, "call_id")) or _str(_get(item, "id"))


def _seq(value: Any) -> Sequence[Any]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray)):
        return value
    return ()


def _reasoning_parts(item: Any) -> list[dict[str, Any]]:
    parts = []
    for block in _seq(_get(item, "summary")):
        text = _get(block, "text")
        if isinstance(text, str):
            parts.append(reasoning_part(text))
    for block in _seq(_get(item, "content")):
        if _get(block, "type") == "reasoning_text":
            text = _get(block, "text")
            if isinstance(text, str):
                parts.append(reasoning_part(text))
    return parts


def _computer_arguments(item: Any) -> dict[str, Any]:
    dump = getattr(item, "model_dump", None)
    if callable(dump):
        item = dump(exclude_none=True, mode="json")
    return {
        name: _plain(value) for name in ("action", "actions")
        if (value := _get(item, name)) is not None
    }  # fmt: skip


def _responses_input_item(item: Any) -> dict[str, Any] | None:
    kind = _str(_get(item, "type"))
    if kind in _TOOL_ARGUMENT_FIELDS:
        raw = _get(item, _TOOL_ARGUMENT_FIELDS[kind])
        arguments = (
            _parse_arguments(raw) if kind == "function_call" and isinstance(raw, str) else _plain(raw)
        )
        name = _str(_get(item, "name")) or ""
        return input_message("assistant", [tool_call_part(arguments, name, _call_id(item))])
    if kind == "computer_call":
        return input_message(
            "assistant", [tool_call_part(_computer_arguments(item), "computer", _call_id(item))]
        )
    if kind in _TOOL_OUTPUT_TYPES:
        return input_message("tool", [tool_response_part(_plain(_get(item, "output")), _call_id(item))])
    if kind == "reasoning":
        parts = _reasoning_parts(item)
        return input_message("assistant", parts) if parts else None
    role = _get(item, "role")
    if not isinstance(role, str):
        return None
    parts = openai_parts(_get(item, "content"))
    if not parts:
        return None
    name = _get(item, "name")
    return input_message(role, parts, str(name) if name is not None else None)


def _parse_arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


def _tool_call_turn(message: dict[str, Any]) -> bool:
    parts = message["parts"]
    return message["role"] == "assistant" and bool(parts) and all(
        p["type"] == "tool_call" for p in parts
    )


def responses_input(value: Any) -> list[dict[str, Any]]:
    """``gen_ai.input.messages`` of a Responses request: a string is one user message; a list
    of items gives messages, tool calls (consecutive ones in one assistant turn), tool
    outputs, reasoning."""
    if isinstance(value, str):
        return [input_message("user", [text_part(value)])]
    out: list[dict[str, Any]] = []
    for item in _seq(value):
        message = _responses_input_item(item)
        if message is None:
            continue
        if out and _tool_call_turn(message) and _tool_call_turn(out[-1]):
            out[-1]["parts"].extend(message["parts"])
            continue
        out.append(message)
    return out


def responses_tools(tools: Any) -> list[dict[str, Any]] | None:
    """``gen_ai.tool.definitions`` of a Responses request (flat function tools; built-in tools
    by their type)."""
    if isinstance(tools, (str, bytes, bytearray, Iterator)) or not isinstance(tools, Iterable):
        return None
    out = []
    for tool in tools:
        kind = _get(tool, "type")
        if not isinstance(kind, str):
            continue
        name = _get(tool, "name")
        if kind == "function":
            out.append(function_tool(name if isinstance(name, str) else "",
                                     _get(tool, "description"), _get(tool, "parameters")))  # fmt: skip
        else:
            out.append(generic_tool(name if isinstance(name, str) else kind, kind))
    return out or None


_SERVER_TOOLS = {
    "code_interpreter_call": "code_interpreter", "file_search_call": "file_search",
    "image_generation_call": "image_generation", "mcp_call": "mcp",
    "mcp_list_tools": "mcp_list_tools", "tool_search_call": "tool_search",
    "web_search_call": "web_search",
}  # fmt: skip
_SERVER_TOOL_RESPONSES = {"tool_search_output": "tool_search"}


def _server_tool(item: Any, kind: str) -> tuple[dict[str, Any], str] | None:
    tool = _SERVER_TOOLS.get(kind)
    response_name = _SERVER_TOOL_RESPONSES.get(kind)
    if tool is None and response_name is None:
        return None
    if kind in ("tool_search_call", "tool_search_output") and _get(item, "execution") != "server":
        return None
    if kind == "mcp_list_tools":
        reason: str | None = "error" if _get(item, "error") else "stop"
    else:
        status = _get(item, "status")
        reason = status_finish_reason(status) if status is not None else None
    if reason is None:
        return None
    dump = getattr(item, "model_dump", None)
    payload = dump(exclude_none=True, mode="json") if callable(dump) else {
        k: v for k, v in dict(item).items() if v is not None
    }
    item_id = payload.pop("id", None)
    call_id = payload.pop("call_id", None)
    part_id = call_id if isinstance(call_id, str) else item_id
    payload.pop("type", None)
    name = payload.pop("name", None)
    canonical = tool or response_name
    payload["type"] = canonical
    if response_name is not None:
        return server_tool_response_part(payload, call_id if isinstance(call_id, str) else None), reason
    return server_tool_call_part(
        name if isinstance(name, str) else canonical, payload,
        part_id if isinstance(part_id, str) else None,
    ), reason  # fmt: skip


def responses_output(response: Any) -> list[dict[str, Any]]:
    """``gen_ai.output.messages`` of a Responses body (a ``Response`` or its JSON)."""
    out: list[dict[str, Any]] = []
    for item in _seq(_get(response, "output")):
        kind = _get(item, "type")
        if kind == "message":
            reason = status_finish_reason(_get(item, "status"))
            if reason is None:
                continue
            parts = []
            for block in _seq(_get(item, "content")):
                block_kind = _get(block, "type")
                if block_kind == "output_text":
                    parts.append(text_part(_get(block, "text")))
                elif block_kind == "refusal":
                    parts.append(text_part(_get(block, "refusal")))
            out.append(output_message(_get(item, "role"), parts, reason))
        elif kind in ("function_call", "custom_tool_call", "computer_call"):
            status = _get(item, "status")
            if status is not None and status not in ("completed", "incomplete"):
                continue
            if kind == "computer_call":
                arguments: Any = _computer_arguments(item)
            else:
                raw = _get(item, "arguments")
                arguments = _parse_arguments(raw) if isinstance(raw, str) else _plain(_get(item, "input"))
            part = tool_call_part(
                arguments, "computer" if kind == "computer_call" else _get(item, "name"),
                _get(item, "call_id") or _get(item, "id"),
            )  # fmt: skip
            last = out[-1] if out else None
            if (
                last is not None and last["role"] == "assistant"
                and last["finish_reason"] in ("stop", "tool_call")
                and all(p["type"] in ("text", "tool_call") for p in last["parts"])
            ):  # fmt: skip
                last["parts"].append(part)
                last["finish_reason"] = "tool_call"
                continue
            out.append(output_message("assistant", [part], "tool_call"))
        elif kind == "reasoning":
            reason = status_finish_reason(_get(item, "status"))
            if reason is None:
                continue
            parts = _reasoning_parts(item)
            if parts:
                out.append(output_message("assistant", parts, reason))
        elif isinstance(kind, str):
            server = _server_tool(item, kind)
            if server is not None:
                out.append(output_message("assistant", [server[0]], server[1]))
    return out


# -- Anthropic Messages -----------------------------------------------------------------------
_ANTHROPIC_SERVER_RESULTS = {
    "web_search_tool_result": "web_search", "web_fetch_tool_result": "web_fetch",
    "code_execution_tool_result": "code_execution",
    "bash_code_execution_tool_result": "bash_code_execution",
    "text_editor_code_execution_tool_result": "text_editor_code_execution",
    "tool_search_tool_result": "tool_search",
}  # fmt: skip
def anthropic_finish_reason(stop_reason: Any) -> Any:
    return normalize_finish_reason(stop_reason) if isinstance(stop_reason, str) else stop_reason


def _anthropic_blob(source: Any, modality: str) -> dict[str, Any] | None:
    if not isinstance(source, dict):
        return None
    data = source.get("data")
    if not isinstance(data, str):
        return None
    decoded = _decode_base64(data)
    if decoded is None:
        return None
    media = source.get("media_type")
    return blob_part(media if isinstance(media, str) else None, modality, decoded)


def _anthropic_file(source: Mapping[str, Any], modality: str) -> dict[str, Any] | None:
    file_id = source.get("file_id")
    if not isinstance(file_id, str) or not file_id:
        return None
    return file_part(None, modality, file_id)


def _anthropic_image(source: Any) -> dict[str, Any] | None:
    if not isinstance(source, dict):
        return None
    kind = source.get("type")
    if kind == "base64":
        return _anthropic_blob(source, "image")
    if kind == "url":
        url = source.get("url")
        if isinstance(url, str) and url:
            return _from_url(url)
    if kind == "file":
        return _anthropic_file(source, "image")
    return None


def _anthropic_document(source: Any) -> list[dict[str, Any]]:
    if not isinstance(source, dict):
        return []
    kind = source.get("type")
    media = source.get("media_type")
    if kind == "base64":
        part = _anthropic_blob(source, "document")
        return [part] if part is not None else []
    if kind == "url":
        url = source.get("url")
        if isinstance(url, str) and url:
            return [uri_part(media if isinstance(media, str) else None, "document", url)]
        return []
    if kind == "text":
        data = source.get("data")
        if isinstance(data, str):
            return [blob_part(media if isinstance(media, str) else "text/plain", "document",
                              data.encode())]  # fmt: skip
        return []
    if kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            return [text_part(content)]
        if isinstance(content, Iterator):
            return []
        if isinstance(content, Iterable):
            return anthropic_parts(content)
    if kind == "file":
        part = _anthropic_file(source, "document")
        return [part] if part is not None else []
    return []


def _anthropic_dict_part(block: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return text_part(str(text) if text is not None else "")
    if kind == "tool_use":
        inp = block.get("input")
        return tool_call_part(inp if isinstance(inp, dict) else None, str(block.get("name", "")),
                              str(block.get("id", "")))  # fmt: skip
    if kind == "server_tool_use":
        name = str(block.get("name", ""))
        call = {k: v for k, v in block.items() if k not in ("id", "name", "type")}
        call["type"] = name
        block_id = block.get("id")
        return server_tool_call_part(name, call, str(block_id) if block_id is not None else None)
    if kind == "mcp_tool_use":
        mcp: dict[str, Any] = {"type": kind, "arguments": block.get("input")}
        for key in ("caller", "server_name"):
            if block.get(key) is not None:
                mcp[key] = block.get(key)
        return server_tool_call_part(str(block.get("name", "")), mcp, str(block.get("id", "")))
    if kind == "tool_result":
        return tool_response_part(block.get("content"), str(block.get("tool_use_id", "")))
    if isinstance(kind, str) and (server := _ANTHROPIC_SERVER_RESULTS.get(kind)):
        response = {k: v for k, v in block.items() if k not in ("tool_use_id", "type")}
        response["type"] = server
        use_id = block.get("tool_use_id")
        return server_tool_response_part(response, str(use_id) if use_id is not None else None)
    if isinstance(kind, str) and kind.endswith("_tool_result"):
        return server_tool_response_part(
            {k: v for k, v in block.items() if k != "tool_use_id"}, str(block.get("tool_use_id", ""))
        )
    if kind in ("thinking", "redacted_thinking"):
        thinking = block.get("thinking") or block.get("data")
        return reasoning_part(str(thinking) if thinking is not None else "")
    if kind == "image":
        return _anthropic_image(block.get("source"))
    if kind == "document":
        parts = _anthropic_document(block.get("source"))
        return parts[0] if parts else None
    if kind in ("audio", "video", "file"):
        return _anthropic_blob(block.get("source"), str(kind))
    if kind == "container_upload":
        file_id = block.get("file_id")
        if isinstance(file_id, str):
            return file_part(None, "document", file_id)
    if kind == "compaction":
        content = block.get("content")
        return {"id": None, "content": content if isinstance(content, str) else None,
                "type": "compaction"}  # fmt: skip
    return None


def _anthropic_part(block: Any) -> dict[str, Any] | None:
    if isinstance(block, Mapping):
        return _anthropic_dict_part(block)
    kind = getattr(block, "type", None)
    if kind == "text":
        return text_part(block.text)
    if kind == "tool_use":
        return tool_call_part(block.input, block.name, block.id)
    if kind == "thinking":
        return reasoning_part(block.thinking)
    if kind == "redacted_thinking":
        return reasoning_part(block.data)
    dump = getattr(block, "model_dump", None)
    if callable(dump):
        try:
            dumped = dump(exclude_none=True)
        except TypeError:
            dumped = dump()
        if isinstance(dumped, Mapping):
            return _anthropic_dict_part(dumped)
    return None


def anthropic_parts(content: Any) -> list[dict[str, Any]]:
    """The parts of an Anthropic ``content`` (a string, or blocks: params or SDK models)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [text_part(content)]
    parts: list[dict[str, Any]] = []
    for item in content:
        if isinstance(item, Mapping) and item.get("type") == "document":
            parts.extend(_anthropic_document(item.get("source")))
            continue
        part = _anthropic_part(item)
        if part is not None:
            parts.append(part)
    return parts


def anthropic_input(messages: Any) -> list[dict[str, Any]]:
    """``gen_ai.input.messages`` of a Messages request."""
    out: list[dict[str, Any]] = []
    if messages is None:
        return out
    for message in messages:
        if "role" not in message or "content" not in message:
            continue
        out.append(input_message(message["role"], anthropic_parts(message["content"])))
    return out


def anthropic_system(system: Any) -> list[dict[str, Any]]:
    """``gen_ai.system_instructions`` of a Messages request's ``system``."""
    if system is None:
        return []
    if isinstance(system, str):
        return [text_part(system)] if system else []
    parts = []
    for block in system:
        text = _get(block, "text")
        if isinstance(text, str) and text:
            parts.append(text_part(text))
    return parts


def anthropic_tools(tools: Any) -> list[dict[str, Any]] | None:
    """``gen_ai.tool.definitions`` of a Messages request (custom tools as functions, server
    tools by their versioned type)."""
    if tools is None:
        return None
    out = []
    for tool in tools:
        name = _get(tool, "name")
        kind = _get(tool, "type")
        schema = _get(tool, "input_schema")
        if schema is not None or kind in (None, "custom"):
            description = _get(tool, "description")
            out.append(function_tool(
                name if isinstance(name, str) else "",
                description if isinstance(description, str) else None,
                schema if isinstance(schema, Mapping) else None,
            ))  # fmt: skip
        elif isinstance(kind, str):
            out.append(generic_tool(name if isinstance(name, str) else kind, kind))
    return out or None


def anthropic_output(message: Any) -> list[dict[str, Any]]:
    """``gen_ai.output.messages`` of a Messages response (a ``Message`` or its JSON)."""
    if message is None:
        return []
    return [output_message(_get(message, "role"), anthropic_parts(_get(message, "content")),
                           anthropic_finish_reason(_get(message, "stop_reason")))]  # fmt: skip


class AnthropicStreamContent:
    """Accumulates the content blocks of a raw Messages stream (what the SDK's snapshot of the
    message would hold), for ``anthropic_output``."""

    __slots__ = ("_blocks", "_role", "_reason")

    def __init__(self) -> None:
        self._blocks: dict[int, dict[str, Any]] = {}
        self._role: Any = "assistant"
        self._reason: Any = None

    def add(self, event: Any) -> None:
        kind = _get(event, "type")
        if kind == "content_block_delta":
            block = self._blocks.get(_get(event, "index") or 0)
            if block is None:
                return
            delta = _get(event, "delta")
            delta_kind = _get(delta, "type")
            if delta_kind == "text_delta":
                block["text"] = (block.get("text") or "") + (_get(delta, "text") or "")
            elif delta_kind == "input_json_delta":
                block["\x00json"] = block.get("\x00json", "") + (_get(delta, "partial_json") or "")
            elif delta_kind == "thinking_delta":
                block["thinking"] = (block.get("thinking") or "") + (_get(delta, "thinking") or "")
        elif kind == "content_block_start":
            start = _get(event, "content_block")
            dump = getattr(start, "model_dump", None)
            block = dict(dump(exclude_none=True) if callable(dump) else start or {})
            self._blocks[_get(event, "index") or 0] = block
        elif kind == "message_start":
            role = _get(_get(event, "message"), "role")
            if role:
                self._role = role
        elif kind == "message_delta":
            reason = _get(_get(event, "delta"), "stop_reason")
            if reason is not None:
                self._reason = reason

    def into(self, attributes: dict[str, Any]) -> None:
        output_into(attributes, self.output)

    def output(self) -> list[dict[str, Any]]:
        blocks = []
        for index in sorted(self._blocks):
            block = dict(self._blocks[index])
            raw = block.pop("\x00json", "")
            if raw:
                block["input"] = _parse_arguments(raw)
            if block.get("type") == "tool_use":  # as the SDK model would give it
                blocks.append(tool_call_part(block.get("input"), block.get("name"), block.get("id")))
                continue
            part = _anthropic_dict_part(block)
            if part is not None:
                blocks.append(part)
        return [output_message(self._role, blocks, anthropic_finish_reason(self._reason))]


# -- what a call records ----------------------------------------------------------------------
class CallContent:
    """A call's content (structured, the event's form) and where it goes."""

    __slots__ = ("mode", "request", "output", "logger", "base")

    def __init__(self, mode: ContentMode, request: dict[str, Any]) -> None:
        self.mode = mode
        self.request = request  # INPUT_MESSAGES / SYSTEM_INSTRUCTIONS / TOOL_DEFINITIONS
        self.output: list[dict[str, Any]] | None = None
        self.logger: Any = None  # the instrumentor's (``logger_provider``); None: global
        # The call's attributes as we know them (the event's, when the span does not record)
        self.base: dict[str, Any] = {}

    def span_attributes(self) -> dict[str, str]:
        """The request's content as span attributes (JSON strings), in the span modes."""
        if not self.mode.span:
            return {}
        return {k: dumps(v) for k, v in self.request.items() if v}

    def take_output(self, attributes: dict[str, Any]) -> None:
        """Take the output messages a response reader left in ``attributes``; in the span
        modes, put them back as the ``gen_ai.output.messages`` attribute."""
        output = attributes.pop(OUTPUT_MESSAGES, None)
        if output:
            self.output = output
            if self.mode.span:
                attributes[OUTPUT_MESSAGE_ATTRIBUTE] = dumps(output)

    def event_attributes(self, base: Mapping[str, Any]) -> dict[str, Any]:
        out = {
            k: v for k, v in base.items()
            if not k.startswith("otel_budget.") and k not in _CONTENT_KEYS
        }  # fmt: skip
        if self.mode.event:
            for key, value in self.request.items():
                if value:
                    out[key] = value
            if self.output:
                out[OUTPUT_MESSAGE_ATTRIBUTE] = self.output
        return out


def request_content(
    mode: ContentMode,
    messages: Any = None,
    system: Any = None,
    tools: Any = None,
) -> CallContent | None:
    """A request's ``CallContent`` (None when content and events are off). The arguments are
    thunks (called only when content is captured): ``messages`` → input messages, ``system``
    → system instruction parts, ``tools`` → tool definitions."""
    if not mode.active:
        return None
    request: dict[str, Any] = {}
    if mode.capture:
        for key, thunk in ((INPUT_MESSAGES, messages), (SYSTEM_INSTRUCTIONS, system),
                           (TOOL_DEFINITIONS, tools)):  # fmt: skip
            if thunk is None:
                continue
            try:
                value = thunk()
            except Exception as exc:  # content must never break a call
                _log_once(f"content {key}", exc)
                continue
            if value:
                request[key] = value
    return CallContent(mode, request)


def output_into(attributes: dict[str, Any], build: Any) -> None:
    """Put the output messages ``build()`` gives into response ``attributes`` (for the call
    to take), when content is captured; never raises."""
    if not content_mode().capture:
        return
    try:
        output = build()
    except Exception as exc:
        _log_once("content output", exc)
        return
    if output:
        attributes[OUTPUT_MESSAGES] = output


def chat_stream_content() -> ChatStreamContent | None:
    """A chat stream's content collector, when content is captured."""
    return ChatStreamContent() if content_mode().capture else None


def anthropic_stream_content() -> AnthropicStreamContent | None:
    """A Messages stream's content collector, when content is captured."""
    return AnthropicStreamContent() if content_mode().capture else None


_logged: set[str] = set()


def _log_once(what: str, exc: BaseException) -> None:
    if what in _logged or len(_logged) > 100:
        return
    _logged.add(what)
    _logger.warning("otel-budget: could not record %s: %r (logged once)", what, exc)


# -- the event --------------------------------------------------------------------------------
def make_logger(name: str = "otel_budget", logger_provider: Any = None) -> Any:
    """The logger events go through: ``logger_provider``'s, else the global provider's (a
    proxy that follows the global provider once one is set)."""
    from opentelemetry._logs import get_logger

    from otel_budget import __version__

    return get_logger(name, __version__, logger_provider,
                      schema_url="https://opentelemetry.io/schemas/1.37.0")  # fmt: skip


class EventTracer(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """A library instrumentor's tracer, carrying the logger its calls' events go through (the
    wrappers hand the tracer to ``start_call``, which gives the logger to the call)."""

    def __init__(self, tracer: Any, logger: Any) -> None:
        super().__init__(tracer)
        self._self_otel_budget_logger = logger


class SpanKeeper(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """A tracer that remembers the span it started last: the event of a refused call goes in
    the trace context of its (ended) span."""

    def __init__(self, tracer: Any) -> None:
        super().__init__(tracer)
        self._self_span: Any = None

    def start_span(self, *args: Any, **kwargs: Any) -> Any:
        span = self.__wrapped__.start_span(*args, **kwargs)
        self._self_span = span
        return span

    @property
    def last_span(self) -> Any:
        return self._self_span


def event_tracer(tracer: Tracer, name: str, logger_provider: Any = None) -> Tracer:
    """``tracer`` with the logger of ``logger_provider`` (``instrument(logger_provider=...)``;
    None: the global one)."""
    return cast(Tracer, EventTracer(tracer, make_logger(name, logger_provider)))


def emit_event(content: CallContent, span: Any, fallback: Mapping[str, Any]) -> None:
    """Emit the call's ``gen_ai.client.inference.operation.details`` record, in the span's
    trace context, with the span's attributes (our own left out) and the content; never
    raises."""
    if not content.mode.emit:
        return
    try:
        from opentelemetry import trace
        from opentelemetry._logs import LogRecord

        base = fallback
        if span is not None and span.is_recording():
            base = getattr(span, "attributes", None) or fallback
        context = trace.set_span_in_context(span) if span is not None else None
        logger = content.logger if content.logger is not None else make_logger()
        logger.emit(LogRecord(event_name=EVENT_NAME, attributes=content.event_attributes(base),
                              context=context))  # fmt: skip
    except Exception as exc:
        _log_once("the operation details event", exc)


__all__ = [
    "EVENT_NAME",
    "OUTPUT_MESSAGES",
    "AnthropicStreamContent",
    "CallContent",
    "ChatStreamContent",
    "ContentMode",
    "anthropic_input",
    "anthropic_output",
    "anthropic_system",
    "anthropic_tools",
    "capturing",
    "content_mode",
    "dumps",
    "emit_event",
    "event_tracer",
    "make_logger",
    "openai_chat_input",
    "openai_chat_output",
    "openai_chat_tools",
    "output_into",
    "request_content",
    "responses_input",
    "responses_output",
    "responses_tools",
]
