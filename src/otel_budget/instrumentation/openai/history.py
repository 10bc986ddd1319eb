"""The stored history a Responses API request makes the provider bill as input.

    remember("resp_abc", TokenUsage(input_tokens=1200, output_tokens=300))  # when it settles
    history_tokens("openai", "gpt-4o-mini", {"previous_response_id": "resp_abc"})
    # -> (1500, False): that response's whole context, billed again as input
    history_tokens("openai", "gpt-4o-mini", {"conversation": "conv_1"})
    # -> (128000, True): not seen by this process: the model's context window, flagged

``previous_response_id`` (and ``conversation``) make OpenAI prepend a stored conversation to
the request's input: the request's own messages are a fraction of what is billed. A response
settled in this process is remembered (bounded, most recent kept) with its billed input plus
output tokens, which is the context the next turn carries (its input already included the
history before it). A response this process did not see, or a ``conversation``, is projected
at the model's context window (genai-prices), else ``OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS``
(default 128000), and the span says so (``otel_budget.cost.input_assumed``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from otel_budget.pricing import TokenUsage

UNKNOWN_HISTORY_ENV = "OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS"
DEFAULT_UNKNOWN_HISTORY_TOKENS = 128_000
COST_INPUT_ASSUMED = "otel_budget.cost.input_assumed"
COST_HISTORY_TOKENS = "otel_budget.cost.history_tokens"
MAX_REMEMBERED = 50_000

_lock = threading.Lock()
_contexts: OrderedDict[str, int] = OrderedDict()


def remember(response_id: Any, usage: TokenUsage | None) -> None:
    """Record a settled response's context (billed input + output tokens). Never raises."""
    if not isinstance(response_id, str) or not response_id or usage is None:
        return
    try:
        total = int(usage.input_tokens) + int(usage.output_tokens)
    except (TypeError, ValueError, AttributeError):
        return
    with _lock:
        _contexts[response_id] = max(0, total)
        _contexts.move_to_end(response_id)
        while len(_contexts) > MAX_REMEMBERED:
            _contexts.popitem(last=False)


def lookup(response_id: str) -> int | None:
    with _lock:
        return _contexts.get(response_id)


def forget_all() -> None:
    """Clear the map (tests)."""
    with _lock:
        _contexts.clear()


@lru_cache(maxsize=256)
def context_window(provider: str, model: str) -> int | None:
    """The model's context window in tokens (genai-prices' data), or None."""
    try:
        from genai_prices import data_snapshot

        _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
        window = getattr(info, "context_window", None)
    except Exception:  # noqa: BLE001 - no data, or a genai-prices we do not know: no window
        return None
    return window if isinstance(window, int) and window > 0 else None


def unknown_history_tokens(provider: str, model: str) -> int:
    window = context_window(provider, model)
    if window is not None:
        return window
    raw = os.environ.get(UNKNOWN_HISTORY_ENV, "").strip()
    if raw.isascii() and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return DEFAULT_UNKNOWN_HISTORY_TOKENS  # unset or invalid (reported by config.read_env)


def history_tokens(provider: str, model: str, params: Mapping[str, Any]) -> tuple[int, bool]:
    """``(tokens, assumed)``: the stored input a Responses request carries by reference."""
    previous = params.get("previous_response_id")
    conversation = params.get("conversation")
    if isinstance(previous, str) and previous:
        known = lookup(previous)
        if known is not None and conversation is None:
            return known, False
    elif previous is None and conversation is None:
        return 0, False
    # An id this process did not see, a conversation, or a reference of an odd type.
    return unknown_history_tokens(provider, model), True
