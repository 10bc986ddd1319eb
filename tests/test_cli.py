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
        app.flush()  # a queued commit reaches other processes within the settle interval
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


# -- edges: arguments, scope syntax, unreadable scopes, terminal-safe output -----------------------
FUZZ_ARGV: list[list[str]] = [
    *(["--timeout", t, "show"] for t in
      ("inf", "-inf", "nan", "1e308", "1e999", "0", "-0", "-1", "1e-320", "0x10", "", "½")),
    *(["set-limit", scope, "5"] for scope in
      ("bogus", "", ":", "user:", ":alice", "user:*", "*", "t:abc", "b:xyz", "user:\x1b[2J",
       "user:a\u200bb ", "user:" + "x" * 300, "u ser:alice", "user:@d20261123")),
    *(["set-limit", "user:a", usd] for usd in
      ("inf", "1e308", "-0.0", "NaN", "1e-30", "0x1p3", "5" * 400, "\x1b[31m1")),
    *(["pause", scope] for scope in
      ("t:" + "ab" * 16, "b:" + "ab" * 16, "process", "user:alice@d20261123", "tenant:x@m202611",
       "-", "--", "user:\nalice")),
    ["resume", "*", "extra"],
    ["show", "--prefix"],
    ["show", "--prefix", "\x1b]0;pwned\x07"],
    ["--redis-url", "redis://[::1", "show"],
    ["--redis-url", "redis://:99999999/0", "show"],
    ["--redis-url", "\x1b[31mredis://x", "show"],
    ["--key-prefix", "\x1b[2J", "show"],
    ["--bogus"],
    ["paused", "--json", "x"],
]


@pytest.mark.parametrize("argv", FUZZ_ARGV, ids=range(len(FUZZ_ARGV)))
def test_fuzzed_arguments_exit_2_with_one_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every odd argument ends as one terminal-safe line on stderr and exit 2 (never an
    exception), against a Redis port nobody listens on."""
    pytest.importorskip("redis")
    monkeypatch.setenv("OTEL_BUDGET_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, out, err = run(["--timeout", "0.3", *argv])
    assert capsys.readouterr() == ("", "")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("otel-budget"), err
    assert all(ch == "\n" or ch.isprintable() for ch in err + out), err


def test_odd_arguments_subprocess() -> None:
    """The same as the operator runs it: one line on stderr, exit 2, no traceback."""
    env = {**os.environ, "OTEL_BUDGET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    cases = [
        ["--timeout", "inf", "show"],
        ["--timeout", "1e308", "show"],
        ["set-limit", "bogus", "5"],
        ["show", "--prefix", "\x1b]0;pwned\x07"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "otel_budget.cli", *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        for argv in cases
    ]
    for argv, proc in zip(cases, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, out, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert "\x1b" not in err + out


@pytest.mark.parametrize(
    "argv",
    [
        ["set-limit", "user:alice", "1"],
        ["set-limit", "user:alice@example.com", "1"],
        ["set-limit", "user:alice@d20261123", "1"],
        ["set-limit", "tenant:acme@m202611", "1"],
        ["set-limit", "user:<invalid>", "1"],
        ["set-limit", "t:" + "0f" * 16, "1"],
        ["set-limit", "b:" + "0f" * 16, "1"],
        ["set-limit", "api_key:sk-ü", "1"],
        ["pause", "*"],
        ["pause", "user:*"],
        ["pause", "user:alice"],
        ["pause", "user:alice@example.com"],
        ["resume", "user:alice"],
    ],
)
def test_every_ledger_key_form_is_accepted(argv: list[str], store: MemoryStorage) -> None:
    code, _, err = run(argv, store)
    assert code == 0 and err == "", err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["set-limit", "bogus", "5"], "expected kind:identity"),
        (["set-limit", "user:*", "5"], "not on 'kind:*'"),
        (["set-limit", "*", "5"], "names no scope"),
        (["set-limit", "t:abc", "5"], "32 hex digits"),
        (["set-limit", "process", "5"], "process:<host>:<pid>:<start>"),
        (["set-limit", "user:a?", "5"], "no wildcard"),
        (["set-limit", "user:bob@d2026", "5"], "a window is"),
        (["pause", "t:" + "ab" * 16], "no kill switch"),
        (["pause", "process"], "no kill switch"),
        (["pause", "user:alice@d20261123"], "without its window"),
        (["resume", "nobody"], "expected kind:identity"),
    ],
)
def test_scope_syntax_is_checked(argv: list[str], message: str, store: MemoryStorage) -> None:
    before = store.scopes()
    code, out, err = run(argv, store)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
    assert store.scopes() == before and store.paused() == frozenset()


def test_resume_says_when_nothing_was_paused(store: MemoryStorage) -> None:
    code, out, _ = run(["resume", "user:nobody"], store)
    assert code == 0 and out == "user:nobody was not paused: nothing to resume\n"
    store.pause()
    code, out, _ = run(["resume", "user:nobody"], store)
    assert code == 0 and out.splitlines() == [
        "user:nobody was not paused: nothing to resume", "still paused: *"
    ]
    assert run(["resume"], store)[1] == "resumed *\n" and store.paused() == frozenset()


def test_set_limit_on_an_unknown_scope_says_so(store: MemoryStorage) -> None:
    code, out, _ = run(["set-limit", "user:alcie", "5"], store)
    assert code == 0 and "no spend on user:alcie yet" in out
    code, out, _ = run(["set-limit", "user:alice@d20261123", "5"], store)
    assert code == 0 and out == "limit of user:alice@d20261123 set to $5.00\n"


def test_keys_are_printed_escaped(store: MemoryStorage) -> None:
    nasty = "user:\x1b]0;pwned\x07\x1b[2J\\x1b"
    store.charge(7, [ScopeLimit(nasty, USD)], 1)
    store.pause("user:\x1b[31mred")
    for argv in (["show"], ["paused"], ["show", "--json"], ["paused", "--json"]):
        code, out, _ = run(argv, store)
        assert code == 0 and "\x1b" not in out and "\x07" not in out, argv
    shown = run(["show"], store)[1]
    assert "user:\\x1b]0;pwned\\x07\\x1b[2J\\\\x1b" in shown  # backslashes escaped too
    assert run(["paused"], store)[1] == "user:\\x1b[31mred\n"
    assert json.loads(run(["show", "--json"], store)[1])[1]["key"] == nasty  # JSON: exact


def test_show_lists_an_unreadable_scope_and_goes_on_subprocess(server: RedisServer) -> None:
    from otel_budget.storage.redis import RedisStorage

    prefix = f"otbcli:{uuid.uuid4().hex[:8]}:"
    app = RedisStorage(server.url, prefix=prefix)
    try:
        app.charge(1, [ScopeLimit("user:bob", 5 * USD)], USD)
        app.charge(2, [ScopeLimit("user:zed", 5 * USD)], USD)
        app.client.hset(prefix + "s:user:broken", mapping={"limit": "lots", "spent": "1"})
        app.client.set(prefix + "s:user:string", "not a hash")
        app.client.hset(prefix.encode() + b"s:user:\xff\xfe", mapping={"limit": "1"})
        app.client.hset(prefix + "s:user:\x1b[2Jevil", mapping={"limit": "1", "spent": "0"})
    finally:
        app.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "otel_budget.cli", "--redis-url", server.url,
             "--key-prefix", prefix, *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    shown = cli("show")
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and shown.stderr == ""
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines()[1:]}
    assert rows["user:bob"] == ["5.00", "1.00", "0.00", "4.00"]
    assert rows["user:zed"] == ["5.00", "1.00", "0.00", "4.00"]
    assert rows["user:broken"] == ["unreadable", "-", "-", "-"]
    assert rows["user:string"] == ["unreadable", "-", "-", "-"]
    assert rows["user:\\xff\\xfe"][0] == "unreadable"
    assert rows["user:\\x1b[2Jevil"] == ["0.000000001", "0.00", "0.00", "0.000000001"]
    assert "unreadable: user:string: WRONGTYPE" in shown.stdout
    as_json = cli("show", "--json")
    assert as_json.returncode == 0
    data = {row["key"]: row for row in json.loads(as_json.stdout)}
    assert data["user:broken"] == {"key": "user:broken", "unreadable": "a field is not an integer"}
    assert data["user:bob"]["spent_nanos"] == USD
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
        assert err.startswith(f"otel-budget {command}: error:") and err.count("\n") == 1, err
        assert "invalid scope" in err, err
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
        # the open lease still counts (LATE when sent at once; a queued commit says OK)
        assert app.commit(2, USD).status in (CommitStatus.LATE, CommitStatus.OK)
        assert app.usage("user:bob@d20261123").spent == USD
        assert run([*base, "reset", own])[0] == 0
        assert app.usage("process").spent == 0
        assert run([*base, "delete", own]) == (0, f"deleted {own}\n", "")
        assert app.usage("process") is None
        code, _, err = run([*base, "delete", own])
        assert code == 2 and "no scope" in err and err.count("\n") == 1
    finally:
        app.close()
