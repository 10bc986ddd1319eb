"""BudgetInstrumentor: wiring, idempotence, uninstrument, no-SDK mode, env configuration."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from otel_budget import BudgetInstrumentor
from otel_budget.config import libraries_from_env, settings_from_env
from otel_budget.testing import FakeLLMServer

openai = pytest.importorskip("openai")


@pytest.fixture
def server() -> Any:
    with FakeLLMServer() as fake:
        yield fake


def test_instrument_twice_then_uninstrument(server: Any, exporter: Any, make_processor: Any) -> None:
    from openai.resources.chat.completions import Completions
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from tests.conftest import PROVIDER, SWITCH

    original = Completions.__dict__["create"]
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(max_usd=5, tracer_provider=PROVIDER, libraries=("openai",))
    instrumentor.instrument(max_usd=5, tracer_provider=PROVIDER, libraries=("openai",))
    SWITCH.chain[:] = [SimpleSpanProcessor(exporter)]
    try:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        with trace.get_tracer("t").start_as_current_span("agent"):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        chats = [s for s in exporter.get_finished_spans() if s.name == "chat gpt-4o-mini"]
        assert len(chats) == 1  # not double-wrapped
        assert Completions.__dict__["create"] is not original
    finally:
        processor = instrumentor.processor
        instrumentor.uninstrument()
    assert Completions.__dict__["create"] is original
    assert processor is not None and processor._shutdown
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


NO_SDK = textwrap.dedent(
    """
    import os, openai
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from otel_budget import BudgetExceededError, BudgetInstrumentor

    BudgetInstrumentor().instrument(max_usd=0.0005)   # only the API's proxy provider exists
    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    calls = 0
    try:
        while calls < 500:
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": "hello " * 40}])
            calls += 1
    except BudgetExceededError:
        print("stopped without SDK after", calls)
    # The app configures the SDK late: the processor follows, and roots get the breakdown.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    with trace.get_tracer("app").start_as_current_span("late-root"):
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
    root = [s for s in exporter.get_finished_spans() if s.name == "late-root"][0]
    print("late root spent", root.attributes.get("otel_budget.trace.spent_usd"))
    """
)


def run_app(source: str, server: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``source`` run as a fresh app (no OTEL_* variables) against the fake ``server``."""
    script = tmp_path / "app.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["FAKE_URL"] = server.openai_base_url
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_enforcement_without_sdk_and_late_provider(server: Any, tmp_path: Path) -> None:
    result = run_app(NO_SDK, server, tmp_path)
    assert "stopped without SDK after" in result.stdout, result.stdout + result.stderr
    assert server.stats()["billed_usd"] <= 0.0005 + 1e-6  # the late call is within the cap too
    spent = float(result.stdout.split("late root spent")[1])
    assert spent > 0


def test_settings_from_env() -> None:
    kwargs = settings_from_env({
        "OTEL_BUDGET_MAX_USD": "$0.05",
        "OTEL_BUDGET_SCOPES": "user:20/day, tenant:500/month,session:2",
        "OTEL_BUDGET_FAILURE_POLICY": "fail_closed",
        "OTEL_BUDGET_THRESHOLDS": "0.9,0.5",
        "OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS": "1024",
        "OTEL_BUDGET_CAP_OUTPUT_TOKENS": "false",
        "OTEL_BUDGET_MIN_OUTPUT_TOKENS": "8",
        "OTEL_BUDGET_STREAM_INCLUDE_USAGE": "no",
        "OTEL_BUDGET_UNKNOWN_MODEL": "5,15",
    })  # fmt: skip
    assert kwargs["max_usd"] == "$0.05"
    assert [(r.kind, r.window) for r in kwargs["scopes"]] == [("user", "day"), ("tenant", "month"), ("session", None)]
    assert kwargs["failure_policy"] == "fail_closed"
    assert kwargs["cap_output_tokens"] is False and kwargs["stream_include_usage"] is False
    assert kwargs["default_max_output_tokens"] == 1024 and kwargs["min_output_tokens"] == 8
    quote = kwargs["prices"].quote("acme", "acme-llm", __import__("otel_budget").TokenUsage(input_tokens=10**6))
    assert quote.nanos == 5 * 10**9
    assert settings_from_env({}) == {}
    assert libraries_from_env({"OTEL_BUDGET_INSTRUMENT": "openai, litellm"}) == ("openai", "litellm")


@pytest.mark.parametrize(("name", "value"), [
    ("OTEL_BUDGET_MAX_USD", "nan"), ("OTEL_BUDGET_MAX_USD", "-1"), ("OTEL_BUDGET_MAX_USD", "lots"),
    ("OTEL_BUDGET_SCOPES", "user20"), ("OTEL_BUDGET_SCOPES", "user:20/week"),
    ("OTEL_BUDGET_SCOPES", "user:-5"), ("OTEL_BUDGET_FAILURE_POLICY", "maybe"),
    ("OTEL_BUDGET_THRESHOLDS", "half"), ("OTEL_BUDGET_THRESHOLDS", "1.5"),
    ("OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS", "0"), ("OTEL_BUDGET_CAP_OUTPUT_TOKENS", "sure"),
    ("OTEL_BUDGET_UNKNOWN_MODEL", "free"), ("OTEL_BUDGET_PRICES_FILE", "/nonexistent.json"),
    ("OTEL_BUDGET_INSTRUMENT", "openai,cohere"),
])  # fmt: skip
def test_bad_env_values_name_the_variable(name: str, value: str) -> None:
    from otel_budget import BudgetSpanProcessor

    with pytest.raises((ValueError, OSError)) as info:
        if name == "OTEL_BUDGET_INSTRUMENT":
            libraries_from_env({name: value})
        else:
            BudgetSpanProcessor(**settings_from_env({name: value}))
    if not isinstance(info.value, OSError):
        assert name in str(info.value)


LAZY = textwrap.dedent(
    """
    import os, sys, threading, time
    from otel_budget import BudgetExceededError, BudgetInstrumentor

    def wrapped(cls, method):
        return type(getattr(cls, method)).__name__.endswith("FunctionWrapper")

    started = time.process_time()
    BudgetInstrumentor().instrument(max_usd=0.0005)
    print("instrument cpu", time.process_time() - started)
    # instrument() imports no provider SDK: an app that never uses one never loads it
    print("imported", sorted(m for m in ("openai", "anthropic", "litellm", "mcp") if m in sys.modules))
    # Uninstrumented before the SDK is imported: the armed hook does nothing when it is.
    BudgetInstrumentor().uninstrument()
    BudgetInstrumentor().instrument(max_usd=0.0005)   # armed again (a second hook)
    import anthropic.resources.messages as m
    print("anthropic wrapped", wrapped(m.Messages, "create"), wrapped(m.AsyncMessages, "stream"))
    # Imported from a thread while another imports it too: wrapped once, enforced.
    threads = [threading.Thread(target=__import__, args=("openai",)) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    import openai
    from openai.resources.chat.completions import Completions
    inner = Completions.create.__wrapped__
    print("openai wrapped once", wrapped(Completions, "create")
          and not type(inner).__name__.endswith("FunctionWrapper"))
    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    try:
        for _ in range(50):
            client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                           messages=[{"role": "user", "content": "hi " * 300}])
        print("NOT STOPPED")
    except BudgetExceededError as exc:
        print("stopped", exc.reason)
    BudgetInstrumentor().uninstrument()
    print("unwrapped", not wrapped(Completions, "create"), not wrapped(m.Messages, "create"))
    """
)


def test_instrument_imports_no_sdk_and_wraps_each_when_the_app_imports_it(
    server: Any, tmp_path: Path
) -> None:
    """Provider SDKs are wrapped by post-import hooks: instrument() loads none (anthropic
    alone is over a second of CPU), and an SDK imported later is wrapped before its first
    call, once, even when imported from several threads; uninstrument() disarms hooks."""
    result = run_app(LAZY, server, tmp_path)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "imported []" in out, out
    assert "anthropic wrapped True True" in out, out
    assert "openai wrapped once True" in out, out
    assert "stopped limit" in out, out
    assert "unwrapped True True" in out, out
    assert 0 < server.stats()["billed_usd"] <= 0.0005 + 1e-9
