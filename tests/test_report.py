"""A run's cost tables: each call adds to one line; the tables by model, provider, tool and
agent, and the root span's breakdown, are summed from the lines in the order names were
first seen."""

from __future__ import annotations

from otel_budget import attributes as attrs
from otel_budget.money import to_usd
from otel_budget.report import TraceStats

# (kind, nanos, model or tool, provider, input, output, agent), in call order.
CALLS = [
    ("llm", 1_000, "gpt-4o-mini", "openai", 10, 2, None),
    ("tool", 50, "search", "", 0, 0, "researcher"),
    ("llm", 2_000, "claude-haiku", "anthropic", 20, 4, "researcher"),
    ("llm", 3_000, "gpt-4o-mini", "openai", 30, 6, "writer"),
    ("tool", 70, "search", "", 0, 0, "writer"),
    ("llm", 4_000, "gpt-4o", "openai", 40, 8, "researcher"),
    ("tool", 90, "fetch", "", 0, 0, None),
    ("llm", 5_000, "gpt-4o-mini", "openai", 50, 10, None),
]


def expected() -> dict[str, dict[str, list[int]]]:
    """[nanos, calls, input, output] per name, each table in first-seen order (a plain
    dict per table, filled call by call: what the tables were before they were summed)."""
    tables: dict[str, dict[str, list[int]]] = {"model": {}, "provider": {}, "tool": {}, "agent": {}}

    def add(table: str, name: str, nanos: int, inp: int, out: int) -> None:
        line = tables[table].setdefault(name, [0, 0, 0, 0])
        for i, value in enumerate((nanos, 1, inp, out)):
            line[i] += value

    for kind, nanos, name, provider, inp, out, agent in CALLS:
        if kind == "llm":
            add("model", name, nanos, inp, out)
            add("provider", provider, nanos, inp, out)
        else:
            add("tool", name, nanos, 0, 0)
        if agent is not None:
            add("agent", agent, nanos, inp, out)
    return tables


def run_stats() -> TraceStats:
    stats = TraceStats("ab" * 16, 1_000_000)
    for kind, nanos, name, provider, inp, out, agent in CALLS:
        if kind == "llm":
            stats.add_llm(nanos, name, provider, "chat", inp, out, agent=agent)
        else:
            stats.add_tool(nanos, name, agent=agent)
    return stats


def test_report_tables_sum_the_lines_in_first_seen_order() -> None:
    report = run_stats().report()
    want = expected()
    for table, got in (
        ("model", report.by_model), ("provider", report.by_provider),
        ("tool", report.by_tool), ("agent", report.by_agent),
    ):  # fmt: skip
        assert list(got) == list(want[table]), table
        for name, (nanos, calls, inp, out) in want[table].items():
            item = got[name]
            assert (item.usd, item.calls, item.input_tokens, item.output_tokens) == (
                to_usd(nanos), calls, inp, out
            ), (table, name)
    assert report.calls == 5 and report.tool_calls == 3 and report.turns == 5
    assert report.total_usd == to_usd(sum(call[1] for call in CALLS))
    assert report.llm_usd == to_usd(15_000) and report.tools_usd == to_usd(210)


def test_root_breakdown_lists_names_and_costs_in_first_seen_order() -> None:
    out = run_stats().root_attributes()
    want = expected()
    for names_key, costs_key, table in (
        (attrs.TRACE_MODELS, attrs.TRACE_MODEL_COSTS_USD, "model"),
        (attrs.TRACE_PROVIDERS, attrs.TRACE_PROVIDER_COSTS_USD, "provider"),
        (attrs.TRACE_TOOLS, attrs.TRACE_TOOL_COSTS_USD, "tool"),
        (attrs.TRACE_AGENTS, attrs.TRACE_AGENT_COSTS_USD, "agent"),
    ):
        assert out[names_key] == list(want[table]), table
        assert out[costs_key] == [to_usd(line[0]) for line in want[table].values()], table


def test_a_run_without_tools_or_agents_has_no_such_tables() -> None:
    stats = TraceStats(None, None)
    stats.add_llm(1_000, "gpt-4o-mini", "openai", "embeddings", 5, 0)
    report = stats.report()
    assert report.by_tool == {} and report.by_agent == {} and report.turns == 0
    out = stats.root_attributes()
    assert attrs.TRACE_TOOLS not in out and attrs.TRACE_AGENTS not in out
    assert out[attrs.TRACE_MODELS] == ["gpt-4o-mini"]
