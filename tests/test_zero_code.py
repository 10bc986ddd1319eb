"""Zero-code: ``OTEL_BUDGET_* opentelemetry-instrument python agent.py``, in a subprocess,
exporting with the SDK's real OTLP exporters to a real in-test receiver."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from otel_budget.testing import FakeLLMServer
from tests.otlp_receiver import OTLPReceiver

INSTRUMENT = shutil.which("opentelemetry-instrument", path=str(Path(sys.executable).parent))

AGENT = textwrap.dedent(
    """
    import os, sys
    import openai
    from opentelemetry import trace
    from otel_budget import BudgetExceededError

    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    tracer = trace.get_tracer("agent")
    calls = 0
    try:
        with tracer.start_as_current_span("invoke_agent looper"):
            for _ in range(1000):
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "keep going " * 50}],
                    max_tokens=200,
                )
                calls += 1
    except BudgetExceededError as exc:
        print(f"STOPPED after {calls} calls: scope={exc.scope}", flush=True)
        sys.exit(0)
    print(f"NOT STOPPED after {calls} calls", flush=True)
    sys.exit(3)
    """
)

BARE_AGENT = textwrap.dedent(
    """
    import os, openai
    from otel_budget import BudgetExceededError
    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    calls = 0
    try:
        while calls < 1000:
            client.chat.completions.create(model="gpt-4o-mini",
                                           messages=[{"role": "user", "content": "x" * 400}])
            calls += 1
    except BudgetExceededError as exc:
        print(f"STOPPED after {calls} calls: scope={exc.scope}", flush=True)
    """
)


def run_instrumented(script: str, tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    agent = tmp_path / "agent.py"
    agent.write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTEST"))}
    # Other GenAI instrumentations installed beside ours (the test environment has the
    # official ones and OpenLLMetry: their entry points are named "openai" and "anthropic")
    # are off here, so these tests see our spans alone (and each interpreter starts in half
    # the time: the official anthropic one imports anthropic, which these agents never use);
    # test_zero_code_beside_other_genai_instrumentations runs them together.
    env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "openai,anthropic"
    env.update(
        OTEL_SERVICE_NAME="zero-code-agent",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_BSP_SCHEDULE_DELAY="50",
        **env_extra,
    )
    assert INSTRUMENT is not None, "opentelemetry-instrument is not installed next to python"
    return subprocess.run(
        [INSTRUMENT, sys.executable, str(agent)], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fake_server() -> Any:
    with FakeLLMServer() as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_runaway_agent_stopped_and_breakdown_exported(fake_server: Any, tmp_path: Path, protocol: str) -> None:
    fake_server.reset_stats()
    with OTLPReceiver() as receiver:
        endpoint = receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint
        result = run_instrumented(AGENT, tmp_path, {
            "FAKE_URL": fake_server.openai_base_url,
            "OTEL_BUDGET_MAX_USD": "0.002",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        })  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "STOPPED after" in result.stdout
        spans = receiver.wait_for(lambda s: any(x["name"] == "invoke_agent looper" for x in s))
    billed = fake_server.stats()["billed_usd"]
    assert 0 < billed <= 0.002
    root = next(s for s in spans if s["name"] == "invoke_agent looper")
    a = root["attributes"]
    assert a["otel_budget.trace.budget_usd"] == 0.002
    assert a["otel_budget.trace.terminated_by"] == "budget_exceeded"
    assert a["otel_budget.trace.spent_usd"] == pytest.approx(billed, abs=1e-9)
    assert a["otel_budget.trace.models"] == ("gpt-4o-mini",)
    assert a["otel_budget.trace.aborts"] == 1
    assert root["resource"]["service.name"] == "zero-code-agent"
    chats = [s for s in spans if s["name"] == "chat gpt-4o-mini"]
    refused = [s for s in chats if s["attributes"].get("error.type") == "BudgetExceededError"]
    assert len(refused) == 1 and refused[0]["status_code"] == 2  # STATUS_CODE_ERROR
    assert any(e["name"] == "exception" for e in refused[0]["events"])
    ok = [s for s in chats if "error.type" not in s["attributes"]]
    assert ok and all(s["parent_span_id"] == root["span_id"] for s in ok)
    assert all(s["attributes"]["gen_ai.provider.name"] == "openai" for s in ok)
    assert sum(s["attributes"]["otel_budget.cost.usd"] for s in ok) == pytest.approx(billed)
    assert all("gen_ai.system" not in s["attributes"] for s in chats)


def test_bare_script_loop_is_stopped_in_total(fake_server: Any, tmp_path: Path) -> None:
    fake_server.reset_stats()
    result = run_instrumented(BARE_AGENT, tmp_path, {
        "FAKE_URL": fake_server.openai_base_url, "OTEL_BUDGET_MAX_USD": "0.001",
        "OTEL_TRACES_EXPORTER": "none",
    })  # fmt: skip
    assert "STOPPED after" in result.stdout, result.stdout + result.stderr
    assert "scope=process" in result.stdout
    assert 0 < fake_server.stats()["billed_usd"] <= 0.001


def test_cli_flag_and_bad_env_value(fake_server: Any, tmp_path: Path) -> None:
    # --budget_max_usd comes from our opentelemetry_environment_variables entry point.
    fake_server.reset_stats()
    agent = tmp_path / "agent.py"
    agent.write_text(BARE_AGENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(FAKE_URL=fake_server.openai_base_url, OTEL_TRACES_EXPORTER="none",
               OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")  # fmt: skip
    result = subprocess.run(
        [INSTRUMENT, "--budget_max_usd", "0.0005", sys.executable, str(agent)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "STOPPED after" in result.stdout, result.stdout + result.stderr
    assert fake_server.stats()["billed_usd"] <= 0.0005
    # A NaN budget is not "no budget" in silence: it is an error in the log, and with
    # fail_closed every paid call is refused.
    result = run_instrumented(BARE_AGENT, tmp_path, {
        "FAKE_URL": fake_server.openai_base_url, "OTEL_BUDGET_MAX_USD": "nan",
        "OTEL_BUDGET_FAILURE_POLICY": "fail_closed", "OTEL_TRACES_EXPORTER": "none",
    })  # fmt: skip
    assert "OTEL_BUDGET_MAX_USD" in result.stderr
    assert "STOPPED after 0 calls" in result.stdout


def test_zero_code_beside_other_genai_instrumentations(fake_server: Any, tmp_path: Path) -> None:
    """``opentelemetry-instrument`` with the official GenAI instrumentation and OpenLLMetry
    loaded beside ours (both wrap the same SDK methods, around or inside our wrapper): every
    call is charged once, a run is stopped within its budget, and a bare script's loop is
    still stopped in total (their spans start each call's trace, which must not give every
    call a fresh per-trace budget)."""
    pytest.importorskip("opentelemetry.instrumentation.genai.openai")
    pytest.importorskip("opentelemetry.instrumentation.openai")
    fake_server.reset_stats()
    with OTLPReceiver() as receiver:
        result = run_instrumented(AGENT, tmp_path, {
            "FAKE_URL": fake_server.openai_base_url, "OTEL_BUDGET_MAX_USD": "0.002",
            "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "", "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint,
        })  # fmt: skip
        assert "STOPPED after" in result.stdout, result.stdout + result.stderr
        spans = receiver.wait_for(lambda s: any(x["name"] == "invoke_agent looper" for x in s))
    billed = fake_server.stats()["billed_usd"]
    assert 0 < billed <= 0.002
    root = next(s for s in spans if s["name"] == "invoke_agent looper")
    assert root["attributes"]["otel_budget.trace.spent_usd"] == pytest.approx(billed, abs=1e-9)
    assert any(s["name"] == "openai.chat" for s in spans)  # OpenLLMetry's spans were there
    assert len([s for s in spans if s["name"] == "chat gpt-4o-mini"]) >= 4  # ours and official
    fake_server.reset_stats()
    result = run_instrumented(BARE_AGENT, tmp_path, {
        "FAKE_URL": fake_server.openai_base_url, "OTEL_BUDGET_MAX_USD": "0.001",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "", "OTEL_TRACES_EXPORTER": "none",
    })  # fmt: skip
    assert "STOPPED after" in result.stdout, result.stdout + result.stderr
    assert "scope=process" in result.stdout
    assert 0 < fake_server.stats()["billed_usd"] <= 0.001
