"""RedisClusterStorage on a real 3-master Redis Cluster (tests/redis_cluster.py).

The storage contract tests of tests/test_storage_redis.py run here again against the
cluster (imported below, with this module's ``backend`` fixtures), then what only a cluster
has: scopes of one call in different slots on different nodes under 4 processes x 8
threads, a slot migrated (MOVED/ASK) while calls run, the pause bound, the single-slot
prefix. One cluster for the whole module (started in ~2 s); skipped with a clear reason
when redis-server or redis-cli is missing.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

pytest.importorskip("redis")

from otel_budget.storage import CommitStatus, LedgerStorage, ReserveStatus, ScopeLimit  # noqa: E402
from otel_budget.storage.redis import RedisStorage  # noqa: E402
from otel_budget.storage.redis_cluster import RedisClusterStorage, is_cluster_url  # noqa: E402
from tests.redis_cluster import (  # noqa: E402
    AVAILABLE,
    SKIP_REASON,
    RedisCluster3,
    cluster_contention_worker,
)
from tests.test_storage_redis import (  # noqa: E402, F401  (collected here, on the cluster)
    Backend,
    _machine_for,
    test_a_call_token_expires,
    test_a_call_token_is_taken_once,
    test_all_or_nothing_across_scopes,
    test_async_interface,
    test_asyncio_tasks_never_exceed_and_count_every_nano,
    test_bad_amounts_never_fail_a_commit,
    test_big_negative_and_odd_lease_ids,
    test_call_tokens_async_and_bad_arguments,
    test_cap_narrows_one_check_and_is_never_stored,
    test_concurrent_takers_of_one_token_one_wins,
    test_evict_keeps_scopes_with_open_reservations,
    test_expired_lease_frees_budget_and_late_commit_counts,
    test_huge_projection_is_refused_not_an_error,
    test_idempotent_by_lease_id,
    test_lower_only_limit_never_rises,
    test_operator_limit_can_raise_or_lower,
    test_overshoot_is_recorded_truthfully,
    test_pause_and_resume,
    test_reserve_commit_release_and_usage,
    test_reserve_up_to_grants_the_smallest_room,
    test_reset_keeps_the_limit_and_delete_forgets_on_every_backend,
    test_scopes_lists_by_prefix,
    test_threads_never_exceed_and_count_every_nano,
    test_zero_budget_blocks_paid_calls_only,
)

USD = 1_000_000_000


@pytest.fixture(autouse=True)
def _journal_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BUDGET_JOURNAL_DIR", str(tmp_path_factory.mktemp("journal")))


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster3]:
    if not AVAILABLE:
        pytest.skip(SKIP_REASON)
    nodes = RedisCluster3().start()
    yield nodes
    nodes.cleanup()


# Generous timeouts: these tests check the ledger, not outages, on a loaded 2-core machine
# where the default 50 ms can expire (tests/test_storage_redis_outages.py tests those).
SLOW = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}


def unique_prefix() -> str:
    return f"otbtest:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def make_backend(cluster: RedisCluster3) -> Iterator[Callable[..., Backend]]:
    made: list[LedgerStorage] = []

    def make(lease_seconds: float = 3600.0) -> Backend:
        store = RedisClusterStorage(cluster.url, prefix=unique_prefix(), lease_seconds=lease_seconds,
                                    **SLOW)  # fmt: skip

        def advance(seconds: float) -> None:
            store._clock_offset_ms += int(seconds * 1000)

        made.append(store)
        return Backend(store, advance)

    yield make
    for store in made:
        store.close()


@pytest.fixture
def backend(make_backend: Callable[..., Backend]) -> Backend:
    return make_backend()


def test_state_machine_on_the_cluster(cluster: RedisCluster3) -> None:
    machine = _machine_for(
        lambda: RedisClusterStorage(cluster.url, prefix=unique_prefix(), lease_seconds=30, **SLOW)
    )
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=25, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)),  # fmt: skip
    )


# -- cluster specifics -------------------------------------------------------------------------
def test_url_scheme_picks_the_cluster_ledger(cluster: RedisCluster3) -> None:
    assert is_cluster_url(cluster.url) and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:1/0") and not is_cluster_url(None)
    store = RedisStorage.from_url(cluster.url, prefix=unique_prefix(), **SLOW)
    try:
        assert isinstance(store, RedisClusterStorage) and not store.single_slot
        assert store.ping()
    finally:
        store.close()


def test_environment_and_cli_pick_the_cluster_ledger(cluster: RedisCluster3) -> None:
    import io

    from otel_budget.cli import main
    from otel_budget.config import read_env

    config = read_env({"OTEL_BUDGET_REDIS_URL": cluster.url})
    store = config.kwargs["storage"]
    try:
        assert isinstance(store, RedisClusterStorage) and not config.problems
    finally:
        store.close()
    prefix = unique_prefix()
    writer = RedisClusterStorage(cluster.url, prefix=prefix, **SLOW)
    try:
        assert writer.reserve(1, [ScopeLimit("user:cli", USD)], 5).ok
        out, err = io.StringIO(), io.StringIO()
        code = main(["--redis-url", cluster.url, "--key-prefix", prefix, "show", "--json"],
                    stdout=out, stderr=err)  # fmt: skip
        assert code == 0, err.getvalue()
        assert "user:cli" in out.getvalue()
    finally:
        writer.close()


def test_each_scope_is_its_own_slot_group(cluster: RedisCluster3) -> None:
    store = RedisClusterStorage(cluster.url, prefix=unique_prefix(), **SLOW)
    try:
        client = store.client
        trace, user = ScopeLimit("t:hot", USD, True, 60.0), ScopeLimit("user:x@d20261123", USD)
        assert store.reserve(1, [trace, user], USD // 4).ok
        for spec in (trace, user):  # every key of one script call in one slot
            slots = {client.keyslot(k) for k in store._group_keys(spec.key, "1")}
            assert len(slots) == 1
        nodes = {cluster.node_of(client.keyslot(store.scope_key(s.key))) for s in (trace, user)}
        assert len(nodes) == 2
        # The nodes forget their scripts (a restart): the pipelined calls load them again
        # and run each script once (a settle run twice would answer "duplicate").
        for port in cluster.ports:
            cluster.cli("SCRIPT", "FLUSH", port=port)
        assert store.commit(1, USD // 5).status is CommitStatus.OK
        assert store.usage("user:x@d20261123").spent == USD // 5
        for port in cluster.ports:
            cluster.cli("SCRIPT", "FLUSH", port=port)
        assert store.reserve(2, [trace, user], 1).ok  # the first group's pipeline
        assert store.usage("t:hot").reserved == 1
    finally:
        store.close()


def test_a_refusal_in_a_later_group_releases_the_earlier_grants(cluster: RedisCluster3) -> None:
    store = RedisClusterStorage(cluster.url, prefix=unique_prefix(), **SLOW)
    try:
        trace, user = ScopeLimit("t:1", 10 * USD, True), ScopeLimit("user:poor", USD)
        result = store.reserve(1, [trace, user], 2 * USD)
        assert result.status is ReserveStatus.DENIED and result.denied.key == "user:poor"
        assert store.usage("t:1").reserved == 0  # the trace's grant was rolled back
        granted = store.reserve_up_to(2, [trace, user], 1, 10 * USD)
        assert granted.granted == USD
        assert store.usage("t:1").reserved == USD  # lowered to the final grant
        assert store.commit(2, USD // 2).status is CommitStatus.OK
        assert store.usage("t:1") == store.usage("t:1")._replace(spent=USD // 2, reserved=0)
        # A call let through unmetered after the refusal (same lease) is still charged.
        assert store.charge(1, [trace, user], 7).status is CommitStatus.OK
        assert store.usage("t:1").spent == USD // 2 + 7
        # Hostile: reuse a refused lease id with a smaller ask. The rolled-back group must
        # not answer "duplicate" (reserving nothing) and let the spend escape it.
        assert store.reserve(3, [trace, ScopeLimit("user:rich", 10 * USD), user], 2 * USD
                             ).status is ReserveStatus.DENIED  # fmt: skip
        assert store.reserve(3, [trace, ScopeLimit("user:rich", 10 * USD)], USD).ok
        assert store.usage("t:1").reserved == USD == store.usage("user:rich").reserved
        assert store.commit(3, USD).status is CommitStatus.OK
        assert store.usage("t:1").spent == USD // 2 + 7 + USD
        assert store.usage("user:rich").spent == USD
    finally:
        store.close()


def test_settle_by_another_instance_and_a_lost_group_record(cluster: RedisCluster3) -> None:
    prefix = unique_prefix()
    a = RedisClusterStorage(cluster.url, prefix=prefix, **SLOW)
    b = RedisClusterStorage(cluster.url, prefix=prefix, **SLOW)
    try:
        trace, user = ScopeLimit("t:2", 10 * USD, True), ScopeLimit("user:y", 10 * USD)
        assert a.reserve(1, [trace, user], USD).ok
        assert b.commit(1, USD // 2).status is CommitStatus.OK  # keys from the locator
        assert a.usage("user:y") == a.usage("user:y")._replace(spent=USD // 2, reserved=0)
        # One node lost a group's lease record (restart without persistence): the commit
        # is charged to that group instead of being dropped.
        assert a.reserve(2, [trace, user], USD).ok
        a.client.delete(a._group_keys("user:y", "2")[0])
        result = a.commit(2, USD // 4)
        # Queued (the default) it answers from what this instance knows (OK); the group's
        # charge happens when the writer sends it, and the ledger below shows it counted.
        assert result.status in (CommitStatus.OK, CommitStatus.LATE)
        assert a.usage("user:y").spent == USD // 2 + USD // 4
        assert a.usage("t:2") == a.usage("t:2")._replace(spent=USD // 2 + USD // 4, reserved=0)
        assert a.commit(2, USD // 4).status is CommitStatus.DUPLICATE
    finally:
        a.close()
        b.close()


def test_single_slot_prefix_runs_one_script_per_call(cluster: RedisCluster3) -> None:
    store = RedisClusterStorage(cluster.url, prefix="{otb" + uuid.uuid4().hex[:6] + "}:", **SLOW)
    try:
        assert store.single_slot
        trace, user = ScopeLimit("t:3", USD, True), ScopeLimit("user:z", USD // 2)
        assert store.reserve_up_to(1, [trace, user], 1, USD).granted == USD // 2
        keys = [store.scope_key("t:3"), store.scope_key("user:z"), store._pause_key]
        assert len({store.client.keyslot(k) for k in keys}) == 1
        assert store.commit(1, 5).status is CommitStatus.OK
        store.pause("user:*")
        assert store.reserve(2, [user], 1, ("user:*",)).status is ReserveStatus.PAUSED
        assert {s.key for s in store.scopes()} == {"t:3", "user:z"}
    finally:
        store.close()


@pytest.mark.parametrize("prefix", ["a{}b{c}:", "otb{:", "{}"])
def test_a_prefix_that_would_split_a_group_across_slots_is_refused(
    cluster: RedisCluster3, prefix: str
) -> None:
    with pytest.raises(ValueError, match="hash tag"):
        RedisClusterStorage(cluster.url, prefix=prefix, **SLOW)


def test_a_pause_applies_within_the_refresh_bound(cluster: RedisCluster3) -> None:
    prefix = unique_prefix()
    operator = RedisClusterStorage(cluster.url, prefix=prefix, **SLOW)
    worker = RedisClusterStorage(cluster.url, prefix=prefix, pause_refresh_seconds=0.1, **SLOW)
    try:
        user = ScopeLimit("user:alice", USD)
        keys = ("user:alice", "user:*")
        assert worker.reserve(1, [user], 1, keys).ok  # the worker holds a fresh copy
        operator.pause("user:*")
        time.sleep(worker.pause_refresh_seconds + 0.005)  # the stated bound
        assert worker.reserve(2, [user], 1, keys).status is ReserveStatus.PAUSED
        operator.resume("user:*")
        operator.pause()  # the global switch
        time.sleep(worker.pause_refresh_seconds + 0.005)
        assert worker.reserve(3, [user], 1, keys).status is ReserveStatus.PAUSED
        operator.resume()
        time.sleep(worker.pause_refresh_seconds + 0.005)
        assert worker.reserve(4, [user], 1, keys).ok
        assert worker.paused() == frozenset()
    finally:
        operator.close()
        worker.close()


def test_four_processes_by_eight_threads_never_exceed_on_the_cluster(
    cluster: RedisCluster3,
) -> None:
    prefix = unique_prefix()
    limit = 3 * USD
    user = "user:x@d20261123"
    store = RedisClusterStorage(cluster.url, prefix=prefix, socket_timeout=1.0,
                                socket_connect_timeout=1.0)  # fmt: skip
    keys = [store.scope_key("t:hot"), store.scope_key(user)]
    nodes = {cluster.node_of(store.client.keyslot(k)) for k in keys}
    assert len(nodes) == 2, "the trace and the user scope must live on different nodes"
    samples: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def monitor() -> None:
        client = store.client
        while not stop.is_set():
            for key in keys:
                values = client.hmget(key, "limit", "spent", "reserved")  # atomic snapshot
                if values[0] is not None:
                    samples.append(tuple(int(v) for v in values))  # type: ignore[arg-type]
            time.sleep(0.0005)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    ctx = multiprocessing.get_context("spawn")
    try:
        with ctx.Pool(4) as pool:
            results = pool.starmap(
                cluster_contention_worker,
                [(cluster.url, prefix, i, 8, 60, limit, user) for i in range(4)],
            )
    finally:
        stop.set()
        watcher.join()
    admitted = sum(r[0] for r in results)
    committed = sum(r[1] for r in results)
    usages = [store.usage("t:hot"), store.usage(user)]
    store.close()
    assert len(samples) > 50
    assert not [s for s in samples if s[1] + s[2] > s[0]]
    for usage in usages:
        assert usage is not None
        assert usage.reserved == 0
        assert usage.spent == committed  # to the nano-dollar, in both slot groups
        assert usage.spent <= limit
    assert 0 < admitted < 4 * 8 * 60  # the budget did refuse calls


def test_a_slot_migrated_while_calls_run(cluster: RedisCluster3) -> None:
    """A reshard moves a scope's slot to another node while calls run: redis-py follows
    MOVED/ASK, no call fails, the ledger still equals what was committed."""
    store = RedisClusterStorage(cluster.url, prefix=unique_prefix(), socket_timeout=1.0,
                                socket_connect_timeout=1.0, breaker_failures=1000)  # fmt: skip
    scope_ = ScopeLimit("t:moving", 1000 * USD, True)
    slot = store.client.keyslot(store.scope_key("t:moving"))
    before = cluster.node_of(slot)
    target = next(p for p in cluster.ports if p != before)
    errors: list[BaseException] = []
    committed = [0]
    stop = threading.Event()

    def calls() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                assert store.reserve(n, [scope_], 1000).ok
                store.commit(n, 700)
                committed[0] += 700
            except BaseException as exc:  # noqa: BLE001 - recorded, asserted below
                errors.append(exc)
                return

    runner = threading.Thread(target=calls)
    runner.start()
    try:
        time.sleep(0.2)
        cluster.migrate_slot(slot, target)
        time.sleep(0.2)
    finally:
        stop.set()
        runner.join()
    try:
        assert not errors, errors
        assert cluster.node_of(slot) == target != before
        assert committed[0] > 0
        assert store.usage("t:moving") == store.usage("t:moving")._replace(
            spent=committed[0], reserved=0
        )
        assert store.stats["failures"] == 0
    finally:
        store.close()


def test_hash_tags_in_scope_names_stay_in_one_group(cluster: RedisCluster3) -> None:
    """A hostile scope name with braces cannot split one script call across slots."""
    store = RedisClusterStorage(cluster.url, prefix=unique_prefix(), **SLOW)
    try:
        odd = [ScopeLimit("user:{a}b}", USD), ScopeLimit("user:{", USD), ScopeLimit("}{", USD)]
        assert store.reserve(1, odd, 10).ok
        for spec in odd:
            assert len({store.client.keyslot(k) for k in store._group_keys(spec.key, "1")}) == 1
        assert store.commit(1, 9).status is CommitStatus.OK
        assert sorted(s.key for s in store.scopes()) == sorted(s.key for s in odd)
    finally:
        store.close()




def test_a_cluster_down_when_the_ledger_is_built_is_an_outage_not_a_dead_ledger() -> None:
    """redis-py's cluster client reads the slot map when it is built: a cluster down at that
    moment must not leave a ledger that never works. Calls fail like in any outage (the
    processor refuses them under fail_closed), then the ledger serves without a restart
    as soon as the cluster answers, with nothing lost."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_budget import BudgetExceededError, BudgetSpanProcessor
    from otel_budget.metered import begin

    if not AVAILABLE:
        pytest.skip(SKIP_REASON)
    nodes = RedisCluster3()  # ports chosen, nothing listening yet
    processor: BudgetSpanProcessor | None = None
    try:
        store = RedisClusterStorage(nodes.url, prefix=unique_prefix(), **SLOW)
        processor = BudgetSpanProcessor(max_usd=1, storage=store, failure_policy="fail_closed")
        provider = TracerProvider()
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("t")

        def call() -> None:
            begin(processor.runtime, tracer, "chat m", {}, minimum=1_000_000, name="m",
                  provider="p").settle(400_000)  # fmt: skip

        with pytest.raises(BudgetExceededError) as info:
            call()
        assert info.value.reason == "internal_error"
        nodes.start()
        deadline = time.monotonic() + 10
        while True:  # the breaker lets a call through again within its reset time
            try:
                call()
                break
            except BudgetExceededError:
                assert time.monotonic() < deadline, "the ledger never recovered"
                time.sleep(0.1)
        store.flush()
        usage = store.usage("process")
        assert usage is not None and usage.spent == 400_000 and usage.reserved == 0
        store.close()
    finally:
        if processor is not None:  # else it stays the process's current runtime: a later
            processor.shutdown()  # test's wrappers would enforce it, on a closed ledger
        nodes.cleanup()
