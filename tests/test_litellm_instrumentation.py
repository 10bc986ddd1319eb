"""LiteLLMBudgetInstrumentor: real litellm against the embedded fake provider on 127.0.0.1.

litellm is optional and heavy (a ~5 s import): the module is skipped when it is not
installed, and imported once, offline (``LITELLM_LOCAL_MODEL_COST_MAP=True``: no price-map
download). litellm sets ``TIKTOKEN_CACHE_DIR`` for the whole process; it is restored after
this module so the other test modules see the environment they expect.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

_ENV_KEYS = ("LITELLM_LOCAL_MODEL_COST_MAP", "TIKTOKEN_CACHE_DIR")
_SAVED_ENV = {key: os.environ.get(key) for key in _ENV_KEYS}


def _restore_env() -> None:
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # read at import: never fetch the price map
try:
    litellm = pytest.importorskip(
        "litellm", reason="litellm is not installed (optional; see the `litellm` extra)"
    )
except BaseException:  # skipped: leave the environment as it was
    _restore_env()
    raise
# Bound before anything is instrumented, as an application module might do.
from litellm import completion as early_completion  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from otel_budget import BudgetExceededError, budget  # noqa: E402
from otel_budget import attributes as attrs  # noqa: E402
from otel_budget.instrumentation._call import IN_METERED_CALL  # noqa: E402
from otel_budget.instrumentation.litellm import LiteLLMBudgetInstrumentor  # noqa: E402
from otel_budget.instrumentation.litellm.request import resolve_provider  # noqa: E402
from otel_budget.storage import MemoryStorage  # noqa: E402
from otel_budget.testing import Behaviour, FakeLLMServer  # noqa: E402
from tests.helpers import ledger  # noqa: E402

pytestmark = [
    # litellm's own pydantic models warn on import and use; not ours to fix.
    pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning"),
]

MODEL = "openai/gpt-4o-mini"
CLAUDE = "anthropic/claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
EMBED = "openai/text-embedding-3-small"


def _nanos(usd: float) -> int:
    return round(usd * 1_000_000_000)


@pytest.fixture(scope="module", autouse=True)
def _litellm_process_state() -> Iterator[None]:
    debug = litellm.suppress_debug_info
    litellm.suppress_debug_info = True
    yield
    litellm.suppress_debug_info = debug
    _restore_env()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        # genai-prices' Claude Sonnet 4.5 cache prices, so cache tokens bill as they price.
        srv.prices["claude-sonnet-4-5"] = (3.0, 15.0, 0.30, 3.75)
        yield srv


@pytest.fixture
def fake(server: FakeLLMServer) -> Iterator[FakeLLMServer]:
    server.clear_script()
    server.reset_stats()
    yield server
    server.clear_script()


@pytest.fixture
def instrumented() -> Iterator[LiteLLMBudgetInstrumentor]:
    instrumentor = LiteLLMBudgetInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


def _chat_kwargs(server: FakeLLMServer, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "api_base": server.openai_base_url,
            "api_key": "x", **extra}  # fmt: skip


def _claude_kwargs(server: FakeLLMServer, **extra: Any) -> dict[str, Any]:
    return {"model": CLAUDE, "messages": MESSAGES, "api_base": server.url, "api_key": "x", **extra}


def _llm_spans(exporter: Any) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if attrs.GEN_AI_OPERATION_NAME in (s.attributes or {})]


def _only_span(exporter: Any) -> Any:
    spans = _llm_spans(exporter)
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


# -- JSON calls --------------------------------------------------------------------------------
def test_chat_span_attributes_and_cost_equal_the_bill(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    reply = litellm.completion(**_chat_kwargs(fake, temperature=0.2))
    assert reply.choices[0].message.content

    span = _only_span(exporter)
    a = span.attributes
    assert span.name == "chat gpt-4o-mini" and span.kind is SpanKind.CLIENT
    assert a[attrs.GEN_AI_OPERATION_NAME] == "chat"
    assert a[attrs.GEN_AI_PROVIDER_NAME] == "openai"
    assert a[attrs.GEN_AI_REQUEST_MODEL] == "gpt-4o-mini"
    assert a[attrs.SERVER_ADDRESS] == "127.0.0.1" and a[attrs.SERVER_PORT] == fake.port
    assert a["gen_ai.request.temperature"] == 0.2
    # No cap given: the default one is set, sent, and what the projection assumed.
    assert a[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 4096
    assert fake.last_call.body["max_tokens"] == 4096
    assert a[attrs.COST_PROJECTED_USD] > a[attrs.COST_USD] > 0
    assert a[attrs.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini"
    assert a[attrs.GEN_AI_RESPONSE_ID] == reply.id
    assert tuple(a[attrs.GEN_AI_RESPONSE_FINISH_REASONS]) == ("stop",)
    assert a[attrs.GEN_AI_USAGE_INPUT_TOKENS] == reply.usage.prompt_tokens
    assert a[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == reply.usage.completion_tokens == 20
    stats = fake.stats()
    assert stats["billed_requests"] == 1
    assert _nanos(a[attrs.COST_USD]) == stats["billed_nanos"]


def test_anthropic_route_with_cache_tokens_costs_what_is_billed(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    fake.script(Behaviour(cached_tokens=400, cache_creation_tokens=300, path="messages"))
    reply = litellm.completion(**_claude_kwargs(fake, max_tokens=50))
    assert reply.choices[0].message.content

    a = _only_span(exporter).attributes
    assert a[attrs.GEN_AI_PROVIDER_NAME] == "anthropic"
    assert a[attrs.GEN_AI_REQUEST_MODEL] == "claude-sonnet-4-5"
    assert a[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 50
    assert fake.last_call.path == "/v1/messages" and fake.last_call.body["max_tokens"] == 50
    assert a[attrs.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 400
    assert a[attrs.GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS] == 300
    assert a[attrs.GEN_AI_USAGE_INPUT_TOKENS] == fake.last_call.input_tokens  # the total
    assert _nanos(a[attrs.COST_USD]) == fake.stats()["billed_nanos"] > 0


def test_embeddings_span_and_cost(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    result = litellm.embedding(model=EMBED, input=["hello world", "budgets"],
                               api_base=fake.openai_base_url, api_key="x")  # fmt: skip
    assert len(result.data) == 2
    a = _only_span(exporter).attributes
    assert a[attrs.GEN_AI_OPERATION_NAME] == "embeddings"
    assert a[attrs.GEN_AI_REQUEST_MODEL] == "text-embedding-3-small"
    assert attrs.GEN_AI_REQUEST_MAX_TOKENS not in a
    assert a[attrs.GEN_AI_USAGE_INPUT_TOKENS] == fake.last_call.input_tokens
    assert _nanos(a[attrs.COST_USD]) == fake.stats()["billed_nanos"] > 0


# -- enforcement -------------------------------------------------------------------------------
def test_refused_before_any_http_request(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=0.0000001)  # less than the input alone costs
    with pytest.raises(BudgetExceededError):
        litellm.completion(**_chat_kwargs(fake))
    with pytest.raises(BudgetExceededError):
        asyncio.run(litellm.acompletion(**_chat_kwargs(fake, stream=True)))
    assert fake.stats()["requests"] == 0
    spans = _llm_spans(exporter)
    assert len(spans) == 2
    for span in spans:
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes[attrs.ERROR_TYPE] == "BudgetExceededError"


def test_runaway_loop_is_stopped_within_budget(
    make_processor: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor()
    limit = 0.0003
    calls = 0
    with pytest.raises(BudgetExceededError):
        with budget(max_usd=limit, name="runaway") as run:
            for _ in range(1000):
                litellm.completion(**_chat_kwargs(fake, max_tokens=50))
                calls += 1
    stats = fake.stats()
    assert calls >= 5 and stats["billed_requests"] == calls
    assert stats["billed_nanos"] <= _nanos(limit)
    report = run.report()
    assert report.calls == calls and report.aborts == 1
    assert _nanos(report.total_usd) == stats["billed_nanos"]


def test_output_cap_is_lowered_to_what_the_budget_affords(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor()
    with budget(max_usd=0.00002):  # ~30 output tokens of gpt-4o-mini after the input
        litellm.completion(**_chat_kwargs(fake, max_completion_tokens=4000, max_tokens=3000))
    body = fake.last_call.body
    cap = _only_span(exporter).attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS]
    assert 16 <= cap < 100
    # The caller used both spellings: neither may exceed the affordable cap.
    assert body.get("max_tokens", cap) <= cap and body.get("max_completion_tokens", cap) <= cap
    assert fake.stats()["billed_nanos"] <= _nanos(0.00002)


def test_max_completion_tokens_is_the_bound_when_the_caller_used_it(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    litellm.completion(**_chat_kwargs(fake, max_completion_tokens=33))
    assert _only_span(exporter).attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 33
    assert "max_tokens" not in fake.last_call.body or fake.last_call.body["max_tokens"] == 33


@pytest.mark.parametrize(
    "extra",
    [
        {"extra_body": {"max_tokens": 3000}},
        {"max_tokens": 300, "extra_body": {"n": 8}},
        {"max_tokens": 3000.0},
        {"max_tokens": "3000"},
    ],
)
def test_what_the_request_sends_enters_the_projection_and_the_cap(
    make_processor: Any, fake: FakeLLMServer, instrumented: Any, extra: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    make_processor()
    monkeypatch.setattr(fake, "default_output_tokens", 5000)  # the module's server: restored
    limit = 0.01
    body = dict(extra.get("extra_body", {}))
    calls = 0
    with pytest.raises(BudgetExceededError) as info, budget(max_usd=limit) as run:
        for n in range(40):
            messages = [{"role": "user", "content": f"call {n}"}]
            litellm.completion(**_chat_kwargs(fake, messages=messages, **extra))
            calls += 1
    assert info.value.reason == "limit"
    assert extra.get("extra_body", {}) == body  # the caller's dict was not changed
    stats = fake.stats()
    assert stats["errors"] == 0 and stats["billed_requests"] == calls >= 1
    assert stats["billed_nanos"] <= _nanos(limit)
    assert _nanos(run.report().total_usd) == stats["billed_nanos"]


def test_generator_messages_are_projected_and_sent(
    make_processor: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor()
    text = " ".join(str(i) for i in range(30_000))  # ~43k billed tokens
    limit = 0.05
    calls = 0
    with pytest.raises(BudgetExceededError), budget(max_usd=limit) as run:
        for n in range(40):
            messages = ({"role": "user", "content": f"{n} {text}"} for _ in range(1))
            litellm.completion(**_chat_kwargs(fake, messages=messages, max_tokens=50))
            calls += 1
    stats = fake.stats()
    assert calls >= 1 and all(r.input_tokens > 40_000 for r in fake.calls())
    assert stats["billed_nanos"] <= _nanos(limit)
    assert _nanos(run.report().total_usd) == stats["billed_nanos"]


@pytest.mark.parametrize("extra", [{"max_tokens": "lots"}, {"max_tokens": 50, "n": True}])
def test_unprojectable_request_is_refused_as_invalid(
    make_processor: Any, fake: FakeLLMServer, instrumented: Any, extra: dict[str, Any]
) -> None:
    make_processor(max_usd=1)
    with pytest.raises(BudgetExceededError) as info:
        litellm.completion(**_chat_kwargs(fake, **extra))
    assert info.value.reason == "invalid_request"
    assert fake.stats()["requests"] == 0


def test_provider_error_releases_the_reservation(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor()
    fake.script(Behaviour(status=400))
    with budget(max_usd=0.003) as run:  # fits one default-capped call (~$0.0025) at a time
        with pytest.raises(Exception) as info:
            litellm.completion(**_chat_kwargs(fake))
        assert not isinstance(info.value, BudgetExceededError)
        assert run.report().total_usd == 0
        litellm.completion(**_chat_kwargs(fake))  # the whole budget is available again
    failed = _llm_spans(exporter)[0]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes[attrs.ERROR_TYPE] != "BudgetExceededError"
    assert fake.stats()["billed_requests"] == 1


# -- streams -----------------------------------------------------------------------------------
def test_sync_stream_is_settled_from_usage_the_caller_did_not_see(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    stream = litellm.completion(**_chat_kwargs(fake, stream=True))
    chunks = list(stream)
    assert chunks and all(chunk.choices for chunk in chunks)  # usage chunk hidden again
    assert fake.last_call.body["stream_options"] == {"include_usage": True}
    span = _only_span(exporter)
    a = span.attributes
    assert a["gen_ai.request.stream"] is True
    assert attrs.COST_ESTIMATED not in a
    assert a[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 20
    assert _nanos(a[attrs.COST_USD]) == fake.stats()["billed_nanos"]


def test_stream_usage_chunk_kept_when_the_caller_asked_for_it(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    with litellm.completion(**_claude_kwargs(fake, stream=True, max_tokens=40,
                                             stream_options={"include_usage": True})) as stream:  # fmt: skip
        chunks = list(stream)
    assert getattr(chunks[-1], "usage", None) is not None
    a = _only_span(exporter).attributes
    assert a[attrs.GEN_AI_PROVIDER_NAME] == "anthropic"
    assert _nanos(a[attrs.COST_USD]) == fake.stats()["billed_nanos"]


def test_async_stream_is_settled(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)

    async def run() -> list[Any]:
        stream = await litellm.acompletion(**_claude_kwargs(fake, stream=True, max_tokens=40))
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks and all(chunk.choices for chunk in chunks)
    a = _only_span(exporter).attributes
    assert attrs.COST_ESTIMATED not in a
    assert a[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 20
    assert _nanos(a[attrs.COST_USD]) == fake.stats()["billed_nanos"]


def test_stream_closed_early_is_settled_from_what_was_streamed(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    fake.default_output_tokens = 200
    try:
        stream = litellm.completion(**_chat_kwargs(fake, stream=True))
        for i, _chunk in enumerate(stream):
            if i == 2:
                break
        stream.close()

        async def run() -> None:
            astream = await litellm.acompletion(**_chat_kwargs(fake, stream=True))
            async for _chunk in astream:
                break
            await astream.aclose()

        asyncio.run(run())
    finally:
        fake.default_output_tokens = 20
    spans = _llm_spans(exporter)
    assert len(spans) == 2
    for span in spans:
        assert span.end_time is not None
        assert span.attributes[attrs.COST_USD] > 0  # input + what was streamed, never zero
        # Closed early without usage: charged its reservation (the provider may have generated
        # more than was read), never more.
        assert span.attributes[attrs.COST_USD] <= span.attributes[attrs.COST_PROJECTED_USD]


# -- audio output ------------------------------------------------------------------------------
AUDIO_MINI = "openai/gpt-4o-mini-audio-preview"
AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_audio_output_is_projected_and_settled_at_the_audio_rate(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any,
    monkeypatch: pytest.MonkeyPatch, asynchronous: bool,
) -> None:  # fmt: skip
    limit = 0.01
    processor = make_processor(max_usd=limit)
    monkeypatch.setattr(fake, "default_output_tokens", 5000)  # the module's server: restored
    # 2,000 output tokens cost $0.0012 as text but $0.04 as audio (the fake bills every output
    # token of a spoken reply at the audio rate): only the audio rate brings the cap down.
    kwargs = _chat_kwargs(fake, model=AUDIO_MINI, max_completion_tokens=2000, **AUDIO)
    if asynchronous:
        reply = asyncio.run(litellm.acompletion(**kwargs))
    else:
        reply = litellm.completion(**kwargs)
    billed = fake.stats()["billed_nanos"]
    assert 0 < billed <= _nanos(limit)
    cap = fake.last_call.body["max_completion_tokens"]
    assert 16 <= cap < 2000
    assert fake.last_call.output_tokens == cap == reply.usage.completion_tokens_details.audio_tokens
    a = _only_span(exporter).attributes
    assert a[attrs.GEN_AI_REQUEST_MAX_TOKENS] == cap
    assert _nanos(a[attrs.COST_USD]) == billed  # settled from the audio tokens it reported
    assert ledger(processor) == (billed, 0)


def test_usage_reader_reads_audio_tokens_and_the_reported_cost() -> None:
    from litellm.types.utils import ModelResponse, Usage

    from otel_budget.instrumentation.litellm.response import (
        COST_PROVIDER_REPORTED_USD,
        litellm_usage,
        result_attributes,
    )
    from otel_budget.pricing import TokenUsage

    usage = Usage(
        prompt_tokens=1000, completion_tokens=700, total_tokens=1700,
        prompt_tokens_details={"cached_tokens": 100, "audio_tokens": 400},
        completion_tokens_details={"reasoning_tokens": 0, "audio_tokens": 600},
    )  # fmt: skip
    assert litellm_usage(usage) == TokenUsage(
        input_tokens=1000, output_tokens=700, cache_read_tokens=100, input_audio_tokens=400,
        output_audio_tokens=600,
    )  # fmt: skip
    # A cost the provider reported (OpenRouter's usage.cost) is recorded, never garbage.
    reply = ModelResponse(usage=Usage(prompt_tokens=10, completion_tokens=5, cost=0.00042))
    assert result_attributes(reply)[COST_PROVIDER_REPORTED_USD] == 0.00042
    reply._hidden_params = {"additional_headers": {"llm_provider-x-litellm-response-cost": "0.5"}}
    reply.usage.cost = float("nan")
    assert result_attributes(reply)[COST_PROVIDER_REPORTED_USD] == 0.5
    reply._hidden_params = {}
    assert COST_PROVIDER_REPORTED_USD not in result_attributes(reply)
    assert COST_PROVIDER_REPORTED_USD not in result_attributes({"usage": {"cost": True}})


# -- the event loop ------------------------------------------------------------------------------
class _AsyncOnlyStorage(MemoryStorage):
    """Records every blocking ledger call; its coroutines do not go through them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocking: list[str] = []

    def reserve_up_to(self, *args: Any) -> Any:
        self.blocking.append("reserve_up_to")
        return MemoryStorage.reserve_up_to(self, *args)

    def commit(self, *args: Any) -> Any:
        self.blocking.append("commit")
        return MemoryStorage.commit(self, *args)

    def release(self, *args: Any) -> Any:
        self.blocking.append("release")
        return MemoryStorage.release(self, *args)

    def charge(self, *args: Any) -> Any:
        self.blocking.append("charge")
        return MemoryStorage.charge(self, *args)

    async def areserve_up_to(self, *args: Any) -> Any:
        return MemoryStorage.reserve_up_to(self, *args)

    async def areserve(self, lease_id: Any, scopes: Any, amount: int, pause_keys: Any = ()) -> Any:
        return MemoryStorage.reserve_up_to(self, lease_id, scopes, amount, amount, pause_keys)

    async def acommit(self, *args: Any) -> Any:
        return MemoryStorage.commit(self, *args)

    async def arelease(self, *args: Any) -> Any:
        return MemoryStorage.release(self, *args)

    async def acharge(self, *args: Any) -> Any:
        return MemoryStorage.charge(self, *args)


def test_async_calls_never_block_the_event_loop_on_the_ledger(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    storage = _AsyncOnlyStorage()
    processor = make_processor(max_usd=1, storage=storage)

    async def calls() -> None:
        await litellm.acompletion(**_chat_kwargs(fake))
        await litellm.aembedding(model=EMBED, input=["x"], api_base=fake.openai_base_url, api_key="x")
        await litellm.completion(**_chat_kwargs(fake), acompletion=True)
        fake.script(Behaviour(status=400))
        with pytest.raises(Exception) as info:
            await litellm.acompletion(**_chat_kwargs(fake))
        assert not isinstance(info.value, BudgetExceededError)

    asyncio.run(calls())
    assert storage.blocking == []
    spans = _llm_spans(exporter)
    assert len(spans) == 4
    billed = fake.stats()["billed_nanos"]
    assert sum(_nanos(s.attributes.get(attrs.COST_USD, 0)) for s in spans) == billed > 0
    assert ledger(processor) == (billed, 0)


# -- exactly once ------------------------------------------------------------------------------
def _embed_through_the_openai_sdk(server: FakeLLMServer) -> Any:
    # With encoding_format, litellm calls openai's Embeddings.create (the metered SDK method);
    # its chat route posts through the SDK client without it.
    return litellm.embedding(model=EMBED, input=["nested"], encoding_format="float",
                             api_base=server.openai_base_url, api_key="x")  # fmt: skip


def test_exactly_once_with_the_openai_instrumentor_also_active(
    make_processor: Any, exporter: Any, fake: FakeLLMServer
) -> None:
    from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor

    make_processor()
    openai_instrumentor = OpenAIBudgetInstrumentor()
    openai_instrumentor.instrument()
    try:
        # Control: without the litellm instrumentor, the openai one meters that nested call.
        _embed_through_the_openai_sdk(fake)
        control = _only_span(exporter)
        assert control.instrumentation_scope.name == "otel_budget.instrumentation.openai"
        exporter.clear()
        fake.reset_stats()

        instrumentor = LiteLLMBudgetInstrumentor()
        instrumentor.instrument()
        try:
            with budget(max_usd=1) as run:
                _embed_through_the_openai_sdk(fake)
                litellm.completion(**_chat_kwargs(fake))
                list(litellm.completion(**_chat_kwargs(fake, stream=True)))

                async def calls() -> None:
                    await litellm.aembedding(model=EMBED, input=["nested"], encoding_format="float",
                                             api_base=fake.openai_base_url, api_key="x")  # fmt: skip
                    await litellm.acompletion(**_chat_kwargs(fake))

                asyncio.run(calls())
        finally:
            instrumentor.uninstrument()
    finally:
        openai_instrumentor.uninstrument()
    spans = _llm_spans(exporter)
    assert len(spans) == 5 == fake.stats()["billed_requests"]
    assert {s.instrumentation_scope.name for s in spans} == {"otel_budget.instrumentation.litellm"}
    report = run.report()
    assert report.calls == 5
    assert _nanos(report.total_usd) == fake.stats()["billed_nanos"]
    assert IN_METERED_CALL.get() is None


# -- entry points ------------------------------------------------------------------------------
def test_name_bound_before_instrumenting_is_metered(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    assert early_completion is not litellm.completion  # the public name is wrapped now
    early_completion(**_chat_kwargs(fake))
    span = _only_span(exporter)
    assert _nanos(span.attributes[attrs.COST_USD]) == fake.stats()["billed_nanos"]


def test_positional_arguments_and_the_acompletion_flag(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    litellm.completion(MODEL, MESSAGES, api_base=fake.openai_base_url, api_key="x", max_tokens=12)
    coroutine = litellm.completion(MODEL, MESSAGES, api_base=fake.openai_base_url, api_key="x",
                                   acompletion=True)  # fmt: skip
    asyncio.run(coroutine)
    spans = _llm_spans(exporter)
    assert [s.attributes[attrs.GEN_AI_REQUEST_MODEL] for s in spans] == ["gpt-4o-mini"] * 2
    assert spans[0].attributes[attrs.GEN_AI_REQUEST_MAX_TOKENS] == 12
    billed = fake.stats()["billed_nanos"]
    assert sum(_nanos(s.attributes[attrs.COST_USD]) for s in spans) == billed


def test_text_completion_batch_and_client_entry_points_are_metered_once(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    base = {"api_base": fake.openai_base_url, "api_key": "x"}
    litellm.text_completion(model=MODEL, prompt="hello there", **base)
    litellm.batch_completion(model=MODEL, messages=[MESSAGES, MESSAGES], **base)
    client = litellm.LiteLLM(api_key="x", base_url=fake.openai_base_url)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    spans = _llm_spans(exporter)
    assert len(spans) == 4 == fake.stats()["billed_requests"]
    billed = fake.stats()["billed_nanos"]
    assert sum(_nanos(s.attributes[attrs.COST_USD]) for s in spans) == billed


def test_router_calls_are_metered_per_deployment_call(
    make_processor: Any, exporter: Any, fake: FakeLLMServer, instrumented: Any
) -> None:
    make_processor(max_usd=1)
    router = litellm.Router(model_list=[{"model_name": "cheap", "litellm_params": {
        "model": MODEL, "api_base": fake.openai_base_url, "api_key": "x"}}])  # fmt: skip
    router.completion(model="cheap", messages=MESSAGES)

    async def run() -> None:
        await router.acompletion(model="cheap", messages=MESSAGES)
        stream = await router.acompletion(model="cheap", messages=MESSAGES, stream=True)
        async for _chunk in stream:
            pass

    asyncio.run(run())
    spans = _llm_spans(exporter)
    assert [s.attributes[attrs.GEN_AI_REQUEST_MODEL] for s in spans] == ["gpt-4o-mini"] * 3
    billed = fake.stats()["billed_nanos"]
    assert sum(_nanos(s.attributes[attrs.COST_USD]) for s in spans) == billed > 0


def test_uninstrument_restores_litellm(make_processor: Any, exporter: Any, fake: FakeLLMServer) -> None:
    from litellm.chat_completions import dispatch

    names = ("completion", "acompletion", "embedding", "aembedding")
    originals = {(module, name): getattr(module, name) for module in (litellm, litellm.main) for name in names}
    python_completion = dispatch._PYTHON_COMPLETION
    instrumentor = LiteLLMBudgetInstrumentor()
    instrumentor.instrument()
    for (module, name), original in originals.items():
        assert getattr(module, name) is not original
    assert dispatch._PYTHON_COMPLETION is not python_completion
    instrumentor.uninstrument()
    for (module, name), original in originals.items():
        assert getattr(module, name) is original
    assert dispatch._PYTHON_COMPLETION is python_completion
    make_processor(max_usd=0.0000001)
    litellm.completion(**_chat_kwargs(fake))  # neither traced nor refused
    early_completion(**_chat_kwargs(fake))
    assert _llm_spans(exporter) == []
    assert fake.stats()["billed_requests"] == 2


def test_instrument_before_import_wraps_on_import(
    monkeypatch: pytest.MonkeyPatch, make_processor: Any, exporter: Any, fake: FakeLLMServer
) -> None:
    import wrapt

    original = litellm.completion
    module = sys.modules["litellm"]
    monkeypatch.delitem(sys.modules, "litellm")  # as if not imported yet
    instrumentor = LiteLLMBudgetInstrumentor()
    instrumentor.instrument()
    try:
        assert "litellm" not in sys.modules  # instrument() never imports litellm
        assert litellm.completion is original
        monkeypatch.setitem(sys.modules, "litellm", module)
        wrapt.notify_module_loaded(module)  # what the import system does once it is imported
        assert litellm.completion is not original
        make_processor(max_usd=1)
        litellm.completion(**_chat_kwargs(fake))
        assert len(_llm_spans(exporter)) == 1
    finally:
        instrumentor.uninstrument()
    assert litellm.completion is original


def test_a_compromised_litellm_release_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import importlib.metadata

    from otel_budget.instrumentation import litellm as module

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.82.8")
    with caplog.at_level("WARNING", logger="otel_budget"):
        module._warn_if_compromised()
    assert "compromised release" in caplog.text
    caplog.clear()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.109.1")
    module._warn_if_compromised()
    assert caplog.text == ""


# -- provider names ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "custom", "expected"),
    [
        ("openai/gpt-4o-mini", None, ("openai", "gpt-4o-mini", "openai")),
        ("gpt-4o-mini", None, ("openai", "gpt-4o-mini", "openai")),
        ("anthropic/claude-sonnet-4-5", None, ("anthropic", "claude-sonnet-4-5", "anthropic")),
        ("claude-sonnet-4-5", None, ("anthropic", "claude-sonnet-4-5", "anthropic")),
        ("azure/my-deployment", None, ("azure.ai.openai", "my-deployment", "azure")),
        ("bedrock/anthropic.claude-3-haiku-20240307-v1:0", None,
         ("aws.bedrock", "anthropic.claude-3-haiku-20240307-v1:0", "bedrock")),
        ("vertex_ai/gemini-2.0-flash", None, ("gcp.vertex_ai", "gemini-2.0-flash", "vertex_ai")),
        ("gemini/gemini-2.0-flash", None, ("gcp.gemini", "gemini-2.0-flash", "gemini")),
        ("mistral/mistral-large-latest", None, ("mistral_ai", "mistral-large-latest", "mistral")),
        ("groq/llama-3.1-8b-instant", None, ("groq", "llama-3.1-8b-instant", "groq")),
        ("xai/grok-3", None, ("x_ai", "grok-3", "xai")),
        ("deepseek/deepseek-chat", None, ("deepseek", "deepseek-chat", "deepseek")),
        ("cohere/command-r", None, ("cohere", "command-r", "cohere")),
        ("openrouter/anthropic/claude-3.5-sonnet", None,
         ("openrouter", "anthropic/claude-3.5-sonnet", "openrouter")),
        ("llama3", "ollama", ("ollama", "llama3", "ollama")),
        ("groq/llama3", "groq", ("groq", "llama3", "groq")),
        ("meta-llama/Llama-3-8b", None, ("litellm", "meta-llama/Llama-3-8b", None)),
    ],
)  # fmt: skip
def test_provider_resolution(model: str, custom: str | None, expected: tuple[Any, ...]) -> None:
    assert resolve_provider(model, custom) == expected
