"""The runaway-agent demo (``otel-budget-demo``) run as a user runs it: a subprocess, with its
arguments, under ``opentelemetry-instrument`` as the compose demo loop runs it, and with
``--spans otlp`` against a real OTLP receiver or against nothing at all."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.redis_server import free_port

LAUNCHER = Path(sys.executable).with_name("opentelemetry-instrument")


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otel_budget.demo", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_reads_well(out: str) -> None:
    """One refusal line, an LLM call stopped, every amount at one precision."""
    assert out.count("STOPPED") == 1
    assert "'s LLM call was refused before it was sent" in out
    assert "would exceed the budget" not in out  # the engine's line: said once, by the demo
    precisions = {len(m) for m in re.findall(r"\$\d+\.(\d+)", out)}
    assert precisions == {6}, precisions


def test_default_run_stops_an_llm_call_and_says_so_once() -> None:
    run = demo()
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert_reads_well(run.stdout)
    assert "terminated by: budget_exceeded" in run.stdout
    assert "% of the budget spent ($" in run.stdout  # the soft thresholds, the demo's words
    tree = run.stdout.split("spans (")[1].splitlines()
    assert tree[-1].strip().startswith("chat gpt-4o-mini") and "BudgetExceededError" in tree[-1]
    assert len(tree) < 20  # the long loop is elided in the middle


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "abc"], "argument --budget: the budget must look like"),
        (["--budget", "-1"], "argument --budget"),
        (["--budget", "1e308"], "argument --budget"),
        (["--max-turns", "0"], "argument --max-turns"),
        (["--max-turns", "x"], "argument --max-turns"),
        (["--spans", "jaeger"], "argument --spans: invalid choice"),
    ],
)
def test_bad_arguments_are_one_usage_line(args: list[str], message: str) -> None:
    run = demo(*args)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("otel-budget-demo: error: ") and message in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_help_names_the_program_and_every_option() -> None:
    run = demo("--help")
    assert run.returncode == 0 and run.stdout.startswith("usage: otel-budget-demo ")
    for option in ("--budget USD", "--model MODEL", "--max-turns N", "--spans"):
        line = next(line for line in run.stdout.splitlines() if line.strip().startswith(option))
        assert len(line.split()) > len(option.split()), line  # a help text follows


def test_otlp_without_a_collector_says_so_up_front() -> None:
    start = time.perf_counter()
    run = demo("--spans", "otlp", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert run.returncode == 2 and run.stdout == ""  # before the agent runs
    assert "no OTLP collector answers at 127.0.0.1:" in run.stderr
    assert "docker compose -f examples/compose.yaml up otel-collector" in run.stderr
    assert run.stderr.count("\n") == 1
    assert time.perf_counter() - start < 60


def test_otlp_with_a_collector_exports_the_run() -> None:
    from tests.otlp_receiver import OTLPReceiver

    with OTLPReceiver() as receiver:
        run = demo("--spans", "otlp", env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint})
        assert run.returncode == 0, run.stderr
        spans = receiver.wait_for(
            lambda spans: any(s["name"] == "invoke_agent runaway" for s in spans)
        )
    assert any(s["name"] == "chat gpt-4o-mini" for s in spans)


@pytest.mark.skipif(not LAUNCHER.exists(), reason="opentelemetry-instrument is not installed")
def test_under_the_launcher_no_override_or_double_instrumentation() -> None:
    """The compose demo loop: opentelemetry-instrument already set the provider and loaded
    BudgetInstrumentor through its entry point; the demo uses both instead of warning."""
    env = {
        **os.environ,
        "OTEL_SERVICE_NAME": "runaway-agent-demo",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    run = subprocess.run(
        [str(LAUNCHER), sys.executable, "-m", "otel_budget.demo", "--spans", "none"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    both = run.stdout + run.stderr
    assert "Overriding of current TracerProvider" not in both
    assert "already instrumented" not in both
    assert both.count("STOPPED") == 1 and "would exceed the budget" not in both
