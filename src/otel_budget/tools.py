"""Tool calls: ``execute_tool`` spans, loop-checked, priced and budgeted on the one metered path.

    from opentelemetry import trace
    from otel_budget.tools import begin_tool

    call = begin_tool("web_search", arguments={"q": "weather"}, call_id="call_1")
    # ^ raises BudgetExceededError (reason "limit", "loop_detected", ...) before the tool runs
    with trace.use_span(call.span, end_on_exit=False):
        try:
            result = search("weather")
        except Exception as exc:
            call.fail(exc)                      # charged nothing, span in ERROR
            raise
    call.finish(result)                         # charged its price, span ended

``abegin_tool`` / ``afinish`` / ``afail`` are the same without blocking an event loop on a
shared ledger. Framework integrations (MCP, the agent frameworks) and ``track_tool`` all
start tool calls here.

The price of a call: ``cost_usd`` (fixed, or a function of the result), else the price
book's ``tools=`` entry; reserved before the tool runs (``max_cost_usd`` when the cost is
only known from the result). Loop detection sees the tool's name and a digest of its
arguments; the arguments themselves go on the span only when content capture is on
(``gen_ai.tool.call.arguments`` / ``gen_ai.tool.call.result``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from otel_budget import attributes as attrs
from otel_budget.engine import KIND_TOOL
from otel_budget.loops import KIND_TOOL as LOOP_KIND_TOOL
from otel_budget.metered import MeteredCall, begin_steps
from otel_budget.money import parse_usd
from otel_budget.processor import ensure_processor
from otel_budget.runtime import BudgetRuntime
from otel_budget.steps import Steps, arun, run

_TRACER_NAME = "otel_budget"
_UNSET: Any = object()
MAX_CONTENT_CHARS = 16_384  # a tool result can be a whole web page: the span keeps its head


def _tracer() -> trace.Tracer:
    from otel_budget import __version__

    return trace.get_tracer(_TRACER_NAME, __version__)


def _content_on() -> bool:
    from otel_budget.instrumentation._content import content_mode

    return content_mode().span


def _json(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= MAX_CONTENT_CHARS else text[:MAX_CONTENT_CHARS] + "..."


class ToolPrice:
    """How one tool is priced: a fixed cost, a function of its result, or the price book."""

    __slots__ = ("name", "fixed", "compute", "maximum")

    def __init__(self, name: str, cost_usd: Any = None, max_cost_usd: Any = None) -> None:
        self.name = name
        self.fixed: int | None = None
        self.compute: Callable[[Any], Any] | None = None
        if callable(cost_usd):
            self.compute = cost_usd
        elif cost_usd is not None:
            self.fixed = parse_usd(cost_usd, what=f"cost_usd of tool {name!r}")
        self.maximum = None if max_cost_usd is None else parse_usd(max_cost_usd, what="max_cost_usd")

    def projected(self, runtime: BudgetRuntime | None) -> int:
        """What to reserve before the tool runs."""
        if self.fixed is not None:
            return self.fixed
        if self.maximum is not None:
            return self.maximum
        if self.compute is None and runtime is not None:
            try:
                # A computed book price asked before the result exists (None): the most the
                # call may cost, by the price book's convention.
                book_price = runtime.prices.tool_cost_nanos(self.name, None)
            except ValueError as exc:  # a price function that cannot answer for None
                runtime.engine.log_once(f"tool price {self.name} before the call", exc)
                book_price = None
            if book_price is not None:
                return int(book_price)
        # Unknown cost up front: a paid tool still needs *some* budget left.
        return 1

    def actual(self, runtime: BudgetRuntime | None, result: Any, cost_usd: Any) -> int:
        """What the call cost, once its result is known."""
        name = self.name
        if cost_usd is not None:
            return parse_usd(cost_usd, what=f"cost of tool {name!r}", allow_huge=True)
        if self.fixed is not None:
            return self.fixed
        if self.compute is not None:
            return parse_usd(self.compute(result), what=f"cost_usd({name!r}) result", allow_huge=True)
        if runtime is None:
            return 0
        book_price = runtime.prices.tool_cost_nanos(name, result)
        return int(book_price) if book_price is not None else 0


class ToolCall:
    """A started tool call: settle it once with ``finish`` (or ``afinish``) or ``fail``."""

    __slots__ = ("call", "price", "result")

    def __init__(self, call: MeteredCall, price: ToolPrice) -> None:
        self.call = call
        self.price = price
        self.result: Any = None

    @property
    def span(self) -> Any:
        return self.call.span

    @property
    def projected_nanos(self) -> int:
        return self.call.projected_nanos

    def _settlement(self, result: Any, cost_usd: Any) -> tuple[int, dict[str, Any]]:
        if result is not _UNSET:
            self.result = result
        call = self.call
        runtime = call.runtime
        try:
            actual = self.price.actual(runtime, self.result, cost_usd)
        except Exception as exc:  # a broken cost function: charge what was reserved
            if runtime is not None:
                runtime.engine.log_once(f"tool cost {self.price.name}", exc)
            actual = call.projected_nanos
        extra: dict[str, Any] = {}
        if self.result is not None and _content_on():
            extra[attrs.GEN_AI_TOOL_CALL_RESULT] = _json(self.result)
        return actual, extra

    def finish(self, result: Any = _UNSET, *, cost_usd: Any = None) -> None:
        """The tool returned ``result``: charge its price, end the span. (A call that a tool
        call inside it took over is not priced: settling it only ends its span.)"""
        if self.call.done:
            self.call.settle(0)
            return
        actual, extra = self._settlement(result, cost_usd)
        self.call.settle(actual, attributes=extra)

    async def afinish(self, result: Any = _UNSET, *, cost_usd: Any = None) -> None:
        if self.call.done:
            await self.call.asettle(0)
            return
        actual, extra = self._settlement(result, cost_usd)
        await self.call.asettle(actual, attributes=extra)

    def fail(self, error: BaseException, *, cost_usd: Any = None) -> None:
        """The tool raised: release the reservation (or charge ``cost_usd`` if it was billed
        anyway), record the error, end the span."""
        billed = None if cost_usd is None else self.price.actual(None, None, cost_usd)
        self.call.fail(error, billed_nanos=billed)

    async def afail(self, error: BaseException, *, cost_usd: Any = None) -> None:
        billed = None if cost_usd is None else self.price.actual(None, None, cost_usd)
        await self.call.afail(error, billed_nanos=billed)


def _begin_steps(
    runtime: BudgetRuntime | None,
    tracer: trace.Tracer,
    price: ToolPrice,
    arguments: Any,
    call_id: str | None,
    tool_type: str,
    description: str | None,
    attributes: Mapping[str, Any] | None,
    check_loop: bool = True,
    free: bool = False,
) -> Steps[ToolCall]:
    name = price.name
    span_attributes: dict[str, Any] = {
        attrs.GEN_AI_OPERATION_NAME: attrs.OP_EXECUTE_TOOL,
        attrs.GEN_AI_TOOL_NAME: name,
        attrs.GEN_AI_TOOL_TYPE: tool_type,
    }
    if call_id:
        span_attributes[attrs.GEN_AI_TOOL_CALL_ID] = str(call_id)
    if description:
        span_attributes[attrs.GEN_AI_TOOL_DESCRIPTION] = str(description)
    if attributes:
        span_attributes.update(attributes)
    loop = None
    if runtime is not None and check_loop and not free:
        detector = runtime.engine.loops
        if detector is not None:
            digest = detector.key(LOOP_KIND_TOOL, name, arguments)
            loop = (LOOP_KIND_TOOL, digest)
            span_attributes[attrs.TOOL_CALL_FINGERPRINT] = digest.hex()
    if arguments is not None and _content_on():
        span_attributes[attrs.GEN_AI_TOOL_CALL_ARGUMENTS] = _json(arguments)
    call = yield from begin_steps(
        runtime, tracer, f"execute_tool {name}", span_attributes,
        minimum=price.projected(runtime), name=name, provider="tool",
        operation=attrs.OP_EXECUTE_TOOL, span_kind=SpanKind.INTERNAL, charge_kind=KIND_TOOL,
        loop=loop, free=free,
    )  # fmt: skip
    return ToolCall(call, price)


def _runtime(runtime: BudgetRuntime | None) -> BudgetRuntime:
    return runtime if runtime is not None else ensure_processor().runtime


def begin_tool(
    name: str,
    *,
    arguments: Any = None,
    call_id: str | None = None,
    tool_type: str = "function",
    description: str | None = None,
    cost_usd: Any = None,
    max_cost_usd: Any = None,
    attributes: Mapping[str, Any] | None = None,
    price: ToolPrice | None = None,
    check_loop: bool = True,
    free: bool = False,
    runtime: BudgetRuntime | None = None,
    tracer: trace.Tracer | None = None,
) -> ToolCall:
    """Start a tool call: loop check and reservation first, then the ``execute_tool`` span
    (not made current). Raises ``BudgetExceededError`` before the tool runs.
    ``check_loop=False``: the arguments are not known (no loop detection for this call).
    ``free=True``: a call charged elsewhere (an MCP tool call its client metered): traced,
    no loop check, no reservation and no ledger operation; it settles at $0."""
    if price is None:
        price = ToolPrice(_tool_name(name), cost_usd, max_cost_usd)
    runtime = _runtime(runtime)
    steps = _begin_steps(
        runtime, tracer or _tracer(), price, arguments, call_id, tool_type, description,
        attributes, check_loop, free,
    )  # fmt: skip
    return run(steps, runtime.storage)


async def abegin_tool(
    name: str,
    *,
    arguments: Any = None,
    call_id: str | None = None,
    tool_type: str = "function",
    description: str | None = None,
    cost_usd: Any = None,
    max_cost_usd: Any = None,
    attributes: Mapping[str, Any] | None = None,
    price: ToolPrice | None = None,
    check_loop: bool = True,
    free: bool = False,
    runtime: BudgetRuntime | None = None,
    tracer: trace.Tracer | None = None,
) -> ToolCall:
    """``begin_tool`` without blocking the event loop on a shared ledger."""
    if price is None:
        price = ToolPrice(_tool_name(name), cost_usd, max_cost_usd)
    runtime = _runtime(runtime)
    steps = _begin_steps(
        runtime, tracer or _tracer(), price, arguments, call_id, tool_type, description,
        attributes, check_loop, free,
    )  # fmt: skip
    return await arun(steps, runtime.storage)


def _tool_name(name: Any) -> str:
    """A tool's name as a span and a ledger line can carry it (an integration may hand us
    anything: never an error for the app)."""
    if isinstance(name, str) and name:
        return name
    return str(name) if name not in (None, "") else "unknown"


__all__ = ["ToolCall", "ToolPrice", "abegin_tool", "begin_tool"]
