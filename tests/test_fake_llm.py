"""The embedded fake LLM server, driven by the real openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Literal

import pytest

from otel_budget.testing import Behaviour, FakeLLMServer, count_input_tokens

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
pydantic = pytest.importorskip("pydantic")

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

HELLO = [{"role": "user", "content": "hello there"}]  # 11 bytes // 4 + 3 = 5 input tokens
CLAUDE = "claude-sonnet-4-5"


@pytest.fixture
def server():
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def oai(server):
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield client
    client.close()


@pytest.fixture
def ant(server):
    client = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test", max_retries=0)
    yield client
    client.close()


def nanos(tokens_in: int, tokens_out: int, price_in: float, price_out: float) -> int:
    """Expected bill for exact cases (prices in USD/MTok -> nano-USD)."""
    value = tokens_in * price_in * 1000 + tokens_out * price_out * 1000
    assert value == int(value)
    return int(value)


# --- token counting


def test_count_input_tokens_is_the_documented_formula():
    chat = {
        "messages": [
            {"role": "system", "content": "abcd" * 10},
            {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]},
        ]
    }
    assert count_input_tokens(chat, "chat") == (40 + 8) // 4 + 2 * 3
    anth = {"system": "x" * 8, "messages": [{"role": "user", "content": "y" * 16}]}
    assert count_input_tokens(anth, "messages") == 24 // 4 + 2 * 3
    assert (
        count_input_tokens({"input": "z" * 8, "instructions": "be brief"}, "responses")
        == 16 // 4 + 2 * 3
    )
    assert count_input_tokens({"input": ["abcdefgh", "a", [1, 2, 3]]}, "embeddings") == 2 + 1 + 3
    assert count_input_tokens({"messages": []}, "chat") == 1  # never zero


# --- OpenAI chat completions


def test_chat_json_usage_and_billing(server, oai):
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "gpt-4o-mini"
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content.startswith("This is a fake reply")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        5,
        20,
        25,
    )
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    stats = server.stats()
    assert stats["requests"] == stats["billed_requests"] == 1
    assert (stats["input_tokens"], stats["output_tokens"]) == (5, 20)
    assert stats["billed_nanos"] == nanos(5, 20, 0.15, 0.60) == 12_750
    assert stats["billed_usd"] == pytest.approx(12_750e-9)
    assert stats["by_path"]["/v1/chat/completions"]["billed_nanos"] == 12_750
    assert stats["by_model"]["gpt-4o-mini"]["requests"] == 1
    call = server.last_call
    assert call.body["messages"] == HELLO and call.outcome == "ok" and call.billed_nanos == 12_750


@pytest.mark.parametrize("cap_param", ["max_tokens", "max_completion_tokens"])
def test_chat_output_cap_gives_finish_reason_length(server, oai, cap_param):
    reply = oai.chat.completions.create(model="gpt-4o", messages=HELLO, **{cap_param: 7})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7
    assert len(reply.choices[0].message.content.split()) == 7  # one word per token
    assert server.stats()["billed_nanos"] == nanos(5, 7, 2.5, 10)
    # under the cap: the configured count, finish_reason "stop"
    server.default_output_tokens = 3
    reply = oai.chat.completions.create(model="gpt-4o", messages=HELLO, **{cap_param: 7})
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("stop", 3)


def test_chat_stream_with_include_usage(server, oai):
    stream = oai.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 20
    assert (
        sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 5
    )  # split across chunks
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == 5
    assert server.stats()["billed_nanos"] == nanos(5, 20, 0.15, 0.60)


def test_chat_stream_without_include_usage_is_billed_all_the_same(server, oai):
    chunks = list(
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True, max_tokens=4)
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.stats()["output_tokens"] == 4
    assert server.last_call.stream is True


def test_chat_async_json_and_stream(server):
    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.openai_base_url, api_key="t", max_retries=0
        ) as client:
            reply = await client.chat.completions.create(
                model="gpt-4o-mini", messages=HELLO, max_tokens=3
            )
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            return reply, chunks

    reply, chunks = asyncio.run(main())
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == 25
    assert server.stats()["billed_requests"] == 2


def test_chat_n_choices_reasoning_and_cache(server, oai):
    server.script(
        Behaviour(output_tokens=10, reasoning_tokens=30, cached_tokens=100, cache_creation_tokens=8)
    )
    reply = oai.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, max_completion_tokens=35, n=2
    )
    assert len(reply.choices) == 2 and {c.finish_reason for c in reply.choices} == {"length"}
    usage = reply.usage
    assert usage.completion_tokens == 2 * 35  # reasoning counts in the output, per choice
    assert usage.completion_tokens_details.reasoning_tokens == 2 * 30
    assert usage.prompt_tokens == 5 + 100 + 8 and usage.prompt_tokens_details.cached_tokens == 100
    assert len(reply.choices[0].message.content.split()) == 5
    stats = server.stats()
    assert (stats["input_tokens"], stats["output_tokens"]) == (113, 70)
    assert (stats["cache_read_tokens"], stats["cache_write_tokens"], stats["reasoning_tokens"]) == (
        100,
        8,
        60,
    )


def test_chat_parse_structured_output(server, oai):
    class Weather(pydantic.BaseModel):
        city: str
        temp_c: float
        tags: list[str]
        kind: Literal["sunny", "rainy"]
        note: int | None

    completion = oai.chat.completions.parse(
        model="gpt-4o-mini", messages=HELLO, response_format=Weather
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.kind == "sunny"
    assert completion.usage.completion_tokens == 20
    # capped structured output is cut, and the SDK raises as with the real API
    with pytest.raises(openai.LengthFinishReasonError):
        oai.chat.completions.parse(
            model="gpt-4o-mini", messages=HELLO, response_format=Weather, max_tokens=5
        )


def test_usage_false_hides_usage_but_bills(server, oai):
    server.script(Behaviour(usage=False), Behaviour(usage=False))
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert reply.usage is None
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in chunks) and chunks[-1].choices
    assert server.stats()["billed_nanos"] == 2 * nanos(5, 20, 0.15, 0.60)


def test_legacy_completions_and_models(server, oai):
    reply = oai.completions.create(model="gpt-4o-mini", prompt="abcdefgh")  # default cap 16
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16
    assert reply.usage.prompt_tokens == 2
    assert "gpt-4o-mini" in {m.id for m in oai.models.list()}


# --- OpenAI Responses and embeddings


def test_responses_json(server, oai):
    response = oai.responses.create(model="gpt-4o", input="abcdefgh", instructions="be brief")
    assert response.status == "completed" and response.model == "gpt-4o"
    assert response.output_text.startswith("This is a fake reply")
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (10, 20, 30)
    assert (
        usage.input_tokens_details.cached_tokens == 0
        and usage.output_tokens_details.reasoning_tokens == 0
    )
    capped = oai.responses.create(model="gpt-4o", input="abcdefgh", max_output_tokens=16)
    assert capped.status == "incomplete" and capped.incomplete_details.reason == "max_output_tokens"
    assert capped.usage.output_tokens == 16
    assert server.stats()["billed_nanos"] == nanos(10, 20, 2.5, 10) + nanos(5, 16, 2.5, 10)


def test_responses_stream_raw_and_helper(server, oai):
    server.script(Behaviour(cached_tokens=4, reasoning_tokens=6))
    events = list(oai.responses.create(model="gpt-4o", input="hi", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") > 5
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.usage.input_tokens == 3 + 4 and final.usage.input_tokens_details.cached_tokens == 4
    assert (
        final.usage.output_tokens == 26 and final.usage.output_tokens_details.reasoning_tokens == 6
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text
    with oai.responses.stream(model="gpt-4o", input="hi", max_output_tokens=50) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        response = stream.get_final_response()
    assert "".join(deltas) == response.output_text and response.usage.output_tokens == 20
    # a capped stream ends with response.incomplete, as the real API's does
    events = list(
        oai.responses.create(model="gpt-4o", input="hi", stream=True, max_output_tokens=16)
    )
    assert (
        events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 16
    )


def test_responses_parse_and_async(server):
    class Answer(pydantic.BaseModel):
        answer: str
        confidence: float

    async def main():
        async with openai.AsyncOpenAI(
            base_url=server.openai_base_url, api_key="t", max_retries=0
        ) as client:
            parsed = await client.responses.parse(
                model="gpt-4o-mini", input="q?", text_format=Answer
            )
            stream = await client.responses.create(model="gpt-4o-mini", input="q?", stream=True)
            kinds = [event.type async for event in stream]
            return parsed, kinds

    parsed, kinds = asyncio.run(main())
    assert isinstance(parsed.output_parsed, Answer)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"


def test_embeddings(server, oai):
    default = oai.embeddings.create(
        model="text-embedding-3-small", input=["abcdefgh", "hi"]
    )  # SDK asks base64
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8 and isinstance(default.data[0].embedding[0], float)
    assert default.usage.prompt_tokens == default.usage.total_tokens == 2 + 1
    floats = oai.embeddings.create(
        model="text-embedding-3-small", input="abcdefgh", encoding_format="float", dimensions=4
    )
    assert len(floats.data[0].embedding) == 4
    again = oai.embeddings.create(
        model="text-embedding-3-small", input="abcdefgh", encoding_format="float", dimensions=4
    )
    assert again.data[0].embedding == floats.data[0].embedding  # deterministic
    assert server.last_call.body["encoding_format"] == "float"
    assert server.stats()["output_tokens"] == 0
    assert server.stats()["billed_nanos"] == nanos(3 + 2 + 2, 0, 0.02, 0)


# --- Anthropic messages


def test_anthropic_json_and_cache_semantics(server, ant):
    server.prices[CLAUDE] = (3.0, 15.0, 0.3, 3.75)  # cache read / write prices
    server.script(Behaviour(cached_tokens=100, cache_creation_tokens=40))
    message = ant.messages.create(
        model=CLAUDE,
        max_tokens=100,
        system="x" * 8,
        messages=[{"role": "user", "content": "y" * 16}],
    )
    assert message.type == "message" and message.role == "assistant" and message.model == CLAUDE
    assert message.stop_reason == "end_turn" and message.content[0].type == "text"
    usage = message.usage
    assert usage.input_tokens == 12  # excluding the cache, as Anthropic reports it
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (100, 40)
    assert usage.output_tokens == 20
    expected = 12 * 3000 + 100 * 300 + 40 * 3750 + 20 * 15000
    assert server.stats()["billed_nanos"] == expected
    assert server.stats()["input_tokens"] == 152
    capped = ant.messages.create(
        model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 5
    assert len(capped.content[0].text.split()) == 5


def test_anthropic_requires_max_tokens(server):
    request = urllib.request.Request(
        server.anthropic_base_url + "/v1/messages",
        method="POST",
        data=json.dumps({"model": CLAUDE, "messages": HELLO}).encode(),
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    body = json.loads(info.value.read())
    assert info.value.code == 400 and body["type"] == "error"
    assert (
        body["error"]["type"] == "invalid_request_error"
        and "max_tokens" in body["error"]["message"]
    )
    assert server.stats()["billed_requests"] == 0


def test_anthropic_stream_helper_and_raw_events(server, ant):
    with ant.messages.stream(model=CLAUDE, max_tokens=7, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and len(text.split()) == 7
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 7
    assert final.usage.input_tokens == 5
    raw = list(ant.messages.create(model=CLAUDE, max_tokens=100, messages=HELLO, stream=True))
    kinds = [e.type for e in raw]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert raw[0].message.usage.input_tokens == 5
    assert raw[-2].delta.stop_reason == "end_turn" and raw[-2].usage.output_tokens == 20
    assert server.stats()["billed_nanos"] == nanos(5, 7, 3, 15) + nanos(5, 20, 3, 15)


def test_anthropic_async_json_and_stream(server):
    async def main():
        async with anthropic.AsyncAnthropic(
            base_url=server.anthropic_base_url, api_key="t", max_retries=0
        ) as c:
            message = await c.messages.create(model=CLAUDE, max_tokens=50, messages=HELLO)
            async with c.messages.stream(model=CLAUDE, max_tokens=50, messages=HELLO) as stream:
                text = "".join([t async for t in stream.text_stream])
                final = await stream.get_final_message()
            return message, text, final

    message, text, final = asyncio.run(main())
    assert message.usage.output_tokens == 20 and final.content[0].text == text
    assert final.usage.output_tokens == 20 and server.stats()["billed_requests"] == 2


def test_anthropic_count_tokens_is_not_billed(server, ant):
    count = ant.messages.count_tokens(model=CLAUDE, messages=HELLO)
    assert count.input_tokens == 5
    server.script(Behaviour(status=429))  # count_tokens does not consume scripted behaviours
    ant.messages.count_tokens(model=CLAUDE, messages=HELLO)
    assert server.pending_behaviours == 1 and server.stats()["billed_requests"] == 0


# --- errors, retries, broken streams


def test_scripted_openai_errors(server, oai):
    server.script(Behaviour(status=429, retry_after=2), Behaviour(status=500))
    with pytest.raises(openai.RateLimitError) as info:
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers["retry-after"] == "2"
    assert info.value.response.headers["retry-after-ms"] == "2000"
    assert info.value.body["message"]
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
    assert info.value.status_code == 500 and info.value.type == "server_error"
    stats = server.stats()
    assert (
        stats["requests"],
        stats["errors"],
        stats["billed_requests"],
        stats["billed_nanos"],
    ) == (2, 2, 0, 0)


def test_scripted_anthropic_errors(server, ant):
    server.script(Behaviour(status=429), Behaviour(status=500), Behaviour(status=529))
    with pytest.raises(anthropic.RateLimitError) as info:
        ant.messages.create(model=CLAUDE, max_tokens=10, messages=HELLO)
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert "retry-after" in info.value.response.headers
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.create(model=CLAUDE, max_tokens=10, messages=HELLO)
    with pytest.raises(anthropic.OverloadedError):
        with ant.messages.stream(model=CLAUDE, max_tokens=10, messages=HELLO) as stream:
            stream.get_final_message()
    assert server.stats()["billed_nanos"] == 0 and server.stats()["errors"] == 3


def test_sdk_retries_honour_retry_after(server):
    server.script(Behaviour(status=429, retry_after=0.01), Behaviour(status=503, retry_after=0.01))
    with openai.OpenAI(base_url=server.openai_base_url, api_key="t", max_retries=2) as client:
        started = time.monotonic()
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert reply.usage.completion_tokens == 20 and time.monotonic() - started < 2
    assert [c.status for c in server.calls()] == [429, 503, 200]
    assert server.calls()[2].headers["x-stainless-retry-count"] == "2"
    assert server.stats()["billed_requests"] == 1


def test_broken_stream_raises_and_bills_what_was_sent(server, oai, ant):
    server.script(Behaviour(break_stream_after=3))  # role chunk + 2 one-token deltas
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True):
            received.append(chunk)
    assert len(received) == 3
    call = server.last_call
    assert (call.outcome, call.input_tokens, call.output_tokens) == ("broken_stream", 5, 2)
    assert call.billed_nanos == nanos(5, 2, 0.15, 0.60)
    # message_start, content_block_start, ping, 1 delta; anthropic does not wrap the transport error
    server.script(Behaviour(break_stream_after=4))
    with pytest.raises((anthropic.APIConnectionError, Exception)) as info:
        with ant.messages.stream(model=CLAUDE, max_tokens=100, messages=HELLO) as stream:
            for _ in stream:
                pass
    assert "incomplete chunked read" in str(info.value) or isinstance(
        info.value, anthropic.APIConnectionError
    )
    assert (server.last_call.outcome, server.last_call.output_tokens) == ("broken_stream", 1)
    assert server.stats()["broken_streams"] == 2


def test_stream_error_event_midway(server, oai, ant):
    server.script(Behaviour(stream_error_after=3), Behaviour(stream_error_after=4))
    with pytest.raises(openai.APIError) as info:
        list(oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert "error" in info.value.message
    with pytest.raises(anthropic.APIStatusError) as info:
        with ant.messages.stream(model=CLAUDE, max_tokens=100, messages=HELLO) as stream:
            stream.get_final_message()
    assert info.value.body["error"]["type"] == "overloaded_error"
    assert [c.output_tokens for c in server.calls()] == [2, 1]
    assert server.stats()["stream_errors"] == 2


def test_client_disconnecting_mid_stream_is_quiet_and_billed_partially(server, oai, capfd):
    server.script(Behaviour(output_tokens=50, chunk_delay_s=0.01))
    server.max_stream_chunks = 50
    stream = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
    for index, _ in enumerate(stream):
        if index == 2:
            break
    stream.close()
    assert server.wait_idle(3)
    call = server.last_call
    assert call.outcome == "client_disconnect" and 2 <= call.output_tokens < 50
    # the server goes on serving, on new connections
    assert (
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO).usage.completion_tokens
        == 20
    )
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_dropped_response_is_billed_in_full(server, oai):
    server.script(Behaviour(drop_connection=True))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert server.stats()["billed_nanos"] == nanos(5, 20, 0.15, 0.60)
    assert server.stats()["dropped_responses"] == 1


# --- latency, timeouts, concurrency


def test_latency_and_scripted_delay():
    with FakeLLMServer(latency_s=0.15) as server:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0) as client:
            started = time.monotonic()
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            assert time.monotonic() - started >= 0.15
            server.latency_s = 0.0
            server.script(Behaviour(delay_s=1.0))
            started = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                client.with_options(timeout=0.1).chat.completions.create(
                    model="gpt-4o-mini", messages=HELLO
                )
            assert time.monotonic() - started < 0.8  # not the 1 s delay; slack for CI load
        assert server.wait_idle(3)
        # the client gave up before the answer was ready: not billed
        assert server.calls()[-1].outcome == "client_disconnect"
        assert server.stats()["billed_requests"] == 1


def test_keep_alive_and_concurrency(server):
    server.latency_s = 0.05
    with openai.OpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0) as client:
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert server.stats()["connections"] == 1  # HTTP/1.1 keep-alive
        errors: list[BaseException] = []

        def worker():
            try:
                for _ in range(3):
                    client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and server.wait_idle(3)
    stats = server.stats()
    assert stats["billed_requests"] == 39 and stats["max_in_flight"] > 1 and stats["in_flight"] == 0
    assert (
        stats["billed_nanos"]
        == 39 * nanos(5, 20, 0.15, 0.60)
        == sum(c.billed_nanos for c in server.calls())
    )


# --- scripting, pricing, misc


def test_script_fifo_path_filter_default_and_reset(server, oai, ant):
    server.script(
        Behaviour(status=500, path="messages"),
        Behaviour(output_tokens=2),
        Behaviour(output_tokens=3),
    )
    assert (
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO).usage.completion_tokens
        == 2
    )
    assert (
        oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO).usage.completion_tokens
        == 3
    )
    with pytest.raises(anthropic.InternalServerError):
        ant.messages.create(model=CLAUDE, max_tokens=10, messages=HELLO)
    assert server.pending_behaviours == 0
    server.default_behaviour = Behaviour(output_tokens=1)
    server.reply_text = "pong"
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert reply.choices[0].message.content == "pong" and reply.usage.completion_tokens == 1
    server.script(
        Behaviour(text='{"exact": true}', output_tokens=4, response_model="gpt-4o-mini-2024-07-18")
    )
    reply = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert (
        reply.choices[0].message.content == '{"exact": true}'
        and reply.model == "gpt-4o-mini-2024-07-18"
    )
    server.reset_stats()
    assert server.stats()["requests"] == 0 and server.calls() == []


def test_prices_override_prefix_match_rounding_and_unpriced():
    with FakeLLMServer(prices={"tiny": (0.0001, 0.0)}) as server:
        with openai.OpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0) as client:
            server.script(Behaviour(input_tokens=1, output_tokens=0))
            client.chat.completions.create(model="tiny", messages=HELLO)
            assert server.stats()["billed_nanos"] == 1  # 0.1 nano-USD, rounded up
            client.chat.completions.create(
                model="gpt-4o-2024-08-06", messages=HELLO
            )  # priced as gpt-4o
            assert server.stats()["by_model"]["gpt-4o-2024-08-06"]["billed_nanos"] == nanos(
                5, 20, 2.5, 10
            )
            client.chat.completions.create(model="mystery-model", messages=HELLO)
            stats = server.stats()
            assert (
                stats["unpriced_requests"] == 1
                and stats["by_model"]["mystery-model"]["billed_nanos"] == 0
            )
            assert stats["by_model"]["mystery-model"]["output_tokens"] == 20


def test_unknown_paths_answer_404_json(server, oai):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server.url + "/v1/nope", timeout=5)
    assert (
        info.value.code == 404 and json.loads(info.value.read())["error"]["code"] == "unknown_url"
    )
    request = urllib.request.Request(
        server.url + "/v1/nope", headers={"anthropic-version": "2023-06-01"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert json.loads(info.value.read())["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        oai.post("/nope", cast_to=object, body={})
    assert server.stats()["errors"] == 3 and server.stats()["billed_requests"] == 0


# --- lifecycle


def test_stop_is_clean_frees_the_port_and_interrupts_waits():
    before = set(threading.enumerate())
    server = FakeLLMServer().start()
    port = server.port
    outcome: list[BaseException] = []
    client = openai.OpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO
    )  # leaves a keep-alive connection
    server.script(Behaviour(delay_s=30))

    def slow_call():
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=slow_call)
    caller.start()
    deadline = time.monotonic() + 3
    while server.stats()["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    caller.join(5)
    client.close()
    assert outcome and isinstance(outcome[0], openai.APIConnectionError)
    assert not server.running
    server.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    leftovers = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert leftovers == []
    with FakeLLMServer(port=port) as again:  # the port can be bound again
        assert again.port == port
    with pytest.raises(RuntimeError):
        server.start()


def test_max_lifetime_stops_the_server(caplog):
    server = FakeLLMServer(max_lifetime_s=0.1).start()
    deadline = time.monotonic() + 3
    while server.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.running
    assert "max_lifetime_s" in caplog.text


def test_module_has_no_third_party_imports():
    code = (
        "import sys, otel_budget.testing.fake_llm\n"
        "bad = {'pytest', 'openai', 'anthropic', 'httpx2', 'httpx'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- scripted tool calls and thinking (the parity scenarios)

WEATHER = [{"name": "get_weather", "arguments": {"city": "Paris"}}]


def test_tool_calls_in_chat_plain_and_streamed(server, oai):
    server.script(Behaviour(tool_calls=WEATHER))
    choice = oai.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    server.script(Behaviour(tool_calls=WEATHER))
    chunks = list(oai.chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert [d[0].function.name for d in deltas] == ["get_weather"]
    assert chunks[-1].usage.completion_tokens == server.default_output_tokens  # still billed


def test_tool_calls_in_responses_plain_and_streamed(server, oai):
    server.script(Behaviour(tool_calls=WEATHER))
    (item,) = oai.responses.create(model="gpt-4o-mini", input="hi").output
    assert (item.type, item.name, item.arguments) == ("function_call", "get_weather", '{"city":"Paris"}')
    server.script(Behaviour(tool_calls=WEATHER))
    with oai.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        (item,) = stream.get_final_response().output
    assert item.type == "function_call" and item.call_id.startswith("call_")


def test_tool_use_and_thinking_in_anthropic_plain_and_streamed(server, ant):
    for streamed in (False, True):
        server.script(Behaviour(tool_calls=WEATHER, thinking="Let me think."))
        kwargs = {"model": CLAUDE, "max_tokens": 100, "messages": HELLO}
        if streamed:
            with ant.messages.stream(**kwargs) as stream:
                message = stream.get_final_message()
        else:
            message = ant.messages.create(**kwargs)
        assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
        assert message.content[0].thinking == "Let me think."
        assert (message.content[2].name, message.content[2].input) == ("get_weather", {"city": "Paris"})
        assert message.stop_reason == "tool_use"
