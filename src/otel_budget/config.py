"""Read ``OTEL_BUDGET_*`` environment variables into processor arguments, one at a time.

    >>> config = read_env({"OTEL_BUDGET_MAX_USD": "0.05",
    ...                    "OTEL_BUDGET_SCOPES": "user:20/day",
    ...                    "OTEL_BUDGET_THRESHOLDS": "50,80"})     # percentages: invalid
    >>> config.kwargs["max_usd"], config.kwargs["scopes"][0].window
    ('0.05', 'day')
    >>> [problem.variable for problem in config.problems]
    ['OTEL_BUDGET_THRESHOLDS']

Each variable is parsed on its own, so one typo never discards the others: an invalid one
is reported (``ConfigProblem``: the variable, its value escaped, the fallback taken) and
falls back to its safe default while every valid setting keeps applying:

* an invalid failure policy means the stricter one, ``fail_closed``;
* a limit that cannot be read (``OTEL_BUDGET_MAX_USD``, an ``OTEL_BUDGET_SCOPES`` rule) refuses
  every paid call (``config.refusal``) unless the policy is explicitly ``fail_open``; a scope
  rule with an unknown window keeps its limit for the scope's lifetime (never reset);
* a ledger that cannot be built (``OTEL_BUDGET_REDIS_URL`` invalid, redis-py missing) follows
  the policy: ``fail_closed`` refuses every paid call, ``fail_open`` uses the in-process ledger;
* the other settings fall back to their defaults (built-in prices for a prices file that
  cannot be read; ``block`` for an invalid unknown-model policy).

``settings_from_env`` is the strict form (raises ``ValueError`` on the first problem).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_budget import environment_variables as env
from otel_budget.loops import LoopPolicy
from otel_budget.money import parse_usd
from otel_budget.pricing import ModelPrice, PriceBook
from otel_budget.settings import (
    DEFAULT_THRESHOLDS,
    FAIL_CLOSED,
    FAIL_OPEN,
    ScopeRule,
    _thresholds,
)

# Every variable otel-budget reads (the constants of ``environment_variables``).
KNOWN_VARIABLES = frozenset(
    value for name, value in vars(env).items() if name.startswith("OTEL_BUDGET_")
)
_LIMIT_VARIABLES = (env.OTEL_BUDGET_MAX_USD, env.OTEL_BUDGET_SCOPES)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
SUPPORTED_LIBRARIES = ("openai", "anthropic", "litellm", "mcp", "crewai")


def _bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def _int(name: str, value: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):  # ASCII digits only, as money
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    number = int(text)
    if number <= 0:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return number


def parse_scopes(value: str, name: str = env.OTEL_BUDGET_SCOPES) -> list[ScopeRule]:
    """``user:20/day,tenant:500/month,session:2`` -> ScopeRules."""
    rules = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, rest = item.partition(":")
        if not sep:
            raise ValueError(f"{name}: {item!r} must look like kind:usd[/day|/month]")
        usd, _, window = rest.partition("/")
        try:
            rules.append(ScopeRule(kind.strip(), max_usd=usd.strip(), window=window.strip() or None))
        except ValueError as exc:
            raise ValueError(f"{name}: {item!r}: {exc}") from None
    return rules


def parse_unknown_model(value: str, name: str = env.OTEL_BUDGET_UNKNOWN_MODEL) -> Any:
    value = value.strip()
    if value == "block" or value.startswith("price_as:"):
        return value
    parts = [p.strip() for p in value.split(",")]
    if len(parts) == 2:
        try:
            return ModelPrice(input=parts[0], output=parts[1])
        except ValueError as exc:
            raise ValueError(f"{name}={value!r}: {exc}") from None
    raise ValueError(f"{name}={value!r}: expected block, price_as:<model> or '<in>,<out>' $/MTok")


_SHOWN_CHARS = 120


def shown(value: str | None) -> str:
    """A value for a log line: escaped (``repr``: no control characters reach the log) and
    bounded."""
    if value is None:
        return "<unset>"
    if len(value) > _SHOWN_CHARS:
        value = value[:_SHOWN_CHARS] + "..."
    return repr(value)


@dataclass(frozen=True)
class ConfigProblem:
    """One variable that could not be applied as given, and what is done instead."""

    variable: str
    value: str | None
    reason: str
    fallback: str

    def __str__(self) -> str:
        return f"{self.variable}={shown(self.value)} is invalid ({self.reason}); {self.fallback}"


@dataclass
class EnvConfig:
    """What the environment configures: ``kwargs`` for ``BudgetSpanProcessor`` (always
    valid), the ``problems`` found (each with its fallback), and ``refusal``: set when a
    limit or the ledger could not be configured and the failure policy says that every paid
    call is refused (reason ``configuration``) until it is fixed."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    refusal: ConfigProblem | None = None


def _error_text(exc: BaseException) -> str:
    """An exception's message for a log line: control characters escaped, bounded."""
    text = str(exc) or type(exc).__name__
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= 300 else text[:300] + "..."


def read_env(environ: Mapping[str, str] | None = None) -> EnvConfig:
    """Every ``OTEL_BUDGET_*`` processor setting, each parsed on its own; never raises."""
    environ = os.environ if environ is None else environ
    config = EnvConfig()
    out = config.kwargs
    problems = config.problems

    def get(name: str) -> str | None:
        value = environ.get(name)
        return value if value is not None and value.strip() != "" else None

    def problem(name: str, value: str | None, reason: str, fallback: str) -> None:
        problems.append(ConfigProblem(name, value, reason, fallback))

    # The failure policy first: it decides what an unreadable limit or ledger means.
    policy = FAIL_OPEN
    explicit_open = False
    if (value := get(env.OTEL_BUDGET_FAILURE_POLICY)) is not None:
        if value.strip() in (FAIL_OPEN, FAIL_CLOSED):
            policy = value.strip()
            explicit_open = policy == FAIL_OPEN
        else:
            policy = FAIL_CLOSED
            problem(env.OTEL_BUDGET_FAILURE_POLICY, value, "expected fail_open or fail_closed",
                    "using the stricter fail_closed")  # fmt: skip
        out["failure_policy"] = policy

    # Limits that cannot be read: refused unless fail_open was chosen explicitly.
    unreadable: list[tuple[str, str | None, str]] = []
    if (value := get(env.OTEL_BUDGET_MAX_USD)) is not None:
        try:
            parse_usd(value, what=env.OTEL_BUDGET_MAX_USD)
            out["max_usd"] = value.strip()
        except ValueError as exc:
            unreadable.append((env.OTEL_BUDGET_MAX_USD, value, _error_text(exc)))
    if (value := get(env.OTEL_BUDGET_SCOPES)) is not None:
        rules: dict[str, ScopeRule] = {}
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                rule = _scope_rule(item, value, problem)
            except ValueError as exc:
                unreadable.append((env.OTEL_BUDGET_SCOPES, value, f"{item!r}: {exc}"))
                continue
            kept = rules.get(rule.kind)
            if kept is not None:
                problem(env.OTEL_BUDGET_SCOPES, value, f"more than one rule for {rule.kind!r}",
                        "keeping the lowest limit")  # fmt: skip
                if kept.limit_nanos <= rule.limit_nanos:
                    continue
            rules[rule.kind] = rule
        if rules:
            out["scopes"] = list(rules.values())
    for name, value in _misspelt(environ):
        meant = _suggestion(name)
        if meant in _LIMIT_VARIABLES and get(meant) is None:
            # A limit asked for under a misspelt name is a limit that cannot be read.
            unreadable.append((name, value, f"not an otel-budget variable: did you mean {meant}?"))
        else:
            hint = f": did you mean {meant}?" if meant else ""
            problem(name, value, f"not an otel-budget variable{hint}", "ignored")
    for name, value, reason in unreadable:
        if explicit_open:
            fallback = "failure_policy=fail_open: this limit is NOT applied until it is fixed"
        else:
            fallback = (
                "every paid call is refused (reason 'configuration') until it is fixed; "
                f"set {env.OTEL_BUDGET_FAILURE_POLICY}=fail_open to run without this limit"
            )
        problems.append(ConfigProblem(name, value, reason, fallback))
        if not explicit_open and config.refusal is None:
            config.refusal = problems[-1]

    if (value := get(env.OTEL_BUDGET_THRESHOLDS)) is not None:
        try:
            out["thresholds"] = list(_thresholds(float(v) for v in value.split(",") if v.strip()))
        except ValueError:
            problem(env.OTEL_BUDGET_THRESHOLDS, value, "expected fractions in (0, 1] like 0.5,0.8",
                    f"using the default {','.join(map(str, DEFAULT_THRESHOLDS))}")  # fmt: skip
    for name, key, default in (
        (env.OTEL_BUDGET_DEFAULT_MAX_OUTPUT_TOKENS, "default_max_output_tokens", 4096),
        (env.OTEL_BUDGET_ASSUMED_INPUT_TOKENS, "assumed_input_tokens", 8192),
        (env.OTEL_BUDGET_MIN_OUTPUT_TOKENS, "min_output_tokens", 16),
    ):
        if (value := get(name)) is not None:
            try:
                out[key] = _int(name, value)
            except ValueError:
                problem(name, value, "expected a positive integer", f"using the default {default}")
    # Read where it is used (the openai instrumentation); checked here to be reported.
    if (value := get(env.OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS)) is not None:
        try:
            _int(env.OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS, value)
        except ValueError:
            problem(env.OTEL_BUDGET_UNKNOWN_HISTORY_TOKENS, value, "expected a positive integer",
                    "using the default 128000")  # fmt: skip
    for name, key in (
        (env.OTEL_BUDGET_CAP_OUTPUT_TOKENS, "cap_output_tokens"),
        (env.OTEL_BUDGET_STREAM_INCLUDE_USAGE, "stream_include_usage"),
    ):
        if (value := get(name)) is not None:
            try:
                out[key] = _bool(name, value)
            except ValueError:
                problem(name, value, "expected true or false", "using the default true")
    if (value := get(env.OTEL_BUDGET_SEMCONV_COST)) is not None:
        try:
            out["semconv_cost"] = _bool(env.OTEL_BUDGET_SEMCONV_COST, value)
        except ValueError:
            problem(env.OTEL_BUDGET_SEMCONV_COST, value, "expected true or false",
                    "using the default false (otel_budget.cost.* only)")  # fmt: skip

    _read_loops(get, out, problem)
    _read_cache(get, out, problem)
    _read_prices(get, out, problem)
    _read_ledger(get, out, problem, config, policy)
    return config


def _read_loops(
    get: Callable[[str], str | None], out: dict[str, Any], problem: Callable[..., None]
) -> None:
    """``OTEL_BUDGET_LOOP_*`` into ``loop_detection``. A value that cannot be read keeps the
    default for that part (detection stays on: a typo never turns it off)."""
    parts: dict[str, Any] = {}
    action = get(env.OTEL_BUDGET_LOOP_DETECTION)
    if action is not None:
        action = action.strip().lower()
        if action in ("off", "false", "0", "no"):
            out["loop_detection"] = False
            return
        if action in ("refuse", "warn", "true", "on", "1", "yes"):
            parts["action"] = "warn" if action == "warn" else "refuse"
        else:
            problem(env.OTEL_BUDGET_LOOP_DETECTION, action, "expected refuse, warn or off",
                    "using the default refuse")  # fmt: skip
    if (value := get(env.OTEL_BUDGET_LOOP_THRESHOLD)) is not None:
        try:
            parts["threshold"] = _int(env.OTEL_BUDGET_LOOP_THRESHOLD, value)
            if parts["threshold"] < 2:
                raise ValueError("below 2")
        except ValueError:
            parts.pop("threshold", None)
            problem(env.OTEL_BUDGET_LOOP_THRESHOLD, value, "expected an integer >= 2",
                    f"using the default {LoopPolicy.threshold}")  # fmt: skip
    if (value := get(env.OTEL_BUDGET_LOOP_WINDOW_SECONDS)) is not None:
        try:
            window = float(value.strip())
            if not math.isfinite(window) or window <= 0:
                raise ValueError("not positive")
            parts["window_seconds"] = window
        except ValueError:
            problem(env.OTEL_BUDGET_LOOP_WINDOW_SECONDS, value, "expected seconds > 0",
                    f"using the default {LoopPolicy.window_seconds:g}")  # fmt: skip
    for name, key in (
        (env.OTEL_BUDGET_LOOP_NEAR_IDENTICAL, "near_identical"),
        (env.OTEL_BUDGET_LOOP_PROMPTS, "prompts"),
    ):
        if (value := get(name)) is not None:
            try:
                parts[key] = _bool(name, value)
            except ValueError:
                problem(name, value, "expected true or false", "using the default false")
    if parts:
        out["loop_detection"] = LoopPolicy(**parts)


_CACHE_DETAILS = (
    env.OTEL_BUDGET_CACHE_TTL_SECONDS, env.OTEL_BUDGET_CACHE_MAX_ENTRIES,
    env.OTEL_BUDGET_CACHE_MAX_BYTES, env.OTEL_BUDGET_CACHE_NAMESPACE, env.OTEL_BUDGET_CACHE_SAMPLED,
)  # fmt: skip


def _read_cache(
    get: Callable[[str], str | None], out: dict[str, Any], problem: Callable[..., None]
) -> None:
    """``OTEL_BUDGET_CACHE*`` into ``cache``. Off unless ``OTEL_BUDGET_CACHE`` names a backend;
    a value that cannot be read is reported and keeps the cache off (or, for a detail, its
    default): a cache problem never changes what is enforced (a miss is an ordinary call)."""
    from otel_budget.cache import MemoryCache, ResponseCache
    from otel_budget.cache.memory import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, DEFAULT_TTL_SECONDS

    where = get(env.OTEL_BUDGET_CACHE)
    kind = (where or "").strip()
    if kind.lower() in ("", "off", "false", "0", "no", "none"):
        for name in _CACHE_DETAILS:
            if (value := get(name)) is not None:
                problem(name, value, f"has no effect: {env.OTEL_BUDGET_CACHE} is not set",
                        "no prompt cache")  # fmt: skip
        return
    ttl: float = DEFAULT_TTL_SECONDS
    if (value := get(env.OTEL_BUDGET_CACHE_TTL_SECONDS)) is not None:
        try:
            ttl = float(value.strip())
            if not math.isfinite(ttl) or ttl <= 0:
                raise ValueError("not positive")
        except ValueError:
            ttl = DEFAULT_TTL_SECONDS
            problem(env.OTEL_BUDGET_CACHE_TTL_SECONDS, value, "expected seconds > 0",
                    f"using the default {DEFAULT_TTL_SECONDS:g}")  # fmt: skip
    sizes = {"max_entries": DEFAULT_MAX_ENTRIES, "max_bytes": DEFAULT_MAX_BYTES}
    for name, key in (
        (env.OTEL_BUDGET_CACHE_MAX_ENTRIES, "max_entries"),
        (env.OTEL_BUDGET_CACHE_MAX_BYTES, "max_bytes"),
    ):
        if (value := get(name)) is not None:
            try:
                sizes[key] = _int(name, value)
            except ValueError:
                problem(name, value, "expected a positive integer", f"using the default {sizes[key]}")
    sampled = False
    if (value := get(env.OTEL_BUDGET_CACHE_SAMPLED)) is not None:
        try:
            sampled = _bool(env.OTEL_BUDGET_CACHE_SAMPLED, value)
        except ValueError:
            problem(env.OTEL_BUDGET_CACHE_SAMPLED, value, "expected true or false",
                    "using the default false (sampled requests are not cached)")  # fmt: skip
    namespace = (get(env.OTEL_BUDGET_CACHE_NAMESPACE) or "").strip()
    try:
        if kind.lower() == "memory":
            backend: Any = MemoryCache(sizes["max_entries"], sizes["max_bytes"], ttl)
        elif kind.lower().startswith(("redis://", "rediss://", "unix://")):
            from otel_budget.cache.redis import RedisCache

            backend = RedisCache(kind, ttl_seconds=ttl)
        else:
            problem(env.OTEL_BUDGET_CACHE, redact(kind), "expected memory, redis://..., or off",
                    "no prompt cache")  # fmt: skip
            return
    except Exception as exc:  # redis-py not installed, a URL it cannot read
        problem(env.OTEL_BUDGET_CACHE, redact(kind), f"cannot build the cache: {_error_text(exc)}",
                "no prompt cache")  # fmt: skip
        return
    try:
        out["cache"] = ResponseCache(backend, namespace=namespace, cache_sampled=sampled)
    except ValueError as exc:
        backend.close()
        problem(env.OTEL_BUDGET_CACHE_NAMESPACE, namespace, _error_text(exc),
                "no prompt cache (entries of other namespaces must not be read)")  # fmt: skip


def _suggestion(name: str) -> str | None:
    """The known variable ``name`` was probably meant to be, or None."""
    match = difflib.get_close_matches(name.upper(), KNOWN_VARIABLES, n=1, cutoff=0.8)
    return match[0] if match else None


def _misspelt(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(name, value)`` of each variable set that looks like one of ours but is not: any
    ``OTEL_BUDGET*`` name in any case, and near misses of a known name (``OTEL_BUGDET_MAX_USD``)."""
    found = []
    for name, value in environ.items():
        if name in KNOWN_VARIABLES:
            continue
        upper = name.upper()
        if upper.startswith("OTEL_BUDGET") or (
            upper.startswith("OTEL") and _suggestion(name) is not None
        ):
            found.append((name, value))
    return sorted(found)


def _scope_rule(item: str, value: str, problem: Callable[..., None]) -> ScopeRule:
    """One ``kind:usd[/window]`` rule. An unknown window keeps the limit for the scope's
    lifetime (stricter than any window: it never resets); anything else raises."""
    kind, sep, rest = item.partition(":")
    if not sep:
        raise ValueError("must look like kind:usd[/day|/month]")
    usd, _, window = rest.partition("/")
    window = window.strip()
    if window and window not in ("day", "month"):
        problem(env.OTEL_BUDGET_SCOPES, value,
                f"{item!r}: the window must be day or month, got {window!r}",
                f"{kind.strip()!r} keeps its limit for the scope's lifetime (never reset)")  # fmt: skip
        window = ""
    return ScopeRule(kind.strip(), max_usd=usd.strip(), window=window or None)


def _read_prices(get: Callable[[str], str | None], out: dict[str, Any],
                 problem: Callable[..., None]) -> None:  # fmt: skip
    prices_file = get(env.OTEL_BUDGET_PRICES_FILE)
    unknown = get(env.OTEL_BUDGET_UNKNOWN_MODEL)
    policy: Any = None
    if unknown is not None:
        try:
            policy = parse_unknown_model(unknown)
        except ValueError as exc:
            problem(env.OTEL_BUDGET_UNKNOWN_MODEL, unknown, _error_text(exc),
                    "unknown models are refused where a limit applies (block)")  # fmt: skip
    if prices_file is not None:
        try:
            out["prices"] = PriceBook.from_file(prices_file)
        except Exception as exc:
            problem(env.OTEL_BUDGET_PRICES_FILE, prices_file, _error_text(exc),
                    "using the built-in prices")  # fmt: skip
        else:
            if unknown is not None:
                problem(env.OTEL_BUDGET_UNKNOWN_MODEL, unknown,
                        f"set the unknown-model policy in {env.OTEL_BUDGET_PRICES_FILE} "
                        "('unknown_model') or here, not both",
                        "the prices file's policy applies")  # fmt: skip
            return
    if policy is not None:
        try:
            out["prices"] = PriceBook(unknown_model=policy)
        except Exception as exc:  # price_as:<a model without a price>
            problem(env.OTEL_BUDGET_UNKNOWN_MODEL, unknown, _error_text(exc),
                    "unknown models are refused where a limit applies (block)")  # fmt: skip


def _read_ledger(get: Callable[[str], str | None], out: dict[str, Any],
                 problem: Callable[..., None], config: EnvConfig, policy: str) -> None:  # fmt: skip
    url = get(env.OTEL_BUDGET_REDIS_URL)
    fallback = get(env.OTEL_BUDGET_REDIS_FALLBACK)
    if fallback is not None and fallback.strip() != "local":
        problem(env.OTEL_BUDGET_REDIS_FALLBACK, fallback, "expected 'local' or unset",
                f"while Redis is unreachable the failure policy ({policy}) decides")  # fmt: skip
        fallback = None
    if url is None:
        return
    try:
        from otel_budget.storage import MemoryStorage
        from otel_budget.storage.redis import RedisStorage

        out["storage"] = RedisStorage.from_url(  # redis+cluster:// picks the cluster ledger
            url.strip(), fallback=MemoryStorage() if fallback is not None else None
        )
    except Exception as exc:  # a bad URL, or redis-py not installed (ImportError)
        reason = f"cannot build the Redis ledger: {type(exc).__name__}: {_error_text(exc)}"
        if policy == FAIL_CLOSED:
            config.problems.append(ConfigProblem(
                env.OTEL_BUDGET_REDIS_URL, redact(url), reason,
                "failure_policy=fail_closed: every paid call is refused (reason "
                "'configuration') until it is fixed",
            ))  # fmt: skip
            if config.refusal is None:
                config.refusal = config.problems[-1]
        else:
            problem(env.OTEL_BUDGET_REDIS_URL, redact(url), reason,
                    "failure_policy=fail_open: budgets are kept in this process's own ledger")  # fmt: skip


def redact(url: str) -> str:
    """A URL without its password, for a log line."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':' if user else ''}***@{host}"


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Processor keyword arguments from the environment (only the variables that are set),
    strictly: raises ``ValueError`` naming the first variable that cannot be applied as
    given. ``BudgetInstrumentor`` uses ``read_env``, which falls back per variable."""
    config = read_env(environ)
    if config.problems:
        storage = config.kwargs.get("storage")
        if storage is not None:
            storage.close()
        raise ValueError(str(config.problems[0]))
    return config.kwargs


def libraries_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    environ = os.environ if environ is None else environ
    value = environ.get(env.OTEL_BUDGET_INSTRUMENT, "").strip()
    if not value:
        return SUPPORTED_LIBRARIES
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in SUPPORTED_LIBRARIES]
    if unknown:
        raise ValueError(
            f"{env.OTEL_BUDGET_INSTRUMENT}: unknown libraries {unknown}; supported: "
            f"{', '.join(SUPPORTED_LIBRARIES)}"
        )
    return names
