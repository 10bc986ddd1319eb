"""The prompt cache as a step of the one metered LLM path: look up, serve a hit, store a miss.

    request.cache = plan_for(cache, request, "chat", runtime)   # the wrapper: None when off
    call = start_call(tracer, request, kwargs, runtime=runtime) # looks the key up first
    # a hit: a span marked otel_budget.cache.hit=true, no reservation; the SDK's attempt
    # hook (``_attempts``) answers with the cached body instead of the network, so the SDK
    # parses it into its own types (a stream as a stream);
    # a miss: an ordinary call; its 2xx body (a stream's bytes, teed) is stored once the
    # call settled successfully.

Why the raw HTTP body and not the parsed object: the SDK builds the caller's object from
the body exactly as it does live (``ChatCompletion``, ``Message``, ``Stream``, ``with_raw_
response``, the stream helpers' events, ``.parse()``'s validation), so a hit is the SDK's own
type whatever its version, and nothing of ours has to know how to rebuild one. The entry
format (``otel_budget.cache.base``) is checked on every read: anything but a complete,
successful answer stored under this very key is a miss.

Cost: a hit's span reports ``otel_budget.cost.usd`` 0 and ``otel_budget.cache.saved_usd``
(the cached usage priced as the request's model: an entry cannot inflate it by claiming
another model); it has no ``gen_ai.usage.*`` (the provider billed no tokens now: the cached
counts are ``otel_budget.cache.input_tokens`` / ``output_tokens``), takes no reservation and
makes no ledger operation, so it is answered even when the budget is spent.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from otel_budget import attributes as attrs
from otel_budget.cache.base import (
    CONTENT_JSON,
    CONTENT_SSE,
    Entry,
    decode,
    encode,
    valid_json,
    valid_stream,
)
from otel_budget.cache.response_cache import ResponseCache
from otel_budget.instrumentation._flow import Flow, send, step
from otel_budget.money import to_usd

if TYPE_CHECKING:
    from otel_budget.instrumentation._call import LLMCall, LLMRequest
    from otel_budget.runtime import BudgetRuntime, RuntimeSource

#: A response header a hit carries (``with_raw_response`` callers can tell).
HIT_HEADER = "x-otel-budget-cache"
_USAGE_MOVED = (
    (attrs.GEN_AI_USAGE_INPUT_TOKENS, attrs.CACHE_INPUT_TOKENS),
    (attrs.GEN_AI_USAGE_OUTPUT_TOKENS, attrs.CACHE_OUTPUT_TOKENS),
)
_NOT_ON_A_HIT = (
    attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS,
    attrs.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, attrs.COST_ESTIMATED, attrs.USAGE_INPUT_TOKENS,
    attrs.USAGE_OUTPUT_TOKENS, attrs.GEN_AI_USAGE_COST_AMOUNT, attrs.GEN_AI_USAGE_COST_CURRENCY,
    attrs.GEN_AI_USAGE_COST_SOURCE, attrs.COST_SOURCE, attrs.COST_PRICE_DELTA_USD,
)  # fmt: skip


class Tee:
    """The bytes of a streamed body as the SDK read them (bounded). Whether they are a
    complete answer is decided from the bytes (``valid_stream``: the endpoint's last event,
    on an event boundary): the SDKs stop reading at that event."""

    __slots__ = ("chunks", "size", "limit")

    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit

    def add(self, chunk: bytes) -> None:
        if self.size <= self.limit:
            self.chunks.append(chunk)
        self.size += len(chunk)

    def body(self) -> bytes | None:
        if self.size > self.limit:
            return None
        return b"".join(self.chunks)


class CachePlan:
    """One request's cache key and outcome: ``entry`` is the hit (None: a miss)."""

    __slots__ = ("cache", "key", "provider", "kind", "stream", "entry", "storable", "tee")

    def __init__(self, cache: ResponseCache, key: str, provider: str, kind: str, stream: bool) -> None:
        self.cache = cache
        self.key = key
        self.provider = provider
        self.kind = kind
        self.stream = stream
        self.entry: Entry | None = None
        self.storable = True  # False: the budget lowered the output cap (an answer cut short)
        self.tee: Tee | None = None

    def lookup_flow(self) -> Flow[None]:
        """Read the entry (one definition for both drivers); a backend error is a miss."""
        backend = self.cache.backend
        self.entry, self.tee, self.storable = None, None, True  # (a request sent again)
        try:
            blob = yield step(backend.get, backend.aget, self.key)
        except Exception as exc:
            _log(self.cache, "cache get", exc)
            blob = None
        if blob is not None:
            self.entry = decode(blob, self.key, self.provider, self.kind, self.stream)
        return None


def cache_of(source: RuntimeSource, runtime: BudgetRuntime | None) -> ResponseCache | None:
    """The cache of an instrumentor's calls: its own (``instrument(cache=...)``), else its
    runtime's (``BudgetInstrumentor().instrument(cache=...)``, ``OTEL_BUDGET_CACHE``)."""
    cache = source.cache
    return cache if cache is not None else getattr(runtime, "cache", None)


def plan_for(
    cache: ResponseCache | None, request: LLMRequest, kind: str, runtime: BudgetRuntime | None
) -> CachePlan | None:
    """The cache plan of a request (None: no cache, disabled here, or not cacheable)."""
    if cache is None or request.params is None:
        return None
    try:
        params = dict(request.params)
        params.pop("stream", None)  # in the identity: create(stream=True) and stream() share
        if runtime is not None:  # what the request gets when it names no output cap
            params["$default_max_output_tokens"] = runtime.settings.default_max_output_tokens
        key = cache.key_for(
            request.provider, f"{kind}+stream" if request.stream else kind, params,
            request.server_address, request.server_port,
        )  # fmt: skip
    except Exception as exc:
        _log(cache, "cache key", exc)
        return None
    if key is None:
        return None
    return CachePlan(cache, key, request.provider, kind, request.stream)


def _log(cache: ResponseCache, site: str, exc: BaseException) -> None:
    log = getattr(cache.backend, "log", None)
    if log is None:
        from otel_budget.logs import RateLimitedLog

        log = _FALLBACK_LOG.setdefault("log", RateLimitedLog())
    log(site, exc)


_FALLBACK_LOG: dict[str, Any] = {}


# -- serving a hit at the SDK's attempt layer -------------------------------------------------------
def _http_response(request: Any, entry: Entry) -> Any:
    """The SDK's HTTP response type (httpx2 or httpx, from the request's module), holding the
    cached body: the SDK parses it as a live answer."""
    module = sys.modules.get(type(request).__module__)
    response_type = getattr(module, "Response", None)
    if response_type is None:  # pragma: no cover - an HTTP library we do not know
        raise TypeError(f"cannot build a response for {type(request).__qualname__}")
    headers = {"content-type": entry.content_type, HIT_HEADER: "hit"}
    return response_type(200, headers=headers, content=entry.body, request=request)


def serve_flow(instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any], entry: Entry) -> Flow[Any]:
    """What the SDK's attempt method would have returned, from the cache: openai's
    ``_send_request(request, stream=...)`` returns the response; anthropic's
    ``_attempt_request(options, ...)`` prepares and builds the request (nothing is sent) and
    returns ``(response, options)``."""
    target = args[0] if args else kwargs.get("request", kwargs.get("options"))
    if not hasattr(target, "json_data"):  # an HTTP request (openai's attempt layer)
        return _http_response(target, entry)
    options = yield send(instance._prepare_options, (target,))
    request = instance._build_request(options, retries_taken=kwargs.get("retries_taken", 0))
    return _http_response(request, entry), options


def unusable_hit(call: LLMCall) -> bool:
    """The SDK raised on a cached answer (an entry that passed our checks but not its own):
    True for a hit, whose caller then gets the ordinary call instead (logged once)."""
    plan = call.cache
    if plan is None or plan.entry is None:
        return False
    _log(plan.cache, "cache entry unusable", ValueError("the SDK rejected a cached answer"))
    _add_to_runs(call, hits=-1, misses=1)  # answered by the ordinary call that follows
    return True


# -- a miss: the body to store ----------------------------------------------------------------------
def watch(plan: CachePlan, response: Any) -> None:
    """A 2xx answer to a cacheable miss: when its body is still streaming, tee the bytes the
    SDK reads (the SDK reads ``iter_bytes`` / ``aiter_bytes``; ``read()`` goes through them)."""
    if response is None or getattr(response, "is_closed", True):
        return
    tee = plan.tee = Tee(plan.cache.max_entry_bytes)
    sync_bytes: Callable[..., Iterator[bytes]] = response.iter_bytes
    async_bytes: Callable[..., AsyncIterator[bytes]] = response.aiter_bytes

    def iter_bytes(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        for chunk in sync_bytes(*args, **kwargs):
            tee.add(chunk)
            yield chunk

    async def aiter_bytes(*args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        async for chunk in async_bytes(*args, **kwargs):
            tee.add(chunk)
            yield chunk

    try:
        response.iter_bytes = iter_bytes
        response.aiter_bytes = aiter_bytes
    except Exception:  # a response type that refuses: not stored
        plan.tee = None


def _miss_body(call: LLMCall, plan: CachePlan) -> bytes | None:
    if plan.tee is not None:
        return plan.tee.body()
    response = call.response
    if response is None or not getattr(response, "is_closed", False):
        return None
    return response.content  # type: ignore[no-any-return]


def store(call: LLMCall, plan: CachePlan, out: dict[str, Any]) -> None:
    """A miss that settled successfully: store its body when it is a complete answer the
    provider reported usage for, and not cut short by the budget's cap. Never raises."""
    try:
        if plan.entry is not None or not (
            plan.storable and call.answered_ok and attrs.GEN_AI_USAGE_INPUT_TOKENS in out
        ):  # (a hit stores nothing)
            return
        body = _miss_body(call, plan)
        if not body or len(body) > plan.cache.max_entry_bytes:
            return
        valid = valid_stream(body, plan.kind) if plan.stream else valid_json(body)
        if not valid:
            return
        entry = Entry(plan.key, plan.provider, plan.kind, plan.stream,
                      CONTENT_SSE if plan.stream else CONTENT_JSON, body)  # fmt: skip
        plan.cache.backend.set_nowait(plan.key, encode(entry), plan.cache.ttl_seconds)
    except Exception as exc:
        _log(plan.cache, "cache store", exc)


# -- telemetry --------------------------------------------------------------------------------------
def _labels(call: LLMCall) -> dict[str, Any]:
    request = call.request
    return {
        attrs.GEN_AI_OPERATION_NAME: request.operation,
        attrs.GEN_AI_PROVIDER_NAME: request.provider,
        attrs.GEN_AI_REQUEST_MODEL: request.model,
    }


def _add_to_runs(call: LLMCall, hits: int = 0, misses: int = 0, saved: int = 0) -> None:
    """Add to the cache totals of every run the call reports to (``report()``, root span)."""
    charge = call.budgeted.charge
    for stats in charge.stats if charge is not None else ():
        stats.add_cache(hits, misses, saved)


def started(call: LLMCall, plan: CachePlan) -> None:
    """Count the lookup's outcome in the run's report and the metrics."""
    call.cache = plan
    hit = plan.entry is not None
    _add_to_runs(call, hits=1 if hit else 0, misses=0 if hit else 1)
    runtime = call.processor
    if runtime is not None:
        try:
            runtime.metrics.record_cache(_labels(call), hit)
        except Exception as exc:
            runtime.engine.log_once("metrics", exc)


def settle_hit(call: LLMCall, out: dict[str, Any], saved: int) -> None:
    """A hit's span attributes (cost 0, what it saved, the cached token counts instead of
    ``gen_ai.usage.*``) and its saving in the report and metrics."""
    for standard, ours in _USAGE_MOVED:
        if standard in out:
            out[ours] = out.pop(standard)
    for name in _NOT_ON_A_HIT:
        out.pop(name, None)
    out[attrs.CACHE_SAVED_USD] = to_usd(saved)
    _add_to_runs(call, saved=saved)
    runtime = call.processor
    if runtime is not None and saved:
        try:
            runtime.metrics.record_cache(_labels(call), True, to_usd(saved))
        except Exception as exc:
            runtime.engine.log_once("metrics", exc)


__all__ = [
    "HIT_HEADER",
    "CachePlan",
    "Tee",
    "cache_of",
    "plan_for",
    "serve_flow",
    "settle_hit",
    "started",
    "store",
    "unusable_hit",
    "watch",
]
