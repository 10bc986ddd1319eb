"""Budget-enforcing GenAI instrumentation of the ``openai`` SDK (v1+).

    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    OpenAIBudgetInstrumentor().instrument()      # usually via BudgetInstrumentor
    client = openai.OpenAI()
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])  # reserved first

Wraps, sync and async: chat completions ``create`` and ``parse`` (``stream()`` goes through
``create``), Responses ``create`` and ``parse`` (and its ``stream()``), embeddings ``create``
and legacy completions ``create``; ``with_raw_response`` / ``with_streaming_response`` go
through the same methods. The client's ``_send_request`` (one HTTP attempt, inside the SDK's
retry loop) is wrapped too: a timed-out or lost attempt is charged, and a retry reserved.
``AzureOpenAI`` and subclasses use the same resources, so they are covered (provider
``azure.ai.openai``). Spans follow the GenAI semantic conventions; the projected cost and the
output bound are on the span at start, so the budget decision happens before any request.
"""

from __future__ import annotations

from collections.abc import Collection

from otel_budget.instrumentation._attempts import async_attempt, sync_attempt
from otel_budget.instrumentation._sdk import SDKInstrumentor
from otel_budget.instrumentation._stream import manager_aexit, manager_exit
from otel_budget.instrumentation.openai import wrappers

_INSTRUMENTS = ("openai >= 1.40",)

# (module, class, method, wrapper factory)
_TARGETS = (
    ("openai.resources.chat.completions", "Completions", "create", wrappers.chat_create),
    ("openai.resources.chat.completions", "Completions", "parse", wrappers.chat_create),
    ("openai.resources.chat.completions", "AsyncCompletions", "create", wrappers.async_chat_create),
    ("openai.resources.chat.completions", "AsyncCompletions", "parse", wrappers.async_chat_create),
    ("openai.resources.responses", "Responses", "create", wrappers.responses_create),
    ("openai.resources.responses", "Responses", "parse", wrappers.responses_create),
    ("openai.resources.responses", "AsyncResponses", "create", wrappers.async_responses_create),
    ("openai.resources.responses", "AsyncResponses", "parse", wrappers.async_responses_create),
    ("openai.resources.completions", "Completions", "create", wrappers.completions_create),
    ("openai.resources.completions", "AsyncCompletions", "create", wrappers.async_completions_create),
    ("openai.resources.embeddings", "Embeddings", "create", wrappers.embeddings_create),
    ("openai.resources.embeddings", "AsyncEmbeddings", "create", wrappers.async_embeddings_create),
)
# The SDK's HTTP attempt layer, inside its retry loop: each attempt of a metered call is
# reserved and, when it may have been billed, charged (see ``_attempts``).
_ATTEMPT_TARGETS = (
    ("openai._base_client", "SyncAPIClient", "_send_request", lambda _tracer, _source: sync_attempt),
    ("openai._base_client", "AsyncAPIClient", "_send_request", lambda _tracer, _source: async_attempt),
)
# The stream helpers' managers: a ``with`` left by the caller's exception ends the stream's
# span in error (see ``_stream.manager_exit``).
_RESPONSES_STREAMING = "openai.lib.streaming.responses._responses"
_CHAT_STREAMING = "openai.lib.streaming.chat._completions"
_MANAGER_TARGETS = (
    (_RESPONSES_STREAMING, "ResponseStreamManager", "__exit__", lambda _t, _s: manager_exit),
    (_RESPONSES_STREAMING, "AsyncResponseStreamManager", "__aexit__", lambda _t, _s: manager_aexit),
    (_CHAT_STREAMING, "ChatCompletionStreamManager", "__exit__", lambda _t, _s: manager_exit),
    (_CHAT_STREAMING, "AsyncChatCompletionStreamManager", "__aexit__", lambda _t, _s: manager_aexit),
)


class OpenAIBudgetInstrumentor(SDKInstrumentor):
    """Instruments the openai SDK with GenAI spans and budget enforcement."""

    _SDK = "openai"
    _TARGETS = (*_TARGETS, *_ATTEMPT_TARGETS, *_MANAGER_TARGETS)

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS
