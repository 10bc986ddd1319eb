"""litellm's ``CustomStreamWrapper``, proxied so its call settles however the stream ends.

    stream = litellm.completion(..., stream=True)           # inside the wrapper
    return stream_proxy(stream, call, hide_usage=True, asynchronous=False)

A ``CustomStreamWrapper`` iterates both ways (``__next__`` and ``__anext__``): the proxy is the
sync one for ``completion`` and the async one for ``acompletion``. The usage chunk the wrapper
asked for (``prepare_stream`` in ``request``) is read, then hidden from a caller who did not
ask for it. Chunks are read with ``ChatChunkAccumulator`` and ``response.litellm_usage``.
"""

from __future__ import annotations

from typing import Any

from otel_budget.instrumentation import _content
from otel_budget.instrumentation._call import LLMCall
from otel_budget.instrumentation._stream import AsyncStreamProxy, SyncStreamProxy
from otel_budget.instrumentation._util import ChatChunkAccumulator
from otel_budget.instrumentation.litellm.response import litellm_usage, reported_cost_usd

# Delta fields holding generated text.
_DELTA_FIELDS = ("content", "reasoning_content", "refusal")


class AsyncLiteLLMStream(AsyncStreamProxy):
    """An async ``CustomStreamWrapper``: ``async for``, ``async with``, ``aclose()`` (settled
    with the ledger's coroutines, as every async proxy), and its synchronous ``close()``."""

    def close(self) -> None:  # type: ignore[override]  # CustomStreamWrapper.close is sync
        try:
            self.__wrapped__.close()
        finally:
            self._self_end(None, complete=False)


def stream_proxy(result: Any, call: LLMCall, hide_usage: bool, asynchronous: bool) -> Any:
    """The proxy of a streamed result (sync or async iteration, as the entry point was), or
    None when ``result`` does not iterate that way (litellm returned a whole response)."""
    if not hasattr(result, "__anext__" if asynchronous else "__next__"):
        return None
    acc = ChatChunkAccumulator(
        litellm_usage, _DELTA_FIELDS, _content.chat_stream_content(), reported_cost_usd
    )
    proxy = AsyncLiteLLMStream if asynchronous else SyncStreamProxy
    return proxy(result, call, acc, hide_usage)


__all__ = ["AsyncLiteLLMStream", "stream_proxy"]
