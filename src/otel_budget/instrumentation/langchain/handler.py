"""``BudgetCallbackHandler``: a LangChain run's agents, models and tools, metered.

    from otel_budget import budget
    from otel_budget.instrumentation.langchain import BudgetCallbackHandler

    with budget(max_usd=0.25) as run:
        graph.invoke(inputs, config={"callbacks": [BudgetCallbackHandler()]})
    print(run.report().format())

What each run becomes:

* a root chain run (the graph, or the chain invoked) and every LangGraph node run: an
  ``invoke_agent {name}`` span (``agent_span``), current while it runs. The node is the agent
  of the breakdown: a model or tool call is attributed to the innermost agent, so
  ``report()`` and the root span show spend per node (``gen_ai.agent.name`` is the node's
  name, ``otel_budget.langgraph.node`` / ``.step`` say which node and step). In a multi-agent
  graph the nodes are the agents; in a single ReAct agent they are its model and tools steps.
* a chat or completion model run: metered through the one LLM path (``start_call``) before
  the request is sent; a refusal raises ``BudgetExceededError`` from ``on_chat_model_start``,
  so the request is never made. Its span is current while the model runs: when our provider
  instrumentor meters the SDK call underneath, that call takes the metering over (its span
  nests in ours, ``metered.begin_steps``) and the money is charged once.
* a tool run: ``begin_tool(name, arguments=..., call_id=tool_call_id)`` before the tool runs
  (loop detection, then the tool's price reserved); refused, ``on_tool_start`` raises and the
  tool never runs. ``on_tool_end`` settles with the tool's output (a ``ToolMessage``'s
  content), ``on_tool_error`` releases.

A refusal ends the whole run tree (``runs``): a later chain, model or tool start under the
same root raises it again, so a graph whose ``ToolNode(handle_tool_errors=True)`` turned it
into a message stops at its next step instead of paying for another model turn.

The handler raises (``raise_error``) only ``BudgetExceededError``; a failure of ours is logged
rate-limited and the run goes on, except that under ``failure_policy="fail_closed"`` a model
or tool we failed to meter is refused (reason ``internal_error``) rather than run unmetered.
It runs inline (``run_inline``): in the caller's context, so the spans it makes current are
the parents of what the run does next. ``AsyncBudgetCallbackHandler`` is the same logic for
async callback managers, awaiting the ledger instead of blocking on it (each event is one
flow, driven sync or async: ``_flow``).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from opentelemetry import trace

from otel_budget.agents import agent_span
from otel_budget.errors import BudgetExceededError
from otel_budget.instrumentation._call import astart_call, start_call
from otel_budget.instrumentation._flow import Flow, arun_flow, run_flow, step
from otel_budget.instrumentation.langchain.models import chat_request, result_usage
from otel_budget.instrumentation.langchain.runs import RUNS, Run, agent_of, enter, leave, under
from otel_budget.logs import RateLimitedLog
from otel_budget.runtime import RuntimeSource
from otel_budget.tools import abegin_tool, begin_tool

_LOG = RateLimitedLog(logging.getLogger("otel_budget"))


def _tool_output(output: Any) -> Any:
    """What the tool returned, as the model sees it: a ``ToolMessage``'s content."""
    content = getattr(output, "content", None)
    return output if content is None else content


class _Events:
    """The handler's logic, once: every event a flow that the sync handler runs with
    blocking calls and the async one with the ledger's coroutines."""

    def __init__(self, tracer: trace.Tracer, source: RuntimeSource) -> None:
        self.tracer = tracer
        self.source = source

    # -- chains: agents ----------------------------------------------------------------------
    def chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
        tags: list[str] | None = None, metadata: dict[str, Any] | None = None,
        name: str | None = None, **kwargs: Any,
    ) -> Flow[None]:  # fmt: skip
        run = RUNS.start(run_id, parent_run_id, "chain")
        if run is None:
            return None
        _check(run)
        if name is None and isinstance(serialized, dict):
            name = serialized.get("name")
        agent = agent_of(name, metadata, tags, run.root is run)
        if agent is not None:
            manager = agent_span(agent[0], attributes=agent[1], tracer=self.tracer)
            with under(run):  # (the span lives in a context of its own: see ``runs``)
                context = contextvars.copy_context()
            run.span = context.run(manager.__enter__)
            run.agent, run.agent_context, run.agent_name = manager, context, agent[0]
        return None
        yield  # a flow (no ledger step)

    def chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> Flow[None]:
        _end_agent(RUNS.pop(run_id), None)
        return None
        yield

    def chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Flow[None]:
        _end_agent(RUNS.pop(run_id), error)
        return None
        yield

    # -- models ------------------------------------------------------------------------------
    def chat_model_start(
        self, serialized: Any, messages: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None, invocation_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Flow[None]:  # fmt: skip
        yield from self._model_start(run_id, parent_run_id, messages, None, invocation_params,
                                     metadata)  # fmt: skip

    def llm_start(
        self, serialized: Any, prompts: list[str], *, run_id: UUID,
        parent_run_id: UUID | None = None, metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None, **kwargs: Any,
    ) -> Flow[None]:  # fmt: skip
        yield from self._model_start(run_id, parent_run_id, None, prompts, invocation_params,
                                     metadata)  # fmt: skip

    def _model_start(
        self, run_id: UUID, parent_run_id: UUID | None, messages: Any, prompts: Any,
        params: dict[str, Any] | None, metadata: dict[str, Any] | None,
    ) -> Flow[None]:  # fmt: skip
        run = RUNS.start(run_id, parent_run_id, "llm")
        if run is None:
            return None
        _check(run)
        request = chat_request(messages, prompts, params, metadata)
        try:
            with under(run):
                call = yield step(
                    start_call, astart_call, self.tracer, request, {}, runtime=self.source.get()
                )
        except BudgetExceededError as error:
            _refused(run, error)
            raise
        except BaseException:
            RUNS.pop(run_id)
            raise
        _started(run, call, call.span, call.budgeted)
        return None

    def llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> Flow[None]:
        run = RUNS.pop(run_id)
        if run is None or run.call is None:
            return None
        leave(run.tokens)
        call = run.call  # (taken over by a call inside it: ``succeed`` only ends its span)
        usage, model, text = result_usage(response)
        yield step(call.succeed, call.asucceed, usage, None, response_model=model,
                   output_text=text)  # fmt: skip
        return None

    def llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Flow[None]:
        run = RUNS.pop(run_id)
        if run is None or run.call is None:
            return None
        leave(run.tokens)
        call = run.call
        yield step(call.fail, call.afail, error)
        return None

    # -- tools -------------------------------------------------------------------------------
    def tool_start(
        self, serialized: Any, input_str: str, *, run_id: UUID,
        parent_run_id: UUID | None = None, inputs: dict[str, Any] | None = None,
        tool_call_id: str | None = None, name: str | None = None, **kwargs: Any,
    ) -> Flow[None]:  # fmt: skip
        run = RUNS.start(run_id, parent_run_id, "tool")
        if run is None:
            return None
        _check(run)
        info = serialized if isinstance(serialized, dict) else {}
        tool = name or info.get("name") or "tool"
        description = info.get("description")
        try:
            with under(run):
                call = yield step(
                    begin_tool, abegin_tool, str(tool),
                    arguments=inputs if inputs is not None else input_str,
                    call_id=tool_call_id,
                    description=description if isinstance(description, str) else None,
                    runtime=self.source.get(), tracer=self.tracer,
                )  # fmt: skip
        except BudgetExceededError as error:
            _refused(run, error)
            raise
        except BaseException:
            RUNS.pop(run_id)
            raise
        _started(run, call, call.span, call.call)
        return None

    def tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> Flow[None]:
        run = RUNS.pop(run_id)
        if run is None or run.call is None:
            return None
        leave(run.tokens)
        call = run.call
        yield step(call.finish, call.afinish, _tool_output(output))
        return None

    def tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> Flow[None]:
        run = RUNS.pop(run_id)
        if run is None or run.call is None:
            return None
        leave(run.tokens)
        call = run.call
        yield step(call.fail, call.afail, error)
        return None


def _check(run: Run) -> None:
    """A start in a run tree refused already: refused again (and not tracked)."""
    try:
        RUNS.check(run)
    except BudgetExceededError:
        RUNS.pop(run.run_id)
        raise


def _started(run: Run, call: Any, span: Any, metered: Any) -> None:
    """A model or tool run is metered: its span current while it runs. A model call whose
    span cannot be taken over (``metered.span_lease`` 0: not recording) is published as the
    call being sent, so our provider wrapper underneath does not charge it again."""
    run.call, run.span = call, span
    sending = call if run.kind == "llm" and not metered.span_lease else None
    run.tokens = enter(span, run.scope()[1], sending)


def _refused(run: Run, error: BudgetExceededError) -> None:
    RUNS.refused(run, error)
    RUNS.pop(run.run_id)


def _end_agent(run: Run | None, error: BaseException | None) -> None:
    if run is None or run.agent is None:
        return
    manager, context, run.agent = run.agent, run.agent_context, None
    if context is None:
        return
    if error is None:
        context.run(manager.__exit__, None, None, None)
    else:
        context.run(manager.__exit__, type(error), error, error.__traceback__)


_EVENTS = (
    ("on_chain_start", "chain_start"), ("on_chain_end", "chain_end"),
    ("on_chain_error", "chain_error"), ("on_chat_model_start", "chat_model_start"),
    ("on_llm_start", "llm_start"), ("on_llm_end", "llm_end"), ("on_llm_error", "llm_error"),
    ("on_tool_start", "tool_start"), ("on_tool_end", "tool_end"), ("on_tool_error", "tool_error"),
)  # fmt: skip
_METERED_STARTS = frozenset({"chat_model_start", "llm_start", "tool_start"})


def _failed(events: _Events, event: str, exc: Exception, run_id: Any) -> None:
    """A failure of ours in an event: logged rate-limited, and the run goes on, except
    where the failure policy says otherwise: under ``fail_closed`` a model or tool that we
    could not meter does not start (its refusal is raised, and ends its run tree)."""
    site = f"langchain {event}"
    runtime = events.source.get() if event in _METERED_STARTS else None
    if runtime is None:
        _LOG(site, exc)
        return
    refusal = runtime.engine.internal_error(site, exc)
    if refusal is not None:
        run = RUNS.get(run_id) if isinstance(run_id, UUID) else None
        if run is not None:
            _refused(run, refusal)
        raise refusal from exc


def _sync_method(event: str) -> Callable[..., None]:
    def method(self: BudgetCallbackHandler, *args: Any, **kwargs: Any) -> None:
        try:
            run_flow(getattr(self._events, event)(*args, **kwargs))
        except BudgetExceededError:
            raise
        except Exception as exc:  # ours: see _failed
            _failed(self._events, event, exc, kwargs.get("run_id"))

    method.__name__ = f"on_{event}"
    return method


def _async_method(event: str) -> Callable[..., Any]:
    async def method(self: AsyncBudgetCallbackHandler, *args: Any, **kwargs: Any) -> None:
        try:
            await arun_flow(getattr(self._events, event)(*args, **kwargs))
        except BudgetExceededError:
            raise
        except Exception as exc:
            _failed(self._events, event, exc, kwargs.get("run_id"))

    method.__name__ = f"on_{event}"
    return method


def _tracer(tracer_provider: Any = None) -> trace.Tracer:
    from otel_budget import __version__

    return trace.get_tracer(
        "otel_budget.instrumentation.langchain", __version__, tracer_provider,
        schema_url="https://opentelemetry.io/schemas/1.37.0",
    )  # fmt: skip


class BudgetCallbackHandler(BaseCallbackHandler):
    """Meters a LangChain run: agents, model and tool calls (see the module docstring).
    ``runtime``: the budget runtime to enforce (default: the process's current one)."""

    raise_error = True  # a refusal must stop the run, not be logged by LangChain
    run_inline = True  # in the run's own context (and thread), in order

    def __init__(self, *, runtime: Any = None, tracer_provider: Any = None) -> None:
        super().__init__()
        self._events = _Events(_tracer(tracer_provider), RuntimeSource(runtime))


class AsyncBudgetCallbackHandler(AsyncCallbackHandler):
    """``BudgetCallbackHandler`` for async callback managers: the same logic, awaiting the
    ledger. Use it only where LangChain calls it from an event loop (``ainvoke``,
    ``astream``): a sync callback manager runs an async handler's events in a loop of its
    own and drops what they raise, refusals included. ``LangChainInstrumentor`` puts the
    right one on every manager."""

    raise_error = True
    run_inline = True  # awaited in the run's own task: the spans it makes current stay so

    def __init__(self, *, runtime: Any = None, tracer_provider: Any = None) -> None:
        super().__init__()
        self._events = _Events(_tracer(tracer_provider), RuntimeSource(runtime))


for _method, _event in _EVENTS:
    setattr(BudgetCallbackHandler, _method, _sync_method(_event))
    setattr(AsyncBudgetCallbackHandler, _method, _async_method(_event))


__all__ = ["AsyncBudgetCallbackHandler", "BudgetCallbackHandler"]
