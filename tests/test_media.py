"""Image input tokens: the providers' formulas, image header parsing, and the request walker."""

from __future__ import annotations

import base64
import math
import random
import struct
import zlib
from typing import Any

import pytest

from otel_budget import media
from otel_budget.media import DEFAULT_IMAGE_TOKENS, image_size, image_size_b64, image_tokens
from otel_budget.tokens import estimate_input_tokens

# Header prefixes of real files written by Pillow 13.0 (1234 x 567 pixels): everything up to the
# bytes a parser needs (for JPEG: through the start-of-frame segment).
REAL_HEADERS = {
    "png": "89504e470d0a1a0a0000000d49484452000004d2000002370802000000d134e18f",
    "gif": "474946383761d2043702870000",
    "webp_lossy": "524946464c050000574542505650382040050000909a009d012ad20437023e6d",
    "webp_lossless": "5249464642000000574542505650384c350000002fd1848d0007508f22d7a3ff",
    "webp_alpha_vp8x": "524946467c05000057454250565038580a00000010000000d10400360200414c",
    "jpeg_baseline": (
        "ffd8ffe000104a46494600010100000100010000ffdb00430006040506050406060506070706080a"
        "100a0a09090a140e0f0c1017141818171416161a1d251f1a1b231c1616202c20232627292a29191f"
        "2d302d283025282928ffdb0043010707070a080a130a0a13281a161a282828282828282828282828"
        "2828282828282828282828282828282828282828282828282828282828282828282828282828ffc0"
        "001108023704d203012200021101031101"
    ),
    "jpeg_progressive": (
        "ffd8ffe000104a46494600010100000100010000ffdb004300080606070605080707070909080a0c"
        "140d0c0b0b0c1912130f141d1a1f1e1d1a1c1c20242e2720222c231c1c2837292c30313434341f27"
        "393d38323c2e333432ffdb0043010909090c0b0c180d0d1832211c21323232323232323232323232"
        "3232323232323232323232323232323232323232323232323232323232323232323232323232ffc2"
        "001108023704d203012200021101031101"
    ),
}


def png(width: int, height: int) -> bytes:
    """A complete, valid PNG of ``width`` x ``height`` (one grey channel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_header(width: int, height: int) -> bytes:
    """Just the signature and IHDR: all a size reader looks at."""
    return b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)


def jpeg_with_big_segments(width: int, height: int) -> bytes:
    """SOI, JFIF, an 8 KB EXIF APP1, a 3 KB ICC APP2, fill bytes, then the frame header."""
    soi = b"\xff\xd8"
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    app1 = b"\xff\xe1" + struct.pack(">H", 8002) + b"Exif\0\0" + b"\x2a" * 7994
    app2 = b"\xff\xe2" + struct.pack(">H", 3002) + b"ICC_PROFILE\0" + b"\0" * 2988
    sof = b"\xff\xff\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return soi + app0 + app1 + app2 + sof + b"\xff\xda" + b"\0" * 64


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# --------------------------------------------------------------------------- OpenAI formulas


@pytest.mark.parametrize(
    ("model", "size", "detail", "tokens"),
    [
        # OpenAI's documented examples (vision guide, "Calculating costs").
        ("gpt-4o", (1024, 1024), "high", 765),
        ("gpt-4o", (2048, 4096), "high", 1105),
        ("gpt-4o", (4096, 8192), "low", 85),
        ("gpt-4o-2024-08-06", (1024, 1024), "auto", 765),  # auto is priced as high
        ("gpt-4o", (1024, 1024), None, 765),
        ("gpt-4o", (500, 500), "high", 255),  # one tile, no upscaling
        ("gpt-4o", (513, 500), "high", 425),
        ("gpt-4.5-preview", (1024, 1024), "high", 765),
        # gpt-4o-mini: 2,833 base + 5,667 per tile.
        ("gpt-4o-mini", (1024, 1024), "high", 2833 + 4 * 5667),
        ("gpt-4o-mini-2024-07-18", (4096, 8192), "low", 2833),
        ("ft:gpt-4o-mini-2024-07-18:org::abc", (1024, 1024), "high", 25501),
        # o1/o3: 75 + 150 per tile; computer-use: 65 + 129; gpt-image-1: shortest side 512.
        ("o1", (1024, 1024), "high", 75 + 4 * 150),
        ("o3-2025-04-16", (2048, 4096), "high", 75 + 6 * 150),
        ("computer-use-preview", (1024, 1024), "high", 65 + 4 * 129),
        ("gpt-image-1", (1024, 1024), "high", 65 + 129),
        # Patch models: ceil(w/32) * ceil(h/32), at most 1,536 after the downscale, x multiplier.
        ("gpt-4.1-mini", (1024, 1024), "high", math.ceil(1024 * 1.62)),
        ("gpt-4.1-mini", (1800, 2400), "high", math.ceil(1452 * 1.62)),
        ("gpt-4.1-nano", (1024, 1024), "low", math.ceil(1024 * 2.46)),
        ("gpt-5-mini", (1024, 1024), "high", math.ceil(1024 * 1.62)),
        ("gpt-5-nano-2025-08-07", (1024, 1024), "high", math.ceil(1024 * 2.46)),
        ("o4-mini", (1024, 1024), "high", math.ceil(1024 * 1.72)),
        # gpt-4.1 is documented both ways: the larger of 1 token per patch and the gpt-4o tiles.
        ("gpt-4.1", (1024, 1024), "high", 1024),
        ("gpt-4.1", (1800, 2400), "high", 1452),
        ("gpt-4.1-2025-04-14", (100, 100), "low", 85),
        ("openai/gpt-4o", (1024, 1024), "high", 765),
        ("azure/gpt-4o", (1024, 1024), "high", 765),
    ],
)
def test_openai_documented_examples(model: str, size: tuple[int, int], detail: str | None, tokens: int) -> None:
    assert image_tokens(model, *size, detail) == (tokens, False)


@pytest.mark.parametrize(
    ("model", "detail", "worst"),
    [
        ("gpt-4o", "high", 85 + 8 * 170),  # 768 x 2048 after the resize: 2 x 4 tiles
        ("gpt-4o", None, 85 + 8 * 170),
        ("gpt-4o-mini", "auto", 2833 + 8 * 5667),
        ("o1", "high", 75 + 8 * 150),
        ("gpt-image-1", "high", 65 + 4 * 129),
        ("gpt-4.1-mini", "high", math.ceil(1536 * 1.62)),
        ("gpt-4.1-nano", "low", math.ceil(1536 * 2.46)),
        ("gpt-4.1", "high", 1536),
        ("gpt-realtime", "high", math.ceil(1536 * 2.46)),  # an OpenAI model not in the table
    ],
)
def test_openai_unknown_size_is_the_worst_case(model: str, detail: str | None, worst: int) -> None:
    assert image_tokens(model, None, None, detail) == (worst, True)
    # ... and no size gives more.
    rnd = random.Random(5)
    for _ in range(300):
        w, h = rnd.randint(1, 9000), rnd.randint(1, 9000)
        assert image_tokens(model, w, h, detail)[0] <= worst


def test_low_detail_needs_no_size_for_tile_models() -> None:
    assert image_tokens("gpt-4o", None, None, "low") == (85, False)
    assert image_tokens("gpt-4o-mini", None, None, "LOW") == (2833, False)
    # Patch models have no low-detail price: the worst case, assumed.
    assert image_tokens("gpt-4.1-mini", None, None, "low") == (math.ceil(1536 * 1.62), True)


def _documented_tiles(w: int, h: int, base: int, tile: int) -> int:
    """The documented tile algorithm, with the integer truncation a server would use."""
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = max(1, int(w * s)), max(1, int(h * s))
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = max(1, int(w * s)), max(1, int(h * s))
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def _documented_patches(w: int, h: int) -> int:
    n = math.ceil(w / 32) * math.ceil(h / 32)
    if n <= 1536:
        return n
    s = math.sqrt(1536 * 32 * 32 / (w * h))
    w1, h1 = w * s, h * s
    s2 = min(math.floor(w1 / 32) / (w1 / 32), math.floor(h1 / 32) / (h1 / 32))
    return min(1536, math.ceil(int(w1 * s2) / 32) * math.ceil(int(h1 * s2) / 32))


def test_never_under_the_documented_algorithms() -> None:
    rnd = random.Random(17)
    sizes = [(rnd.randint(1, 8000), rnd.randint(1, 8000)) for _ in range(2000)]
    sizes += [(512 * a, 512 * b) for a in range(1, 9) for b in range(1, 9)]
    sizes += [(768 * a + d, 512 * b + d) for a in range(1, 4) for b in range(1, 9) for d in (-1, 0, 1)]
    for w, h in sizes:
        ours = image_tokens("gpt-4o", w, h, "high")[0]
        want = _documented_tiles(w, h, 85, 170)
        assert want <= ours <= want + 4 * 170, (w, h)  # at most a row of tiles over (rounding)
        ours = image_tokens("gpt-4.1-mini", w, h, "high")[0]
        assert -(-_documented_patches(w, h) * 162 // 100) <= ours <= -(-1536 * 162 // 100), (w, h)


# --------------------------------------------------------------------------- Anthropic


@pytest.mark.parametrize(
    ("model", "size", "tokens"),
    [
        # Anthropic's table: ~54 (200 x 200), ~1334 (1000 x 1000), ~1590 (1092 x 1092). The 28 px
        # patch count with padding is the other published rule: the larger of the two is used.
        ("claude-sonnet-4-5", (200, 200), 64),
        ("claude-sonnet-4-5", (1000, 1000), 1334),
        ("claude-sonnet-4-5-20250929", (1092, 1092), 1590),
        ("claude-3-5-sonnet-latest", (784, 1568), math.ceil(784 * 1568 / 750)),  # 1,640
        # Larger images are scaled down first: at most 1,568 patches (1,640 by area).
        ("claude-opus-4-6", (4000, 3000), 1640),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", (8000, 8000), 1640),
        ("claude-opus-4-20250514", (1568, 1568), 1640),
        # Opus 4.7 sees up to 2576 px / 4,784 patches (5,001 by area).
        ("claude-opus-4-7", (1000, 1000), 1334),
        ("claude-opus-4-7", (2000, 2000), 5001),
        ("claude-opus-4-7", (2576, 100), math.ceil(2576 / 28) * 4),
    ],
)
def test_anthropic_formula(model: str, size: tuple[int, int], tokens: int) -> None:
    assert image_tokens(model, *size) == (tokens, False)


def test_anthropic_unknown_size_and_later_models() -> None:
    assert image_tokens("claude-sonnet-4-5", None, None) == (1640, True)
    assert image_tokens("claude-haiku-4-5", None, None, "low") == (1640, True)  # no detail here
    # A model newer than the list of low-resolution ones is assumed to see high resolution.
    assert image_tokens("claude-sonnet-5", None, None) == (5001, True)
    assert image_tokens("anthropic/claude-opus-4.7", None, None) == (5001, True)
    assert image_tokens("claude-sonnet-4.5", None, None) == (1640, True)


def test_models_without_a_formula_get_the_flat_charge_flagged() -> None:
    for model in ("gemini-2.5-flash", "mistral-large-latest", "llama3", "", None):
        assert image_tokens(model, 1024, 1024) == (DEFAULT_IMAGE_TOKENS, True)


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("name", sorted(REAL_HEADERS))
def test_real_headers(name: str) -> None:
    data = bytes.fromhex(REAL_HEADERS[name])
    assert image_size(data) == (1234, 567)
    assert image_size_b64(base64.b64encode(data).decode()) == (1234, 567)
    # A base64 payload with line breaks (MIME style) is read too.
    wrapped = base64.encodebytes(data + b"\0" * 200).decode()
    assert "\n" in wrapped
    assert image_size_b64(wrapped) == (1234, 567)


@pytest.mark.parametrize("name", sorted(REAL_HEADERS))
def test_truncated_headers_never_raise(name: str) -> None:
    data = bytes.fromhex(REAL_HEADERS[name])
    for n in range(len(data)):
        assert image_size(data[:n]) in (None, (1234, 567))
        assert image_size_b64(base64.b64encode(data[:n]).decode()) in (None, (1234, 567))
        assert image_size_b64(base64.b64encode(data[:n]).decode()[:-1]) in (None, (1234, 567))


def test_complete_png_and_jpeg_with_large_segments() -> None:
    assert image_size(png(3, 2)) == (3, 2)
    big = jpeg_with_big_segments(4032, 3024)
    assert image_size(big) == (4032, 3024)
    assert image_size_b64(base64.b64encode(big).decode()) == (4032, 3024)


def test_corrupt_data_never_raises() -> None:
    rnd = random.Random(3)
    corrupt = [
        b"", b"\x89PNG", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"\xff\xd8", b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe0\x00\x00",  # segment length 0
        b"\xff\xd8\xff\xe0\x00\x01",  # segment length 1
        b"\xff\xd8\xff\xe0\xff\xff" + b"\0" * 100,  # a segment past the end
        b"\xff\xd8\xff\xd9",  # end of image before a frame
        b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x04\xd2\x03",  # height 0 (set by a DNL marker)
        png_header(0, 10), png_header(10, 0), png_header(2**31, 5),
        b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\x00\x00\x00" + b"\0" * 10,  # no start code
        bytes(rnd.randrange(256) for _ in range(5000)),
    ]  # fmt: skip
    # A JPEG whose segments never end: the walk stops after a bounded number of segments.
    corrupt.append(b"\xff\xd8" + b"\xff\xe1\x00\x02" * 5000)
    for data in corrupt:
        assert image_size(data) is None, data[:16]
        assert image_size_b64(base64.b64encode(data).decode()) is None
    for text in ("", "!!!!", "iVBORw0KGgo", "====", "\u00e9\u00e9\u00e9\u00e9", "a" * 10_001):
        assert image_size_b64(text) is None
    assert image_size_b64(None) is None  # type: ignore[arg-type]
    assert image_size(memoryview(png_header(7, 9))) == (7, 9)


def test_only_the_header_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A ~13 MB base64 payload is sized from its first bytes: a slice, not the whole, is
    # decoded. Counted by what reaches the decoder, not timed.
    payload = base64.b64encode(png_header(800, 600) + b"\0" * 10_000_000).decode()
    decoded: list[int] = []
    real = base64.b64decode

    def counting(text: Any, *args: Any, **kwargs: Any) -> bytes:
        decoded.append(len(text))
        return real(text, *args, **kwargs)

    monkeypatch.setattr(media.base64, "b64decode", counting)
    for _ in range(100):
        assert image_size_b64(payload) == (800, 600)
    assert decoded and sum(decoded) < 100 * 200, sum(decoded)


# --------------------------------------------------------------------------- the request walker


def _chat(*parts: dict) -> list[dict]:  # type: ignore[type-arg]
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


def _text_only(model: str) -> int:
    return estimate_input_tokens(model, messages=_chat()).tokens


def test_openai_chat_images_as_billed() -> None:
    url = data_url(png_header(1024, 1024))
    high = estimate_input_tokens("gpt-4o", messages=_chat({"type": "image_url", "image_url": {"url": url, "detail": "high"}}))
    assert high.tokens == _text_only("gpt-4o") + 765
    assert (high.media_tokens, high.media_assumed) == (765, False)
    low = estimate_input_tokens("gpt-4o", messages=_chat({"type": "image_url", "image_url": {"url": url, "detail": "low"}}))
    assert low.tokens == _text_only("gpt-4o") + 85
    # gpt-4o-mini bills the same image ~33x more tokens (at a ~17x lower price).
    mini = estimate_input_tokens("gpt-4o-mini", messages=_chat({"type": "image_url", "image_url": {"url": url}}))
    assert mini.tokens == _text_only("gpt-4o-mini") + 25501
    # A remote image: the worst case for the model and detail, flagged.
    remote = estimate_input_tokens(
        "gpt-4o", messages=_chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})
    )
    assert (remote.tokens - _text_only("gpt-4o"), remote.media_assumed) == (1445, True)
    remote_low = estimate_input_tokens(
        "gpt-4o",
        messages=_chat({"type": "image_url", "image_url": {"url": "https://example.com/c.png", "detail": "low"}}),
    )
    assert (remote_low.tokens - _text_only("gpt-4o"), remote_low.media_assumed) == (85, False)


def test_responses_input_image_and_screenshot() -> None:
    url = data_url(bytes.fromhex(REAL_HEADERS["jpeg_baseline"]), "image/jpeg")
    items = [
        {"role": "user", "content": [
            {"type": "input_text", "text": "Describe"},
            {"type": "input_image", "image_url": url, "detail": "high"},
            {"type": "input_image", "file_id": "file-123", "detail": "low"},
        ]},
        {"type": "computer_call_output", "call_id": "c1", "output": {"type": "computer_screenshot", "image_url": url}},
    ]  # fmt: skip
    est = estimate_input_tokens("gpt-4o", input=items)
    # 1234 x 567: short side 567 <= 768, 3 x 2 tiles = 1105; the file id at low detail = 85.
    assert est.media_tokens == 1105 + 85 + 1105
    assert not est.media_assumed


def test_anthropic_base64_and_url_sources() -> None:
    jpeg = base64.b64encode(jpeg_with_big_segments(1000, 1000)).decode()
    msgs = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": jpeg}},
        {"type": "text", "text": "Compare with"},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}},
    ]}]  # fmt: skip
    est = estimate_input_tokens("claude-sonnet-4-5", messages=msgs)
    assert (est.media_tokens, est.media_assumed) == (1334 + 1640, True)
    est = estimate_input_tokens("claude-opus-4-7", messages=msgs)
    assert est.media_tokens == 1334 + 5001


def test_unreadable_inline_images_fall_back_to_the_worst_case() -> None:
    for payload in ("data:image/png;base64,!!!notbase64!!!", "data:image/png;base64,", data_url(b"\x89PNG\r\n")):
        est = estimate_input_tokens("gpt-4o", messages=_chat({"type": "image_url", "image_url": {"url": payload}}))
        assert (est.media_tokens, est.media_assumed) == (1445, True)


def test_bare_data_urls_and_sdk_objects() -> None:
    from openai.types.chat import ChatCompletionContentPartImageParam  # a TypedDict: plain dicts

    url = data_url(png_header(2048, 4096))
    part: ChatCompletionContentPartImageParam = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    assert estimate_input_tokens("gpt-4o", messages=_chat(part)).media_tokens == 1105
    # A data URL found as text (an untyped shape) is an image too, sized from its header.
    est = estimate_input_tokens("gpt-4o", messages=[{"role": "user", "content": url}])
    assert est.media_tokens == 1105

    class Part:  # an SDK-like object with model_dump()
        def model_dump(self, **_: object) -> dict:  # type: ignore[type-arg]
            return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}

    assert estimate_input_tokens("gpt-4o", messages=_chat(Part())).media_tokens == 85  # type: ignore[arg-type]


def test_flat_image_tokens_still_override_and_audio_is_flagged() -> None:
    url = data_url(png_header(1024, 1024))
    msgs = _chat({"type": "image_url", "image_url": {"url": url}},
                 {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
    flat = estimate_input_tokens("gpt-4o", messages=msgs, image_tokens=10)
    assert (flat.media_tokens, flat.audio_tokens, flat.media_assumed) == (20, 10, False)
    est = estimate_input_tokens("gpt-4o", messages=msgs)
    # The image as billed; the audio clip at the flat charge, counted as audio, assumed.
    assert (est.media_tokens, est.audio_tokens, est.media_assumed) == (765 + DEFAULT_IMAGE_TOKENS, DEFAULT_IMAGE_TOKENS, True)
    strict = estimate_input_tokens("gpt-4o", messages=msgs, strict=True)
    assert strict.media_tokens == est.media_tokens
    assert repr(flat).startswith("InputEstimate(tokens=") and "audio_tokens=10" in repr(flat)


def test_module_docstring_example() -> None:
    import doctest

    from otel_budget import media

    assert doctest.testmod(media).failed == 0
