"""Every PromQL query of the Grafana dashboard, run on a real Prometheus against known spend.

The app side is the real thing: ``BudgetSpanProcessor(meter_provider=...)`` with the SDK's
``PrometheusMetricReader`` served by ``prometheus_client`` on 127.0.0.1; LLM calls go through
``start_call``/``succeed`` (what the openai/anthropic instrumentors run), tools through
``track_tool``, runs through ``budget()`` and named scopes through ``otel_budget.scope``.
Prometheus (Debian's package, started by ``tests/prometheus_server.py``) scrapes it every second.

The same workload runs twice (users u0 and u1). The first run creates every series, the way a
long-running service has them. The queries are evaluated at the first scrape that shows the end
of the second run (t1), with ``$__range`` and ``$__rate_interval`` both set to start 1 ms before
the first scrape that showed the end of the first run (t0). So the window holds exactly the
second run, and Prometheus's extrapolation is known exactly: ``increase()`` stretches the
samples' span (t1 - t0) by the 1 ms before t0 (the counters' first in-window value equals the
run's increase, so the "extrapolate to zero" cut-off never applies), i.e. returns the run's
amount times (t1 - t0 + 1 ms) / (t1 - t0), and ``rate()`` returns the amount / (t1 - t0).

Not runnable here (no Collector): the queries on ``otel_budget_cost_from_spans_USD_total``,
``otel_budget_trace_cost_USD_bucket`` and ``traces_span_metrics_calls_total``, which only the
Collector's connectors produce, and the Jaeger table. They are still sent to Prometheus, which
must accept them (and returns nothing).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import prometheus_server
from tests.prometheus_server import PrometheusServer

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "dashboards" / "otel-budget.json"
SERVICE = "otel-budget-promtest"  # the scrape job: what the Collector sets from service.name
SDK_COST = "otel_budget_cost_USD_total"
SPANS_COST = "otel_budget_cost_from_spans_USD_total"
REL = 1e-9  # float rounding only: the extrapolation is computed exactly (see above)

# -- the workload (one run; it runs twice) ------------------------------------------------------
PRICES = {"test-model": (1, 2), "big-model": (1000, 2000)}  # USD per million tokens in, out
PER_USER_LIMIT = 0.6
PER_TRACE_LIMIT = 0.8
UNKNOWN_MODEL = "otel-budget-test-unknown-model"
RUN_COST = {  # what one run spends, by (provider, model) or tool
    ("openai", "test-model"): 4 * 0.002,  # 1000 in + 500 out at $1/$2 per MTok
    ("anthropic", "big-model"): 2 * 0.2,  # 100 in + 50 out at $1000/$2000 per MTok
    "web_search": 5 * 0.01,
    "code_exec": 0.05,
}
RUN_TOTAL = sum(RUN_COST.values())  # 0.508
RUN_TOKENS = {
    ("test-model", "input"): 4000, ("test-model", "output"): 2000,
    ("big-model", "input"): 200, ("big-model", "output"): 100,
}  # fmt: skip
RUN_ABORTS = {("budget", "limit"): 1, ("user", "paused"): 1, ("trace", "limit"): 1, ("unknown", "unknown_model"): 1}
RUN_WARNINGS = {("trace", "0.5"): 1, ("budget", "0.5"): 1, ("user", "0.5"): 1, ("user", "0.8"): 1}
LATENCY = {"test-model": 0.5, "big-model": 2.0}  # simulated call durations (s)
# p95 inside the one bucket every call falls in: (0.32, 0.64] and (1.28, 2.56]
P95 = {"test-model": 0.32 + 0.95 * 0.32, "big-model": 1.28 + 0.95 * 1.28}


def run_workload(processor: Any, tracer: Any, user: str) -> None:
    from otel_budget import BudgetExceededError, budget, scope, track_tool
    from otel_budget.instrumentation._call import LLMRequest, start_call
    from otel_budget.pricing import TokenUsage
    from otel_budget.tokens import InputEstimate

    def llm(model: str, provider: str, inp: int, out: int) -> None:
        request = LLMRequest(
            provider=provider, operation="chat", model=model, output_param="max_tokens",
            estimate=lambda: InputEstimate(inp, "test"),
        )  # fmt: skip
        call = start_call(tracer, request, {"max_tokens": out}, processor=processor)
        call.started -= LATENCY.get(model, 0.0)  # as if the provider took that long
        call.succeed(TokenUsage(input_tokens=inp, output_tokens=out))

    def refused(model: str, provider: str, inp: int, out: int) -> None:
        with pytest.raises(BudgetExceededError):
            llm(model, provider, inp, out)

    web_search = track_tool("web_search", cost_usd=0.01)
    with scope(user=user):
        with tracer.start_as_current_span("run-a"):  # $0.496: trace at 62 %, user at 83 %
            for _ in range(3):
                llm("test-model", "openai", 1000, 500)
            for _ in range(2):
                llm("big-model", "anthropic", 100, 50)
            for _ in range(4):
                with web_search:
                    pass
            with track_tool("code_exec", cost_usd=0.05):
                pass
        with tracer.start_as_current_span("run-b"), budget(max_usd=0.003):
            llm("test-model", "openai", 1000, 500)  # 67 % of the block
            refused("test-model", "openai", 1000, 500)  # budget / limit
        with tracer.start_as_current_span("run-c"):
            processor.pause(f"user:{user}")
            try:
                refused("test-model", "openai", 1000, 500)  # user / paused
            finally:
                processor.resume(f"user:{user}")
        with tracer.start_as_current_span("run-d"):
            refused("big-model", "anthropic", 1000, 500)  # $2 > $0.8: trace / limit
        with tracer.start_as_current_span("run-e"):
            refused(UNKNOWN_MODEL, "openai", 10, 10)  # unknown / unknown_model
        with tracer.start_as_current_span("run-f"), web_search:
            pass  # no threshold left to cross: the last thing this run records is a cost


# -- the dashboard ------------------------------------------------------------------------------
def prometheus_targets() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(panel title, refId, expr, target) of every Prometheus query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            ds = target.get("datasource") or panel.get("datasource") or {}
            if ds.get("type") == "prometheus":
                out.append((panel["title"], target["refId"], target["expr"], target))
    return out


def variable_queries() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        v["name"]: v["definition"]
        for v in dashboard["templating"]["list"]
        if v["type"] == "query" and v.get("datasource", {}).get("type") == "prometheus"
    }


def render(expr: str, *, cost_metric: str, window: str) -> str:
    """Grafana's variable interpolation for this dashboard: every service and model ("All"
    is ``.*``), the chosen cost metric, and one window for ``$__range``/``$__rate_interval``."""
    out = (
        expr.replace("${cost_metric}", cost_metric)
        .replace("$__rate_interval", window)
        .replace("$__range", window)
        .replace("$service", ".*")
        .replace("$model", ".*")
    )
    assert "$" not in out, f"uninterpolated variable in {out!r}"
    return out


def key(result: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(result["metric"].items()))


def values(results: list[dict[str, Any]]) -> dict[tuple[tuple[str, str], ...], float]:
    return {key(r): float(r["value"][1]) for r in results}


def expected(title: str, ref: str, span_s: float) -> dict[tuple[tuple[str, str], ...], float] | None:
    """What each query must return for one run whose samples span ``span_s`` = t1 - t0
    (None: collector-only, must be empty here)."""
    stretch = (span_s + 0.001) / span_s  # increase() over a window 1 ms longer than the samples

    def increase(amounts: dict[Any, float]) -> dict[Any, float]:
        return {k: v * stretch for k, v in amounts.items()}

    def per_hour(amounts: dict[Any, float]) -> dict[Any, float]:
        return {k: v / span_s * 3600 for k, v in amounts.items()}

    by_model = {
        (("gen_ai_provider_name", p), ("gen_ai_request_model", m)): usd
        for k, usd in RUN_COST.items() if isinstance(k, tuple) for p, m in [k]
    }  # fmt: skip
    tools = {(("gen_ai_tool_name", k),): usd for k, usd in RUN_COST.items() if isinstance(k, str)}
    aborts = {(("otel_budget_reason", r), ("otel_budget_scope_kind", k)): n for (k, r), n in RUN_ABORTS.items()}
    warnings = {
        (("otel_budget_scope_kind", k), ("otel_budget_threshold", t)): n for (k, t), n in RUN_WARNINGS.items()
    }
    tokens_by_type: dict[tuple[tuple[str, str], ...], float] = {}
    for (_, kind), n in RUN_TOKENS.items():
        tokens_by_type[(("gen_ai_token_type", kind),)] = tokens_by_type.get((("gen_ai_token_type", kind),), 0) + n
    aborts_by_reason: dict[tuple[tuple[str, str], ...], float] = {}
    for (_, reason), n in RUN_ABORTS.items():
        k = (("otel_budget_reason", reason),)
        aborts_by_reason[k] = aborts_by_reason.get(k, 0) + n
    warnings_by_kind: dict[tuple[tuple[str, str], ...], float] = {}
    for (kind, _), n in RUN_WARNINGS.items():
        k = (("otel_budget_scope_kind", kind),)
        warnings_by_kind[k] = warnings_by_kind.get(k, 0) + n
    remaining = round(PER_USER_LIMIT - RUN_TOTAL, 9)
    table: dict[tuple[str, str], dict[tuple[tuple[str, str], ...], float] | None] = {
        ("Spend in range", "A"): increase({(): RUN_TOTAL}),
        ("Calls refused by a budget", "A"): increase({(): sum(RUN_ABORTS.values())}),
        ("Soft-limit warnings", "A"): increase({(): sum(RUN_WARNINGS.values())}),
        ("Spend over time by model and provider (USD/h)", "A"): per_hour(by_model),
        ("Spend by model and provider in range", "A"): increase(by_model),
        ("Spend per service over time (USD/h)", "A"): per_hour({(("job", SERVICE),): RUN_TOTAL}),
        ("Spend per service in range", "A"): increase({(("job", SERVICE),): RUN_TOTAL}),
        ("Tool spend in range", "A"): increase(tools),
        ("Calls refused by scope kind and reason", "A"): increase(aborts),
        ("Warnings by scope kind and threshold", "A"): increase(warnings),
        ("Aborts and warnings over time (per hour)", "A"): per_hour(aborts_by_reason),
        ("Aborts and warnings over time (per hour)", "B"): per_hour(warnings_by_kind),
        ("Remaining budget per named scope", "A"): {  # a gauge: its last value, no window
            (("otel_budget_scope", f"user:{u}"), ("otel_budget_scope_kind", "user")): remaining
            for u in ("u0", "u1")
        },
        ("Tokens by type (per hour)", "A"): per_hour(tokens_by_type),
        ("Tokens by model and type in range", "A"): increase({
            (("gen_ai_request_model", m), ("gen_ai_token_type", t)): n for (m, t), n in RUN_TOKENS.items()
        }),
        # A ratio of rates: the stretch cancels; every call of a model is in one bucket.
        ("LLM call latency p95 by model", "A"): {(("gen_ai_request_model", m),): q for m, q in P95.items()},
        # Produced only by the Collector's connectors (collector-config.yaml):
        ("Runs by total cost (Collector)", "A"): None,
        ("Calls and errors by model (Collector span_metrics)", "A"): None,
    }
    return table[(title, ref)]


# -- the scenario: app + Prometheus + two runs --------------------------------------------------
@dataclass
class Scenario:
    prom: PrometheusServer
    t0: float  # the scrape after run 1 (seconds, ms precision)
    t1: float  # the scrape after run 2
    version: str
    processor: Any
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def window_ms(self) -> int:
        return round((self.t1 - self.t0) * 1000) + 1

    @property
    def window(self) -> str:
        return f"{self.window_ms}ms"

    @property
    def span_s(self) -> float:
        return self.window_ms / 1000 - 0.001  # t1 - t0, in whole ms


def _switch() -> Any:
    """conftest's switchable processor chain on the global SDK provider."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    for processor in provider._active_span_processor._span_processors:
        if hasattr(processor, "chain"):
            return processor
    raise AssertionError("conftest's SwitchProcessor is not on the global provider")


def _settled(prom: PrometheusServer, total: float, user: str) -> float | None:
    """The timestamp of the latest scrape if it shows ``total`` spent and ``user``'s remaining
    budget (the last two things a run records), else None. One evaluation time for both."""
    at = time.time()
    cost = prom.query(f"sum({SDK_COST})", at)
    remaining = prom.query(f'otel_budget_scope_remaining_USD{{otel_budget_scope="user:{user}"}}', at)
    if not cost or not remaining:
        return None
    if abs(float(cost[0]["value"][1]) - total) > 1e-9:
        return None
    if abs(float(remaining[0]["value"][1]) - (PER_USER_LIMIT - RUN_TOTAL)) > 1e-9:
        return None
    stamp = prom.query(f"max(timestamp({SDK_COST}))", at)
    return float(stamp[0]["value"][1])


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    path = prometheus_server.binary()
    if path is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install -y prometheus)")
    prometheus_exporter = pytest.importorskip(
        "opentelemetry.exporter.prometheus", reason="needs opentelemetry-exporter-prometheus (the test extra)"
    )
    from opentelemetry import trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry, start_http_server

    from otel_budget import BudgetSpanProcessor, ModelPrice, PriceBook, ScopeRule

    registry = CollectorRegistry()
    reader = prometheus_exporter.PrometheusMetricReader(registry=registry)
    meter_provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": SERVICE}),
        shutdown_on_exit=False,
    )  # fmt: skip
    processor = BudgetSpanProcessor(
        PER_TRACE_LIMIT,
        scopes=[ScopeRule("user", max_usd=PER_USER_LIMIT)],
        prices=PriceBook(overrides={m: ModelPrice(input=i, output=o) for m, (i, o) in PRICES.items()}),
        meter_provider=meter_provider,
    )
    switch = _switch()
    switch.chain[:] = [processor]
    port = prometheus_server.free_port()
    http_server, http_thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    prom = PrometheusServer(
        [f"127.0.0.1:{port}"], job=SERVICE, path=path, extra_args=["--enable-feature=exemplar-storage"]
    )
    try:
        prom.start()
        prom.wait_for_target_up()
        tracer = trace.get_tracer("tests.test_prometheus")
        run_workload(processor, tracer, "u0")
        t0 = prom.wait_for(lambda: _settled(prom, RUN_TOTAL, "u0"))
        run_workload(processor, tracer, "u1")
        t1 = prom.wait_for(lambda: _settled(prom, 2 * RUN_TOTAL, "u1"))
        assert t1 > t0
        yield Scenario(prom, t0, t1, prometheus_server.version(path), processor)
    finally:
        prom.stop()
        http_server.shutdown()
        http_thread.join(timeout=5)
        switch.chain[:] = []
        processor.shutdown()
        meter_provider.shutdown()


# -- tests ----------------------------------------------------------------------------------------
TARGETS = prometheus_targets()


def test_every_dashboard_query_has_an_expectation() -> None:
    """A panel added to the dashboard must be added here too (or declared collector-only)."""
    assert TARGETS, "no Prometheus query found in the dashboard"
    for title, ref, _, _ in TARGETS:
        try:
            expected(title, ref, 1.0)
        except KeyError:
            pytest.fail(f"no expected result for panel {title!r} query {ref}: add it to expected()")


def test_the_raw_counters_match_both_runs(scenario: Scenario) -> None:
    prom, at = scenario.prom, scenario.t1
    assert float(prom.query(f"sum({SDK_COST})", at)[0]["value"][1]) == pytest.approx(2 * RUN_TOTAL, abs=1e-12)
    assert scenario.processor.spent_usd("user:u0") == pytest.approx(RUN_TOTAL, abs=1e-12)
    assert scenario.processor.spent_usd("user:u1") == pytest.approx(RUN_TOTAL, abs=1e-12)
    names = set(prom.label_values("__name__"))
    for name in (
        SDK_COST, "otel_budget_aborts_total", "otel_budget_warnings_total", "otel_budget_scope_remaining_USD",
        "gen_ai_client_token_usage_bucket", "gen_ai_client_token_usage_sum",
        "gen_ai_client_operation_duration_seconds_bucket",
    ):  # fmt: skip
        assert name in names, f"{name} missing; Prometheus has {sorted(names)}"
    # No trace ids in any label of any series.
    for series in prom.api("series", **{"match[]": '{__name__=~"otel_budget.*|gen_ai.*"}'}):
        for label, value in series.items():
            assert not re.fullmatch(r"[0-9a-f]{16}|[0-9a-f]{32}", value), (label, value)
            assert label not in ("trace_id", "span_id", "user_id", "session_id"), series


@pytest.mark.parametrize(("title", "ref", "expr"), [(t, r, e) for t, r, e, _ in TARGETS],
                         ids=[f"{t} [{r}]" for t, r, _, _ in TARGETS])  # fmt: skip
def test_dashboard_query(scenario: Scenario, title: str, ref: str, expr: str) -> None:
    want = expected(title, ref, scenario.span_s)
    query = render(expr, cost_metric=SDK_COST, window=scenario.window)
    got = values(scenario.prom.query(query, scenario.t1))
    scenario.results[f"{title} [{ref}]"] = got
    print(f"\n{title} [{ref}] @ window {scenario.window}:\n  {query}\n  -> {got}")
    if want is None:
        assert got == {}, f"collector-only query returned data here: {got}"
        return
    assert set(got) == set(want), f"{query}\n got labels {sorted(got)}\nwant {sorted(want)}"
    for labels, value in want.items():
        assert got[labels] == pytest.approx(value, rel=REL), f"{query}: {labels}"


@pytest.mark.parametrize(("title", "ref", "expr"),
                         [(t, r, e) for t, r, e, _ in TARGETS if "${cost_metric}" in e],
                         ids=[f"{t} [{r}]" for t, r, e, _ in TARGETS if "${cost_metric}" in e])  # fmt: skip
def test_dashboard_query_on_span_derived_cost_parses(scenario: Scenario, title: str, ref: str, expr: str) -> None:
    """With "Cost from: Spans via Collector" the same queries read the Collector's
    signal_to_metrics counter, which does not exist here: Prometheus accepts them, no data."""
    query = render(expr, cost_metric=SPANS_COST, window=scenario.window)
    assert scenario.prom.query(query, scenario.t1) == []


def test_variable_queries(scenario: Scenario) -> None:
    """Grafana's label_values(metric{selector}, label) is the series-labels API."""
    found = {}
    for name, definition in variable_queries().items():
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
        assert match, definition
        selector = render(match.group(1), cost_metric=SDK_COST, window="1m")
        found[name] = sorted(scenario.prom.label_values(match.group(2), selector))
    assert found == {
        "service": [SERVICE],
        "model": ["big-model", "test-model"],
        "trace_service": [SERVICE],
    }


def test_exemplar_queries_are_accepted(scenario: Scenario) -> None:
    """Panels with exemplars on: Prometheus accepts their queries on the exemplar API. The SDK's
    Prometheus reader exposes no exemplars (the Collector's exporter does, with
    enable_open_metrics), so there are none here."""
    exemplar_targets = [e for _, _, e, t in TARGETS if t.get("exemplar")]
    assert exemplar_targets
    for expr in exemplar_targets:
        query = render(expr, cost_metric=SDK_COST, window=scenario.window)
        assert scenario.prom.exemplars(query, scenario.t0 - 60, scenario.t1 + 1) == []


def test_prometheus_version_is_reported(scenario: Scenario) -> None:
    print(f"\n{scenario.version}; window {scenario.window}")
    assert scenario.version.startswith("prometheus, version")
