"""A LangGraph ReAct agent stuck in a tool loop, stopped by otel-budget. Runs offline.

    pip install 'otel-budget[langchain]'
    python examples/langgraph_agent.py            # stopped by loop detection
    python examples/langgraph_agent.py --budget   # loop detection off: stopped by the budget

The model is ``ChatOpenAI`` talking to the embedded fake OpenAI server (127.0.0.1), scripted
to ask for the same ``search_flights`` call after every answer, forever: the classic agent
loop. ``protect_graph`` runs the graph under one budget; the 5th identical tool call is
refused before the tool runs (``BudgetExceededError``, reason ``loop_detected``). With
``--budget`` loop detection is off and each turn costs a paid search: the budget refuses
the call that would overshoot it. Either way the script prints what stopped the run and its
cost report, per node (agent), model and tool. Exit status 0 when the run was stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Annotated, Any

from langchain_core.messages import AnyMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from typing_extensions import TypedDict

from otel_budget import BudgetExceededError, BudgetInstrumentor, PriceBook
from otel_budget.instrumentation.langchain import protect_graph
from otel_budget.testing import Behaviour, FakeLLMServer

MODEL = "gpt-4o-mini"
SEARCH_USD = 0.02  # what one flight search costs (a paid API)


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@tool
def search_flights(origin: str, destination: str) -> str:
    """Search flights between two cities."""
    return f"no direct flight from {origin} to {destination} today"


def build_agent(base_url: str) -> Any:
    model = ChatOpenAI(model=MODEL, base_url=base_url, api_key="offline", max_retries=0)
    model = model.bind_tools([search_flights])

    def agent(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([search_flights]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(name="travel_agent")


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--budget", action="store_true", help="loop detection off: the budget stops it")
    args.add_argument("--max-usd", type=float, default=0.10)
    options = args.parse_args(argv)
    os.environ.pop("LANGSMITH_TRACING", None)  # nothing leaves this machine

    BudgetInstrumentor().instrument(
        prices=PriceBook(tools={"search_flights": SEARCH_USD}),
        loop_detection=not options.budget, libraries=["openai"],
    )  # the openai SDK underneath is metered too: each call is still charged once
    with FakeLLMServer() as server:
        server.default_behaviour = Behaviour(tool_calls=[
            {"name": "search_flights", "arguments": {"origin": "Paris", "destination": "Oslo"}}
        ])  # fmt: skip
        agent = protect_graph(build_agent(server.openai_base_url), max_usd=options.max_usd)
        try:
            agent.invoke(
                {"messages": [("user", "Find me a direct flight from Paris to Oslo.")]},
                config={"recursion_limit": 200},
            )
        except BudgetExceededError as exc:
            print(f"stopped: {exc.reason}: {exc}")
        else:
            print("the agent finished on its own (unexpected for this script)")
            return 1
        print(agent.report().format())
        print(f"provider bill: ${server.stats()['billed_nanos'] / 1e9:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
