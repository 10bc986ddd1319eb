"""The cache backends' one small interface, and the format of a cached entry.

    >>> from otel_budget.cache.base import Entry, decode, encode
    >>> blob = encode(Entry("k1", "openai", "chat", False, "application/json", b'{"id": "x"}'))
    >>> decode(blob, "k1", "openai", "chat", False).body
    b'{"id": "x"}'
    >>> decode(blob, "another key", "openai", "chat", False) is None   # copied elsewhere: a miss
    True

A backend only stores bytes under string keys, with a TTL (modelled on the ``limits`` library
and on ``otel_budget.storage``: deciding *what* is cached and under which key is the
``ResponseCache``'s job). Every method has an ``a``-prefixed coroutine twin, so the async
wrappers never block an event loop; ``set_nowait`` stores off the caller's path (the Redis
backend queues it to a writer thread).

An entry is the raw HTTP body the provider answered (a JSON document, or the whole SSE byte
stream of a streamed answer) behind a small header that names the key it was stored under,
the provider, the endpoint and whether it is a stream. ``decode`` checks all of it: an entry
read under another key (copied across tenants), for another endpoint or shape, truncated,
or not what a successful answer looks like is ``None`` (a miss), never an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAGIC = b"otel-budget-cache/1\n"
_HEADER_LEN = 4
_MAX_HEADER = 4096
CONTENT_JSON = "application/json"
CONTENT_SSE = "text/event-stream"

# What ends a complete stream, by endpoint kind: an entry without it was cut short.
_STREAM_END = {
    "chat": "[DONE]",
    "completions": "[DONE]",
    "responses": "response.completed",
    "messages": "message_stop",
}


@dataclass(frozen=True)
class Entry:
    """One cached answer: the raw body and what it answered."""

    key: str
    provider: str
    kind: str  # the endpoint: chat, responses, completions, embeddings, messages
    stream: bool
    content_type: str
    body: bytes


def encode(entry: Entry) -> bytes:
    header = json.dumps({
        "key": entry.key, "provider": entry.provider, "kind": entry.kind,
        "stream": entry.stream, "content_type": entry.content_type,
    }, separators=(",", ":")).encode()  # fmt: skip
    return MAGIC + len(header).to_bytes(_HEADER_LEN, "big") + header + entry.body


def decode(blob: Any, key: str, provider: str, kind: str, stream: bool) -> Entry | None:
    """The entry in ``blob`` when it is a complete, successful answer stored under ``key``
    for this provider, endpoint and shape; otherwise None. Never raises."""
    try:
        if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(MAGIC):
            return None
        start = len(MAGIC)
        size = int.from_bytes(blob[start : start + _HEADER_LEN], "big")
        if not 0 < size <= _MAX_HEADER:
            return None
        header = json.loads(blob[start + _HEADER_LEN : start + _HEADER_LEN + size])
        body = bytes(blob[start + _HEADER_LEN + size :])
        if (
            not isinstance(header, dict) or header.get("key") != key
            or header.get("provider") != provider or header.get("kind") != kind
            or header.get("stream") is not stream or not body
        ):  # fmt: skip
            return None
        content_type = CONTENT_SSE if stream else CONTENT_JSON
        if header.get("content_type") != content_type:
            return None
        if not (valid_stream(body, kind) if stream else valid_json(body)):
            return None
        return Entry(key, provider, kind, stream, content_type, body)
    except Exception:
        return None


def valid_json(body: bytes) -> bool:
    """A successful JSON answer: one object, with no ``error`` (a Responses object carries
    ``"error": null``)."""
    try:
        document = json.loads(body)
    except Exception:
        return False
    return isinstance(document, dict) and not document.get("error")


def _events(body: bytes) -> list[tuple[str | None, str]] | None:
    """The (event, data) pairs of an SSE body; None when it does not end on an event
    boundary (cut short)."""
    text = body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n\n"):
        return None
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        events.append((name, "\n".join(data)))
    return events


def valid_stream(body: bytes, kind: str) -> bool:
    """A complete, successful SSE answer: every event's data is JSON (or ``[DONE]``), none
    is an error, and the endpoint's last event is there."""
    try:
        events = _events(body)
    except Exception:
        return False
    if not events:
        return False
    end = _STREAM_END.get(kind)
    ended = False
    for name, data in events:
        if name == "error":
            return False
        if data == "[DONE]":
            ended = ended or end == "[DONE]"
            continue
        if not data:
            continue
        try:
            document = json.loads(data)
        except Exception:
            return False
        if not isinstance(document, dict) or document.get("error"):
            return False
        kind_of = document.get("type")
        if kind_of in ("error", "response.failed", "response.incomplete"):
            return False
        if end is not None and (kind_of == end or name == end):
            ended = True
    return ended or end is None


class CacheBackend:
    """Bytes under string keys, with a TTL. ``get`` returns None for a missing or expired
    key; every method may raise on an outage (the ``ResponseCache`` turns that into a
    miss). The ``a``-prefixed twins default to the blocking method (right for an in-memory
    backend, which never waits)."""

    def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def set(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def clear(self, prefix: str = "") -> int:
        """Remove every key that is ``prefix`` followed by text without ``:`` (the keys of one
        namespace, not those of a namespace nested under it); returns how many."""
        raise NotImplementedError

    def set_nowait(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        """Store off the caller's path when the backend can (default: ``set``)."""
        self.set(key, value, ttl_seconds)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what ``set_nowait`` queued is stored; True when it is."""
        return True

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl_seconds: float | None = None) -> None:
        self.set(key, value, ttl_seconds)

    async def adelete(self, key: str) -> None:
        self.delete(key)

    async def aclear(self, prefix: str = "") -> int:
        return self.clear(prefix)

    def close(self) -> None:
        return None


__all__ = [
    "CONTENT_JSON",
    "CONTENT_SSE",
    "CacheBackend",
    "Entry",
    "decode",
    "encode",
    "valid_json",
    "valid_stream",
]
