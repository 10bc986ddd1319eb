"""Per-run cost accounting (``TraceStats``) and the report users read (``CostReport``).

    >>> with budget(max_usd=1.0) as run:                       # doctest: +SKIP
    ...     agent.run()
    >>> report = run.report()                                  # doctest: +SKIP
    >>> report.total_usd, report.by_model["gpt-4o-mini"].calls  # doctest: +SKIP

``TraceStats`` is updated on the hot path (one short lock, a few integer additions);
``CostReport`` is an immutable snapshot built only when asked for.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.money import to_usd

MAX_EVENTS = 256  # a runaway loop must not grow a report without bound

TERMINATED_BY_BUDGET = "budget_exceeded"
TERMINATED_BY_PAUSE = "paused"
TERMINATED_BY_UNKNOWN_MODEL = "unknown_model"
TERMINATED_BY_INTERNAL_ERROR = "internal_error"
TERMINATED_BY_INVALID_REQUEST = "invalid_request"
TERMINATED_BY_CONFIGURATION = "configuration"
TERMINATED_BY_LOOP = "loop_detected"


@dataclass(frozen=True)
class LineItem:
    """Cost of one model, provider or tool within a run."""

    usd: float
    calls: int
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class CostReport:
    """What a run cost, and how it ended."""

    trace_id: str | None
    budget_usd: float | None
    total_usd: float
    remaining_usd: float | None
    llm_usd: float
    tools_usd: float
    calls: int  # LLM calls (inference and embeddings) that completed
    tool_calls: int
    turns: int  # inference calls (chat, text_completion, generate_content): one agent turn each
    aborts: int
    by_model: dict[str, LineItem]
    by_provider: dict[str, LineItem]
    by_tool: dict[str, LineItem]
    events: list[dict[str, Any]]
    duration_s: float
    terminated_by: str | None
    overshoot_usd: float = 0.0  # actual cost above what was reserved (projection too low)
    # Spend of the calls made inside ``agent_span`` blocks, by the innermost agent's name.
    by_agent: dict[str, LineItem] = field(default_factory=dict)
    loops: int = 0  # loops detected (refused or, under action="warn", only reported)
    # Prompt cache (``otel_budget.cache``): calls answered from it (counted in ``calls`` at
    # $0), calls it could not answer (sent, enforced as usual), what the hits saved.
    cache_hits: int = 0
    cache_misses: int = 0
    cache_saved_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        def items(table: dict[str, LineItem]) -> dict[str, dict[str, Any]]:
            return {name: item.__dict__.copy() for name, item in table.items()}

        out = dict(self.__dict__)
        out["by_model"] = items(self.by_model)
        out["by_provider"] = items(self.by_provider)
        out["by_tool"] = items(self.by_tool)
        out["by_agent"] = items(self.by_agent)
        out["events"] = [dict(e) for e in self.events]
        return out

    def format(self) -> str:
        """A plain-text summary for terminals and logs."""
        budget = "none" if self.budget_usd is None else f"${self.budget_usd:.4f}"
        lines = [
            f"spent ${self.total_usd:.6f} of {budget} in {self.duration_s:.2f}s "
            f"({self.calls} LLM calls, {self.tool_calls} tool calls, {self.aborts} refused)",
        ]
        if self.terminated_by:
            lines.append(f"terminated by: {self.terminated_by}")
        if self.loops:
            lines.append(f"loops detected: {self.loops}")
        if self.cache_hits or self.cache_misses:
            lines.append(
                f"cache: {self.cache_hits} hits, {self.cache_misses} misses, "
                f"saved ${self.cache_saved_usd:.6f}"
            )
        tables = (("agent", self.by_agent), ("model", self.by_model), ("tool", self.by_tool))
        for title, table in tables:
            for name, item in sorted(table.items(), key=lambda kv: -kv[1].usd):
                lines.append(f"  {title:5} {name:32} ${item.usd:.6f}  x{item.calls}")
        return "\n".join(lines)


class _Line:
    __slots__ = ("nanos", "calls", "input_tokens", "output_tokens")

    def __init__(self) -> None:
        self.nanos = 0
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def freeze(self) -> LineItem:
        return LineItem(to_usd(self.nanos), self.calls, self.input_tokens, self.output_tokens)


def _add(table: dict[str, _Line], name: str, line: _Line) -> None:
    total = table.get(name)
    if total is None:
        total = table[name] = _Line()
    total.nanos += line.nanos
    total.calls += line.calls
    total.input_tokens += line.input_tokens
    total.output_tokens += line.output_tokens


_LLM = "llm"
_TOOL = "tool"


class TraceStats:
    """Running totals of one trace or ``budget()`` block. Thread-safe."""

    __slots__ = (
        "trace_id", "limit", "spent", "llm", "tools", "calls", "tool_calls", "turns", "aborts",
        "overshoot", "lines", "loops", "events",
        "cache",
        "started", "ended",
        "terminated_by", "threshold_index", "alert_at", "root_span", "label", "key", "scope_spec", "_lock",
        "__weakref__",
    )  # fmt: skip

    def __init__(self, trace_id: str | None, limit: int | None) -> None:
        self.trace_id = trace_id
        self.limit = limit
        self.spent = 0
        self.llm = 0
        self.tools = 0
        self.calls = 0
        self.tool_calls = 0
        self.turns = 0
        self.aborts = 0
        self.overshoot = 0
        # One line per (kind, model or tool, provider, agent), in the order first seen: a
        # call adds to one line (one lookup on the hot path); the tables by model, provider,
        # tool and agent are summed from them when a report or the root's breakdown is built.
        self.lines: dict[tuple[str, str, str, str | None], _Line] = {}
        self.loops = 0
        # Prompt cache [hits, misses, nano-USD the hits did not spend]; None: no lookup yet.
        self.cache: list[int] | None = None
        self.events: list[dict[str, Any]] = []
        self.started = time.time()
        self.ended: float | None = None
        self.terminated_by: str | None = None
        self.threshold_index = 0  # thresholds[:threshold_index] have fired for this run
        # Spend from which the next threshold may fire (set by thresholds.py): until then a
        # settled call skips the threshold check (spend only grows). 0: check next time.
        self.alert_at: float = 0 if limit is not None else math.inf
        self.root_span: Any = None  # the live local root span, when we saw it start
        # How warnings name this run: "t:<trace id>", or the budget() block's key and name.
        self.label = f"t:{trace_id}" if trace_id else "process"
        self.key = self.label  # the trace's ledger key, computed once
        self.scope_spec: Any = None  # its ledger ScopeLimit when no baggage narrows it (scopes.py)
        self._lock = threading.Lock()

    def add_llm(
        self, nanos: int, model: str, provider: str, operation: str, inp: int, out: int,
        overshoot: int = 0, agent: str | None = None,
    ) -> None:  # fmt: skip
        key = (_LLM, model, provider, agent)
        with self._lock:
            self.spent += nanos
            self.llm += nanos
            self.calls += 1
            self.overshoot += overshoot
            if operation in attrs.INFERENCE_OPERATIONS:
                self.turns += 1
            line = self.lines.get(key)
            if line is None:
                line = self.lines[key] = _Line()
            line.nanos += nanos
            line.calls += 1
            line.input_tokens += inp
            line.output_tokens += out

    def add_tool(
        self, nanos: int, tool: str, overshoot: int = 0, agent: str | None = None
    ) -> None:
        key = (_TOOL, tool, "", agent)
        with self._lock:
            self.spent += nanos
            self.tools += nanos
            self.tool_calls += 1
            self.overshoot += overshoot
            line = self.lines.get(key)
            if line is None:
                line = self.lines[key] = _Line()
            line.nanos += nanos
            line.calls += 1

    def _tables(self) -> tuple[dict[str, _Line], dict[str, _Line], dict[str, _Line], dict[str, _Line]]:
        """(by model, by provider, by tool, by agent), summed from the lines (lock held)."""
        by_model: dict[str, _Line] = {}
        by_provider: dict[str, _Line] = {}
        by_tool: dict[str, _Line] = {}
        by_agent: dict[str, _Line] = {}
        for (kind, name, provider, agent), line in self.lines.items():
            if kind == _LLM:
                _add(by_model, name, line)
                _add(by_provider, provider, line)
            else:
                _add(by_tool, name, line)
            if agent is not None:
                _add(by_agent, agent, line)
        return by_model, by_provider, by_tool, by_agent

    def add_cache(self, hits: int = 0, misses: int = 0, saved: int = 0) -> None:
        """A cache lookup's outcome, or (``saved``) what a hit would have cost live."""
        with self._lock:
            cache = self.cache
            if cache is None:
                cache = self.cache = [0, 0, 0]
            cache[0] += hits
            cache[1] += misses
            cache[2] += saved

    def add_loop(self, **fields: Any) -> None:
        """A loop was detected in this run (refused or only reported)."""
        with self._lock:
            self.loops += 1
        self.add_event(attrs.EVENT_LOOP, **fields)

    def add_event(self, name: str, **fields: Any) -> None:
        with self._lock:
            if len(self.events) < MAX_EVENTS:
                self.events.append({"time": time.time(), "name": name, **fields})

    def record_abort(self, terminated_by: str, **fields: Any) -> None:
        with self._lock:
            self.aborts += 1
            if self.terminated_by is None:
                self.terminated_by = terminated_by
        self.add_event(attrs.EVENT_EXCEEDED, reason=terminated_by, **fields)

    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.spent

    def root_attributes(self) -> dict[str, Any]:
        """The breakdown written on the local root span (parallel arrays, no JSON to parse)."""
        with self._lock:
            out: dict[str, Any] = {
                attrs.TRACE_SPENT_USD: to_usd(self.spent),
                attrs.TRACE_LLM_USD: to_usd(self.llm),
                attrs.TRACE_TOOLS_USD: to_usd(self.tools),
                attrs.TRACE_CALLS: self.calls,
                attrs.TRACE_TOOL_CALLS: self.tool_calls,
                attrs.TRACE_TURNS: self.turns,
                attrs.TRACE_ABORTS: self.aborts,
            }
            if self.limit is not None:
                out[attrs.TRACE_BUDGET_USD] = to_usd(self.limit)
                out[attrs.TRACE_REMAINING_USD] = to_usd(self.limit - self.spent)
            if self.terminated_by:
                out[attrs.TRACE_TERMINATED_BY] = self.terminated_by
            if self.loops:
                out[attrs.TRACE_LOOPS] = self.loops
            if self.cache is not None:
                hits, misses, saved = self.cache
                out[attrs.TRACE_CACHE_HITS] = hits
                out[attrs.TRACE_CACHE_MISSES] = misses
                out[attrs.TRACE_CACHE_SAVED_USD] = to_usd(saved)
            by_model, by_provider, by_tool, by_agent = self._tables()
            for names_key, costs_key, table in (
                (attrs.TRACE_MODELS, attrs.TRACE_MODEL_COSTS_USD, by_model),
                (attrs.TRACE_PROVIDERS, attrs.TRACE_PROVIDER_COSTS_USD, by_provider),
                (attrs.TRACE_TOOLS, attrs.TRACE_TOOL_COSTS_USD, by_tool),
                (attrs.TRACE_AGENTS, attrs.TRACE_AGENT_COSTS_USD, by_agent),
            ):
                if table:
                    out[names_key] = list(table)
                    out[costs_key] = [to_usd(line.nanos) for line in table.values()]
            return out

    def report(self) -> CostReport:
        with self._lock:
            end = self.ended if self.ended is not None else time.time()
            by_model, by_provider, by_tool, by_agent = self._tables()
            return CostReport(
                trace_id=self.trace_id,
                budget_usd=None if self.limit is None else to_usd(self.limit),
                total_usd=to_usd(self.spent),
                remaining_usd=None if self.limit is None else to_usd(self.limit - self.spent),
                llm_usd=to_usd(self.llm),
                tools_usd=to_usd(self.tools),
                calls=self.calls,
                tool_calls=self.tool_calls,
                turns=self.turns,
                aborts=self.aborts,
                by_model={k: v.freeze() for k, v in by_model.items()},
                by_provider={k: v.freeze() for k, v in by_provider.items()},
                by_tool={k: v.freeze() for k, v in by_tool.items()},
                events=[dict(e) for e in self.events],
                duration_s=max(0.0, end - self.started),
                terminated_by=self.terminated_by,
                overshoot_usd=to_usd(self.overshoot),
                by_agent={k: v.freeze() for k, v in by_agent.items()},
                loops=self.loops,
                cache_hits=self.cache[0] if self.cache else 0,
                cache_misses=self.cache[1] if self.cache else 0,
                cache_saved_usd=to_usd(self.cache[2]) if self.cache else 0.0,
            )


@dataclass(frozen=True)
class ThresholdInfo:
    """What ``on_warning`` receives (also as a dict via ``to_dict``)."""

    scope: str
    threshold: float
    spent_usd: float
    budget_usd: float
    trace_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
