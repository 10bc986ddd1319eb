"""Name and provider normalisation: what a (provider, model) is called in genai-prices.

    >>> from otel_budget.price_names import PROVIDER_IDS, model_names
    >>> PROVIDER_IDS["gcp.gen_ai"]
    'google'
    >>> n = model_names("azure.ai.openai", "openai/GPT-4o", {}, PROVIDER_IDS.get)
    >>> (n.pid, n.model, n.stripped, n.prefix)
    ('azure', 'openai/gpt-4o', 'gpt-4o', 'openai')

OTel ``gen_ai.provider.name`` values (``gcp.gen_ai``, ``azure.ai.openai``, ``x_ai`` ...) are
mapped to genai-prices' provider ids; ``provider/`` prefixes (LiteLLM style), ``models/`` and
``publishers/*/models/`` (Google) are stripped; user aliases apply first. Used by
``otel_budget.pricing.PriceBook``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["BEDROCK_ID", "PREFIXES", "PROVIDER_IDS", "is_glob", "model_names"]

# OTel gen_ai.provider.name values (and LiteLLM / SDK spellings) -> genai-prices provider id.
# None: a provider with no public price list (self-hosted, or missing from genai-prices).
_PROVIDER_IDS: dict[str, str | None] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "deepseek": "deepseek",
    "groq": "groq",
    "perplexity": "perplexity",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "gcp.gen_ai": "google",
    "gcp.vertex_ai": "google",
    "gcp.gemini": "google",
    "google": "google",
    "gemini": "google",
    "google_genai": "google",
    "vertex_ai": "google",
    "vertex_ai_beta": "google",
    "azure.ai.inference": "azure",
    # genai-prices would map this to plain "openai" (substring match); Azure has its own table
    # and falls back to OpenAI's prices itself.
    "azure.ai.openai": "azure",
    "az.ai.inference": "azure",
    "az.ai.openai": "azure",
    "azure": "azure",
    "azure_ai": "azure",
    "aws.bedrock": "aws",
    "bedrock": "aws",
    "bedrock_converse": "aws",
    "x_ai": "x-ai",
    "xai": "x-ai",
    "x-ai": "x-ai",
    "mistral_ai": "mistral",
    "mistral": "mistral",
    "mistralai": "mistral",
    "fireworks_ai": "fireworks",
    "fireworks": "fireworks",
    "together_ai": "together",
    "together": "together",
    "togetherai": "together",
    "moonshot": "moonshotai",
    "moonshotai": "moonshotai",
    "ibm.watsonx.ai": None,
    "watsonx": None,
    "ollama": None,
    "ollama_chat": None,
    "vllm": None,
    "hosted_vllm": None,
    "lm_studio": None,
    "llamacpp": None,
    # genai-prices splits "litellm" + "openai/gpt-4o" itself; our prefix handling does the same.
    "litellm": None,
}

# Heads of "provider/model" references that are provider names (LiteLLM style), not model
# organisations such as "meta-llama/" or "deepseek-ai/" (those are real model ids on hosts).
_PREFIXES = frozenset(_PROVIDER_IDS) | {"openai", "anthropic", "google", "aws", "azure"}

# Google SDK / Vertex forms: "models/x", "publishers/google/models/x",
# "projects/p/locations/l/publishers/google/models/x".
_GOOGLE_PREFIX = re.compile(r"^(?:projects/[^/]+/locations/[^/]+/)?(?:publishers/[^/]+/)?models/")
# Bedrock model ids and cross-region inference profiles ("us.anthropic.claude-...").
_BEDROCK_ID = re.compile(
    r"^(?:(?:us|eu|apac|au|ca|jp|us-gov|global)\.)?"
    r"(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek|openai|qwen|writer|twelvelabs)\.[^/]"
)

PROVIDER_IDS = _PROVIDER_IDS
PREFIXES = _PREFIXES
BEDROCK_ID = _BEDROCK_ID


def is_glob(key: str) -> bool:
    """Whether an override or tool key is an fnmatch pattern."""
    return any(c in key for c in "*?[")


_is_glob = is_glob


@dataclass(frozen=True, slots=True)
class _Names:
    provider: str | None  # the caller's provider, lower-cased
    pid: str | None  # genai-prices provider id, if there is one
    model: str  # lower-cased, alias applied, Google prefixes stripped
    stripped: str  # ``model`` without a "provider/" prefix
    prefix: str | None  # that prefix ("openai", "ollama" ...), if any
    prefix_pid: str | None  # genai-prices provider id named by that prefix
    subjects: tuple[str, ...]  # strings override keys are matched against, in order


def model_names(
    provider: str | None,
    model: str,
    aliases: Mapping[str, str],
    provider_id: Callable[[str], str | None],
) -> _Names:
    """The names one (provider, model) is looked up by: alias applied, prefixes stripped,
    provider mapped by ``provider_id``; override keys are matched against ``subjects``."""
    pl = provider.strip().lower() if isinstance(provider, str) and provider.strip() else None
    raw = model.strip().lower()
    target = None
    if pl:
        target = aliases.get(f"{pl}/{raw}")
    if target is None:
        target = aliases.get(raw)
    if target is None and "/" in raw and raw.split("/", 1)[0] in _PREFIXES:
        target = aliases.get(raw.split("/", 1)[1])
    m = _GOOGLE_PREFIX.sub("", (target or raw).lower(), count=1)

    pid = provider_id(pl) if pl else None
    stripped, prefix, prefix_pid = m, None, None
    head, sep, tail = m.partition("/")
    if sep and tail and head in _PREFIXES:
        stripped = _GOOGLE_PREFIX.sub("", tail, count=1)
        prefix, prefix_pid = head, provider_id(head)

    subjects: list[str] = []
    for s in (
        f"{pl}/{raw}" if pl else None,
        f"{pid}/{m}" if pid else None,
        f"{pl}/{m}" if pl else None,
        raw,
        m,
        f"{prefix_pid}/{stripped}" if prefix_pid else None,
        stripped,
    ):
        if s and s not in subjects:
            subjects.append(s)
    return _Names(pl, pid, m, stripped, prefix, prefix_pid, tuple(subjects))
