"""Our GenAI attribute names are the semantic conventions' current ones; ours are namespaced."""

from __future__ import annotations

import warnings

from opentelemetry.semconv._incubating.attributes import error_attributes, server_attributes
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as g
from opentelemetry.semconv._incubating.attributes import openai_attributes as o

from otel_budget import attributes as attrs

PAIRS = {
    "GEN_AI_OPERATION_NAME": g.GEN_AI_OPERATION_NAME,
    "GEN_AI_PROVIDER_NAME": g.GEN_AI_PROVIDER_NAME,
    "GEN_AI_REQUEST_MODEL": g.GEN_AI_REQUEST_MODEL,
    "GEN_AI_REQUEST_MAX_TOKENS": g.GEN_AI_REQUEST_MAX_TOKENS,
    "GEN_AI_RESPONSE_MODEL": g.GEN_AI_RESPONSE_MODEL,
    "GEN_AI_RESPONSE_ID": g.GEN_AI_RESPONSE_ID,
    "GEN_AI_RESPONSE_FINISH_REASONS": g.GEN_AI_RESPONSE_FINISH_REASONS,
    "GEN_AI_USAGE_INPUT_TOKENS": g.GEN_AI_USAGE_INPUT_TOKENS,
    "GEN_AI_USAGE_OUTPUT_TOKENS": g.GEN_AI_USAGE_OUTPUT_TOKENS,
    "GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS": g.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
    "GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS": g.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
    "GEN_AI_USAGE_REASONING_OUTPUT_TOKENS": g.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS,
    "GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK": g.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
    "GEN_AI_OUTPUT_TYPE": g.GEN_AI_OUTPUT_TYPE,
    "GEN_AI_EMBEDDINGS_DIMENSION_COUNT": g.GEN_AI_EMBEDDINGS_DIMENSION_COUNT,
    "GEN_AI_REQUEST_ENCODING_FORMATS": g.GEN_AI_REQUEST_ENCODING_FORMATS,
    "GEN_AI_TOKEN_TYPE": g.GEN_AI_TOKEN_TYPE,
    "GEN_AI_TOOL_NAME": g.GEN_AI_TOOL_NAME,
    "GEN_AI_TOOL_CALL_ID": g.GEN_AI_TOOL_CALL_ID,
    "GEN_AI_TOOL_TYPE": g.GEN_AI_TOOL_TYPE,
    "GEN_AI_AGENT_NAME": g.GEN_AI_AGENT_NAME,
    "GEN_AI_CONVERSATION_ID": g.GEN_AI_CONVERSATION_ID,
    "OPENAI_REQUEST_SERVICE_TIER": o.OPENAI_REQUEST_SERVICE_TIER,
    "OPENAI_RESPONSE_SERVICE_TIER": o.OPENAI_RESPONSE_SERVICE_TIER,
    "OPENAI_RESPONSE_SYSTEM_FINGERPRINT": o.OPENAI_RESPONSE_SYSTEM_FINGERPRINT,
    "OPENAI_API_TYPE": o.OPENAI_API_TYPE,
    "ERROR_TYPE": error_attributes.ERROR_TYPE,
    "SERVER_ADDRESS": server_attributes.SERVER_ADDRESS,
    "SERVER_PORT": server_attributes.SERVER_PORT,
}


def test_gen_ai_names_match_semconv() -> None:
    for ours, theirs in PAIRS.items():
        assert getattr(attrs, ours) == theirs, ours


def test_operation_values_match_semconv() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = {v.value for v in g.GenAiOperationNameValues}
    for value in (attrs.OP_CHAT, attrs.OP_TEXT_COMPLETION, attrs.OP_GENERATE_CONTENT,
                  attrs.OP_EMBEDDINGS, attrs.OP_EXECUTE_TOOL, attrs.OP_INVOKE_AGENT):  # fmt: skip
        assert value in values


def test_own_attributes_live_in_one_namespace() -> None:
    own = [v for k, v in vars(attrs).items() if k.isupper() and isinstance(v, str)
           and not k.startswith(("GEN_AI", "OP_", "ERROR", "SERVER", "OPENAI", "INFERENCE"))]  # fmt: skip
    assert own
    for value in own:
        assert value.startswith(attrs.NAMESPACE), value
