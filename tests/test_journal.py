"""The durable journal's file: every line lands whole, or a torn one costs no other line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from otel_budget.storage import journal as journal_module
from otel_budget.storage.journal import DurableJournal, _read_pending


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_pending_entries_read_back_in_order_and_the_file_empties(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path, fsync="no")
    first = journal.append(["settle", "1f", ["t:a"], "c", 5])
    second = journal.append_json('["charge","!20",[],7]')
    third = journal.append(["settle", "21", [], "r", 0])
    journal.done(second)
    assert _read_pending(journal.path) == [["settle", "1f", ["t:a"], "c", 5], ["settle", "21", [], "r", 0]]
    journal.done_many([first, -1])  # (-1: an entry that was never written)
    assert _read_pending(journal.path) == [["settle", "21", [], "r", 0]]
    journal.done_many([third])
    assert journal.path.stat().st_size == 0  # nothing pending: truncated
    again = journal.append(["charge", "!22", [], 1])
    assert _read_pending(journal.path) == [["charge", "!22", [], 1]]  # appended after truncation
    journal.done(again)
    journal.close()
    assert not journal.path.exists()


def test_the_file_is_private_to_its_owner(tmp_path: Path) -> None:
    journal = DurableJournal(tmp_path, fsync="no")  # its entries name scopes (user ids)
    try:
        assert stat.S_IMODE(journal.path.stat().st_mode) & 0o077 == 0
    finally:
        journal.close()


def test_a_short_write_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = DurableJournal(tmp_path, fsync="always")
    real_write = os.write
    calls: list[int] = []

    def short_write(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:7]))  # a signal cut the first write short
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", short_write)
    journal.append(["settle", "abc", ["user:alice"], "c", 123])
    monkeypatch.undo()
    assert len(calls) == 2
    assert _read_pending(journal.path) == [["settle", "abc", ["user:alice"], "c", 123]]
    journal.close()


def test_a_write_failing_mid_line_leaves_the_next_line_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = DurableJournal(tmp_path, fsync="no")
    journal.append(["settle", "1", [], "c", 1])
    real_write = os.write
    state = {"calls": 0}

    def full_disk(fd: int, data: Any) -> int:
        state["calls"] += 1
        if state["calls"] == 1:
            return real_write(fd, bytes(data[:10]))  # part of the line, then the disk is full
        if data == b"\n":
            return real_write(fd, data)  # ending the torn line still fits
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.os, "write", full_disk)
    with pytest.raises(OSError):
        journal.append(["settle", "2", [], "c", 2])
    monkeypatch.undo()
    journal.append(["settle", "3", [], "c", 3])
    # The torn line is skipped alone; without its ending, it would have swallowed entry 3.
    assert _read_pending(journal.path) == [["settle", "1", [], "c", 1], ["settle", "3", [], "c", 3]]
    assert len(_lines(journal.path)) == 3
    journal.close()


def test_a_write_that_makes_no_progress_raises_instead_of_spinning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = DurableJournal(tmp_path, fsync="no")
    monkeypatch.setattr(journal_module.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="no progress"):
        journal.append(["settle", "1", [], "c", 1])
    monkeypatch.undo()
    journal.close()


def test_a_queued_settle_journals_every_lease_name_as_valid_json(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    from otel_budget.storage import ScopeLimit
    from otel_budget.storage.redis import RedisStorage, lease_name

    # (No server needed: the entry's JSON is made before anything is sent.)
    store = RedisStorage("redis://127.0.0.1:9/0", journal_dir=tmp_path)
    specs = (ScopeLimit("user:o\"brien", 10**9), ScopeLimit("t:1f", 5, True, 60.0))
    try:
        for lease in (0x1F, -0x2A, ("tuple", 'with "quotes"'), 'str\\id'):
            name = lease_name(lease)
            entry = ("settle", name, [s.key for s in specs], specs, "c", 7)
            assert json.loads(store._entry_json(entry)) == store._encode(entry)
    finally:
        store.close()
