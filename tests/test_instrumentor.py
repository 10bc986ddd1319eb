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


# -- every instrumentor of a third-party package: one frame (instrumentation._sdk) --------------
FRAMED = {
    "openai": ("otel_budget.instrumentation.openai", "OpenAIBudgetInstrumentor"),
    "anthropic": ("otel_budget.instrumentation.anthropic", "AnthropicBudgetInstrumentor"),
    "litellm": ("otel_budget.instrumentation.litellm", "LiteLLMBudgetInstrumentor"),
    "mcp": ("otel_budget.instrumentation.mcp", "MCPInstrumentor"),
    "crewai": ("otel_budget.instrumentation.crewai", "CrewAIInstrumentor"),
    "agents": ("otel_budget.instrumentation.openai_agents", "OpenAIAgentsInstrumentor"),
    "langchain_core": ("otel_budget.instrumentation.langchain", "LangChainInstrumentor"),
}

FRAME_APP = textwrap.dedent(
    """
    import asyncio, importlib, inspect, os, sys, threading
    import wrapt

    mode, module, name, package = sys.argv[1:5]
    OURS = os.sep + "otel_budget" + os.sep

    def loaded():
        return {m for m in sys.modules if m == package or m.startswith(package + ".")}

    cls = getattr(importlib.import_module(module), name)
    print("package loaded by our module", bool(loaded()))
    instrumentor = cls()

    def present():
        # (owner, attribute) of every row of the table this version has; importing a row's
        # module is the application importing it (it fires that module's hook, if any).
        out = []
        for module_name, path, attribute, _ in cls._TARGETS:
            try:
                owner = importlib.import_module(module_name)
            except Exception:
                continue
            for part in path.split(".") if path else ():
                owner = getattr(owner, part, None)
            if owner is not None and attribute in vars(owner):
                out.append((owner, attribute))
        return out

    def held(rows):
        return [vars(owner).get(attribute) for owner, attribute in rows]

    def wrapped_once(values):
        return bool(values) and all(
            isinstance(v, wrapt.FunctionWrapper)
            and not isinstance(v.__wrapped__, wrapt.FunctionWrapper) for v in values
        )

    # The only code of ours a wrapper left over from uninstrument() may run: the switch's
    # truth test (wrapt's ``enabled``), which sends the call straight to the original.
    switch = getattr(importlib.import_module("otel_budget.instrumentation._sdk"), "Switch", None)
    allowed = {switch.__bool__.__code__} if switch is not None else set()
    RESULT = object()

    def straight_through(stale):
        seen, calls = [], []
        original = stale.__wrapped__

        def probe(*args, **kwargs):
            calls.append((args, kwargs))
            return RESULT

        async def aprobe(*args, **kwargs):
            return probe(*args, **kwargs)

        def profile(frame, event, arg):
            code = frame.f_code
            if event == "call" and OURS in code.co_filename and code not in allowed:
                seen.append(code.co_name)

        stale.__wrapped__ = aprobe if inspect.iscoroutinefunction(original) else probe
        sys.setprofile(profile)
        try:
            result = stale("x", key=1)
            if inspect.iscoroutine(result):
                result = asyncio.run(result)
        except BaseException as exc:
            result = exc
        finally:
            sys.setprofile(None)
            stale.__wrapped__ = original
        return result is RESULT and calls == [(("x",), {"key": 1})] and not seen

    if mode == "wire":
        before = loaded()
        instrumentor.instrument()
        print("instrument imported", sorted(loaded() - before))
        # The application's first import, from several threads at once.
        threads = [threading.Thread(target=importlib.import_module, args=(package,)) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        rows = present()
        live = held(rows)
        print("wrapped once", wrapped_once(live))
        instrumentor.uninstrument()
        print("originals back", bool(rows) and all(
            now is wrapper.__wrapped__ for now, wrapper in zip(held(rows), live)))
        print("left-over wrappers pass straight through", all(straight_through(w) for w in live))
    else:
        instrumentor.instrument()
        instrumentor.uninstrument()
        instrumentor.instrument()   # a second hook, disarmed too
        instrumentor.uninstrument()
        importlib.import_module(package)
        rows = present()
        print("import after uninstrument wraps nothing", bool(rows) and not any(
            isinstance(v, wrapt.FunctionWrapper) for v in held(rows)))
        originals = held(rows)
        instrumentor.instrument()   # imported now: wrapped at once
        print("instrumented again", wrapped_once(held(rows)))
        instrumentor.uninstrument()
        print("originals back again", all(a is b for a, b in zip(held(rows), originals)))
    """
)


def _interpreter_for(package: str) -> str:
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        return sys.executable
    if package == "crewai" and os.environ.get("OTEL_BUDGET_TEST_CREWAI_PYTHON"):
        return os.environ["OTEL_BUDGET_TEST_CREWAI_PYTHON"]  # CrewAI's own venv (tests/run.sh)
    pytest.skip(f"{package} is not installed here")


def test_every_instrumentor_of_a_package_is_built_on_the_frame() -> None:
    from otel_budget.instrumentation import _FRAMEWORKS, _INSTRUMENTORS
    from otel_budget.instrumentation._sdk import SDKInstrumentor

    listed = {*_INSTRUMENTORS.values(), *_FRAMEWORKS.values()}
    assert listed == set(FRAMED.values())
    for module, name in listed:
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except ImportError:  # crewai's module imports nothing of CrewAI, but be safe
            continue
        assert issubclass(cls, SDKInstrumentor) and cls._TARGETS, name


@pytest.mark.parametrize("mode", ["wire", "disarm"])
@pytest.mark.parametrize("package", sorted(FRAMED))
def test_each_framed_instrumentor_wires_on_import_and_unwires_exactly(
    package: str, mode: str, tmp_path: Path
) -> None:
    """In a fresh interpreter, for every instrumentor built on the frame. ``wire``:
    ``instrument()`` before the package is imported imports none of it; the application's
    first import (from four threads at once) wraps every row of the table present in this
    version, once; ``uninstrument()`` puts exactly the originals back, and a wrapper still
    referenced calls the original straight away. ``disarm``: instrumented and uninstrumented
    (twice) before the import, the import wraps nothing; instrumenting again wraps at once,
    and ``uninstrument()`` restores the originals."""
    module, name = FRAMED[package]
    script = tmp_path / "frame_app.py"
    script.write_text(FRAME_APP)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(PYTHONPATH=src, LITELLM_LOCAL_MODEL_COST_MAP="True", OPENAI_AGENTS_DISABLE_TRACING="1")
    result = subprocess.run(
        [_interpreter_for(package), str(script), mode, module, name, package],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    if mode == "wire":
        if package == "langchain_core":  # our handler subclasses langchain_core's: loaded with it
            assert "package loaded by our module True" in out, out
        else:  # nothing of it imported, before instrument() or by it
            assert "package loaded by our module False" in out, out
            assert "instrument imported []" in out, out
        assert "wrapped once True" in out, out
        assert "originals back True" in out, out
        assert "left-over wrappers pass straight through True" in out, out + result.stderr[-3000:]
    else:
        assert "import after uninstrument wraps nothing True" in out, out
        assert "instrumented again True" in out, out
        assert "originals back again True" in out, out


# -- the frame itself, on a package of our own --------------------------------------------------
FAKE_SDK = {
    "fakesdk/__init__.py": textwrap.dedent(
        """
        import os, time
        from fakesdk import base

        time.sleep(float(os.environ.get("FAKESDK_SLOW", "0")))   # an import in progress

        def fn(x):
            return ("fn", x)

        class Client:
            def send(self, x):
                return ("send", x)

        class Sub(base.Base):   # run: from a class the table wraps; helper: from one it does not
            pass
        """
    ),
    "fakesdk/base.py": textwrap.dedent(
        """
        class Base:
            def run(self, x):
                return ("run", x)

            def helper(self, x):
                return ("helper", x)
        """
    ),
}

FRAME_UNIT = textwrap.dedent(
    """
    import logging, os, sys, threading, time
    import wrapt
    from otel_budget.instrumentation._sdk import SDKInstrumentor, given_original

    logging.basicConfig(stream=sys.stdout, format="LOG %(levelname)s %(message)s")
    mode = sys.argv[1]
    calls, seen = [], []

    def factory(tag):
        def make(tracer, source):
            def wrapper(wrapped, instance, args, kwargs):
                calls.append(tag)
                return wrapped(*args, **kwargs)
            return wrapper
        return make

    def send_factory(tracer, source, original):
        if mode == "failure":
            raise RuntimeError("boom")
        seen.append(original)
        return factory("send")(tracer, source)

    class Fake(SDKInstrumentor):
        _SDK = "fakesdk"
        _TARGETS = (
            ("fakesdk", "", "fn", factory("fn")),
            ("fakesdk", "Client", "send", given_original(send_factory)),
            ("fakesdk.base", "Base", "run", factory("run")),
            ("fakesdk", "Sub", "run", factory("sub.run")),
            ("fakesdk", "Sub", "helper", factory("sub.helper")),
            ("fakesdk.absent", "X", "y", factory("absent")),
            ("fakesdk", "Client", "missing", factory("missing")),
        )

        def instrumentation_dependencies(self):
            return ()

        def _absent(self, targets):
            print("absent", sorted(f"{m}:{o}.{n}" for m, o, n, _ in targets))

    instrumentor = Fake()
    if mode == "failure":
        instrumentor.instrument()
        import fakesdk   # the application's import: never fails because of us
        print("imported", fakesdk.fn(1))
        print("nothing wrapped", not any(isinstance(v, wrapt.FunctionWrapper)
              for v in (vars(fakesdk)["fn"], vars(fakesdk.Client)["send"], vars(fakesdk.base.Base)["run"])))
        sys.exit(0)

    # An import in progress in another thread when instrument() is called: waited for.
    importer = threading.Thread(target=__import__, args=("fakesdk",))
    importer.start()
    while "fakesdk" not in sys.modules:
        time.sleep(0.001)
    print("partial at instrument", not hasattr(sys.modules["fakesdk"], "Client"))
    instrumentor.instrument()
    importer.join()
    import fakesdk
    client, sub = fakesdk.Client(), fakesdk.Sub()
    print("results", fakesdk.fn(1), client.send(2), sub.run(3), sub.helper(4))
    print("calls", calls)
    print("original given", seen == [vars(fakesdk.Client)["send"].__wrapped__])
    bound = client.send                      # held by the application
    theirs = wrapt.FunctionWrapper(vars(fakesdk.Client)["send"], lambda w, i, a, k: ("theirs", w(*a, **k)))
    fakesdk.Client.send = theirs              # another instrumentation wraps ours
    calls.clear()
    instrumentor.uninstrument()
    print("helper deleted from Sub", "helper" not in vars(fakesdk.Sub))
    print("plain again", not any(isinstance(v, wrapt.FunctionWrapper) for v in (
        vars(fakesdk)["fn"], vars(fakesdk.base.Base)["run"])))
    print("theirs kept", vars(fakesdk.Client)["send"] is theirs)
    print("after", fakesdk.fn(1), client.send(2), bound(3), sub.run(4), sub.helper(5), calls)
    """
)


def _run_fake(mode: str, tmp_path: Path) -> str:
    for name, text in FAKE_SDK.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "app.py").write_text(FRAME_UNIT)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(PYTHONPATH=os.pathsep.join((src, str(tmp_path))), FAKESDK_SLOW="0.5")
    result = subprocess.run([sys.executable, str(tmp_path / "app.py"), mode], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_frame_wraps_a_package_imported_in_another_thread_and_unwraps_exactly(
    tmp_path: Path,
) -> None:
    """Rows of module functions and methods; an original handed to its factory; a method
    inherited from a class the table wraps is wrapped there only (one call, one wrapper),
    one inherited from a class it does not is wrapped on the subclass and deleted again;
    absent rows are reported; ``instrument()`` while another thread is importing the
    package waits for it; after ``uninstrument()`` another instrumentation's wrapper around
    ours stays theirs, and ours, inside it or bound by the app, passes straight through."""
    out = _run_fake("thread", tmp_path)
    assert "partial at instrument True" in out, out
    assert "absent ['fakesdk.absent:X.y', 'fakesdk:Client.missing']" in out, out
    assert "results ('fn', 1) ('send', 2) ('run', 3) ('helper', 4)" in out, out
    assert "calls ['fn', 'send', 'run', 'sub.helper']" in out, out
    assert "original given True" in out, out
    assert "helper deleted from Sub True" in out, out
    assert "plain again True" in out, out
    assert "theirs kept True" in out, out
    assert "after ('fn', 1) ('theirs', ('send', 2)) ('send', 3) ('run', 4) ('helper', 5) []" in out, out


def test_a_failure_while_wrapping_is_logged_never_raised_into_the_import(tmp_path: Path) -> None:
    """A factory that raises: the application's import succeeds, nothing of that hook is
    wrapped (no half-instrumented package), and the error names the package and says its
    calls are not budgeted."""
    out = _run_fake("failure", tmp_path)
    assert "imported ('fn', 1)" in out, out
    assert "nothing wrapped True" in out, out
    assert "LOG ERROR otel-budget: could not instrument fakesdk; its calls are NOT budgeted: boom" in out, out
