"""The names this package's wrappers were first imported by, from the modules that hold them.

    from otel_budget.instrumentation.anthropic.patch import MessagesAccumulator, anthropic_usage

New code imports from ``request`` (reading a call and starting it), ``response`` (usage and
attributes of a message), ``streams`` (stream events) and ``wrappers`` (the wrapt wrappers).
"""

from __future__ import annotations

from otel_budget.instrumentation.anthropic.request import (
    PROVIDER_ANTHROPIC,
    messages_request,
)
from otel_budget.instrumentation.anthropic.response import anthropic_usage
from otel_budget.instrumentation.anthropic.streams import MessagesAccumulator
from otel_budget.instrumentation.anthropic.wrappers import (
    StreamManagerNotEnteredError,
    async_messages_create,
    async_messages_stream,
    messages_create,
    messages_stream,
)

__all__ = [
    "PROVIDER_ANTHROPIC",
    "MessagesAccumulator",
    "StreamManagerNotEnteredError",
    "anthropic_usage",
    "async_messages_create",
    "async_messages_stream",
    "messages_create",
    "messages_request",
    "messages_stream",
]
