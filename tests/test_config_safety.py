"""Configuration never switches the budget off.

Zero-code runs (``opentelemetry-instrument`` in a subprocess) against the fake provider,
asserting what it billed: one invalid optional variable never discards a valid
``OTEL_BUDGET_MAX_USD``; an unreadable limit or an unbuildable ledger refuses paid calls
with reason ``configuration`` (unless fail_open is explicit); a second ``instrument()`` with
other settings applies them; unknown models go through only where no limit applies.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from otel_budget import BudgetExceededError, BudgetInstrumentor, budget
from otel_budget import api as budget_api
from otel_budget import attributes as attrs
from otel_budget.testing import FakeLLMServer
from tests.test_zero_code import INSTRUMENT

openai = pytest.importorskip("openai")

LIMIT = 0.01
# Up to 50 calls of gpt-4o, each ~200 output tokens ($0.002): about $0.10 when nothing stops
# them. (The projection is dominated by the output cap, which is exact.)
LOOP = textwrap.dedent(
    """
    import os, sys, openai
    from otel_budget import BudgetExceededError
    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    calls = 0
    try:
        while calls < 50:
            client.chat.completions.create(model=os.environ.get("MODEL", "gpt-4o"),
                                           messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=200)
            calls += 1
    except BudgetExceededError as exc:
        print(f"STOPPED after {calls} calls: reason={exc.reason} scope={exc.scope}", flush=True)
        print(f"MESSAGE {exc}", flush=True)
        sys.exit(0)
    print(f"NOT STOPPED after {calls} calls", flush=True)
    """
)
PLAIN = textwrap.dedent(
    """
    import os, openai
    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    for model in ("my-finetune", "my-finetune"):
        client.chat.completions.create(model=model, max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}])
    print("DONE")
    """
)
IN_APP = textwrap.dedent(
    """
    import os, openai
    from otel_budget import BudgetExceededError, BudgetInstrumentor
    BudgetInstrumentor().instrument()          # must not raise ImportError into the app
    client = openai.OpenAI(base_url=os.environ["FAKE_URL"], api_key="x", max_retries=0)
    try:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                       messages=[{"role": "user", "content": "hi"}])
        print("SENT")
    except BudgetExceededError as exc:
        print("REFUSED", exc.reason)
    """
)
# A redis package that cannot be imported (as when otel-budget[redis] is not installed).
NO_REDIS = 'raise ModuleNotFoundError("No module named \'redis\' (test shim)", name="redis")\n'
REDIS_URL = "redis://127.0.0.1:1/0"
ONE_INVALID = [
    ("OTEL_BUDGET_THRESHOLDS", "50,80,95"),
    ("OTEL_BUDGET_MIN_OUTPUT_TOKENS", "0"),
    ("OTEL_BUDGET_SCOPES", "user:20/daily"),
    ("OTEL_BUDGET_SCOPES", "user:20/week"),
    ("OTEL_BUDGET_REDIS_URL", "localhost:6379"),
    ("OTEL_BUDGET_PRICES_FILE", "/nonexistent/prices.json"),
    ("OTEL_BUDGET_FAILURE_POLICY", "closed"),
    ("OTEL_BUDGET_TRESHOLDS", "0.5"),  # a misspelt name: reported, ignored
]


class Run:
    def __init__(self, stdout: str, stderr: str, stats: dict[str, Any]) -> None:
        self.stdout, self.stderr, self.stats = stdout, stderr, stats
        self.billed = stats["billed_usd"]

    @property
    def out(self) -> str:
        return self.stdout + self.stderr


def _cases(shim: str) -> dict[str, tuple[str, dict[str, str], bool]]:
    """name -> (script, environment, under opentelemetry-instrument)."""
    no_redis = {"PYTHONPATH": os.pathsep.join([shim, os.environ.get("PYTHONPATH", "")]),
                "OTEL_BUDGET_REDIS_URL": REDIS_URL}  # fmt: skip
    cases = {
        f"{name}={value}": (LOOP, {"OTEL_BUDGET_MAX_USD": str(LIMIT), name: value}, True)
        for name, value in ONE_INVALID
    }
    cases.update({
        # A control character in the value must reach the log escaped.
        "max_usd invalid": (LOOP, {"OTEL_BUDGET_MAX_USD": "0.01\x1b[2J"}, True),
        "max_usd misspelt": (LOOP, {"OTEL_BUDGET_MAX_USDD": str(LIMIT)}, True),
        "max_usd invalid, fail_open": (LOOP, {
            "OTEL_BUDGET_MAX_USD": "lots", "OTEL_BUDGET_FAILURE_POLICY": "fail_open"}, True),
        "no redis, fail_closed": (LOOP, {**no_redis, "OTEL_BUDGET_MAX_USD": str(LIMIT),
                                         "OTEL_BUDGET_FAILURE_POLICY": "fail_closed"}, True),
        "no redis, fail_open": (LOOP, {**no_redis, "OTEL_BUDGET_MAX_USD": str(LIMIT),
                                       "OTEL_BUDGET_FAILURE_POLICY": "fail_open"}, True),
        "no redis, in app": (IN_APP, {**no_redis, "OTEL_BUDGET_FAILURE_POLICY": "fail_closed"},
                             False),
        "unknown model, no budget": (PLAIN, {}, True),
        "unknown model, budget": (LOOP, {"OTEL_BUDGET_MAX_USD": "1", "MODEL": "my-finetune"},
                                  True),
    })  # fmt: skip
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> dict[str, Run]:
    """Every zero-code case, run concurrently (each is a fresh interpreter: seconds), each
    against its own fake provider, whose bill is the truth."""
    assert INSTRUMENT is not None
    tmp = tmp_path_factory.mktemp("config_safety")
    shim = tmp / "shim"
    (shim / "redis").mkdir(parents=True)
    (shim / "redis" / "__init__.py").write_text(NO_REDIS)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTEST"))}
    base.update(
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="openai,anthropic", OTEL_SERVICE_NAME="config-safety",
        OTEL_TRACES_EXPORTER="none", OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none",
        OTEL_BUDGET_INSTRUMENT="openai",
    )  # fmt: skip
    started = []
    try:
        for i, (name, (script, env_extra, instrumented)) in enumerate(_cases(str(shim)).items()):
            server = FakeLLMServer(default_output_tokens=200)
            server.__enter__()
            path = tmp / f"agent{i}.py"
            path.write_text(script)
            env = {**base, "FAKE_URL": server.openai_base_url, **env_extra}
            argv = [INSTRUMENT, sys.executable, str(path)] if instrumented else [
                sys.executable, str(path)]  # fmt: skip
            process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)  # fmt: skip
            started.append((name, server, process))
        results = {}
        for name, server, process in started:
            stdout, stderr = process.communicate(timeout=300)
            results[name] = Run(stdout, stderr, server.stats())
        return results
    finally:
        for _, server, process in started:
            if process.poll() is None:
                process.kill()
            server.__exit__(None, None, None)


# -- 1. one invalid optional variable never discards a valid OTEL_BUDGET_MAX_USD ---------------
@pytest.mark.parametrize(("name", "value"), ONE_INVALID)
def test_one_invalid_variable_keeps_the_budget(runs: dict[str, Run], name: str, value: str) -> None:
    run = runs[f"{name}={value}"]
    assert "STOPPED after" in run.stdout and "reason=limit" in run.stdout, run.out
    assert 0 < run.billed <= LIMIT
    assert f"{name}={value!r} is invalid" in run.stderr, run.stderr
    assert "NOT budgeted" not in run.stderr


def test_invalid_max_usd_refuses_paid_calls_with_reason_configuration(runs: dict[str, Run]) -> None:
    run = runs["max_usd invalid"]
    assert "STOPPED after 0 calls: reason=configuration scope=configuration" in run.stdout, run.out
    assert run.billed == 0
    message = run.stdout.split("MESSAGE ", 1)[1]
    assert "OTEL_BUDGET_MAX_USD" in message and "$0.0000" not in message
    assert "OTEL_BUDGET_MAX_USD='0.01\\x1b[2J' is invalid" in run.stderr, run.stderr
    assert "\x1b" not in run.stderr


def test_misspelt_max_usd_refuses_paid_calls(runs: dict[str, Run]) -> None:
    """A limit asked for under a wrong name is a limit that cannot be read, not no limit."""
    run = runs["max_usd misspelt"]
    assert "STOPPED after 0 calls: reason=configuration" in run.stdout, run.out
    assert run.billed == 0
    assert "did you mean OTEL_BUDGET_MAX_USD?" in run.stderr, run.stderr


def test_misspelt_variables_are_reported_by_name() -> None:
    from opentelemetry import environment_variables as api_env
    from opentelemetry.sdk import environment_variables as sdk_env

    from otel_budget.config import read_env

    config = read_env({"otel_budget_max_usd": "1", "OTEL_BUGDET_SCOPES": "user:5"})
    assert config.refusal is not None
    assert [p.variable for p in config.problems] == ["OTEL_BUGDET_SCOPES", "otel_budget_max_usd"]
    config = read_env({"OTEL_BUDGET_MAX_USD": "1", "OTEL_BUDGET_MAX_USDD": "2",
                       "OTEL_BUDGET_WHATEVER": "x"})  # fmt: skip
    assert config.refusal is None and config.kwargs["max_usd"] == "1"
    assert [(p.variable, p.fallback) for p in config.problems] == [
        ("OTEL_BUDGET_MAX_USDD", "ignored"), ("OTEL_BUDGET_WHATEVER", "ignored")]
    # The SDK's and the API's own variables are never taken for misspellings of ours.
    standard = {
        value: "x" for module in (api_env, sdk_env) for name, value in vars(module).items()
        if name.startswith("OTEL_") and isinstance(value, str)
    }  # fmt: skip
    assert len(standard) > 50 and read_env(standard).problems == []


def test_invalid_max_usd_with_explicit_fail_open_runs_and_says_so(runs: dict[str, Run]) -> None:
    run = runs["max_usd invalid, fail_open"]
    assert "NOT STOPPED after 50 calls" in run.stdout, run.out
    assert run.billed > LIMIT
    assert "OTEL_BUDGET_MAX_USD='lots' is invalid" in run.stderr
    assert "fail_open: this limit is NOT applied" in run.stderr


def test_invalid_scope_amount_refuses_unless_fail_open() -> None:
    from otel_budget.config import read_env

    config = read_env({"OTEL_BUDGET_MAX_USD": "1", "OTEL_BUDGET_SCOPES": "user:lots,tenant:5"})
    assert config.refusal is not None and config.refusal.variable == "OTEL_BUDGET_SCOPES"
    assert [r.kind for r in config.kwargs["scopes"]] == ["tenant"]
    config = read_env({"OTEL_BUDGET_SCOPES": "user:lots", "OTEL_BUDGET_FAILURE_POLICY": "fail_open"})
    assert config.refusal is None and config.problems[0].variable == "OTEL_BUDGET_SCOPES"
    # An unknown window keeps the limit for the scope's lifetime (stricter: never reset).
    config = read_env({"OTEL_BUDGET_SCOPES": "user:20/week"})
    assert [(r.kind, r.limit_nanos, r.window) for r in config.kwargs["scopes"]] == [
        ("user", 20 * 10**9, None)
    ]
    # An invalid failure policy is the stricter one.
    assert read_env({"OTEL_BUDGET_FAILURE_POLICY": "closed"}).kwargs["failure_policy"] == "fail_closed"


# -- 2. redis-py missing: the instrumentor still loads, the policy decides ---------------------
@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
def test_redis_url_without_redis_package_zero_code(runs: dict[str, Run], policy: str) -> None:
    run = runs[f"no redis, {policy}"]
    assert "Importing of otel_budget failed" not in run.out
    assert f"OTEL_BUDGET_REDIS_URL={REDIS_URL!r} is invalid" in run.stderr, run.out
    assert "ImportError" in run.stderr
    if policy == "fail_closed":
        assert "STOPPED after 0 calls: reason=configuration" in run.stdout, run.out
        assert run.billed == 0
    else:
        assert "this process's own ledger" in run.stderr
        assert "reason=limit" in run.stdout, run.out
        assert 0 < run.billed <= LIMIT


def test_redis_url_without_redis_package_in_app(runs: dict[str, Run]) -> None:
    run = runs["no redis, in app"]
    assert "REFUSED configuration" in run.stdout, run.out
    assert run.stats["requests"] == 0


# -- 4. instrument() again with other settings applies them ------------------------------------
@pytest.fixture
def server() -> Any:
    with FakeLLMServer() as fake:
        yield fake


def _chat(client: Any, model: str = "gpt-4o-mini") -> Any:
    return client.chat.completions.create(
        model=model, max_tokens=20, messages=[{"role": "user", "content": "hello " * 20}]
    )


def test_instrument_again_with_other_settings_applies_them(server: Any, exporter: Any) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from tests.conftest import PROVIDER, SWITCH

    SWITCH.chain[:] = [SimpleSpanProcessor(exporter)]
    first = BudgetInstrumentor()
    first.instrument(max_usd=5, tracer_provider=PROVIDER, libraries=("openai",))
    try:
        processor = first.processor
        first.instrument(max_usd=5, tracer_provider=PROVIDER, libraries=("openai",))
        assert first.processor is processor  # the same settings: nothing changes
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        with trace.get_tracer("t").start_as_current_span("agent"):
            _chat(client)
        # Another instance (instrumentors are singletons) with another budget: applied.
        BudgetInstrumentor().instrument(max_usd=0.000001, tracer_provider=PROVIDER,
                                        libraries=("openai",))  # fmt: skip
        assert first.processor is not processor and processor._shutdown
        with pytest.raises(BudgetExceededError) as info:
            with trace.get_tracer("t").start_as_current_span("agent"):
                _chat(client)
        assert info.value.reason == "limit" and info.value.budget_usd == 0.000001
        assert server.stats()["requests"] == 1
        assert len([s for s in exporter.get_finished_spans() if s.name.startswith("chat")]) == 2
    finally:
        first.uninstrument()
        SWITCH.chain[:] = []


def test_budget_warns_once_when_no_library_is_instrumented(
    caplog: Any, monkeypatch: Any
) -> None:
    from otel_budget.instrumentation import instrumented_libraries

    assert instrumented_libraries() == []
    monkeypatch.setattr(budget_api, "_unobserved_warned", False)
    with caplog.at_level(logging.WARNING, logger="otel_budget"):
        with budget(max_usd=1):
            pass
        with budget(max_usd=1):
            pass
    warned = [r for r in caplog.records if "no LLM library is instrumented" in r.getMessage()]
    assert len(warned) == 1


# -- 3 and 5. refusals say why; unknown models only refused where a limit applies --------------
def test_configuration_refusal_in_process(server: Any, monkeypatch: Any) -> None:
    from tests.conftest import PROVIDER

    monkeypatch.setenv("OTEL_BUDGET_MAX_USD", "-1")
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(tracer_provider=PROVIDER, libraries=("openai",))
    try:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        with pytest.raises(BudgetExceededError) as info:
            _chat(client)
        error = info.value
        assert error.reason == "configuration" and error.scope == "configuration"
        assert "OTEL_BUDGET_MAX_USD='-1' is invalid" in str(error)
        assert error.budget_usd is None and "$0.0000" not in str(error)
        assert error.report is not None
        with pytest.raises(BudgetExceededError, match="OTEL_BUDGET_MAX_USD"):
            _chat(client, "my-local-model")  # an unknown model too: every paid call
        assert server.stats()["requests"] == 0
    finally:
        instrumentor.uninstrument()


def test_unknown_model_passes_only_where_no_limit_applies(
    server: Any, exporter: Any, caplog: Any
) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from tests.conftest import PROVIDER, SWITCH

    SWITCH.chain[:] = [SimpleSpanProcessor(exporter)]
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(failure_policy="fail_open", tracer_provider=PROVIDER,
                            libraries=("openai",))  # fmt: skip
    try:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
        with caplog.at_level(logging.WARNING, logger="otel_budget"):
            with trace.get_tracer("t").start_as_current_span("agent"):
                _chat(client, "my-local-model")
                _chat(client, "my-local-model")
            _chat(client, "my-local-model")  # parentless: no process limit either
        assert server.stats()["requests"] == 3
        spans = [s for s in exporter.get_finished_spans() if s.name == "chat my-local-model"]
        assert len(spans) == 3
        assert all(s.attributes[attrs.PRICE_SOURCE] == "unknown" for s in spans)
        warned = [r for r in caplog.records if "no price for model 'my-local-model'" in r.getMessage()]
        assert len(warned) == 1 and "OTEL_BUDGET_UNKNOWN_MODEL" in warned[0].getMessage()
        # Inside a budget() block a limit applies: refused, saying how to price it.
        with pytest.raises(BudgetExceededError) as info:
            with budget(max_usd=1):
                _chat(client, "my-local-model")
        assert info.value.reason == "unknown_model"
        assert "OTEL_BUDGET_UNKNOWN_MODEL" in str(info.value)
        assert info.value.scope.startswith("b:")
        assert server.stats()["requests"] == 3
    finally:
        instrumentor.uninstrument()
        SWITCH.chain[:] = []


def test_plain_zero_code_lets_unknown_models_through(runs: dict[str, Run]) -> None:
    run = runs["unknown model, no budget"]
    assert "DONE" in run.stdout, run.out
    assert run.stats["requests"] == 2
    assert run.stderr.count("no price for model 'my-finetune'") == 1
    # With a limit, the same model is refused, naming the variable that prices it.
    run = runs["unknown model, budget"]
    assert "STOPPED after 0 calls: reason=unknown_model scope=process" in run.stdout, run.out
    assert "OTEL_BUDGET_UNKNOWN_MODEL" in run.stdout
    assert run.stats["requests"] == 0


@pytest.mark.parametrize("value", ["0", "-5", "lots", "\u0663", ""])
def test_unknown_history_tokens_never_lower_the_bound(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid bound for unseen stored history is reported and never projects less than
    the default (``0`` would project a continued conversation at no input at all)."""
    from otel_budget.config import read_env
    from otel_budget.instrumentation.openai import history

    monkeypatch.setattr(history, "context_window", lambda provider, model: None)
    monkeypatch.setenv("OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS", value)
    assert history.unknown_history_tokens("openai", "my-model") == 128_000
    problems = read_env({"OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS": value}).problems
    assert [p.variable for p in problems] == (
        ["OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS"] if value else []
    )
    monkeypatch.setenv("OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS", "500000")
    assert history.unknown_history_tokens("openai", "my-model") == 500_000
