"""The cost of an LLM call, from provider + model + token usage, in integer nano-USD.

    >>> from otel_budget.pricing import ModelPrice, PriceBook, TokenUsage
    >>> book = PriceBook(
    ...     overrides={"ollama/*": ModelPrice(input=0, output=0),          # local, free on purpose
    ...                "ft:gpt-4o*": ModelPrice(input="3.75", output=15)},  # USD per million tokens
    ...     aliases={"my-gpt4o-deployment": "gpt-4o"},                     # Azure deployment names
    ...     unknown_model="block",                                          # never price as free
    ... )
    >>> q = book.quote("openai", "gpt-4o-2024-08-06", TokenUsage(input_tokens=1_000, output_tokens=100))
    >>> q.nanos, q.source.startswith("genai-prices"), q.model
    (3500000, True, 'gpt-4o')
    >>> book.quote("azure.ai.openai", "my-gpt4o-deployment", TokenUsage(input_tokens=1_000)).nanos
    2500000

Prices come from ``genai-prices`` (bundled data, never its network updater) behind a thin layer:

1. **Overrides** (user table, ``"model"`` or ``"provider/model"`` keys, fnmatch globs) win.
2. **genai-prices**, after normalisation it does not do itself: OTel ``gen_ai.provider.name``
   values (``gcp.gen_ai``, ``azure.ai.openai``, ``x_ai`` ...) mapped to its provider ids;
   ``provider/`` prefixes (LiteLLM style), ``models/`` and ``publishers/*/models/`` (Google)
   stripped; ``server.address`` used to identify the host that bills; the provider dropped
   when the model is not listed under it.
3. The **unknown-model policy**: ``"block"`` (raise :class:`UnknownModelError`),
   ``"price_as:<model>"`` or a default :class:`ModelPrice`. An unknown model is never free.

Each (provider, model, server address, variant) is resolved once into a cached plan of integer
coefficients (``otel_budget.price_plans``); a cached quote is a dict lookup and eight integer
multiplications; misses are cached too. Audio tokens
(``TokenUsage.input_audio_tokens`` / ``output_audio_tokens``) pay the audio rates, with the
rates OpenAI bills for the gpt-4o(-mini) audio previews added where genai-prices lacks them.

The parts: ``price_types`` (the public types), ``price_names`` (provider and model name
normalisation), ``price_plans`` (the cached integer plans, genai-prices glue),
``price_files`` (JSON price tables); this module keeps the book and its policy.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from otel_budget.money import parse_usd
from otel_budget.price_files import read_price_file
from otel_budget.price_names import _BEDROCK_ID, _PROVIDER_IDS, _Names, is_glob, model_names
from otel_budget.price_plans import (
    _AUDIO_SUPPLEMENT,
    _PREMIUM_FACTOR,
    _TOKEN_KEYS,
    _compute,
    _epoch,
    _genai,
    _gp_usage,
    _linearise,
    _Plan,
    _probes,
    _scaled,
    _user_plan,
    _Variant,
    _variant,
    _with_audio_rates,
    genai_plan,
)
from otel_budget.price_types import (
    ModelPrice,
    Number,
    PriceQuote,
    TokenUsage,
    UnknownModelError,
    coerce_price,
)

__all__ = [
    "ModelPrice",
    "PriceBook",
    "PriceQuote",
    "TokenUsage",
    "UnknownModelError",
]
# Internals kept importable from here (tests and older imports use them).
_INTERNALS = (
    _AUDIO_SUPPLEMENT, _PREMIUM_FACTOR, _TOKEN_KEYS, _compute, _genai, _gp_usage, _linearise,
    _probes, _scaled, _with_audio_rates, Number,
)  # fmt: skip


_MEMO_SIZE = 256  # quotes kept per plan


class PriceBook:
    """Prices for LLM calls and tool calls. Thread-safe; build one and share it."""

    def __init__(
        self,
        *,
        overrides: Mapping[str, ModelPrice | Mapping[str, Number]] | None = None,
        aliases: Mapping[str, str] | None = None,
        unknown_model: str | ModelPrice | Mapping[str, Number] = "block",
        tools: Mapping[str, Number | Callable[[Any], Number]] | None = None,
        use_genai_prices: bool = True,
        cache_size: int = 4096,
    ) -> None:
        self._exact: dict[str, ModelPrice] = {}
        self._globs: list[tuple[str, ModelPrice]] = []
        for key, value in (overrides or {}).items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"override keys must be non-empty model names, got {key!r}")
            price = coerce_price(value, f"overrides[{key!r}]")
            k = key.strip().lower()
            if is_glob(k):
                self._globs.append((k, price))
            else:
                self._exact[k] = price

        self._aliases: dict[str, str] = {}
        for key, target in (aliases or {}).items():
            if not (isinstance(key, str) and key.strip() and isinstance(target, str) and target.strip()):
                raise ValueError(f"aliases must map model names to model names, got {key!r}: {target!r}")
            self._aliases[key.strip().lower()] = target.strip()

        self._tools: dict[str, int | Callable[[Any], Any]] = {}
        self._tool_globs: list[tuple[str, int | Callable[[Any], Any]]] = []
        for name, cost in (tools or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool names must be non-empty strings, got {name!r}")
            charge: int | Callable[[Any], Any]
            charge = cost if callable(cost) else parse_usd(cost, what=f"cost of tool {name!r}")
            if is_glob(name):
                self._tool_globs.append((name, charge))
            else:
                self._tools[name] = charge

        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self._cache_size = cache_size
        self._use_gp = bool(use_genai_prices)
        self._gp: Any = _genai() if self._use_gp else None  # the genai_prices module
        self._snapshot: Any = self._gp.get_snapshot() if self._gp else None
        self._source = f"genai-prices {self._gp.version}" if self._gp else ""
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._lock = threading.Lock()

        self._policy_price: ModelPrice | None = None
        self._policy_target: str | None = None
        if isinstance(unknown_model, str):
            policy = unknown_model.strip()
            if policy == "block":
                pass  # the default: _unknown() returns a blocked plan
            elif policy.startswith("price_as:") and policy[len("price_as:"):].strip():
                self._policy_target = policy[len("price_as:"):].strip()
                # Fail at configuration time, not on the first unknown model in production.
                if self._resolve(None, self._policy_target, None, _variant(None, False), time.time()) is None:
                    raise ValueError(
                        f"unknown_model={unknown_model!r}: {self._policy_target!r} has no price either; "
                        "name a model genai-prices knows or add an override for it"
                    )
            else:
                raise ValueError(
                    f"unknown_model must be 'block', 'price_as:<model>' or a ModelPrice, got {unknown_model!r}"
                )
        else:
            self._policy_price = coerce_price(unknown_model, "unknown_model")

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PriceBook:
        """Load a JSON price table (format: ``otel_budget.price_files``); a file that is not
        valid raises ``ValueError`` naming the path."""
        return cls(**read_price_file(path))

    # -- quoting --------------------------------------------------------------------------

    def quote(
        self,
        provider: str | None,
        model: str,
        usage: TokenUsage,
        *,
        server_address: str | None = None,
        service_tier: str | None = None,
        batch: bool = False,
        timestamp: datetime | None = None,
    ) -> PriceQuote:
        """The cost of a call, rounded up to the nano-USD.

        ``provider`` is ``gen_ai.provider.name`` (or a LiteLLM / genai-prices id), ``model`` the
        response model if known (dated snapshots price best), ``server_address`` the host called.
        ``timestamp`` (default: now) matters for prices that change by date or time of day.
        Raises :class:`UnknownModelError` for an unpriceable model under ``"block"``.
        """
        if self._gp is not None and self._gp.get_snapshot() is not self._snapshot:
            self._reset()  # someone swapped genai-prices' data: cached plans are stale
        key = (provider, model, server_address, service_tier, batch)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan_for(key, time.time() if timestamp is None else _epoch(timestamp))
        if plan.timed:
            now = time.time() if timestamp is None else _epoch(timestamp)
            if not plan.valid_from <= now < plan.valid_until:
                plan = plan.rebuild(now)  # type: ignore[misc]  # timed plans always have one
                self._store(key, plan)
        if plan.blocked:
            raise UnknownModelError(model, provider)

        i = usage.input_tokens
        cr = usage.cache_read_tokens
        cw = usage.cache_write_tokens
        o = usage.output_tokens
        r = usage.reasoning_tokens
        ia = usage.input_audio_tokens
        oa = usage.output_audio_tokens
        if cr + cw > i:  # input reported without cache tokens (Anthropic's raw usage)
            i += cr + cw
        if r > o:  # output reported without reasoning tokens (Gemini's raw usage)
            o += r
        if ia or oa:
            # Audio is part of the totals. Totals too small to hold every part would price a
            # negative number of text tokens: raise them to the sum (never under-charge).
            if cr + cw + ia > i:
                i = cr + cw + ia
            if r + oa > o:
                o = r + oa
        counts = (i, o, oa, cr, cw, r, ia)
        memo = plan.memo
        quote = memo.get(counts)
        if quote is None:  # (a projection asks the same counts call after call)
            quote = PriceQuote(
                _compute(plan, i, cr, cw, o, r, ia, oa), plan.source, plan.model, plan.provider,
                plan.variant_matched,
            )  # fmt: skip
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[counts] = quote
        return quote

    def tool_cost_nanos(self, tool_name: str, result: object = None) -> int | None:
        """The cost of one tool call in nano-USD, or ``None`` when no price is configured.

        A callable price gets the tool result; if it raises or returns NaN, a negative number
        or a non-number, ``ValueError`` is raised (a tool cost is never silently dropped).
        """
        cost = self._tools.get(tool_name)
        if cost is None:
            for pattern, value in self._tool_globs:
                if fnmatch.fnmatchcase(tool_name, pattern):
                    cost = value
                    break
            else:
                return None
        if isinstance(cost, int):
            return cost
        try:
            usd = cost(result)
        except Exception as e:
            raise ValueError(f"cost function of tool {tool_name!r} raised {type(e).__name__}: {e}") from e
        return parse_usd(usd, what=f"cost of tool {tool_name!r}")

    # -- resolution (slow path, once per key) ---------------------------------------------

    def _plan_for(self, key: tuple[Any, ...], now: float) -> _Plan:
        provider, model, server_address, service_tier, batch = key
        variant = _variant(service_tier, bool(batch))
        plan = self._resolve(provider, model, server_address, variant, now)
        if plan is None:
            plan = self._unknown(provider, model, variant, now)
        self._store(key, plan)
        return plan

    def _store(self, key: tuple[Any, ...], plan: _Plan) -> None:
        with self._lock:
            if key not in self._plans and len(self._plans) >= self._cache_size:
                # Bounded FIFO: model names can come from untrusted input.
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan

    def _reset(self) -> None:
        with self._lock:
            self._plans.clear()
            self._snapshot = self._gp.get_snapshot()

    def _unknown(self, provider: str | None, model: str, variant: _Variant, now: float) -> _Plan:
        pl = provider.strip().lower() if isinstance(provider, str) and provider.strip() else None
        name = model.strip() if isinstance(model, str) else str(model)
        if self._policy_price is not None:
            return _user_plan(self._policy_price, source="default", model=name, provider=pl, variant=variant)
        if self._policy_target is not None:
            plan = self._resolve(None, self._policy_target, None, variant, now, source=f"price_as:{self._policy_target}")
            if plan is not None:
                return plan
        return _Plan("", name, pl, False, (0,) * 8, (), 1, blocked=True)

    def _names(self, provider: str | None, model: str) -> _Names:
        return model_names(provider, model, self._aliases, self._provider_id)

    def _provider_id(self, name: str) -> str | None:
        if name in _PROVIDER_IDS:
            return _PROVIDER_IDS[name]
        if self._gp is None:
            return name
        found = self._gp.find_provider_by_id(self._snapshot.providers, name)
        return found.id if found is not None else None

    def _override(self, names: _Names) -> ModelPrice | None:
        # Exact keys first, then globs in the order given; each against the most specific name.
        for s in names.subjects:
            if s in self._exact:
                return self._exact[s]
        for pattern, price in self._globs:
            for s in names.subjects:
                if fnmatch.fnmatchcase(s, pattern):
                    return price
        return None

    def _resolve(
        self,
        provider: str | None,
        model: str,
        server_address: str | None,
        variant: _Variant,
        now: float,
        *,
        source: str | None = None,
    ) -> _Plan | None:
        if not isinstance(model, str) or not model.strip():
            return None
        names = self._names(provider, model)
        price = self._override(names)
        if price is not None:
            return _user_plan(
                price,
                source=source or "override",
                model=names.stripped,
                provider=names.pid or names.prefix_pid or names.provider or names.prefix,
                variant=variant,
            )
        if self._gp is None:
            return None
        hit = self._lookup(names, server_address)
        if hit is None:
            return None
        return self._genai_plan(hit, variant, source or self._source, now, names.model)

    def _lookup(self, names: _Names, server_address: str | None) -> tuple[Any, Any] | None:
        """Find (provider, model) in genai-prices, trying the most specific reading first."""
        m, stripped = names.model, names.stripped
        attempts: list[tuple[str | None, str | None, str]] = []
        if server_address and isinstance(server_address, str):
            # The host that was called is the one that bills (e.g. the OpenAI SDK pointed at
            # api.groq.com still reports provider "openai"); gateways on other hosts match
            # no provider pattern and fall through.
            url = f"https://{server_address.strip().lower()}"
            attempts += [(None, url, m), (None, url, stripped)]
        if names.pid:
            attempts += [(names.pid, None, m), (names.pid, None, stripped)]
        if names.prefix_pid:
            attempts.append((names.prefix_pid, None, stripped))
        if not names.pid and _BEDROCK_ID.match(stripped):
            attempts.append(("aws", None, stripped))
        # The model is not listed under the given provider: let genai-prices infer it.
        attempts += [(None, None, stripped), (None, None, m)]

        snapshot = self._snapshot
        seen: set[tuple[str | None, str | None, str]] = set()
        for attempt in attempts:
            if attempt in seen:
                continue
            seen.add(attempt)
            pid, provider_url, ref = attempt
            try:
                found: tuple[Any, Any] = snapshot.find_provider_model(ref, None, pid, provider_url)
                return found
            except LookupError:
                continue
        return None

    def _genai_plan(
        self, hit: tuple[Any, Any], variant: _Variant, source: str, now: float, reference: str = ""
    ) -> _Plan:
        return genai_plan(self._gp, hit, variant, source, now, reference)
