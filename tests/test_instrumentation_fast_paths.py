"""The per-call shortcuts of the instrumentation answer exactly what the slow reads did.

    PYTHONPATH=src python -m pytest -q tests/test_instrumentation_fast_paths.py

Each shortcut (reading pydantic bodies without ``__getattr__`` misses, materialising without
copying, reading output limits once, caching the server of a client's URL, estimating the
output only when the usage lacks it) is checked against the plain reading it replaces, and
against the ways a caller could make a cached answer stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from otel_budget.instrumentation._util import get, is_model, materialised, server_of
from otel_budget.instrumentation.openai.request import client_info
from otel_budget.instrumentation.openai.response import is_raw
from otel_budget.token_output import output_bound, output_bound_ints, output_limits_are_ints

BODY = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4, "cost": 0.25},
}  # fmt: skip


@pytest.mark.parametrize("build", ["validate", "construct"])
@pytest.mark.parametrize(
    "name", ["model", "usage", "system_fingerprint", "nope", "model_dump", "__next__", "parse"]
)
def test_get_reads_pydantic_models_as_getattr_does(build: str, name: str) -> None:
    body = ChatCompletion.model_validate(BODY) if build == "validate" else ChatCompletion.construct(**BODY)
    assert is_model(body)
    assert get(body, name) == getattr(body, name, None)
    usage = get(body, "usage")
    for field in ("prompt_tokens", "cost", "prompt_tokens_details", "missing"):
        assert get(usage, field) == getattr(usage, field, None)
    assert get(usage, "cost") == 0.25  # an extra field (OpenRouter's bill) is still read


def test_get_reads_private_attributes() -> None:
    from litellm.types.utils import ModelResponse, Usage

    reply = ModelResponse(usage=Usage(prompt_tokens=10, completion_tokens=5, cost=0.1))
    reply._hidden_params = {"x": 1}
    assert get(reply, "_hidden_params") == {"x": 1}
    assert get(get(reply, "usage"), "cost") == 0.1


def test_get_sees_an_extra_set_after_the_first_read() -> None:
    body = ChatCompletion.model_validate(BODY)
    assert get(body, "provider") is None
    body.__pydantic_extra__["provider"] = "openrouter"  # (extras may be set later)
    assert get(body, "provider") == "openrouter"


def test_is_raw_tells_bodies_from_raw_responses() -> None:
    body = ChatCompletion.model_validate({**BODY, "http_response": 1, "parse": 2})
    assert not is_raw(body)  # a body is no raw response, whatever extra keys it carries

    class Raw:
        http_response = object()

        def parse(self) -> Any:
            return body

    assert is_raw(Raw())
    assert not is_raw({"usage": None})


def test_materialised_reads_each_iterator_once_and_never_mutates() -> None:
    parts = iter([{"type": "text", "text": "a"}])
    message = {"role": "user", "content": parts, "name": "x"}
    messages = [message]
    out = materialised(messages)
    assert out is not messages and out[0] is not message
    assert out == [{"role": "user", "content": [{"type": "text", "text": "a"}], "name": "x"}]
    assert list(out[0]) == ["role", "content", "name"]  # key order kept
    assert message["content"] is parts  # the caller's dict is not changed

    plain = [{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text"}]}]
    assert materialised(plain) is plain  # nothing to read: the same objects

    def gen() -> Iterator[dict[str, Any]]:
        yield {"role": "user", "content": iter(["x"])}

    assert materialised(gen()) == [{"role": "user", "content": ["x"]}]


def test_materialised_flat_messages_fast_path_still_reads_what_follows() -> None:
    # Flat messages (dicts of strings) are answered in C; any other item in the list, before
    # or after them, still goes through the general walk.
    flat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {}]
    assert materialised(flat) is flat
    frozen = tuple(flat)
    assert materialised(frozen) is frozen
    later = [*flat, {"role": "user", "content": iter(["late"])}]
    out = materialised(later)
    assert out is not later and out[-1] == {"role": "user", "content": ["late"]}
    assert out[:3] == flat and out[0] is flat[0]

    class Message(dict):  # type: ignore[type-arg]
        pass

    sub = [Message(role="user", content="x"), {"role": "user", "content": iter(["y"])}]
    assert materialised(sub)[1] == {"role": "user", "content": ["y"]}
    none_content = [{"role": "assistant", "content": None, "tool_calls": iter([{"id": "1"}])}]
    assert materialised(none_content)[0]["tool_calls"] == [{"id": "1"}]


def test_request_attributes_in_table_order_only_numbers() -> None:
    from otel_budget.instrumentation._util import request_attributes

    table = {"temperature": "t", "top_p": "p", "seed": "s"}
    assert request_attributes({"model": "m"}, table) == {}
    out = request_attributes({"seed": 7, "model": "m", "temperature": 0.2, "top_p": True}, table)
    assert out == {"t": 0.2, "s": 7} and list(out) == ["t", "s"]  # a bool is no number
    assert request_attributes({"temperature": "hot", "top_p": None}, table) == {}


@pytest.mark.parametrize(
    "params",
    [
        {}, {"max_tokens": 64}, {"max_tokens": 64.5}, {"max_tokens": "100"},
        {"max_completion_tokens": 10, "max_tokens": 20}, {"max_tokens": None},
        {"generation_config": {"max_output_tokens": 7}}, {"config": {"maxOutputTokens": 3.0}},
        {"max_tokens": True}, {"max_tokens": -1}, {"max_tokens": "lots"},
        {"max_tokens": 0}, {"max_completion_tokens": 3000}, {"max_tokens": False},
        {"max_output_tokens": 2**40},
    ],
)
def test_output_bound_ints_is_output_bound_and_ints(params: dict[str, Any]) -> None:
    try:
        expected = (*output_bound(params, 4096), output_limits_are_ints(params))
    except ValueError as exc:
        with pytest.raises(ValueError, match=str(exc).split(",")[0]):
            output_bound_ints(params, 4096)
        return
    assert output_bound_ints(params, 4096) == expected


@pytest.mark.parametrize(
    "params",
    [
        {}, {"max_tokens": 64}, {"max_completion_tokens": 10, "max_tokens": 20},
        {"max_tokens": 20, "max_completion_tokens": 10, "maxTokens": 30},
        {"max_tokens": None, "max_output_tokens": 9}, {"max_tokens": "lots", "maxTokens": -1},
        {"generation_config": {"max_output_tokens": 7}, "max_tokens": 5},
        {"config": {"maxOutputTokens": 3.0}}, {"inferenceConfig": {"maxTokens": 12}},
        {"generationConfig": None, "config": {"max_tokens": True}},
    ],
)
def test_a_plain_dict_reads_its_output_limits_as_any_mapping(params: dict[str, Any]) -> None:
    """A plain dict's limits are looked up in one set operation; any other mapping key by
    key, in the spellings' order: the same limits, the same error (the first bad one)."""
    from types import MappingProxyType

    def read(p: Any) -> Any:
        try:
            return output_bound_ints(p, 4096)
        except ValueError as exc:
            return str(exc)

    assert read(params) == read(MappingProxyType(params))


def test_server_of_follows_a_client_whose_base_url_changes() -> None:
    client = openai.OpenAI(base_url="http://127.0.0.1:8001/v1", api_key="x")
    assert server_of(client) == ("127.0.0.1", 8001)
    assert server_of(client) == ("127.0.0.1", 8001)  # (cached)
    client.base_url = "https://example.test/v1"  # type: ignore[assignment]
    assert server_of(client) == ("example.test", 443)
    azure = openai.AzureOpenAI(
        azure_endpoint="https://x.openai.azure.com", api_key="k", api_version="2024-06-01"
    )
    assert client_info(azure.chat.completions)[0] == "azure.ai.openai"
    assert client_info(client.chat.completions)[0] == "openai"


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40},
    {"prompt_tokens": 900, "completion_tokens": 500, "total_tokens": 1400,
     "prompt_tokens_details": {"cached_tokens": 512, "audio_tokens": 100},
     "completion_tokens_details": {"reasoning_tokens": 300, "audio_tokens": 50}},
    {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12, "cost": 0.5},  # an extra
    {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
     "prompt_tokens_details": {"cached_tokens": 64}},  # details above the total: raised
])  # fmt: skip
def test_parsed_usage_reads_as_its_json(usage: dict[str, Any]) -> None:
    """The SDK's parsed usage (read straight from the model's fields) charges exactly what
    the same usage as plain JSON (read key by key) does."""
    from openai.types import CompletionUsage

    from otel_budget.instrumentation.openai.response import chat_usage

    parsed = CompletionUsage.model_validate(usage)
    assert is_model(parsed)
    assert chat_usage(parsed) == chat_usage(usage)
    assert chat_usage(parsed) == chat_usage(parsed.model_dump())


def test_fields_reads_what_get_reads() -> None:
    """``Fields`` (declared fields in one step) answers exactly what ``get`` does, for a
    parsed body holding every name, one lacking some (legacy Completion: no service_tier;
    an extra), a dict and None."""
    from openai.types import Completion

    from otel_budget.instrumentation._util import Fields

    names = ("id", "model", "service_tier", "system_fingerprint", "choices", "extra_thing")
    completion = Completion.model_validate({
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [], "extra_thing": 7})  # fmt: skip
    chat = ChatCompletion.model_validate({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [],
        "service_tier": "flex"})  # fmt: skip
    for obj in (completion, chat, completion.model_dump(), None):
        assert Fields(*names)(obj) == tuple(get(obj, n) for n in names)
        assert Fields(*names[:5])(obj) == tuple(get(obj, n) for n in names[:5])
        assert Fields("id")(obj) == (get(obj, "id"),)


# -- issue 11, second round: shortcuts on every call ------------------------------------------
FLAT_MESSAGES: list[Any] = [
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}],
    [{"role": "user", "content": "hi", "name": "alice"}],
    [{"role": "assistant", "content": None}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "data:image/png;base64,iVBORw0KGgo="}],  # a data URL: media
    [{"role": "user", "content": "x", "cache_control": "ephemeral"}],  # a skipped key
    # Not flat: left to the general walk (a list of parts, a media key, a typed block).
    [{"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "parts"}]}],
    [{"role": "user", "image_url": "https://example.com/a.png"}],
    [{"type": "text", "text": "a block"}],
]  # fmt: skip


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-5-haiku-latest"])
@pytest.mark.parametrize("messages", FLAT_MESSAGES)
def test_flat_messages_estimate_as_the_general_walk_does(
    monkeypatch: pytest.MonkeyPatch, model: str, messages: list[Any]
) -> None:
    from otel_budget.token_walk import _Walk, estimate_input_tokens

    fast = estimate_input_tokens(model, messages=messages)
    monkeypatch.setattr(_Walk, "flat_texts", lambda self, d: False)  # the general walk only
    slow = estimate_input_tokens(model, messages=messages)
    assert (fast, fast.media_tokens, fast.media_assumed, fast.audio_tokens) == (
        slow, slow.media_tokens, slow.media_assumed, slow.audio_tokens,
    )  # fmt: skip


def test_flat_messages_skip_the_general_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    from otel_budget.token_walk import _Walk, estimate_input_tokens

    walked: list[Any] = []
    general = _Walk.add
    monkeypatch.setattr(_Walk, "add", lambda self, obj: (walked.append(obj), general(self, obj)))
    estimate_input_tokens("gpt-4o-mini", messages=FLAT_MESSAGES[0])
    assert walked == []
    estimate_input_tokens("gpt-4o-mini", messages=FLAT_MESSAGES[5])
    assert walked == FLAT_MESSAGES[5]


def test_content_mode_follows_the_environment_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mode is read from ``os.environ``'s own dict on every call: a change (or a stand-in
    mapping patched over ``os.environ``) is seen by the next call."""
    import os

    from otel_budget.instrumentation import _content

    monkeypatch.delenv(_content.CAPTURE_CONTENT_ENV, raising=False)
    monkeypatch.delenv(_content.EMIT_EVENT_ENV, raising=False)
    assert _content.content_mode() == _content.OFF
    monkeypatch.setenv(_content.CAPTURE_CONTENT_ENV, " span_and_event ")
    assert _content.content_mode() == _content.ContentMode(True, True, True)
    monkeypatch.setenv(_content.EMIT_EVENT_ENV, "false")
    assert _content.content_mode() == _content.ContentMode(True, False, False)
    monkeypatch.delenv(_content.EMIT_EVENT_ENV)
    monkeypatch.setattr(os, "environ", {_content.CAPTURE_CONTENT_ENV: "EVENT_ONLY"})
    assert _content.content_mode() == _content.ContentMode(False, True, True)


def test_call_label_sets_are_the_call_labels_shared() -> None:
    from otel_budget.metrics import BudgetMetrics

    metrics = BudgetMetrics()
    kw: dict[str, Any] = {
        "operation": "chat", "provider": "openai", "model": "gpt-4o-mini",
        "response_model": "gpt-4o-mini-2024-07-18", "server_address": "api.openai.com",
        "server_port": 443, "extra": {"openai.response.service_tier": "default"},
    }  # fmt: skip
    labels, inp, out = metrics.call_label_sets(**kw)
    assert labels == BudgetMetrics.call_labels(**kw)
    assert inp == {**labels, "gen_ai.token.type": "input"}
    assert out == {**labels, "gen_ai.token.type": "output"}
    again = metrics.call_label_sets(**{**kw, "extra": dict(kw["extra"])})
    assert again[0] is labels and again[1] is inp and again[2] is out
    other = metrics.call_label_sets(**{**kw, "response_model": None})
    assert other[0] == BudgetMetrics.call_labels(**{**kw, "response_model": None})
    odd = metrics.call_label_sets(**{**kw, "extra": {"x": ["unhashable"]}})  # built, not kept
    assert odd[0]["x"] == ["unhashable"]


def test_server_of_reads_the_url_behind_a_plain_base_url_property() -> None:
    """openai's ``base_url`` property (an import statement per read) returns ``_base_url``
    as it is: after one read that shows it, the attribute is read directly; a client class
    whose property computes something else keeps being read through it."""
    reads: list[str] = []

    class Plain(openai.OpenAI):
        @property
        def base_url(self) -> Any:
            reads.append("plain")
            return self._base_url

        @base_url.setter
        def base_url(self, url: Any) -> None:
            openai.OpenAI.base_url.fset(self, url)  # type: ignore[attr-defined]

    class Routed(openai.OpenAI):
        @property
        def base_url(self) -> Any:
            reads.append("routed")
            return self._base_url.copy_with(host="router.test")

    plain = Plain(base_url="http://127.0.0.1:8001/v1", api_key="x")
    for _ in range(3):
        assert server_of(plain) == ("127.0.0.1", 8001)
    plain.base_url = "https://example.test/v1"
    assert server_of(plain) == ("example.test", 443)
    routed = Routed(base_url="http://127.0.0.1:8001/v1", api_key="x")
    for _ in range(3):
        assert server_of(routed) == ("router.test", 8001)
    assert reads.count("plain") == 1 and reads.count("routed") == 3


@pytest.mark.parametrize("completion_tokens", [10, 0])
def test_output_text_is_read_only_when_the_usage_lacks_output(completion_tokens: int) -> None:
    """The text estimates the output only when the usage reports none: otherwise it is not
    read at all (None), and the charge is the same."""
    from types import SimpleNamespace

    from otel_budget.instrumentation.openai.response import read_body

    call: Any = SimpleNamespace(request=SimpleNamespace(content=None), processor=None,
                                metric_attributes={})  # fmt: skip
    body = ChatCompletion.model_validate({
        **BODY, "usage": {"prompt_tokens": 3, "completion_tokens": completion_tokens,
                          "total_tokens": 3 + completion_tokens},
    })  # fmt: skip
    usage, _, text = read_body(call, body, "chat")
    assert usage is not None and usage.output_tokens == completion_tokens
    assert text == (None if completion_tokens else "hi")


@pytest.mark.parametrize("output", [True, False])
@pytest.mark.parametrize("usage", [
    {"input_tokens": 30, "output_tokens": 10},
    {"input_tokens": 0, "output_tokens": 0},
    {"input_tokens": 900, "output_tokens": 500, "cache_read_tokens": 512,
     "cache_write_tokens": 64, "reasoning_tokens": 300},
    {"input_tokens": 2**63, "output_tokens": 2**64, "cache_read_tokens": 2**63,
     "reasoning_tokens": 5},
])  # fmt: skip
def test_usage_attributes_are_the_reported_counts(usage: dict[str, int], output: bool) -> None:
    """``gen_ai.usage.*`` from a usage: input (and output) always, cache and reasoning counts
    when nonzero, any count no int64 attribute holds left out (the rule as first written)."""
    from otel_budget.instrumentation._call import usage_attributes
    from otel_budget.pricing import TokenUsage

    u = TokenUsage(**usage)
    counts: list[tuple[str, int | None]] = [("gen_ai.usage.input_tokens", u.input_tokens)]
    if output:
        counts.append(("gen_ai.usage.output_tokens", u.output_tokens))
    counts += [
        ("gen_ai.usage.cache_read.input_tokens", u.cache_read_tokens or None),
        ("gen_ai.usage.cache_write.input_tokens", u.cache_write_tokens or None),
        ("gen_ai.usage.reasoning.output_tokens", u.reasoning_tokens or None),
    ]
    expected = {k: v for k, v in counts if v is not None and v <= 2**63 - 1}
    got = usage_attributes(u, output)
    assert got == expected and list(got) == list(expected)


# -- stream chunks: the SDK's parsed chunks read as their JSON -----------------------------------
def _chunks() -> list[dict[str, Any]]:
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini-2024-07-18", "service_tier": "default"}  # fmt: skip
    return [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "Hello"}},
                             {"index": 1, "delta": {"refusal": "no"}}]},  # fmt: skip
        {**base, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t",
            "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"},
                             {"index": 1, "delta": {}, "finish_reason": "stop"}]},  # fmt: skip
        {**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5,
            "total_tokens": 17, "completion_tokens_details": {"reasoning_tokens": 2}},
         "provider_extra": 1},
    ]  # fmt: skip


def test_chunk_accumulator_reads_parsed_chunks_as_their_json() -> None:
    """The SDK's parsed chunks read exactly as the same chunks as dicts (and as models built
    without some fields: ``model_construct``)."""
    from openai.types.chat import ChatCompletionChunk

    from otel_budget.instrumentation._util import ChatChunkAccumulator, usage_only
    from otel_budget.instrumentation.openai.response import chat_usage

    def read(chunks: list[Any]) -> tuple[Any, ...]:
        acc = ChatChunkAccumulator(chat_usage, tier_attribute="openai.response.service_tier")
        flags = []
        for chunk in chunks:
            acc.add(chunk)
            flags.append(usage_only(chunk))
        return acc.text(), acc.units, acc.usage, acc.response_model, acc.attributes(), flags

    dicts = _chunks()
    parsed = [ChatCompletionChunk.model_validate(c) for c in dicts]
    assert all(is_model(c) for c in parsed)
    expected = read(dicts)
    assert expected[0] == 'Hellono{"a": 1}' and expected[1] == 3
    assert expected[2] is not None and expected[2].reasoning_tokens == 2
    assert expected[5] == [False, False, False, False, True]
    assert read(parsed) == expected
    assert read([c.model_dump() for c in parsed]) == expected
    # Built without validation and without some fields: the generic readers answer those.
    sparse = [ChatCompletionChunk.model_construct(**{k: v for k, v in c.items() if k != "usage"})
              for c in dicts]  # fmt: skip
    assert read(sparse)[:2] == expected[:2] and read(sparse)[5] == [False] * 5
