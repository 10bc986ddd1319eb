"""collector-config.yaml, examples/compose.yaml, examples/prometheus.yml and the Grafana
provisioning and dashboard, checked as data (no Collector, Docker, Jaeger or Grafana runs here).

The Collector config is checked the way the Collector itself would reject it (every component
used in a pipeline is defined, every defined one is used, connectors join a traces pipeline to
a metrics pipeline) plus what otel_budget needs of it: the cost attribute is
``otel_budget.attributes.COST_USD``, the span-derived counter never collides with the SDK's, no
deprecated component names. The files are cross-checked against each other: the ports and host
names the compose services use, the metric names the dashboard queries, the datasource uids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from otel_budget import attributes as attrs
from otel_budget.report import TERMINATED_BY_BUDGET

yaml = pytest.importorskip("yaml", reason="needs pyyaml (the test extra)")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "collector-config.yaml"
EXAMPLES = ROOT / "examples"
COMPOSE = EXAMPLES / "compose.yaml"
PROMETHEUS_CONFIG = EXAMPLES / "prometheus.yml"
GRAFANA = EXAMPLES / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "otel-budget.json"

SECTIONS = ("receivers", "processors", "exporters", "connectors")
PIPELINE_TYPES = ("traces", "metrics", "logs")
# Component types renamed to lower_snake_case in 2025-2026 (old name -> new name). The old
# names still load with a deprecation warning; this config must use the new ones.
DEPRECATED = {
    "exporters": {"otlp": "otlp_grpc", "otlphttp": "otlp_http", "logging": "debug",
                  "prometheusremotewrite": "prometheus_remote_write"},
    "connectors": {"spanmetrics": "span_metrics", "signaltometrics": "signal_to_metrics"},
    "processors": {"deltatocumulative": "delta_to_cumulative", "cumulativetodelta": "cumulative_to_delta",
                   "memorylimiter": "memory_limiter"},
}  # fmt: skip
# The GenAI semconv buckets of gen_ai.client.operation.duration (seconds).
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
HIGH_CARDINALITY = {
    "user.id", "session.id", "tenant.id", "gen_ai.conversation.id", "gen_ai.response.id",
    "gen_ai.tool.call.id", "trace_id", "span_id", attrs.BUDGET_SCOPE,
}  # fmt: skip


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load(CONFIG)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def ctype(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def pipelines(config: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    return config["service"]["pipelines"]


def used(config: dict[str, Any], role: str) -> set[str]:
    return {c for p in pipelines(config).values() for c in p.get(role, [])}


def cost_entries(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["connectors"]["signal_to_metrics"]["spans"]


def prometheus_name(metric: str, unit: str, suffix: str) -> str:
    """How the Collector's prometheus exporter names a metric (dots to underscores, the unit
    appended as is, then _total / _bucket)."""
    return f"{metric.replace('.', '_')}_{unit}_{suffix}"


def sdk_cost_labels() -> tuple[str, set[str]]:
    """Name and label keys of the SDK's cost counter, as metrics.py really records them."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_budget.metrics import BudgetMetrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    metrics = BudgetMetrics(provider)
    metrics.record_cost(0.1, kind="llm", provider="openai", name="gpt-4o-mini", operation="chat")
    metrics.record_cost(0.1, kind="tool", provider="tool", name="web_search", operation="execute_tool")
    keys: set[str] = set()
    name = ""
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.unit == "USD" and hasattr(metric.data, "is_monotonic"):
                    name = metric.name
                    for point in metric.data.data_points:
                        keys |= set(point.attributes)
    provider.shutdown()
    return name, keys


# -- collector-config.yaml -------------------------------------------------------------------
def test_otlp_receiver_on_grpc_4317_and_http_4318(config: dict[str, Any]) -> None:
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")


def test_every_component_is_defined_and_used(config: dict[str, Any]) -> None:
    defined = {section: set(config.get(section) or {}) for section in SECTIONS}
    assert set(pipelines(config)), "no pipelines"
    for pid, pipeline in pipelines(config).items():
        assert ctype(pid) in PIPELINE_TYPES, f"pipeline {pid}: unknown signal"
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"pipeline {pid} is incomplete"
        for role in ("receivers", "processors", "exporters"):
            for component in pipeline.get(role, []):
                assert component in defined[role] | defined["connectors"], f"{pid}: {component} is not defined"
    # A connector is listed among both the exporters and the receivers of the pipelines.
    connectors = defined["connectors"]
    assert used(config, "receivers") == defined["receivers"] | connectors
    assert used(config, "exporters") == defined["exporters"] | connectors
    assert used(config, "processors") == defined["processors"]


def test_connectors_join_a_traces_pipeline_to_a_metrics_pipeline(config: dict[str, Any]) -> None:
    connectors = set(config["connectors"])
    assert connectors == {"span_metrics", "signal_to_metrics"}
    for connector in connectors:
        as_exporter = {ctype(pid) for pid, p in pipelines(config).items() if connector in p.get("exporters", [])}
        as_receiver = {ctype(pid) for pid, p in pipelines(config).items() if connector in p.get("receivers", [])}
        assert as_exporter == {"traces"}, connector
        assert as_receiver == {"metrics"}, connector


def test_traces_go_to_jaeger_over_otlp_grpc(config: dict[str, Any]) -> None:
    jaeger = config["exporters"]["otlp_grpc/jaeger"]
    assert jaeger["endpoint"] == "jaeger:4317"
    assert jaeger["tls"]["insecure"] is True
    assert "otlp_grpc/jaeger" in pipelines(config)["traces"]["exporters"]


def test_metrics_from_the_sdk_and_from_spans_reach_the_prometheus_exporter(config: dict[str, Any]) -> None:
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["endpoint"].endswith(":8889")
    assert prometheus["enable_open_metrics"] is True  # exemplars -> Grafana -> Jaeger
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is False  # service.name -> job only
    sources = {r for pid, p in pipelines(config).items()
               if ctype(pid) == "metrics" and "prometheus" in p["exporters"] for r in p["receivers"]}  # fmt: skip
    assert sources == {"otlp", "span_metrics", "signal_to_metrics"}


def test_processors_batch_everywhere_and_delta_to_cumulative_before_prometheus(config: dict[str, Any]) -> None:
    for pid, pipeline in pipelines(config).items():
        processors = pipeline.get("processors", [])
        assert processors[0] == "memory_limiter", pid  # first, as its README asks
        assert processors[-1] == "batch", pid
        if ctype(pid) == "metrics":  # signal_to_metrics (and delta SDKs) emit deltas
            assert "delta_to_cumulative" in processors, pid


def test_span_derived_cost_counter_sums_our_cost_attribute(config: dict[str, Any]) -> None:
    cost = [e for e in cost_entries(config) if e.get("sum")]
    assert len(cost) == 1
    entry = cost[0]
    assert entry["sum"]["value"] == f'Double(attributes["{attrs.COST_USD}"])'
    assert entry["conditions"] == [f'attributes["{attrs.COST_USD}"] != nil']
    assert entry["unit"] == "USD"
    assert [a["key"] for a in entry["include_resource_attributes"]] == ["service.name"]
    keys = {a["key"] for a in entry["attributes"]}
    assert {attrs.GEN_AI_REQUEST_MODEL, attrs.GEN_AI_PROVIDER_NAME, attrs.GEN_AI_TOOL_NAME} <= keys
    for attribute in entry["attributes"]:  # signal_to_metrics: at most one of the two
        assert not ("optional" in attribute and "default_value" in attribute), attribute


def test_span_derived_cost_counter_matches_but_never_collides_with_the_sdk_counter(config: dict[str, Any]) -> None:
    sdk_name, sdk_keys = sdk_cost_labels()
    entry = next(e for e in cost_entries(config) if e.get("sum"))
    # Same labels as the SDK counter, so the dashboard can switch between the two...
    assert {a["key"] for a in entry["attributes"]} == sdk_keys
    # ...but another name: running both must not merge two writers into one series.
    assert sdk_name == "otel_budget.cost"
    assert entry["name"] != sdk_name


def test_trace_cost_histogram_reads_the_root_span_breakdown(config: dict[str, Any]) -> None:
    entry = next(e for e in cost_entries(config) if e.get("histogram"))
    assert entry["histogram"]["value"] == f'Double(attributes["{attrs.TRACE_SPENT_USD}"])'
    assert entry["conditions"] == [f'attributes["{attrs.TRACE_SPENT_USD}"] != nil']
    buckets = entry["histogram"]["buckets"]
    assert buckets == sorted(buckets) and len(set(buckets)) == len(buckets)
    assert entry.get("attributes") is None  # one histogram per service: no per-trace labels


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", duration)
    assert match, duration
    return float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


def test_span_metrics_dimensions_and_buckets(config: dict[str, Any]) -> None:
    span_metrics = config["connectors"]["span_metrics"]
    dimensions = [d["name"] for d in span_metrics["dimensions"]]
    assert dimensions == [
        attrs.GEN_AI_OPERATION_NAME, attrs.GEN_AI_PROVIDER_NAME, attrs.GEN_AI_REQUEST_MODEL,
        attrs.GEN_AI_TOOL_NAME, attrs.ERROR_TYPE,
    ]  # fmt: skip
    assert not HIGH_CARDINALITY & set(dimensions)
    histogram = span_metrics["histogram"]
    assert histogram["unit"] == "s"
    assert [_seconds(b) for b in histogram["explicit"]["buckets"]] == pytest.approx(DURATION_BUCKETS)
    assert span_metrics["exemplars"]["enabled"] is True


def test_no_high_cardinality_attributes_become_labels(config: dict[str, Any]) -> None:
    for entry in cost_entries(config):
        keys = {a["key"] for a in entry.get("attributes") or []}
        keys |= {a["key"] for a in entry.get("include_resource_attributes") or []}
        assert not HIGH_CARDINALITY & keys, entry["name"]


def test_no_deprecated_component_names(config: dict[str, Any]) -> None:
    for section, renamed in DEPRECATED.items():
        for component in config.get(section) or {}:
            assert ctype(component) not in renamed, (
                f"{section}: {component!r} is deprecated, use {renamed[ctype(component)]!r}"
            )
    # ...but the old names are given in comments, for collectors older than the renames.
    comments = "\n".join(line.split("#", 1)[1] for line in CONFIG.read_text().splitlines() if "#" in line)
    for old in ("otlp", "spanmetrics", "signaltometrics", "deltatocumulative"):
        assert re.search(rf"\b{old}\b", comments), f"the old name {old!r} is not mentioned in a comment"


# -- examples/compose.yaml and examples/prometheus.yml ----------------------------------------
def test_compose_brings_up_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"otel-collector", "jaeger", "prometheus", "grafana", "demo"}
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib")
    assert services["jaeger"]["image"].startswith("jaegertracing/jaeger")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """container path -> host path (relative to examples/, like compose resolves it)."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        out[container] = (COMPOSE.parent / host).resolve()
    return out


def test_compose_mounts_exist_and_wire_the_collector_config(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for container, host in _mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) does not exist"
    collector = services["otel-collector"]
    mounts = _mounts(collector)
    (config_path,) = [c for c, h in mounts.items() if h == CONFIG.resolve()]
    assert f"--config={config_path}" in collector["command"]
    assert _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG.resolve()
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]


def test_compose_demo_sends_otlp_to_the_collector(compose: dict[str, Any], config: dict[str, Any]) -> None:
    demo = compose["services"]["demo"]
    env = demo["environment"]
    grpc_port = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{grpc_port}"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["OTEL_METRICS_EXPORTER"] == "otlp"
    # Short-lived runs: deltas, one identity, accumulated by the Collector's delta_to_cumulative.
    assert env["OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE"] == "delta"
    assert "service.instance.id=" in env["OTEL_RESOURCE_ATTRIBUTES"]
    command = " ".join(demo["command"])
    assert "opentelemetry-instrument python -m otel_budget.demo" in command
    assert "otel-collector" in demo["depends_on"]
    # The demo installs the package from the mounted sources: everything pyproject needs is there.
    mounted = set(_mounts(demo).values())
    assert {(ROOT / p).resolve() for p in ("pyproject.toml", "README.md", "LICENSE", "src")} <= mounted


def test_prometheus_scrapes_the_collector_exporter(config: dict[str, Any], compose: dict[str, Any]) -> None:
    prometheus = load(PROMETHEUS_CONFIG)
    (job,) = prometheus["scrape_configs"]
    assert job["honor_labels"] is True  # keep job=<service.name> set by the Collector
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    assert host in compose["services"]
    assert config["exporters"]["prometheus"]["endpoint"].endswith(f":{port}")


# -- Grafana provisioning and dashboard -------------------------------------------------------
def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    datasources = {d["uid"]: d for d in load(GRAFANA / "provisioning/datasources/datasources.yaml")["datasources"]}
    assert datasources["prometheus"]["type"] == "prometheus"
    assert datasources["prometheus"]["url"] == "http://prometheus:9090"
    assert datasources["jaeger"]["type"] == "jaeger"
    assert datasources["jaeger"]["url"] == "http://jaeger:16686"
    (link,) = datasources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert link == {"name": "trace_id", "datasourceUid": "jaeger"}  # the Collector's exemplar label
    (provider,) = load(GRAFANA / "provisioning/dashboards/dashboards.yaml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = _variables(dashboard)
    assert variables["DS_PROMETHEUS"]["current"]["value"] == "prometheus"  # provisioned uids
    assert variables["DS_JAEGER"]["current"]["value"] == "jaeger"
    builtin = {"__range", "__rate_interval", "__interval"}
    for panel, target in _targets(dashboard):
        ds = target.get("datasource") or panel.get("datasource")
        assert ds["uid"] in ("${DS_PROMETHEUS}", "${DS_JAEGER}"), panel["title"]
        text = json.dumps(target)
        for name in re.findall(r"\$\{?(\w+)", text):
            assert name in variables or name in builtin, f"{panel['title']}: unknown variable ${name}"
        if ds["type"] == "prometheus":
            assert target["expr"].strip(), panel["title"]
            for label in ("trace_id", "span_id", "user_id", "session_id"):
                assert label not in target["expr"], panel["title"]


def test_dashboard_has_the_panels_asked_for(dashboard: dict[str, Any]) -> None:
    exprs = {p["title"]: " ".join(t.get("expr", "") for t in p.get("targets", [])) for p in dashboard["panels"]}
    by_model = exprs["Spend over time by model and provider (USD/h)"]
    assert "gen_ai_request_model" in by_model and "gen_ai_provider_name" in by_model
    assert "by (job)" in exprs["Spend per service in range"]
    assert "otel_budget_aborts_total" in exprs["Calls refused by scope kind and reason"]
    assert "otel_budget_warnings_total" in exprs["Warnings by scope kind and threshold"]
    assert "gen_ai_token_type" in exprs["Tokens by model and type in range"]
    assert "otel_budget_scope_remaining_USD" in exprs["Remaining budget per named scope"]
    (jaeger,) = [p for p in dashboard["panels"] if p.get("datasource", {}) and p["datasource"]["type"] == "jaeger"]
    (query,) = jaeger["targets"]
    assert query["queryType"] == "search"
    assert query["tags"] == f"{attrs.TRACE_TERMINATED_BY}={TERMINATED_BY_BUDGET}"


def test_dashboard_metric_names_are_the_ones_the_collector_produces(
    dashboard: dict[str, Any], config: dict[str, Any]
) -> None:
    cost_entry = next(e for e in cost_entries(config) if e.get("sum"))
    trace_entry = next(e for e in cost_entries(config) if e.get("histogram"))
    options = {o["value"] for o in _variables(dashboard)["cost_metric"]["options"]}
    assert options == {
        "otel_budget_cost_USD_total",  # the SDK counter, through the Collector's exporter
        prometheus_name(cost_entry["name"], cost_entry["unit"], "total"),
    }
    exprs = " ".join(t.get("expr", "") for _, t in _targets(dashboard))
    assert prometheus_name(trace_entry["name"], trace_entry["unit"], "bucket") in exprs
    namespace = config["connectors"]["span_metrics"]["namespace"].replace(".", "_")
    assert f"{namespace}_calls_total" in exprs
