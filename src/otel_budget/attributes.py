"""Attribute names: the GenAI semantic conventions, and otel-budget's own namespace.

    >>> from otel_budget import attributes as attrs
    >>> span.set_attribute(attrs.COST_PROJECTED_USD, 0.0125)   # doctest: +SKIP

Every ``gen_ai.*`` constant in ``opentelemetry-semantic-conventions`` is marked "moved" (the
GenAI conventions now live in their own repository) and its enums warn when called, so the
string values are kept here and checked against the semconv package by the tests.

Everything otel-budget adds lives under ``otel_budget.`` (the spec has no cost attribute yet;
semantic-conventions-genai PR #443 proposes ``gen_ai.usage.cost.*``):

=====================================  ==========================================================
``otel_budget.cost.projected_usd``     worst-case cost reserved at span start (double)
``otel_budget.cost.usd``               actual cost committed at span end (double)
``otel_budget.cost.overshoot_usd``     actual minus projected, when the projection was too low
``otel_budget.cost.output_assumed``    the output bound came from a default, not the request
``otel_budget.cost.input_estimated``   how input tokens were projected (``tiktoken``/``bytes``)
``otel_budget.cost.estimated``         the actual cost had no usage to go on (estimated)
``otel_budget.cost.source``            what the actual cost is: ``provider`` (its bill) or ``local``
``otel_budget.cost.provider_reported_usd``  the cost the provider reported (OpenRouter ``usage.cost``)
``otel_budget.cost.price_delta_usd``   that reported cost minus our price of the reported usage
``otel_budget.usage.input_tokens``     the (estimated) input tokens that cost was computed from
``otel_budget.usage.output_tokens``    the (estimated) output tokens that cost was computed from
``otel_budget.price.source``           ``override``, ``genai-prices <ver>``, ``price_as``, ``default``
``otel_budget.price.model``            the model id the price was resolved to
``otel_budget.budget.scope``           the scope that refused the call (on aborted spans)
``otel_budget.budget.limit_usd``       that scope's limit
``otel_budget.budget.remaining_usd``   that scope's remaining budget when the call was refused
``otel_budget.trace.*``                the cost breakdown, on the trace's local root span
=====================================  ==========================================================
"""

from __future__ import annotations

# --- GenAI semantic conventions (current names; no deprecated gen_ai.system) ---------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
# Cache writes: the spelling util-genai 1.3, genai-anthropic and the Anthropic SDK emit (and
# ours); the semconv package (0.66b2) still names the older one, which is read too.
GEN_AI_USAGE_CACHE_WRITE_INPUT_TOKENS = "gen_ai.usage.cache_write.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS = "gen_ai.usage.reasoning.output_tokens"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_OUTPUT_TYPE = "gen_ai.output.type"
GEN_AI_EMBEDDINGS_DIMENSION_COUNT = "gen_ai.embeddings.dimension.count"
GEN_AI_REQUEST_ENCODING_FORMATS = "gen_ai.request.encoding_formats"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
GEN_AI_TOOL_DESCRIPTION = "gen_ai.tool.description"
# Opt-in content (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``), as JSON strings.
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
GEN_AI_AGENT_DESCRIPTION = "gen_ai.agent.description"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
# Proposed (semantic-conventions-genai PR #443), emitted only on opt-in (``semconv_cost``):
# the cost of the operation (double), its ISO 4217 currency, and ``provider`` | ``local``.
GEN_AI_USAGE_COST_AMOUNT = "gen_ai.usage.cost.amount"
GEN_AI_USAGE_COST_CURRENCY = "gen_ai.usage.cost.currency"
GEN_AI_USAGE_COST_SOURCE = "gen_ai.usage.cost.source"
# Deprecated names still emitted by older instrumentations: read-only fallbacks.
GEN_AI_SYSTEM_DEPRECATED = "gen_ai.system"
GEN_AI_USAGE_PROMPT_TOKENS_DEPRECATED = "gen_ai.usage.prompt_tokens"
GEN_AI_USAGE_COMPLETION_TOKENS_DEPRECATED = "gen_ai.usage.completion_tokens"
# Request tier, as the OpenAI instrumentations record it.
OPENAI_REQUEST_SERVICE_TIER = "openai.request.service_tier"
OPENAI_RESPONSE_SERVICE_TIER = "openai.response.service_tier"
OPENAI_RESPONSE_SYSTEM_FINGERPRINT = "openai.response.system_fingerprint"
OPENAI_API_TYPE = "openai.api.type"

# gen_ai.operation.name values
OP_CHAT = "chat"
OP_TEXT_COMPLETION = "text_completion"
OP_GENERATE_CONTENT = "generate_content"
OP_EMBEDDINGS = "embeddings"
OP_EXECUTE_TOOL = "execute_tool"
OP_INVOKE_AGENT = "invoke_agent"
INFERENCE_OPERATIONS = frozenset({OP_CHAT, OP_TEXT_COMPLETION, OP_GENERATE_CONTENT})

# --- otel-budget's own namespace ------------------------------------------------------------
NAMESPACE = "otel_budget."
COST_PROJECTED_USD = "otel_budget.cost.projected_usd"
COST_USD = "otel_budget.cost.usd"
COST_OVERSHOOT_USD = "otel_budget.cost.overshoot_usd"
COST_OUTPUT_ASSUMED = "otel_budget.cost.output_assumed"
COST_INPUT_ESTIMATED = "otel_budget.cost.input_estimated"
COST_ESTIMATED = "otel_budget.cost.estimated"
COST_SOURCE = "otel_budget.cost.source"
COST_PROVIDER_REPORTED_USD = "otel_budget.cost.provider_reported_usd"
COST_PRICE_DELTA_USD = "otel_budget.cost.price_delta_usd"
# The token counts an estimated cost was computed from (the standard gen_ai.usage.* carry only
# what the provider reported).
USAGE_INPUT_TOKENS = "otel_budget.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "otel_budget.usage.output_tokens"
PRICE_SOURCE = "otel_budget.price.source"
PRICE_MODEL = "otel_budget.price.model"
BUDGET_SCOPE = "otel_budget.budget.scope"
BUDGET_LIMIT_USD = "otel_budget.budget.limit_usd"
BUDGET_REMAINING_USD = "otel_budget.budget.remaining_usd"

# On the local root span of a trace (the breakdown).
TRACE_BUDGET_USD = "otel_budget.trace.budget_usd"
TRACE_SPENT_USD = "otel_budget.trace.spent_usd"
TRACE_REMAINING_USD = "otel_budget.trace.remaining_usd"
TRACE_LLM_USD = "otel_budget.trace.llm_usd"
TRACE_TOOLS_USD = "otel_budget.trace.tools_usd"
TRACE_CALLS = "otel_budget.trace.calls"
TRACE_TOOL_CALLS = "otel_budget.trace.tool_calls"
TRACE_TURNS = "otel_budget.trace.turns"
TRACE_ABORTS = "otel_budget.trace.aborts"
TRACE_TERMINATED_BY = "otel_budget.trace.terminated_by"
# Parallel arrays, so a backend can show them without parsing: names[i] cost usd[i].
TRACE_MODELS = "otel_budget.trace.models"
TRACE_MODEL_COSTS_USD = "otel_budget.trace.model_costs_usd"
TRACE_PROVIDERS = "otel_budget.trace.providers"
TRACE_PROVIDER_COSTS_USD = "otel_budget.trace.provider_costs_usd"
TRACE_TOOLS = "otel_budget.trace.tools"
TRACE_TOOL_COSTS_USD = "otel_budget.trace.tool_costs_usd"
# Spend of the calls made under ``invoke_agent`` spans, by the innermost agent's name.
TRACE_AGENTS = "otel_budget.trace.agents"
TRACE_AGENT_COSTS_USD = "otel_budget.trace.agent_costs_usd"
TRACE_LOOPS = "otel_budget.trace.loops"  # loops detected in the run
# The agent a metered call was made for (the innermost ``invoke_agent`` span around it).
AGENT_NAME = "otel_budget.agent.name"
# On an execute_tool span: the digest loop detection compares (never the arguments).
TOOL_CALL_FINGERPRINT = "otel_budget.tool.call.fingerprint"

# Events
EVENT_THRESHOLD = "otel_budget.threshold"
EVENT_EXCEEDED = "otel_budget.exceeded"
EVENT_LOOP = "otel_budget.loop_detected"
