"""The cache key of a request, and whether a request may be answered from the cache at all.

    >>> from otel_budget.cache.keys import request_key, Uncacheable
    >>> params = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
    ...           "temperature": 0}
    >>> key = request_key({"provider": "openai", "kind": "chat"}, params)
    >>> len(key), key == request_key({"provider": "openai", "kind": "chat"}, dict(params))
    (64, True)

The key is the blake2b digest (32 bytes, hex) of the canonical JSON (sorted keys, no spaces)
of everything that affects the answer: the provider, server and endpoint, the namespace and
tenant partition, and every request parameter (model, messages or input, system, tools,
tool_choice, response_format, temperature, top_p, seed, max tokens, stop, n, logit_bias,
reasoning, ...), ``extra_body`` merged in and ``extra_query`` included, except those that do
not change the answer (``IGNORED``); of ``extra_headers``, only the beta-feature ones
(``SEMANTIC_HEADERS``: the SDKs send ``betas=`` that way). A parameter we cannot serialise faithfully (a file
handle, an arbitrary object) makes the request uncacheable rather than risk two different
requests sharing a key. The key never holds prompt text and is never logged.

``refusal`` says why a request must go to the provider even with a cache: sampling (a
temperature that is not 0, or none given: every supported API samples by default) unless the
cache was told ``cache_sampled=True``; spoken (audio) output; server-side state (Responses'
``previous_response_id``, ``conversation``, ``background``, ``prompt`` templates, an explicit
``store=True``); server-side tools whose results change over time (web search and fetch, file
search, code execution, MCP, image generation).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

KEY_VERSION = 1
#: Request parameters that do not change the answer: left out of the key.
IGNORED = frozenset({
    "extra_headers", "extra_body", "timeout", "user", "safety_identifier", "metadata",
    "prompt_cache_key", "prompt_cache_retention", "idempotency_key",
})  # fmt: skip
#: Request headers that change the answer (beta features): in the key; no other header is.
SEMANTIC_HEADERS = ("anthropic-beta", "openai-beta")
_SENTINELS = frozenset({"NotGiven", "Omit", "_NotGiven", "NoneType_"})
_STATEFUL = ("previous_response_id", "conversation", "background", "prompt")
_CLIENT_TOOL_TYPES = frozenset({"function", "custom"})
_SERVER_TOOL_PREFIXES = (
    "web_search", "web_fetch", "file_search", "code_execution", "code_interpreter", "mcp",
    "image_generation", "local_shell", "container",
)  # fmt: skip


class Uncacheable(Exception):
    """A request parameter cannot be put in a key faithfully."""


def _canonical(value: Any, depth: int = 0) -> Any:
    if depth > 64:
        raise Uncacheable("nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise Uncacheable("not a finite number")
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise Uncacheable("a non-string key")
            if type(v).__name__ in _SENTINELS:
                continue
            out[k] = _canonical(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": hashlib.blake2b(bytes(value), digest_size=32).hexdigest()}
    if isinstance(value, type):
        schema = getattr(value, "model_json_schema", None)
        if callable(schema):  # a pydantic model class (``parse(response_format=Model)``)
            return {"$schema": f"{value.__module__}.{value.__qualname__}",
                    "v": _canonical(schema(), depth + 1)}  # fmt: skip
        raise Uncacheable(f"a class: {value.__qualname__}")
    dump = getattr(value, "model_dump", None)
    if callable(dump):  # a pydantic object (a message of an earlier response)
        return {"$model": type(value).__qualname__,
                "v": _canonical(dump(mode="json", exclude_unset=True), depth + 1)}  # fmt: skip
    raise Uncacheable(f"a {type(value).__qualname__}")


def request_key(identity: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """The hex key of ``params`` (what the request sends) under ``identity`` (provider,
    endpoint, server, namespace, partition). Raises ``Uncacheable``."""
    material = {
        "v": KEY_VERSION,
        "id": _canonical(identity),
        "params": _canonical({k: v for k, v in params.items() if k not in IGNORED}),
        "headers": _canonical(_semantic_headers(params.get("extra_headers"))),
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=32).hexdigest()


def _semantic_headers(headers: Any) -> dict[str, Any]:
    if not isinstance(headers, Mapping):
        return {}
    return {
        str(k).lower(): v for k, v in headers.items()
        if isinstance(k, str) and k.lower() in SEMANTIC_HEADERS
    }  # fmt: skip


def _tool_type(tool: Any) -> str | None:
    if isinstance(tool, Mapping):
        kind = tool.get("type")
        return kind if isinstance(kind, str) else None
    return None


def refusal(params: Mapping[str, Any], kind: str, cache_sampled: bool) -> str | None:
    """Why this request must not be answered from the cache (None: it may be)."""
    if kind != "embeddings" and not cache_sampled:
        temperature = params.get("temperature")
        if temperature is None or type(temperature).__name__ in _SENTINELS:
            return "sampled (no temperature: the API samples)"
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature != 0:
            return "sampled (temperature > 0)"
    if params.get("audio") or "audio" in (params.get("modalities") or ()):
        return "audio output"
    if params.get("store") is True:
        return "store=True (server-side state)"
    for name in _STATEFUL:
        value = params.get(name)
        if value and type(value).__name__ not in _SENTINELS:
            return f"{name} (server-side state)"
    for name in ("web_search_options", "mcp_servers", "container"):
        value = params.get(name)
        if value is not None and type(value).__name__ not in _SENTINELS:  # ({} turns it on)
            return f"server-side tools ({name})"
    tools = params.get("tools")
    if isinstance(tools, (list, tuple)):
        for tool in tools:
            tool_type = _tool_type(tool)
            if tool_type is None or tool_type in _CLIENT_TOOL_TYPES:
                continue
            if tool_type.startswith(_SERVER_TOOL_PREFIXES):
                return f"server-side tool {tool_type}"
    return None


__all__ = ["IGNORED", "KEY_VERSION", "SEMANTIC_HEADERS", "Uncacheable", "refusal", "request_key"]
