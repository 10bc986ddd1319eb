"""The Redis ledger on a Redis Cluster: ``RedisClusterStorage``, one slot group per scope.

    >>> from otel_budget import BudgetSpanProcessor
    >>> from otel_budget.storage.redis import RedisStorage
    >>> storage = RedisStorage.from_url("redis+cluster://10.0.0.1:7000")   # doctest: +SKIP
    >>> processor = BudgetSpanProcessor(max_usd=2, storage=storage)         # doctest: +SKIP

``OTEL_BUDGET_REDIS_URL=redis+cluster://host:port`` (or ``rediss+cluster://``) selects it
too; any node of the cluster will do, redis-py's ``RedisCluster`` client finds the others
and follows ``MOVED``/``ASK`` redirections (a reshard while calls run). Every option, the
journal, the breaker and the fallback are ``RedisStorage``'s (``storage/redis.py``); only
the key layout and the way scripts are called differ.

A call reserves in several scopes at once (its trace, named scopes such as ``user:<id>``,
windows). Putting all of them in one slot would put every scope in one slot (no scale-out),
so each scope is its own **slot group**: its keys carry the scope as hash tag,
``P{s:<scope>}`` (hash), ``P{s:<scope>}z`` (open leases), ``P{s:<scope>}l:<lease>`` (that
group's lease record), and every script call touches one group only (one slot). The same
``reserve.lua`` runs once per group, in the caller's order: group 1 grants
``g1 <= maximum``, group i is asked for ``[minimum, g(i-1)]``; when a group refuses, the
groups already granted are released (mode ``t``, by lease, idempotent); when a later group
granted less than an earlier one, the earlier group's reservation is lowered to the final
grant (``lua/shrink.lua``, one more round trip, only then). Between those round trips an
earlier group holds a little more than the final grant (conservative, never an overshoot).
Each group's record holds that group's own amount, so settling is exact per group.
``spent + reserved <= limit`` still holds in every scope at every instant: each group's
script is atomic. Settles and charges run once per group as well.

**Cost:** one round trip per scope group for the reserve, one per group for the settle,
plus one ``SET`` of a locator ``P{l:<lease>}`` after a granted reserve (the lease's scope
keys, for a settle by an instance that does not know them). A call on a trace and a user
cap: 5 round trips against 2 on one Redis. (redis-py's cluster pipeline, which would send
the groups' settles together, costs more client CPU than the calls it saves: measured.) The single-slot alternative stays available: a prefix with a
hash tag (``prefix="{otb}:"``) puts every key in one slot, and then this class runs
``RedisStorage``'s one-script calls (one round trip, no scale-out).

**Call tokens** (``put_token`` / ``take_token``) are one key each, ``P tok:{<token>}``:
one command, in the token's own slot (``RedisStorage.token_key``).

**Kill switches** live in their own slot (``P{pause}``). The reserve scripts get no pause
keys; the client checks a copy of the pause set that it refreshes when it is older than
``pause_refresh_seconds`` (0.1 s): a pause applies to every reserve that starts more than
that long after ``pause()`` returned (``pause()`` on this instance applies at once).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from otel_budget.storage.base import GLOBAL_PAUSE_KEY, PROCESS_SCOPE_KEY, ScopeLimit, ScopeUsage
from otel_budget.storage.redis import (
    _GLOB,
    RedisStorage,
    _text,
    process_scope_name,
)

try:  # optional dependency, as in storage/redis.py
    import redis as _redis
    from redis._parsers.encoders import Encoder as _Encoder
    from redis.backoff import NoBackoff as _NoBackoff
    from redis.commands.core import Script as _Script
    from redis.connection import parse_url as _parse_url
    from redis.retry import Retry as _Retry
except ImportError:  # pragma: no cover - RedisStorage raises a clear ImportError first
    _redis = None  # type: ignore[assignment]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def _hash_tag(prefix: str) -> bool:
    """True if ``prefix`` holds a hash tag by Redis' rule (the first '{', the first '}'
    after it, something between). A '{' without one would make Redis hash some group keys
    whole (a cross-slot script call): refused."""
    start = prefix.find("{")
    if start < 0:
        return False
    end = prefix.find("}", start + 1)
    if end <= start + 1:
        raise ValueError(
            f"prefix {prefix!r}: a '{{' must open a hash tag ('{{otb}}:'), or not be there"
        )
    return True


def is_cluster_url(url: str | None) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://`` URLs."""
    return url is not None and url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


class LazyClusterClient:
    """A redis-py ``RedisCluster``, built at its first use and, until one is built, tried
    again at each use. redis-py's cluster client reads the slot map from a node when it is
    built, so a cluster down while the ledger is being built would otherwise leave a ledger
    that never works until the process restarts (every call refused under ``fail_closed``,
    none budgeted under ``fail_open``). Lazily, that is an outage like any other: each call
    fails fast while the breaker is open, settlements are journaled, and the ledger works
    again as soon as a node answers. Everything else goes to the client."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._client: Any = None
        self._lock = threading.Lock()
        self._encoder = _Encoder("utf-8", "strict", True)  # type: ignore[no-untyped-call]

    def _connected(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client = self._client = self._make()
        return client

    def get_encoder(self) -> Any:
        return self._encoder  # (what the scripts' SHA1 is computed with, without a client)

    def register_script(self, script: str) -> Any:
        return _Script(self, script)  # type: ignore[arg-type]  # (calls reach the client via self)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connected(), name)


class RedisClusterStorage(RedisStorage):
    """The budget ledger on a Redis Cluster (see the module docstring)."""

    def __init__(
        self, url: str | None = None, client: Any = None, *, prefix: str = "otb:",
        pause_refresh_seconds: float = 0.1, **kwargs: Any,
    ) -> None:  # fmt: skip
        if pause_refresh_seconds < 0:
            raise ValueError("pause_refresh_seconds must be >= 0")
        # A prefix with a hash tag: every key in one slot, RedisStorage's one-script calls.
        self.single_slot = _hash_tag(prefix)
        super().__init__(url, client, prefix=prefix, **kwargs)
        # RedisStorage's per-thread single-node connections and its raw batch pipeline do
        # not apply to a cluster client: script calls go through redis-py's cluster client,
        # which routes each one to its slot's node (MOVED/ASK included).
        self._own_client = False
        self.pause_refresh_seconds = float(pause_refresh_seconds)
        if not self.single_slot:
            self._pause_key = prefix + "{pause}"
        self._pauses: frozenset[str] = frozenset()
        self._pauses_at = -float("inf")  # monotonic time of the fetch
        self._pause_lock = threading.Lock()
        shrink = resources.files("otel_budget.storage").joinpath("lua").joinpath("shrink.lua")
        self._shrink = self.client.register_script(shrink.read_text(encoding="utf-8"))

    def _make_client(self, url: str, socket_timeout: float, socket_connect_timeout: float) -> Any:
        scheme, sep, rest = url.partition("://")
        if scheme.lower() in CLUSTER_SCHEMES:
            url = scheme.split("+", 1)[0] + sep + rest
        _parse_url(url)  # type: ignore[no-untyped-call]  # a malformed URL is a configuration error now, not an outage later
        return LazyClusterClient(lambda: _redis.RedisCluster.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=_Retry(_NoBackoff(), 0),  # our retry loop, as in RedisStorage
            decode_responses=True,
        ))  # fmt: skip

    def _call(self, op: Callable[[], Any], settle: bool = False) -> Any:
        def guarded() -> Any:
            try:
                return op()
            except _redis.exceptions.RedisClusterException as exc:
                # "cannot be connected" and the like are not RedisErrors: an outage all the same.
                raise _redis.ConnectionError(str(exc)) from exc

        return super()._call(guarded, settle)

    # -- keys -----------------------------------------------------------------------------
    def _group(self, key: str) -> str:
        if key == PROCESS_SCOPE_KEY:
            key = process_scope_name()
        return self.prefix + "{s:" + key + "}"

    def scope_key(self, key: str) -> str:
        if self.single_slot:
            return super().scope_key(key)
        return self._group(key)

    def _zkey(self, key: str) -> str:
        if self.single_slot:
            return super()._zkey(key)
        return self._group(key) + "z"

    def _rkey(self, name: str) -> str:
        """The lease's locator (its scope keys), or its record in single-slot mode."""
        if self.single_slot:
            return super()._rkey(name)
        return self.prefix + "{l:" + name + "}"

    def _group_keys(self, key: str, name: str) -> list[str]:
        """One group's (lease record, scope hash, lease zset): one slot."""
        group = self._group(key)
        return [group + "l:" + name, group, group + "z"]

    # -- kill switches ----------------------------------------------------------------------
    def _current_pauses(self) -> frozenset[str]:
        """The pause set, at most ``pause_refresh_seconds`` old (fetched when older)."""
        now = time.monotonic()
        if now - self._pauses_at <= self.pause_refresh_seconds:
            return self._pauses
        with self._pause_lock:
            if time.monotonic() - self._pauses_at > self.pause_refresh_seconds:
                started = time.monotonic()  # the copy is as old as the request's start
                members = self.client.smembers(self._pause_key)
                self._pauses = frozenset(_text(m) for m in members)
                self._pauses_at = started
            return self._pauses

    def _forget_pauses(self) -> None:
        with self._pause_lock:  # after a refresh under way, which may predate the change
            self._pauses_at = -float("inf")

    def pause(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        super().pause(key)
        self._forget_pauses()  # this instance sees its own pause at once

    def resume(self, key: str = GLOBAL_PAUSE_KEY) -> None:
        super().resume(key)
        self._forget_pauses()

    # -- scripts, once per slot group ---------------------------------------------------
    def _reserve_once(
        self, name: str, scopes: Sequence[ScopeLimit], minimum: int, maximum: int,
        pause_keys: Sequence[str], want: bool,
    ) -> Any:  # fmt: skip
        if self.single_slot:
            return super()._reserve_once(name, scopes, minimum, maximum, pause_keys, want)
        paused = self._current_pauses()
        if paused:
            for key in (GLOBAL_PAUSE_KEY, *pause_keys):
                if key in paused:
                    return ["paused", 0, key]
        config = (
            f"{self._lease_ms}:{self._clock_offset_ms}:{self._record_ms}:{self._sweep}:"
            f"{1 if want else 0}"
        )
        script = self._scripts["reserve"]
        grant = maximum
        swept = 0
        fresh = False
        granted: list[str] = []  # scope keys whose group holds (or held) this lease
        amounts: list[int] = []  # what each of those groups holds
        values: list[Any] = []
        for i, spec in enumerate(scopes):
            group = self._group(spec.key)
            # KEYS[1] (the pause set in RedisStorage) is a key of the group that never
            # exists: no pause keys are passed (ARGV 0), the check was done above.
            keys = [group + "p", *self._group_keys(spec.key, name)[:1], group, group + "z"]
            args = [name, f"{minimum}:{grant}", config, json.dumps([spec.key]), 0,
                    self._spec(spec)]  # fmt: skip
            reply = script(keys=keys, args=args, client=self.client)
            status = _text(reply[0])
            swept += int(reply[1])
            if status == "denied":
                self._roll_back(name, granted)
                return ["denied", swept, i + 1, *reply[3:6]]
            granted.append(spec.key)
            if status == "dup":  # an earlier attempt of this call reserved it here
                amounts.append(int(reply[2]))
                grant = min(grant, int(reply[2]))
                if want:
                    values.extend(self._usage_values(spec.key))
                continue
            fresh = True
            amounts.append(int(reply[3]))
            grant = min(grant, int(reply[3]))
            values.extend(reply[4:7])
        if amounts:  # what a retried (dup) group holds may exceed this attempt's maximum
            grant = min(amounts)
        for key, held in zip(granted, amounts, strict=True):
            if held > grant:  # a later group granted less: hold only the final grant
                self._shrink(keys=self._group_keys(key, name), args=[name, str(grant), "0"],
                             client=self.client)  # fmt: skip
        if granted:
            # The locator, for a settle by an instance that does not know the lease's scopes
            # (another process, or this one's table of open leases overflowed). A plain
            # SET: redis-py's cluster pipeline costs more client CPU than a second call.
            self.client.set(self._rkey(name), json.dumps(granted), px=self._record_ms)
        if scopes and not fresh:  # every group had it: what they hold, as RedisStorage says
            return ["dup", swept, grant]
        text = "\n".join(sorted(paused))
        return ["ok", swept, text, grant, *values]

    def _usage_values(self, key: str) -> list[Any]:
        values = self.client.hmget(self._group(key), "limit", "spent", "reserved")
        return [v or 0 for v in values]

    def _roll_back(self, name: str, keys: Sequence[str]) -> None:
        """Take back what earlier groups granted to a reservation another group refused, and
        forget their records: as in RedisStorage, a refused lease left nothing behind (a
        later reserve or charge of the same lease counts afresh in every group)."""
        for index, key in enumerate(keys):
            try:
                self._shrink(keys=self._group_keys(key, name), args=[name, "0", "1"],
                             client=self.client)  # fmt: skip
            except _redis.RedisError:
                # Not lost: a tombstone release is journaled, as for any release that
                # cannot reach Redis (these groups keep a record of the lease).
                self._journal_add(("settle", name, list(keys[index:]), None, "t", 0))
                return

    def _settle_groups(
        self, name: str, keys: Sequence[str], specs: Sequence[ScopeLimit] | None, mode: str,
        actual: int,
    ) -> Any:  # fmt: skip
        """Settle one lease in each of its groups, in RedisStorage's reply format: [keys,
        status, amount, then index limit spent reserved per scope], or ("charged", reply)
        when no group had its record (Redis lost it: charged instead, spend never drops)."""
        script = self._scripts["settle"]
        by_key = {s.key: s for s in specs} if specs else {}
        statuses: list[str] = []
        amounts: list[int] = []
        usages: list[Any] = []
        charged = 0
        args = [name, mode, str(actual), self._settled_ms]
        for index, key in enumerate(keys, 1):
            # One call per group, in turn (a cluster pipeline costs more client CPU and
            # wall time here: bench/bench_redis_cluster.py, "pipeline_vs_calls").
            reply = _text(script(keys=self._group_keys(key, name), args=args, client=self.client)
                          ).split(" ")  # fmt: skip
            status = reply[0]
            if status == "none" and mode == "c" and key in by_key:
                # This group's record is gone (a node restarted without persistence, or it
                # expired): charge it, as RedisStorage charges a whole lease.
                out = self._charge_group(name, by_key[key], actual)
                status = "late" if _text(out[0]) == "ok" else "dup"
                if status == "late":
                    charged += 1
                    usages.extend([index, *out[1:4]])
                statuses.append(status)
                continue
            statuses.append(status)
            if status in ("dup", "none"):
                continue
            amounts.append(int(reply[1]))
            for i in range(2, len(reply), 4):
                usages.extend([index, *reply[i + 1 : i + 4]])
        if charged and charged == len(keys) and specs is not None and len(specs) == len(keys):
            values = []
            for i in range(0, len(usages), 4):
                values.extend(usages[i + 1 : i + 4])
            return ("charged", ["ok", *values])
        live = [s for s in statuses if s not in ("dup", "none")]
        if not live:
            status = "none" if statuses and all(s == "none" for s in statuses) else "dup"
        elif mode == "c":
            status = "late" if "late" in live else "ok"
        else:
            status = "released" if "released" in live else "dup"
        amount = min(amounts) if amounts else 0
        return [list(keys), status, amount, *usages]

    def _locate(self, name: str) -> list[str]:
        stored = self.client.get(self._rkey(name))
        return json.loads(_text(stored)) if stored else []

    def _settle_once(
        self, name: str, keys: Sequence[str] | None, mode: str, actual: int, client: Any = None
    ) -> Any:
        # ``client`` (a batch) is never passed here: this class's _settle_many settles in turn.
        if self.single_slot:
            return super()._settle_once(name, keys, mode, actual)
        if keys is None:  # reserved by another instance (or forgotten here): the locator
            keys = self._locate(name)
        return self._settle_groups(name, keys, None, mode, actual)

    def _settle_op(
        self, name: str, keys: Sequence[str] | None, specs: Sequence[ScopeLimit] | None,
        mode: str, actual: int,
    ) -> Any:  # fmt: skip
        if self.single_slot:
            return super()._settle_op(name, keys, specs, mode, actual)
        if keys is None:
            keys = self._locate(name)
        if not keys and specs:  # no record anywhere: charge every scope, once per lease
            if mode != "c":
                return [[], "none", 0]
            keys = [s.key for s in specs]
        return self._settle_groups(name, keys, specs, mode, actual)

    def _settle_many(self, entries: Sequence[tuple[Any, ...]]) -> None:
        """Send queued settlements: each through the same group calls a synchronous settle
        makes (redis-py refuses EVALSHA in a cluster pipeline, and a pipeline measured
        slower than calls in turn here). Raises on the first failure: the caller journals
        the whole batch again (idempotent by lease: what landed counts once)."""
        for entry in entries:
            self._replay(entry)

    def close(self) -> None:
        super().close()  # sends what is queued first
        try:
            self.client.close()  # the cluster client is ours (built from the URL)
        except Exception:  # pragma: no cover - closing a dead connection
            pass

    def _charge_group(self, name: str, spec: ScopeLimit, amount: int) -> Any:
        return self._scripts["charge"](
            keys=self._group_keys(spec.key, name),
            args=[name, str(amount), self._settled_ms, self._spec(spec)], client=self.client,
        )

    def _charge_once(
        self, name: str, specs: Sequence[ScopeLimit], amount: int, client: Any = None
    ) -> Any:
        if self.single_slot:
            return super()._charge_once(name, specs, amount)
        values: list[Any] = []
        fresh = False
        for spec in specs:
            reply = self._charge_group(name, spec, amount)
            if _text(reply[0]) == "dup":  # counted here already (a replay)
                values.extend(self._usage_values(spec.key))
            else:
                fresh = True
                values.extend(reply[1:4])
        return ["ok", *values] if fresh or not specs else ["dup"]

    # -- operator scans ---------------------------------------------------------------------
    def _scan_scopes(self, prefix: str) -> list[ScopeUsage]:
        if self.single_slot:
            return super()._scan_scopes(prefix)
        head = self.prefix + "{s:"
        pattern = _GLOB.sub(r"\\\1", head + prefix) + "*"
        names = sorted(
            n for n in {_text(k) for k in self.client.scan_iter(match=pattern, count=1000)}
            if n.endswith("}")
        )
        out = []
        for name in names:  # one slot each: no cross-slot pipeline
            values = self.client.hmget(name, "limit", "spent", "reserved")
            if values[0] is not None:
                out.append(
                    ScopeUsage(name[len(head):-1], int(values[0]), int(values[1] or 0),
                               int(values[2] or 0))
                )  # fmt: skip
        return out


__all__ = ["CLUSTER_SCHEMES", "RedisClusterStorage", "is_cluster_url"]
