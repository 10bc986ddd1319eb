"""The in-memory ledger: contract, invariant (hypothesis), threads, asyncio, bounded memory."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from otel_budget.storage import (
    MAX_AMOUNT,
    CommitStatus,
    MemoryStorage,
    ReserveStatus,
    ScopeLimit,
    settle_amount,
)
from tests.helpers import hammer

USD = 1_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reserve_commit_release_and_usage() -> None:
    store = MemoryStorage()
    trace = ScopeLimit("t:1", 10 * USD, True)
    assert store.reserve(1, [trace], 4 * USD).status is ReserveStatus.OK
    assert store.reserve(2, [trace], 4 * USD).status is ReserveStatus.OK
    denied = store.reserve(3, [trace], 3 * USD)
    assert denied.status is ReserveStatus.DENIED
    assert denied.denied.key == "t:1" and denied.denied.reserved == 8 * USD
    result = store.commit(1, 3 * USD)
    assert result.status is CommitStatus.OK and result.overshoot == 0
    assert store.release(2).status is CommitStatus.RELEASED
    assert store.usage("t:1") == ("t:1", 10 * USD, 3 * USD, 0)
    assert store.reserve(3, [trace], 7 * USD).ok  # exactly fills the budget
    assert store.reserve(4, [trace], 1).status is ReserveStatus.DENIED


def test_zero_budget_blocks_paid_calls_only() -> None:
    store = MemoryStorage()
    zero = ScopeLimit("t:z", 0)
    assert store.reserve(1, [zero], 1).status is ReserveStatus.DENIED
    assert store.reserve(2, [zero], 0).ok


def test_idempotent_by_lease_id() -> None:
    store = MemoryStorage()
    scope = ScopeLimit("s", 10 * USD)
    assert store.reserve(7, [scope], USD).status is ReserveStatus.OK
    assert store.reserve(7, [scope], USD).status is ReserveStatus.DUPLICATE
    assert store.usage("s").reserved == USD
    assert store.commit(7, USD).status is CommitStatus.OK
    assert store.commit(7, USD).status is CommitStatus.DUPLICATE
    assert store.release(7).status is CommitStatus.DUPLICATE
    assert store.reserve(7, [scope], USD).status is ReserveStatus.DUPLICATE  # settled id
    assert store.usage("s").spent == USD and store.usage("s").reserved == 0
    assert store.charge(8, [scope], 2 * USD).status is CommitStatus.OK
    assert store.charge(8, [scope], 2 * USD).status is CommitStatus.DUPLICATE
    assert store.usage("s").spent == 3 * USD


def test_overshoot_is_recorded_truthfully() -> None:
    store = MemoryStorage()
    scope = ScopeLimit("s", 10 * USD)
    store.reserve(1, [scope], 9 * USD)
    result = store.commit(1, 12 * USD)  # the projection was too low
    assert result.overshoot == 3 * USD
    assert store.usage("s").spent == 12 * USD  # never clamped to the limit
    assert store.reserve(2, [scope], 1).status is ReserveStatus.DENIED


def test_all_or_nothing_across_scopes() -> None:
    store = MemoryStorage()
    trace = ScopeLimit("t:1", 10 * USD, True)
    user = ScopeLimit("user:alice@d20261123", 3 * USD)
    assert store.reserve(1, [trace, user], 2 * USD).ok
    denied = store.reserve(2, [trace, user], 2 * USD)
    assert denied.status is ReserveStatus.DENIED and denied.denied.key == user.key
    assert store.usage("t:1").reserved == 2 * USD  # nothing leaked into the trace scope


def test_lower_only_limit_never_rises() -> None:
    store = MemoryStorage()
    store.reserve(1, [ScopeLimit("t:1", 5 * USD, True)], 0)
    store.reserve(2, [ScopeLimit("t:1", 50 * USD, True)], 0)
    assert store.usage("t:1").limit == 5 * USD
    store.reserve(3, [ScopeLimit("t:1", 2 * USD, True)], 0)
    assert store.usage("t:1").limit == 2 * USD


def test_pause_and_resume() -> None:
    store = MemoryStorage()
    scope = ScopeLimit("user:bob", 10 * USD)
    store.pause("user:bob")
    result = store.reserve(1, [scope], 1, pause_keys=("user:bob",))
    assert result.status is ReserveStatus.PAUSED and result.denied.key == "user:bob"
    assert store.reserve(2, [scope], 1, pause_keys=("user:carol",)).ok
    store.resume("user:bob")
    store.pause()  # global
    assert store.reserve(3, [scope], 1).status is ReserveStatus.PAUSED
    assert store.paused() == frozenset({"*"})
    store.resume()
    assert store.reserve(4, [scope], 1).ok


def test_expired_lease_frees_budget_and_late_commit_counts() -> None:
    clock = FakeClock()
    store = MemoryStorage(lease_seconds=10, clock=clock)
    scope = ScopeLimit("t:1", 10 * USD, True)
    assert store.reserve(1, [scope], 8 * USD).ok
    assert store.reserve(2, [scope], 8 * USD).status is ReserveStatus.DENIED
    clock.now += 11
    assert store.reserve(2, [scope], 8 * USD).ok  # the crashed caller's lease expired
    assert store.expired_leases == 1
    late = store.commit(1, 5 * USD)
    assert late.status is CommitStatus.LATE
    assert store.usage("t:1").spent == 5 * USD  # spend is never lost
    assert store.commit(1, 5 * USD).status is CommitStatus.DUPLICATE


def test_bad_amounts() -> None:
    store = MemoryStorage()
    with pytest.raises(ValueError):
        store.reserve(1, [ScopeLimit("s", USD)], -1)
    with pytest.raises(ValueError):
        store.reserve_up_to(1, [ScopeLimit("s", USD)], 2, 1)
    store.reserve(2, [ScopeLimit("s", USD)], 1)
    assert store.commit(2, -5).status is CommitStatus.OK  # counts 0, lease settled
    assert store.usage("s") == ("s", USD, 0, 0)
    assert store.sizes()["leases"] == 0
    store.reserve(3, [ScopeLimit("s", USD)], 1)
    assert store.commit(3, float("inf")).status is CommitStatus.OK
    assert store.usage("s") == ("s", USD, MAX_AMOUNT, 0)
    assert settle_amount(10**30) == MAX_AMOUNT < 2**53
    assert settle_amount(None) == settle_amount(float("nan")) == settle_amount(-1) == 0
    assert settle_amount(1.2) == 2  # rounded up: money is integers
    with pytest.raises(ValueError):
        MemoryStorage(lease_seconds=0)


def test_memory_stays_bounded_over_many_traces() -> None:
    store = MemoryStorage(max_scopes=1000, max_settled=1000)
    for i in range(100_000):
        scope = ScopeLimit(f"t:{i}", USD, True, 3600.0, evictable=True)
        store.reserve(i, [scope], 10)
        store.commit(i, 7)
        if i % 2:  # half the roots end (evicted), half never do (unsampled): both bounded
            store.evict(scope.key)
    sizes = store.sizes()
    assert sizes["scopes"] <= 1000
    assert sizes["leases"] == 0
    assert sizes["settled"] <= 1000
    assert sizes["deadlines"] <= 1024


def test_size_cap_never_evicts_named_or_windowed_scopes(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = MemoryStorage(max_scopes=100, clock=clock)
    daily = ScopeLimit("user:u@d20261202", USD // 100, ttl=2 * 86400.0)  # $0.01 a day
    forever = ScopeLimit("tenant:t", USD)  # ttl=None: never expires
    assert store.reserve(1, [daily, forever], USD // 100).ok
    store.commit(1, USD // 100)
    for i in range(2000):  # many traces later (the cap is 100)
        trace = ScopeLimit(f"t:{i}", USD, True, 3600.0, evictable=True)
        store.reserve(100 + i, [trace], 10)
        store.commit(100 + i, 7)
    assert store.sizes()["scopes"] <= 100
    assert store.usage(daily.key) == (daily.key, USD // 100, USD // 100, 0)  # still spent
    assert store.reserve(5000, [daily], 1).status is ReserveStatus.DENIED  # no second budget
    assert store.usage(forever.key).spent == USD // 100
    # Only scopes that must be kept: the ledger grows past the cap (logged once).
    with caplog.at_level("WARNING", logger="otel_budget.storage.memory"):
        for i in range(150):
            store.charge(6000 + i, [ScopeLimit(f"user:{i}@d20261202", USD, ttl=86400.0)], 1)
    assert store.sizes()["scopes"] >= 150
    assert store.usage("user:0@d20261202").spent == 1
    assert len([r for r in caplog.records if "max_scopes" in r.getMessage()]) == 1
    # Each leaves when its own window ends; a scope without a TTL stays for good.
    clock.now += 3 * 86400
    for i in range(64):
        store.reserve(7000 + i, [ScopeLimit("t:tick", USD, True, 60.0, evictable=True)], 0)
    assert store.usage("user:0@d20261202") is None and store.usage(daily.key) is None
    assert store.usage(forever.key).spent == USD // 100


def test_a_key_anyone_must_keep_is_never_evictable() -> None:
    store = MemoryStorage(max_scopes=10)
    shared_key = ScopeLimit("budget:b", USD, ttl=60.0)
    store.charge(1, [shared_key._replace(evictable=True)], 5)
    store.charge(2, [shared_key], 5)  # a caller that must keep it
    for i in range(100):
        store.charge(10 + i, [ScopeLimit(f"t:{i}", USD, True, 60.0, evictable=True)], 1)
    assert store.usage("budget:b").spent == 10


def test_call_tokens_are_bounded_and_expire(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    store = MemoryStorage(max_tokens=3, clock=clock)
    for i in range(5):
        store.put_token(f"t{i}", 60)
    assert store.sizes()["tokens"] == 3  # the cap: the oldest went first, logged once
    assert "max_tokens=3" in caplog.text
    assert [store.take_token(f"t{i}") for i in range(5)] == [None, None, 0, 0, 0]
    store.put_token("old", 1)
    clock.now += 2
    store.put_token("new", 60, 9)  # expired ones leave from the front as tokens are put
    assert store.sizes()["tokens"] == 1
    assert store.take_token("old") is None and store.take_token("new") == 9


def test_async_methods_are_direct_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("MemoryStorage must not hop to a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    store = MemoryStorage()
    scope = ScopeLimit("t:a", 10 * USD, True)

    async def main() -> None:
        assert (await store.areserve_up_to(1, [scope], 0, 20 * USD)).granted == 10 * USD
        assert (await store.acommit(1, USD)).status is CommitStatus.OK
        assert (await store.areserve(2, [scope], USD)).granted == USD
        assert (await store.arelease(2)).status is CommitStatus.RELEASED
        assert (await store.acharge(3, [scope], USD)).status is CommitStatus.OK

    asyncio.run(main())
    assert store.usage("t:a") == ("t:a", 10 * USD, 2 * USD, 0)


def test_ttl_scopes_are_dropped_when_idle() -> None:
    clock = FakeClock()
    store = MemoryStorage(clock=clock)
    store.reserve(1, [ScopeLimit("t:old", USD, True, 60.0)], 1)
    store.commit(1, 1)
    store.reserve(2, [ScopeLimit("user:alice", USD)], 1)  # no TTL: kept
    store.commit(2, 1)
    clock.now += 61
    store.reserve(3, [ScopeLimit("t:new", USD, True, 60.0)], 1)
    store.commit(3, 1)
    clock.now += 0.5
    for i in range(16):  # the idle-scope sweep runs every few operations
        store.reserve(100 + i, [ScopeLimit("t:new2", USD, True, 60.0)], 1)
    assert store.usage("t:old") is None
    assert store.usage("user:alice") is not None


class LedgerMachine(RuleBasedStateMachine):
    """Random reserve/commit/release/charge/expire sequences against a simple model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = MemoryStorage(lease_seconds=30, clock=self.clock)
        self.scopes = [ScopeLimit("t:a", 100, True, 1e9), ScopeLimit("user:u", 150)]
        self.open: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.spent = [0, 0]
        self.next_id = 0
        self.overshoot = False

    @rule(amount=st.integers(0, 80), which=st.sampled_from([(0,), (1,), (0, 1)]))
    def reserve(self, amount: int, which: tuple[int, ...]) -> None:
        self.next_id += 1
        scopes = [self.scopes[i] for i in which]
        result = self.store.reserve(self.next_id, scopes, amount)
        fits = all(
            self.spent[i] + sum(a for a, w in self.open.values() if i in w) + amount
            <= self.scopes[i].limit
            for i in which
        )
        assert result.ok == fits
        if result.ok:
            self.open[self.next_id] = (amount, which)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), over=st.booleans())
    def commit(self, data: st.DataObject, over: bool) -> None:
        lease = data.draw(st.sampled_from(sorted(self.open)))
        amount, which = self.open.pop(lease)
        actual = data.draw(st.integers(0, amount + (50 if over else 0)))
        self.overshoot |= actual > amount
        result = self.store.commit(lease, actual)
        assert result.overshoot == max(0, actual - amount)
        for i in which:
            self.spent[i] += actual

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(sorted(self.open)))
        self.open.pop(lease)
        assert self.store.release(lease).status is CommitStatus.RELEASED

    @rule(lease=st.integers(1, 50), actual=st.integers(0, 100))
    def retry_commit_of_settled(self, lease: int, actual: int) -> None:
        if lease <= self.next_id and lease not in self.open:
            assert self.store.commit(lease, actual).status is CommitStatus.DUPLICATE

    @precondition(lambda self: self.open)
    @rule()
    def expire_everything(self) -> None:
        self.clock.now += 31
        # The next reserve sweeps; force it with a zero reservation on a private scope.
        self.next_id += 1
        self.store.reserve(self.next_id, [ScopeLimit("other", 10)], 0)
        self.store.release(self.next_id)
        expired = dict(self.open)
        self.open.clear()
        for lease, (_, which) in expired.items():  # late commits still count
            result = self.store.commit(lease, 1)
            # LATE once swept; a lease not swept yet (sweeps are bounded per call) settles
            # normally. Either way the spend counts.
            assert result.status in (CommitStatus.LATE, CommitStatus.OK)
            for i in which:
                self.spent[i] += 1

    @invariant()
    def matches_model_and_holds(self) -> None:
        for i, spec in enumerate(self.scopes):
            usage = self.store.usage(spec.key)
            if usage is None:
                continue
            reserved = sum(a for a, w in self.open.values() if i in w)
            assert usage.spent == self.spent[i]
            assert usage.reserved == reserved
            if not self.overshoot and not any(self.spent[i] > s.limit for s in [spec]):
                assert usage.spent + usage.reserved <= usage.limit


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_32_threads_never_exceed_and_count_every_nano() -> None:
    store = MemoryStorage()
    limit = 5 * USD
    scopes = [ScopeLimit("t:hot", limit, True), ScopeLimit("user:x@d20261123", limit + 1)]
    committed = [0] * 32
    admitted = [0] * 32
    violations: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            usage = store.usage("t:hot")
            if usage is not None and usage.spent + usage.reserved > usage.limit:
                violations.append((usage.spent, usage.reserved, usage.limit))

    def worker(index: int) -> None:
        admitted[index], committed[index] = hammer(
            store, scopes, index, index << 32, 400
        )

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    usage = store.usage("t:hot")
    assert not violations
    assert usage.reserved == 0
    assert usage.spent == sum(committed)
    assert usage.spent <= limit
    assert sum(admitted) < 32 * 400  # the budget did refuse calls
    assert store.usage("user:x@d20261123").spent == sum(committed)


def test_asyncio_tasks_never_exceed_and_count_every_nano() -> None:
    store = MemoryStorage()
    limit = 2 * USD
    scope = [ScopeLimit("t:async", limit, True)]
    committed: list[int] = []

    async def agent(index: int) -> None:
        rng = random.Random(index)
        for n in range(100):
            lease = (index, n)
            amount = rng.randint(1, 30_000_000)
            if not store.reserve(lease, scope, amount).ok:
                await asyncio.sleep(0)
                continue
            await asyncio.sleep(0)  # the "LLM call": other tasks reserve meanwhile
            usage = store.usage("t:async")
            assert usage.spent + usage.reserved <= usage.limit
            actual = rng.randint(0, amount)
            store.commit(lease, actual)
            committed.append(actual)

    async def main() -> None:
        await asyncio.gather(*(agent(i) for i in range(64)))

    asyncio.run(main())
    usage = store.usage("t:async")
    assert usage.reserved == 0
    assert usage.spent == sum(committed) <= limit


def test_a_lease_reserved_as_the_deadline_fifo_is_compacted_still_expires() -> None:
    """The reserve that compacts the FIFO of lease deadlines (settled leases leave stale
    entries) adds its own deadline to the new FIFO, not to the one it replaced: its lease
    still expires and frees its reservation."""
    clock = FakeClock()
    store = MemoryStorage(lease_seconds=60, clock=clock)
    scope = ScopeLimit("t:compact", 10**12, lower_only=True, ttl=3600)
    for i in range(1025):  # 1,025 stale deadlines, no open lease: the next reserve compacts
        store.reserve(i, [scope], 1)
        store.commit(i, 1)
    assert store.sizes()["deadlines"] == 1025
    assert store.reserve("last", [scope], 500).ok
    assert store.sizes()["deadlines"] == 1  # compacted, holding the new lease's deadline
    clock.now += 61
    store.reserve("next", [ScopeLimit("t:other", 10**12)], 1)  # sweeps what is due
    usage = store.usage("t:compact")
    assert usage is not None and usage.reserved == 0 and store.expired_leases == 1
