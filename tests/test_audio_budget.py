"""Audio output through the real openai SDK against ``FakeLLMServer``: projected and settled at
the audio rate, so the budget holds (the text rate is 33x lower for gpt-4o-mini-audio-preview).

The fake bills every output token of a request that asks for audio at the model's audio rate
and reports it as ``completion_tokens_details.audio_tokens``, as OpenAI does.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from otel_budget import attributes as attrs
from otel_budget.instrumentation._call import COST_OUTPUT_CAPPED
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.instrumentation.openai.response import chat_usage, responses_usage
from otel_budget.pricing import TokenUsage
from otel_budget.testing import FakeLLMServer
from otel_budget.tokens import estimate_input_tokens, wants_audio_output
from tests.helpers import StartRecorder, assert_settled_from_server, ledger, only_span

AUDIO_MINI = "gpt-4o-mini-audio-preview"
MESSAGES = [{"role": "user", "content": "Read me a long story."}]
AUDIO = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def instrumented() -> Iterator[OpenAIBudgetInstrumentor]:
    instrumentor = OpenAIBudgetInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    gc.collect()
    instrumentor.uninstrument()


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


def test_audio_output_stays_within_the_budget(
    setup: Any, client: Any, server: FakeLLMServer, starts: StartRecorder, exporter: Any
) -> None:
    budget = 10_000_000  # $0.01
    processor = setup(max_usd=budget / 1e9)
    server.default_output_tokens = 5000
    # 2,000 output tokens cost $0.0012 as text but $0.04 as audio: only the audio rate shows
    # that the cap must come down to fit the budget.
    reply = client.chat.completions.create(model=AUDIO_MINI, messages=MESSAGES, max_completion_tokens=2000, **AUDIO)
    assert reply.choices[0].message.audio is not None
    billed = server.stats()["billed_nanos"]
    assert billed <= budget
    cap = server.last_call.body["max_completion_tokens"]
    assert 16 <= cap < 2000
    assert server.last_call.output_tokens == cap == reply.usage.completion_tokens_details.audio_tokens
    span = only_span(exporter, f"chat {AUDIO_MINI}")
    assert span.attributes[COST_OUTPUT_CAPPED] == cap  # set before sending
    # Settled from the reported usage at the audio rate: the ledger holds what was billed.
    assert_settled_from_server(span, server)
    assert ledger(processor) == (billed, 0)
    # The largest cap that fits: one more audio token would not.
    inp = estimate_input_tokens(AUDIO_MINI, messages=MESSAGES).tokens

    def cost(out: int) -> int:
        usage = TokenUsage(input_tokens=inp, output_tokens=out, output_audio_tokens=out)
        return processor.prices.quote("openai", AUDIO_MINI, usage).nanos

    assert cost(cap) <= budget < cost(cap + 1)


def test_audio_output_stream_and_text_requests(
    setup: Any, client: Any, server: FakeLLMServer, exporter: Any
) -> None:
    budget = 10_000_000
    processor = setup(max_usd=budget / 1e9)
    server.default_output_tokens = 5000
    # Text only on the audio model: the text rate, no cap needed.
    client.chat.completions.create(model=AUDIO_MINI, messages=MESSAGES, max_completion_tokens=2000)
    assert server.last_call.body["max_completion_tokens"] == 2000
    assert server.last_call.billed_nanos < 2000 * 1_000
    # Then a stream with spoken output: capped to what is left, at the audio rate.
    stream = client.chat.completions.create(
        model=AUDIO_MINI, messages=MESSAGES, max_completion_tokens=2000, stream=True, **AUDIO
    )
    for _ in stream:
        pass
    assert server.last_call.body["max_completion_tokens"] < 2000
    billed = server.stats()["billed_nanos"]
    assert billed <= budget
    assert ledger(processor) == (billed, 0)


def test_audio_projection_refuses_what_it_cannot_afford(
    setup: Any, client: Any, server: FakeLLMServer
) -> None:
    from otel_budget import BudgetExceededError

    setup(max_usd=0.0002)  # 10 audio tokens at $20/MTok: fewer than min_output_tokens (16)
    with pytest.raises(BudgetExceededError):
        client.chat.completions.create(model=AUDIO_MINI, messages=MESSAGES, max_completion_tokens=2000, **AUDIO)
    assert server.stats()["requests"] == 0


def test_chat_usage_reads_audio_tokens() -> None:
    usage = {
        "prompt_tokens": 1000, "completion_tokens": 700,
        "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 400},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 600},
    }  # fmt: skip
    assert chat_usage(usage) == TokenUsage(
        input_tokens=1000, output_tokens=700, cache_read_tokens=100, input_audio_tokens=400,
        output_audio_tokens=600,
    )  # fmt: skip
    # Audio is inside the totals: not added again.
    assert chat_usage({"prompt_tokens": 10, "completion_tokens": 5}) == TokenUsage(input_tokens=10, output_tokens=5)
    bad = {"prompt_tokens": 10, "completion_tokens": 5, "completion_tokens_details": {"audio_tokens": "x"}}
    assert chat_usage(bad) == TokenUsage(input_tokens=10, output_tokens=5)
    assert responses_usage(
        {"input_tokens": 10, "output_tokens": 8, "output_tokens_details": {"audio_tokens": 8}}
    ) == TokenUsage(input_tokens=10, output_tokens=8, output_audio_tokens=8)


@pytest.mark.parametrize(
    ("params", "audio"),
    [
        ({}, False),
        ({"modalities": ["text"]}, False),
        ({"modalities": ["text", "audio"]}, True),
        ({"modalities": ("AUDIO",)}, True),
        ({"audio": {"voice": "alloy", "format": "wav"}}, True),
        ({"audio": None, "modalities": None}, False),
        ({"modalities": [object()]}, True),  # unreadable: the worst case
        ({"modalities": 5}, True),
    ],
)
def test_wants_audio_output(params: dict[str, Any], audio: bool) -> None:
    assert wants_audio_output(params) is audio


def test_attributes_of_an_audio_call(setup: Any, client: Any, server: FakeLLMServer, exporter: Any) -> None:
    setup(max_usd=1.0)
    client.chat.completions.create(model=AUDIO_MINI, messages=MESSAGES, max_completion_tokens=50, **AUDIO)
    span = only_span(exporter, f"chat {AUDIO_MINI}")
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 20  # the fake's default reply
    # 20 audio tokens at $20/MTok, the input at $0.15/MTok.
    assert span.attributes[attrs.COST_USD] == pytest.approx(server.last_call.billed_nanos / 1e9)
    assert server.last_call.billed_nanos >= 20 * 20_000
