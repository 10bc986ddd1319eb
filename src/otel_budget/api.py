"""``budget()`` for a run, ``track_tool()`` for the cost of a tool call.

    from otel_budget import budget, track_tool, BudgetExceededError

    @track_tool("web_search", cost_usd=0.01)               # fixed price per call
    def web_search(query: str) -> list[str]: ...

    try:
        with budget(max_usd=0.25) as run:                   # also: @budget(max_usd=...)
            agent.run("plan my trip")                       # LLM calls are checked first
    except BudgetExceededError as exc:
        print("stopped:", exc)
    print(run.report().format())

``budget()`` opens a budget for the current trace: calls inside the block (and in asyncio
tasks, threads and ``ThreadPoolExecutor`` workers it starts) reserve against it. With no current span it starts a root span, so the whole
run is one trace whose root carries the cost breakdown. Blocks nest: an inner block can
only spend within what its outer block has left. Inside a block, the block's limit replaces
the processor's default per-trace ``max_usd``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from contextvars import Token
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_budget import attributes as attrs
from otel_budget import threads
from otel_budget.context import BUDGET_FRAMES, BudgetFrame
from otel_budget.errors import BudgetExceededError
from otel_budget.money import parse_usd, usd_to_nanos
from otel_budget.processor import BudgetSpanProcessor, ensure_processor
from otel_budget.report import CostReport, TraceStats
from otel_budget.tools import ToolCall, ToolPrice, abegin_tool, begin_tool

F = TypeVar("F", bound=Callable[..., Any])
_TRACER_NAME = "otel_budget"
logger = logging.getLogger("otel_budget")
_unobserved_warned = False
_NO_ARGUMENTS: Any = object()  # track_tool used as a context manager: arguments unknown


def _warn_if_unobserved() -> None:
    """Warn once when a ``budget()`` block opens while none of our instrumentors meters any
    library: its report would say $0 while the provider bills."""
    global _unobserved_warned
    if _unobserved_warned:
        return
    from otel_budget.instrumentation import instrumented_libraries

    if instrumented_libraries():
        return
    _unobserved_warned = True
    logger.warning(
        "otel-budget: budget() is used but no LLM library is instrumented "
        "(BudgetInstrumentor().instrument(), or opentelemetry-instrument): its calls are not "
        "observed, so they are neither limited nor counted (only other instrumentations' "
        "GenAI spans that reach a BudgetSpanProcessor are). Logged once."
    )


def new_block_key() -> str:
    """A ledger key for one ``budget()`` block: 128 random bits, so that blocks in other
    processes and hosts sharing a ledger (Redis) can never share a key."""
    return f"b:{uuid.uuid4().hex}"


def _tracer() -> trace.Tracer:
    from otel_budget import __version__

    return trace.get_tracer(_TRACER_NAME, __version__)


class budget:  # noqa: N801 - a context manager/decorator reads best in lower case
    """A budget for one run: ``with budget(max_usd=1.0) as run: ...``, ``async with``, or
    ``@budget(max_usd=1.0)`` on a sync or async function (a fresh budget per call)."""

    def __init__(
        self,
        max_usd: Any,
        *,
        name: str = "budget",
        processor: BudgetSpanProcessor | None = None,
    ) -> None:
        self.limit_nanos = parse_usd(max_usd, what="max_usd")
        self.max_usd = max_usd
        self.name = name
        self._processor = processor
        self._stats: TraceStats | None = None
        self._frame: BudgetFrame | None = None
        self._frames_token: Token[tuple[BudgetFrame, ...]] | None = None
        self._span: Any = None
        self._ctx_token: object | None = None
        self._last: TraceStats | None = None

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> budget:
        if self._frame is not None:
            raise RuntimeError("this budget() block is already open; use a new budget() per run")
        processor = self._processor or ensure_processor()
        self._processor = processor
        _warn_if_unobserved()
        if not threads.is_installed("budget"):
            # Threads and executor workers started inside a block carry it (and the trace).
            threads.install("budget")
        current = trace.get_current_span().get_span_context()
        if not current.is_valid:
            # No trace yet: this run becomes one, and its root gets the breakdown.
            self._span = _tracer().start_span(self.name, kind=SpanKind.INTERNAL)
            self._ctx_token = otel_context.attach(trace.set_span_in_context(self._span))
            current = self._span.get_span_context()
        trace_id = current.trace_id if current.is_valid else 0
        stats = TraceStats(f"{trace_id:032x}" if trace_id else None, self.limit_nanos)
        if self._span is not None and trace_id:
            processor.engine.adopt_trace(trace_id, stats)
            if self._span.is_recording():
                processor.runtime.track_root(self._span, trace_id)
        self._stats = stats
        block_key = new_block_key()
        stats.label = f"{block_key} ({self.name})"
        self._frame = BudgetFrame(block_key, self.limit_nanos, stats, processor.engine)
        self._frames_token = BUDGET_FRAMES.set((*BUDGET_FRAMES.get(), self._frame))
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        frame, stats, processor = self._frame, self._stats, self._processor
        if self._frames_token is not None:
            BUDGET_FRAMES.reset(self._frames_token)
        self._frames_token = None
        if stats is not None:
            stats.ended = time.time()
        if self._span is not None:
            try:
                if exc is not None and self._span.is_recording():
                    self._span.record_exception(exc)
                    self._span.set_status(Status(StatusCode.ERROR, str(exc)))
                    self._span.set_attribute(attrs.ERROR_TYPE, type(exc).__qualname__)
            finally:
                self._span.end()  # the runtime's root hook writes the breakdown
                if self._ctx_token is not None:
                    otel_context.detach(self._ctx_token)  # type: ignore[arg-type]
        if frame is not None:
            frame.open = False
            if processor is not None:
                # Open, the block's scope had no TTL: it goes now (on the ledger of the
                # engine that enforced it).
                processor.engine.storage.evict(frame.key)
        self._last = stats
        self._frame = None
        self._span = None
        self._ctx_token = None

    async def __aenter__(self) -> budget:
        return self.__enter__()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)

    # -- decorator ----------------------------------------------------------------------------
    def __call__(self, fn: F) -> F:
        make = functools.partial(budget, self.max_usd, name=self.name, processor=self._processor)
        outer = self
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                block = make()
                try:
                    async with block:
                        return await fn(*args, **kwargs)
                finally:
                    outer._last = block._last

            async_wrapper.budget = outer  # type: ignore[attr-defined]
            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            block = make()
            try:
                with block:
                    return fn(*args, **kwargs)
            finally:
                outer._last = block._last

        wrapper.budget = outer  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    # -- results ------------------------------------------------------------------------------
    def report(self) -> CostReport:
        """The run's cost report (live while the block is open; for a decorator, the last
        call's)."""
        stats = self._stats if self._frame is not None else (self._last or self._stats)
        if stats is None:
            return TraceStats(None, self.limit_nanos).report()
        return stats.report()


class track_tool:  # noqa: N801
    """Record (and budget) a tool call as an ``execute_tool`` span.

    ``cost_usd`` is a fixed price per call, or a function of the tool's result returning USD.
    When it is a function, ``max_cost_usd`` (if given) is reserved before the call; otherwise
    the price comes from the processor's price book (``PriceBook(tools=...)``). A tool that
    raises is charged nothing; a call refused by the budget, or by loop detection (the same
    arguments too often: as a decorator, the function's arguments are compared), raises
    ``BudgetExceededError`` before the tool runs.

    As a context manager it yields the ``ToolCall`` (``otel_budget.tools``): set its
    ``result`` for a computed cost, or pass ``arguments=`` to ``track_tool`` for loop
    detection (without them the block's calls are not compared).
    """

    def __init__(
        self,
        name: str,
        cost_usd: Any = None,
        *,
        max_cost_usd: Any = None,
        tool_type: str = "function",
        arguments: Any = _NO_ARGUMENTS,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("track_tool needs a tool name")
        self.name = name
        self.price = ToolPrice(name, cost_usd, max_cost_usd)
        self.tool_type = tool_type
        self.arguments = arguments
        self._handle: ToolCall | None = None

    def start(self, arguments: Any = _NO_ARGUMENTS) -> ToolCall:
        if arguments is _NO_ARGUMENTS:
            arguments = self.arguments
        known = arguments is not _NO_ARGUMENTS
        return begin_tool(
            self.name, arguments=arguments if known else None, tool_type=self.tool_type,
            price=self.price, check_loop=known, tracer=_tracer(),
        )  # fmt: skip

    def stop(self, handle: ToolCall, exc: BaseException | None) -> None:
        if exc is not None:
            handle.fail(exc)
        else:
            handle.finish()

    async def astop(self, handle: ToolCall, exc: BaseException | None) -> None:
        if exc is not None:
            await handle.afail(exc)
        else:
            await handle.afinish()

    def __enter__(self) -> ToolCall:
        self._handle = self.start()
        self._token = otel_context.attach(trace.set_span_in_context(self._handle.span))
        return self._handle

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        handle = self._handle
        self._handle = None
        otel_context.detach(self._token)
        if handle is not None:
            self.stop(handle, exc)

    def __call__(self, fn: F) -> F:
        def call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return {"args": list(args), "kwargs": kwargs}

        def run_sync(*args: Any, **kwargs: Any) -> Any:
            try:
                handle = self.start(call_arguments(args, kwargs))
            except BudgetExceededError as error:
                if error.substitute is not None:  # on_exceeded answered Substitute(value)
                    return error.substitute.value
                raise
            try:
                with trace.use_span(
                    handle.span, end_on_exit=False, record_exception=False,
                    set_status_on_exception=False,
                ):  # fmt: skip
                    handle.result = fn(*args, **kwargs)
            except BaseException as exc:
                self.stop(handle, exc)
                raise
            self.stop(handle, None)
            return handle.result

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    handle = await abegin_tool(
                        self.name, arguments=call_arguments(args, kwargs),
                        tool_type=self.tool_type, price=self.price, tracer=_tracer(),
                    )  # fmt: skip
                except BudgetExceededError as error:
                    if error.substitute is not None:
                        return error.substitute.value
                    raise
                try:
                    with trace.use_span(
                        handle.span, end_on_exit=False, record_exception=False,
                        set_status_on_exception=False,
                    ):  # fmt: skip
                        handle.result = await fn(*args, **kwargs)
                except BaseException as exc:
                    await self.astop(handle, exc)
                    raise
                await self.astop(handle, None)
                return handle.result

            return async_wrapper  # type: ignore[return-value]
        return functools.wraps(fn)(run_sync)  # type: ignore[return-value]


__all__ = ["BudgetExceededError", "budget", "ensure_processor", "track_tool", "usd_to_nanos"]
