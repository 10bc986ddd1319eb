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
hook the moment it is, before any ``from litellm import completion`` binds a name (the
frame: ``instrumentation._sdk``). A name bound while instrumented keeps the wrapper, which
passes straight through once uninstrumented.

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

import logging
from collections.abc import Collection
from typing import Any

from otel_budget.instrumentation._sdk import SDKInstrumentor, Target, genai_tracer
from otel_budget.instrumentation.litellm import wrappers
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")

_INSTRUMENTS = ("litellm >= 1.0",)

# (module, "", function, wrapper factory): functions of the module, not methods.
# The public entry points callers resolve at call time.
_PUBLIC: tuple[Target, ...] = (
    ("litellm", "", "completion", wrappers.completion),
    ("litellm", "", "acompletion", wrappers.acompletion),
    ("litellm", "", "embedding", wrappers.embedding),
    ("litellm", "", "aembedding", wrappers.aembedding),
)
# Inner layers, looked up at call time. litellm's public dispatch functions call
# ``_PYTHON_*`` for the Python route (covers names bound before instrument(); private to
# litellm >= 1.109, optional), and ``litellm.main``'s own ``completion`` / ``embedding`` globals
# serve ``text_completion``, ``litellm.LiteLLM().chat.completions.create`` and ``batch_completion``.
# Inside a metered call these pass through (IN_METERED_CALL): still one span per call.
_INNER: tuple[Target, ...] = (
    ("litellm.chat_completions.dispatch", "", "_PYTHON_COMPLETION", wrappers.completion),
    ("litellm.chat_completions.dispatch", "", "_PYTHON_ACOMPLETION", wrappers.acompletion),
    ("litellm.embeddings.dispatch", "", "_PYTHON_EMBEDDING", wrappers.embedding),
    ("litellm.embeddings.dispatch", "", "_PYTHON_AEMBEDDING", wrappers.aembedding),
    ("litellm.main", "", "completion", wrappers.completion),
    ("litellm.main", "", "acompletion", wrappers.acompletion),
    ("litellm.main", "", "embedding", wrappers.embedding),
    ("litellm.main", "", "aembedding", wrappers.aembedding),
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


class LiteLLMBudgetInstrumentor(SDKInstrumentor):
    """Instruments litellm with GenAI spans and budget enforcement."""

    _SDK = "litellm"
    _TARGETS = (*_PUBLIC, *_INNER)

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _wiring(self, **kwargs: Any) -> tuple[Any, ...]:
        # Read from the installed metadata, without importing litellm: its implants run at
        # every interpreter start, imported or not.
        _warn_if_compromised()
        return genai_tracer(self, kwargs), RuntimeSource(kwargs.get("runtime"))


__all__ = ["LiteLLMBudgetInstrumentor"]
