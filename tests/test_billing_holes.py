"""Every response or attempt that may have been billed is charged, through the real SDKs.

    PYTHONPATH=src python -m pytest tests/test_billing_holes.py -q

Three holes, each checked against what the fake provider says it billed:

1. a 2xx answer the SDK then fails to parse (``LengthFinishReasonError``, a structured output
   that does not validate) was billed: it is charged, not released;
2. an attempt that timed out or lost its connection after it was sent may have been billed,
   and the SDKs retry it (``max_retries=2``): each such attempt is charged its projection, each
   retry reserved first; the provider's bill never exceeds the budget, the ledger never
   falls below the bill;
3. a usage report that is empty, zero, negative, null or absurd is never trusted below an
   estimate of what was returned, and never breaks the commit.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pydantic
import pytest
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

from otel_budget import BudgetExceededError, PriceBook
from otel_budget import attributes as attrs
from otel_budget.instrumentation._call import COST_ATTEMPTS_CHARGED
from otel_budget.instrumentation.anthropic import AnthropicBudgetInstrumentor
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.testing import Behaviour, FakeLLMServer
from tests.helpers import assert_error_span, ledger, nanos, only_span

MINI = "gpt-4o-mini"
GPT4O = "gpt-4o"
CLAUDE = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
# genai-prices' prices (cache reads included), so that costs compare to the nano-dollar.
SERVER_PRICES = {
    MINI: (0.15, 0.60, 0.075), GPT4O: (2.5, 10.0, 1.25), CLAUDE: (3.0, 15.0, 0.3, 3.75),
}  # fmt: skip
TIMEOUT = 0.1  # the client gives up after this ...
SLOW = Behaviour(delay_s=0.4)  # ... on an answer this slow (finished and billed all the same)


class Answer(BaseModel):
    answer: str
    score: int


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        srv.bill_abandoned = True  # as real providers: a finished generation is billed
        yield srv


@pytest.fixture
def instrumented() -> Iterator[None]:
    instrumentors = (OpenAIBudgetInstrumentor(), AnthropicBudgetInstrumentor())
    for instrumentor in instrumentors:
        instrumentor.instrument()
    yield
    gc.collect()
    for instrumentor in instrumentors:
        instrumentor.uninstrument()


def oai(server: FakeLLMServer, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.openai_base_url, api_key="test", **kwargs)


def claude(server: FakeLLMServer, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test", **kwargs)


def ours(exporter: Any) -> list[Any]:
    """The spans of otel-budget's calls (the anthropic SDK's own ``anthropic.*`` spans,
    children of ours and never charged, left out)."""
    return [s for s in exporter.get_finished_spans() if not s.name.startswith("anthropic.")]


def billed(server: FakeLLMServer) -> int:
    assert server.wait_idle(10)  # what the server learns after the client left is counted
    return int(server.stats()["billed_nanos"])


def settled(processor: Any) -> int:
    spent, reserved = ledger(processor)
    assert reserved == 0, "every reservation is settled"
    return spent


# == 1. a 2xx the SDK fails to parse was billed ================================================
def test_length_finish_on_chat_parse_is_charged_from_its_usage(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.default_behaviour = Behaviour(output_tokens=50)
    with oai(server) as client:
        for _ in range(20):
            with pytest.raises(openai.LengthFinishReasonError):
                client.chat.completions.parse(
                    model=MINI, messages=MESSAGES, response_format=Answer, max_tokens=10
                )
    assert server.stats()["billed_requests"] == 20
    assert settled(processor) == billed(server) > 0  # from the completion's usage, exactly
    spans = ours(exporter)
    assert len(spans) == 20
    for span in spans:
        assert_error_span(span, "openai.LengthFinishReasonError")
        assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 10
        assert span.attributes[attrs.COST_USD] > 0


def test_structured_output_that_does_not_validate_is_charged(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with oai(server) as client:
        server.script(Behaviour(text='{"answer": "yes"}'))  # valid JSON, missing a field
        with pytest.raises(pydantic.ValidationError):
            client.chat.completions.parse(
                model=MINI, messages=MESSAGES, response_format=Answer, max_tokens=60
            )
        server.script(Behaviour(text="not json at all"))
        with pytest.raises(pydantic.ValidationError):
            client.responses.parse(
                model=MINI, input="Rate this.", text_format=Answer, max_output_tokens=60
            )
    assert server.stats()["billed_requests"] == 2
    assert settled(processor) == billed(server) > 0  # from the response bodies' usage
    for span in ours(exporter):
        assert span.status.status_code is StatusCode.ERROR
        assert attrs.COST_ESTIMATED not in span.attributes


def test_async_parse_error_is_charged(setup: Any, server: FakeLLMServer, exporter: Any) -> None:
    processor = setup(max_usd=1.0)

    async def main() -> None:
        async with openai.AsyncOpenAI(
            base_url=server.openai_base_url, api_key="test", max_retries=0
        ) as client:
            server.script(Behaviour(output_tokens=50))
            with pytest.raises(openai.LengthFinishReasonError):
                await client.chat.completions.parse(
                    model=MINI, messages=MESSAGES, response_format=Answer, max_tokens=10
                )

    asyncio.run(main())
    assert settled(processor) == billed(server) > 0


def test_anthropic_parse_that_does_not_validate_is_charged(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with claude(server) as client:
        for _ in range(3):
            server.script(Behaviour(text="not json at all"))
            with pytest.raises(Exception) as info:
                client.messages.parse(
                    model=CLAUDE, messages=MESSAGES, max_tokens=200, output_format=Answer
                )
            assert not isinstance(info.value, (BudgetExceededError, anthropic.APIError))
    assert server.stats()["billed_requests"] == 3
    assert settled(processor) == billed(server) > 0
    assert len(ours(exporter)) == 3


# == 2. timeouts, dropped connections and the SDK's own retries ================================
def _timeout_storm(client: Any, send: Any, calls: int = 10) -> tuple[int, int]:
    """``calls`` calls that all time out; returns (timeouts, refusals) seen by the caller."""
    timeouts = refusals = 0
    for _ in range(calls):
        try:
            send(client)
        except BudgetExceededError:
            refusals += 1
        except (openai.APITimeoutError, anthropic.APITimeoutError):
            timeouts += 1
    return timeouts, refusals


def _check_attempt_spans(exporter: Any, calls: int) -> int:
    """Each call's span states what its attempts were charged: its projection for each
    attempt that may have been billed. Returns the attempts charged in all."""
    spans = ours(exporter)
    assert len(spans) == calls
    charged = 0
    for span in spans:
        attempts = span.attributes.get(COST_ATTEMPTS_CHARGED, 0)
        projected = nanos(span.attributes[attrs.COST_PROJECTED_USD])
        assert nanos(span.attributes.get(attrs.COST_USD, 0.0)) == attempts * projected
        timed_out = ("openai.APITimeoutError", "anthropic.APITimeoutError", "BudgetExceededError")
        assert span.attributes[attrs.ERROR_TYPE] in timed_out
        charged += attempts
    return charged


def test_openai_timeouts_and_retries_never_overshoot_the_budget(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    # A gpt-4o call capped at 500 output tokens projects at ~$0.005: the budget affords ~4.
    budget_nanos = 22_500_000
    processor = setup(max_usd=budget_nanos / 1e9)
    server.default_behaviour = SLOW
    with oai(server, timeout=TIMEOUT, max_retries=2) as client:
        timeouts, refusals = _timeout_storm(
            client,
            lambda c: c.chat.completions.create(model=GPT4O, messages=MESSAGES, max_tokens=500),
        )
    bill = billed(server)
    spent = settled(processor)
    sent = server.stats()["requests"]
    # Before: 10 calls x 3 attempts were sent and billed, the ledger said $0.
    assert timeouts >= 1 and refusals >= 1 and timeouts + refusals == 10
    assert 4 <= sent < 10
    assert server.stats()["billed_requests"] == sent  # each attempt finished, and was billed
    assert _check_attempt_spans(exporter, 10) == sent  # ... and charged
    assert 0 < bill <= spent <= budget_nanos
    first = ours(exporter)[0]
    assert_error_span(first, "openai.APITimeoutError")
    assert first.attributes[COST_ATTEMPTS_CHARGED] == 3  # max_retries=2: three attempts
    refused = [s for s in ours(exporter) if s.attributes.get(COST_ATTEMPTS_CHARGED)
               and s.attributes[attrs.ERROR_TYPE] == "BudgetExceededError"]  # fmt: skip
    assert refused, "a retry the budget no longer affords is refused out of the SDK's loop"


def test_anthropic_timeouts_and_retries_never_overshoot_the_budget(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    budget_nanos = 50_000_000
    processor = setup(max_usd=budget_nanos / 1e9)
    server.default_behaviour = SLOW
    with claude(server, timeout=TIMEOUT, max_retries=2) as client:
        timeouts, refusals = _timeout_storm(
            client,
            lambda c: c.messages.create(model=CLAUDE, messages=MESSAGES, max_tokens=500),
        )
    bill = billed(server)
    spent = settled(processor)
    sent = server.stats()["requests"]
    assert timeouts >= 1 and refusals >= 1 and timeouts + refusals == 10
    assert 4 <= sent < 30
    assert server.stats()["billed_requests"] == sent
    assert _check_attempt_spans(exporter, 10) == sent
    assert 0 < bill <= spent <= budget_nanos


def test_async_timeouts_are_charged_and_retries_reserved(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    budget_nanos = 22_500_000
    processor = setup(max_usd=budget_nanos / 1e9)
    server.default_behaviour = SLOW

    async def main() -> tuple[int, int]:
        timeouts = refusals = 0
        async with openai.AsyncOpenAI(
            base_url=server.openai_base_url, api_key="test", timeout=TIMEOUT, max_retries=2
        ) as client:
            for _ in range(4):
                try:
                    await client.chat.completions.create(
                        model=GPT4O, messages=MESSAGES, max_tokens=500
                    )
                except BudgetExceededError:
                    refusals += 1
                except openai.APITimeoutError:
                    timeouts += 1
        return timeouts, refusals

    timeouts, refusals = asyncio.run(main())
    assert timeouts >= 1 and refusals >= 1
    sent = server.stats()["requests"]
    assert _check_attempt_spans(exporter, 4) == sent >= 4
    assert 0 < billed(server) <= settled(processor) <= budget_nanos


def test_dropped_connections_are_charged_and_retried_within_budget(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    # A refused connection was never sent; nothing is charged for it, retries or not.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="t", max_retries=2)
    with refused, pytest.raises(openai.APIConnectionError):
        refused.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    assert ledger(processor) == (0, 0)
    exporter.clear()
    # A rate-limited attempt was not billed; an answer generated and billed, then lost in
    # transit, may have been: the SDK retries both.
    server.script(
        Behaviour(status=429), Behaviour(drop_connection=True), Behaviour(drop_connection=True)
    )
    with oai(server, max_retries=3) as client:
        reply = client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    assert reply.usage is not None
    span = only_span(exporter, f"chat {MINI}")
    projected = nanos(span.attributes[attrs.COST_PROJECTED_USD])
    bill = billed(server)
    spent = settled(processor)
    assert server.stats()["requests"] == 4
    assert server.stats()["billed_requests"] == 3
    assert span.status.status_code is not StatusCode.ERROR
    assert span.attributes[COST_ATTEMPTS_CHARGED] == 2
    last = server.calls()[-1].billed_nanos
    assert spent == 2 * projected + last  # two lost answers at their projection, then the reply
    assert nanos(span.attributes[attrs.COST_USD]) == spent
    assert bill <= spent


# == 3. empty or bad usage =====================================================================
BAD_USAGE = {
    "empty": {},
    "zero": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    "negative": {"prompt_tokens": -40, "completion_tokens": -300, "total_tokens": -340},
    "null": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
}


@pytest.mark.parametrize("kind", sorted(BAD_USAGE))
def test_bad_usage_is_never_charged_below_the_estimate(
    setup: Any, server: FakeLLMServer, exporter: Any, kind: str
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(output_tokens=300, reported_usage=BAD_USAGE[kind]))
    with oai(server) as client:
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=400)
    span = only_span(exporter, f"chat {MINI}")
    assert span.attributes[attrs.COST_ESTIMATED] is True
    # The estimate charged is ours (otel_budget.usage.*), never the provider's gen_ai.usage.*
    assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] >= 300
    assert span.attributes[attrs.USAGE_INPUT_TOKENS] > 0
    assert span.attributes.get(attrs.GEN_AI_USAGE_OUTPUT_TOKENS, 0) == 0
    assert settled(processor) >= billed(server) > 0  # 300 words of output are not free


def test_absurd_usage_is_clamped_and_committed(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    absurd = {"prompt_tokens": 10**18, "completion_tokens": 10**18, "total_tokens": 2 * 10**18}
    server.script(Behaviour(reported_usage=absurd))
    with oai(server) as client:
        client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=50)
    span = only_span(exporter, f"chat {MINI}")
    assert span.status.status_code is not StatusCode.ERROR
    assert span.attributes[attrs.COST_ESTIMATED] is True
    assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] == 50  # charged at most its cap
    assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 10**18  # as reported
    assert 0 < settled(processor) < 10**12  # committed, and finite


def test_bad_usage_in_a_stream_and_from_anthropic(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    with oai(server) as client:
        server.script(Behaviour(output_tokens=200, reported_usage=BAD_USAGE["zero"]))
        stream = client.chat.completions.create(
            model=MINI, messages=MESSAGES, max_tokens=400, stream=True
        )
        for _chunk in stream:
            pass
    with claude(server) as client:
        server.script(Behaviour(output_tokens=200, reported_usage={"output_tokens": 0}))
        client.messages.create(model=CLAUDE, messages=MESSAGES, max_tokens=400)
    for span in ours(exporter):
        assert span.attributes[attrs.COST_ESTIMATED] is True
        assert span.attributes[attrs.USAGE_OUTPUT_TOKENS] >= 200
        assert span.attributes[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] == 0  # as reported
    assert settled(processor) >= billed(server) > 0


# == streams whose connection drops ============================================================
def test_stream_whose_connection_drops_is_charged_its_reservation(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.script(Behaviour(output_tokens=200, break_stream_after=3))
    with oai(server) as client:
        stream = client.chat.completions.create(
            model=MINI, messages=MESSAGES, max_tokens=300, stream=True
        )
        with pytest.raises(Exception) as info:
            for _chunk in stream:
                pass
    assert not isinstance(info.value, BudgetExceededError)
    span = only_span(exporter, f"chat {MINI}")
    projected = nanos(span.attributes[attrs.COST_PROJECTED_USD])
    # The provider may have generated past what arrived: without a usage report, the
    # reservation is what it may have billed.
    assert settled(processor) == projected >= billed(server) > 0
    assert span.attributes[attrs.COST_ESTIMATED] is True


@pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")
@pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")
def test_litellm_timeouts_through_the_openai_sdk_are_charged(
    make_processor: Any, server: FakeLLMServer, exporter: Any, monkeypatch: Any
) -> None:
    """litellm sends OpenAI calls through the openai SDK (whose attempts the openai
    instrumentor sees, as ``BudgetInstrumentor`` installs both); the refusal of a retry
    reaches the caller as ``BudgetExceededError``, not as a litellm error."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price map
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
    if not os.environ["TIKTOKEN_CACHE_DIR"]:
        monkeypatch.delenv("TIKTOKEN_CACHE_DIR")  # restored (absent) after the test
    litellm = pytest.importorskip("litellm")
    from otel_budget.instrumentation.litellm import LiteLLMBudgetInstrumentor

    budget_nanos = 22_500_000
    processor = make_processor(max_usd=budget_nanos / 1e9, prices=PriceBook())
    instrumentors = (LiteLLMBudgetInstrumentor(), OpenAIBudgetInstrumentor())
    for instrumentor in instrumentors:
        instrumentor.instrument()
    server.default_behaviour = SLOW
    outcomes: list[str] = []
    debug, litellm.suppress_debug_info = litellm.suppress_debug_info, True
    try:
        for _ in range(3):
            try:
                litellm.completion(
                    model=f"openai/{GPT4O}", messages=MESSAGES, api_base=server.openai_base_url,
                    api_key="x", timeout=TIMEOUT, max_tokens=500, max_retries=2,
                )  # fmt: skip
            except BudgetExceededError:
                outcomes.append("refused")
            except Exception as exc:  # noqa: BLE001 - litellm's own timeout type
                assert "Timeout" in type(exc).__name__, exc
                outcomes.append("timeout")
    finally:
        litellm.suppress_debug_info = debug
        for instrumentor in instrumentors:
            instrumentor.uninstrument()
    assert "timeout" in outcomes and "refused" in outcomes
    sent = server.stats()["requests"]
    assert 4 <= sent < 9
    assert 0 < billed(server) <= settled(processor) <= budget_nanos
