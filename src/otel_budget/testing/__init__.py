"""Test helpers shipped with otel-budget (stdlib only, no pytest dependency).

:class:`FakeLLMServer` is an embedded fake OpenAI/Anthropic HTTP API that the real SDKs can
talk to, and that counts what it would bill; see :mod:`otel_budget.testing.fake_llm`.
"""

from __future__ import annotations

from .fake_llm import (
    DEFAULT_PRICES,
    DEFAULT_REPLY_TEXT,
    Behaviour,
    CallRecord,
    FakeLLMServer,
    count_input_tokens,
)

__all__ = [
    "DEFAULT_PRICES",
    "DEFAULT_REPLY_TEXT",
    "Behaviour",
    "CallRecord",
    "FakeLLMServer",
    "count_input_tokens",
]
