"""``project_span``: the cost of another instrumentation's GenAI span, from what it carries at
start (current GenAI conventions, deprecated and OpenLLMetry spellings, the span name), and
the ``assumed_input_tokens`` setting."""

from __future__ import annotations

import json

import pytest

from otel_budget import BudgetSpanProcessor, ModelPrice, PriceBook
from otel_budget.config import settings_from_env
from otel_budget.pricing import TokenUsage, UnknownModelError
from otel_budget.settings import BudgetSettings
from otel_budget.span_projection import INPUT_ASSUMED, ModelNotAtStartError, project_span
from otel_budget.tokens import estimate_input_tokens

PRICES = PriceBook(overrides={"test-model": ModelPrice(input=1, output=2)})  # $/MTok
SCOPE = "opentelemetry.instrumentation.genai.openai"
KW = {"default_max_output_tokens": 1000, "assumed_input_tokens": 5000}


def cost(inp: int, out: int) -> int:
    return PRICES.quote(None, "test-model", TokenUsage(input_tokens=inp, output_tokens=out)).nanos


def test_current_names_without_content_assume_the_input_and_the_output() -> None:
    p = project_span("chat test-model", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "test-model",
    }, SCOPE, PRICES, **KW)  # fmt: skip
    assert p is not None
    assert (p.input_tokens, p.output_tokens) == (5000, 1000)
    assert p.input_assumed and p.output_assumed and p.input_method == INPUT_ASSUMED
    assert p.nanos == cost(5000, 1000) and not p.model_from_name


def test_max_tokens_and_choice_count_bound_the_output() -> None:
    p = project_span("x", {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model",
        "gen_ai.request.max_tokens": 200, "gen_ai.request.choice.count": 3,
    }, "mine", PRICES, **KW)  # fmt: skip
    assert p is not None and p.output_tokens == 600 and not p.output_assumed


def test_captured_input_messages_are_counted_not_assumed() -> None:
    text = "How much does a budget cost? " * 40
    messages = [{"role": "user", "parts": [{"type": "text", "content": text}]}]
    system = [{"type": "text", "content": "Be brief."}]
    p = project_span("chat test-model", {
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model",
        "gen_ai.input.messages": json.dumps(messages),
        "gen_ai.system_instructions": json.dumps(system),
    }, SCOPE, PRICES, **KW)  # fmt: skip
    expected = estimate_input_tokens(
        "test-model", messages=[{"role": "user", "content": [{"type": "text", "text": text}]}],
        system={"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    )  # fmt: skip
    assert p is not None and not p.input_assumed
    assert p.input_tokens == expected.tokens and p.input_method == expected.method
    assert len(text) // 4 < p.input_tokens < 5000


def test_deprecated_and_openllmetry_spellings() -> None:
    p = project_span("openai.chat", {
        "llm.request.type": "chat", "gen_ai.system": "openai", "llm.request.model": "test-model",
        "llm.request.max_tokens": 50,
        "gen_ai.prompt.0.role": "system", "gen_ai.prompt.0.content": "Be brief.",
        "gen_ai.prompt.1.role": "user", "gen_ai.prompt.1.content": "Hello there " * 30,
    }, "opentelemetry.instrumentation.openai.v1", PRICES, **KW)  # fmt: skip
    assert p is not None and p.operation == "chat" and not p.operation_set
    assert p.provider == "openai" and p.model == "test-model" and p.output_tokens == 50
    assert not p.input_assumed and 90 < p.input_tokens < 5000
    legacy = project_span("x", {
        "gen_ai.operation.name": "text_completion", "gen_ai.request.model": "test-model",
        "gen_ai.prompt": "Once upon a time " * 10,
    }, "mine", PRICES, **KW)  # fmt: skip
    assert legacy is not None and not legacy.input_assumed and legacy.input_tokens < 100
    embedding = {"llm.request.type": "embedding", "gen_ai.request.model": "test-model"}
    embed = project_span("x", embedding, "mine", PRICES, **KW)
    assert embed is not None and embed.operation == "embeddings" and embed.output_tokens == 0


def test_span_name_gives_the_model_only_for_a_known_genai_scope() -> None:
    p = project_span("chat test-model", {}, SCOPE, PRICES, **KW)
    assert p is not None and p.model == "test-model" and p.model_from_name
    assert p.operation == "chat" and not p.operation_set and p.provider == "openai"
    assert project_span("chat test-model", {}, "my.app", PRICES, **KW) is None
    assert project_span("chat test-model", None, None, PRICES, **KW) is None
    assert project_span("openai.chat", {}, SCOPE, PRICES, **KW) is None  # no convention


def test_not_a_paid_call() -> None:
    for op in ("execute_tool", "invoke_agent", "create_agent", "retrieval", 7):
        assert project_span("x", {"gen_ai.operation.name": op}, SCOPE, PRICES, **KW) is None
    assert project_span("GET /", {"http.request.method": "GET"}, "x", PRICES, **KW) is None


def test_unknown_model_follows_the_price_book_policy() -> None:
    with pytest.raises(UnknownModelError):
        project_span("x", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "mystery"},
                     SCOPE, PRICES, **KW)  # fmt: skip
    with pytest.raises(ModelNotAtStartError, match=r"starts without gen_ai\.request\.model"):
        project_span("openai.chat", {"gen_ai.operation.name": "chat"}, SCOPE, PRICES, **KW)
    priced = PriceBook(overrides={"test-model": ModelPrice(input=1, output=2)},
                       unknown_model="price_as:test-model")  # fmt: skip
    p = project_span("openai.chat", {"gen_ai.operation.name": "chat"}, SCOPE, priced, **KW)
    assert p is not None and p.model is None and p.nanos == cost(5000, 1000)


def test_assumed_input_tokens_setting() -> None:
    assert BudgetSettings().assumed_input_tokens == 8192
    assert BudgetSpanProcessor(assumed_input_tokens=100).settings.assumed_input_tokens == 100
    for bad in (0, -1, True, 1.5, "8192"):
        with pytest.raises(ValueError, match="assumed_input_tokens"):
            BudgetSettings(assumed_input_tokens=bad)
    assert settings_from_env({"OTEL_BUDGET_ASSUMED_INPUT_TOKENS": "2048"}) == {
        "assumed_input_tokens": 2048
    }
    with pytest.raises(ValueError, match="OTEL_BUDGET_ASSUMED_INPUT_TOKENS"):
        settings_from_env({"OTEL_BUDGET_ASSUMED_INPUT_TOKENS": "lots"})


# -- the shape cache: what a span's attributes project is worked out once, never reused wrongly --
def test_the_cache_tells_a_boolean_bound_from_the_integer_one() -> None:
    """``True == 1`` in Python: a span whose ``max_tokens`` is ``True`` (no bound) after one
    bounded at 1 token must still be projected at the assumed output, not at 1 token."""
    base = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model"}
    one = project_span("x", {**base, "gen_ai.request.max_tokens": 1}, SCOPE, PRICES, **KW)
    flag = project_span("x", {**base, "gen_ai.request.max_tokens": True}, SCOPE, PRICES, **KW)
    assert one is not None and flag is not None
    assert one.output_tokens == 1
    assert flag.output_tokens == 1000 and flag.output_assumed
    assert flag.nanos == cost(5000, 1000)


def test_the_cache_never_answers_for_a_span_with_content_or_other_settings() -> None:
    base = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model"}
    bare = project_span("x", base, SCOPE, PRICES, **KW)
    text = "word " * 20_000
    messages = json.dumps([{"role": "user", "parts": [{"type": "text", "content": text}]}])
    full = project_span("x", {**base, "gen_ai.input.messages": messages}, SCOPE, PRICES, **KW)
    again = project_span("x", base, SCOPE, PRICES, **KW)
    other = project_span(
        "x", base, SCOPE, PRICES, default_max_output_tokens=7, assumed_input_tokens=9
    )
    assert bare is not None and full is not None and again is not None and other is not None
    assert full.input_tokens > 5000 and not full.input_assumed
    assert again == bare
    assert (other.input_tokens, other.output_tokens) == (9, 7)


def test_the_price_is_asked_every_time() -> None:
    """A price may change with the date or the time of day: only the span's shape is cached,
    never its quote."""

    class Changing:
        def __init__(self) -> None:
            self.rate = 1

        def quote(self, provider: object, model: str, usage: TokenUsage, **kw: object) -> _Quote:
            return _Quote(self.rate * (usage.input_tokens + usage.output_tokens))

    prices = Changing()
    attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model"}
    first = project_span("x", attributes, SCOPE, prices, **KW)  # type: ignore[arg-type]
    prices.rate = 3
    second = project_span("x", attributes, SCOPE, prices, **KW)  # type: ignore[arg-type]
    assert first is not None and second is not None
    assert second.nanos == 3 * first.nanos == 3 * 6000


class _Quote:
    def __init__(self, nanos: int) -> None:
        self.nanos = nanos
