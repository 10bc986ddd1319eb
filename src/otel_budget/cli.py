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
``show`` prints it: ``t:<trace id>`` for a trace, ``user:alice`` for a named scope without a
window, ``user:alice@d20261123`` / ``tenant:acme@m202611`` for a UTC day / month window.

Exit status: 0 on success, 2 on a bad argument or an unreachable ledger (one line on
stderr, no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import TextIO

from otel_budget.money import parse_usd
from otel_budget.storage import GLOBAL_PAUSE_KEY, LedgerStorage

PROG = "otel-budget"
EXIT_USAGE = 2


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


def _scope_arg(value: str) -> str:
    if not value or value != value.strip() or any(ord(ch) < 32 for ch in value):
        raise argparse.ArgumentTypeError(
            f"invalid scope {value!r}: expected a ledger key such as 'user:alice' or '*'"
        )
    return value


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*:[^\x00-\x1f\x7f*?\[\]]+")
_WINDOW = re.compile(r"@(d\d{8}|m\d{6})$")
_WINDOW_LIKE = re.compile(r"@[dm]\d+$")


def ledger_key(value: str) -> str:
    """One scope's ledger key (no wildcard): ``kind:identity``, optionally ``@dYYYYMMDD`` /
    ``@mYYYYMM``; ``t:<32 hex>`` for a trace."""
    hint = "expected one ledger key as 'show' prints it, e.g. 'user:alice' or 'user:alice@d20261123'"
    if value == "process":
        raise CliError(
            "invalid scope 'process': each process has its own, "
            "'process:<host>:<pid>:<start>' (see 'show --prefix process:')"
        )
    if not _KEY.fullmatch(value) or value != value.strip():
        raise CliError(f"invalid scope {value!r}: {hint}")
    if value.startswith("t:") and not re.fullmatch(r"t:[0-9a-f]{32}", value):
        raise CliError(f"invalid trace scope {value!r}: expected t:<32 hex digits>")
    if _WINDOW_LIKE.search(value) and not _WINDOW.search(value):
        raise CliError(
            f"invalid scope {value!r}: a window is @dYYYYMMDD (UTC day) or @mYYYYMM (UTC month)"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and steer the otel-budget ledger shared through Redis.",
        epilog="SCOPE is a ledger key as 'show' prints it: t:<trace>, user:alice, "
        "user:alice@d20261123 (UTC day), tenant:acme@m202611 (UTC month); for pause/resume "
        "also '*' (everything) or 'user:*' (every user).",
    )
    parser.add_argument(
        "--redis-url", default=None,
        help="Redis URL (default: $OTEL_BUDGET_REDIS_URL)",
    )  # fmt: skip
    parser.add_argument("--key-prefix", default="otb:", help="ledger key prefix (default: otb:)")
    parser.add_argument(
        "--timeout", type=float, default=2.0,
        help="seconds to wait for Redis per attempt (default: 2)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    show = sub.add_parser("show", help="live spend per scope (key, limit, spent, reserved, remaining)")
    show.add_argument("--prefix", default="", help="only scopes whose key starts with this")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pause = sub.add_parser("pause", help="turn a kill switch on (default '*': everything)")
    pause.add_argument("scope", nargs="?", default=GLOBAL_PAUSE_KEY, type=_scope_arg)
    resume = sub.add_parser("resume", help="turn a kill switch off (default '*')")
    resume.add_argument("scope", nargs="?", default=GLOBAL_PAUSE_KEY, type=_scope_arg)

    limit = sub.add_parser("set-limit", help="set a scope's limit in USD (an operator override)")
    limit.add_argument("scope", type=_scope_arg)
    limit.add_argument("usd", help="the limit in USD, e.g. 20 or 0.50")

    reset = sub.add_parser("reset", help="set a scope's spent and reserved to 0 (limit kept)")
    reset.add_argument("scope", help="one ledger key, as 'show' prints it")
    delete = sub.add_parser("delete", help="forget a scope entirely (its limit override too)")
    delete.add_argument("scope", help="one ledger key, as 'show' prints it")

    paused = sub.add_parser("paused", help="list the kill switches that are on")
    paused.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _open_storage(args: argparse.Namespace) -> LedgerStorage:
    url = args.redis_url or os.environ.get("OTEL_BUDGET_REDIS_URL")
    if not url:
        raise CliError("no Redis URL: pass --redis-url or set OTEL_BUDGET_REDIS_URL")
    if not args.timeout > 0:
        raise CliError(f"--timeout must be positive, got {args.timeout}")
    try:
        from otel_budget.storage.redis import RedisStorage
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise CliError(f"{exc}; install with: pip install 'otel-budget[redis]'") from None
    try:
        return RedisStorage(
            url, prefix=args.key_prefix, socket_timeout=args.timeout,
            socket_connect_timeout=args.timeout, retries=1, breaker_failures=1_000_000,
        )  # fmt: skip
    except ImportError as exc:
        raise CliError(f"{exc}") from None
    except ValueError as exc:
        raise CliError(f"invalid Redis URL: {exc}") from None


def _show(storage: LedgerStorage, args: argparse.Namespace, out: TextIO) -> None:
    scopes = storage.scopes(args.prefix)
    if args.json:
        rows = [
            {
                "key": u.key,
                "limit_usd": usd_text(u.limit), "spent_usd": usd_text(u.spent),
                "reserved_usd": usd_text(u.reserved), "remaining_usd": usd_text(u.remaining),
                "limit_nanos": u.limit, "spent_nanos": u.spent,
                "reserved_nanos": u.reserved, "remaining_nanos": u.remaining,
            }  # fmt: skip
            for u in scopes
        ]
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    if not scopes:
        out.write(f"no scopes{' starting with ' + repr(args.prefix) if args.prefix else ''}\n")
        return
    header = ("SCOPE", "LIMIT", "SPENT", "RESERVED", "REMAINING")
    rows_text = [
        (u.key, usd_text(u.limit), usd_text(u.spent), usd_text(u.reserved), usd_text(u.remaining))
        for u in scopes
    ]
    widths = [max(len(row[i]) for row in [header, *rows_text]) for i in range(5)]
    for row in [header, *rows_text]:
        cells = [row[0].ljust(widths[0])] + [row[i].rjust(widths[i]) for i in range(1, 5)]
        out.write("  ".join(cells).rstrip() + "\n")


def _run(storage: LedgerStorage, args: argparse.Namespace, out: TextIO) -> None:
    command = args.command
    if command == "show":
        _show(storage, args, out)
    elif command == "pause":
        storage.pause(args.scope)
        out.write(f"paused {args.scope}\n")
    elif command == "resume":
        storage.resume(args.scope)
        out.write(f"resumed {args.scope}\n")
    elif command == "set-limit":
        try:
            nanos = parse_usd(args.usd, what="limit")
        except ValueError as exc:
            raise CliError(f"set-limit: {exc}") from None
        storage.set_limit(args.scope, nanos)
        out.write(f"limit of {args.scope} set to ${usd_text(nanos)}\n")
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
            out.write("".join(f"{key}\n" for key in keys))
        else:
            out.write("no kill switch is on\n")
    else:  # pragma: no cover - argparse rejects unknown commands
        raise CliError(f"unknown command {command!r}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        if args.command in ("reset", "delete"):
            ledger_key(args.scope)  # one clear line (exit 2) before touching the ledger
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
    finally:
        if owned and storage is not None:
            storage.close()


if __name__ == "__main__":  # python -m otel_budget.cli
    sys.exit(main())
