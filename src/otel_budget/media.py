"""Image input tokens as the providers bill them, from the image header alone.

    >>> from otel_budget.media import image_size, image_tokens
    >>> image_tokens("gpt-4o", 1024, 1024, "high")       # OpenAI's documented example
    (765, False)
    >>> image_tokens("gpt-4o", None, None, "high")       # size unknown: the model's worst case
    (1445, True)
    >>> image_tokens("claude-sonnet-4-5", 1000, 1000)
    (1334, False)
    >>> ihdr = (640).to_bytes(4, "big") + (480).to_bytes(4, "big")
    >>> image_size(bytes.fromhex("89504e470d0a1a0a0000000d49484452") + ihdr)
    (640, 480)

``image_size`` reads the width and height from the first bytes of a PNG, JPEG, GIF or WebP
image (or from its base64 text, decoding only the bytes it reads) and returns ``None`` for
anything it cannot read; it never raises and never decodes pixels. ``image_tokens`` turns a
size into the tokens the provider bills, an upper bound:

* OpenAI tile models (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1/o3, computer-use, gpt-image-1, and
  gpt-4o-mini with its 2,833 + 5,667 per tile): ``detail="low"`` is the base charge; ``high``
  and ``auto`` fit the image in 2048x2048, scale its shortest side down to 768 (512 for
  gpt-image-1) and add one tile charge per 512 px square.
* OpenAI patch models (gpt-4.1-mini/nano, gpt-5-mini/nano, o4-mini): 32 px patches, at most
  1,536 after the documented downscale, times the model's multiplier (1.62, 2.46, 1.72).
  gpt-4.1 appears in both descriptions: the larger count is used.
* Anthropic (``claude-*``): the image is scaled to at most 1568 px on the long side (2576 px
  for Claude Opus 4.7 and later models), then ``max(w*h/750, ceil(w/28) * ceil(h/28))``,
  at most 1,640 tokens (5,001 for the high-resolution models).
* Any other model: the flat ``DEFAULT_IMAGE_TOKENS``, flagged as assumed.

When the size is unknown (a remote URL, a file id, unreadable data) the answer is the worst
case for that model and detail, flagged as assumed (the second item of the result).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "DEFAULT_IMAGE_TOKENS",
    "image_size",
    "image_size_b64",
    "image_tokens",
]

DEFAULT_IMAGE_TOKENS = 1600

# --- image headers ----------------------------------------------------------------------------
_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic ...); not DHT (C4),
# JPG (C8) or DAC (CC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_MAX_JPEG_SEGMENTS = 512
_MAX_SIDE = 1 << 24  # larger "sizes" are garbage, not images
_NOT_B64 = re.compile(r"[^A-Za-z0-9+/=]")
# Base64 with line breaks is decoded from its start, at most this many characters (JPEG frame
# headers follow EXIF/ICC segments of up to 64 KB each; 4 MB covers dozens of them).
_MAX_WRAPPED_CHARS = 4 << 20


class _Bytes:
    """Random access to an image held as bytes or as base64 text (decoded on demand)."""

    __slots__ = ("_raw", "_b64", "_at", "_clean")

    def __init__(self, raw: bytes | None = None, b64: str | None = None, at: int = 0) -> None:
        self._raw = raw
        self._b64 = b64  # the base64 starts at index ``at`` (a data URL is not copied)
        self._at = at
        self._clean = at  # b64[at:_clean] holds base64 characters only

    def read(self, pos: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` (fewer at the end of the data)."""
        if self._raw is not None:
            return self._raw[pos : pos + n]
        b64 = self._b64
        assert b64 is not None
        # 4 base64 characters hold 3 bytes: decode only the aligned groups covering the range,
        # once every character before them is known to be base64 (no line breaks shifting it).
        start, end = self._at + pos // 3 * 4, self._at + (pos + n + 2) // 3 * 4
        if end > self._clean:
            if _NOT_B64.search(b64, self._clean, end) is not None:
                return self._unwrap()[pos : pos + n]
            self._clean = end
        text = b64[start:end]
        try:
            data = base64.b64decode(text[: len(text) // 4 * 4], validate=True)
        except (binascii.Error, ValueError):  # padding in the middle: the data ends there
            return b""
        skip = pos % 3
        return data[skip : skip + n]

    def _unwrap(self) -> bytes:
        """Base64 with line breaks or junk: drop them and decode the start, once."""
        text = self._b64[self._at : self._at + _MAX_WRAPPED_CHARS]  # type: ignore[index]
        text = _NOT_B64.sub("", text).rstrip("=")
        text = text[: len(text) // 4 * 4]
        self._raw = base64.b64decode(text, validate=False)
        return self._raw


def _size(src: _Bytes) -> tuple[int, int] | None:
    head = src.read(0, 32)
    if head.startswith(_PNG) and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
            return (
                int.from_bytes(head[26:28], "little") & 0x3FFF,
                int.from_bytes(head[28:30], "little") & 0x3FFF,
            )
        if chunk == b"VP8L" and head[20] == 0x2F:
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        return None
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(src)
    return None


def _jpeg_size(src: _Bytes) -> tuple[int, int] | None:
    pos = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        head = src.read(pos, 2)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == 0xD9:  # end of image before any frame
            return None
        seg = src.read(pos + 2, 7)
        if len(seg) < 2:
            return None
        length = int.from_bytes(seg[0:2], "big")
        if length < 2:
            return None
        if marker in _SOF:
            if len(seg) < 7:
                return None
            return int.from_bytes(seg[5:7], "big"), int.from_bytes(seg[3:5], "big")
        pos += 2 + length
    return None


def _checked(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    w, h = size
    if not (0 < w <= _MAX_SIDE and 0 < h <= _MAX_SIDE):
        return None  # a height of 0 (JPEG DNL) or garbage: unknown
    return w, h


def image_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """``(width, height)`` of a PNG, JPEG, GIF or WebP image, or ``None``. Never raises."""
    try:
        return _checked(_size(_Bytes(raw=bytes(data[:1 << 20]) if len(data) > 1 << 20 else bytes(data))))
    except Exception:
        return None


def image_size_b64(text: str, start: int = 0) -> tuple[int, int] | None:
    """:func:`image_size` of base64 text from index ``start`` (a data URL's payload), decoding
    only what it reads."""
    try:
        if not isinstance(text, str):
            return None
        while start < len(text) and text[start].isspace():
            start += 1
        return _checked(_size(_Bytes(b64=text, at=start)))
    except Exception:
        return None


# --- provider formulas ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Tiles:
    base: int  # the low-detail charge, and the high-detail base
    tile: int  # per 512 px tile
    short_side: int = 768


@dataclass(frozen=True, slots=True)
class _Patches:
    percent: int  # the multiplier, in hundredths (exact integer arithmetic)


@dataclass(frozen=True, slots=True)
class _Claude:
    long_side: int
    cap: int


# OpenAI's published table (vision guide, "Calculating costs"), longest prefix first.
_GPT4O_TILES = _Tiles(85, 170)
_OPENAI_FAMILIES: tuple[tuple[str, tuple[_Tiles | _Patches, ...]], ...] = (
    ("gpt-4o-mini", (_Tiles(2833, 5667),)),
    ("gpt-4.1-mini", (_Patches(162),)),
    ("gpt-4.1-nano", (_Patches(246),)),
    ("gpt-4.1", (_GPT4O_TILES, _Patches(100))),
    ("gpt-5-mini", (_Patches(162),)),
    ("gpt-5-nano", (_Patches(246),)),
    ("o4-mini", (_Patches(172),)),
    ("gpt-4o", (_GPT4O_TILES,)),
    ("chatgpt-4o", (_GPT4O_TILES,)),
    ("gpt-4.5", (_GPT4O_TILES,)),
    ("gpt-4-turbo", (_GPT4O_TILES,)),
    ("gpt-4-vision", (_GPT4O_TILES,)),
    # gpt-5 is documented at 70 + 140 per tile; later gpt-5.x were reported billed ~1.2x that:
    # the gpt-4o charge covers both.
    ("gpt-5", (_GPT4O_TILES,)),
    ("o1", (_Tiles(75, 150),)),
    ("o3", (_Tiles(75, 150),)),
    ("computer-use", (_Tiles(65, 129),)),
    ("gpt-image-1", (_Tiles(65, 129, short_side=512),)),
)
# An OpenAI model not in the table: the largest of the common charges.
_OPENAI_UNKNOWN = (_GPT4O_TILES, _Patches(246))
_OPENAI_NAME = re.compile(r"^(?:ft:)?(?:gpt-|o\d|chatgpt-|computer-use)")
_PATCH = 32
_PATCH_CAP = 1536

# Claude: 1568 px / ~1,600 tokens up to the 4.6 models, 2576 px / 4,784 tokens from Opus 4.7 on
# (a newer model not listed as old is assumed to see high resolution).
_CLAUDE_OLD = re.compile(
    r"claude-(?:[23](?![0-9])|instant|(?:opus|sonnet|haiku)-4(?:[-.][0-6](?![0-9])|-\d{8}|@|$))"
)
# Caps: the largest w*h/750 of an image within the native resolution (784 x 1568 is 1,640 by
# area, 1,568 by patches; 4,784 patches of 28 x 28 px are at most 5,001 by area).
_CLAUDE_LOW = _Claude(1568, 1640)
_CLAUDE_HIGH = _Claude(2576, 5001)


def _strip(model: str) -> str:
    m = model.strip().lower()
    while "/" in m and m.split("/", 1)[0] in ("openai", "azure", "anthropic", "litellm"):
        m = m.split("/", 1)[1]
    return m


@lru_cache(maxsize=1024)
def _rules(model: str) -> tuple[_Tiles | _Patches | _Claude, ...] | None:
    m = _strip(model)
    if "claude" in m:
        return (_CLAUDE_LOW,) if _CLAUDE_OLD.search(m) else (_CLAUDE_HIGH,)
    bare = m[3:] if m.startswith("ft:") else m
    for prefix, rules in _OPENAI_FAMILIES:
        if bare.startswith(prefix):
            return rules
    if _OPENAI_NAME.match(m):
        return _OPENAI_UNKNOWN
    return None


def _tiles(rule: _Tiles, w: int | None, h: int | None, detail: str) -> int:
    if detail == "low":
        return rule.base
    if w is None or h is None:
        # Worst case: the long side fits in 2048, the short side is at most `short_side`.
        across = math.ceil(min(2048, rule.short_side) / 512)
        return rule.base + rule.tile * across * 4
    fw, fh = float(w), float(h)
    if max(fw, fh) > 2048:
        s = 2048 / max(fw, fh)
        fw, fh = fw * s, fh * s
    if min(fw, fh) > rule.short_side:
        s = rule.short_side / min(fw, fh)
        fw, fh = fw * s, fh * s
    # A hair of slack: float error must never drop a tile OpenAI counts.
    n = math.ceil(fw / 512 - 1e-9) * math.ceil(fh / 512 - 1e-9)
    return rule.base + rule.tile * max(1, n)


def _patches(rule: _Patches, w: int | None, h: int | None) -> int:
    if w is None or h is None:
        n = _PATCH_CAP
    else:
        n = math.ceil(w / _PATCH) * math.ceil(h / _PATCH)
        if n > _PATCH_CAP:
            # The documented downscale: to about the cap, then to whole patches across.
            s = math.sqrt(_PATCH_CAP * _PATCH * _PATCH / (w * h))
            fw, fh = w * s, h * s
            s2 = min(math.floor(fw / _PATCH) / (fw / _PATCH), math.floor(fh / _PATCH) / (fh / _PATCH))
            fw, fh = fw * s2, fh * s2
            n = min(_PATCH_CAP, math.ceil(fw / _PATCH - 1e-9) * math.ceil(fh / _PATCH - 1e-9))
    return -(-n * rule.percent // 100)


def _claude(rule: _Claude, w: int | None, h: int | None) -> int:
    if w is None or h is None:
        return rule.cap
    fw, fh = float(w), float(h)
    if max(fw, fh) > rule.long_side:
        s = rule.long_side / max(fw, fh)
        fw, fh = math.ceil(fw * s), math.ceil(fh * s)
    by_area = math.ceil(fw * fh / 750)
    by_patch = math.ceil(fw / 28) * math.ceil(fh / 28)
    return min(rule.cap, max(by_area, by_patch, 1))


def image_tokens(
    model: str | None, width: int | None, height: int | None, detail: str | None = None
) -> tuple[int, bool]:
    """``(tokens, assumed)`` for one image input of ``model``; an upper bound of the bill.

    ``width``/``height`` ``None`` means the size is unknown: the worst case for the model and
    ``detail`` (``"low"``, ``"high"``, ``"auto"`` or ``None`` = auto), with ``assumed`` True.
    Models without a known formula get ``DEFAULT_IMAGE_TOKENS``, assumed.
    """
    rules = _rules(model) if isinstance(model, str) and model else None
    if rules is None:
        return DEFAULT_IMAGE_TOKENS, True
    if width is None or height is None or width <= 0 or height <= 0:
        width = height = None
    d = detail.strip().lower() if isinstance(detail, str) else "auto"
    best = 0
    for rule in rules:
        if isinstance(rule, _Tiles):
            n = _tiles(rule, width, height, d)
        elif isinstance(rule, _Patches):
            n = _patches(rule, width, height)
        else:
            n = _claude(rule, width, height)
        best = max(best, n)
    # A low-detail tile image costs its base whatever its size: nothing was assumed.
    known = width is not None or (d == "low" and all(isinstance(r, _Tiles) for r in rules))
    return best, not known
