"""The LangChain runs our callback handlers meter: one record per run id, process-wide.

    run = RUNS.start(run_id, parent_run_id, "tool")   # None: another handler of ours has it
    RUNS.check(run)                                   # raises the run tree's refusal, if any
    with under(run):                                  # the parent run's span and agent current
        call = begin_tool(...)
    run.tokens = enter(call.span, agent_of_run)       # current while the tool runs
    ...
    run = RUNS.pop(run_id); leave(run.tokens)

Run ids are unique in the process, so every handler of this package shares one registry:
two of our handlers on one run (one passed in ``callbacks=`` and the instrumentor's, or the
sync and the async twin on a manager LangChain copied) meter it once.

Parents are explicit: what a run starts is parented to the span of its nearest tracked
ancestor and attributed to its nearest agent (``under``), whatever the current context is.
Async LangGraph starts a node's run in the graph's task and ends it in the node's own, so a
context attached at a chain's start could not be restored at its end and would leak into the
graph's next node (and, for the graph itself, into the caller after ``ainvoke``). So chain
runs attach nothing to the caller's context (their ``agent_span`` lives in a context of its
own); model and tool runs, which start and end in one task, are made current while they run,
so that the provider call (or a tool's own metering) inside them nests and takes over.

A refusal is final for its run tree: once a call under a root run was refused, every later
chain, model or tool start under that root raises the same ``BudgetExceededError``. This is
what stops a graph whose ``ToolNode(handle_tool_errors=True)``, a ``with_fallbacks`` or the
application's own ``except Exception`` turned the refusal into a message and went on.

LangGraph marks each node's run with ``langgraph_node`` metadata and a ``graph:step:N`` tag
(its children inherit the metadata, not the tag): ``agent_of`` tells those runs, and root
chain runs (the graph itself), apart. See ``handler`` for what becomes an agent.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace

from otel_budget.context import CURRENT_AGENT
from otel_budget.errors import BudgetExceededError
from otel_budget.metered import CURRENT_CALL

#: The LangGraph node a span's spend is attributed to, and the graph step it ran in.
LANGGRAPH_NODE = "otel_budget.langgraph.node"
LANGGRAPH_STEP = "otel_budget.langgraph.step"
_STEP_TAG = "graph:step:"
#: Runs kept at most (a run whose end never comes, e.g. a generator dropped unfinished, must
#: not grow the registry forever): the oldest are forgotten first.
MAX_RUNS = 100_000


class Run:
    """One LangChain run we track: its parent and root, what we started for it."""

    __slots__ = (
        "run_id", "parent", "root", "kind", "span", "agent_name", "agent", "agent_context",
        "call", "tokens", "refusal",
    )  # fmt: skip

    def __init__(self, run_id: UUID, parent: Run | None, kind: str) -> None:
        self.run_id = run_id
        self.parent = parent
        self.root: Run = parent.root if parent is not None else self
        self.kind = kind
        self.span: Any = None  # our span for the run (agent, model or tool), if any
        self.agent_name: str | None = None  # set when the run is an agent
        self.agent: Any = None  # its entered ``agent_span``
        self.agent_context: contextvars.Context | None = None  # where that span is current
        self.call: Any = None  # the LLMCall / ToolCall metering the run
        self.tokens: tuple[object, ...] | None = None  # from ``enter``
        self.refusal: BudgetExceededError | None = None  # on a root: what refused its tree

    def scope(self) -> tuple[Any, str | None]:
        """(the span of the nearest ancestor that has one, the nearest agent's name)."""
        span: Any = None
        agent: str | None = None
        run = self.parent
        while run is not None and (span is None or agent is None):
            if span is None and run.span is not None:
                span = run.span
            if agent is None and run.agent_name is not None:
                agent = run.agent_name
            run = run.parent
        return span, agent


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
            run = Run(run_id, parent, kind)
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


@contextmanager
def under(run: Run) -> Iterator[None]:
    """Inside: the current span is ``run``'s nearest ancestor span, the current agent its
    nearest agent (each left as it is when no ancestor has one). Entered and left within
    one callback, so in one context."""
    span, agent = run.scope()
    token = otel_context.attach(trace.set_span_in_context(span)) if span is not None else None
    agent_token = CURRENT_AGENT.set(agent) if agent is not None else None
    try:
        yield
    finally:
        if agent_token is not None:
            CURRENT_AGENT.reset(agent_token)
        if token is not None:
            otel_context.detach(token)


def enter(span: Any, agent: str | None, sending: Any = None) -> tuple[object, ...]:
    """Make ``span`` (and ``agent``) current while a model or tool run runs: the provider
    call or the tool's own metering inside it nests and takes it over. ``sending``: the
    ``LLMCall`` to publish as the call being sent (``CURRENT_CALL``), so that our provider
    wrappers underneath pass through instead of metering it again: for a span that cannot
    be taken over (not recording: no SDK provider, or sampled out). ``leave`` at the end."""
    tokens: tuple[object, ...] = (
        otel_context.attach(trace.set_span_in_context(span)), CURRENT_AGENT.set(agent)
    )
    if sending is not None:
        tokens += (CURRENT_CALL.set(sending),)
    return tokens


def leave(tokens: tuple[object, ...] | None) -> None:
    """Undo ``enter``; nothing when the run ended in another context than it started in
    (that context is not ours to restore, and no error of ours is logged for it)."""
    if tokens is None:
        return
    resets: tuple[Callable[[Any], Any], ...] = (
        otel_context._RUNTIME_CONTEXT.detach, CURRENT_AGENT.reset, CURRENT_CALL.reset
    )
    for reset, token in zip(resets, tokens, strict=False):
        try:
            reset(token)
        except ValueError:
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


__all__ = [
    "LANGGRAPH_NODE", "LANGGRAPH_STEP", "RUNS", "Run", "Runs", "agent_of", "enter", "leave", "under",
]
