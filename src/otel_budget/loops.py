"""Loop detection: the same tool called with the same arguments N times in a window is a loop.

    from otel_budget import BudgetInstrumentor, LoopPolicy

    BudgetInstrumentor().instrument(
        max_usd=2.00,
        loop_detection=LoopPolicy(threshold=5, window_seconds=300, near_identical=True),
        on_loop_detected=lambda info: print("loop:", info["name"], info["repeats"]),
    )
    # the 5th identical call of a tool within 300 s of the 1st in one run raises
    # BudgetExceededError(reason="loop_detected") before the tool runs

What counts as the same call: the tool's name and a hash of its arguments (canonical JSON:
key order and a JSON string's whitespace do not matter). With ``near_identical=True`` the
hash also ignores letter case, runs of whitespace inside strings and float noise beyond six
significant digits. With ``prompts=True`` an LLM request sent again unchanged (same model,
same messages and parameters) counts too: a run that resends one conversation without
progress. Each run (a trace, or a ``budget()`` block) has its own history; calls outside any
trace share the process's.

What it does not count: many calls to one model with different prompts (an ordinary agent),
one tool with different arguments, or the same call repeated while the run makes progress
(a call it never made before in between restarts the count: a test command run after each
edit is not a loop; a cycle of the same two or three calls is). A detector keyed by the model's name would stop every
agent that makes a tenth call; this one never looks at names alone.

Only digests are kept (16 bytes per call remembered), never the arguments. The cost per
call is O(1): one hash, one dict lookup, one deque append. Memory is bounded: at most
``max_runs`` runs, each with at most ``max_fingerprints`` distinct calls, each remembering
at most ``threshold`` timestamps.

``action="warn"`` records the same event, metric and callback without refusing the call:
the way to try a policy on live traffic before enforcing it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ACTION_REFUSE = "refuse"
ACTION_WARN = "warn"
ACTIONS = (ACTION_REFUSE, ACTION_WARN)
KIND_TOOL = "tool"
KIND_PROMPT = "prompt"
DEFAULT_THRESHOLD = 5
DEFAULT_WINDOW_SECONDS = 300.0
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class LoopPolicy:
    """When a repeated call is a loop, and what to do about it.

    ``threshold``: the N-th identical call within ``window_seconds`` of the first of them
    trips (N >= 2). ``near_identical``: ignore case, whitespace and float noise in arguments.
    ``prompts``: also watch LLM requests resent unchanged. ``action``: ``"refuse"`` raises
    ``BudgetExceededError(reason="loop_detected")``; ``"warn"`` only reports.
    """

    threshold: int = DEFAULT_THRESHOLD
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    near_identical: bool = False
    prompts: bool = False
    action: str = ACTION_REFUSE
    max_runs: int = 10_000
    max_fingerprints: int = 256

    def __post_init__(self) -> None:
        for name in ("threshold", "max_runs", "max_fingerprints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"loop {name} must be a positive int, got {value!r}")
        if self.threshold < 2:
            raise ValueError(f"loop threshold must be at least 2, got {self.threshold!r}")
        window = self.window_seconds
        if (
            isinstance(window, bool)
            or not isinstance(window, (int, float))
            or not math.isfinite(window)
            or window <= 0
        ):
            raise ValueError(f"loop window_seconds must be a positive number, got {window!r}")
        for name in ("near_identical", "prompts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"loop {name} must be True or False, got {getattr(self, name)!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"loop action must be 'refuse' or 'warn', got {self.action!r}")


def policy_of(value: Any) -> LoopPolicy | None:
    """``loop_detection=`` as given to a processor: a ``LoopPolicy``, True/None (the
    defaults), False or "off" (none), "refuse"/"warn" (the defaults with that action)."""
    if value is None or value is True:
        return LoopPolicy()
    if value is False or value == "off":
        return None
    if isinstance(value, LoopPolicy):
        return value
    if isinstance(value, str) and value in ACTIONS:
        return LoopPolicy(action=value)
    raise ValueError(
        "loop_detection must be a LoopPolicy, True, False, 'refuse', 'warn' or 'off', "
        f"got {value!r}"
    )


def _near(value: Any) -> Any:
    """``value`` with case, whitespace runs and float noise flattened."""
    if isinstance(value, str):
        return _WHITESPACE.sub(" ", value).strip().lower()
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k).strip().lower(): _near(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_near(v) for v in value]
    return value


def _canonical(arguments: Any) -> Any:
    """Arguments as JSON would carry them: a JSON object string is parsed (so its key order
    and spacing do not matter), anything else is taken as given."""
    if isinstance(arguments, (str, bytes)):
        text = arguments.decode("utf-8", "replace") if isinstance(arguments, bytes) else arguments
        stripped = text.strip()
        if stripped[:1] in ("{", "["):
            try:
                return json.loads(stripped)
            except ValueError:
                return text
        return text
    return arguments


def fingerprint(name: str, arguments: Any, *, near_identical: bool = False) -> bytes:
    """A 16-byte digest of a call: its name and canonical arguments. Never raises (an
    argument JSON cannot hold is hashed by its ``repr``)."""
    value = _canonical(arguments)
    if near_identical:
        value = _near(value)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):  # mixed key types, circular structures
        text = repr(value)
    return hashlib.blake2b(f"{name}\x00{text}".encode("utf-8", "replace"), digest_size=16).digest()


@dataclass(frozen=True)
class LoopHit:
    """A loop found: what repeated, how often, over how long."""

    kind: str  # "tool" or "prompt"
    name: str  # the tool's name, or the model's
    run: str  # the run's key (``t:<trace id>``, a ``budget()`` block's key, or ``process``)
    repeats: int
    window_seconds: float
    elapsed_seconds: float
    fingerprint: str  # hex digest: comparable across events, says nothing of the content
    action: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Run:
    """One run's history: per call digest, the times of its current streak of repeats."""

    __slots__ = ("calls", "novel")

    def __init__(self) -> None:
        self.calls: OrderedDict[bytes, _Streak] = OrderedDict()
        self.novel = 0  # distinct calls seen so far: grows whenever the run does something new


class _Streak:
    __slots__ = ("times", "novel")

    def __init__(self, maxlen: int) -> None:
        self.times: deque[float] = deque(maxlen=maxlen)
        self.novel = 0  # the run's ``novel`` count when this call was last seen


class LoopDetector:
    """Per-run histories of call digests. Thread-safe; O(1) per call; bounded.

    A repeat counts towards a loop only while the run makes no progress: when a call the run
    has not made before happens between two identical calls, the streak starts again. So a
    coding agent that runs the same test command after each (different) edit is not looping,
    while one that cycles through the same two or three calls is: each call of the cycle
    builds its streak once the cycle has gone round once."""

    def __init__(self, policy: LoopPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, kind: str, name: str, arguments: Any) -> bytes:
        """The fingerprint of one call under this policy."""
        return fingerprint(f"{kind}\x00{name}", arguments, near_identical=self.policy.near_identical)

    def observe(self, run: str, kind: str, name: str, digest: bytes) -> LoopHit | None:
        """Remember one call of ``run``; the loop it completes, if it does."""
        policy = self.policy
        now = self.clock()
        with self._lock:
            runs = self._runs
            history = runs.get(run)
            if history is None:
                history = runs[run] = _Run()
                if len(runs) > policy.max_runs:
                    runs.popitem(last=False)
            else:
                runs.move_to_end(run)
            calls = history.calls
            streak = calls.get(digest)
            if streak is None:
                history.novel += 1
                streak = calls[digest] = _Streak(policy.threshold)
                if len(calls) > policy.max_fingerprints:
                    calls.popitem(last=False)
            else:
                calls.move_to_end(digest)
                if streak.novel != history.novel:  # something new happened since: progress
                    streak.times.clear()
            streak.novel = history.novel
            times = streak.times
            times.append(now)
            if len(times) < policy.threshold:
                return None
            elapsed = now - times[0]
            if elapsed > policy.window_seconds:
                return None
        return LoopHit(
            kind=kind, name=name, run=run, repeats=policy.threshold,
            window_seconds=float(policy.window_seconds), elapsed_seconds=max(0.0, elapsed),
            fingerprint=digest.hex(), action=policy.action,
        )  # fmt: skip

    def forget(self, run: str) -> None:
        """Drop a run's history (its block or trace ended)."""
        with self._lock:
            self._runs.pop(run, None)

    def __len__(self) -> int:
        return len(self._runs)


__all__ = [
    "ACTION_REFUSE",
    "ACTION_WARN",
    "LoopDetector",
    "LoopHit",
    "LoopPolicy",
    "fingerprint",
    "policy_of",
]
