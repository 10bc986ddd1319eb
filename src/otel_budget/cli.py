"""``otel-budget``: the operator's view of a shared (Redis) budget ledger.

    otel-budget show                          # live spend of every scope, as a table
    otel-budget show --prefix user: --json    # one kind of scope, as JSON
    otel-budget pause                         # kill switch: refuse every new paid call
    otel-budget pause user:alice              # ... or one identity, or "user:*" for a kind
    otel-budget resume user:alice
    otel-budget set-limit tenant:acme 900     # an operator limit (USD); wins over config
    otel-budget paused                        # which kill switches are on
    otel-budget reset user:alice@d20261123    # spent and reserved to 0, the limit kept
    otel-budget delete process:host:4242:1764713679   # forget a scope entirely

The ledger is the Redis at ``--redis-url`` (default: ``$OTEL_BUDGET_REDIS_URL``), with keys
under ``--key-prefix`` (default ``otb:``, as ``RedisStorage``). A SCOPE is a ledger key as
``show`` prints it: ``t:<32 hex>`` for a trace, ``b:<32 hex>`` for a ``budget()`` block,
``process`` for spans without a trace, ``user:alice`` for a named scope without a window,
``user:alice@d20261123`` / ``tenant:acme@m202611`` for a UTC day / month window. A kill
switch is ``*`` (everything), ``user:*`` (every identity of a kind) or ``user:alice``: the
keys a reservation checks (see ``scope_syntax``); anything else is refused as a usage error.

``show`` lists a scope it cannot read (a hash an outside writer broke) as ``unreadable`` and
goes on; keys are printed with control characters escaped (``\x1b``), never raw.

Exit status: 0 on success, 2 on a bad argument, an unreachable ledger or any other failure
(one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn, TextIO

from otel_budget.money import parse_usd
from otel_budget.storage import GLOBAL_PAUSE_KEY, LedgerStorage, ScopeUsage

PROG = "otel-budget"
EXIT_USAGE = 2
MAX_TIMEOUT_SECONDS = 300.0
MIN_TIMEOUT_SECONDS = 0.001
MAX_IDENTITY_CHARS = 256  # as otel_budget.context.valid_identity

# Ledger keys (see otel_budget.engine): a trace, a budget() block, spans without a trace, and
# kind:identity with an optional UTC day / month window suffix.
_TRACE_OR_BLOCK = re.compile(r"[tb]:[0-9a-f]{32}")
_KIND = re.compile(r"[A-Za-z0-9_.\-]+")
_WINDOW = re.compile(r"@(d\d{8}|m\d{6})$")
_WINDOW_LIKE = re.compile(r"@[dm]\d+$")
_GLOB = re.compile(r"[*?\[\]]")
PROCESS_KEY = "process"


class CliError(Exception):
    """A one-line error for the operator (exit status 2)."""


def usd_text(nanos: int) -> str:
    """Exact USD text from nano-USD, at least two decimals: 20.00, 0.00000015, -0.5."""
    text = f"{Decimal(nanos).scaleb(-9):f}"
    if "." in text:
        text = text.rstrip("0")
        whole, _, frac = text.partition(".")
        text = f"{whole}.{frac.ljust(2, '0')}"
    else:
        text += ".00"
    return text


def escaped(text: str) -> str:
    """``text`` safe for a terminal: backslashes and every non-printable character escaped
    (``\\x1b``, ``\\n``, ``\\u200b``), printable Unicode kept."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def _identity_ok(ident: str) -> bool:
    return 0 < len(ident) <= MAX_IDENTITY_CHARS and ident.isprintable()


def scope_syntax(value: str, *, switch: bool) -> str | None:
    """Why ``value`` is not a scope the CLI may act on, or None when it is one.

    ``switch`` (pause/resume): ``*``, ``kind:*`` or ``kind:identity`` (no window: a kill
    switch is checked by identity, whatever the window). Otherwise (set-limit): a ledger key,
    ``t:<32 hex>``, ``b:<32 hex>`` or ``kind:identity[@dYYYYMMDD|@mYYYYMM]`` (a process's own
    scope is ``process:<host>:<pid>:<start>``)."""
    if value != value.strip() or not value.isprintable():
        return "it has surrounding spaces or control characters"
    if value == GLOBAL_PAUSE_KEY:
        return None if switch else "'*' names no scope with a limit"
    if value == PROCESS_KEY:
        if switch:
            return "the process scope has no kill switch of its own; pause '*'"
        return (
            "each process has its own, 'process:<host>:<pid>:<start>' "
            "(see 'show --prefix process:')"
        )
    kind, sep, ident = value.partition(":")
    if not sep or not _KIND.fullmatch(kind) or not ident:
        return "expected kind:identity"
    if kind in ("t", "b"):
        if switch:
            return "traces and budget() blocks have no kill switch; pause '*' or a kind instead"
        if not _TRACE_OR_BLOCK.fullmatch(value):
            return f"a {'trace' if kind == 't' else 'block'} key is {kind}:<32 hex digits>"
        return None
    if ident == "*":
        return None if switch else "a limit is set on one identity, not on 'kind:*'"
    if _GLOB.search(ident):
        return "an identity has no wildcard characters (* ? [ ])"
    if _WINDOW_LIKE.search(ident) and not _WINDOW.search(ident):
        return "a window is @dYYYYMMDD (UTC day) or @mYYYYMM (UTC month)"
    if switch and _WINDOW.search(ident):
        return "a kill switch names the identity without its window (drop the @... suffix)"
    if not switch and ident.startswith("@"):
        return "expected kind:identity"
    return None if _identity_ok(ident) else "the identity is empty or too long"


def _scope_type(switch: bool) -> Any:
    def parse(value: str) -> str:
        problem = scope_syntax(value, switch=switch)
        if problem is not None:
            example = "'user:alice', 'user:*' or '*'" if switch else (
                "'user:alice', 'tenant:acme@m202611' or 't:<trace id>'"
            )
            raise argparse.ArgumentTypeError(
                f"invalid scope '{escaped(value)}': {problem} (e.g. {example})"
            )
        return value

    parse.__name__ = "scope"
    return parse


def _timeout_arg(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: '{escaped(value)}'") from None
    if not math.isfinite(seconds) or not MIN_TIMEOUT_SECONDS <= seconds <= MAX_TIMEOUT_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from {MIN_TIMEOUT_SECONDS} to "
            f"{MAX_TIMEOUT_SECONDS:g}, got '{escaped(value)}'"
        )
    return seconds


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``otel-budget: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Inspect and steer the otel-budget ledger shared through Redis.",
        epilog="SCOPE is a ledger key as 'show' prints it: t:<trace>, user:alice, "
        "user:alice@d20261123 (UTC day), tenant:acme@m202611 (UTC month), b:<block>, process; "
        "for pause/resume '*' (everything), 'user:*' (every user) or 'user:alice'.",
    )
    parser.add_argument(
        "--redis-url", default=None,
        help="Redis URL (default: $OTEL_BUDGET_REDIS_URL)",
    )  # fmt: skip
    parser.add_argument("--key-prefix", default="otb:", help="ledger key prefix (default: otb:)")
    parser.add_argument(
        "--timeout", type=_timeout_arg, default=2.0,
        help="seconds to wait for Redis per attempt, up to 300 (default: 2)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    show = sub.add_parser("show", help="live spend per scope (key, limit, spent, reserved, remaining)")
    show.add_argument("--prefix", default="", help="only scopes whose key starts with this")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pause = sub.add_parser("pause", help="turn a kill switch on (default '*': everything)")
    pause.add_argument("scope", nargs="?", default=GLOBAL_PAUSE_KEY, type=_scope_type(True))
    resume = sub.add_parser("resume", help="turn a kill switch off (default '*')")
    resume.add_argument("scope", nargs="?", default=GLOBAL_PAUSE_KEY, type=_scope_type(True))

    limit = sub.add_parser("set-limit", help="set a scope's limit in USD (an operator override)")
    limit.add_argument("scope", type=_scope_type(False))
    limit.add_argument("usd", help="the limit in USD, e.g. 20 or 0.50")

    reset = sub.add_parser("reset", help="set a scope's spent and reserved to 0 (limit kept)")
    reset.add_argument("scope", type=_scope_type(False), help="one ledger key, as 'show' prints it")
    delete = sub.add_parser("delete", help="forget a scope entirely (its limit override too)")
    delete.add_argument("scope", type=_scope_type(False), help="one ledger key, as 'show' prints it")

    paused = sub.add_parser("paused", help="list the kill switches that are on")
    paused.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _open_storage(args: argparse.Namespace) -> LedgerStorage:
    url = args.redis_url or os.environ.get("OTEL_BUDGET_REDIS_URL")
    if not url:
        raise CliError("no Redis URL: pass --redis-url or set OTEL_BUDGET_REDIS_URL")
    try:
        from otel_budget.storage.redis import RedisStorage
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise CliError(f"{exc}; install with: pip install '.[redis]' (from the checkout)") from None
    try:
        return RedisStorage.from_url(  # redis+cluster:// picks the cluster ledger
            url, prefix=args.key_prefix, socket_timeout=args.timeout,
            socket_connect_timeout=args.timeout, retries=1, breaker_failures=1_000_000,
        )  # fmt: skip
    except ImportError as exc:
        raise CliError(f"{exc}") from None
    except ValueError as exc:
        raise CliError(f"invalid Redis URL: {exc}") from None


@dataclass(frozen=True)
class _Row:
    """One scope of ``show``: its usage, or why it could not be read."""

    key: str
    usage: ScopeUsage | None
    problem: str = ""


def _redis_rows(storage: Any, prefix: str) -> list[_Row]:
    """Every scope hash under the prefix, each read on its own: a hash another writer broke
    (wrong type, a field that is not an integer, a name that is not UTF-8) is one unreadable
    row, never the end of the listing."""
    import redis

    head = storage.prefix + "s:"
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", head + prefix) + "*"
    pool = storage.client.connection_pool  # the storage's client decodes: names as bytes here
    raw_client = redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class,
        **{**pool.connection_kwargs, "decode_responses": False},
    ))  # fmt: skip
    try:
        names = sorted(set(raw_client.scan_iter(match=pattern.encode(), count=1000)))
        pipe = raw_client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(name, "limit", "spent", "reserved")
        results = pipe.execute(raise_on_error=False)
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise ConnectionError(f"Redis ledger at {storage.url} unavailable: {exc}") from None
    except redis.RedisError as exc:
        raise CliError(f"the ledger refused the listing: {exc}") from None
    finally:
        raw_client.close()
    rows = []
    for name, values in zip(names, results, strict=True):
        raw = name if isinstance(name, bytes) else str(name).encode()
        key = raw.decode("utf-8", "surrogateescape")[len(head):]
        if isinstance(values, Exception):
            rows.append(_Row(key, None, _one_line(values)))
            continue
        if values[0] is None:
            continue  # not a scope (yet): no limit field
        try:
            numbers = [int(v) if v is not None else 0 for v in values]
        except (TypeError, ValueError):
            rows.append(_Row(key, None, "a field is not an integer"))
            continue
        if not key.isprintable() and any("\udc80" <= ch <= "\udcff" for ch in key):
            rows.append(_Row(key, None, "the key is not UTF-8"))
            continue
        rows.append(_Row(key, ScopeUsage(key, *numbers)))
    return rows


def _rows(storage: LedgerStorage, prefix: str) -> list[_Row]:
    from otel_budget.storage.redis import RedisStorage  # no redis import needed: lazy inside
    from otel_budget.storage.redis_cluster import RedisClusterStorage

    # (a cluster has no single connection pool to read raw names with: its own scan)
    if isinstance(storage, RedisStorage) and not isinstance(storage, RedisClusterStorage):
        return _redis_rows(storage, prefix)
    return [_Row(u.key, u) for u in storage.scopes(prefix)]


def _show(storage: LedgerStorage, args: argparse.Namespace, out: TextIO) -> None:
    rows = _rows(storage, args.prefix)
    if args.json:
        data: list[dict[str, Any]] = []
        for row in rows:
            u = row.usage
            if u is None:
                data.append({"key": row.key, "unreadable": row.problem})
                continue
            data.append({
                "key": u.key,
                "limit_usd": usd_text(u.limit), "spent_usd": usd_text(u.spent),
                "reserved_usd": usd_text(u.reserved), "remaining_usd": usd_text(u.remaining),
                "limit_nanos": u.limit, "spent_nanos": u.spent,
                "reserved_nanos": u.reserved, "remaining_nanos": u.remaining,
            })  # fmt: skip
        json.dump(data, out, indent=2)  # ensure_ascii: control characters arrive escaped
        out.write("\n")
        return
    if not rows:
        out.write(
            f"no scopes{' starting with ' + repr(escaped(args.prefix)) if args.prefix else ''}\n"
        )
        return
    header = ("SCOPE", "LIMIT", "SPENT", "RESERVED", "REMAINING")
    rows_text = []
    for row in rows:
        u = row.usage
        if u is None:
            rows_text.append((escaped(row.key), "unreadable", "-", "-", "-"))
        else:
            rows_text.append((escaped(u.key), usd_text(u.limit), usd_text(u.spent),
                              usd_text(u.reserved), usd_text(u.remaining)))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows_text]) for i in range(5)]
    for cells_in in [header, *rows_text]:
        cells = [cells_in[0].ljust(widths[0])] + [cells_in[i].rjust(widths[i]) for i in range(1, 5)]
        out.write("  ".join(cells).rstrip() + "\n")
    bad = [row for row in rows if row.usage is None]
    for row in bad:
        out.write(f"unreadable: {escaped(row.key)}: {escaped(row.problem)}\n")


def _run(storage: LedgerStorage, args: argparse.Namespace, out: TextIO) -> None:
    command = args.command
    if command == "show":
        _show(storage, args, out)
    elif command == "pause":
        storage.pause(args.scope)
        out.write(f"paused {args.scope}\n")
    elif command == "resume":
        before = storage.paused()
        if args.scope not in before:
            out.write(f"{args.scope} was not paused: nothing to resume\n")
        else:
            storage.resume(args.scope)
            out.write(f"resumed {args.scope}\n")
        others = sorted(before - {args.scope})
        if others:
            listed = ", ".join(escaped(key) for key in others)
            out.write(f"still paused: {listed}\n")
    elif command == "set-limit":
        try:
            nanos = parse_usd(args.usd, what="limit")
        except ValueError as exc:
            raise CliError(f"set-limit: {exc}") from None
        known = storage.usage(args.scope) is not None
        storage.set_limit(args.scope, nanos)
        out.write(f"limit of {args.scope} set to ${usd_text(nanos)}\n")
        if not known:
            out.write(
                f"note: the ledger had no spend on {args.scope} yet; check the key "
                "('otel-budget show' lists the scopes in use)\n"
            )
    elif command in ("reset", "delete"):
        found = storage.reset(args.scope) if command == "reset" else storage.delete(args.scope)
        if not found:
            raise CliError(f"{command}: no scope {args.scope!r} in the ledger")
        out.write(f"{'reset' if command == 'reset' else 'deleted'} {args.scope}\n")
    elif command == "paused":
        keys = sorted(storage.paused())
        if getattr(args, "json", False):
            json.dump(keys, out)
            out.write("\n")
        elif keys:
            out.write("".join(f"{escaped(key)}\n" for key in keys))
        else:
            out.write("no kill switch is on\n")
    else:  # pragma: no cover - argparse rejects unknown commands
        raise CliError(f"unknown command {command!r}")


def _one_line(exc: BaseException | str) -> str:
    """One terminal-safe line: whitespace runs folded, control characters escaped."""
    return escaped(" ".join(str(exc).split()))


def main(
    argv: Sequence[str] | None = None,
    *,
    storage: LedgerStorage | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the CLI; returns the exit status. ``storage`` (tests) replaces the Redis ledger."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        # argparse prints usage, errors and --help itself: onto our streams.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the error (or --help)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    owned = storage is None
    try:
        if storage is None:
            storage = _open_storage(args)
        _run(storage, args, out)
        return 0
    except ConnectionError as exc:  # LedgerUnavailableError and friends
        err.write(f"{PROG}: error: cannot reach the ledger: {_one_line(exc)}\n")
        return EXIT_USAGE
    except (CliError, NotImplementedError, ValueError) as exc:
        err.write(f"{PROG}: error: {_one_line(exc)}\n")
        return EXIT_USAGE
    except Exception as exc:  # anything else still ends in one line, never a traceback
        err.write(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    finally:
        if owned and storage is not None:
            with contextlib.suppress(Exception):
                storage.close()


if __name__ == "__main__":  # python -m otel_budget.cli
    sys.exit(main())
