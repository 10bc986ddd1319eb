"""The async openai paths settle through the ledger's coroutines, never its blocking methods.

    spy = LoopSpy()                       # a MemoryStorage noting blocking calls on a loop
    setup(max_usd=1.0, storage=spy)
    ...                                   # async calls and streams, every way they end
    assert spy.blocking_on_loop == []

A blocking ledger method called from a coroutine stalls every task of the event loop for a
round trip to a shared ledger (Redis), or for its whole timeout when the ledger is frozen.
The async wrappers and stream proxies use ``areserve_up_to`` / ``acommit`` / ... instead.
A task being cancelled is the exception: an ``await`` there may be cancelled half-way (anyio
cancel scopes cancel again at each one), so it settles without awaiting, never leaving the
call reserved.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import openai
import pytest

from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.storage import MemoryStorage
from otel_budget.testing import Behaviour, FakeLLMServer
from tests.helpers import assert_settled_from_server, ledger, only_span

MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075)}


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class LoopSpy(MemoryStorage):
    """A ``MemoryStorage`` that notes each blocking ledger call made on a running event loop
    other than through its coroutine twin (which, without I/O, calls the blocking method)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blocking_on_loop: list[str] = []
        self.twin = 0

    def _note(self, name: str) -> None:
        if not self.twin and _on_loop():
            self.blocking_on_loop.append(name)

    def reserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        self._note("reserve_up_to")
        return super().reserve_up_to(*args, **kwargs)

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        self._note("commit")
        return super().commit(*args, **kwargs)

    def release(self, *args: Any, **kwargs: Any) -> Any:
        self._note("release")
        return super().release(*args, **kwargs)

    def charge(self, *args: Any, **kwargs: Any) -> Any:
        self._note("charge")
        return super().charge(*args, **kwargs)

    async def _twin(self, name: str, *args: Any) -> Any:
        self.twin += 1
        try:
            return getattr(self, name)(*args)
        finally:
            self.twin -= 1

    async def areserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        return await self._twin("reserve_up_to", *args, *kwargs.values())

    async def acommit(self, *args: Any) -> Any:
        return await self._twin("commit", *args)

    async def arelease(self, *args: Any) -> Any:
        return await self._twin("release", *args)

    async def acharge(self, *args: Any) -> Any:
        return await self._twin("charge", *args)


class SlowCoroutines(MemoryStorage):
    """A ledger whose coroutines wait (as a network ledger's do): each is a point where a
    cancelled task is cancelled again."""

    async def _later(self, name: str, args: Sequence[Any]) -> Any:
        await asyncio.sleep(0.001)
        return getattr(self, name)(*args)

    async def areserve_up_to(self, *args: Any, **kwargs: Any) -> Any:
        return await self._later("reserve_up_to", (*args, *kwargs.values()))

    async def acommit(self, *args: Any) -> Any:
        return await self._later("commit", args)

    async def arelease(self, *args: Any) -> Any:
        return await self._later("release", args)

    async def acharge(self, *args: Any) -> Any:
        return await self._later("charge", args)


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture
def instrumented() -> Iterator[OpenAIBudgetInstrumentor]:
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    gc.collect()
    instrumentor.uninstrument()


def _client(server: FakeLLMServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)


def _create(c: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    return c.chat.completions.create(model=MINI, messages=MESSAGES, **kwargs)


def test_async_calls_and_streams_never_call_a_blocking_ledger_method(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    spy = LoopSpy()
    processor = setup(max_usd=1.0, storage=spy)

    async def main() -> None:
        c = _client(server)
        await _create(c, max_tokens=20)  # JSON
        assert_settled_from_server(only_span(exporter, f"chat {MINI}"), server)
        exporter.clear()
        async for _chunk in await _create(c, stream=True):  # exhausted
            pass
        assert_settled_from_server(only_span(exporter, f"chat {MINI}"), server)
        exporter.clear()
        async with await _create(c, stream=True) as stream:  # async with, left early
            await stream.__anext__()
        stream = await _create(c, stream=True)  # close() part-way
        await stream.__anext__()
        await stream.close()
        stream = await _create(c, stream=True)  # aclose() part-way
        await stream.__anext__()
        await stream.aclose()
        server.script(Behaviour(break_stream_after=2))  # broken mid-stream
        with pytest.raises(openai.APIError):
            async for _chunk in await _create(c, stream=True):
                pass
        server.script(Behaviour(status=500))  # an error status
        with pytest.raises(openai.InternalServerError):
            await _create(c)
        async with c.chat.completions.stream(model=MINI, messages=MESSAGES) as helper:
            await helper.__anext__()  # the SDK's helper, left early
        async with c.chat.completions.with_streaming_response.create(
            model=MINI, messages=MESSAGES, stream=True
        ) as response:  # with_streaming_response of a stream, left early
            await (await response.parse()).__anext__()
        await c.close()

    asyncio.run(main())
    assert spy.blocking_on_loop == []
    assert ledger(processor)[1] == 0  # every call settled
    assert ledger(processor)[0] >= server.stats()["billed_nanos"]


def test_a_stream_settles_while_its_task_is_cancelled(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0, storage=SlowCoroutines())

    async def main() -> None:
        c = _client(server)
        with anyio.CancelScope() as scope:
            async with await _create(c, stream=True) as stream:
                await stream.__anext__()
                scope.cancel()  # a timeout, a task group failing: the stream exits cancelled
                await anyio.sleep(1)
        assert scope.cancelled_caught
        await c.close()

    asyncio.run(main())
    span = only_span(exporter, f"chat {MINI}")
    assert span.attributes["otel_budget.cost.usd"] > 0
    assert ledger(processor)[1] == 0  # not left reserved
