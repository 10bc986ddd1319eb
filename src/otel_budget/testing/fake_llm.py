"""An embedded fake LLM provider: the real ``openai`` and ``anthropic`` SDKs work against it.

    >>> from openai import OpenAI
    >>> from otel_budget.testing import Behaviour, FakeLLMServer
    >>> with FakeLLMServer() as server:                                   # doctest: +SKIP
    ...     client = OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
    ...     reply = client.chat.completions.create(
    ...         model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    ...     server.script(Behaviour(status=429))   # the next request is rate limited
    ...     server.stats()["billed_nanos"]         # what the "provider" would bill
    ...
    >>> # Anthropic: Anthropic(base_url=server.anthropic_base_url, api_key="x")

Stdlib only (``http.server.ThreadingHTTPServer`` on a daemon thread); shipped in the package
for the runaway-agent demo and for the instrumentors' test suites.

Endpoints (the ``/v1`` prefix is optional for the OpenAI ones):

* ``POST /v1/chat/completions``: JSON, or SSE with ``stream: true`` (``data: {chunk}`` ...
  ``data: [DONE]``; a last usage chunk with empty ``choices`` when
  ``stream_options.include_usage``). Honours ``n``, ``max_completion_tokens``/``max_tokens``
  and ``response_format`` (``json_schema``: a minimal instance of the schema, so
  ``client.chat.completions.parse`` works).
* ``POST /v1/responses``: JSON, or SSE (``response.created``, ``response.in_progress``,
  ``response.output_item.added``, ``response.content_part.added``,
  ``response.output_text.delta``..., ``...done``, then ``response.completed``, or
  ``response.incomplete`` when ``max_output_tokens`` cut the output, as the real API does).
  ``previous_response_id`` bills that response's context (its input + output tokens) again
  as input, as the real API does; an id it did not answer is a 400.
* ``POST /v1/embeddings`` (float lists, or base64 as the SDK asks by default),
  ``POST /v1/completions`` (legacy), ``GET /v1/models``.
* ``POST /v1/messages`` (Anthropic): JSON, or the real SSE event sequence (``message_start``,
  ``content_block_start``, ``ping``, ``content_block_delta``..., ``content_block_stop``,
  ``message_delta``, ``message_stop``); ``max_tokens`` is required, as there.
  ``POST /v1/messages/count_tokens`` answers the count below (not billed).
* Anything else: a 404 JSON error, in Anthropic's shape if the request carried an
  ``anthropic-version`` header, else OpenAI's.

Token counts (deterministic, and the "billed" truth; see :func:`count_input_tokens`):

* input: ``UTF-8 bytes of the text // 4 + 3 per message``, at least 1. "Text" is every string
  value in the messages (and the Anthropic ``system`` / Responses ``instructions``, each one
  more message, and the ``tools`` definitions), except the ``role`` and ``type`` fields.
  Embeddings and legacy completions: ``max(1, bytes // 4)`` per input string (token arrays
  count their length), no per-message overhead. Scripted ``cached_tokens`` and
  ``cache_creation_tokens`` are *added* to that count (a cached prefix of that size).
  OpenAI reports the total as ``prompt_tokens``/``input_tokens`` with the cached part in the
  details; Anthropic reports ``input_tokens`` *excluding* the cache, as Anthropic does.
* output: ``min(cap, output_tokens + reasoning_tokens)`` per choice, where the cap is the
  request's ``max_completion_tokens``/``max_tokens``/``max_output_tokens`` (legacy completions
  default to 16); a capped reply ends with ``length``/``max_tokens``/``incomplete``. The
  reasoning tokens are counted in the output total, as both providers do; the visible text has
  one word per token (``reply_text`` cycled), grouped into at most ``max_stream_chunks``
  deltas when streamed.

Billing (:meth:`FakeLLMServer.stats`): a 2xx response is billed its usage, whether or not the
usage was reported (``Behaviour(usage=False)`` hides it, the bill stays):
``input * in_price + cache_read * cache_read_price + cache_write * cache_write_price +
output * out_price`` (USD per million tokens; the cache prices default to the input price),
where a chat request that asks for audio (``modalities`` containing ``"audio"``, or an
``audio`` parameter) has every output token billed as audio, at ``audio_prices[model][1]``
(reported as ``completion_tokens_details.audio_tokens``; the reply carries a
``message.audio`` with the text as its transcript),
rounded *up* to the next nano-USD per request, as ``otel_budget.money`` does.
``Behaviour(usage_cost=True)`` reports that bill in USD as OpenRouter does (``usage.cost`` of
chat and Responses bodies and of a stream's usage chunk); another value is sent as scripted. A stream that
ends early (``break_stream_after``, ``stream_error_after``, a client that disconnects
mid-stream) is billed its whole input plus the output tokens of the deltas actually written
(reasoning tokens count as written with the first delta). A response lost in transit
(``drop_connection``) is billed in full. Error statuses bill nothing, nor does a request whose
client gave up (timed out) before the response was ready, unless ``bill_abandoned`` is set
(then it is billed as a real provider bills a generation it finished: its whole output).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import math
import re
import select
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_AUDIO_PRICES",
    "DEFAULT_PRICES",
    "DEFAULT_REPLY_TEXT",
    "Behaviour",
    "CallRecord",
    "FakeLLMServer",
    "count_input_tokens",
]

logger = logging.getLogger(__name__)

#: USD per million tokens: (input, output[, cache read[, cache write]]).
DEFAULT_PRICES: dict[str, tuple[float, ...]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.5, 10.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "text-embedding-3-small": (0.02, 0.0),
    "gpt-4o-audio-preview": (2.5, 10.0),
    "gpt-4o-mini-audio-preview": (0.15, 0.60),
}
#: USD per million audio tokens: (input audio, output audio), as OpenAI bills them.
DEFAULT_AUDIO_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-audio-preview": (40.0, 80.0),
    "gpt-4o-mini-audio-preview": (10.0, 20.0),
}
DEFAULT_REPLY_TEXT = "This is a fake reply from the otel-budget test server."

_NANOS_PER_USD_PER_MTOK = Decimal(1000)  # tokens * (USD/MTok) * 1e9 / 1e6
_SKIP_KEYS = frozenset({"role", "type"})
_DISCONNECT_ERRORS = (ConnectionError, TimeoutError, OSError, ValueError)
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this model."),
    404: ("invalid_request_error", "not_found", "Not found."),
    408: ("timeout", None, "Request timed out."),
    409: ("conflict", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (fake). Please try again."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit (fake)."),
    500: ("api_error", "Internal server error."),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}
_ROUTES: dict[str, tuple[str, str]] = {  # canonical path -> (method, api)
    "/v1/chat/completions": ("POST", "chat"),
    "/v1/completions": ("POST", "completions"),
    "/v1/responses": ("POST", "responses"),
    "/v1/embeddings": ("POST", "embeddings"),
    "/v1/messages": ("POST", "messages"),
    "/v1/messages/count_tokens": ("POST", "count_tokens"),
    "/v1/models": ("GET", "models"),
}
_OUTCOME_COUNTERS = {
    "broken_stream": "broken_streams",
    "stream_error": "stream_errors",
    "client_disconnect": "client_disconnects",
    "dropped": "dropped_responses",
}


# --- public helpers


@dataclass(frozen=True)
class Behaviour:
    """A one-shot behaviour for the next request (see :meth:`FakeLLMServer.script`).

    Everything defaults to "a normal, successful reply".
    """

    status: int = 200  #: >= 400: answer this error, in the provider's JSON shape
    delay_s: float = 0.0  #: extra wait before answering (on top of ``latency_s``)
    retry_after: float | None = None  #: ``retry-after``(-ms) header; 429s get 0.05 s by default
    error_type: str | None = None  #: override the error JSON's type
    error_code: str | None = None  #: override the OpenAI error JSON's code
    error_message: str | None = None
    headers: Mapping[str, str] | None = None  #: extra response headers
    break_stream_after: int | None = None  #: write N SSE events, then close the connection
    stream_error_after: int | None = None  #: write N SSE events, then an in-band error event
    drop_connection: bool = False  #: bill the reply, then close without answering
    #: False: omit the usage objects; billed all the same. (Anthropic always sends usage: the
    #: anthropic SDK's ``messages.stream()`` helper fails without it; raw ``stream=True`` works.)
    usage: bool = True
    input_tokens: int | None = None  #: override the counted (uncached) input tokens
    output_tokens: int | None = None  #: visible output tokens (default: ``default_output_tokens``)
    cached_tokens: int = 0  #: cache-read input tokens, added to the counted input
    cache_creation_tokens: int = 0  #: cache-write input tokens, added to the counted input
    reasoning_tokens: int = 0  #: reasoning/thinking tokens, part of the output total
    text: str | None = None  #: exact reply text (split into ``output_tokens`` pieces)
    response_model: str | None = None  #: model id to answer with (default: the request's)
    chunk_delay_s: float | None = None  #: wait between SSE events (default: ``chunk_delay_s``)
    path: str | None = None  #: only for requests whose path contains this (e.g. "messages")
    #: report this usage object instead of the true one (``{}``, zeros, negatives, nulls):
    #: the bill stays the true usage, as with a provider whose usage report is broken
    reported_usage: Mapping[str, Any] | None = None
    #: OpenRouter's ``usage.cost`` on OpenAI-shaped usage (chat, its stream's usage chunk,
    #: Responses): ``True`` reports the true bill in USD, as OpenRouter does; any other value
    #: is sent as it is (``"0.01"``, ``-1``, ``float("nan")``, ``1e30``); None: no cost field.
    usage_cost: Any = None
    #: report this finish / stop reason (chat ``finish_reason``, Anthropic ``stop_reason``,
    #: e.g. ``tool_calls`` / ``tool_use``) instead of ``stop`` / ``end_turn``
    stop_reason: str | None = None
    #: answer with these tool calls (``{"name": ..., "arguments": {...}}`` each): chat
    #: ``tool_calls`` (no text, finish ``tool_calls``), Responses ``function_call`` items,
    #: Anthropic ``tool_use`` blocks after the text (stop ``tool_use``); streamed too
    tool_calls: Sequence[Mapping[str, Any]] | None = None
    #: Anthropic: a ``thinking`` block with this text (and a fake signature) before the text
    thinking: str | None = None


@dataclass
class CallRecord:
    """One request the server saw (:meth:`FakeLLMServer.calls`)."""

    method: str
    path: str
    api: str | None
    headers: dict[str, str]
    body: Any
    started: float
    model: str | None = None
    stream: bool = False
    status: int = 0
    #: ok, error, broken_stream, stream_error, client_disconnect, dropped, not_found, stopped
    outcome: str = "ok"
    input_tokens: int = 0  #: billed input tokens, cache included
    output_tokens: int = 0  #: billed output tokens, reasoning included
    billed_nanos: int = 0
    billed: bool = False
    duration_s: float = 0.0
    behaviour: Behaviour | None = None


def count_input_tokens(body: Mapping[str, Any], api: str = "chat") -> int:
    """The fake's (billed) input token count for a request body; see the module docstring.

    ``api`` is one of ``chat``, ``responses``, ``messages``, ``embeddings``, ``completions``.
    """
    if api in ("embeddings", "completions"):
        raw = body.get("input" if api == "embeddings" else "prompt")
        if raw is None:
            return 1
        items: list[Any] = [raw] if isinstance(raw, str) else list(raw)
        if items and all(isinstance(x, int) for x in items):
            items = [items]  # a single token array
        total = 0
        for item in items:
            if isinstance(item, str):
                total += max(1, len(item.encode("utf-8")) // 4)
            elif isinstance(item, (list, tuple)):
                total += len(item)
        return max(1, total)
    messages: list[Any] = []
    if api == "messages" and body.get("system"):
        messages.append(body["system"])
    if api == "responses":
        if body.get("instructions"):
            messages.append(body["instructions"])
        raw_input = body.get("input")
        if isinstance(raw_input, str):
            messages.append(raw_input)
        elif raw_input:
            messages.extend(raw_input)
    else:
        messages.extend(body.get("messages") or [])
    n_bytes = sum(_text_bytes(m) for m in messages)
    n_bytes += _text_bytes(body.get("tools") or []) + _text_bytes(body.get("functions") or [])
    return max(1, n_bytes // 4 + 3 * len(messages))


def _text_bytes(obj: Any) -> int:
    if isinstance(obj, str):
        return len(obj.encode("utf-8"))
    if isinstance(obj, Mapping):
        return sum(_text_bytes(v) for k, v in obj.items() if k not in _SKIP_KEYS)
    if isinstance(obj, (list, tuple)):
        return sum(_text_bytes(v) for v in obj)
    return 0


# --- generation plan


@dataclass
class _Plan:
    """What one request generates: the billed truth, before it is rendered."""

    model: str
    input: int  # uncached input tokens
    cache_read: int
    cache_write: int
    reasoning: int  # per choice
    pieces: list[tuple[str, int]]  # per choice: (text delta, tokens)
    truncated: bool
    choices: int = 1
    structured: bool = False
    audio: bool = False  # spoken output: every output token is an audio token

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    @property
    def output_per_choice(self) -> int:
        return self.reasoning + sum(n for _, n in self.pieces)

    @property
    def output(self) -> int:
        return self.output_per_choice * self.choices

    @property
    def total_input(self) -> int:
        return self.input + self.cache_read + self.cache_write


@dataclass
class _Event:
    data: bytes
    tokens: int = 0  # output tokens this event carries (billed once it is written)


def _sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + b"data: " + payload.encode() + b"\n\n"


def _split_words(text: str, tokens: int) -> list[str]:
    """``tokens`` word pieces, cycling ``text``: one word (and its trailing space) per token."""
    words = re.findall(r"\S+\s*", text) or ["..."]
    out = []
    for word in itertools.islice(itertools.cycle(words), tokens):
        out.append(word if word[-1:].isspace() else word + " ")
    if out:
        out[-1] = out[-1].rstrip() or out[-1]
    return out


def _split_exact(text: str, full_tokens: int, tokens: int) -> list[str]:
    """``text`` cut into ``full_tokens`` near-equal slices, of which the first ``tokens``."""
    bounds = [round(i * len(text) / full_tokens) for i in range(full_tokens + 1)]
    return [text[bounds[i] : bounds[i + 1]] for i in range(tokens)]


def _group(units: Sequence[str], max_chunks: int) -> list[tuple[str, int]]:
    if not units:
        return []
    size = max(1, math.ceil(len(units) / max(1, max_chunks)))
    return [
        ("".join(units[i : i + size]), len(units[i : i + size])) for i in range(0, len(units), size)
    ]


def _example_for_schema(schema: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    """A minimal instance of a JSON schema (enough for the SDKs' structured-output parsers)."""
    if depth > 16 or not isinstance(schema, Mapping):
        return None
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, Mapping) and part else target
        return _example_for_schema(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key) or []
        if options:
            pick = next(
                (o for o in options if not (isinstance(o, Mapping) and o.get("type") == "null")),
                options[0],
            )
            return _example_for_schema(pick, root, depth + 1)
    if schema.get("allOf"):
        return _example_for_schema(schema["allOf"][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: _example_for_schema(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        count = max(1, int(schema.get("minItems") or 1))
        return [
            _example_for_schema(schema.get("items") or {}, root, depth + 1) for _ in range(count)
        ]
    if kind == "string":
        fmt = schema.get("format")
        if fmt == "date-time":
            return "2024-01-01T00:00:00Z"
        if fmt == "date":
            return "2024-01-01"
        return "fake".ljust(int(schema.get("minLength") or 0), "x")
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0.0))
    if kind == "boolean":
        return True
    return None


def _structured_schema(api: str, body: Mapping[str, Any]) -> tuple[bool, Any]:
    """(structured output requested, JSON schema or None for plain JSON mode)."""
    fmt: Any = None
    if api == "chat":
        fmt = body.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            return True, (fmt.get("json_schema") or {}).get("schema") or {}
    elif api == "responses":
        fmt = (
            (body.get("text") or {}).get("format")
            if isinstance(body.get("text"), Mapping)
            else None
        )
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            return True, fmt.get("schema") or {}
    elif api == "messages":
        cfg = body.get("output_config")
        fmt = (cfg or {}).get("format") if isinstance(cfg, Mapping) else None
        fmt = fmt or body.get("output_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            return True, fmt.get("schema") or {}
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        return True, None
    return False, None


def _asks_audio(body: Mapping[str, Any]) -> bool:
    modalities = body.get("modalities")
    return body.get("audio") is not None or (
        isinstance(modalities, list) and "audio" in modalities
    )


def _reported(beh: Behaviour, usage: dict[str, Any]) -> Any:
    """The usage object to send: the true one, or the scripted (broken) report."""
    return dict(beh.reported_usage) if beh.reported_usage is not None else usage


def _tool_calls(beh: Behaviour, rid: int) -> list[tuple[str, str, str]]:
    """The scripted tool calls as (call id, name, JSON arguments)."""
    return [
        (f"call_fake{rid:08d}_{i}", str(call.get("name", "tool")),
         json.dumps(call.get("arguments") or {}, separators=(",", ":")))
        for i, call in enumerate(beh.tool_calls or ())
    ]  # fmt: skip


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _BadRequest(Exception):
    pass


# --- the server


class FakeLLMServer:
    """A fake OpenAI + Anthropic HTTP API on 127.0.0.1 that counts what it would bill.

    Attributes that may be changed while it runs: ``latency_s`` (wait before every model
    answer), ``default_output_tokens``, ``reply_text``, ``chunk_delay_s`` (wait between SSE
    events), ``max_stream_chunks``, ``embedding_dimensions``, ``default_retry_after_s``,
    ``default_behaviour`` (used when no scripted behaviour is queued), ``prices`` and
    ``bill_abandoned`` (bill a reply the client timed out on, as real providers do).

    Requests are counted and billed *before* the bytes that complete the response are written,
    so :meth:`stats` is up to date as soon as an SDK call returns or a stream is exhausted.
    Only what the server learns later (a client that went away) needs :meth:`wait_idle`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        prices: Mapping[str, tuple[float, ...]] | None = None,
        max_lifetime_s: float | None = 600.0,
        default_output_tokens: int = 20,
        reply_text: str = DEFAULT_REPLY_TEXT,
        audio_prices: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.latency_s = latency_s
        #: model -> (input, output[, cache read[, cache write]]) USD per MTok; prefixes match
        #: dated snapshots ("gpt-4o-mini-2024-07-18"); unknown models bill 0 (``unpriced``).
        self.prices: dict[str, tuple[float, ...]] = {**DEFAULT_PRICES, **(prices or {})}
        #: model -> (input audio, output audio) USD per MTok, matched like ``prices``; a model
        #: without one bills audio at its text rates.
        self.audio_prices: dict[str, tuple[float, float]] = {
            **DEFAULT_AUDIO_PRICES, **(audio_prices or {})
        }
        self.max_lifetime_s = max_lifetime_s
        self.default_output_tokens = default_output_tokens
        self.reply_text = reply_text
        self.chunk_delay_s = 0.0
        self.max_stream_chunks = 50
        self.embedding_dimensions = 8
        self.default_retry_after_s = 0.05
        self.default_behaviour: Behaviour | None = None
        self.max_call_log = 10_000
        #: Responses ids -> their context (input + output tokens), billed again as input by a
        #: request that names it as ``previous_response_id`` (most recent kept).
        self._response_contexts: OrderedDict[str, int] = OrderedDict()


        #: True: a reply the client gave up on (timed out) before it was ready is billed all
        #: the same, as real providers bill a generation they finished (its whole output; a
        #: stream, its input only). False (the default): not billed.
        self.bill_abandoned = False

        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: deque[Behaviour] = deque()
        self._calls: deque[CallRecord] = deque(maxlen=self.max_call_log)
        self._ids = itertools.count(1)
        self._stats = self._blank_stats()
        self._in_flight = 0
        self._max_in_flight = 0
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stop_event = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = False

    # -- lifecycle --

    def start(self) -> FakeLLMServer:
        """Bind and serve on a daemon thread; returns ``self``."""
        with self._lock:
            if self._httpd is not None or self._stopped:
                raise RuntimeError("FakeLLMServer can be started once")
            httpd = _HTTPServer((self.host, self.port), _Handler, owner=self)
            self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-llm:{self.port}",
            daemon=True,
        )
        self._thread.start()
        if self.max_lifetime_s is not None:
            self._timer = threading.Timer(self.max_lifetime_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection, join the threads and free the port (idempotent)."""
        with self._lock:
            httpd = self._httpd
            if httpd is None or self._stopped:
                self._stopped = True
                return
            self._stopped = True
        self._stop_event.set()  # wakes handlers waiting on a delay
        current = threading.current_thread()
        if self._timer is not None and self._timer is not current:
            self._timer.cancel()
        if self._thread is not current:
            httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for thread in [self._thread, self._timer, *connections.values()]:
            if thread is not None and thread is not current and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _expire(self) -> None:
        logger.warning(
            "FakeLLMServer on port %s stopped after max_lifetime_s=%s",
            self.port,
            self.max_lifetime_s,
        )
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None and not self._stopped

    def __enter__(self) -> FakeLLMServer:
        return self if self._httpd is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses --

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (after :meth:`start`)."""
        if self._httpd is None:
            raise RuntimeError("FakeLLMServer is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    # -- scripting --

    def script(self, *behaviours: Behaviour) -> None:
        """Queue one-shot behaviours, consumed FIFO by the next model requests (chat,
        completions, responses, embeddings, messages; not count_tokens or models)."""
        with self._lock:
            self._queue.extend(behaviours)

    @property
    def pending_behaviours(self) -> int:
        with self._lock:
            return len(self._queue)

    def clear_script(self) -> None:
        with self._lock:
            self._queue.clear()

    def _next_behaviour(self, path: str) -> Behaviour:
        with self._lock:
            for i, beh in enumerate(self._queue):
                if beh.path is None or beh.path in path:
                    del self._queue[i]
                    return beh
        return self.default_behaviour or Behaviour()

    # -- stats --

    @staticmethod
    def _blank_counter() -> dict[str, int]:
        return dict.fromkeys(
            (
                "requests",
                "errors",
                "billed_requests",
                "input_tokens",
                "output_tokens",
                "billed_nanos",
            ),
            0,
        )

    def _blank_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._blank_counter()
        stats.update(
            dict.fromkeys(
                (
                    "cache_read_tokens",
                    "cache_write_tokens",
                    "reasoning_tokens",
                    "broken_streams",
                    "stream_errors",
                    "client_disconnects",
                    "dropped_responses",
                    "unpriced_requests",
                    "connections",
                ),
                0,
            )
        )
        stats["by_path"] = {}
        stats["by_model"] = {}
        stats["by_user"] = {}
        return stats

    def stats(self) -> dict[str, Any]:
        """A snapshot: request/billing counters, overall and ``by_path``/``by_model``, and
        the billing counters ``by_user``, keyed by the OpenAI request body's ``user`` field.

        ``input_tokens``/``output_tokens`` are *billed* tokens (cache and reasoning included);
        ``billed_usd`` is ``billed_nanos / 1e9``. Also: ``errors`` (non-2xx answers),
        ``broken_streams``, ``stream_errors``, ``client_disconnects``, ``dropped_responses``,
        ``unpriced_requests``, ``connections`` (TCP connections accepted), ``in_flight`` and
        ``max_in_flight``.
        """
        with self._lock:
            snap: dict[str, Any] = json.loads(json.dumps(self._stats))
            snap["in_flight"] = self._in_flight
            snap["max_in_flight"] = self._max_in_flight
        for counter in [snap, *snap["by_path"].values(), *snap["by_model"].values(),
                        *snap["by_user"].values()]:  # fmt: skip
            counter["billed_usd"] = counter["billed_nanos"] / 1_000_000_000
        return snap

    def reset_stats(self) -> None:
        """Zero the counters and clear the call log (the script queue is kept)."""
        with self._lock:
            self._stats = self._blank_stats()
            self._calls.clear()
            self._max_in_flight = self._in_flight

    def calls(self) -> list[CallRecord]:
        """The requests seen so far (oldest first, at most ``max_call_log``)."""
        with self._lock:
            return list(self._calls)

    @property
    def last_call(self) -> CallRecord | None:
        with self._lock:
            return self._calls[-1] if self._calls else None

    def price_for(self, model: str | None) -> tuple[Decimal, Decimal, Decimal, Decimal] | None:
        """(input, output, cache read, cache write) USD/MTok for ``model``, or None if unpriced."""
        if not model:
            return None
        price = self.prices.get(model)
        if price is None:
            for key in sorted(self.prices, key=len, reverse=True):
                if model.startswith(key):
                    price = self.prices[key]
                    break
        if price is None:
            return None
        p_in, p_out = Decimal(str(price[0])), Decimal(str(price[1]))
        p_read = Decimal(str(price[2])) if len(price) > 2 else p_in
        p_write = Decimal(str(price[3])) if len(price) > 3 else p_in
        return p_in, p_out, p_read, p_write

    def audio_price_for(self, model: str | None) -> tuple[Decimal, Decimal] | None:
        """(input audio, output audio) USD/MTok for ``model``, or None."""
        if not model:
            return None
        price = self.audio_prices.get(model)
        if price is None:
            for key in sorted(self.audio_prices, key=len, reverse=True):
                if model.startswith(key):
                    price = self.audio_prices[key]
                    break
        if price is None:
            return None
        return Decimal(str(price[0])), Decimal(str(price[1]))

    def _bill(self, record: CallRecord, plan: _Plan, output_tokens: int, outcome: str) -> None:
        """Bill a request (once), before the bytes that let the client see it complete."""
        price = self.price_for(plan.model)
        nanos = self._bill_nanos(plan, output_tokens)
        record.input_tokens = plan.total_input
        record.output_tokens = output_tokens
        record.billed_nanos = nanos
        record.billed = True
        record.outcome = outcome
        with self._lock:
            for counter in self._counters(record, model=record.model or plan.model):
                counter["billed_requests"] += 1
                counter["input_tokens"] += plan.total_input
                counter["output_tokens"] += output_tokens
                counter["billed_nanos"] += nanos
            self._stats["cache_read_tokens"] += plan.cache_read
            self._stats["cache_write_tokens"] += plan.cache_write
            self._stats["reasoning_tokens"] += min(plan.reasoning * plan.choices, output_tokens)
            if price is None:
                self._stats["unpriced_requests"] += 1
            key = _OUTCOME_COUNTERS.get(outcome)
            if key:
                self._stats[key] += 1

    def _bill_nanos(self, plan: _Plan, output_tokens: int) -> int:
        """What a request is billed (nano-USD, rounded up), 0 for an unpriced model."""
        price = self.price_for(plan.model)
        nanos = 0
        if price is not None:
            p_in, p_out, p_read, p_write = price
            audio_price = self.audio_price_for(plan.model) if plan.audio else None
            if audio_price is not None:
                p_out = audio_price[1]
            usd_per_mtok = (
                plan.input * p_in
                + plan.cache_read * p_read
                + plan.cache_write * p_write
                + output_tokens * p_out
            )
            nanos = int(
                (usd_per_mtok * _NANOS_PER_USD_PER_MTOK).to_integral_value(rounding=ROUND_CEILING)
            )
        return nanos

    def _counters(self, record: CallRecord, model: str | None = None) -> list[dict[str, int]]:
        # caller holds self._lock
        counters = [
            self._stats,
            self._stats["by_path"].setdefault(record.path, self._blank_counter()),
        ]
        if model:
            counters.append(self._stats["by_model"].setdefault(model, self._blank_counter()))
            # Billing only (the body is parsed by then): the bill per end user, for load tests.
            user = record.body.get("user") if isinstance(record.body, dict) else None
            if isinstance(user, str):
                counters.append(self._stats["by_user"].setdefault(user, self._blank_counter()))
        return counters

    def _begin(self, record: CallRecord) -> None:
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            for counter in self._counters(record):
                counter["requests"] += 1
            if self._calls.maxlen != self.max_call_log:
                self._calls = deque(self._calls, maxlen=self.max_call_log)
            self._calls.append(record)

    def _note_model(self, record: CallRecord) -> None:
        with self._lock:
            self._stats["by_model"].setdefault(record.model, self._blank_counter())["requests"] += 1

    def _note_error(self, record: CallRecord, status: int, outcome: str = "error") -> None:
        record.status, record.outcome = status, outcome
        with self._lock:
            for counter in self._counters(record, model=record.model):
                counter["errors"] += 1

    def _end(self, record: CallRecord) -> None:
        record.duration_s = time.monotonic() - record.started
        with self._idle:
            self._in_flight -= 1
            if record.outcome == "client_disconnect" and not record.billed:
                self._stats["client_disconnects"] += 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled (their accounting is then final)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _new_id(self) -> int:
        with self._lock:
            return next(self._ids)

    # -- request planning --

    def _plan(self, api: str, body: Mapping[str, Any], beh: Behaviour) -> _Plan:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("you must provide a model parameter")
        if api == "messages":
            if _int_or_none(body.get("max_tokens")) is None:
                raise _BadRequest("max_tokens: Field required")
            if not isinstance(body.get("messages"), list):
                raise _BadRequest("messages: Field required")
        elif api == "chat" and not isinstance(body.get("messages"), list):
            raise _BadRequest("Missing required parameter: 'messages'.")
        elif api == "embeddings" and body.get("input") in (None, "", []):
            raise _BadRequest("'input' is a required property")
        counted = (
            beh.input_tokens if beh.input_tokens is not None else count_input_tokens(body, api)
        )
        previous = body.get("previous_response_id") if api == "responses" else None
        if previous is not None and beh.input_tokens is None:
            with self._lock:
                stored = self._response_contexts.get(previous) if isinstance(previous, str) else None
            if stored is None:
                raise _BadRequest(f"Previous response with id '{previous}' not found.")
            counted += stored  # the stored conversation is input again, as the real API bills it
        plan = _Plan(
            model=beh.response_model or model,
            input=max(0, counted),
            cache_read=max(0, beh.cached_tokens),
            cache_write=max(0, beh.cache_creation_tokens),
            reasoning=0,
            pieces=[],
            truncated=False,
        )
        if api == "embeddings":
            return plan
        if api == "chat":
            cap = _int_or_none(body.get("max_completion_tokens"))
            cap = cap if cap is not None else _int_or_none(body.get("max_tokens"))
            plan.choices = max(1, _int_or_none(body.get("n")) or 1)
        elif api == "completions":
            cap = _int_or_none(body.get("max_tokens"))
            cap = 16 if cap is None else cap
            plan.choices = max(1, _int_or_none(body.get("n")) or 1)
        elif api == "responses":
            cap = _int_or_none(body.get("max_output_tokens"))
        else:
            cap = _int_or_none(body.get("max_tokens"))
        visible = beh.output_tokens if beh.output_tokens is not None else self.default_output_tokens
        visible, reasoning = max(0, visible), max(0, beh.reasoning_tokens)
        full_visible = visible
        if cap is not None and visible + reasoning > max(0, cap):
            plan.truncated = True
            reasoning = min(reasoning, max(0, cap))
            visible = max(0, cap) - reasoning
        plan.reasoning = reasoning
        plan.audio = api == "chat" and _asks_audio(body)
        structured, schema = _structured_schema(api, body)
        plan.structured = structured
        if beh.text is not None or structured:
            if beh.text is not None:
                text = beh.text
            elif schema is not None:
                text = json.dumps(_example_for_schema(schema, schema))
            else:
                text = json.dumps({"reply": self.reply_text})
            units = _split_exact(text, full_visible, visible) if full_visible else []
        else:
            units = _split_words(self.reply_text, visible)
        plan.pieces = _group(units, self.max_stream_chunks)
        return plan

    # -- rendering: OpenAI chat / completions --

    def _with_cost(self, beh: Behaviour, plan: _Plan, usage: dict[str, Any]) -> dict[str, Any]:
        """``usage`` with OpenRouter's ``cost`` field when the behaviour scripts one."""
        if beh.usage_cost is None:
            return usage
        cost = beh.usage_cost
        if cost is True:  # the true bill of the whole reply, in USD
            cost = self._bill_nanos(plan, plan.output) / 1_000_000_000
        return {**usage, "cost": cost}

    def _chat_usage(self, plan: _Plan) -> dict[str, Any]:
        prompt_details: dict[str, Any] = {"cached_tokens": plan.cache_read, "audio_tokens": 0}
        if plan.cache_write:
            prompt_details["cache_write_tokens"] = plan.cache_write
        return {
            "prompt_tokens": plan.total_input,
            "completion_tokens": plan.output,
            "total_tokens": plan.total_input + plan.output,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {
                "reasoning_tokens": plan.reasoning * plan.choices,
                "audio_tokens": plan.output if plan.audio else 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _render_chat(
        self, api: str, body: Mapping[str, Any], plan: _Plan, beh: Behaviour, rid: int
    ) -> Any:
        legacy = api == "completions"
        cid = f"{'cmpl' if legacy else 'chatcmpl'}-fake{rid:08d}"
        created = int(time.time())
        calls = [] if legacy else _tool_calls(beh, rid)
        finish = beh.stop_reason or (
            "length" if plan.truncated else ("tool_calls" if calls else "stop")
        )
        base = {
            "id": cid,
            "object": "text_completion" if legacy else "chat.completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            choices: list[dict[str, Any]]
            if legacy:
                choices = [
                    {"text": plan.text, "index": i, "logprobs": None, "finish_reason": finish}
                    for i in range(plan.choices)
                ]
            else:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": plan.text,
                    "refusal": None,
                    "annotations": [],
                }
                if calls:  # a tool-calling reply has no text
                    message["content"] = None
                    message["tool_calls"] = [
                        {"id": cid_, "type": "function",
                         "function": {"name": name, "arguments": args}}
                        for cid_, name, args in calls
                    ]  # fmt: skip
                if plan.audio:  # spoken reply: no text content, the text is the transcript
                    message["content"] = None
                    message["audio"] = {
                        "id": f"audio_fake{rid:08d}",
                        "data": base64.b64encode(b"RIFF\0\0\0\0WAVE").decode(),
                        "expires_at": created + 3600,
                        "transcript": plan.text,
                    }
                choices = [
                    {
                        "index": i,
                        "message": dict(message),
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                    for i in range(plan.choices)
                ]
            reply: dict[str, Any] = {**base, "choices": choices, "service_tier": "default"}
            if beh.usage:
                reply["usage"] = _reported(beh, self._with_cost(beh, plan, self._chat_usage(plan)))
            return reply
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base["object"] = "text_completion" if legacy else "chat.completion.chunk"
        if not legacy:
            base["service_tier"] = "default"  # as OpenAI sends it on every chunk
        extra = {"usage": None} if include_usage and not legacy else {}

        def chunk(choice: dict[str, Any]) -> bytes:
            return _sse({**base, "choices": [choice], **extra})

        events: list[_Event] = []
        for i in range(plan.choices):
            reasoning_due = plan.reasoning
            if not legacy:
                events.append(
                    _Event(
                        chunk(
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": "", "refusal": None},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        )
                    )
                )
            for j, (call_id, name, args) in enumerate(calls):  # the output tokens ride here
                call_delta = {"index": j, "id": call_id, "type": "function",
                              "function": {"name": name, "arguments": args}}  # fmt: skip
                choice = {"index": i, "delta": {"tool_calls": [call_delta]}, "logprobs": None,
                          "finish_reason": None}  # fmt: skip
                due = plan.output_per_choice if j == 0 else 0
                events.append(_Event(chunk(choice), due))
                reasoning_due = 0
            for text, tokens in [] if calls else plan.pieces:
                if legacy:
                    choice = {"text": text, "index": i, "logprobs": None, "finish_reason": None}
                else:
                    choice = {
                        "index": i,
                        "delta": {"content": text},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                events.append(_Event(chunk(choice), tokens + reasoning_due))
                reasoning_due = 0
            if legacy:
                final = {"text": "", "index": i, "logprobs": None, "finish_reason": finish}
            else:
                final = {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}
            events.append(_Event(chunk(final), reasoning_due))
        if include_usage and beh.usage:
            events.append(_Event(_sse(
                {**base, "choices": [],
                 "usage": _reported(beh, self._with_cost(beh, plan, self._chat_usage(plan)))}
            )))  # fmt: skip
        events.append(_Event(b"data: [DONE]\n\n"))
        return events

    # -- rendering: OpenAI Responses --

    def _render_responses(
        self, body: Mapping[str, Any], plan: _Plan, beh: Behaviour, rid: int
    ) -> Any:
        resp_id, msg_id = f"resp_fake{rid:08d}", f"msg_fake{rid:08d}"
        with self._lock:
            self._response_contexts[resp_id] = plan.total_input + plan.output
            while len(self._response_contexts) > self.max_call_log:
                self._response_contexts.popitem(last=False)
        created = int(time.time())
        text_cfg = (
            body.get("text")
            if isinstance(body.get("text"), Mapping)
            else {"format": {"type": "text"}}
        )
        status = "incomplete" if plan.truncated else "completed"
        usage = {
            "input_tokens": plan.total_input,
            "input_tokens_details": {
                "cached_tokens": plan.cache_read,
                "cache_write_tokens": plan.cache_write,
            },
            "output_tokens": plan.output,
            "output_tokens_details": {"reasoning_tokens": plan.reasoning},
            "total_tokens": plan.total_input + plan.output,
        }

        def response(state: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
            return {
                "id": resp_id,
                "object": "response",
                "created_at": created,
                "status": state,
                "background": False,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"}
                if state == "incomplete"
                else None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": plan.model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "service_tier": "default",
                "store": True,
                "temperature": 1.0,
                "text": text_cfg,
                "tool_choice": "auto",
                "tools": body.get("tools") or [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": _reported(beh, self._with_cost(beh, plan, usage))
                if with_usage and beh.usage
                else None,
                "user": None,
                "metadata": body.get("metadata") or {},
            }

        def message(text: str, state: str) -> dict[str, Any]:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            return {
                "id": msg_id,
                "type": "message",
                "status": state,
                "role": "assistant",
                "content": [part] if state != "in_progress" else [],
            }

        full_message = message(plan.text, status)
        calls = _tool_calls(beh, rid)

        def function_call(index: int, arguments: str, state: str) -> dict[str, Any]:
            call_id, name, _ = calls[index]
            return {"type": "function_call", "id": f"fc_fake{rid:08d}_{index}",
                    "call_id": call_id, "name": name, "arguments": arguments, "status": state}  # fmt: skip

        if calls:  # a tool-calling reply: only the function calls
            full_output = [
                function_call(i, args, "completed") for i, (_, _, args) in enumerate(calls)
            ]
        else:
            full_output = [full_message]
        if not body.get("stream"):
            return response(status, full_output, True)
        seq = itertools.count()

        def ev(kind: str, tokens: int = 0, **fields: Any) -> _Event:
            return _Event(
                _sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind), tokens
            )

        if calls:
            events = [
                ev("response.created", response=response("in_progress", [], False)),
                ev("response.in_progress", response=response("in_progress", [], False)),
            ]
            for i, (_, _, args) in enumerate(calls):
                item_id = f"fc_fake{rid:08d}_{i}"
                events += [
                    ev("response.output_item.added", output_index=i,
                       item=function_call(i, "", "in_progress")),
                    ev("response.function_call_arguments.delta",
                       plan.output if i == 0 else 0, item_id=item_id, output_index=i, delta=args),
                    ev("response.function_call_arguments.done", item_id=item_id, output_index=i,
                       arguments=args),
                    ev("response.output_item.done", output_index=i, item=full_output[i]),
                ]  # fmt: skip
            events.append(ev(f"response.{status}", response=response(status, full_output, True)))
            return events
        empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        done_part = {"type": "output_text", "text": plan.text, "annotations": [], "logprobs": []}
        where: dict[str, Any] = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        events = [
            ev("response.created", response=response("in_progress", [], False)),
            ev("response.in_progress", response=response("in_progress", [], False)),
            ev("response.output_item.added", output_index=0, item=message("", "in_progress")),
            ev("response.content_part.added", part=empty_part, **where),
        ]
        reasoning_due = plan.reasoning
        for text, tokens in plan.pieces:
            events.append(
                ev(
                    "response.output_text.delta",
                    tokens + reasoning_due,
                    delta=text,
                    logprobs=[],
                    **where,
                )
            )
            reasoning_due = 0
        events += [
            ev("response.output_text.done", reasoning_due, text=plan.text, logprobs=[], **where),
            ev("response.content_part.done", part=done_part, **where),
            ev("response.output_item.done", output_index=0, item=full_message),
            ev(f"response.{status}", response=response(status, full_output, True)),
        ]
        return events

    # -- rendering: embeddings --

    def _render_embeddings(
        self, body: Mapping[str, Any], plan: _Plan, beh: Behaviour
    ) -> dict[str, Any]:
        raw = body["input"]
        items = [raw] if isinstance(raw, str) else list(raw)
        if items and all(isinstance(x, int) for x in items):
            items = [items]
        dims = _int_or_none(body.get("dimensions")) or self.embedding_dimensions
        dims = max(1, min(dims, 4096))
        data = []
        for index, item in enumerate(items):
            vector = _fake_vector(json.dumps(item), dims)
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        reply: dict[str, Any] = {"object": "list", "data": data, "model": plan.model}
        if beh.usage:
            reply["usage"] = {"prompt_tokens": plan.total_input, "total_tokens": plan.total_input}
        return reply

    # -- rendering: Anthropic messages --

    def _render_messages(
        self, body: Mapping[str, Any], plan: _Plan, beh: Behaviour, rid: int
    ) -> Any:
        msg_id = f"msg_fake{rid:08d}"
        calls = _tool_calls(beh, rid)
        stop_reason = beh.stop_reason or (
            "max_tokens" if plan.truncated else ("tool_use" if calls else "end_turn")
        )
        signature = base64.b64encode(f"fake-signature-{rid}".encode()).decode()
        blocks: list[dict[str, Any]] = []
        if beh.thinking is not None:
            blocks.append({"type": "thinking", "thinking": beh.thinking, "signature": signature})
        blocks.append({"type": "text", "text": plan.text})
        blocks += [
            {"type": "tool_use", "id": call_id.replace("call_", "toolu_"), "name": name,
             "input": json.loads(args)}
            for call_id, name, args in calls
        ]  # fmt: skip
        usage: dict[str, Any] = {
            "input_tokens": plan.input,
            "cache_creation_input_tokens": plan.cache_write,
            "cache_read_input_tokens": plan.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": plan.cache_write,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": plan.output,
            "service_tier": "standard",
        }
        if plan.reasoning:
            usage["output_tokens_details"] = {"thinking_tokens": plan.reasoning}
        message: dict[str, Any] = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": plan.model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not body.get("stream"):
            return {**message, **({"usage": _reported(beh, usage)} if beh.usage else {})}

        def ev(kind: str, tokens: int = 0, **fields: Any) -> _Event:
            return _Event(_sse({"type": kind, **fields}, event=kind), tokens)

        start_message = {**message, "content": [], "stop_reason": None}
        if beh.usage:  # message_start carries the input side and a placeholder output count
            start_message["usage"] = {**usage, "output_tokens": 1}
            start_message["usage"].pop("output_tokens_details", None)
        events = [ev("message_start", message=start_message)]
        index = 0
        if beh.thinking is not None:
            events += [
                ev("content_block_start", index=index,
                   content_block={"type": "thinking", "thinking": "", "signature": ""}),
                ev("content_block_delta", index=index,
                   delta={"type": "thinking_delta", "thinking": beh.thinking}),
                ev("content_block_delta", index=index,
                   delta={"type": "signature_delta", "signature": signature}),
                ev("content_block_stop", index=index),
            ]  # fmt: skip
            index += 1
        events += [
            ev("content_block_start", index=index, content_block={"type": "text", "text": ""}),
            ev("ping"),
        ]
        reasoning_due = plan.reasoning
        for text, tokens in plan.pieces:
            events.append(
                ev(
                    "content_block_delta",
                    tokens + reasoning_due,
                    index=index,
                    delta={"type": "text_delta", "text": text},
                )
            )
            reasoning_due = 0
        events.append(ev("content_block_stop", index=index))
        for call_id, name, args in calls:
            index += 1
            events += [
                ev("content_block_start", index=index, content_block={
                    "type": "tool_use", "id": call_id.replace("call_", "toolu_"), "name": name,
                    "input": {}}),
                ev("content_block_delta", index=index,
                   delta={"type": "input_json_delta", "partial_json": args}),
                ev("content_block_stop", index=index),
            ]  # fmt: skip
        delta_usage: dict[str, Any] = {"output_tokens": plan.output}
        if plan.reasoning:
            delta_usage["output_tokens_details"] = {"thinking_tokens": plan.reasoning}
        events += [
            ev(
                "message_delta",
                reasoning_due,
                delta={"stop_reason": stop_reason, "stop_sequence": None},
                **({"usage": _reported(beh, delta_usage)} if beh.usage else {}),
            ),
            ev("message_stop"),
        ]
        return events

    def _stream_error_event(self, provider: str, beh: Behaviour) -> bytes:
        if provider == "anthropic":
            return _sse(
                {
                    "type": "error",
                    "error": {
                        "type": beh.error_type or "overloaded_error",
                        "message": beh.error_message or "Overloaded",
                    },
                },
                event="error",
            )
        error = {
            "message": beh.error_message
            or "The server had an error while processing your request.",
            "type": beh.error_type or "server_error",
            "param": None,
            "code": beh.error_code,
        }
        return _sse({"error": error})

    def error_body(
        self, provider: str, status: int, beh: Behaviour | None = None
    ) -> dict[str, Any]:
        """The JSON error body the fake answers ``status`` with, in ``provider``'s shape."""
        beh = beh or Behaviour()
        if provider == "anthropic":
            kind, message = _ANTHROPIC_ERRORS.get(
                status,
                ("api_error" if status >= 500 else "invalid_request_error", f"Error {status}."),
            )
            return {
                "type": "error",
                "error": {"type": beh.error_type or kind, "message": beh.error_message or message},
                "request_id": f"req_fake{self._new_id():08d}",
            }
        kind, code, message = _OPENAI_ERRORS.get(
            status,
            (
                "server_error" if status >= 500 else "invalid_request_error",
                None,
                f"Error {status}.",
            ),
        )
        return {
            "error": {
                "message": beh.error_message or message,
                "type": beh.error_type or kind,
                "param": None,
                "code": beh.error_code if beh.error_code is not None else code,
            }
        }


def _fake_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw = b""
    counter = 0
    while len(raw) < dims * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [
        (int.from_bytes(raw[i * 4 : i * 4 + 4], "big") / 0xFFFFFFFF) * 2 - 1 for i in range(dims)
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        owner: FakeLLMServer,
    ):
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECT_ERRORS):
            return  # a client that went away: not worth a traceback
        logger.error("FakeLLMServer: unexpected error serving %s", client_address, exc_info=exc)


class _ClientGone(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = "otel-budget-fake-llm/1"
    sys_version = ""
    disable_nagle_algorithm = True  # TCP_NODELAY
    timeout = 120  # idle keep-alive connections are closed after this
    server: _HTTPServer

    # -- plumbing --

    def setup(self) -> None:
        super().setup()
        owner = self.server.owner
        with owner._lock:
            owner._connections[self.connection] = threading.current_thread()
            owner._stats["connections"] += 1

    def finish(self) -> None:
        try:
            super().finish()
        except _DISCONNECT_ERRORS:
            pass
        finally:
            owner = self.server.owner
            with owner._lock:
                owner._connections.pop(self.connection, None)

    def handle(self) -> None:
        try:
            super().handle()
        except _DISCONNECT_ERRORS:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_POST(self) -> None:
        self._dispatch()

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _wait(self, seconds: float) -> None:
        """Sleep, but give up at once if the server stops."""
        if seconds > 0 and self.server.owner._stop_event.wait(seconds):
            raise _ClientGone("server stopping")

    def _client_gone(self) -> bool:
        try:
            if hasattr(select, "poll"):  # select() fails on a descriptor >= 1024 (a busy server)
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable: Any = poller.poll(0)
            else:  # pragma: no cover - Windows
                readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send_json(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _abort(self) -> None:
        """Close the connection now (FIN, so the client still reads what was sent)."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except _DISCONNECT_ERRORS:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the request --

    def _dispatch(self) -> None:
        owner = self.server.owner
        raw_path = self.path.split("?", 1)[0].rstrip("/") or "/"
        path = raw_path if raw_path.startswith("/v1/") or raw_path == "/v1" else "/v1" + raw_path
        route = _ROUTES.get(path)
        api = route[1] if route else None
        anthropic = api in ("messages", "count_tokens") or "anthropic-version" in self.headers
        provider = "anthropic" if anthropic else "openai"
        record = CallRecord(
            method=self.command,
            path=path,
            api=api,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=None,
            started=time.monotonic(),
        )
        owner._begin(record)
        try:
            raw = self._read_body()
            try:
                record.body = json.loads(raw) if raw else {}
            except ValueError:
                record.body = raw.decode("utf-8", "replace")
            if route is None or route[0] != self.command:
                if route is None:
                    owner._note_error(record, 404, "not_found")
                else:
                    owner._note_error(record, 405)
                body = owner.error_body(provider, record.status)
                body["error"]["message"] = f"Unknown request URL: {self.command} {self.path}."
                if provider == "openai":
                    body["error"]["code"] = "unknown_url"
                self._send_json(record.status, body, self._request_id_headers(provider))
                return
            self._serve(api or "", provider, record)
        except _ClientGone:
            self._abort()
            if not record.billed:
                record.outcome = "stopped" if owner._stop_event.is_set() else "client_disconnect"
        except _DISCONNECT_ERRORS:
            self.close_connection = True
            if not record.billed and record.outcome == "ok":
                record.outcome = "client_disconnect"
        except Exception:  # a bug in the fake: answer 500 rather than hang the client
            logger.exception("FakeLLMServer: error handling %s %s", self.command, self.path)
            owner._note_error(record, 500)
            try:
                self._send_json(500, owner.error_body(provider, 500))
            except _DISCONNECT_ERRORS:
                self.close_connection = True
        finally:
            owner._end(record)

    def _request_id_headers(self, provider: str) -> dict[str, str]:
        rid = f"req_fake{self.server.owner._new_id():08d}"
        return {"request-id": rid} if provider == "anthropic" else {"x-request-id": rid}

    def _serve(self, api: str, provider: str, record: CallRecord) -> None:
        owner = self.server.owner
        body = record.body
        if api == "models":
            record.status = 200
            if provider == "anthropic":
                data = [
                    {
                        "type": "model",
                        "id": m,
                        "display_name": m,
                        "created_at": "2025-01-01T00:00:00Z",
                    }
                    for m in owner.prices
                ]
                reply: Any = {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                }
            else:
                reply = {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                        for m in owner.prices
                    ],
                }
            self._send_json(200, reply, self._request_id_headers(provider))
            return
        if not isinstance(body, dict):
            owner._note_error(record, 400)
            err = owner.error_body(
                provider, 400, Behaviour(error_message="The request body is not valid JSON.")
            )
            self._send_json(400, err, self._request_id_headers(provider))
            return
        if isinstance(body.get("model"), str) and body["model"]:
            record.model = body["model"]
            owner._note_model(record)
        record.stream = bool(body.get("stream"))
        if api == "count_tokens":
            record.status = 200
            self._send_json(
                200,
                {"input_tokens": count_input_tokens(body, "messages")},
                self._request_id_headers(provider),
            )
            return
        beh = owner._next_behaviour(record.path)
        record.behaviour = beh
        self._wait(owner.latency_s + max(0.0, beh.delay_s))
        headers = self._request_id_headers(provider)
        headers.update(beh.headers or {})
        retry_after = beh.retry_after
        if retry_after is None and beh.status == 429:
            retry_after = owner.default_retry_after_s
        if retry_after is not None:
            headers["retry-after"] = str(max(0, math.ceil(retry_after)))
            headers["retry-after-ms"] = str(max(0, round(retry_after * 1000)))
        if beh.status >= 400:
            if self._client_gone():
                raise _ClientGone("client timed out")
            owner._note_error(record, beh.status)
            self._send_json(beh.status, owner.error_body(provider, beh.status, beh), headers)
            return
        try:
            plan = owner._plan(api, body, beh)
        except _BadRequest as exc:
            owner._note_error(record, 400)
            self._send_json(
                400, owner.error_body(provider, 400, Behaviour(error_message=str(exc))), headers
            )
            return
        rid = owner._new_id()
        if api == "embeddings":
            rendered: Any = owner._render_embeddings(body, plan, beh)
            record.stream = False
        elif api in ("chat", "completions"):
            rendered = owner._render_chat(api, body, plan, beh, rid)
        elif api == "responses":
            rendered = owner._render_responses(body, plan, beh, rid)
        else:
            rendered = owner._render_messages(body, plan, beh, rid)
        if beh.drop_connection:  # generated and billed, but the answer is lost in transit
            owner._bill(record, plan, plan.output, "dropped")
            self._abort()
            return
        if self._client_gone():
            if owner.bill_abandoned:
                owner._bill(record, plan, 0 if isinstance(rendered, list) else plan.output,
                            "client_disconnect")  # fmt: skip
            raise _ClientGone("client timed out")
        record.status = 200
        if isinstance(rendered, list):
            self._stream(rendered, provider, plan, beh, record, headers)
        else:
            owner._bill(record, plan, plan.output, "ok")
            self._send_json(200, rendered, headers)

    def _stream(
        self,
        events: list[_Event],
        provider: str,
        plan: _Plan,
        beh: Behaviour,
        record: CallRecord,
        headers: Mapping[str, str],
    ) -> None:
        owner = self.server.owner
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        delay = owner.chunk_delay_s if beh.chunk_delay_s is None else beh.chunk_delay_s
        sent_tokens = 0
        last = len(events) - 1
        try:
            for index, event in enumerate(events):
                if beh.break_stream_after is not None and index >= beh.break_stream_after:
                    owner._bill(record, plan, sent_tokens, "broken_stream")
                    self._abort()
                    return
                if beh.stream_error_after is not None and index >= beh.stream_error_after:
                    owner._bill(record, plan, sent_tokens, "stream_error")
                    self._write_chunk(owner._stream_error_event(provider, beh))
                    break
                if index and delay:
                    self._wait(delay)
                if index == last:  # bill before the client can see the stream end
                    owner._bill(record, plan, sent_tokens + event.tokens, "ok")
                self._write_chunk(event.data)
                sent_tokens += event.tokens
            self.wfile.write(b"0\r\n\r\n")
        except (_ClientGone, *_DISCONNECT_ERRORS):
            self._abort()
            if not record.billed:
                outcome = "stopped" if owner._stop_event.is_set() else "client_disconnect"
                owner._bill(record, plan, sent_tokens, outcome)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
