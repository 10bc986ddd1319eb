"""An agent stuck calling one MCP tool, stopped by loop detection (or by its budget).

    python examples/mcp_tool_loop.py                   # the model asks for the same search
                                                       # every turn: loop detection stops it
    python examples/mcp_tool_loop.py --stop budget     # a new search every turn: the budget
                                                       # stops it
    python examples/mcp_tool_loop.py --json            # one JSON line, for scripts and tests

Everything runs on this machine, offline: the model is the embedded ``FakeLLMServer`` (an
OpenAI-compatible API on 127.0.0.1, driven by the real ``openai`` SDK), scripted to keep
asking for a ``search`` tool; the tool is served by a real MCP server that this script starts
as a subprocess and talks to over stdio (``--serve`` is that server). otel-budget meters both
through ``BudgetInstrumentor``: the chat calls at their token price, each ``search`` at the
price book's $0.002, all in one ``budget()`` and one trace, under one ``invoke_agent`` span.

Needs the ``openai`` and ``mcp`` extras: ``pip install -e '.[openai,mcp]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from typing import Any

MODEL = "gpt-4o-mini"
SEARCH_USD = "0.002"
LOOP_THRESHOLD = 4  # the 4th identical call within the window is a loop
QUERY = "cheapest flight to Lisbon"
SYSTEM = "You are a travel agent. Use the search tool until you are sure."


# -- the MCP server (run as a subprocess over stdio) -------------------------------------------
def serve() -> None:
    """The MCP server: one ``search`` tool, and the count of searches it actually ran."""
    try:
        from mcp.server.mcpserver import MCPServer as Server
    except ImportError:  # mcp 1
        from mcp.server.fastmcp import FastMCP as Server  # type: ignore[no-redef]

    server = Server("travel-tools")
    ran: Counter[str] = Counter()

    @server.tool()
    def search(query: str) -> str:
        """Search flights."""
        ran["search"] += 1
        return f"Found 3 flights for {query!r}: TP 1351 EUR 89, FR 7263 EUR 64, U2 4421 EUR 71."

    @server.resource("stats://executions")
    def executions() -> str:
        return json.dumps(dict(ran))

    server.run("stdio")


# -- the agent ---------------------------------------------------------------------------------
def tools_for_openai(listed: Any) -> list[dict[str, Any]]:
    """The MCP server's tools as OpenAI function tools."""
    out = []
    for tool in listed.tools:
        schema = getattr(tool, "input_schema", None) or getattr(tool, "inputSchema", None)
        out.append({"type": "function", "function": {
            "name": tool.name, "description": tool.description or "", "parameters": schema,
        }})  # fmt: skip
    return out


def script_model(llm: Any, stop: str, turns: int) -> None:
    """What the fake model answers: the same search every turn, or a new one every turn."""
    from otel_budget.testing import Behaviour

    if stop == "loop":
        llm.default_behaviour = Behaviour(tool_calls=[{"name": "search", "arguments": {"query": QUERY}}])
    else:
        llm.script(*(
            Behaviour(tool_calls=[{"name": "search", "arguments": {"query": f"{QUERY}, page {n}"}}])
            for n in range(1, turns + 1)
        ))  # fmt: skip


async def agent(args: argparse.Namespace, llm: Any, log: Any) -> dict[str, Any]:
    import openai
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from otel_budget import BudgetExceededError, agent_span, budget

    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    params = StdioServerParameters(command=sys.executable, args=[__file__, "--serve"], env=env)
    model = openai.AsyncOpenAI(base_url=llm.openai_base_url, api_key="offline", max_retries=0)
    outcome: dict[str, Any] = {"stopped_by": None, "turns": 0, "tool_calls": 0}
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = tools_for_openai(await session.list_tools())
        messages: list[Any] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Find me the cheapest flight to Lisbon next Friday."},
        ]
        run = budget(max_usd=args.budget, name="invoke_agent travel-agent")
        try:
            async with run, agent_span("travel-agent", description="books flights"):
                for turn in range(1, args.max_turns + 1):
                    outcome["turns"] = turn
                    reply = await model.chat.completions.create(
                        model=MODEL, messages=messages, tools=tools, max_tokens=200
                    )
                    message = reply.choices[0].message
                    messages.append(message.model_dump(exclude_none=True))
                    for call in message.tool_calls or []:
                        arguments = json.loads(call.function.arguments)
                        log(f"turn {turn:2d}: the model asks for {call.function.name}({arguments})")
                        result = await session.call_tool(call.function.name, arguments)
                        outcome["tool_calls"] += 1
                        text = "".join(getattr(c, "text", "") for c in result.content)
                        messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
                    if not message.tool_calls:
                        break
        except BudgetExceededError as exc:
            outcome["stopped_by"] = exc.reason
            outcome["message"] = str(exc)
            if exc.loop is not None:
                outcome["loop"] = exc.loop
        stats = await session.read_resource("stats://executions")
        outcome["tool_executions"] = json.loads(stats.contents[0].text).get("search", 0)
    await model.close()
    outcome["report"] = run.report()
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop", choices=("loop", "budget"), default="loop",
                        help="what stops the agent: loop detection (default) or the budget")
    parser.add_argument("--budget", default="0.02", help="the run's budget in USD (0.02)")
    parser.add_argument("--max-turns", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from otel_budget import BudgetInstrumentor, LoopPolicy, PriceBook
    from otel_budget.testing import FakeLLMServer

    trace.set_tracer_provider(TracerProvider())  # spans with ids (no exporter: printed below)
    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(
        libraries=["openai", "mcp"], prices=PriceBook(tools={"search": SEARCH_USD}),
        loop_detection=LoopPolicy(threshold=LOOP_THRESHOLD),
    )  # fmt: skip
    log = (lambda line: None) if args.json else print
    # The fake provider bills gpt-4o-mini at genai-prices' rates, so the ledger matches it.
    with FakeLLMServer(prices={MODEL: (0.15, 0.60, 0.075)}) as llm:
        script_model(llm, args.stop, args.max_turns)
        outcome = asyncio.run(agent(args, llm, log))
        billed_nanos = llm.stats()["billed_nanos"]
    instrumentor.uninstrument()
    report = outcome.pop("report")
    outcome["llm_billed_usd"] = billed_nanos / 1e9
    outcome["report"] = report.to_dict()
    if args.json:
        print(json.dumps(outcome, default=str))
    else:
        reason = outcome["stopped_by"]
        if reason == "loop_detected":
            print(f"\nSTOPPED by loop detection: search was asked for with the same arguments "
                  f"{LOOP_THRESHOLD} times; the {LOOP_THRESHOLD}th call never reached the server.")
        elif reason is not None:
            print(f"\nSTOPPED by the budget ({reason}): {outcome['message']}")
        else:
            print("\nnot stopped: the agent finished on its own")
        print(f"the MCP server ran search {outcome['tool_executions']} times; "
              f"the fake provider billed ${outcome['llm_billed_usd']:.6f} for the model\n")
        print(report.format())
    expected = "loop_detected" if args.stop == "loop" else "limit"
    return 0 if outcome["stopped_by"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
