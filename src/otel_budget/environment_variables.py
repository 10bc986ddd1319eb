"""``OTEL_BUDGET_*`` environment variables (also ``opentelemetry-instrument --budget_*`` flags).

    OTEL_BUDGET_MAX_USD=0.05 opentelemetry-instrument python agent.py
    opentelemetry-instrument --budget_max_usd 0.05 python agent.py      # the same

This module is registered under the ``opentelemetry_environment_variables`` entry point:
``opentelemetry-instrument`` turns every ``OTEL_*`` constant here into a command-line flag.
"""

OTEL_BUDGET_MAX_USD = "OTEL_BUDGET_MAX_USD"
"""
.. envvar:: OTEL_BUDGET_MAX_USD

Budget of each trace in USD (``0.50``, ``$0.50``). Unset: no per-trace limit (named scopes
and ``budget()`` blocks still apply). ``0`` refuses every paid call.
"""

OTEL_BUDGET_SCOPES = "OTEL_BUDGET_SCOPES"
"""
.. envvar:: OTEL_BUDGET_SCOPES

Caps per identity, comma separated ``kind:usd[/window]``: ``user:20/day,tenant:500/month,
session:2``. The identity comes from ``otel_budget.scope(...)`` or the span attributes
``user.id`` / ``session.id`` / ``tenant.id``.
"""

OTEL_BUDGET_FAILURE_POLICY = "OTEL_BUDGET_FAILURE_POLICY"
"""
.. envvar:: OTEL_BUDGET_FAILURE_POLICY

``fail_open`` (default) or ``fail_closed``: what a call does when otel-budget itself fails.
"""

OTEL_BUDGET_THRESHOLDS = "OTEL_BUDGET_THRESHOLDS"
"""
.. envvar:: OTEL_BUDGET_THRESHOLDS

Soft-limit warnings as fractions of a budget, comma separated (default ``0.5,0.8,0.95``).
"""

OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS = "OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS"
"""
.. envvar:: OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS

Output bound for requests that set none (default ``4096``); also set on such requests when
``OTEL_BUDGET_CAP_OUTPUT_TOKENS`` is on.
"""

OTEL_BUDGET_ASSUMED_INPUT_TOKENS = "OTEL_BUDGET_ASSUMED_INPUT_TOKENS"
"""
.. envvar:: OTEL_BUDGET_ASSUMED_INPUT_TOKENS

Input tokens projected for a GenAI span of another instrumentation that does not carry its
messages when it starts (content capture off): default ``8192``. Its actual usage settles
the reservation when the span ends.
"""

OTEL_BUDGET_CAP_OUTPUT_TOKENS = "OTEL_BUDGET_CAP_OUTPUT_TOKENS"
"""
.. envvar:: OTEL_BUDGET_CAP_OUTPUT_TOKENS

``true`` (default): lower a request's output cap to what the remaining budget affords, so a
reservation is a guarantee. ``false``: never touch requests.
"""

OTEL_BUDGET_MIN_OUTPUT_TOKENS = "OTEL_BUDGET_MIN_OUTPUT_TOKENS"
"""
.. envvar:: OTEL_BUDGET_MIN_OUTPUT_TOKENS

Below this many affordable output tokens a call is refused rather than truncated (``16``).
"""

OTEL_BUDGET_STREAM_INCLUDE_USAGE = "OTEL_BUDGET_STREAM_INCLUDE_USAGE"
"""
.. envvar:: OTEL_BUDGET_STREAM_INCLUDE_USAGE

``true`` (default): ask OpenAI-compatible streams for usage (``stream_options``) when the
caller did not choose.
"""

OTEL_BUDGET_UNKNOWN_MODEL = "OTEL_BUDGET_UNKNOWN_MODEL"
"""
.. envvar:: OTEL_BUDGET_UNKNOWN_MODEL

Policy for models without a price: ``block`` (default), ``price_as:<model>``, or a default
price ``<input>,<output>`` in USD per million tokens (``5,15``).
"""

OTEL_BUDGET_PRICES_FILE = "OTEL_BUDGET_PRICES_FILE"
"""
.. envvar:: OTEL_BUDGET_PRICES_FILE

A JSON price table (models, aliases, tools, unknown_model) consulted before genai-prices.
"""

OTEL_BUDGET_INSTRUMENT = "OTEL_BUDGET_INSTRUMENT"
"""
.. envvar:: OTEL_BUDGET_INSTRUMENT

Which libraries to instrument, comma separated (default: every supported one installed:
``openai,anthropic,litellm,mcp,crewai``).
"""

OTEL_BUDGET_REDIS_URL = "OTEL_BUDGET_REDIS_URL"
"""
.. envvar:: OTEL_BUDGET_REDIS_URL

A shared ledger on Redis (``redis://host:6379/0``; needs ``otel-budget[redis]``): every
process using the same URL enforces the same budgets. ``redis+cluster://host:port`` (or
``rediss+cluster://``): a Redis Cluster, each scope in its own slot group. Unset: the
in-process ledger.
"""

OTEL_BUDGET_REDIS_FALLBACK = "OTEL_BUDGET_REDIS_FALLBACK"
"""
.. envvar:: OTEL_BUDGET_REDIS_FALLBACK

``local``: while Redis is unreachable, keep enforcing on an in-process ledger (budgets become
per process for the outage). Unset: the failure policy decides (fail_open / fail_closed).
"""

OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS = "OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS"
"""
.. envvar:: OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS

Input tokens projected for a Responses request that continues a stored conversation this
process did not see (``previous_response_id``, ``conversation``) when the model's context
window is unknown: default ``128000``. Its actual usage settles the reservation.
"""

OTEL_BUDGET_JOURNAL_DIR = "OTEL_BUDGET_JOURNAL_DIR"
"""
.. envvar:: OTEL_BUDGET_JOURNAL_DIR

Directory of the Redis ledger's durable replay journal: charges made while Redis was
unreachable, replayed by this or the next process once it is back (default
``$XDG_STATE_HOME/otel-budget/journal``).
"""

OTEL_BUDGET_SEMCONV_COST = "OTEL_BUDGET_SEMCONV_COST"
"""
.. envvar:: OTEL_BUDGET_SEMCONV_COST

``true``: also record the proposed ``gen_ai.usage.cost.amount`` / ``.currency`` / ``.source``
(semantic-conventions-genai PR #443) on GenAI spans, beside ``otel_budget.cost.*``: the
provider's reported cost (``source=provider``), else our price of the usage it reported
(``local``). ``false`` (default): only ``otel_budget.cost.*``.
"""

OTEL_BUDGET_LOOP_DETECTION = "OTEL_BUDGET_LOOP_DETECTION"
"""
.. envvar:: OTEL_BUDGET_LOOP_DETECTION

``refuse`` (default): the N-th identical tool call of a run within the window raises
``BudgetExceededError(reason="loop_detected")`` before the tool runs. ``warn``: reported
(root-span event, ``otel_budget.loops`` metric, log) but let through. ``off``: no detection.
An unreadable value keeps ``refuse``.
"""

OTEL_BUDGET_LOOP_THRESHOLD = "OTEL_BUDGET_LOOP_THRESHOLD"
"""
.. envvar:: OTEL_BUDGET_LOOP_THRESHOLD

How many identical calls make a loop (an integer >= 2; default 5).
"""

OTEL_BUDGET_LOOP_WINDOW_SECONDS = "OTEL_BUDGET_LOOP_WINDOW_SECONDS"
"""
.. envvar:: OTEL_BUDGET_LOOP_WINDOW_SECONDS

Within how many seconds of the first of them (default 300).
"""

OTEL_BUDGET_LOOP_NEAR_IDENTICAL = "OTEL_BUDGET_LOOP_NEAR_IDENTICAL"
"""
.. envvar:: OTEL_BUDGET_LOOP_NEAR_IDENTICAL

``true``: arguments that differ only in letter case, whitespace or float noise are the same.
"""

OTEL_BUDGET_LOOP_PROMPTS = "OTEL_BUDGET_LOOP_PROMPTS"
"""
.. envvar:: OTEL_BUDGET_LOOP_PROMPTS

``true``: an LLM request resent unchanged (same model, messages and parameters) counts too.
"""

OTEL_BUDGET_CACHE = "OTEL_BUDGET_CACHE"
"""
.. envvar:: OTEL_BUDGET_CACHE

The prompt cache (off by default): ``memory`` (this process), ``redis://...`` /
``rediss://...`` (shared by every process on that Redis), or ``off``. Cached entries contain
the answers to the prompts: they are stored only there. An unreadable value keeps it off.
"""

OTEL_BUDGET_CACHE_TTL_SECONDS = "OTEL_BUDGET_CACHE_TTL_SECONDS"
"""
.. envvar:: OTEL_BUDGET_CACHE_TTL_SECONDS

How long an entry is served (seconds > 0; default 3600).
"""

OTEL_BUDGET_CACHE_MAX_ENTRIES = "OTEL_BUDGET_CACHE_MAX_ENTRIES"
"""
.. envvar:: OTEL_BUDGET_CACHE_MAX_ENTRIES

The in-memory cache's bound on entries, least recently used out first (default 1024).
"""

OTEL_BUDGET_CACHE_MAX_BYTES = "OTEL_BUDGET_CACHE_MAX_BYTES"
"""
.. envvar:: OTEL_BUDGET_CACHE_MAX_BYTES

The in-memory cache's bound on the bytes of its entries (default 67108864, 64 MiB).
"""

OTEL_BUDGET_CACHE_NAMESPACE = "OTEL_BUDGET_CACHE_NAMESPACE"
"""
.. envvar:: OTEL_BUDGET_CACHE_NAMESPACE

Prefixes every cache key (services sharing a Redis keep apart; ``clear()`` removes only its
own). Printable, at most 128 characters, no ``:``; an invalid one turns the cache off.
"""

OTEL_BUDGET_CACHE_SAMPLED = "OTEL_BUDGET_CACHE_SAMPLED"
"""
.. envvar:: OTEL_BUDGET_CACHE_SAMPLED

``true``: also cache requests that sample (temperature unset or above 0); a repeat then
always gets the first answer. Default ``false``.
"""
