"""The frame of a provider SDK's instrumentor: a table of methods, wrapped once the SDK loads.

    class OpenAIBudgetInstrumentor(SDKInstrumentor):
        _SDK = "openai"
        _TARGETS = (("openai.resources.embeddings", "Embeddings", "create", factory), ...)

        def instrumentation_dependencies(self):
            return ("openai >= 1.40",)

    OpenAIBudgetInstrumentor().instrument()   # imports nothing
    import openai                             # ... its methods are wrapped here

``instrument()`` never imports the SDK: if the application has imported it already, the
table's methods are wrapped at once; otherwise the moment the application's own import of
it completes (a post-import hook), before any of its clients can exist. So an application
that never uses a provider never pays for loading it: importing ``anthropic`` alone costs
over a second of CPU, which every process of an openai-only app under
``opentelemetry-instrument`` paid at start. Each factory receives the tracer and the
runtime source (``RuntimeSource``) through its closure, as before.

``uninstrument()`` unwraps exactly what was wrapped, and disarms a hook that has not fired
yet (wrapt keeps hooks for good: a disarmed one does nothing when the SDK is imported
later). A failure while wrapping is logged as an error naming the SDK, never raised into the
application's ``import``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.utils import unwrap

from otel_budget.cache import as_cache
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")

#: A wrapper factory: (tracer, runtime source) -> the wrapt wrapper of one method.
Factory = Callable[[Any, RuntimeSource], Any]
#: (module, class, method, factory); a module or method absent from this SDK version is skipped.
Target = tuple[str, str, str, Factory]


class _Arming:
    """One ``instrument()``'s claim on its post-import hook; off once uninstrumented."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True


class SDKInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Wraps ``_TARGETS`` of the ``_SDK`` package when it is (or once it is) imported."""

    _SDK: str = ""
    _TARGETS: tuple[Target, ...] = ()

    def _instrument(self, **kwargs: Any) -> None:
        from otel_budget import __version__
        from otel_budget.instrumentation._content import event_tracer

        name = type(self).__module__
        tracer = event_tracer(trace.get_tracer(
            name, __version__, kwargs.get("tracer_provider"),
            schema_url="https://opentelemetry.io/schemas/1.37.0",
        ), name, kwargs.get("logger_provider"))  # fmt: skip
        # The runtime these wrappers enforce, in their closure (instrument(runtime=...));
        # without one they follow the process's current runtime.
        source = RuntimeSource(kwargs.get("runtime"), as_cache(kwargs.get("cache")))
        self._lock = threading.Lock()
        self._wrapped: list[tuple[str, str, str]] = []
        arming = self._arming = _Arming()

        def on_import(_module: Any) -> None:
            # Runs inside the application's ``import``: it must never raise there.
            try:
                self._wrap_all(arming, tracer, source)
            except Exception as exc:  # pragma: no cover - defensive
                logger.error(
                    "otel-budget: could not instrument %s; its calls are NOT budgeted: %s",
                    self._SDK, exc, exc_info=exc,
                )  # fmt: skip

        # Called at once when the SDK is imported already, else when its import completes.
        wrapt.register_post_import_hook(on_import, self._SDK)

    def _wrap_all(self, arming: _Arming, tracer: Any, source: RuntimeSource) -> None:
        with self._lock:
            if arming is not getattr(self, "_arming", None) or not arming.on or self._wrapped:
                return  # uninstrumented (or instrumented again) since the hook was armed
            for module, cls, method, factory in self._TARGETS:
                try:
                    owner = getattr(importlib.import_module(module), cls)
                except (ImportError, AttributeError):
                    continue  # an SDK version without this module or class
                if not callable(getattr(owner, method, None)):
                    continue  # an SDK version without this API
                wrapt.wrap_function_wrapper(owner, method, factory(tracer, source))
                self._wrapped.append((module, cls, method))

    def _uninstrument(self, **kwargs: Any) -> None:
        arming = getattr(self, "_arming", None)
        if arming is not None:
            arming.on = False
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            for module, cls, method in self._wrapped:
                unwrap(getattr(importlib.import_module(module), cls), method)
            self._wrapped = []


__all__ = ["Factory", "SDKInstrumentor", "Target"]
