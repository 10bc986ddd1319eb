"""Small readers shared by the provider patches: SDK objects and dicts alike.

    usage = get(response, "usage")                  # works on a pydantic model or a dict
    tokens = nonneg_int(get(usage, "prompt_tokens"))
    params = given(kwargs)                          # without the SDKs' omit/NOT_GIVEN
    sent = RequestParams(kwargs)                    # what the request sends, extra_body merged
    sent.materialise("messages", "tools")           # one-shot iterators become lists, once

``ChatChunkAccumulator`` reads OpenAI-compatible chat stream chunks (the openai SDK's and
LiteLLM's), for the stream proxies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from operator import itemgetter
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.costing import reported_usd
from otel_budget.instrumentation._finish_reasons import normalize_finish_reasons
from otel_budget.pricing import TokenUsage
from otel_budget.token_output import token_limit as _count
from otel_budget.tokens import InputEstimate

_SENTINELS = ("Omit", "NotGiven")


def given(kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs without the SDKs' ``omit`` / ``NOT_GIVEN`` sentinels (their helpers pass every
    parameter, given or not)."""
    return {k: v for k, v in kwargs.items() if type(v).__name__ not in _SENTINELS}


def is_given(value: Any) -> bool:
    return value is not None and type(value).__name__ not in _SENTINELS


# -- what a request sends -------------------------------------------------------------------
OUTPUT_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_MATERIALISE_DEPTH = 8
_STR_ONLY = frozenset((str,))


def materialised(value: Any, depth: int = 0) -> Any:
    """``value`` with every one-shot iterator in it (a generator of messages, a content
    generator inside a message dict) turned into a list; the same object when there is none.
    Containers holding one are copied, never changed in place (they are the caller's)."""
    kind = type(value)
    if kind is str or depth > _MATERIALISE_DEPTH:  # (exact types first: runs per node)
        return value
    if kind is dict:
        return _materialised_dict(value, depth)
    if kind is list or kind is tuple:  # (before the Iterator check: an ABC's, Python-level)
        for item in value:  # flat chat messages (dicts of strings) hold none: checked in C
            if type(item) is not dict or not _STR_ONLY.issuperset(map(type, item.values())):
                break
        else:
            return value
        items = [materialised(v, depth + 1) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return items if kind is list else tuple(items)
        return value
    if isinstance(value, (str, bytes, bytearray)):
        return value
    if isinstance(value, Iterator):
        value = list(value)
        items = [materialised(v, depth + 1) for v in value]
        return items if any(a is not b for a, b in zip(items, value, strict=True)) else value
    if isinstance(value, (list, tuple)):
        items = [materialised(v, depth + 1) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return items if isinstance(value, list) else tuple(items)
        return value
    return value


def _materialised_dict(value: dict[Any, Any], depth: int) -> dict[Any, Any]:
    """``materialised`` of a dict: copied only when a value changes (most hold none)."""
    changed: dict[Any, Any] | None = None
    for key, item in value.items():
        new = item if type(item) is str else materialised(item, depth + 1)
        if new is not item and changed is None:
            changed = dict(value)  # (each value materialised once: an iterator is read once)
        if changed is not None:
            changed[key] = new
    return value if changed is None else changed


class RequestParams:
    """What a request sends: the SDK call's kwargs with ``extra_body`` merged over them, as the
    openai and anthropic SDKs (and litellm, which hands it to them) merge it into the JSON body.

        sent = RequestParams(kwargs)
        sent.get("max_tokens")          # extra_body={"max_tokens": 3000} wins over the kwarg
        sent.set("max_tokens", 300)     # written where it takes effect

    The caller's ``extra_body`` dict is replaced in ``kwargs`` by a copy: a cap written into
    it never leaks into the next call that reuses the caller's dict.
    """

    __slots__ = ("_body_key", "extra", "kwargs", "params")

    def __init__(self, kwargs: dict[str, Any], body_key: str = "extra_body") -> None:
        self.kwargs = kwargs
        self._body_key = body_key
        extra = kwargs.get(body_key)
        if extra is not None and isinstance(extra, Mapping):
            extra = dict(extra)
            kwargs[body_key] = extra
        else:
            extra = None
        self.extra: dict[str, Any] | None = extra
        self.params: dict[str, Any] = given(kwargs)
        if extra:
            self.params.update((k, v) for k, v in extra.items() if type(v).__name__ not in _SENTINELS)

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Write ``key`` where the request sends it from: ``extra_body`` when it carries the
        key, and the kwargs when they do (both, so they agree); the kwargs otherwise."""
        written = False
        if self.extra is not None and key in self.extra:
            self.extra[key] = value
            written = True
        if not written or is_given(self.kwargs.get(key)):
            self.kwargs[key] = value
        self.params[key] = value

    def materialise(self, *keys: str) -> None:
        """Turn one-shot iterators under ``keys`` into lists, written back, so the SDK sends
        exactly what was projected (a generator read by the projection would be sent empty)."""
        for key in keys:
            value = self.params.get(key)
            if value is None:
                continue
            new = materialised(value)
            if new is not value:
                self.set(key, new)

    def output_writer(self, output_param: str) -> Callable[[dict[str, Any], int], bool]:
        """For ``LLMRequest.write_output``: the cap replaces every output limit the request
        carries (where it carries it), or goes in as ``output_param`` when it carries none.
        Returns True: the cap was written."""

        def write(kwargs: dict[str, Any], cap: int) -> bool:
            if kwargs is not self.kwargs:  # another body (a re-entered stream manager)
                kwargs[output_param] = cap
                return True
            present = [k for k in OUTPUT_KEYS if self.params.get(k) is not None]
            for key in present or [output_param]:
                self.set(key, cap)
            return True

        return write


def count_param(params: Mapping[str, Any], *names: str) -> tuple[int, str | None]:
    """``(n, problem)``: how many completions a request generates (OpenAI ``n``, legacy
    ``best_of``: each may use the whole output cap, each is billed), at least 1. A float or
    numeric string counts rounded up; a value that is no count (``n=True``, ``"eight"``) gives
    a problem to refuse the call with (see ``refuse_if``)."""
    n = 1
    for name in names:
        value = params.get(name)
        if not is_given(value):
            continue
        try:
            n = max(n, _count(name, value))
        except ValueError as exc:
            return 1, str(exc)
    return n, None


def refuse_if(problem: str | None, estimate: Callable[[], InputEstimate]) -> Callable[[], InputEstimate]:
    """An ``LLMRequest.estimate`` that raises ``ValueError(problem)`` when the reader found a
    parameter it cannot project: ``start_call`` refuses the call (``invalid_request``)."""
    if problem is None:
        return estimate

    def refuse() -> InputEstimate:
        raise ValueError(problem)

    return refuse


def with_history(
    estimate: Callable[[], InputEstimate], extra_tokens: int
) -> Callable[[], InputEstimate]:
    """``estimate`` plus input tokens the request does not carry (a stored history)."""
    if extra_tokens <= 0:
        return estimate

    def total() -> InputEstimate:
        base = estimate()
        return InputEstimate(base.tokens + extra_tokens, base.method)

    return total


def server_of(client: Any) -> tuple[str | None, int | None]:
    """``(server.address, server.port)`` of an SDK client, from its ``base_url`` (the port
    implied by the scheme when the URL names none)."""
    base_url = _base_url(client)
    if base_url is None:
        return None, None
    # Read once per URL object (httpx URLs are immutable; the entry holds the URL, so its id
    # is not reused while cached): parsing host and port is most of this function's cost.
    hit = _SERVERS.get(id(base_url))
    if hit is not None and hit[0] is base_url:
        return hit[1]
    port = getattr(base_url, "port", None)
    if port is None:
        port = 443 if getattr(base_url, "scheme", "https") == "https" else 80
    server = getattr(base_url, "host", None) or None, port
    if not isinstance(base_url, str):  # (a str is cheap to read and may be mutable-ish: no)
        if len(_SERVERS) >= 256:
            _SERVERS.clear()
        _SERVERS[id(base_url)] = (base_url, server)
    return server


_SERVERS: dict[int, tuple[Any, tuple[str | None, int | None]]] = {}
# Client classes whose ``base_url`` property returns the ``_base_url`` attribute as it is
# (openai's: ~5 us per read, an import statement inside), read directly; judged once per
# class from one read.
_PLAIN_BASE_URL: dict[type, bool] = {}


def _base_url(client: Any) -> Any:
    kind = type(client)
    plain = _PLAIN_BASE_URL.get(kind)
    if plain:
        url = getattr(client, "_base_url", None)
        if url is not None:
            return url
    base_url = getattr(client, "base_url", None)
    if plain is None and len(_PLAIN_BASE_URL) < 256:
        _PLAIN_BASE_URL[kind] = base_url is not None and base_url is getattr(client, "_base_url", None)
    return base_url


_MODEL_TYPES: dict[type, bool] = {}  # type -> a pydantic (v2) model?


def is_model(obj: Any) -> bool:
    """A pydantic v2 model instance (an SDK's parsed body), answered once per type."""
    kind = type(obj)
    known = _MODEL_TYPES.get(kind)
    if known is None:
        known = any(k.__name__ == "BaseModel" and k.__module__ == "pydantic.main"
                    for k in kind.__mro__)  # fmt: skip
        if len(_MODEL_TYPES) < 1024:
            _MODEL_TYPES[kind] = known
    return known


_CLASS_ATTRS: dict[tuple[type, str], bool] = {}


def _class_has(kind: type, name: str) -> bool:
    """``hasattr(kind, name)`` without pydantic's metaclass ``__getattr__`` (which raises for
    a miss), answered once per class and name."""
    key = (kind, name)
    known = _CLASS_ATTRS.get(key)
    if known is None:
        known = any(name in k.__dict__ for k in kind.__mro__)
        if len(_CLASS_ATTRS) < 4096:
            _CLASS_ATTRS[key] = known
    return known


def get(obj: Any, name: str) -> Any:
    """``obj[name]`` for a dict, ``obj.name`` otherwise; None when absent or unreadable."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    if name[:1] != "_" and is_model(obj):
        # A field or an extra, read where pydantic keeps it: an absent one (``usage.cost``,
        # asked of every body) would otherwise cost a raised and caught AttributeError in
        # pydantic's ``__getattr__``, ~50 times a present one. (Private attributes, such as
        # litellm's ``_hidden_params``, live elsewhere: read by ``getattr``.)
        fields = obj.__dict__
        if name in fields:
            return fields[name]
        extra = getattr(obj, "__pydantic_extra__", None)
        if extra and name in extra:
            return extra[name]
        if not _class_has(type(obj), name):  # no property or method of that name either
            return None
    try:
        return getattr(obj, name, None)
    except Exception:  # some pydantic models raise other errors for unknown fields
        return None


class Fields:
    """``get(obj, name)`` for several names at once: a parsed body's declared fields are read
    straight from the pydantic model's ``__dict__`` in one C call when it holds them all
    (what ``get`` returns for each), else name by name through ``get``.

        read = Fields("id", "model")
        rid, model = read(body)
    """

    __slots__ = ("_names", "_keys", "_pick")

    def __init__(self, *names: str) -> None:
        self._names = names
        self._keys = frozenset(names)
        pick = itemgetter(*names)
        self._pick = pick if len(names) > 1 else (lambda d: (pick(d),))

    def __call__(self, obj: Any) -> tuple[Any, ...]:
        if obj is not None and type(obj) is not dict and is_model(obj):
            fields = obj.__dict__
            if fields.keys() >= self._keys:
                return self._pick(fields)
        return tuple([get(obj, name) for name in self._names])


def usage_cost(body: Any) -> float | None:
    """The cost a provider reported in an OpenAI-shaped body's (or chunk's) ``usage.cost``
    (OpenRouter, in chat and Responses bodies and in a stream's usage chunk), in USD; None
    when there is none or it is no sane amount (``costing.reported_usd``)."""
    return reported_cost(get(body, "usage"))


def reported_cost(usage: Any) -> float | None:
    """``usage_cost`` of a body whose ``usage`` was read already."""
    return None if usage is None else reported_usd(get(usage, "cost"))


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
    present = numeric.keys() & params.keys()  # (most requests set none of them)
    if present:
        for key, name in numeric.items():
            if key in present:
                value = params[key]
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
    values of the wrong type are left out, finish reasons normalized
    (``_finish_reasons.normalize_finish_reason``)."""
    out: dict[str, Any] = {}
    if isinstance(rid, str):
        out[attrs.GEN_AI_RESPONSE_ID] = rid
    if isinstance(model, str):
        out[attrs.GEN_AI_RESPONSE_MODEL] = model
    if reasons:
        normalized = normalize_finish_reasons(reasons)
        if normalized:
            out[attrs.GEN_AI_RESPONSE_FINISH_REASONS] = normalized
    return out



class ChatChunkAccumulator:
    """Reads OpenAI-compatible chat completion chunks: text, tool-call arguments, finish
    reasons, the final usage chunk. ``delta_fields`` name the delta keys holding text;
    ``tier_attribute``, when given, is the span attribute of the service tier the chunks
    report (``openai.response.service_tier``)."""

    __slots__ = ("usage", "response_model", "units", "_parts", "_id", "_reasons",
                 "_read_usage", "_fields", "_capture", "_read_cost", "_cost", "_tier_attribute",
                 "_tier")  # fmt: skip

    def __init__(
        self,
        read_usage: Callable[[Any], TokenUsage | None],
        delta_fields: tuple[str, ...] = ("content", "refusal"),
        capture: Any = None,
        read_cost: Callable[[Any], float | None] = usage_cost,
        tier_attribute: str | None = None,
    ) -> None:
        self.usage: TokenUsage | None = None
        self.response_model: str | None = None
        self.units = 0
        self._parts: list[str] = []
        self._id: str | None = None
        self._reasons: list[str] = []
        self._read_usage = read_usage
        self._fields = delta_fields
        # A content collector (``_content.ChatStreamContent``): only when content is captured
        self._capture = capture
        self._read_cost = read_cost  # the cost a usage chunk reports (None: none)
        self._cost: float | None = None
        self._tier_attribute = tier_attribute
        self._tier: str | None = None

    def add(self, chunk: Any) -> None:
        # Runs for every chunk of every stream: plain getattr on SDK objects (the common
        # case), the generic reader only for dicts and odd shapes.
        g = get if type(chunk) is dict else _attr
        if self._id is None:
            rid = g(chunk, "id")
            self._id = rid if isinstance(rid, str) else None
            model = g(chunk, "model")
            self.response_model = model if isinstance(model, str) and model else None
        if self._tier is None and self._tier_attribute is not None:
            tier = g(chunk, "service_tier")
            self._tier = tier if isinstance(tier, str) and tier else None
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
            self._cost = self._read_cost(chunk)
        if self._capture is not None:
            self._capture.add(chunk)

    def text(self) -> str:
        return "".join(self._parts)

    def attributes(self) -> dict[str, Any]:
        out = response_attributes(self._id or None, self.response_model, self._reasons)
        if self._cost is not None:
            out[attrs.COST_PROVIDER_REPORTED_USD] = self._cost
        if self._capture is not None:
            self._capture.into(out)
        if self._tier is not None and self._tier_attribute is not None:
            out[self._tier_attribute] = self._tier
        return out


def usage_only(chunk: Any) -> bool:
    """The chunk ``include_usage`` adds at the end of a chat stream: usage, no choices."""
    return not get(chunk, "choices") and get(chunk, "usage") is not None
