"""Budget-enforcing GenAI instrumentation of the ``anthropic`` SDK.

    from otel_budget.instrumentation.anthropic import AnthropicBudgetInstrumentor

    AnthropicBudgetInstrumentor().instrument()      # usually via BudgetInstrumentor
    client = anthropic.Anthropic()
    client.messages.create(model="claude-sonnet-4-5", max_tokens=1024, messages=[...])

Wraps, sync and async, GA and beta (``client.beta.messages``, a separate code path in the
SDK): Messages ``create`` (JSON and ``stream=True``), ``parse`` and ``stream()`` (the last two
call ``_post`` directly, not ``create``). The beta tool runner and message threads send
through ``beta.messages.create``, so they are covered. Bedrock and Vertex clients reuse the
same resources (their provider name is the client's). The client's ``_attempt_request`` (one
HTTP attempt, inside the SDK's retry loop) is wrapped too: a timed-out or lost attempt is
charged, and a retry reserved. Spans follow the GenAI semantic
conventions; the projected cost and ``max_tokens`` (lowered to what the budget affords) are
on the span at start, so the budget decision happens before any request.

The SDK (2.x) makes its own span for every API call (``anthropic.messages.create``, with its
``http.*``, ``url.*``, service tier and per-TTL cache attributes) when OpenTelemetry tracing is
on (its default; ``ANTHROPIC_OPEN_TELEMETRY=false`` or the client's ``open_telemetry=False``
turns it off). It is kept, as a child of the metered ``chat`` span: the runtime registers a
GenAI span started while one of our calls is being sent as nested, and never charges it
(``metered.is_nested``), so the call is charged once. ``instrument(keep_sdk_spans=...)`` is
still accepted and changes nothing (the SDK's spans are always kept).

Modules: ``request`` (reading a call, reserving it), ``response`` (a message's usage and
attributes), ``streams`` (stream events), ``wrappers`` (the wrappers, sync and async from one
flow each).
"""

from __future__ import annotations

from collections.abc import Collection

from otel_budget.instrumentation._attempts import async_attempt, sync_attempt
from otel_budget.instrumentation._sdk import SDKInstrumentor
from otel_budget.instrumentation._stream import manager_aexit, manager_exit
from otel_budget.instrumentation.anthropic import wrappers

_INSTRUMENTS = ("anthropic >= 0.40",)

_GA = "anthropic.resources.messages.messages"
_BETA = "anthropic.resources.beta.messages.messages"

# (module, class, method, wrapper factory)
_TARGETS = (
    (_GA, "Messages", "create", wrappers.messages_create),
    (_GA, "Messages", "parse", wrappers.messages_create),
    (_GA, "Messages", "stream", wrappers.messages_stream),
    (_GA, "AsyncMessages", "create", wrappers.async_messages_create),
    (_GA, "AsyncMessages", "parse", wrappers.async_messages_create),
    (_GA, "AsyncMessages", "stream", wrappers.async_messages_stream),
    (_BETA, "Messages", "create", wrappers.messages_create),
    (_BETA, "Messages", "parse", wrappers.messages_create),
    (_BETA, "Messages", "stream", wrappers.messages_stream),
    (_BETA, "AsyncMessages", "create", wrappers.async_messages_create),
    (_BETA, "AsyncMessages", "parse", wrappers.async_messages_create),
    (_BETA, "AsyncMessages", "stream", wrappers.async_messages_stream),
)
# The SDK's HTTP attempt layer, inside its retry loop: each attempt of a metered call is
# reserved and, when it may have been billed, charged (see ``_attempts``).
_ATTEMPT_TARGETS = (
    ("anthropic._base_client", "SyncAPIClient", "_attempt_request", lambda _tracer, _source: sync_attempt),
    ("anthropic._base_client", "AsyncAPIClient", "_attempt_request", lambda _tracer, _source: async_attempt),
)
# The ``messages.stream()`` managers: a ``with`` left by the caller's exception ends the
# stream's span in error (see ``_stream.manager_exit``).
_GA_STREAMING = "anthropic.lib.streaming._messages"
_BETA_STREAMING = "anthropic.lib.streaming._beta_messages"
_MANAGER_TARGETS = (
    (_GA_STREAMING, "MessageStreamManager", "__exit__", lambda _t, _s: manager_exit),
    (_GA_STREAMING, "AsyncMessageStreamManager", "__aexit__", lambda _t, _s: manager_aexit),
    (_BETA_STREAMING, "BetaMessageStreamManager", "__exit__", lambda _t, _s: manager_exit),
    (_BETA_STREAMING, "BetaAsyncMessageStreamManager", "__aexit__", lambda _t, _s: manager_aexit),
)


class AnthropicBudgetInstrumentor(SDKInstrumentor):
    """Instruments the anthropic SDK with GenAI spans and budget enforcement."""

    _SDK = "anthropic"
    _TARGETS = (*_TARGETS, *_ATTEMPT_TARGETS, *_MANAGER_TARGETS)

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS


__all__ = ["AnthropicBudgetInstrumentor"]
