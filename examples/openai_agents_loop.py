"""An OpenAI Agents SDK agent stuck in a tool loop, stopped by otel-budget. Offline.

    python examples/openai_agents_loop.py            # same tool, same arguments: loop detection
    python examples/openai_agents_loop.py --vary     # new arguments every turn: the budget

Needs ``pip install '.[openai,openai-agents]'`` and nothing else: the model is the embedded
fake OpenAI server (``otel_budget.testing.FakeLLMServer`` on 127.0.0.1), scripted to answer
every turn with the same tool call, the way a stuck agent does. The Agents SDK's own tracing,
which would export to OpenAI's servers, is switched off (``OPENAI_AGENTS_DISABLE_TRACING``).

Prints each tool call the agent makes, what stopped it, and the cost report (spend per agent,
model and tool). Exits 0 when the run was stopped by otel-budget, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")  # before the SDK is imported

from agents import Agent, OpenAIResponsesModel, Runner, function_tool  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

from otel_budget import BudgetExceededError, BudgetInstrumentor, PriceBook, budget  # noqa: E402
from otel_budget.instrumentation.openai_agents import OpenAIAgentsInstrumentor  # noqa: E402
from otel_budget.testing import Behaviour, FakeLLMServer  # noqa: E402

TOOL_PRICE_USD = 0.002  # what each order-status lookup costs (a paid API, say)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vary", action="store_true",
                        help="the model asks for a different order every turn")  # fmt: skip
    parser.add_argument("--budget", type=float, default=0.05, help="USD per run (0.05)")
    args = parser.parse_args(argv)

    trace.set_tracer_provider(TracerProvider())  # add an exporter to see the spans
    BudgetInstrumentor().instrument(
        max_usd=1.00, libraries=["openai"], prices=PriceBook(tools={"order_status": TOOL_PRICE_USD})
    )
    OpenAIAgentsInstrumentor().instrument(max_usd_per_run=args.budget)

    calls: list[str] = []

    @function_tool
    def order_status(order_id: str) -> str:
        """The shipping status of an order."""
        calls.append(order_id)
        print(f"  turn {len(calls):3d}: order_status({order_id!r})")
        return "still processing"

    with FakeLLMServer() as server:
        if args.vary:
            server.script(*(
                Behaviour(tool_calls=[{"name": "order_status", "arguments": {"order_id": f"A-{i}"}}])
                for i in range(10_000)
            ))  # fmt: skip
        else:
            server.default_behaviour = Behaviour(
                tool_calls=[{"name": "order_status", "arguments": {"order_id": "A-1"}}]
            )
        client = AsyncOpenAI(base_url=server.openai_base_url, api_key="fake", max_retries=0)
        agent = Agent(
            name="support", instructions="Check the order until it has shipped.",
            tools=[order_status], model=OpenAIResponsesModel(model="gpt-4o", openai_client=client),
        )  # fmt: skip
        print(f"Running the agent (budget ${args.budget:.2f} per run, max_turns=10000)...")
        stopped: BudgetExceededError | None = None
        with budget(max_usd=1.00, name="openai_agents_loop example") as run:
            try:
                Runner.run_sync(agent, "Where is my order A-1?", max_turns=10_000)
            except BudgetExceededError as exc:
                stopped = exc
        billed = server.stats()
    if stopped is None:
        print("The run ended on its own: nothing was stopped.")
        return 1
    why = "loop detection" if stopped.reason == "loop_detected" else "its budget"
    print(f"\nStopped by {why} after {len(calls)} tool calls "
          f"and {billed['requests']} model calls: {stopped}")  # fmt: skip
    print(f"The fake provider billed ${billed['billed_usd']:.6f} for the model calls.\n")
    print(run.report().format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
