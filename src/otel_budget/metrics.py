"""Metrics from the SDK: spans can be sampled away, metrics must not undercount.

    from opentelemetry.sdk.metrics import MeterProvider
    processor = BudgetSpanProcessor(max_usd=1, meter_provider=MeterProvider(...))
    # (without meter_provider: the global one; a no-op until the app configures one)

Instruments (no trace ids or other high-cardinality labels):

==============================================  =========  ======================================
``gen_ai.client.token.usage``                   histogram  ``{token}``; spec attributes, buckets
``gen_ai.client.operation.duration``            histogram  ``s``; spec attributes and buckets
``gen_ai.client.operation.time_to_first_chunk`` histogram  ``s``; streams: request to first chunk
``gen_ai.client.operation.time_per_output_chunk`` histogram ``s``; streams: each later chunk's gap
``otel_budget.cost``                        counter    ``USD``; provider, model, operation, tool
``otel_budget.aborts``                      counter    ``{call}``; scope kind, reason
``otel_budget.warnings``                    counter    ``{warning}``; scope kind, threshold
``otel_budget.scope.remaining``             gauge      ``USD``; remaining budget of named scopes
``otel_budget.cache.hits``                  counter    ``{call}``; calls answered from the cache
``otel_budget.cache.misses``                counter    ``{call}``; cacheable calls sent
``otel_budget.cache.saved``                 counter    ``USD``; what the hits would have cost
==============================================  =========  ======================================

The ``gen_ai.client.*`` instruments match what ``opentelemetry-util-genai`` records (names,
units, descriptions, advisory buckets, attributes): token counts are only those the provider
reported (an estimate is never recorded as usage), and a failed call records its tokens too
when it reported any.

The counter is a float of USD (Prometheus: ``otel_budget_cost_USD_total``); each add is the
exact nano-USD amount divided once, so sums over many calls stay faithful to the ledger.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from otel_budget import attributes as attrs

TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_MAX_GAUGE_SCOPES = 1000  # remaining-budget gauges kept for at most this many named scopes
_MAX_GAUGE_KEYS = 4096  # scope keys whose gauge labels are remembered (cleared when full)
_MAX_LABEL_SETS = 1024  # distinct call label sets remembered (cleared when full)


def scope_kind(key: str) -> str:
    """``user:alice@d20261123`` -> ``user``; ``t:...`` -> ``trace``; ``b:3`` -> ``budget``."""
    if key.startswith("t:"):
        return "trace"
    if key.startswith("b:"):
        return "budget"
    if key == "process":
        return "process"
    if key == "*":
        return "global"  # the global kill switch
    return key.split(":", 1)[0] or "unknown"


class BudgetMetrics:
    """The instruments of one processor. Every method is cheap and never raises."""

    def __init__(self, meter_provider: Any = None) -> None:
        from otel_budget import __version__

        meter = metrics.get_meter("otel_budget", __version__, meter_provider)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used by GenAI clients",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )  # fmt: skip
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Duration of GenAI client operation",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )  # fmt: skip
        self.time_to_first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk, measured from when the client issues "
            "the generation request to when the first chunk is received in the response "
            "stream.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )  # fmt: skip
        self.time_per_output_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk", unit="s",
            description="Time per output chunk, recorded for each chunk received after the "
            "first one, measured as the time elapsed from the end of the previous chunk to the "
            "end of the current chunk.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )  # fmt: skip
        self.cost = meter.create_counter(
            "otel_budget.cost", unit="USD", description="Cost of GenAI and tool calls.",
        )  # fmt: skip
        self.aborts = meter.create_counter(
            "otel_budget.aborts", unit="{call}",
            description="Calls refused by a budget before they were sent.",
        )  # fmt: skip
        self.warnings = meter.create_counter(
            "otel_budget.warnings", unit="{warning}",
            description="Soft-limit thresholds crossed.",
        )  # fmt: skip
        self.loops = meter.create_counter(
            "otel_budget.loops", unit="{loop}",
            description="Loops detected: a tool (or an LLM request) repeated unchanged too often.",
        )  # fmt: skip
        self.cache_hits = meter.create_counter(
            "otel_budget.cache.hits", unit="{call}",
            description="LLM calls answered from the prompt cache (no request sent, no cost).",
        )  # fmt: skip
        self.cache_misses = meter.create_counter(
            "otel_budget.cache.misses", unit="{call}",
            description="Cacheable LLM calls the prompt cache could not answer (sent).",
        )  # fmt: skip
        self.cache_saved = meter.create_counter(
            "otel_budget.cache.saved", unit="USD",
            description="What the calls answered from the prompt cache would have cost.",
        )  # fmt: skip
        self._remaining: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()
        self._gauges: dict[str, tuple[str, dict[str, str]] | None] = {}
        self._cost_labels: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self._label_sets: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
        self._lock = threading.Lock()
        meter.create_observable_gauge(
            "otel_budget.scope.remaining", callbacks=[self._observe_remaining], unit="USD",
            description="Remaining budget of named scopes (user, tenant, session, ...).",
        )  # fmt: skip

    # -- recording -----------------------------------------------------------------------------
    def record_cost(self, usd: float, *, kind: str, provider: str, name: str, operation: str) -> None:
        key = (kind, provider, name, operation)
        labels = self._cost_labels.get(key)
        if labels is None:  # built once per distinct set (bounded) and shared, never changed
            if kind == "tool":
                labels = {attrs.GEN_AI_OPERATION_NAME: operation, attrs.GEN_AI_TOOL_NAME: name}
            else:
                labels = {
                    attrs.GEN_AI_OPERATION_NAME: operation,
                    attrs.GEN_AI_PROVIDER_NAME: provider,
                    attrs.GEN_AI_REQUEST_MODEL: name,
                }
            if len(self._cost_labels) >= _MAX_LABEL_SETS:
                self._cost_labels.clear()
            self._cost_labels[key] = labels
        self.cost.add(usd, labels)

    def record_cache(self, labels: Mapping[str, Any], hit: bool, saved_usd: float = 0.0) -> None:
        """A cache lookup's outcome (``labels``: provider, model, operation), or, with
        ``saved_usd``, the price of a hit's cached usage."""
        if saved_usd:
            self.cache_saved.add(saved_usd, labels)
        elif hit:
            self.cache_hits.add(1, labels)
        else:
            self.cache_misses.add(1, labels)

    def record_abort(self, scope_key: str, reason: str) -> None:
        self.aborts.add(1, {"otel_budget.scope.kind": scope_kind(scope_key), "otel_budget.reason": reason})

    def record_loop(self, kind: str, name: str, action: str) -> None:
        labels = {"otel_budget.loop.kind": kind, "otel_budget.loop.action": action}
        labels[attrs.GEN_AI_TOOL_NAME if kind == "tool" else attrs.GEN_AI_REQUEST_MODEL] = name
        self.loops.add(1, labels)

    def record_warning(self, scope_key: str, threshold: float) -> None:
        self.warnings.add(1, {
            "otel_budget.scope.kind": scope_kind(scope_key), "otel_budget.threshold": threshold,
        })  # fmt: skip

    def record_remaining(self, scope_key: str, remaining_usd: float) -> None:
        """Remember a named scope's remaining budget for the gauge (bounded)."""
        gauge = self._gauges.get(scope_key)  # (base, labels), or None: a per-run scope
        if gauge is None:
            if scope_key in self._gauges:
                return
            gauge = self._gauge_of(scope_key)
            if gauge is None:
                return
        base, labels = gauge
        with self._lock:
            self._remaining[base] = (remaining_usd, labels)
            self._remaining.move_to_end(base)
            if len(self._remaining) > _MAX_GAUGE_SCOPES:
                self._remaining.popitem(last=False)

    def _gauge_of(self, scope_key: str) -> tuple[str, dict[str, str]] | None:
        """A scope's gauge name and labels, worked out once per scope key (bounded)."""
        kind = scope_kind(scope_key)
        gauge: tuple[str, dict[str, str]] | None = None
        if kind not in ("trace", "budget", "session"):  # per-run scopes: unbounded cardinality
            base = scope_key.split("@", 1)[0]
            gauge = (base, {"otel_budget.scope": base, "otel_budget.scope.kind": kind})
        if len(self._gauges) >= _MAX_GAUGE_KEYS:
            self._gauges.clear()
        self._gauges[scope_key] = gauge
        return gauge

    @staticmethod
    def call_labels(
        *, operation: str, provider: str, model: str, response_model: str | None,
        server_address: str | None, server_port: int | None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The attributes of a call's ``gen_ai.client.*`` points (``extra``: the
        provider-specific ones the official instrumentation adds, e.g. the service tier)."""
        labels: dict[str, Any] = {
            attrs.GEN_AI_OPERATION_NAME: operation,
            attrs.GEN_AI_PROVIDER_NAME: provider,
            attrs.GEN_AI_REQUEST_MODEL: model,
        }
        if server_address:
            labels[attrs.SERVER_ADDRESS] = server_address
        if server_port:
            labels[attrs.SERVER_PORT] = server_port
        if response_model:
            labels[attrs.GEN_AI_RESPONSE_MODEL] = response_model
        if extra:
            labels.update(extra)
        return labels

    def call_label_sets(
        self, *, operation: str, provider: str, model: str, response_model: str | None,
        server_address: str | None, server_port: int | None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:  # fmt: skip
        """``call_labels``, and those with ``gen_ai.token.type`` input / output: built once
        per distinct set (bounded) and shared, never changed (the SDK only reads them)."""
        key = (
            operation, provider, model, response_model, server_address, server_port,
            *(extra.items() if extra else ()),
        )  # fmt: skip
        keep = True
        try:
            sets = self._label_sets.get(key)
        except TypeError:  # an unhashable extra value: built for this call only
            sets, keep = None, False
        if sets is None:
            labels = self.call_labels(
                operation=operation, provider=provider, model=model,
                response_model=response_model, server_address=server_address,
                server_port=server_port, extra=extra,
            )  # fmt: skip
            sets = (
                labels,
                {**labels, attrs.GEN_AI_TOKEN_TYPE: "input"},
                {**labels, attrs.GEN_AI_TOKEN_TYPE: "output"},
            )
            if keep:
                if len(self._label_sets) >= _MAX_LABEL_SETS:
                    self._label_sets.clear()
                self._label_sets[key] = sets
        return sets

    def record_call(
        self, labels: Mapping[str, Any], *, duration_s: float, input_tokens: int | None,
        output_tokens: int | None, error_type: str | None,
        token_labels: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        """A finished call: its duration (with ``error.type`` when it failed) and the token
        counts the provider reported (None: not reported, not recorded). ``token_labels``:
        ``labels`` with the input / output token type, when the caller has them built."""
        if error_type:
            labels = {**labels, attrs.ERROR_TYPE: error_type}
            token_labels = None
        self.duration.record(max(duration_s, 0.0), labels)
        if input_tokens is not None:
            self.token_usage.record(input_tokens, token_labels[0] if token_labels is not None
                                    else {**labels, attrs.GEN_AI_TOKEN_TYPE: "input"})  # fmt: skip
        if output_tokens is not None:
            self.token_usage.record(output_tokens, token_labels[1] if token_labels is not None
                                    else {**labels, attrs.GEN_AI_TOKEN_TYPE: "output"})  # fmt: skip

    def record_chunk(self, gap_s: float, labels: Mapping[str, Any], first: bool) -> None:
        """A stream chunk arrived ``gap_s`` after the request (``first``) or the last chunk."""
        (self.time_to_first_chunk if first else self.time_per_output_chunk).record(gap_s, labels)

    def _observe_remaining(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._remaining.values())
        return [Observation(value, labels) for value, labels in items]
