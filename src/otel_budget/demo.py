"""The runaway-agent demo: an agent stuck in a loop, stopped by its budget before overspending.

    otel-budget-demo                                # or: python -m otel_budget.demo
    otel-budget-demo --budget 0.02 --model gpt-4o --spans console
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 otel-budget-demo --spans otlp

Everything runs locally: an embedded fake OpenAI-compatible server (no API key, no network)
answers the real ``openai`` SDK, and bills each call the way the provider would. The agent
never decides it is done, like a real one with a bad stop condition; otel-budget refuses the
LLM call that would overshoot before it is sent, the demo prints the cost report, and shows
the spans (a compact tree by default, the SDK's console exporter with ``--spans console``, or
OTLP to a collector, which is checked to be reachable first).

Run under ``opentelemetry-instrument`` (the compose demo loop), the demo uses the launcher's
tracer provider and its already-installed ``BudgetInstrumentor`` instead of its own.
Amounts are printed in USD with six decimals throughout (one precision per line).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, cast
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_budget import attributes as attrs
from otel_budget.money import parse_usd

PROG = "otel-budget-demo"
SERVICE_NAME = "runaway-agent-demo"
SYSTEM = (
    "You are a research agent. Search until you are certain, then answer. "
    "Never give up; if unsure, search again."
)
# A search costs far less than the growing LLM calls around it: the call that overshoots, and
# is refused, is the agent's next LLM call (the headline case), not a tool call.
TOOL_COST_USD = 0.00005
TREE_EDGE = 4  # spans shown at each end of a long list of siblings
COLLECTOR_HINT = (
    "start one with: docker compose -f examples/compose.yaml up otel-collector jaeger "
    "(or set OTEL_EXPORTER_OTLP_ENDPOINT), or run the demo without --spans otlp"
)


def usd(value: float) -> str:
    """One precision for every amount the demo prints: ``$0.000200``, ``$0.010000``."""
    return f"${value:.6f}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _budget_arg(value: str) -> str:
    try:
        parse_usd(value, what="the budget")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _turns_arg(value: str) -> int:
    try:
        turns = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 1 <= turns <= 100_000:
        raise argparse.ArgumentTypeError(f"must be from 1 to 100000, got {turns}")
    return turns


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="The runaway-agent demo: an agent loops on a local fake OpenAI server "
        "until otel-budget refuses the LLM call that would overshoot its budget.",
        epilog="No API key and no network are needed, except for --spans otlp (a collector).",
    )
    parser.add_argument(
        "--budget", default="0.01", type=_budget_arg, metavar="USD",
        help="what the agent may spend in this run, in USD (default: 0.01)",
    )  # fmt: skip
    parser.add_argument(
        "--model", default="gpt-4o-mini",
        help="the OpenAI model the agent calls, priced from genai-prices (default: gpt-4o-mini)",
    )  # fmt: skip
    parser.add_argument(
        "--max-turns", type=_turns_arg, default=1000, metavar="N",
        help="stop the loop after N turns even if the budget holds (default: 1000)",
    )  # fmt: skip
    parser.add_argument(
        "--spans", choices=("summary", "console", "otlp", "none"), default="summary",
        help="how to show the spans: summary (a compact tree, default), console (the SDK's "
        "console exporter), otlp (to the collector at $OTEL_EXPORTER_OTLP_ENDPOINT, default "
        "localhost:4317), none",
    )  # fmt: skip
    return parser


def otlp_target() -> tuple[str, str, int]:
    """(protocol, host, port) the OTLP span exporter will send to, from the standard
    environment variables (gRPC on 4317 unless ``OTEL_EXPORTER_OTLP_PROTOCOL`` says http)."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    http = protocol.startswith("http")
    endpoint = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or ("http://localhost:4318" if http else "http://localhost:4317")
    ).strip()
    try:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        default_port = 443 if parts.scheme == "https" else (4318 if http else 4317)
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}") from None
    if not parts.hostname:
        raise ValueError(f"invalid OTLP endpoint {endpoint!r}")
    return ("http" if http else "grpc"), parts.hostname, port


def check_collector(timeout: float = 1.0) -> str | None:
    """None when something accepts TCP connections at the OTLP endpoint, else why not."""
    try:
        protocol, host, port = otlp_target()
    except ValueError as exc:
        return str(exc)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"no OTLP collector answers at {host}:{port} ({protocol}: {reason})"


def _add_exporters(mode: str, provider: TracerProvider) -> InMemorySpanExporter | None:
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif mode == "otlp":
        exporter: Any
        if otlp_target()[0] == "http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )

            exporter = GrpcExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    elif mode == "summary":
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        return memory
    return None


def _print_tree(spans: Sequence[Any]) -> None:
    children: dict[int | None, list[Any]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent, []).append(span)

    def show(span: Any, depth: int) -> None:
        a = span.attributes
        ms = (span.end_time - span.start_time) / 1e6
        cost = a.get(attrs.COST_USD)
        extra = ""
        if cost is not None:
            extra = f"  cost {usd(cost)}"
        if a.get(attrs.ERROR_TYPE):
            extra += f"  ERROR {a[attrs.ERROR_TYPE]}"
        if a.get(attrs.TRACE_SPENT_USD) is not None:
            extra += (
                f"  [trace: spent {usd(a[attrs.TRACE_SPENT_USD])} of "
                f"{usd(a.get(attrs.TRACE_BUDGET_USD, 0))}, {a.get(attrs.TRACE_CALLS)} LLM calls, "
                f"{a.get(attrs.TRACE_TOOL_CALLS)} tool calls, "
                f"terminated_by={a.get(attrs.TRACE_TERMINATED_BY)}]"
            )
        print(f"  {'  ' * depth}{span.name}  {ms:.1f} ms{extra}")
        kids = sorted(children.get(span.context.span_id, []), key=lambda s: s.start_time)
        if len(kids) > 2 * TREE_EDGE + 1:  # a long loop: its first and last turns
            hidden = len(kids) - 2 * TREE_EDGE
            for child in kids[:TREE_EDGE]:
                show(child, depth + 1)
            print(f"  {'  ' * (depth + 1)}... {hidden} more spans ...")
            kids = kids[-TREE_EDGE:]
        for child in kids:
            show(child, depth + 1)

    ids = {span.context.span_id for span in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    for root in sorted(roots, key=lambda s: s.start_time):
        show(root, 0)


def _format_report(report: Any) -> str:
    budget = "no budget" if report.budget_usd is None else usd(report.budget_usd)
    lines = [
        f"spent {usd(report.total_usd)} of {budget} in {report.duration_s:.2f}s "
        f"({report.calls} LLM calls, {report.tool_calls} tool calls, {report.aborts} refused)"
    ]
    if report.terminated_by:
        lines.append(f"terminated by: {report.terminated_by}")
    for title, table in (("model", report.by_model), ("tool", report.by_tool)):
        for name, item in sorted(table.items(), key=lambda kv: -kv[1].usd):
            lines.append(f"  {title:5} {name:32} {usd(item.usd)}  x{item.calls}")
    return "\n".join(lines)


class _HeldLog(logging.Handler):
    """Prints otel-budget's log lines on stdout, in order with the demo's own, holding back
    the latest one: when the demo's ``on_warning``/``on_exceeded`` callback says it stands
    for that line (the engine logs, then calls back), the demo prints it its own way, once."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))
        self.held: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.flush()
        self.held = record

    def drop_held(self, message: str | None = None) -> None:
        """Forget the held line (only if it reads ``message``, when given)."""
        if message is None or (self.held is not None and self.held.getMessage() == message):
            self.held = None

    def flush(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            print(self.format(held), flush=True)


def _instrument(
    mode: str, on_warning: Callable[[dict[str, Any]], Any],
    on_exceeded: Callable[[dict[str, Any]], Any],
) -> tuple[Any, TracerProvider, InMemorySpanExporter | None, bool]:  # fmt: skip
    """(instrumentor, provider, in-memory exporter, owned). Under ``opentelemetry-instrument``
    the global SDK provider and the launcher's BudgetInstrumentor are already there: use them
    (setting a second provider or instrumenting twice only earns warnings)."""
    from otel_budget import BudgetInstrumentor

    current = trace.get_tracer_provider()
    instrumentor: Any = cast(Any, BudgetInstrumentor)()  # BaseInstrumentor: a singleton
    if isinstance(current, TracerProvider):
        provider = current
        memory = _add_exporters(mode, provider) if mode != "otlp" else None
        if mode == "otlp":
            print("(spans go to the launcher's exporters)")
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider, libraries=("openai",))
            return instrumentor, provider, memory, True
        return instrumentor, provider, memory, False
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    memory = _add_exporters(mode, provider)
    trace.set_tracer_provider(provider)
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(
            tracer_provider=provider, libraries=("openai",),
            on_warning=on_warning, on_exceeded=on_exceeded,
        )  # fmt: skip
        return instrumentor, provider, memory, True
    return instrumentor, provider, memory, False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        import openai
    except ImportError:
        print(f"{PROG}: error: the demo needs the openai SDK: pip install '.[openai]' "
              "(from the checkout)", file=sys.stderr)  # fmt: skip
        return 2
    if args.spans == "otlp":
        try:
            import opentelemetry.exporter.otlp  # noqa: F401
        except ImportError:
            print(f"{PROG}: error: --spans otlp needs the OTLP exporter: pip install "
                  "'.[otlp]' (from the checkout)", file=sys.stderr)  # fmt: skip
            return 2
        problem = check_collector()
        if problem is not None:
            print(f"{PROG}: error: --spans otlp: {problem}; {COLLECTOR_HINT}", file=sys.stderr)
            return 2

    from otel_budget import BudgetExceededError, budget, track_tool
    from otel_budget.testing import FakeLLMServer

    notes: list[str] = []
    log = _HeldLog()

    def on_warning(info: dict[str, Any]) -> None:
        log.drop_held()  # the engine's line about it: the demo says it below, one precision
        notes.append(
            f"          {round(info['threshold'] * 100)}% of the budget spent "
            f"({usd(info['spent_usd'])} of {usd(info['budget_usd'])})"
        )

    def on_exceeded(info: dict[str, Any]) -> None:
        log.drop_held()  # the refusal is printed once, by the demo (STOPPED ...)

    library_log = logging.getLogger("otel_budget")
    library_log.addHandler(log)
    library_log.propagate = False
    instrumentor, provider, memory, owned = _instrument(args.spans, on_warning, on_exceeded)

    @track_tool("web_search", cost_usd=TOOL_COST_USD)
    def web_search(query: str) -> str:
        return f"3 results for {query!r}, none conclusive"

    with FakeLLMServer(default_output_tokens=120) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="demo", max_retries=0)
        messages: list[Any] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the airspeed velocity of an unladen swallow?"},
        ]
        print(f"runaway agent on {args.model}, budget {usd(float(args.budget))} "
              f"(fake OpenAI server at {server.openai_base_url})\n")  # fmt: skip
        turn = 0
        stop: BudgetExceededError | None = None
        try:
            with budget(max_usd=args.budget, name="invoke_agent runaway") as run:
                while turn < args.max_turns:
                    turn += 1
                    where = "LLM call"
                    reply = client.chat.completions.create(model=args.model, messages=messages)
                    report = run.report()
                    log.flush()
                    tokens = reply.usage
                    print(
                        f"turn {turn:3d}: {tokens.prompt_tokens if tokens else 0:6d} in / "
                        f"{tokens.completion_tokens if tokens else 0:4d} out tokens, "
                        f"spent {usd(report.total_usd)}, left {usd(report.remaining_usd or 0.0)}"
                    )
                    print("".join(f"{note}\n" for note in notes), end="")
                    notes.clear()
                    text = reply.choices[0].message.content or ""
                    messages.append({"role": "assistant", "content": text})
                    where = "web_search tool call"
                    result = web_search(f"swallow airspeed, attempt {turn}")
                    messages.append({"role": "user", "content": f"Search result: {result}"})
        except BudgetExceededError as exc:
            stop = exc
            log.drop_held(str(exc))  # printed once, below (under a launcher: no callback)
        log.flush()
        print("".join(f"{note}\n" for note in notes), end="")
        if stop is not None:
            if stop.remaining_usd is not None and stop.budget_usd is not None:
                why = (f"projected {usd(stop.projected_usd)}, only {usd(stop.remaining_usd)} "
                       f"left of {usd(stop.budget_usd)}")  # fmt: skip
            else:
                why = str(stop).removeprefix("otel-budget: ")
            print(f"\nSTOPPED: turn {turn}'s {where} was refused before it was sent ({why})")
        elif turn >= args.max_turns:
            print(f"\nthe loop ended at --max-turns {args.max_turns} within the budget")
        report = run.report()
        billed = server.stats()["billed_nanos"] / 1e9

    print("\ncost report:\n" + _format_report(report))
    print(f"\nthe provider billed {usd(billed)}; the ledger recorded "
          f"{usd(report.llm_usd)} for LLM calls (+ {usd(report.tools_usd)} for tools)")  # fmt: skip
    provider.force_flush()
    if memory is not None:
        print("\nspans (the root carries the cost breakdown as otel_budget.trace.*):")
        _print_tree(memory.get_finished_spans())
    if owned:
        instrumentor.uninstrument()
        provider.shutdown()
    log.flush()
    library_log.removeHandler(log)
    library_log.propagate = True
    return 0 if report.terminated_by == "budget_exceeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
