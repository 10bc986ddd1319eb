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
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Collection
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from otel_budget import threads
from otel_budget.config import (
    SUPPORTED_LIBRARIES,
    libraries_from_env,
    settings_from_env,
)
from otel_budget.processor import BudgetSpanProcessor
from otel_budget.settings import FAIL_CLOSED

logger = logging.getLogger("otel_budget")

_INSTRUMENTORS = {
    "openai": ("otel_budget.instrumentation.openai", "OpenAIBudgetInstrumentor"),
    "anthropic": ("otel_budget.instrumentation.anthropic", "AnthropicBudgetInstrumentor"),
    "litellm": ("otel_budget.instrumentation.litellm", "LiteLLMBudgetInstrumentor"),
}
_PROCESSOR_ARGS = (
    "max_usd", "scopes", "thresholds", "failure_policy", "default_max_output_tokens",
    "assumed_input_tokens", "on_warning", "on_exceeded", "prices", "storage", "trace_ttl_seconds",
    "max_tracked_traces", "cap_output_tokens", "min_output_tokens", "stream_include_usage",
)  # fmt: skip


def _attach(processor: BudgetSpanProcessor, provider: Any) -> bool:
    add = getattr(provider, "add_span_processor", None)
    if add is None:
        return False
    add(processor)
    return True


class BudgetInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Installs the budget processor and instruments openai, anthropic and litellm.

    Keyword arguments of ``instrument()``: those of ``BudgetSpanProcessor`` (``max_usd``,
    ``scopes``, ``failure_policy``, ...), ``tracer_provider``, ``processor`` (use an existing
    one), and ``libraries`` (a subset of ``("openai", "anthropic", "litellm")``). Without
    processor arguments the ``OTEL_BUDGET_*`` environment variables are read.
    """

    processor: BudgetSpanProcessor | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # each library is optional and checked on its own

    def _instrument(self, **kwargs: Any) -> None:
        provider = kwargs.get("tracer_provider")
        processor = kwargs.get("processor")
        libraries = kwargs.get("libraries")
        explicit = {k: kwargs[k] for k in _PROCESSOR_ARGS if k in kwargs}
        if processor is None:
            if explicit:
                processor = BudgetSpanProcessor(**explicit)  # bad values raise: caller's code
            else:
                processor = self._processor_from_env()
        self.processor = processor
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
        self._instrumented: list[BaseInstrumentor] = []
        for name in libraries:
            self._instrument_library(name, provider, processor)

    def _processor_from_env(self) -> BudgetSpanProcessor:
        try:
            return BudgetSpanProcessor(**settings_from_env())
        except (ValueError, OSError) as exc:
            # A typo in the environment must not silently mean "no budget". Zero-code runs
            # cannot raise into the app, so the failure policy decides: fail_closed refuses
            # every paid call (budget 0) until the configuration is fixed.
            import os

            closed = os.environ.get("OTEL_BUDGET_FAILURE_POLICY", "").strip() == FAIL_CLOSED
            logger.error(
                "otel-budget: invalid configuration: %s. %s", exc,
                "failure_policy=fail_closed: refusing every paid call"
                if closed else "Calls are NOT budgeted until this is fixed",
            )  # fmt: skip
            return BudgetSpanProcessor(max_usd=0 if closed else None)

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

        trace.set_tracer_provider = set_tracer_provider

    def _instrument_library(self, name: str, provider: Any, processor: BudgetSpanProcessor) -> None:
        if importlib.util.find_spec(name) is None:
            logger.debug("otel-budget: %s is not installed; skipped", name)
            return
        module_name, class_name = _INSTRUMENTORS[name]
        try:
            instrumentor = getattr(importlib.import_module(module_name), class_name)()
            # The wrappers get the runtime they enforce in their closure.
            kwargs: dict[str, Any] = {"runtime": processor.runtime}
            if provider is not None:
                kwargs["tracer_provider"] = provider
            instrumentor.instrument(**kwargs)
            if instrumentor.is_instrumented_by_opentelemetry:
                self._instrumented.append(instrumentor)
        except Exception as exc:  # one library's problem must not stop the others
            logger.error("otel-budget: could not instrument %s: %s", name, exc, exc_info=exc)

    def _uninstrument(self, **kwargs: Any) -> None:
        threads.uninstall("instrumentor")
        for instrumentor in getattr(self, "_instrumented", []):
            instrumentor.uninstrument()
        self._instrumented = []
        if self.processor is not None:
            self.processor.shutdown()  # inert from now on, even if still on the provider
            self.processor = None
