"""A durable, append-only journal of ledger operations that could not reach Redis.

    >>> from otel_budget.storage.journal import DurableJournal
    >>> journal = DurableJournal("/tmp/otb-journal-doc", fsync="everysec")  # doctest: +SKIP
    >>> seq = journal.append(["charge", "1f", [], 5])                         # doctest: +SKIP
    >>> journal.done(seq)                                                      # doctest: +SKIP

``RedisStorage`` writes every commit, release, charge and tombstone it could not send here
before it returns, and marks it done once Redis has it. The file survives the process:
the next ``RedisStorage`` on the same ledger (same URL and prefix) adopts the pending
entries of every journal whose process is gone and replays them.

Layout: ``<directory>/<ledger id>/<pid>-<start ms>-<random>.jnl`` (created as ``.jnl.new``,
locked, then renamed, so that no adopter can take a live file), one JSON object per line:
``{"i": seq, "e": entry}`` (pending) or ``{"d": seq}`` (sent). A process holds an exclusive
``flock`` on its own file for its lifetime, so a file whose lock can be taken belongs to a
process that exited or died (SIGKILL included: the kernel drops the lock); its pending
entries are appended to the adopter's own file first, then the file is removed. A torn
last line (a crash mid-write) is ignored. The file is truncated when nothing is pending.

Durability (``fsync``): every line is written to the OS before ``append`` returns, so it
survives the process exiting, crashing or being killed. ``"always"`` also fsyncs each line
(survives power loss; costs a disk flush per journaled operation, only during an outage);
``"everysec"`` (default, like Redis' AOF) fsyncs at most once a second and at close (a power
loss may lose the last second); ``"no"`` leaves it to the OS.

Default directory: ``$OTEL_BUDGET_JOURNAL_DIR``, else ``$XDG_STATE_HOME/otel-budget/journal``,
else ``~/.local/state/otel-budget/journal``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no adoption of other processes' files
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("otel_budget.storage.journal")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

ENV_JOURNAL_DIR = "OTEL_BUDGET_JOURNAL_DIR"
FSYNC_POLICIES = ("always", "everysec", "no")


def default_directory() -> Path:
    """Where journals live unless told: ``$OTEL_BUDGET_JOURNAL_DIR``, else the user's state
    directory (``$XDG_STATE_HOME`` or ``~/.local/state``) under ``otel-budget/journal``."""
    explicit = os.environ.get(ENV_JOURNAL_DIR)
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state) / "otel-budget" / "journal"


def ledger_id(url: str, prefix: str) -> str:
    """A directory name for one ledger (URL without password, and key prefix)."""
    return hashlib.sha256(f"{url}\n{prefix}".encode()).hexdigest()[:16]


def _read_pending(path: Path) -> list[Any]:
    """Pending entries of one journal file, in order (a torn last line is skipped)."""
    pending: dict[int, Any] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # torn write at a crash
            if "d" in record:
                pending.pop(int(record["d"]), None)
            elif "i" in record:
                pending[int(record["i"])] = record["e"]
    return [pending[key] for key in sorted(pending)]


class DurableJournal:
    """This process's journal file in ``directory`` (created), locked for its lifetime."""

    def __init__(self, directory: str | os.PathLike[str], fsync: str = "everysec") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"journal fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        name = f"{os.getpid()}-{int(time.time() * 1000)}-{secrets.token_hex(4)}.jnl"
        self.path = self.directory / name
        self._lock = threading.Lock()
        # Created under a name adopters ignore, locked, then renamed (the lock stays with the
        # file): an adopter never sees, locks and removes a live process's new journal.
        creating = self.directory / (name + ".new")
        # A raw descriptor in append mode: a line is one ``write`` syscall, with no Python
        # buffer to flush (a queued commit writes one line before it returns). Owner-only:
        # the entries name scopes (user ids).
        self._fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _O_CLOEXEC, 0o600)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(creating, self.path)
        self._seq = 0
        self._open = 0  # pending entries in this file
        self._last_sync = time.monotonic()
        self._closed = False

    # -- writing ------------------------------------------------------------------------------
    def _write_bytes(self, data: bytes) -> None:
        """``data`` in the file (in the OS: it survives the process), fsynced per policy."""
        fd = self._fd
        written = os.write(fd, data)
        if written < len(data):
            self._write_rest(data, written)
        if self.fsync == "always" or (
            self.fsync == "everysec" and time.monotonic() - self._last_sync >= 1.0
        ):
            os.fsync(fd)
            self._last_sync = time.monotonic()

    def _write_rest(self, data: bytes, written: int) -> None:
        """After a short write (a signal, a nearly full disk): the rest. If it fails, the
        torn line is ended, so that only it is unreadable, not the next one too."""
        try:
            while written < len(data):
                if written <= 0:
                    raise OSError(errno.EIO, f"no progress writing the journal {self.path}")
                data = data[written:]
                written = os.write(self._fd, data)
        except OSError:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"\n")
            raise

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)  # (append mode: the next line goes at the new end)

    def append(self, entry: Any) -> int:
        """Write one pending entry (JSON-serialisable); returns its sequence number."""
        return self.append_json(json.dumps(entry, separators=(",", ":")))

    def append_json(self, entry_json: str) -> int:
        """``append`` for an entry already JSON-encoded (the caller caches the constant
        parts of its entries)."""
        with self._lock:
            if self._closed:
                return -1
            self._seq += 1
            self._write_bytes(f'{{"i":{self._seq},"e":{entry_json}}}\n'.encode())
            self._open += 1
            return self._seq

    def done(self, seq: int) -> None:
        """Mark an entry as sent; truncates the file once nothing is pending."""
        if seq < 0:
            return
        with self._lock:
            if self._closed:
                return
            self._open -= 1
            if self._open <= 0:
                self._open = 0
                self._truncate()
            else:
                self._write_bytes(f'{{"d":{seq}}}\n'.encode())

    def done_many(self, seqs: list[int]) -> None:
        """``done`` for a batch: one write (or the truncation) for all of them."""
        seqs = [seq for seq in seqs if seq >= 0]
        if not seqs:
            return
        with self._lock:
            if self._closed:
                return
            self._open -= len(seqs)
            if self._open <= 0:
                self._open = 0
                self._truncate()
            else:
                self._write_bytes("".join([f'{{"d":{seq}}}\n' for seq in seqs]).encode())

    # -- adopting what exited processes left ------------------------------------------------
    def adopt(self) -> list[tuple[int, Any]]:
        """Take over the pending entries of every journal in the directory whose process is
        gone: appended to this file (so they survive this process too), their files removed.
        Returns ``(seq, entry)`` pairs, oldest file first."""
        if fcntl is None:  # pragma: no cover
            return []
        adopted: list[tuple[int, Any]] = []
        files = sorted(
            (p for p in self.directory.glob("*.jnl") if p != self.path),
            key=lambda p: p.stat().st_mtime if p.exists() else 0.0,
        )
        for path in files:
            try:
                handle = open(path, "r+", encoding="utf-8")  # noqa: SIM115 - never creates
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its process is alive
                if not path.exists():  # adopted and removed by another process meanwhile
                    continue
                entries = _read_pending(path)
                for entry in entries:
                    adopted.append((self.append(entry), entry))
                if self.fsync != "no":
                    os.fsync(self._fd)
                path.unlink()
            except (OSError, ValueError) as exc:
                logger.error("otel-budget: cannot adopt the ledger journal %s: %s", path, exc)
            finally:
                handle.close()
        if adopted:
            logger.warning(
                "otel-budget: %d ledger operations left by an earlier process will be replayed "
                "into Redis", len(adopted),
            )  # fmt: skip
        return adopted

    def close(self) -> None:
        """fsync and unlock; a file with pending entries stays for the next process."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._open == 0:
                    self.path.unlink(missing_ok=True)
                    try:
                        self.directory.rmdir()  # only if empty
                    except OSError:
                        pass
                elif self.fsync != "no":
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)


__all__ = ["ENV_JOURNAL_DIR", "FSYNC_POLICIES", "DurableJournal", "default_directory", "ledger_id"]
