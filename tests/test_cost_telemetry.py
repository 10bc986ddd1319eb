"""Cost in telemetry: a provider's own bill settles the call, and the proposed cost conventions.

The real ``openai`` SDK (and litellm) against ``FakeLLMServer`` scripted to report OpenRouter's
``usage.cost`` (``Behaviour(usage_cost=True)``: the true bill of the reply). The fake server is
given prices that differ from our price book (genai-prices), so the provider's bill and our
price of the same usage differ, and each test can tell which one was charged:

* a sane report at or above 90 % of our price is the bill: the ledger charges it
  (``otel_budget.cost.source="provider"``), the difference from our price on the span;
* a report far below our price, or one that is no sane amount (a string, negative, NaN,
  1e30), never lowers the charge: our price is charged (``source="local"``);
* a model our price book does not know is settled by the report;
* ``semconv_cost`` (``OTEL_BUDGET_SEMCONV_COST``) adds ``gen_ai.usage.cost.*`` (PR #443).
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from otel_budget import attributes as attrs
from otel_budget.config import read_env
from otel_budget.costing import (
    MAX_REPORTED_USD,
    SOURCE_LOCAL,
    SOURCE_PROVIDER,
    reconcile,
    reported_usd,
)
from otel_budget.instrumentation.openai import OpenAIBudgetInstrumentor
from otel_budget.settings import BudgetSettings
from otel_budget.testing import Behaviour, FakeLLMServer
from tests.helpers import ledger, nanos, only_span

MINI = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say something short about budgets."}]
# genai-prices' gpt-4o-mini: $0.15 / $0.60 per MTok. The fake provider bills twice that:
# our price book is stale, the provider's bill is the truth.
DOUBLE = {MINI: (0.30, 1.20)}
TENTH = {MINI: (0.015, 0.06)}  # a report at 10 % of our price: not the whole bill
NEAR = {MINI: (0.1425, 0.57)}  # 95 %: a small discount, the bill


# -- the rule (costing) -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("local", "reported", "charged", "source"),
    [
        (1000, None, 1000, SOURCE_LOCAL),  # no report: our price
        (1000, 2e-6, 2000, SOURCE_PROVIDER),  # above our price: the bill
        (1000, 9.5e-7, 950, SOURCE_PROVIDER),  # within 10 % below: the bill
        (1000, 9e-7, 900, SOURCE_PROVIDER),  # exactly 90 %
        (1000, 8.99e-7, 1000, SOURCE_LOCAL),  # further below: never lowered
        (1000, 0, 1000, SOURCE_LOCAL),  # "free" for a priced model: not trusted
        (None, 3e-6, 3000, SOURCE_PROVIDER),  # model unknown to the price book: the report
        (None, None, None, SOURCE_LOCAL),  # neither: the caller keeps the reservation
        (1000, "0.000002", 1000, SOURCE_LOCAL),  # a JSON string is no number
        (1000, -1.0, 1000, SOURCE_LOCAL),
        (1000, float("nan"), 1000, SOURCE_LOCAL),
        (1000, float("inf"), 1000, SOURCE_LOCAL),
        (1000, 1e30, 1000, SOURCE_LOCAL),
        (1000, True, 1000, SOURCE_LOCAL),
        (None, 1e30, None, SOURCE_LOCAL),  # garbage never settles an unknown model either
        (None, -0.5, None, SOURCE_LOCAL),
    ],
)
def test_reconcile_never_charges_below_our_price_for_a_report_far_below_it(
    local: int | None, reported: Any, charged: int | None, source: str
) -> None:
    cost = reconcile(local, reported)
    assert (cost.nanos, cost.source) == (charged, source)


def test_reported_usd_reads_numbers_and_header_text_only() -> None:
    assert reported_usd(0.0042) == 0.0042 and reported_usd(3) == 3.0
    assert reported_usd("0.0042") is None  # in a JSON body a string is malformed
    assert reported_usd(" 0.0042 ", text=True) == 0.0042  # an HTTP header is text
    for bad in ("lots", "nan", "-1", "1e30"):
        assert reported_usd(bad, text=True) is None, bad
    assert reported_usd(MAX_REPORTED_USD) == MAX_REPORTED_USD
    assert reported_usd(MAX_REPORTED_USD * 1.01) is None
    assert reported_usd(None) is None and reported_usd([0.1]) is None


def test_the_span_attributes_of_a_reconciled_cost() -> None:
    cost = reconcile(1000, 2e-6)
    assert cost.attributes() == {
        attrs.COST_SOURCE: SOURCE_PROVIDER,
        attrs.COST_PROVIDER_REPORTED_USD: 2e-6,
        attrs.COST_PRICE_DELTA_USD: 1e-6,
    }
    assert reconcile(1000, None).attributes() == {attrs.COST_SOURCE: SOURCE_LOCAL}
    # The standard attributes carry the provider's word, or our price of reported usage;
    # never an estimate.
    assert reconcile(1000, 1e-7).semconv_attributes(False) == {
        attrs.GEN_AI_USAGE_COST_AMOUNT: 1e-7,
        attrs.GEN_AI_USAGE_COST_CURRENCY: "USD",
        attrs.GEN_AI_USAGE_COST_SOURCE: SOURCE_PROVIDER,
    }
    assert reconcile(1000, None).semconv_attributes(False)[attrs.GEN_AI_USAGE_COST_SOURCE] == "local"
    assert reconcile(1000, None).semconv_attributes(True) == {}


# -- configuration ------------------------------------------------------------------------------
def test_semconv_cost_is_read_from_the_environment_and_invalid_means_off() -> None:
    assert read_env({"OTEL_BUDGET_SEMCONV_COST": "true"}).kwargs["semconv_cost"] is True
    assert read_env({"OTEL_BUDGET_SEMCONV_COST": "off"}).kwargs["semconv_cost"] is False
    config = read_env({"OTEL_BUDGET_SEMCONV_COST": "maybe", "OTEL_BUDGET_MAX_USD": "1"})
    assert "semconv_cost" not in config.kwargs and config.kwargs["max_usd"] == "1"
    assert [p.variable for p in config.problems] == ["OTEL_BUDGET_SEMCONV_COST"]
    assert "false" in config.problems[0].fallback
    assert BudgetSettings().semconv_cost is False
    with pytest.raises(ValueError, match="semconv_cost"):
        BudgetSettings(semconv_cost="yes")  # type: ignore[arg-type]


def test_the_instrumentor_passes_semconv_cost_to_its_processor() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from otel_budget.instrumentation import BudgetInstrumentor

    instrumentor = BudgetInstrumentor()
    instrumentor.instrument(libraries=[], semconv_cost=True, tracer_provider=TracerProvider())
    try:
        assert instrumentor.processor is not None
        assert instrumentor.processor.settings.semconv_cost is True
    finally:
        instrumentor.uninstrument()


# -- through the openai SDK ---------------------------------------------------------------------
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


def _billed(server: FakeLLMServer) -> int:
    record = server.last_call
    assert record is not None and record.billed
    return record.billed_nanos


def _our_price(span: Any) -> int:
    """genai-prices' gpt-4o-mini price of the usage on the span (nano-USD)."""
    a = span.attributes
    return a[attrs.GEN_AI_USAGE_INPUT_TOKENS] * 150 + a[attrs.GEN_AI_USAGE_OUTPUT_TOKENS] * 600


def _chat(client: openai.OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model=MINI, messages=MESSAGES, max_tokens=40, **kw)


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def test_a_reported_cost_above_our_price_is_charged_as_the_bill(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.prices.update(DOUBLE)
    server.script(Behaviour(usage_cost=True))
    _chat(client)
    span = only_span(exporter, f"chat {MINI}")
    a = span.attributes
    billed = _billed(server)
    assert nanos(a[attrs.COST_USD]) == billed  # the ledger equals the bill...
    assert ledger(processor) == (billed, 0)
    assert a[attrs.COST_SOURCE] == "provider"
    assert nanos(a[attrs.COST_PROVIDER_REPORTED_USD]) == billed
    ours = _our_price(span)
    assert billed == 2 * ours  # ...not our stale price
    assert nanos(a[attrs.COST_PRICE_DELTA_USD]) == billed - ours
    assert attrs.GEN_AI_USAGE_COST_AMOUNT not in a  # the conventions are opt-in


def test_a_report_a_little_below_our_price_is_the_bill(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.prices.update(NEAR)
    server.script(Behaviour(usage_cost=True))
    _chat(client)
    a = only_span(exporter, f"chat {MINI}").attributes
    assert a[attrs.COST_SOURCE] == "provider"
    assert ledger(processor) == (_billed(server), 0)
    assert a[attrs.COST_PRICE_DELTA_USD] < 0


def test_a_report_far_below_our_price_never_lowers_the_charge(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    processor = setup(max_usd=1.0)
    server.prices.update(TENTH)
    for _ in range(2):
        server.script(Behaviour(usage_cost=True))
        _chat(client)
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    for span in spans:
        a = span.attributes
        ours = _our_price(span)
        assert nanos(a[attrs.COST_USD]) == ours  # our price, not the tenth reported
        assert a[attrs.COST_SOURCE] == "local"
        assert nanos(a[attrs.COST_PROVIDER_REPORTED_USD]) * 10 == ours
        assert a[attrs.COST_PRICE_DELTA_USD] < 0
    assert ledger(processor)[0] == sum(_our_price(s) for s in spans)
    assert len([r for r in caplog.records if "far below its price" in r.getMessage()]) == 1


@pytest.mark.parametrize("hostile", ["0.000001", -1.0, float("nan"), 1e30, {"total": 1}])
def test_a_reported_cost_that_is_no_sane_amount_is_ignored(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any, hostile: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.prices.update(DOUBLE)  # so that trusting any report would show
    server.script(Behaviour(usage_cost=hostile))
    _chat(client)
    span = only_span(exporter, f"chat {MINI}")
    a = span.attributes
    assert a[attrs.COST_SOURCE] == "local"
    assert attrs.COST_PROVIDER_REPORTED_USD not in a and attrs.COST_PRICE_DELTA_USD not in a
    assert nanos(a[attrs.COST_USD]) == _our_price(span)
    assert ledger(processor) == (_our_price(span), 0)


def test_a_chat_stream_settles_with_the_cost_in_its_usage_chunk(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.prices.update(DOUBLE)
    server.script(Behaviour(usage_cost=True))
    _drain(_chat(client, stream=True))
    a = only_span(exporter, f"chat {MINI}").attributes
    assert a[attrs.COST_SOURCE] == "provider"
    assert ledger(processor) == (_billed(server), 0)
    assert nanos(a[attrs.COST_PROVIDER_REPORTED_USD]) == _billed(server)


def test_a_stream_without_a_cost_in_its_usage_chunk_is_priced_locally(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0, semconv_cost=True)
    server.prices.update(DOUBLE)
    _drain(_chat(client, stream=True))  # no usage_cost scripted: the chunk has none
    span = only_span(exporter, f"chat {MINI}")
    a = span.attributes
    assert a[attrs.COST_SOURCE] == "local"
    assert attrs.COST_PROVIDER_REPORTED_USD not in a
    assert ledger(processor) == (_our_price(span), 0)
    assert a[attrs.GEN_AI_USAGE_COST_SOURCE] == "local"
    assert nanos(a[attrs.GEN_AI_USAGE_COST_AMOUNT]) == _our_price(span)


def test_an_async_stream_and_a_responses_stream_read_the_cost(
    setup: Any, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0)
    server.prices.update(DOUBLE)

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="t", max_retries=0)
        server.script(Behaviour(usage_cost=True))
        stream = await client.chat.completions.create(
            model=MINI, messages=MESSAGES, max_tokens=40, stream=True
        )
        async for _ in stream:
            pass
        server.script(Behaviour(usage_cost=True))
        events = await client.responses.create(model=MINI, input="hi", stream=True)
        async for _ in events:
            pass
        await client.close()

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert [s.attributes[attrs.COST_SOURCE] for s in spans] == ["provider", "provider"]
    assert ledger(processor)[0] == sum(c.billed_nanos for c in server.calls())


def test_a_responses_body_reports_its_cost(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    processor = setup(max_usd=1.0, semconv_cost=True)
    server.prices.update(DOUBLE)
    server.script(Behaviour(usage_cost=True))
    client.responses.create(model=MINI, input="hi", max_output_tokens=40)
    a = only_span(exporter, f"chat {MINI}").attributes
    billed = _billed(server)
    assert a[attrs.COST_SOURCE] == "provider" and ledger(processor) == (billed, 0)
    assert a[attrs.GEN_AI_USAGE_COST_SOURCE] == "provider"
    assert a[attrs.GEN_AI_USAGE_COST_CURRENCY] == "USD"
    assert nanos(a[attrs.GEN_AI_USAGE_COST_AMOUNT]) == billed


def test_semconv_cost_carries_the_providers_word_even_when_we_charge_more(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0, semconv_cost=True)
    server.prices.update(TENTH)
    server.script(Behaviour(usage_cost=True))
    _chat(client)
    span = only_span(exporter, f"chat {MINI}")
    a = span.attributes
    assert nanos(a[attrs.GEN_AI_USAGE_COST_AMOUNT]) == _billed(server)  # what it said
    assert a[attrs.GEN_AI_USAGE_COST_SOURCE] == "provider"
    assert nanos(a[attrs.COST_USD]) == _our_price(span)  # what we charge


def test_semconv_cost_is_absent_when_the_usage_was_estimated(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    setup(max_usd=1.0, semconv_cost=True)
    server.script(Behaviour(usage=False))
    _chat(client)
    a = only_span(exporter, f"chat {MINI}").attributes
    assert a[attrs.COST_ESTIMATED] is True and a[attrs.COST_SOURCE] == "local"
    assert not [k for k in a if k.startswith("gen_ai.usage.cost")]


def test_a_model_our_price_book_does_not_know_is_settled_by_the_report(
    setup: Any, client: openai.OpenAI, server: FakeLLMServer, exporter: Any
) -> None:
    setup(semconv_cost=True)  # no limit applies: an unpriced model goes through
    server.prices["router-only-model"] = (1.0, 2.0)
    server.script(Behaviour(usage_cost=True))
    client.chat.completions.create(model="router-only-model", messages=MESSAGES, max_tokens=40)
    a = only_span(exporter, "chat router-only-model").attributes
    billed = _billed(server)
    assert billed > 0
    assert nanos(a[attrs.COST_USD]) == billed
    assert a[attrs.COST_SOURCE] == "provider"
    assert attrs.COST_PRICE_DELTA_USD not in a  # nothing to compare with
    assert nanos(a[attrs.GEN_AI_USAGE_COST_AMOUNT]) == billed


# -- through litellm ----------------------------------------------------------------------------
_LITELLM_ENV = ("LITELLM_LOCAL_MODEL_COST_MAP", "TIKTOKEN_CACHE_DIR")


@pytest.fixture(scope="module")
def litellm_module() -> Iterator[Any]:
    saved = {key: os.environ.get(key) for key in _LITELLM_ENV}
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # never fetch litellm's price map
    try:
        litellm = pytest.importorskip("litellm")
        quiet, litellm.suppress_debug_info = litellm.suppress_debug_info, True
        yield litellm
        litellm.suppress_debug_info = quiet
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def litellm_instrumented(litellm_module: Any) -> Iterator[Any]:
    from otel_budget.instrumentation.litellm import LiteLLMBudgetInstrumentor

    instrumentor = LiteLLMBudgetInstrumentor()
    instrumentor.instrument()
    yield litellm_module
    instrumentor.uninstrument()


pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema"),
    pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning"),
]


def _litellm_chat(litellm: Any, server: FakeLLMServer, **kw: Any) -> Any:
    return litellm.completion(
        model=f"openai/{MINI}", messages=MESSAGES, max_tokens=40,
        api_base=server.openai_base_url, api_key="x", **kw,
    )  # fmt: skip


def test_litellm_settles_with_the_upstream_cost(
    make_processor: Any, litellm_instrumented: Any, server: FakeLLMServer, exporter: Any
) -> None:
    from otel_budget import PriceBook

    processor = make_processor(1.0, prices=PriceBook())
    server.prices.update(DOUBLE)
    server.script(Behaviour(usage_cost=True))
    _litellm_chat(litellm_instrumented, server)
    first = _billed(server)
    server.script(Behaviour(usage_cost=True))
    _drain(_litellm_chat(litellm_instrumented, server, stream=True))
    second = _billed(server)
    spans = exporter.get_finished_spans()
    assert [s.attributes[attrs.COST_SOURCE] for s in spans] == ["provider", "provider"]
    assert [nanos(s.attributes[attrs.COST_USD]) for s in spans] == [first, second]
    assert ledger(processor) == (first + second, 0)


def test_litellm_own_bill_on_a_stream_is_not_taken_for_the_providers(
    make_processor: Any, litellm_instrumented: Any, server: FakeLLMServer, exporter: Any
) -> None:
    """litellm writes its price map's cost over ``usage.cost`` of a stream's usage chunk; with
    no upstream cost that is not a provider's report."""
    from otel_budget import PriceBook

    processor = make_processor(1.0, prices=PriceBook())
    server.prices.update(DOUBLE)
    _drain(_litellm_chat(litellm_instrumented, server, stream=True))
    span = exporter.get_finished_spans()[0]
    a = span.attributes
    assert a[attrs.COST_SOURCE] == "local"
    assert attrs.COST_PROVIDER_REPORTED_USD not in a
    assert ledger(processor) == (_our_price(span), 0)


def test_litellm_ignores_a_hostile_upstream_cost(
    make_processor: Any, litellm_instrumented: Any, server: FakeLLMServer, exporter: Any
) -> None:
    from otel_budget import PriceBook

    processor = make_processor(1.0, prices=PriceBook())
    server.prices.update(DOUBLE)
    server.script(Behaviour(usage_cost=-5.0))
    _litellm_chat(litellm_instrumented, server)
    span = exporter.get_finished_spans()[0]
    assert span.attributes[attrs.COST_SOURCE] == "local"
    assert ledger(processor) == (_our_price(span), 0)
    assert not math.isnan(span.attributes[attrs.COST_USD])
