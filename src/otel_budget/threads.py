"""Threads and ``ThreadPoolExecutor`` workers started inside a ``budget()`` block carry it.

    from concurrent.futures import ThreadPoolExecutor
    from otel_budget import budget, threads

    threads.install()                       # idempotent; budget() and BudgetInstrumentor do it
    with budget(max_usd=0.25) as run:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ask_llm, questions))   # every call reserves against the block
    print(run.report().format())            # ... and shows in its report
    threads.uninstall()                     # restores exactly what install() replaced

``contextvars`` do not follow into threads: a worker starts with an empty context, so without
this an LLM call made from a thread escapes the block it was started in (and its ``scope()``
identities, and its trace). Like ``opentelemetry-instrumentation-threading`` does for the trace
context, ``install()`` wraps ``threading.Thread.start`` and ``ThreadPoolExecutor.submit``, but
carries the *whole* ``contextvars`` context: it is copied when the thread is started or the
task submitted, and the thread's ``run`` (whatever class defines it) or the task runs in
that copy. The budget frames, scope identities and OpenTelemetry context all follow.

Only while a block or a ``scope()`` is open: anywhere else both wrappers pass straight through
(two ``ContextVar.get`` calls), so executors and threads used outside a block behave exactly
as before. The worker threads an executor starts on a submit do not take the submitter's
context for their lifetime (each task brings its own), so an executor first used inside a
block does not charge later, unrelated tasks to it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from otel_budget.context import BUDGET_FRAMES, SCOPE_IDENTITIES

__all__ = ["install", "is_installed", "uninstall"]

_lock = threading.Lock()
_holders: set[str] = set()
# (class, attribute) -> (what install() replaced, our wrapper), while our wrapper exists.
_wrapped: dict[tuple[type, str], tuple[Any, Any]] = {}
_enabled = False
_local = threading.local()  # .submitting: a ThreadPoolExecutor.submit is under way here


def _wrap_start(original: Callable[..., Any]) -> Callable[..., Any]:
    def start(self: threading.Thread, *args: Any, **kwargs: Any) -> Any:
        if (
            not _enabled
            or not (BUDGET_FRAMES.get() or SCOPE_IDENTITIES.get())
            or getattr(_local, "submitting", False)
        ):
            return original(self, *args, **kwargs)
        ctx = contextvars.copy_context()
        run = self.run  # bound: a subclass's own run() is covered too
        attrs = self.__dict__

        def run_in_context() -> Any:
            try:
                return ctx.run(run)
            finally:
                if attrs.get("run") is run_in_context:
                    del attrs["run"]  # no cycle thread -> closure -> thread left behind

        attrs["run"] = run_in_context
        try:
            return original(self, *args, **kwargs)
        except BaseException:
            if attrs.get("run") is run_in_context:
                del attrs["run"]
            raise

    start.__name__ = start.__qualname__ = "start"
    start.__doc__ = getattr(original, "__doc__", None)
    return start


def _wrap_submit(original: Callable[..., Any]) -> Callable[..., Any]:
    def submit(self: futures.ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        if not _enabled or not (BUDGET_FRAMES.get() or SCOPE_IDENTITIES.get()):
            return original(self, fn, *args, **kwargs)
        ctx = contextvars.copy_context()  # one copy per task: a Context runs in one thread
        previous = getattr(_local, "submitting", False)
        _local.submitting = True  # the worker thread this may start keeps its own context
        try:
            return original(self, ctx.run, fn, *args, **kwargs)
        finally:
            _local.submitting = previous

    submit.__name__ = submit.__qualname__ = "submit"
    submit.__doc__ = getattr(original, "__doc__", None)
    return submit


_TARGETS: tuple[tuple[type, str, Callable[[Callable[..., Any]], Callable[..., Any]]], ...] = (
    (threading.Thread, "start", _wrap_start),
    (futures.ThreadPoolExecutor, "submit", _wrap_submit),
)


def install(holder: str = "default") -> None:
    """Carry the context into threads and executor tasks started inside a block. Idempotent;
    each ``holder`` (``"budget"``, ``"instrumentor"``, ...) keeps it installed until it calls
    ``uninstall`` with the same name."""
    global _enabled
    with _lock:
        _holders.add(holder)
        for cls, name, make in _TARGETS:
            if (cls, name) not in _wrapped:
                original = cls.__dict__[name]
                wrapper = make(original)
                setattr(cls, name, wrapper)
                _wrapped[(cls, name)] = (original, wrapper)
        _enabled = True


def uninstall(holder: str = "default") -> None:
    """Drop ``holder``'s claim; once no holder is left, put back exactly what ``install``
    replaced. A wrapper someone else has since wrapped again is left in place, inert."""
    global _enabled
    with _lock:
        _holders.discard(holder)
        if _holders:
            return
        _enabled = False
        for key, (original, wrapper) in list(_wrapped.items()):
            cls, name = key
            if cls.__dict__.get(name) is wrapper:
                setattr(cls, name, original)
                del _wrapped[key]


def is_installed(holder: str | None = None) -> bool:
    """Whether the propagation is on (for ``holder``, when given)."""
    if holder is not None:
        return holder in _holders
    return _enabled
