"""``BudgetInstrumentor``: the budget processor plus every supported LLM library, in one call.

    from otel_budget import BudgetInstrumentor

    BudgetInstrumentor().instrument(max_usd=0.50)        # per trace; see BudgetSpanProcessor
    # ... unchanged agent code: openai / anthropic / litellm calls are budgeted ...
    BudgetInstrumentor().uninstrument()                  # restores everything

Zero-code: ``OTEL_BUDGET_MAX_USD=0.05 opentelemetry-instrument python agent.py``; this class
is registered as the ``otel_budget`` ``opentelemetry_instrumentor`` entry point and reads the
``OTEL_BUDGET_*`` variables (``otel_budget.environment_variables``) when called without
arguments.

The processor goes onto ``tracer_provider`` (or the global provider). With only the API's
proxy provider (no SDK configured, or configured later), enforcement still works, because it
lives in the wrappers; the processor is added to the SDK provider as soon as one is set
globally, so the root-span breakdown follows.

Configuration never switches the budget off: each ``OTEL_BUDGET_*`` variable is read on its
own (``otel_budget.config.read_env``), an invalid one is logged by name and falls back to its
safe default, and a limit or ledger that cannot be configured refuses every paid call
(reason ``configuration``) unless ``OTEL_BUDGET_FAILURE_POLICY=fail_open`` says otherwise.
The instrumentor always loads. ``instrument()`` called again with other settings (on any
instance: instrumentors are singletons) applies them: a new processor replaces the previous
one and every wrapper follows it at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_budget import threads
from otel_budget.config import SUPPORTED_LIBRARIES, libraries_from_env, read_env
from otel_budget.misconfigured import refuse_paid_calls
from otel_budget.processor import BudgetSpanProcessor
from otel_budget.runtime import BudgetRuntime
from otel_budget.settings import FAIL_CLOSED, FAIL_OPEN

logger = logging.getLogger("otel_budget")

_INSTRUMENTORS = {
    "openai": ("otel_budget.instrumentation.openai", "OpenAIBudgetInstrumentor"),
    "anthropic": ("otel_budget.instrumentation.anthropic", "AnthropicBudgetInstrumentor"),
    "litellm": ("otel_budget.instrumentation.litellm", "LiteLLMBudgetInstrumentor"),
    "mcp": ("otel_budget.instrumentation.mcp", "MCPInstrumentor"),
    # (installs its wrappers when CrewAI is imported: nothing is imported before)
    "crewai": ("otel_budget.instrumentation.crewai", "CrewAIInstrumentor"),
}
# Framework instrumentors, instrumented on their own (``OpenAIAgentsInstrumentor``,
# ``LangChainInstrumentor``): their model calls are metered, so a budget() block under them
# is observed.
_FRAMEWORKS = {
    "openai_agents": ("otel_budget.instrumentation.openai_agents", "OpenAIAgentsInstrumentor"),
    "langchain": ("otel_budget.instrumentation.langchain", "LangChainInstrumentor"),
}
_PROCESSOR_ARGS = (
    "max_usd", "scopes", "thresholds", "failure_policy", "default_max_output_tokens",
    "assumed_input_tokens", "on_warning", "on_exceeded", "prices", "storage", "trace_ttl_seconds",
    "max_tracked_traces", "cap_output_tokens", "min_output_tokens", "stream_include_usage",
    "semconv_cost", "loop_detection", "on_loop_detected", "cache",
)  # fmt: skip
_ENV_PREFIX = "OTEL_BUDGET_"


def _attach(processor: BudgetSpanProcessor, provider: Any) -> bool:
    add = getattr(provider, "add_span_processor", None)
    if add is None:
        return False
    add(processor)
    return True


class RuntimeHandle(BudgetRuntime):
    """The runtime the library wrappers hold (``instrument(runtime=handle)``): it shares the
    state of the processor's runtime it points to, so pointing it at another runtime
    re-points every wrapper at once, with no lookup on the call path."""

    def __init__(self, runtime: BudgetRuntime) -> None:  # noqa: D107 - no super(): a view
        self.point_to(runtime)

    def point_to(self, runtime: BudgetRuntime) -> None:
        self.__dict__ = runtime.__dict__


def instrumented_libraries() -> list[str]:
    """The libraries whose calls otel-budget's own instrumentors currently meter."""
    out = []
    for name, (module_name, class_name) in {**_INSTRUMENTORS, **_FRAMEWORKS}.items():
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        instance = getattr(cls, "_instance", None) if cls is not None else None
        if instance is not None and instance.is_instrumented_by_opentelemetry:
            out.append(name)
    return out


def _request_of(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What an ``instrument()`` call asks for, to tell whether a second call changes it."""
    explicit = tuple((k, kwargs[k]) for k in _PROCESSOR_ARGS if k in kwargs)
    environ = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)))
    libraries = kwargs.get("libraries")
    return (
        explicit, kwargs.get("processor"), kwargs.get("tracer_provider"),
        None if libraries is None else tuple(libraries), environ, kwargs.get("logger_provider"),
        kwargs.get("meter_provider"),
    )  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a value whose == raises (or is ambiguous): not the same
        return False


class BudgetInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Installs the budget processor and instruments openai, anthropic and litellm.

    Keyword arguments of ``instrument()``: those of ``BudgetSpanProcessor`` (``max_usd``,
    ``scopes``, ``failure_policy``, ...), ``tracer_provider``, ``meter_provider`` (of the
    ``gen_ai.client.*`` and ``otel_budget.*`` metrics; default: the global one),
    ``logger_provider`` (for the GenAI events of the content capture modes; default: the
    global one), ``processor`` (use an existing one: it keeps its own meter provider), and
    ``libraries`` (a subset of ``("openai", "anthropic", "litellm", "mcp", "crewai")``). Without
    processor arguments the ``OTEL_BUDGET_*`` environment variables are read. Called again
    with other arguments, it applies them (a new processor replaces the previous one).
    """

    processor: BudgetSpanProcessor | None = None
    _handle: RuntimeHandle | None = None
    _request: tuple[Any, ...] | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # each library is optional and checked on its own

    def instrument(self, **kwargs: Any) -> Any:
        if not self.is_instrumented_by_opentelemetry:
            return super().instrument(**kwargs)
        request = _request_of(kwargs)
        if _same(request, self._request):
            logger.debug("otel-budget: already instrumented with these settings")
            return None
        logger.warning(
            "otel-budget: instrument() called again with other settings: applying them "
            "(a new budget processor replaces the previous one)"
        )
        self._apply(kwargs, request)
        return None

    def _instrument(self, **kwargs: Any) -> None:
        self._instrumented: dict[str, BaseInstrumentor] = {}
        self._apply(kwargs, _request_of(kwargs))

    def _apply(self, kwargs: dict[str, Any], request: tuple[Any, ...]) -> None:
        provider = kwargs.get("tracer_provider")
        processor = kwargs.get("processor")
        libraries = kwargs.get("libraries")
        explicit = {k: kwargs[k] for k in _PROCESSOR_ARGS if k in kwargs}
        meter_provider = kwargs.get("meter_provider")
        if processor is None:
            if explicit:
                # bad values raise: caller's code
                processor = BudgetSpanProcessor(**explicit, meter_provider=meter_provider)
            else:
                processor = self._processor_from_env(meter_provider)
        elif meter_provider is not None:
            logger.warning(
                "otel-budget: instrument(processor=..., meter_provider=...): the processor "
                "records its metrics with the meter provider it was built with; pass "
                "meter_provider to BudgetSpanProcessor instead"
            )
        previous = self.processor
        previous_provider = self._request[2] if self._request is not None else None
        logger_provider = kwargs.get("logger_provider")
        previous_loggers = self._request[5] if self._request is not None else None
        self.processor = processor
        self._request = request
        if self._handle is None:
            self._handle = RuntimeHandle(processor.runtime)
        else:
            self._handle.point_to(processor.runtime)  # every wrapper follows, at once
        # Threads and executor tasks started inside a budget() block carry it.
        threads.install("instrumentor")
        target = provider if provider is not None else trace.get_tracer_provider()
        if not _attach(processor, target):
            logger.info(
                "otel-budget: no SDK TracerProvider yet; budgets are enforced, and the "
                "root-span breakdown starts once one is set globally"
            )
            self._watch_global_provider(processor)
        if libraries is None:
            try:
                libraries = libraries_from_env()
            except ValueError as exc:
                logger.error("otel-budget: %s; instrumenting every supported library", exc)
                libraries = SUPPORTED_LIBRARIES
        wanted = [name for name in libraries if name in _INSTRUMENTORS]
        for name, instrumentor in list(self._instrumented.items()):
            if (
                name not in wanted or provider is not previous_provider
                or logger_provider is not previous_loggers
            ):  # fmt: skip
                instrumentor.uninstrument()  # (a new provider: its tracers are re-created)
                del self._instrumented[name]
        for name in wanted:
            if name not in self._instrumented:
                self._instrument_library(name, provider, logger_provider)
        if previous is not None and previous is not processor:
            previous.shutdown()  # inert from now on, even if still on a provider

    def _processor_from_env(self, meter_provider: Any = None) -> BudgetSpanProcessor:
        """The processor the ``OTEL_BUDGET_*`` variables configure. Never raises: zero-code
        runs cannot raise into the app, so each invalid variable is logged and falls back to
        its safe default, and a limit or ledger that cannot be configured makes every paid
        call refused (reason ``configuration``) unless the policy is explicitly fail_open."""
        try:
            config = read_env()
        except Exception as exc:  # pragma: no cover - read_env handles each variable
            return self._unconfigured(
                f"the OTEL_BUDGET_* configuration cannot be read: {exc}", meter_provider
            )
        for problem in config.problems:
            logger.error("otel-budget: %s", problem)
        try:
            processor = BudgetSpanProcessor(**config.kwargs, meter_provider=meter_provider)
        except Exception as exc:  # pragma: no cover - read_env validates each value
            return self._unconfigured(f"invalid OTEL_BUDGET_* configuration: {exc}", meter_provider)
        if config.refusal is not None:
            refuse_paid_calls(processor, str(config.refusal), config.refusal.variable)
            logger.error(
                "otel-budget: refusing every paid call until %s is fixed",
                config.refusal.variable,
            )
        return processor

    def _unconfigured(self, problem: str, meter_provider: Any = None) -> BudgetSpanProcessor:
        policy = os.environ.get("OTEL_BUDGET_FAILURE_POLICY", "").strip()
        if policy == FAIL_OPEN:
            logger.error("otel-budget: %s; failure_policy=fail_open: calls are NOT budgeted", problem)
            return BudgetSpanProcessor(failure_policy=FAIL_OPEN, meter_provider=meter_provider)
        logger.error("otel-budget: %s; every paid call is refused until it is fixed", problem)
        processor = BudgetSpanProcessor(failure_policy=FAIL_CLOSED, meter_provider=meter_provider)
        refuse_paid_calls(processor, problem, "OTEL_BUDGET_*")
        return processor

    def _watch_global_provider(self, processor: BudgetSpanProcessor) -> None:
        # The API's proxy provider hands out proxy tracers that switch to the real provider
        # once it is set; hook set_tracer_provider once to attach our processor then.
        original = trace.set_tracer_provider

        def set_tracer_provider(new_provider: Any) -> None:
            original(new_provider)
            try:
                if self.processor is processor and trace.get_tracer_provider() is new_provider:
                    _attach(processor, new_provider)
            finally:
                trace.set_tracer_provider = original

        trace.set_tracer_provider = set_tracer_provider  # type: ignore[assignment]

    def _instrument_library(self, name: str, provider: Any, logger_provider: Any = None) -> None:
        if importlib.util.find_spec(name) is None:
            logger.debug("otel-budget: %s is not installed; skipped", name)
            return
        module_name, class_name = _INSTRUMENTORS[name]
        try:
            instrumentor = getattr(importlib.import_module(module_name), class_name)()
            # The wrappers get the runtime they enforce in their closure: the handle, which
            # a later instrument() with other settings re-points.
            kwargs: dict[str, Any] = {"runtime": self._handle}
            if provider is not None:
                kwargs["tracer_provider"] = provider
            if logger_provider is not None:  # the GenAI events' (else the global one)
                kwargs["logger_provider"] = logger_provider
            instrumentor.instrument(**kwargs)
            if instrumentor.is_instrumented_by_opentelemetry:
                self._instrumented[name] = instrumentor
        except Exception as exc:  # one library's problem must not stop the others
            logger.error("otel-budget: could not instrument %s: %s", name, exc, exc_info=exc)

    def _uninstrument(self, **kwargs: Any) -> None:
        threads.uninstall("instrumentor")
        for instrumentor in getattr(self, "_instrumented", {}).values():
            instrumentor.uninstrument()
        self._instrumented = {}
        self._request = None
        if self.processor is not None:
            self.processor.shutdown()  # inert from now on, even if still on the provider
            self.processor = None
