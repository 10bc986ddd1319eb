"""The LangChain runs our callback handlers meter: one record per run id, process-wide.

    run = RUNS.start(run_id, parent_run_id, "tool")   # None: another handler of ours has it
    RUNS.check(run)                                   # raises the run tree's refusal, if any
    run.token = enter(span)                           # the run's span current until it ends
    ...
    run = RUNS.pop(run_id); leave(run.token)

Run ids are unique in the process, so every handler of this package shares one registry:
two of our handlers on one run (one passed in ``callbacks=`` and the instrumentor's, or the
sync and the async twin on a manager LangChain copied) meter it once.

A refusal is final for its run tree: once a call under a root run was refused, every later
chain, model or tool start under that root raises the same ``BudgetExceededError``. This is
what stops a graph whose ``ToolNode(handle_tool_errors=True)``, a ``with_fallbacks`` or the
application's own ``except Exception`` turned the refusal into a message and went on.

LangGraph marks each node's run with ``langgraph_node`` metadata and a ``graph:step:N`` tag
(its children inherit the metadata, not the tag): ``agent_of`` tells those runs, and root
chain runs (the graph itself), apart. See ``handler`` for what becomes an agent.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace

from otel_budget.errors import BudgetExceededError

#: The LangGraph node a span's spend is attributed to, and the graph step it ran in.
LANGGRAPH_NODE = "otel_budget.langgraph.node"
LANGGRAPH_STEP = "otel_budget.langgraph.step"
_STEP_TAG = "graph:step:"
#: Runs kept at most (a run whose end never comes, e.g. a generator dropped unfinished, must
#: not grow the registry forever): the oldest are forgotten first.
MAX_RUNS = 100_000


class Run:
    """One LangChain run we track: its root, what we started for it, the context token."""

    __slots__ = ("run_id", "root", "kind", "agent", "call", "token", "refusal")

    def __init__(self, run_id: UUID, root: Run | None, kind: str) -> None:
        self.run_id = run_id
        self.root: Run = root if root is not None else self
        self.kind = kind
        self.agent: Any = None  # the entered ``agent_span`` context manager
        self.call: Any = None  # the LLMCall / ToolCall metering the run
        self.token: object | None = None  # from ``enter``: the run's span made current
        self.refusal: BudgetExceededError | None = None  # on a root: what refused its tree


class Runs:
    """The registry (thread-safe; events of one run can arrive on several threads)."""

    def __init__(self, limit: int = MAX_RUNS) -> None:
        self._runs: dict[UUID, Run] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def start(self, run_id: UUID, parent_run_id: UUID | None, kind: str) -> Run | None:
        """Track a run; None when it is tracked already (another handler of ours meters
        it). A run whose parent we do not track is a root."""
        with self._lock:
            if run_id in self._runs:
                return None
            parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
            run = Run(run_id, parent.root if parent is not None else None, kind)
            if len(self._runs) >= self._limit:
                self._runs.pop(next(iter(self._runs)))
            self._runs[run_id] = run
            return run

    def get(self, run_id: UUID) -> Run | None:
        return self._runs.get(run_id)

    def pop(self, run_id: UUID) -> Run | None:
        with self._lock:
            return self._runs.pop(run_id, None)

    def refused(self, run: Run, error: BudgetExceededError) -> None:
        """A call of ``run``'s tree was refused: the tree stops here."""
        if run.root.refusal is None:
            run.root.refusal = error

    @staticmethod
    def check(run: Run) -> None:
        """Raise the refusal of ``run``'s tree, if a call in it was refused."""
        refusal = run.root.refusal
        if refusal is not None:
            raise refusal

    def __len__(self) -> int:
        return len(self._runs)


RUNS = Runs()


def enter(span: Any) -> object:
    """Make ``span`` current (its run's children, and the provider call a model run makes,
    start under it); ``leave`` the token when the run ends."""
    return otel_context.attach(trace.set_span_in_context(span))


def leave(token: object | None) -> None:
    """Undo ``enter``. A run that ends in another context than it started in (a generator
    finished by another task) cannot restore the one it started in: that context keeps its
    span, and is dropped with its task; nothing to log."""
    if token is None:
        return
    try:
        otel_context._RUNTIME_CONTEXT.detach(token)  # type: ignore[arg-type]
    except Exception:
        pass


def agent_of(
    name: str | None, metadata: Mapping[str, Any] | None, tags: Sequence[str] | None,
    root: bool,
) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
    """(agent name, span attributes) when a chain run is an agent invocation: a LangGraph
    node (the node's name), or a root chain run (the graph or chain itself, by its name)."""
    node = metadata.get("langgraph_node") if metadata else None
    if isinstance(node, str) and node and node == name:
        step = next((t for t in tags or () if isinstance(t, str) and t.startswith(_STEP_TAG)), None)
        if step is not None:
            attributes: dict[str, Any] = {LANGGRAPH_NODE: node}
            number = step[len(_STEP_TAG):]
            if number.isdigit():
                attributes[LANGGRAPH_STEP] = int(number)
            return node, attributes
    if root:
        return (name if isinstance(name, str) and name else "chain"), {}
    return None


__all__ = ["LANGGRAPH_NODE", "LANGGRAPH_STEP", "RUNS", "Run", "Runs", "agent_of", "enter", "leave"]
