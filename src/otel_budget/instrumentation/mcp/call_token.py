"""The token that says an MCP tool call is metered by its client, so it is charged once.

    token = new_token()                                # client: one per metered call
    await register(runtime, token, "search", granted)  # reserved, not yet sent
    ... params._meta["io.github.otel-budget/call"] = token ...
    await release(runtime, token, "search")            # settled, however it ended

    found = await taken(runtime, meta, "search")       # server: consumed, once
    # IN_PROCESS, or the nano-USD the client reserved; None: the server meters it

The client registers the token in the ledger it meters the call on (``put_token``, with
what it reserved for the call, for at most ``TOKEN_TTL_SECONDS``: a crashed client leaves
nothing behind) and, in this process, among ``OPEN_CALLS``. A server takes it: a token this process's own client is sending is
taken from ``OPEN_CALLS`` (no ledger round trip: an in-process ``Client(server)``); any other
from the server's ledger (``take_token``, atomic: one server call per client call, so a
replayed or copied token is charged). A server on another ledger, or a remote client
without write access to the shared ledger, finds nothing: the token is 128 random bits,
which nobody can guess, and the server meters the call itself.

A token is bound to the tool's name: the ledger holds a digest of (token, name), so a token
for one tool cannot run another one unmetered. The server trusts it only for a call the
client reserved at least the server's own price for (``server``): a client that prices the
tool lower, or not at all, does not make it cheaper.

Failures never reach the app and never switch enforcement off: a client that cannot
register its token still sends it (the server will not find it and meters the call: charged
twice rather than not at all); a server whose take fails (the ledger is down) meters the
call under the failure policy; both are logged, rate-limited.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Mapping
from typing import Any

from otel_budget.instrumentation.mcp.outcome import CALL_META_KEY
from otel_budget.runtime import BudgetRuntime

#: How long the ledger holds a client's token at most (it is released when the call
#: settles): the bound for a client that crashed mid-call, and more than a request takes to
#: reach its server.
TOKEN_TTL_SECONDS = 300.0

#: The calls this process's client wrappers are sending (by ``ledger_token``: bound to the
#: tool too) -> taken by a server in this process.
OPEN_CALLS: dict[str, bool] = {}

#: What ``taken`` answers for a token this process's own client sends (same runtime, same
#: prices: trusted as it is).
IN_PROCESS = "process"

_HEX = frozenset("0123456789abcdef")


def new_token() -> str:
    """128 random bits, as 32 hex characters."""
    return secrets.token_hex(16)


def _is_token(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and _HEX.issuperset(value)


def ledger_token(token: str, name: Any) -> str:
    """What the ledger holds for ``token`` sent for the tool ``name``."""
    text = f"{token}\x00{name}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16).hexdigest()


async def register(runtime: BudgetRuntime, token: str, name: Any, amount: int) -> None:
    """Open the client's call: the token in this process and in the ledger, with ``amount``
    (nano-USD reserved for the call). A ledger that cannot hold it is logged (the server
    then meters the call itself)."""
    key = ledger_token(token, name)
    OPEN_CALLS[key] = False
    try:
        await runtime.storage.aput_token(key, TOKEN_TTL_SECONDS, amount)
    except Exception as exc:
        runtime.engine.log_once("mcp call token (register)", exc)


async def release(runtime: BudgetRuntime, token: str, name: Any) -> None:
    """Close the client's call: the token is no longer good anywhere. Cancelled while the
    ledger is asked, the release runs in a worker thread (the TTL bounds it anyway)."""
    storage, key = runtime.storage, ledger_token(token, name)
    OPEN_CALLS.pop(key, None)
    try:
        await storage.atake_token(key)
    except Exception as exc:
        runtime.engine.log_once("mcp call token (release)", exc)
    except BaseException:  # cancelled: the ledger still forgets it
        try:
            asyncio.get_running_loop().run_in_executor(None, _release_now, runtime, key)
        except RuntimeError:  # no asyncio loop: its TTL ends it
            pass
        raise


def _release_now(runtime: BudgetRuntime, key: str) -> None:
    try:
        runtime.storage.take_token(key)
    except Exception as exc:
        runtime.engine.log_once("mcp call token (release)", exc)


async def taken(
    runtime: BudgetRuntime, meta: Mapping[str, Any], name: Any
) -> str | int | None:
    """The call's client metered it: ``IN_PROCESS``, or what it reserved (nano-USD) for a
    token taken from the ledger (now, once). ``None`` when the server must meter it: no
    token, a token nobody registered, one taken already, expired, or a ledger that did not
    answer (logged)."""
    token = meta.get(CALL_META_KEY)
    if not isinstance(token, str) or not _is_token(token):
        return None
    key = ledger_token(token, name)
    local = OPEN_CALLS.get(key)
    if local is not None:  # this process's own client: taken here, once
        if local:
            return None
        OPEN_CALLS[key] = True
        return IN_PROCESS
    try:
        found = await runtime.storage.atake_token(key)
    except Exception as exc:  # an outage (or a ledger without tokens): metered here
        runtime.engine.log_once("mcp call token (take)", exc)
        return None
    return found if type(found) is int else None


__all__ = [
    "IN_PROCESS",
    "OPEN_CALLS",
    "TOKEN_TTL_SECONDS",
    "ledger_token",
    "new_token",
    "register",
    "release",
    "taken",
]
