"""otel-budget: an OpenTelemetry-native financial circuit breaker for LLM agents.

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from otel_budget import BudgetSpanProcessor, BudgetExceededError, budget

    provider = TracerProvider()
    provider.add_span_processor(BudgetSpanProcessor(max_usd=0.50))   # per trace
    trace.set_tracer_provider(provider)

    with budget(max_usd=0.10) as run:        # a tighter budget for one run
        ...                                  # GenAI calls reserve their projected cost first
    print(run.report().format())

Calls that would overshoot are refused with ``BudgetExceededError`` before they are sent;
actual costs are committed when their spans end, and the trace's local root span carries
the breakdown (``otel_budget.trace.*``) to whatever backend OTLP exports to.
"""

from otel_budget.agents import agent_span
from otel_budget.api import budget, ensure_processor, track_tool
from otel_budget.context import scope
from otel_budget.errors import BudgetExceededError, Substitute
from otel_budget.loops import LoopPolicy
from otel_budget.pricing import ModelPrice, PriceBook, TokenUsage, UnknownModelError
from otel_budget.processor import BudgetSpanProcessor, get_active_processor
from otel_budget.report import CostReport
from otel_budget.settings import FAIL_CLOSED, FAIL_OPEN, ScopeRule
from otel_budget.storage import LedgerStorage, MemoryStorage
from otel_budget.tools import ToolCall, abegin_tool, begin_tool

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Imported lazily: it pulls in opentelemetry-instrumentation, which the processor alone
    # does not need.
    if name == "BudgetInstrumentor":
        from otel_budget.instrumentation import BudgetInstrumentor

        return BudgetInstrumentor
    raise AttributeError(f"module 'otel_budget' has no attribute {name!r}")

__all__ = [
    "FAIL_CLOSED",
    "FAIL_OPEN",
    "BudgetExceededError",
    "BudgetInstrumentor",
    "BudgetSpanProcessor",
    "CostReport",
    "LedgerStorage",
    "LoopPolicy",
    "MemoryStorage",
    "ModelPrice",
    "PriceBook",
    "ScopeRule",
    "Substitute",
    "TokenUsage",
    "ToolCall",
    "UnknownModelError",
    "__version__",
    "abegin_tool",
    "agent_span",
    "begin_tool",
    "budget",
    "ensure_processor",
    "get_active_processor",
    "scope",
    "track_tool",
]
