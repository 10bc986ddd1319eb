"""The openai instrumentation's earlier single module, kept as a facade of its parts.

    from otel_budget.instrumentation.openai.patch import chat_create, chat_usage

The code lives in one module per concern: ``request`` (reading what a request sends),
``response`` (reading usage and bodies), ``streams`` (accumulators and stream proxies) and
``wrappers`` (the wrapper factories, sync and async from one flow). Import from those.
"""

from __future__ import annotations

from otel_budget.instrumentation.openai.request import (
    PROVIDER_AZURE,
    PROVIDER_OPENAI,
    chat_request,
    client_info,
    completions_request,
    embeddings_request,
    responses_request,
)
from otel_budget.instrumentation.openai.response import chat_usage, responses_usage
from otel_budget.instrumentation.openai.streams import ResponsesAccumulator
from otel_budget.instrumentation.openai.wrappers import (
    async_chat_create,
    async_completions_create,
    async_embeddings_create,
    async_responses_create,
    chat_create,
    completions_create,
    embeddings_create,
    make_async_wrapper,
    make_sync_wrapper,
    responses_create,
)

__all__ = [
    "PROVIDER_AZURE",
    "PROVIDER_OPENAI",
    "ResponsesAccumulator",
    "async_chat_create",
    "async_completions_create",
    "async_embeddings_create",
    "async_responses_create",
    "chat_create",
    "chat_request",
    "chat_usage",
    "client_info",
    "completions_create",
    "completions_request",
    "embeddings_create",
    "embeddings_request",
    "make_async_wrapper",
    "make_sync_wrapper",
    "responses_create",
    "responses_request",
    "responses_usage",
]
