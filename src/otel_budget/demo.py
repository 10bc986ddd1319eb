"""The runaway-agent demo: an agent stuck in a loop, stopped by its budget before overspending.

    python -m otel_budget.demo                      # or: otel-budget-demo
    python -m otel_budget.demo --budget 0.02 --model gpt-4o --spans console
    OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 python -m otel_budget.demo --spans otlp

Everything runs locally: an embedded fake OpenAI-compatible server (no API key, no network)
answers the real ``openai`` SDK, and bills each call the way the provider would. The agent
never decides it is done, like a real one with a bad stop condition; otel-budget stops it
when the next call would overshoot, prints the cost report, and shows the spans (a compact
tree by default, the SDK's console exporter with ``--spans console``, or OTLP).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

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

SYSTEM = (
    "You are a research agent. Search until you are certain, then answer. "
    "Never give up; if unsure, search again."
)


def _exporters(mode: str, provider: TracerProvider) -> InMemorySpanExporter | None:
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        return None
    if mode == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            sys.exit("--spans otlp needs: pip install 'otel-budget[otlp]'")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return None
    if mode == "summary":
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
            extra = f"  cost ${cost:.6f}"
        if a.get(attrs.ERROR_TYPE):
            extra += f"  ERROR {a[attrs.ERROR_TYPE]}"
        if a.get(attrs.TRACE_SPENT_USD) is not None:
            extra += (
                f"  [trace: spent ${a[attrs.TRACE_SPENT_USD]:.6f} of "
                f"${a.get(attrs.TRACE_BUDGET_USD, 0):.4f}, {a.get(attrs.TRACE_CALLS)} LLM calls, "
                f"{a.get(attrs.TRACE_TOOL_CALLS)} tool calls, "
                f"terminated_by={a.get(attrs.TRACE_TERMINATED_BY)}]"
            )
        print(f"  {'  ' * depth}{span.name}  {ms:.1f} ms{extra}")
        for child in sorted(children.get(span.context.span_id, []), key=lambda s: s.start_time):
            show(child, depth + 1)

    ids = {span.context.span_id for span in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    for root in sorted(roots, key=lambda s: s.start_time):
        show(root, 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="otel-budget: the runaway-agent demo")
    parser.add_argument("--budget", default="0.01", help="USD for the run (default 0.01)")
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--max-turns", type=int, default=1000, help="safety stop of the loop")
    parser.add_argument(
        "--spans", choices=("summary", "console", "otlp", "none"), default="summary",
        help="how to show the spans (default: a compact tree)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    try:
        import openai
    except ImportError:
        sys.exit("the demo needs the openai SDK: pip install 'otel-budget[openai]'")

    from otel_budget import BudgetExceededError, BudgetInstrumentor, budget, track_tool
    from otel_budget.testing import FakeLLMServer

    provider = TracerProvider(resource=Resource.create({"service.name": "runaway-agent-demo"}))
    memory = _exporters(args.spans, provider)
    trace.set_tracer_provider(provider)
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(tracer_provider=provider, libraries=("openai",))

    @track_tool("web_search", cost_usd=0.0002)
    def web_search(query: str) -> str:
        return f"3 results for {query!r}, none conclusive"

    with FakeLLMServer(default_output_tokens=120) as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key="demo", max_retries=0)
        messages: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "What is the airspeed velocity of an unladen swallow?"},
        ]
        print(f"runaway agent on {args.model}, budget ${args.budget} "
              f"(fake OpenAI server at {server.openai_base_url})\n")  # fmt: skip
        turn = 0
        try:
            with budget(max_usd=args.budget, name="invoke_agent runaway") as run:
                while turn < args.max_turns:
                    turn += 1
                    reply = client.chat.completions.create(model=args.model, messages=messages)
                    report = run.report()
                    print(
                        f"turn {turn:3d}: {reply.usage.prompt_tokens:6d} in / "
                        f"{reply.usage.completion_tokens:4d} out tokens, "
                        f"spent ${report.total_usd:.6f}, left ${report.remaining_usd:.6f}"
                    )
                    text = reply.choices[0].message.content or ""
                    messages.append({"role": "assistant", "content": text})
                    result = web_search(f"swallow airspeed, attempt {turn}")
                    messages.append({"role": "user", "content": f"Search result: {result}"})
        except BudgetExceededError as stop:
            print(f"\nSTOPPED before turn {turn}'s call was sent: {stop}")
        report = run.report()
        billed = server.stats()["billed_usd"]

    print("\ncost report:\n" + report.format())
    print(f"\nthe provider billed ${billed:.6f}; the ledger recorded "
          f"${report.llm_usd:.6f} for LLM calls (+ ${report.tools_usd:.6f} for tools)")  # fmt: skip
    provider.force_flush()
    if memory is not None:
        print("\nspans (the root carries the cost breakdown as otel_budget.trace.*):")
        _print_tree(memory.get_finished_spans())
    instrumentor.uninstrument()
    provider.shutdown()
    return 0 if report.terminated_by == "budget_exceeded" else 1


if __name__ == "__main__":
    raise SystemExit(main())
