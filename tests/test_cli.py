"""The ``otel-budget`` operator CLI: in-process against an injected MemoryStorage, then
against a real redis-server (in-process and as a subprocess), and its error paths."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from otel_budget.cli import main, usd_text
from otel_budget.storage import CommitStatus, MemoryStorage, ReserveStatus, ScopeLimit
from tests.redis_server import REDIS_SERVER, SKIP_REASON, RedisServer, free_port

USD = 1_000_000_000


@pytest.fixture(autouse=True)
def _journal_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """RedisStorage's durable journal goes to a temporary directory, not the user's."""
    monkeypatch.setenv("OTEL_BUDGET_JOURNAL_DIR", str(tmp_path_factory.mktemp("journal")))


def run(argv: list[str], storage: Any = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, storage=storage, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def store() -> MemoryStorage:
    store = MemoryStorage()
    store.charge(1, [ScopeLimit("user:alice@d20261123", 20 * USD)], 1_500_000_000)
    store.reserve(2, [ScopeLimit("user:alice@d20261123", 20 * USD)], 250_000_000)
    store.charge(3, [ScopeLimit("t:" + "ab" * 16, USD, True)], 150)
    return store


def test_usd_text_is_exact() -> None:
    assert usd_text(20 * USD) == "20.00"
    assert usd_text(150) == "0.00000015"
    assert usd_text(1_500_000_000) == "1.50"
    assert usd_text(-USD // 2) == "-0.50"
    assert usd_text(0) == "0.00"


def test_show_table_and_json(store: MemoryStorage) -> None:
    code, out, err = run(["show"], store)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["SCOPE", "LIMIT", "SPENT", "RESERVED", "REMAINING"]
    assert lines[1].split() == ["t:" + "ab" * 16, "1.00", "0.00000015", "0.00", "0.99999985"]
    assert lines[2].split() == ["user:alice@d20261123", "20.00", "1.50", "0.25", "18.25"]
    code, out, _ = run(["show", "--prefix", "user:", "--json"], store)
    rows = json.loads(out)
    assert code == 0 and [r["key"] for r in rows] == ["user:alice@d20261123"]
    assert rows[0]["remaining_nanos"] == 18_250_000_000 and rows[0]["spent_usd"] == "1.50"
    code, out, _ = run(["show", "--prefix", "tenant:"], store)
    assert code == 0 and "no scopes" in out


def test_pause_resume_paused_and_set_limit(store: MemoryStorage) -> None:
    assert run(["pause"], store)[:2] == (0, "paused *\n")
    assert store.paused() == frozenset({"*"})
    assert run(["pause", "user:*"], store)[0] == 0
    code, out, _ = run(["paused"], store)
    assert code == 0 and out.splitlines() == ["*", "user:*"]
    assert json.loads(run(["paused", "--json"], store)[1]) == ["*", "user:*"]
    assert run(["resume"], store)[0] == 0 and run(["resume", "user:*"], store)[0] == 0
    assert "no kill switch" in run(["paused"], store)[1]
    code, out, _ = run(["set-limit", "user:alice@d20261123", "$1.75"], store)
    assert code == 0 and "1.75" in out
    assert store.usage("user:alice@d20261123").limit == 1_750_000_000
    scope = ScopeLimit("user:alice@d20261123", 20 * USD)
    assert store.reserve(9, [scope], 10**8).status is ReserveStatus.DENIED  # 1.5+0.25+0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["set-limit", "user:a", "-5"], "must look like"),
        (["set-limit", "user:a", "--", "-5"], "must look like"),
        (["set-limit", "user:a", "lots"], "must look like"),
        (["set-limit", "user:a", "5000000"], "sanity limit"),
        (["set-limit", "user:a"], "the following arguments are required"),
        (["pause", " user:a"], "invalid scope"),
        (["frobnicate"], "invalid choice"),
        ([], "the following arguments are required"),
        (["--timeout", "x", "show"], "invalid float"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(
    argv: list[str], message: str, store: MemoryStorage, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, store)
    assert capsys.readouterr().err == ""  # everything went to the given stream
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert store.usage("user:a") is None


def test_help_exits_0() -> None:
    code, out, _ = run(["--help"])
    assert code == 0 and "set-limit" in out


def test_missing_url_and_bad_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_BUDGET_REDIS_URL", raising=False)
    code, _, err = run(["show"])
    assert code == 2 and "no Redis URL" in err and err.count("\n") == 1
    code, _, err = run(["--redis-url", "http://127.0.0.1:1", "show"])
    assert code == 2 and "invalid Redis URL" in err and err.count("\n") == 1


def test_unreachable_redis_exits_2_quickly() -> None:
    pytest.importorskip("redis")
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    for command in (["show"], ["pause"], ["set-limit", "user:a", "1"], ["paused"]):
        start = time.perf_counter()
        code, out, err = run(["--redis-url", url, "--timeout", "0.5", *command])
        assert code == 2, command
        assert err.startswith("otel-budget: error: cannot reach the ledger") and err.count("\n") == 1
        assert "hunter2" not in err  # the password is not printed
        assert out == ""
        assert time.perf_counter() - start < 3.0


# -- against a real redis-server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    pytest.importorskip("redis")
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    srv = RedisServer().start()
    yield srv
    srv.cleanup()


def test_cli_against_real_redis(server: RedisServer) -> None:
    from otel_budget.storage.redis import RedisStorage

    prefix = f"otbcli:{uuid.uuid4().hex[:8]}:"
    app = RedisStorage(server.url, prefix=prefix)
    try:
        cap = ScopeLimit("user:bob@d20261123", 5 * USD, False, 172800.0)
        assert app.reserve(1, [cap], USD).ok
        app.commit(1, 700_000_000)
        base = ["--redis-url", server.url, "--key-prefix", prefix]
        code, out, err = run([*base, "show", "--json"])
        assert code == 0, err
        assert json.loads(out) == [{
            "key": "user:bob@d20261123", "limit_usd": "5.00", "spent_usd": "0.70",
            "reserved_usd": "0.00", "remaining_usd": "4.30", "limit_nanos": 5 * USD,
            "spent_nanos": 700_000_000, "reserved_nanos": 0, "remaining_nanos": 4_300_000_000,
        }]  # fmt: skip
        assert run([*base, "pause", "user:*"])[0] == 0
        assert app.paused() == frozenset({"user:*"})
        paused = app.reserve(2, [cap], 1, ("user:bob", "user:*"))
        assert paused.status is ReserveStatus.PAUSED
        assert run([*base, "resume", "user:*"])[0] == 0
        assert app.reserve(3, [cap], 1, ("user:bob", "user:*")).ok
        assert run([*base, "set-limit", "user:bob@d20261123", "0.75"])[0] == 0
        # the operator's limit wins over the app's configured $5
        assert app.reserve(4, [cap], 100_000_000).status is ReserveStatus.DENIED
        assert app.usage("user:bob@d20261123").limit == 750_000_000
    finally:
        app.close()


def test_cli_subprocess_against_real_redis(server: RedisServer) -> None:
    prefix = f"otbcli:{uuid.uuid4().hex[:8]}:"
    env = {**os.environ, "OTEL_BUDGET_REDIS_URL": server.url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otel_budget.cli", "--key-prefix", prefix, *args],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip

    assert cli("set-limit", "tenant:acme", "900").returncode == 0
    assert cli("pause").returncode == 0
    shown = cli("show")
    assert shown.returncode == 0
    assert shown.stdout.splitlines()[1].split() == ["tenant:acme", "900.00", "0.00", "0.00", "900.00"]
    assert cli("paused").stdout == "*\n"
    assert cli("resume").returncode == 0
    bad = cli("set-limit", "tenant:acme", "NaN")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("otel-budget: error: set-limit:")
    gone = subprocess.run(
        [sys.executable, "-m", "otel_budget.cli", "--redis-url",
         f"redis://127.0.0.1:{free_port()}/0", "show"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert "cannot reach the ledger" in gone.stderr


def test_console_script_is_declared() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("otel-budget") == "otel_budget.cli:main"


# -- reset / delete ------------------------------------------------------------------------------
def test_reset_keeps_the_limit_and_delete_forgets(store: MemoryStorage) -> None:
    key = "user:alice@d20261123"
    code, out, err = run(["reset", key], store)
    assert (code, out, err) == (0, f"reset {key}\n", "")
    assert store.usage(key) == (key, 20 * USD, 0, 0)
    store.commit(2, 100_000_000)  # a lease open at the reset still counts, as spend
    assert store.usage(key) == (key, 20 * USD, 100_000_000, 0)
    code, out, err = run(["delete", key], store)
    assert (code, out, err) == (0, f"deleted {key}\n", "")
    assert store.usage(key) is None
    code, out, err = run(["delete", key], store)
    assert code == 2 and err.count("\n") == 1 and "no scope" in err


@pytest.mark.parametrize(
    "scope_",
    ["process", "*", "user:*", "user:", ":alice", "user:a b\n", "t:xyz", "user:bob@d2026", " user:a",
     "user:a?", "user:al\x01ice"],
)
def test_reset_and_delete_validate_the_scope(scope_: str, store: MemoryStorage) -> None:
    before = store.scopes()
    for command in ("reset", "delete"):
        code, out, err = run([command, scope_], store)
        assert code == 2 and out == "", (command, scope_)
        assert err.startswith("otel-budget: error: invalid") and err.count("\n") == 1, err
    assert store.scopes() == before


def test_reset_and_delete_on_real_redis(server: RedisServer) -> None:
    from otel_budget.storage.redis import RedisStorage, process_scope_name

    prefix = f"otbcli:{uuid.uuid4().hex[:8]}:"
    app = RedisStorage(server.url, prefix=prefix)
    try:
        cap = ScopeLimit("user:bob@d20261123", 5 * USD, False, 172800.0)
        app.charge(1, [cap], 4 * USD)
        app.reserve(2, [cap], USD)
        assert app.reserve(3, [cap], USD).status is ReserveStatus.DENIED
        app.charge(4, [ScopeLimit("process", USD)], 600_000_000)
        base = ["--redis-url", server.url, "--key-prefix", prefix]
        code, out, _ = run([*base, "show", "--prefix", "process:", "--json"])
        own = process_scope_name()
        assert code == 0 and [row["key"] for row in json.loads(out)] == [own]
        assert run([*base, "reset", "user:bob@d20261123"])[0] == 0
        assert app.usage("user:bob@d20261123").spent == 0
        assert app.usage("user:bob@d20261123").reserved == 0
        assert app.reserve(5, [cap], 5 * USD).ok  # the whole limit again
        assert app.commit(2, USD).status is CommitStatus.LATE  # the open lease still counts
        assert app.usage("user:bob@d20261123").spent == USD
        assert run([*base, "reset", own])[0] == 0
        assert app.usage("process").spent == 0
        assert run([*base, "delete", own]) == (0, f"deleted {own}\n", "")
        assert app.usage("process") is None
        code, _, err = run([*base, "delete", own])
        assert code == 2 and "no scope" in err and err.count("\n") == 1
    finally:
        app.close()
