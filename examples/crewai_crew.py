"""A CrewAI crew whose researcher gets stuck calling the same tool: stopped by loop detection.

    pip install -e '.[crewai]'            # CrewAI 1.x (it needs openai<3)
    python examples/crewai_crew.py

Offline: an embedded fake OpenAI-compatible server (``otel_budget.testing.FakeLLMServer``)
answers CrewAI's real openai client and bills each call. Its model keeps asking for the same
``web_search``; otel-budget refuses the fifth identical call before the tool runs, CrewAI does
not get to turn that into one more message for the model, and the kickoff raises
``BudgetExceededError(reason="loop_detected")``. The report shows what each agent, model and
tool cost, and the span tree the crew left.
"""

from __future__ import annotations

import logging
import sys

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_budget import BudgetExceededError, BudgetSpanProcessor, PriceBook
from otel_budget.instrumentation.crewai import last_report, protect_crew
from otel_budget.testing import Behaviour, FakeLLMServer


def main() -> int:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BudgetSpanProcessor(prices=PriceBook(tools={"web_search": 0.01})))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)

    from crewai import LLM, Agent, Crew, Task
    from crewai.tools import tool

    logging.getLogger("crewai").setLevel(logging.CRITICAL)  # its per-call token-count notes

    with FakeLLMServer() as server:
        # The model never decides it has enough: it asks for the same search, every time.
        server.default_behaviour = Behaviour(
            tool_calls=[{"name": "web_search", "arguments": {"query": "otel budget"}}]
        )
        llm = LLM(model="gpt-4o-mini", base_url=server.openai_base_url, api_key="fake")

        @tool("web_search")
        def web_search(query: str) -> str:
            """Search the web (a paid API: $0.01 per call in the price book)."""
            return f"no new results for {query!r}"

        researcher = Agent(role="Researcher", goal="Find sources", backstory="Thorough.",
                           llm=llm, tools=[web_search])  # fmt: skip
        writer = Agent(role="Writer", goal="Summarise", backstory="Concise.", llm=llm)
        crew = Crew(
            name="newsroom",
            agents=[researcher, writer],
            tasks=[
                Task(name="research", description="Find sources on otel budgets.",
                     expected_output="Sources.", agent=researcher),
                Task(name="summary", description="Summarise the sources.",
                     expected_output="A paragraph.", agent=writer),
            ],
        )  # fmt: skip
        protect_crew(crew, max_usd=0.50)
        try:
            crew.kickoff()
            print("the crew finished (not expected: its model loops)")
        except BudgetExceededError as exc:
            how = "loop detection" if exc.reason == "loop_detected" else "its budget"
            print(f"stopped by {how}: {exc}")
        report = last_report(crew)
        bill = server.stats()["billed_usd"]

    print()
    print(report.format() if report is not None else "no report")
    print(f"the fake provider billed ${bill:.6f} for {server.stats()['requests']} requests")
    print()
    by_id = {s.context.span_id: s for s in spans.get_finished_spans()}

    def depth(span: object) -> int:
        parent = getattr(span, "parent", None)
        return 0 if parent is None or parent.span_id not in by_id else 1 + depth(by_id[parent.span_id])

    for span in sorted(by_id.values(), key=lambda s: s.start_time or 0):
        cost = span.attributes.get("otel_budget.cost.usd") if span.attributes else None
        suffix = f"  ${cost:.6f}" if isinstance(cost, float) and cost else ""
        print(f"{'  ' * depth(span)}{span.name} [{span.status.status_code.name}]{suffix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
