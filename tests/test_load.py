"""The load test (``bench/bench_load.py``) at a small size, so that it cannot rot.

    PYTHONPATH=src python -m pytest -q tests/test_load.py

50 asyncio agents x 5 calls over 10 users with per-user daily caps on a real redis-server,
against the fake provider in a child process: zero overshoot, ledger == bill per user and in
total, no refused call sent. The checker itself is tested on ledgers that break each rule, so
that a check that passes cannot be a check that never fails.
"""

from __future__ import annotations

from typing import Any

import pytest
from bench.bench_load import LoadConfig, caps_nanos, check_ledger, run

from otel_budget.storage import ScopeUsage
from tests.redis_server import REDIS_SERVER, SKIP_REASON

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)


@needs_redis
def test_small_load_holds_every_cap_and_the_ledger_equals_the_bill() -> None:
    config = LoadConfig(agents=50, calls=5, users=10, warmup=False)
    result = run(config)
    assert result["failures"] == {}
    assert result["ok"] and all(result["checks"].values()), result["checks"]
    inst = result["instrumented"]
    caps = caps_nanos(config)
    low_users = sum(1 for i in range(len(caps)) if i % config.low_every == 0)
    # The caps bite (only the low users are refused) and the rest goes through.
    assert inst["users_refused"] == low_users
    assert inst["refused_by_reason"] == {"limit": inst["refused"]} and inst["refused"] > 0
    assert inst["granted"] + inst["refused"] == 250
    assert result["ledger"]["provider_requests"] == inst["granted"]
    assert result["ledger"]["spent_nanos"] == result["ledger"]["billed_nanos"] > 0
    assert result["ledger"]["samples_during_run"] > 0
    assert result["bare"]["granted"] == 250


def _bill(**users: tuple[int, int]) -> dict[str, Any]:
    by_user = {u: {"billed_nanos": n, "billed_requests": r} for u, (n, r) in users.items()}
    return {
        "by_user": by_user,
        "billed_nanos": sum(n for n, _ in users.values()),
        "requests": sum(r for _, r in users.values()),
    }


def test_the_checker_fails_each_broken_rule() -> None:
    caps = {"u1": 100, "u2": 100}
    good = [
        ScopeUsage("user:u1@d20261203", 100, 90, 0),
        ScopeUsage("user:u2@d20261203", 100, 10, 0),
    ]
    bill = _bill(u1=(90, 9), u2=(10, 1))
    assert not any(check_ledger(good, bill, {"u1": 9, "u2": 1}, caps).values())

    over = [ScopeUsage("user:u1@d20261203", 100, 101, 0), good[1]]
    fails = check_ledger(over, _bill(u1=(101, 9), u2=(10, 1)), {"u1": 9, "u2": 1}, caps)
    assert fails["zero_overshoot"] and not fails["ledger_equals_bill"]

    reserved = [ScopeUsage("user:u1@d20261203", 100, 90, 20), good[1]]  # 110 > 100 at once
    fails = check_ledger(reserved, bill, {"u1": 9, "u2": 1}, caps)
    assert fails["zero_overshoot"] and fails["ledger_equals_bill"]  # and left reserved

    raised = [ScopeUsage("user:u1@d20261203", 10**9, 90, 0), good[1]]  # a cap not applied
    assert check_ledger(raised, bill, {"u1": 9, "u2": 1}, caps)["zero_overshoot"]

    short = [ScopeUsage("user:u1@d20261203", 100, 89, 0), good[1]]  # one nano-USD missing
    assert check_ledger(short, bill, {"u1": 9, "u2": 1}, caps)["ledger_equals_bill"]

    unledgered = _bill(u1=(90, 9), u2=(10, 1), u3=(5, 1))  # billed, never in the ledger
    fails = check_ledger(good, unledgered, {"u1": 9, "u2": 1}, caps)
    assert fails["ledger_equals_bill"] and fails["refused_never_sent"]

    # A refused call that reached the provider anyway (billed nothing, say: an error).
    sent = dict(bill, requests=11)
    assert check_ledger(good, sent, {"u1": 9, "u2": 1}, caps)["refused_never_sent"]


def test_the_fake_provider_answers_on_descriptors_above_1024() -> None:
    """With 1,000 agents the provider holds over 1,024 sockets: select() failed on those, so
    it read the request, billed nothing and dropped the connection (APIConnectionError,
    which the ledger rightly charges at its projection: ledger above the bill)."""
    import os
    import resource

    from openai import OpenAI

    from otel_budget.testing import FakeLLMServer

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("needs 1,200 open files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    hog = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with FakeLLMServer() as server:
            client = OpenAI(base_url=server.openai_base_url, api_key="x", max_retries=0)
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert server.stats()["billed_requests"] == 1
            client.close()
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_call_of_unknown_outcome_is_counted_at_its_reservation_exactly() -> None:
    """A connection lost after sending: the ledger charged the reservation (60) and the
    provider either billed the call (10) or not. The check allows exactly that, no more."""
    caps = {"u1": 1000}
    granted = {"u1": 9}
    not_billed = _bill(u1=(90, 9))  # 9 granted calls of 10; the lost one never billed
    ledger = [ScopeUsage("user:u1@d20261203", 1000, 90 + 60, 0)]
    fails = check_ledger(ledger, not_billed, granted, caps, {"u1": [60]}, 10)
    assert not any(fails.values()), fails
    billed = _bill(u1=(100, 10))  # the provider did serve and bill it
    fails = check_ledger(ledger, billed, granted, caps, {"u1": [60]}, 10)
    assert not any(fails.values()), fails
    # Without the unknown call counted, or one nano-USD off, or more served: failures.
    assert check_ledger(ledger, not_billed, granted, caps)["ledger_equals_bill"]
    off = [ScopeUsage("user:u1@d20261203", 1000, 90 + 61, 0)]
    assert check_ledger(off, not_billed, granted, caps, {"u1": [60]}, 10)["ledger_equals_bill"]
    served_two = _bill(u1=(110, 11))
    fails = check_ledger(ledger, served_two, granted, caps, {"u1": [60]}, 10)
    assert fails["refused_never_sent"]
