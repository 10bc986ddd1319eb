"""Budget-enforcing GenAI instrumentation of ``litellm``.

    from otel_budget.instrumentation.litellm import LiteLLMBudgetInstrumentor

    LiteLLMBudgetInstrumentor().instrument()     # usually via BudgetInstrumentor
    litellm.completion(model="openai/gpt-4o-mini", messages=[...])     # reserved first

Wraps ``litellm.completion`` / ``acompletion`` (``stream=True`` too: the
``CustomStreamWrapper`` is proxied, sync and async iteration) and ``litellm.embedding`` /
``aembedding``. One span and one charge per litellm call: the provider comes from the
``provider/model`` prefix or ``custom_llm_provider`` (mapped to ``gen_ai.provider.name``:
``openai``, ``anthropic``, ``aws.bedrock``, ``gcp.vertex_ai``, ...), the output bound is
``max_tokens`` (or ``max_completion_tokens`` if that is what the caller used), and
``IN_METERED_CALL`` is set while litellm works, so our openai / anthropic wrappers that litellm
may reach underneath pass through. Router, retries and fallbacks call ``litellm.completion``
again inside the call: they are part of that one span.

``mock_response`` calls are metered like real ones (litellm reports a usage for them), so a
budget can be exercised without a provider.

Importing litellm is slow (seconds) and has side effects (it fetches its price map unless
``LITELLM_LOCAL_MODEL_COST_MAP=True``, and sets ``TIKTOKEN_CACHE_DIR``), so ``instrument()``
never imports it: if litellm is not imported yet, the wrappers are applied by a post-import
hook the moment it is, before any ``from litellm import completion`` binds a name.

Names bound *before* ``instrument()`` (``from litellm import completion`` at the top of a module
that imported litellm earlier) keep the original function; those calls are still metered
through the Python implementation litellm's dispatch calls (``litellm.chat_completions.
dispatch._PYTHON_COMPLETION`` and the embedding equivalent, wrapped when present).
``litellm.main.completion`` / ``embedding`` are wrapped too, which meters ``text_completion``,
``batch_completion`` and the ``litellm.LiteLLM()`` client (as ``chat`` spans). Not covered:
calls litellm routes to its native (Rust) implementation through an early-bound name (litellm
1.109 routes chat completions and embeddings to Python only), ``responses``,
``anthropic_messages`` and the other litellm entry points.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Collection
from typing import Any

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_budget.instrumentation.litellm import wrappers
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")

_INSTRUMENTS = ("litellm >= 1.0",)

# (module, attribute, wrapper factory). The public entry points callers resolve at call time.
_PUBLIC = (
    ("litellm", "completion", wrappers.completion),
    ("litellm", "acompletion", wrappers.acompletion),
    ("litellm", "embedding", wrappers.embedding),
    ("litellm", "aembedding", wrappers.aembedding),
)
# Inner layers, looked up at call time. litellm's public dispatch functions call
# ``_PYTHON_*`` for the Python route (covers names bound before instrument(); private to
# litellm >= 1.109, optional), and ``litellm.main``'s own ``completion`` / ``embedding`` globals
# serve ``text_completion``, ``litellm.LiteLLM().chat.completions.create`` and ``batch_completion``.
# Inside a metered call these pass through (IN_METERED_CALL): still one span per call.
_INNER = (
    ("litellm.chat_completions.dispatch", "_PYTHON_COMPLETION", wrappers.completion),
    ("litellm.chat_completions.dispatch", "_PYTHON_ACOMPLETION", wrappers.acompletion),
    ("litellm.embeddings.dispatch", "_PYTHON_EMBEDDING", wrappers.embedding),
    ("litellm.embeddings.dispatch", "_PYTHON_AEMBEDDING", wrappers.aembedding),
    ("litellm.main", "completion", wrappers.completion),
    ("litellm.main", "acompletion", wrappers.acompletion),
    ("litellm.main", "embedding", wrappers.embedding),
    ("litellm.main", "aembedding", wrappers.aembedding),
)


# Releases published to PyPI with credential-stealing code (their .pth implants run at every
# interpreter start, so instrumenting cannot help; say so loudly).
_COMPROMISED_RELEASES = frozenset({"1.82.7", "1.82.8", "1.107.0"})


def _warn_if_compromised() -> None:
    try:
        from importlib.metadata import version

        installed = version("litellm")
    except Exception:
        return
    if installed in _COMPROMISED_RELEASES:
        logger.warning(
            "otel-budget: litellm %s is a compromised release (malicious code on PyPI); "
            "remove it, delete its .pth files and rotate the credentials this host can reach",
            installed,
        )


class LiteLLMBudgetInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments litellm with GenAI spans and budget enforcement."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        from otel_budget import __version__
        from otel_budget.instrumentation._content import event_tracer

        self._tracer = event_tracer(trace.get_tracer(
            __name__, __version__, kwargs.get("tracer_provider"),
            schema_url="https://opentelemetry.io/schemas/1.37.0",
        ), __name__, kwargs.get("logger_provider"))  # fmt: skip
        self._switch = wrappers.Switch()
        self._source = RuntimeSource(kwargs.get("runtime"))  # the runtime the wrappers enforce
        self._lock = threading.Lock()
        # (module object, attribute, original, wrapper) of every attribute we replaced.
        self._wrapped: list[tuple[Any, str, Any, Any]] = []
        switch = self._switch
        module = sys.modules.get("litellm")
        if module is not None and hasattr(module, "completion"):
            self._wrap_all(switch)
        else:
            # Not imported (or still importing): wrap the moment its import completes.
            wrapt.register_post_import_hook(lambda _module: self._on_import(switch), "litellm")

    def _on_import(self, switch: wrappers.Switch) -> None:
        # A post-import hook that raises would fail the application's `import litellm`.
        try:
            self._wrap_all(switch)
        except Exception as exc:  # pragma: no cover - defensive
            logger.error("otel-budget: could not instrument litellm: %s", exc, exc_info=exc)

    def _wrap_all(self, switch: wrappers.Switch) -> None:
        with self._lock:
            if switch is not self._switch or not switch.on or self._wrapped:
                return  # uninstrumented (or instrumented again) since the hook was registered
            _warn_if_compromised()
            for module_name, attribute, factory in (*_PUBLIC, *_INNER):
                self._wrap(module_name, attribute, factory, switch)

    def _wrap(self, module_name: str, attribute: str, factory: Any, switch: wrappers.Switch) -> None:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # an older litellm without this module
            return
        original = getattr(module, attribute, None)
        if not callable(original):
            return  # absent in this litellm version
        wrapper = wrapt.FunctionWrapper(original, factory(self._tracer, self._source, switch))
        setattr(module, attribute, wrapper)
        self._wrapped.append((module, attribute, original, wrapper))

    def _uninstrument(self, **kwargs: Any) -> None:
        switch = getattr(self, "_switch", None)
        if switch is not None:
            switch.on = False  # wrappers still referenced somewhere now pass straight through
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            for module, attribute, original, wrapper in getattr(self, "_wrapped", []):
                if getattr(module, attribute, None) is wrapper:
                    setattr(module, attribute, original)
            self._wrapped = []


__all__ = ["LiteLLMBudgetInstrumentor"]
