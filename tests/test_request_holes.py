"""Everything a request sends enters the projection and the cap (openai and anthropic SDKs).

Each test drives the real SDK against ``FakeLLMServer`` with a small budget, in a loop or in
threads, and checks what the provider billed against the budget and the ledger:

* a float or numeric-string output limit is projected and capped (never sent unreserved);
  garbage (``"lots"``, ``True``, ``-1``, NaN) is refused as ``invalid_request``;
* ``extra_body`` (merged by the SDK over the named parameters) is read, and the cap written
  where it takes effect;
* a generator of messages is projected at its real size (and sent as projected);
* a Responses ``previous_response_id`` is projected with the stored history the provider
  bills again as input; an unknown id or a ``conversation`` at a flagged worst case.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from otel_budget import BudgetExceededError
from otel_budget.instrumentation.anthropic import AnthropicBudgetInstrumentor
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor, history
from otel_budget.testing import FakeLLMServer
from tests.helpers import ledger, spans_named

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

MINI = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-5"
SERVER_PRICES = {MINI: (0.15, 0.60, 0.075), CLAUDE: (3.0, 15.0, 0.3, 3.75)}
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
# Digits and spaces: every tokenizer here counts them at least as high as the fake's bytes/4.
BIG_TEXT = " ".join(str(i) for i in range(30_000))  # ~170 kB: ~43k billed tokens


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(prices=SERVER_PRICES) as srv:
        yield srv


@pytest.fixture
def instrumented() -> Iterator[None]:
    openai_instrumentor = OpenAIBudgetInstrumentor()
    anthropic_instrumentor = AnthropicBudgetInstrumentor()
    openai_instrumentor.instrument()
    anthropic_instrumentor.instrument()
    history.forget_all()  # the fake's response ids restart with every server
    yield
    anthropic_instrumentor.uninstrument()
    openai_instrumentor.uninstrument()
    history.forget_all()


@pytest.fixture
def client(server: FakeLLMServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


@pytest.fixture
def claude(server: FakeLLMServer) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=server.anthropic_base_url, api_key="test", max_retries=0)
    yield c
    c.close()


def run_until_refused(call: Any, limit: int = 40) -> int:
    """Call until the budget refuses; the number of calls that went out."""
    for n in range(limit):
        try:
            call(n)
        except BudgetExceededError as exc:
            assert exc.reason == "limit", exc
            return n
    return limit


def assert_within_budget(processor: Any, server: FakeLLMServer, limit_nanos: int) -> None:
    assert server.wait_idle(5)
    stats = server.stats()
    assert stats["errors"] == 0
    assert 0 < stats["billed_nanos"] <= limit_nanos
    assert ledger(processor) == (stats["billed_nanos"], 0)  # the ledger is the bill


# == 2. non-integer output limits ===============================================================
@pytest.mark.parametrize("value", [3000.0, "3000", 2999.5])
def test_numeric_output_limit_is_projected_and_capped(
    setup: Any, client: Any, server: FakeLLMServer, value: Any
) -> None:
    limit = 10_000_000  # $0.01: about five calls of 3000 output tokens
    processor = setup(max_usd=limit / 1e9)
    server.default_output_tokens = 5000  # the fake ignores a non-int cap: it would bill 5000

    def call(n: int) -> None:
        client.chat.completions.create(
            model=MINI, messages=[{"role": "user", "content": f"call {n}"}], max_tokens=value
        )

    calls = run_until_refused(call)
    assert 1 <= calls < 40
    # The cap went out as an int (the limit rounded up, or lowered to what was affordable).
    assert all(isinstance(r.body["max_tokens"], int) for r in server.calls())
    assert all(r.body["max_tokens"] <= 3000 for r in server.calls())
    assert_within_budget(processor, server, limit)


def test_numeric_output_limit_uncapped_is_sent_as_given_and_projected(
    setup: Any, client: Any, server: FakeLLMServer, starts: Any, exporter: Any
) -> None:
    setup(max_usd=1.0, cap_output_tokens=False)
    client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens="3000")
    assert server.last_call.body["max_tokens"] == "3000"  # followed as the SDK sends it
    span = spans_named(exporter, f"chat {MINI}")[0]
    assert starts.at_start[span.context.span_id]["gen_ai.request.max_tokens"] == 3000


def test_numeric_output_limit_under_fail_closed_and_zero_budget_is_refused_in_threads(
    setup: Any, server: FakeLLMServer
) -> None:
    setup(max_usd=0, failure_policy="fail_closed")
    c = openai.OpenAI(base_url=server.openai_base_url, api_key="test", max_retries=0)
    errors: list[BaseException] = []
    refused: list[int] = []

    def worker(i: int) -> None:
        try:
            c.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=3000.0)
        except BudgetExceededError:
            refused.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    c.close()
    assert not errors and len(refused) == 32
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": "lots"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": float("nan")}, "max_completion_tokens"),
        ({"max_tokens": 100, "n": "eight"}, "n"),
        ({"extra_body": {"max_tokens": "3k"}}, "max_tokens"),
    ],
)
def test_unprojectable_request_is_refused_as_invalid(
    setup: Any, client: Any, server: FakeLLMServer, kwargs: dict[str, Any], name: str
) -> None:
    processor = setup(max_usd=1.0)
    with pytest.raises(BudgetExceededError) as info:
        client.chat.completions.create(model=MINI, messages=MESSAGES, **kwargs)
    assert info.value.reason == "invalid_request"
    assert name in str(info.value)
    assert server.stats()["requests"] == 0
    assert ledger(processor) == (0, 0)


def test_unprojectable_anthropic_request_is_refused_as_invalid(
    setup: Any, claude: Any, server: FakeLLMServer
) -> None:
    setup(max_usd=1.0)
    with pytest.raises(BudgetExceededError) as info:
        claude.messages.create(model=CLAUDE, messages=MESSAGES, max_tokens="a lot")
    assert info.value.reason == "invalid_request" and "max_tokens" in str(info.value)
    assert server.stats()["requests"] == 0


# == 3. extra_body ==============================================================================
@pytest.mark.parametrize(
    "kwargs",
    [
        {"extra_body": {"max_tokens": 3000}},
        {"max_tokens": 300, "extra_body": {"n": 8}},
        {"max_tokens": 300, "extra_body": {"max_tokens": 3000}},
        {"extra_body": {"max_completion_tokens": 3000, "n": 2}},
    ],
)
def test_extra_body_enters_the_projection_and_the_cap(
    setup: Any, client: Any, server: FakeLLMServer, kwargs: dict[str, Any]
) -> None:
    limit = 10_000_000
    processor = setup(max_usd=limit / 1e9)
    server.default_output_tokens = 5000
    extra = dict(kwargs.get("extra_body", {}))

    def call(n: int) -> None:
        client.chat.completions.create(
            model=MINI, messages=[{"role": "user", "content": f"call {n}"}], **kwargs
        )

    assert 1 <= run_until_refused(call) < 40
    assert kwargs.get("extra_body", {}) == extra  # the caller's dict was not changed
    assert_within_budget(processor, server, limit)


def test_extra_body_cap_is_written_where_it_takes_effect(
    setup: Any, client: Any, server: FakeLLMServer
) -> None:
    setup(max_usd=1.0, default_max_output_tokens=50)
    client.chat.completions.create(model=MINI, messages=MESSAGES, extra_body={"max_tokens": None})
    assert server.last_call.body["max_tokens"] == 50  # not null: extra_body carried the key
    client.responses.create(model=MINI, input="hi", extra_body={"max_output_tokens": 5000})
    assert server.last_call.body["max_output_tokens"] == 5000  # affordable: left as given


def test_anthropic_extra_body_enters_the_projection_and_the_cap(
    setup: Any, claude: Any, server: FakeLLMServer
) -> None:
    limit = 100_000_000  # $0.1: a few calls of 3000 output tokens at $15/MTok
    processor = setup(max_usd=limit / 1e9)
    server.default_output_tokens = 5000
    body = {"max_tokens": 3000}

    def call(n: int) -> None:
        claude.messages.create(
            model=CLAUDE, messages=[{"role": "user", "content": f"call {n}"}], max_tokens=100,
            extra_body=body,
        )  # fmt: skip

    assert 1 <= run_until_refused(call) < 40
    assert body == {"max_tokens": 3000}
    assert_within_budget(processor, server, limit)


# == 4. one-shot iterators ======================================================================
def test_generator_messages_are_projected_and_sent_as_projected(
    setup: Any, client: Any, server: FakeLLMServer
) -> None:
    limit = 50_000_000  # $0.05: a handful of ~43k-token prompts
    processor = setup(max_usd=limit / 1e9, default_max_output_tokens=100)

    def call(n: int) -> None:
        messages = ({"role": "user", "content": f"{n} {BIG_TEXT}"} for _ in range(1))
        client.chat.completions.create(model=MINI, messages=messages)

    assert 1 <= run_until_refused(call) < 40
    assert all(r.body["messages"] and r.input_tokens > 40_000 for r in server.calls())
    assert_within_budget(processor, server, limit)


@pytest.mark.parametrize("api", ["responses", "embeddings", "completions"])
def test_iterator_inputs_of_other_apis_are_projected(
    setup: Any, client: Any, server: FakeLLMServer, api: str
) -> None:
    limit = 20_000_000
    processor = setup(max_usd=limit / 1e9, default_max_output_tokens=100)
    server.prices["text-embedding-3-small"] = (0.02, 0.0)  # as genai-prices

    def call(n: int) -> None:
        if api == "responses":
            items = iter([{"role": "user", "content": f"{n} {BIG_TEXT}"}])
            client.responses.create(model=MINI, input=items)
        elif api == "embeddings":
            client.embeddings.create(model="text-embedding-3-small", input=iter([f"{n} {BIG_TEXT}"]))
        else:
            client.completions.create(model=MINI, prompt=iter([f"{n} {BIG_TEXT}"]))

    assert 1 <= run_until_refused(call) < 40
    assert_within_budget(processor, server, limit)


def test_anthropic_generator_messages_and_system_are_projected(
    setup: Any, claude: Any, server: FakeLLMServer
) -> None:
    limit = 2_000_000_000  # $2 at $3/MTok input: a few ~43k-token prompts (x2, with system)
    processor = setup(max_usd=limit / 1e9)

    def call(n: int) -> None:
        claude.messages.create(
            model=CLAUDE, max_tokens=100,
            system=iter([{"type": "text", "text": BIG_TEXT}]),
            messages=({"role": "user", "content": f"call {n} {BIG_TEXT}"} for _ in range(1)),
        )  # fmt: skip

    assert 1 <= run_until_refused(call) < 40
    assert all(r.input_tokens > 80_000 for r in server.calls())
    assert_within_budget(processor, server, limit)


# == 5. Responses stored history ================================================================
def test_previous_response_id_history_is_projected(
    setup: Any, client: Any, server: FakeLLMServer
) -> None:
    limit = 10_000_000  # $0.01
    processor = setup(max_usd=limit / 1e9)
    server.default_output_tokens = 200
    turn = " ".join(str(i) for i in range(1500))  # ~1.7k tokens a turn
    previous: list[str] = []

    def call(n: int) -> None:
        reply = client.responses.create(
            model=MINI, input=f"turn {n}: {turn}", max_output_tokens=200,
            previous_response_id=previous[-1] if previous else openai.NOT_GIVEN,
        )  # fmt: skip
        previous.append(reply.id)

    calls = run_until_refused(call)
    assert 3 <= calls < 40
    # The provider billed the growing history: the last turn's input is many turns' worth.
    assert server.calls()[-1].input_tokens > 3 * server.calls()[0].input_tokens
    assert_within_budget(processor, server, limit)


def test_streamed_response_is_remembered_for_the_next_turn(
    setup: Any, client: Any, server: FakeLLMServer, starts: Any, exporter: Any
) -> None:
    setup(max_usd=1.0)
    with client.responses.create(model=MINI, input="hello", stream=True) as stream:
        for event in stream:
            if event.type == "response.completed":
                first = event.response
    client.responses.create(model=MINI, input="again", previous_response_id=first.id)
    second = spans_named(exporter, f"chat {MINI}")[-1]
    at_start = starts.at_start[second.context.span_id]
    assert at_start[history.COST_HISTORY_TOKENS] == first.usage.input_tokens + first.usage.output_tokens
    assert history.COST_INPUT_ASSUMED not in at_start
    assert server.last_call.input_tokens > at_start[history.COST_HISTORY_TOKENS]


@pytest.mark.parametrize(
    "kwargs", [{"previous_response_id": "resp_from_another_process"}, {"conversation": "conv_1"}]
)
def test_unknown_stored_history_is_projected_at_a_flagged_worst_case(
    setup: Any, client: Any, server: FakeLLMServer, starts: Any, exporter: Any,
    kwargs: dict[str, Any],
) -> None:  # fmt: skip
    setup(max_usd=0.01)  # less than gpt-4o-mini's 128k-token context window of input
    with pytest.raises(BudgetExceededError) as info:
        client.responses.create(model=MINI, input="hi", max_output_tokens=50, **kwargs)
    assert info.value.reason == "limit"
    assert server.stats()["requests"] == 0
    span = spans_named(exporter, f"chat {MINI}")[-1]
    at_start = starts.at_start[span.context.span_id]
    assert at_start[history.COST_INPUT_ASSUMED] is True
    assert at_start[history.COST_HISTORY_TOKENS] == 128_000
