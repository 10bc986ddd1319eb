"""Budgets in W3C baggage: strict parsing, lower-only, across a real HTTP hop."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, context, propagate

from otel_budget import BudgetExceededError
from otel_budget import attributes as attrs
from otel_budget.metered import begin_call
from otel_budget.money import parse_usd
from otel_budget.propagation import (
    BAGGAGE_KEY,
    parse_baggage_budget,
    set_trace_budget,
    trace_budget,
)


def llm(tracer: Any, usd: float) -> None:
    call = begin_call(
        tracer, "chat test-model",
        attributes={attrs.GEN_AI_OPERATION_NAME: "chat", attrs.GEN_AI_REQUEST_MODEL: "test-model",
                    attrs.GEN_AI_PROVIDER_NAME: "openai"},
        projected_nanos=parse_usd(usd), name="test-model", provider="openai",
    )  # fmt: skip
    call.finish(parse_usd(usd))


@pytest.mark.parametrize(("raw", "nanos"), [
    ("2", 2_000_000_000), ("0.25", 250_000_000), ("0", 0), ("1000000", 10**15),
    ("0.000000001", 1),
])  # fmt: skip
def test_valid_values(raw: str, nanos: int) -> None:
    assert parse_baggage_budget(raw) == nanos


@pytest.mark.parametrize("raw", [
    "nan", "NaN", "inf", "-1", "+1", "1e3", "0x10", " 1", "1 ", "$1", "1USD", "", ".5", "5.",
    "1000001", "01", "0.0000000001", "9" * 40, "1,5", "1.5.2", None, 5,
])  # fmt: skip
def test_rejected_values(raw: Any) -> None:
    assert parse_baggage_budget(raw) is None


def test_rejected_value_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="otel_budget"):
        for _ in range(5):
            parse_baggage_budget("-42")
    assert sum("-42" in r.getMessage() for r in caplog.records) == 1


def test_baggage_lowers_but_never_raises(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=1.0)
    ctx = baggage.set_baggage(BAGGAGE_KEY, "0.3")
    token = context.attach(ctx)
    try:
        with tracer.start_as_current_span("request"):
            llm(tracer, 0.2)
            with pytest.raises(BudgetExceededError) as info:
                llm(tracer, 0.2)
            assert info.value.budget_usd == pytest.approx(0.3)
    finally:
        context.detach(token)
    token = context.attach(baggage.set_baggage(BAGGAGE_KEY, "50"))
    try:
        with tracer.start_as_current_span("request2"):
            llm(tracer, 0.6)
            with pytest.raises(BudgetExceededError) as info:
                llm(tracer, 0.6)  # the local cap of $1 still holds
            assert info.value.budget_usd == pytest.approx(1.0)
    finally:
        context.detach(token)
    token = context.attach(baggage.set_baggage(BAGGAGE_KEY, "nan"))
    try:
        with tracer.start_as_current_span("request3"):
            llm(tracer, 0.9)  # garbage is ignored: the local budget applies
    finally:
        context.detach(token)


def test_a_trace_scope_built_once_still_yields_to_baggage(make_processor: Any, tracer: Any) -> None:
    """The trace's ledger scope is built once per trace (a hot-path cache): a baggage budget
    that appears later in the same trace still narrows the calls that carry it, and a limit
    the processor lowers later still applies."""
    processor = make_processor(max_usd=1.0)
    with tracer.start_as_current_span("request"):
        llm(tracer, 0.2)  # no baggage: the trace's scope is cached
        with trace_budget(0.3), pytest.raises(BudgetExceededError) as info:
            llm(tracer, 0.2)
        assert info.value.budget_usd == pytest.approx(0.3)
        llm(tracer, 0.2)  # without the baggage again: $0.4 of $1
        processor.settings.limit_nanos = parse_usd(0.5)
        with pytest.raises(BudgetExceededError) as info:
            llm(tracer, 0.2)
        assert info.value.budget_usd == pytest.approx(0.5)


def test_set_trace_budget_can_only_tighten() -> None:
    ctx = set_trace_budget("0.50")
    assert baggage.get_baggage(BAGGAGE_KEY, ctx) == "0.5"
    ctx = set_trace_budget(5, ctx)
    assert baggage.get_baggage(BAGGAGE_KEY, ctx) == "0.5"
    ctx = set_trace_budget("0.1", ctx)
    assert baggage.get_baggage(BAGGAGE_KEY, ctx) == "0.1"
    with pytest.raises(ValueError):
        set_trace_budget(float("nan"))


def test_w3c_header_round_trip_and_oversized_header(make_processor: Any, tracer: Any) -> None:
    make_processor(max_usd=10)
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("client"), trace_budget(0.4):
        propagate.inject(headers)
    assert f"{BAGGAGE_KEY}=0.4" in headers["baggage"]
    # The receiving side: extract, then calls are limited to the carried $0.40.
    token = context.attach(propagate.extract(headers))
    try:
        with tracer.start_as_current_span("server"):
            llm(tracer, 0.3)
            with pytest.raises(BudgetExceededError):
                llm(tracer, 0.2)
    finally:
        context.detach(token)
    # Malformed and oversized headers: the propagator drops them; nothing raises.
    for bad in (f"{BAGGAGE_KEY}=%ZZ", "x" * 9000, f"{BAGGAGE_KEY}=1;{BAGGAGE_KEY}=", ",,,=,"):
        token = context.attach(propagate.extract({"baggage": bad}))  # a new trace each time
        try:
            with tracer.start_as_current_span("server2"):
                llm(tracer, 0.1)
        finally:
            context.detach(token)


SERVICE = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from opentelemetry import context, propagate, trace
    from opentelemetry.sdk.trace import TracerProvider
    from otel_budget import BudgetExceededError, BudgetSpanProcessor, ModelPrice, PriceBook
    from otel_budget.metered import begin_call

    import os
    storage = None
    if os.environ.get("REDIS_URL"):
        from otel_budget.storage.redis import RedisStorage
        storage = RedisStorage(os.environ["REDIS_URL"])
    provider = TracerProvider()
    provider.add_span_processor(BudgetSpanProcessor(
        max_usd=100, storage=storage,
        prices=PriceBook(overrides={"test-model": ModelPrice(input=1, output=2)})))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("worker")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            token = context.attach(propagate.extract({k.lower(): v for k, v in self.headers.items()}))
            done, error = 0, None
            try:
                with tracer.start_as_current_span("worker"):
                    for _ in range(body["calls"]):
                        call = begin_call(tracer, "chat test-model",
                            attributes={"gen_ai.operation.name": "chat",
                                        "gen_ai.request.model": "test-model",
                                        "gen_ai.provider.name": "openai"},
                            projected_nanos=body["nanos"], name="test-model", provider="openai")
                        call.finish(body["nanos"])
                        done += 1
            except BudgetExceededError as exc:
                error = exc.to_dict()
            finally:
                context.detach(token)
            out = json.dumps({"done": done, "error": error}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.timeout = 30
    for _ in range(int(sys.argv[1])):
        server.handle_request()
    """
)


def test_two_processes_over_http(make_processor: Any, tracer: Any, tmp_path: Path) -> None:
    import json
    import urllib.request

    script = tmp_path / "worker.py"
    script.write_text(SERVICE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    worker = subprocess.Popen([sys.executable, str(script), "1"], stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        port = int(worker.stdout.readline())  # type: ignore[union-attr]
        make_processor(max_usd=10)
        with tracer.start_as_current_span("orchestrator"), trace_budget("0.25"):
            headers = {"Content-Type": "application/json"}
            propagate.inject(headers)  # what the HTTP client instrumentations do
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/", data=json.dumps({"calls": 10, "nanos": 100_000_000}).encode(),
                headers=headers, method="POST",
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
        # The worker's own cap is $100; the carried $0.25 stops it after two $0.10 calls.
        assert answer["done"] == 2
        assert answer["error"]["budget_usd"] == pytest.approx(0.25)
        assert answer["error"]["scope"].startswith("t:")
    finally:
        worker.wait(timeout=30)


def test_two_processes_share_one_trace_budget_on_redis(
    make_processor: Any, tracer: Any, tmp_path: Path
) -> None:
    """The orchestrator spends on the trace, then calls a worker process over HTTP: with a
    shared Redis ledger the worker sees that spend and stops at the trace's budget."""
    import json
    import urllib.request

    pytest.importorskip("redis")
    from otel_budget.storage.redis import RedisStorage
    from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer

    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    server = RedisServer().start()
    try:
        script = tmp_path / "worker.py"
        script.write_text(SERVICE)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env["REDIS_URL"] = server.url
        worker = subprocess.Popen([sys.executable, str(script), "1"], stdout=subprocess.PIPE,
                                  text=True, env=env)  # fmt: skip
        try:
            port = int(worker.stdout.readline())  # type: ignore[union-attr]
            processor = make_processor(max_usd=10, storage=RedisStorage(server.url))
            with tracer.start_as_current_span("orchestrator") as root, trace_budget("0.35"):
                llm(tracer, 0.1)
                llm(tracer, 0.1)  # $0.20 of the $0.35 spent here
                # Queued commits reach the worker within the settle interval; until then
                # they count as reserved there (never as room). The spend it reports below
                # is checked, so they are sent now.
                processor.storage.flush()
                headers = {"Content-Type": "application/json"}
                propagate.inject(headers)
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/",
                    data=json.dumps({"calls": 10, "nanos": 100_000_000}).encode(),
                    headers=headers, method="POST",
                )  # fmt: skip
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
                trace_key = f"t:{root.get_span_context().trace_id:032x}"
                # The worker saw the orchestrator's $0.20 and could add one $0.10 call.
                assert answer["done"] == 1
                assert answer["error"]["spent_usd"] == pytest.approx(0.3)
                assert processor.spent_usd(trace_key) == pytest.approx(0.3)
                with pytest.raises(BudgetExceededError):
                    llm(tracer, 0.1)  # and the orchestrator sees the worker's spend
        finally:
            worker.wait(timeout=30)
    finally:
        server.cleanup()


def _remote_request(trace_id: int, span_id: int, carried: str | None) -> Any:
    """The context a service sees for an incoming request of trace ``trace_id`` (as a W3C
    propagator builds it), with an optional budget in its baggage."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
    ctx = otel_trace.set_span_in_context(NonRecordingSpan(parent))
    if carried is not None:
        ctx = baggage.set_baggage(BAGGAGE_KEY, carried, ctx)
    return ctx


@pytest.mark.parametrize("ledger", ["memory", "redis"])
def test_forged_baggage_narrows_only_the_request_that_carries_it(
    make_processor: Any, tracer: Any, ledger: str
) -> None:
    """A request forging another request's trace id with ``otel_budget.max_usd=0`` is refused
    itself; the genuine requests of that trace keep their budget (hole 12)."""
    storage = None
    server = None
    if ledger == "redis":
        pytest.importorskip("redis")
        from otel_budget.storage.redis import RedisStorage
        from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer

        if REDIS_SERVER is None:
            pytest.skip(SKIP_REASON)
        server = RedisServer().start()
        storage = RedisStorage(server.url)
    try:
        processor = make_processor(max_usd=1.0, **({"storage": storage} if storage else {}))
        victim = 0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0

        def request(span_id: int, carried: str | None, usd: float) -> None:
            token = context.attach(_remote_request(victim, span_id, carried))
            try:
                with tracer.start_as_current_span("handle"):
                    llm(tracer, usd)
            finally:
                context.detach(token)

        request(1, None, 0.2)  # the genuine request spends $0.20 of its $1
        with pytest.raises(BudgetExceededError) as info:
            request(2, "0", 0.01)  # forged: refused by its own carried limit
        assert info.value.budget_usd == 0.0
        request(3, None, 0.5)  # the trace's own budget is untouched
        request(4, "0.9", 0.1)  # a carried limit still narrows the check that carries it
        with pytest.raises(BudgetExceededError):
            request(5, "0.9", 0.15)  # $0.80 spent + $0.15 > the carried $0.90
        usage = processor.storage.usage(f"t:{victim:032x}")
        assert usage is not None and usage.limit == parse_usd(1.0) and usage.spent == parse_usd(0.8)
    finally:
        if storage is not None:
            storage.close()
        if server is not None:
            server.stop()
