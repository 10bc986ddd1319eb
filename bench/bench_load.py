"""The load test a platform team would run: many asyncio agents, per-user daily caps on Redis.

    python bench/bench_load.py                      # 1,000 agents x 20 calls, 100 users
    python bench/bench_load.py --quick              # 200 agents x 10 calls, 20 users
    python bench/bench_load.py --agents 500 --calls 20 --users 50 --json out.json

One process, one event loop, one shared ``openai.AsyncOpenAI`` client (its httpx pool holds
``--pool`` connections, one per agent by default, opened by an untimed warm-up). Each agent
runs in its own trace (a root span) as one of ``--users`` end users (``scope(user=...)``,
and the request's OpenAI ``user`` field so that the fake provider bills per user), and makes
``--calls`` sequential ``chat.completions.create`` calls (``max_tokens=64``); an agent that
is refused (``BudgetExceededError``) keeps trying, as a hostile or buggy agent would, so
every refused attempt is a check too. All agents start together.

Two phases in the same run, on the same client and connections:

* ``bare``: no instrumentation;
* ``instrumented``: ``BudgetInstrumentor().instrument(...)`` with a fresh ``RedisStorage``
  (a real ``redis-server`` started here), ``max_usd=1`` per trace and the rule
  ``ScopeRule("user", ..., window="day")``: every ``--low-every``-th user gets half of what
  its agents would spend (``processor.set_scope_limit``), so it is refused part-way; the
  others get twice their demand. ``failure_policy`` is ``fail_closed`` (``--failure-policy``):
  a Redis hiccup refuses visibly (counted as ``refused_internal``) instead of letting a call
  through unreserved.

Reported per phase: calls/s (wall, all attempts), granted calls/s, p50/p99 latency of a
granted call (``perf_counter`` around the ``await``), the client process's CPU time per
attempt (``time.process_time``: the event loop plus the ledger's worker threads), and for
the instrumented phase the added p50/p99 (instrumented minus bare) and the refusals.

Checks (exit status 1 if one fails), from the fake provider's own bill (``stats()
["by_user"]``) and the ledger read back from Redis (``RedisStorage.scopes``):

* zero overshoot: every scope's ``spent + reserved <= limit``, sampled every 50 ms during the
  run by a child process of its own (its CPU and GIL are not the client's), and ``spent <=
  limit`` at the end;
* ledger == bill: for every user, the ledger's spent equals what the provider billed that
  user, to the nano-USD, and the totals are equal. The one exception is stated and exact:
  a call whose connection was lost after its request was sent has an unknown outcome and
  the ledger charges it at its reservation, by design; such calls are counted apart
  (``outcome_unknown``: calls and nano-USD, from the spans' ``error.type`` and
  ``otel_budget.cost.usd``) and the ledger must equal the bill minus what the provider
  billed for them plus their reservations;
* no refused call reached the provider: the provider's request count equals the granted
  calls (plus those of unknown outcome it did serve), per user and in total; no other
  error; nothing left reserved after settling.

The fake provider (``otel_budget.testing.FakeLLMServer``) runs in a child process, so its
request handling does not take the measured process's GIL; the redis-server is a third
process. All three share the machine's cores: the figures are those of one host running the
provider, the ledger and the client together, so read the calls/s as a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.redis_server: the redis-server helper

from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer  # noqa: E402

MODEL = "gpt-4o-mini"
MAX_TOKENS = 64
SERVER = """
import json, sys
from otel_budget.testing import FakeLLMServer
server = FakeLLMServer(max_lifetime_s=float(sys.argv[1]), latency_s=float(sys.argv[2])).start()
print(server.openai_base_url, flush=True)
for line in sys.stdin:
    if line.strip() == "reset":
        server.reset_stats()
    print(json.dumps(server.stats()), flush=True)
server.stop()
"""


@dataclass
class LoadConfig:
    agents: int = 1000
    calls: int = 20
    users: int = 100
    pool: int = 0  # connections in the client's pool; 0: one per agent
    latency_ms: float = 0.0  # the fake provider's wait before each answer
    low_every: int = 4  # every n-th user's cap is half its demand
    failure_policy: str = "fail_closed"
    sample_s: float = 0.05
    warmup: bool = True  # False: the checks only (the latencies then include cold starts)
    verbose: bool = False  # progress on stderr


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    granted_ns: list[int] = field(default_factory=list)
    refused_ns: list[int] = field(default_factory=list)
    granted: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # by reason
    refused_users: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    trace_users: dict[int, str] = field(default_factory=dict)  # the agents' trace ids

    def summary(self, attempts: int) -> dict[str, Any]:
        ok = sorted(self.granted_ns)
        return {
            "attempts": attempts,
            "granted": len(ok),
            "refused": sum(self.refused.values()),
            "refused_by_reason": dict(self.refused),
            "users_refused": len(self.refused_users),
            "errors": dict(self.errors),
            "error_samples": self.error_samples,
            "wall_s": round(self.wall_s, 3),
            "calls_per_s": round(attempts / self.wall_s, 1),
            "granted_per_s": round(len(ok) / self.wall_s, 1),
            "p50_ms": round(percentile(ok, 0.50) / 1e6, 2),
            "p99_ms": round(percentile(ok, 0.99) / 1e6, 2),
            "refused_p50_ms": round(percentile(sorted(self.refused_ns), 0.50) / 1e6, 2),
            "cpu_us_per_attempt": round(self.cpu_s / attempts * 1e6, 1),
        }


def percentile(sorted_values: Sequence[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def messages(agent: int, turn: int) -> list[dict[str, str]]:
    # Fixed-width numbers: every call has the same size, so each user's demand is known.
    return [
        {"role": "system", "content": "You are a careful travel-planning agent."},
        {"role": "user", "content": f"Agent {agent:06d}, step {turn:03d}: next action?"},
    ]


def user_of(agent: int, users: int) -> str:
    return f"u{agent % users:04d}"


def call_nanos() -> tuple[int, int]:
    """(actual, reserved) nano-USD of one call as the fake provider bills it: for the caps."""
    from otel_budget.testing.fake_llm import DEFAULT_PRICES, count_input_tokens

    price_in, price_out = DEFAULT_PRICES[MODEL][:2]
    tokens_in = count_input_tokens({"messages": messages(0, 0)})
    actual = tokens_in * price_in + 20 * price_out  # the fake answers 20 tokens
    reserved = tokens_in * price_in + MAX_TOKENS * price_out
    return round(actual * 1000), round(reserved * 1000)


def caps_nanos(config: LoadConfig) -> dict[str, int]:
    """Each user's daily cap: half the demand of its agents for every ``low_every``-th user
    (refused part-way), twice it for the others."""
    actual, _ = call_nanos()
    agents = Counter(user_of(a, config.users) for a in range(config.agents))
    demand = {user: n * config.calls * actual for user, n in agents.items()}
    return {
        user: demand[user] // 2 if index % config.low_every == 0 else demand[user] * 2
        for index, user in enumerate(sorted(demand))
    }


# -- the fake provider, in a child process ---------------------------------------------------
class ProviderProcess:
    def __init__(self, lifetime_s: float, latency_s: float) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(lifetime_s), str(latency_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.stop()
            raise RuntimeError("the fake provider did not start")

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


# -- the ledger, sampled while the agents run -------------------------------------------------
SAMPLER = """
import json, select, sys
from otel_budget.storage.redis import RedisStorage
url, prefix, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
store = RedisStorage(url, prefix=prefix, socket_timeout=2.0, socket_connect_timeout=2.0,
                     durable_journal=False)
samples, violations = 0, []
print("ready", flush=True)
while not select.select([sys.stdin], [], [], interval)[0]:
    for usage in store.scopes("user:"):
        if usage.spent + usage.reserved > usage.limit:
            violations.append(usage._asdict())
    samples += 1
store.close()
print(json.dumps({"samples": samples, "violations": violations}), flush=True)
"""


class LedgerSampler:
    """Reads every user scope every ``interval`` seconds, in a child process of its own (its
    CPU and GIL are not the measured client's), and records any with ``spent + reserved >
    limit``: the hard cap at every instant, from outside."""

    def __init__(self, url: str, prefix: str, interval: float) -> None:
        self.args = [sys.executable, "-c", SAMPLER, url, prefix, str(interval)]
        self.samples = 0
        self.violations: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.join(ROOT, "src"), env.get("PYTHONPATH")) if p
        )
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the ledger sampler did not start")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()  # the sampler's signal to stop
        result = json.loads(proc.stdout.readline() or "{}")
        proc.wait(timeout=30)
        self.samples = int(result.get("samples", 0))
        self.violations = list(result.get("violations", []))


class UnknownOutcomes:
    """A span exporter that keeps the calls the ledger charged although they failed: their
    connection was lost after the request was sent, so the client cannot know whether the
    provider billed them, and the ledger charges them at their reservation by design. Keyed
    by trace id (``Phase.trace_users`` maps it to the agent's user): the charged nano-USD."""

    def __init__(self) -> None:
        self.charged: list[tuple[int, int, str]] = []  # (trace id, nano-USD, error.type)
        self.lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        for span in spans:
            attributes = span.attributes or {}
            error = attributes.get("error.type")
            cost = attributes.get("otel_budget.cost.usd")
            if error is not None and isinstance(cost, (int, float)) and cost > 0:
                with self.lock:
                    self.charged.append(
                        (span.context.trace_id, round(cost * 10**9), str(error))
                    )
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def by_user(self, trace_users: Mapping[int, str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        with self.lock:
            for trace_id, nanos, _ in self.charged:
                user = trace_users.get(trace_id)
                if user is not None:
                    out.setdefault(user, []).append(nanos)
        return out


def check_ledger(
    usages: Sequence[Any],
    provider: Mapping[str, Any],
    granted: Mapping[str, int],
    caps_nanos: Mapping[str, int],
    unknown: Mapping[str, Sequence[int]] | None = None,
    actual_nanos: int = 0,
) -> dict[str, list[str]]:
    """The three checks on the ledger at the end against the provider's bill: a name -> the
    failures (empty: passed). ``usages`` are the ledger's user scopes (``ScopeUsage``).

    ``unknown``: per user, the reservations charged for calls whose outcome the client could
    not know (connection lost after sending: ``UnknownOutcomes``). The provider may or may
    not have billed each (``actual_nanos``, one call's bill, when it did: it then served one
    more request than was granted); the ledger must equal, to the nano-USD, the bill minus
    those calls' bills plus their reservations. Nothing else is tolerated."""
    unknown = unknown or {}
    failures: dict[str, list[str]] = {"zero_overshoot": [], "ledger_equals_bill": [],
                                      "refused_never_sent": []}  # fmt: skip
    ledger: dict[str, int] = {}
    for usage in usages:
        user = usage.key.split(":", 1)[1].split("@", 1)[0]
        ledger[user] = ledger.get(user, 0) + usage.spent
        if usage.spent + usage.reserved > usage.limit:
            failures["zero_overshoot"].append(f"{usage.key}: {usage}")
        if usage.reserved:
            failures["ledger_equals_bill"].append(f"{usage.key}: {usage.reserved} still reserved")
        if user in caps_nanos and usage.limit != caps_nanos[user]:
            failures["zero_overshoot"].append(f"{usage.key}: limit {usage.limit}, set "
                                              f"{caps_nanos[user]}")  # fmt: skip
    billed = provider.get("by_user", {})
    expected_total = 0
    served_unknown = 0
    for user in sorted(set(ledger) | set(billed) | set(granted) | set(unknown)):
        spent = ledger.get(user, 0)
        bill = billed.get(user, {}).get("billed_nanos", 0)
        sent = billed.get(user, {}).get("billed_requests", 0)
        lost = unknown.get(user, ())
        # Calls of unknown outcome the provider did serve (and bill): 0 to len(lost).
        extra = sent - granted.get(user, 0)
        if not 0 <= extra <= len(lost):
            failures["refused_never_sent"].append(
                f"user {user}: provider served {sent}, client was granted "
                f"{granted.get(user, 0)} ({len(lost)} of unknown outcome)"
            )
            extra = 0
        served_unknown += extra
        expected = bill - extra * actual_nanos + sum(lost)
        expected_total += expected
        if spent != expected:
            failures["ledger_equals_bill"].append(
                f"user {user}: ledger {spent} != bill {bill}"
                + (f" - {extra} x {actual_nanos} + {sum(lost)} of unknown outcome" if lost else "")
            )
    if sum(ledger.values()) != expected_total:
        failures["ledger_equals_bill"].append(
            f"total: ledger {sum(ledger.values())} != bill {provider.get('billed_nanos')} "
            f"adjusted for unknown outcomes ({expected_total})"
        )
    if provider.get("requests") != sum(granted.values()) + served_unknown:
        failures["refused_never_sent"].append(
            f"provider saw {provider.get('requests')} requests, {sum(granted.values())} granted"
        )
    return failures


# -- the agents -------------------------------------------------------------------------------
async def run_agents(client: Any, tracer: Any, config: LoadConfig, phase: Phase) -> None:
    from otel_budget import BudgetExceededError, scope

    clock = time.perf_counter_ns

    async def agent(index: int) -> None:
        user = user_of(index, config.users)
        with tracer.start_as_current_span(f"agent {index}") as root, scope(user=user):
            phase.trace_users[root.get_span_context().trace_id] = user
            for turn in range(config.calls):
                start = clock()
                try:
                    await client.chat.completions.create(
                        model=MODEL, messages=messages(index, turn), max_tokens=MAX_TOKENS,
                        user=user,
                    )  # fmt: skip
                except BudgetExceededError as exc:
                    phase.refused_ns.append(clock() - start)
                    phase.refused[exc.reason] += 1
                    phase.refused_users[user] += 1
                except Exception as exc:  # counted: a check fails on any
                    phase.errors[type(exc).__name__] += 1
                    if len(phase.error_samples) < 5:
                        cause = exc.__cause__ or exc.__context__
                        phase.error_samples.append(f"{exc!r} after {(clock() - start) / 1e9:.1f} s"
                                                   f" (cause: {cause!r})")  # fmt: skip
                else:
                    phase.granted_ns.append(clock() - start)
                    phase.granted[user] += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(agent(i) for i in range(config.agents)))
    phase.wall_s = time.perf_counter() - wall
    phase.cpu_s = time.process_time() - cpu


def instrument(url: str, prefix: str, config: LoadConfig, provider: Any) -> tuple[Any, Any]:
    from otel_budget import BudgetInstrumentor, ScopeRule
    from otel_budget.storage.redis import RedisStorage

    storage = RedisStorage(url, prefix=prefix)
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(
        max_usd=1.0, scopes=[ScopeRule("user", max_usd=1.0, window="day")], storage=storage,
        failure_policy=config.failure_policy, tracer_provider=provider, libraries=("openai",),
    )  # fmt: skip
    return instrumentor, storage


def progress(config: LoadConfig, text: str) -> None:
    if config.verbose:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


async def load(config: LoadConfig, redis_url: str, base_url: str, provider: ProviderProcess,
               tracer_provider: Any, outcomes: UnknownOutcomes) -> dict[str, Any]:  # fmt: skip
    import httpx
    import openai

    pool = config.pool or config.agents
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="load", max_retries=0, timeout=120.0,
        http_client=openai.DefaultAsyncHttpxClient(
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        ),
    )  # fmt: skip
    tracer = tracer_provider.get_tracer("bench_load")
    attempts = config.agents * config.calls
    out: dict[str, Any] = {}
    try:
        # Untimed warm-up: the pool's connections, then the instrumented path (imports, token
        # counting, the ledger's scripts) on a ledger of its own.
        if config.warmup:
            progress(config, "warm-up")
            warm = LoadConfig(agents=config.agents, calls=1, users=config.users)
            await run_agents(client, tracer, warm, Phase("warm-up"))
            instrumentor, _ = instrument(redis_url, f"otbload:warm:{uuid.uuid4().hex[:8]}:",
                                         config, tracer_provider)  # fmt: skip
            warm = LoadConfig(agents=min(50, config.agents), calls=2, users=config.users)
            await run_agents(client, tracer, warm, Phase("warm-up"))
            instrumentor.uninstrument()

        provider.reset()
        bare = Phase("bare")
        progress(config, f"bare: {config.agents} agents x {config.calls} calls")
        await run_agents(client, tracer, config, bare)
        out["bare"] = bare.summary(attempts)
        bare_stats = provider.stats()
        progress(config, f"bare: {json.dumps(out['bare'])}")
        out["bare"]["provider_requests"] = bare_stats["requests"]

        prefix = f"otbload:{uuid.uuid4().hex[:8]}:"
        instrumentor, storage = instrument(redis_url, prefix, config, tracer_provider)
        caps = caps_nanos(config)
        for user, nanos in caps.items():
            instrumentor.processor.set_scope_limit("user", user, Decimal(nanos) / 10**9)
        provider.reset()
        sampler = LedgerSampler(redis_url, prefix, config.sample_s)
        sampler.start()
        inst = Phase("instrumented")
        progress(config, f"instrumented: {config.agents} agents x {config.calls} calls")
        try:
            await run_agents(client, tracer, config, inst)
        finally:
            settled = storage.flush(10.0)
            instrumentor.uninstrument()  # closes the storage: every settle sent
            sampler.stop()
        summary = inst.summary(attempts)
        summary["added_p50_ms"] = round(summary["p50_ms"] - out["bare"]["p50_ms"], 2)
        summary["added_p99_ms"] = round(summary["p99_ms"] - out["bare"]["p99_ms"], 2)
        summary["added_cpu_us_per_attempt"] = round(
            summary["cpu_us_per_attempt"] - out["bare"]["cpu_us_per_attempt"], 1
        )
        summary["storage_stats"] = dict(storage.stats)
        out["instrumented"] = summary

        from otel_budget.storage.redis import RedisStorage

        auditor = RedisStorage(redis_url, prefix=prefix, socket_timeout=2.0,
                               socket_connect_timeout=2.0, durable_journal=False)  # fmt: skip
        try:
            deadline = time.monotonic() + 10.0
            usages = auditor.scopes("user:")
            while any(u.reserved for u in usages) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # a settle still on its way
                usages = auditor.scopes("user:")
            traces = auditor.scopes("t:")
        finally:
            auditor.close()
        bill = provider.stats()
        progress(config, "checks")
        tracer_provider.force_flush()
        unknown = outcomes.by_user(inst.trace_users)
        lost = sum(len(v) for v in unknown.values())
        out["instrumented"]["outcome_unknown"] = {
            # Charged at their reservation: the connection was lost after the request was
            # sent (the ledger cannot know whether the provider billed them).
            "calls": lost, "charged_nanos": sum(sum(v) for v in unknown.values()),
        }  # fmt: skip
        failures = check_ledger(usages, bill, inst.granted, caps, unknown, call_nanos()[0])
        if sampler.violations:
            failures["zero_overshoot"].extend(f"sampled: {v}" for v in sampler.violations[:20])
        failures["zero_overshoot"].extend(
            f"{t.key}: {t}" for t in traces if t.spent + t.reserved > t.limit
        )
        failures.setdefault("no_errors", [])  # (every check is listed, passed or not)
        failures.setdefault("settled", [])
        if sum(inst.errors.values()) > lost or bare.errors:  # other than those: a failure
            failures["no_errors"].append(
                f"bare {dict(bare.errors)}, instrumented {dict(inst.errors)}"
            )
        if not settled:
            failures["settled"].append("the ledger's journal did not drain")
        out["ledger"] = {
            "user_scopes": len(usages),
            "users_at_or_near_cap": sum(1 for u in usages if u.limit - u.spent < call_nanos()[1]),
            "spent_nanos": sum(u.spent for u in usages),
            "billed_nanos": bill["billed_nanos"],
            "provider_requests": bill["requests"],
            "trace_scopes": len(traces),
            "samples_during_run": sampler.samples,
            "sampled_violations": len(sampler.violations),
        }
        out["checks"] = {name: not fails for name, fails in failures.items()}
        out["failures"] = {name: fails[:20] for name, fails in failures.items() if fails}
    finally:
        await client.close()
    return out


def run(config: LoadConfig) -> dict[str, Any]:
    """Start redis-server and the fake provider, run both phases, stop both (by PID)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # One line per refusal and threshold is what a service wants, not a load test's output.
    logging.getLogger("otel_budget").setLevel(logging.ERROR)
    tracer_provider = TracerProvider()
    outcomes = UnknownOutcomes()  # otherwise a no-op exporter
    tracer_provider.add_span_processor(BatchSpanProcessor(outcomes, max_queue_size=1 << 16))
    # A safety net, not a deadline: the provider stops itself after this.
    lifetime = 3600 + config.agents * config.calls * 0.2
    with RedisServer() as redis_server:
        provider = ProviderProcess(lifetime, config.latency_ms / 1000)
        try:
            result = asyncio.run(
                load(config, redis_server.url, provider.base_url, provider, tracer_provider,
                     outcomes)
            )
        finally:
            provider.stop()
            tracer_provider.shutdown()
    result["config"] = asdict(config)
    result["ok"] = all(result["checks"].values())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--pool", type=int, default=0, help="connections (0: one per agent)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="the fake provider's wait before each answer")  # fmt: skip
    parser.add_argument("--failure-policy", default="fail_closed")
    parser.add_argument("--quick", action="store_true", help="200 agents x 10 calls, 20 users")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "load.json"))
    args = parser.parse_args(argv)
    if REDIS_SERVER is None:
        print(SKIP_REASON, file=sys.stderr)
        return 2
    config = LoadConfig(agents=args.agents, calls=args.calls, users=args.users, pool=args.pool,
                        latency_ms=args.latency_ms, failure_policy=args.failure_policy,
                        verbose=True)  # fmt: skip
    if args.quick:
        config.agents, config.calls, config.users = 200, 10, 20
    load_before = os.getloadavg()[0]
    result = run(config)
    result["machine"] = {
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        # Other work on the host inflates every figure; this says how much there was.
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }  # fmt: skip
    for name in ("bare", "instrumented", "ledger", "checks"):
        print(name, json.dumps(result[name]), flush=True)
    for name, fails in result.get("failures", {}).items():
        print(f"FAILED {name}:", *fails, sep="\n  ", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
