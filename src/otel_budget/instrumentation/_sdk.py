"""The frame of every instrumentor that wraps a third-party package: a table, wrapped on import.

    class OpenAIBudgetInstrumentor(SDKInstrumentor):
        _SDK = "openai"
        _TARGETS = (("openai.resources.embeddings", "Embeddings", "create", factory), ...)

        def instrumentation_dependencies(self):
            return ("openai >= 1.40",)

    OpenAIBudgetInstrumentor().instrument()     # imports nothing
    import openai                               # ... the table is wrapped here
    OpenAIBudgetInstrumentor().uninstrument()   # exactly the originals back

**The table.** A row ``(module, owner, name, factory)`` names the attribute ``name`` of the
class ``owner`` of ``module`` (a dotted path for a nested class; ``""``: a function of the
module itself). ``factory(*wiring)`` makes its wrapt wrapper, ``wiring`` being what the
instrumentor's ``_wiring(**kwargs)`` returns for that ``instrument()`` call (by default the
tracer and the ``RuntimeSource``): wrappers get what they need through their closure. A
factory marked ``given_original`` is also handed the callable it wraps. A row whose module,
class or attribute the installed version lacks is skipped (and handed to ``_absent``, which
may log it). A method a class inherits is wrapped on that class, unless the class it comes
from is in the table for it too (then it is wrapped there, once).

**When.** ``instrument()`` never imports the package: an application that never uses it never
pays for loading it (``anthropic`` alone is over a second of CPU, ``litellm`` seconds). By
default the whole table is wrapped once the application's own import of ``_SDK`` completes
(at once if it has), importing the table's modules the package did not; with
``_EACH_MODULE``, each module's rows are wrapped when that module is imported, so a module the
application never imports is never loaded (mcp's servers, CrewAI's provider classes). An
import in progress in another thread is waited for; concurrent imports wrap once.

**Off.** Every wrapper is a ``wrapt.FunctionWrapper`` whose ``enabled`` is the ``Switch`` of
the ``instrument()`` call that made it. ``uninstrument()`` turns it off, so a wrapper still
referenced somewhere (a bound method, ``from litellm import completion``, another
instrumentation's wrapper around ours) calls the original straight away; then it puts back
exactly what each attribute held (an attribute wrapped again since by someone else is left to
them: ours, inside, passes through) and disarms every hook that has not fired yet (wrapt keeps
hooks for good). Instrumenting again makes new wrappers under a new switch.

**Never into the import.** A hook runs inside the application's ``import``: a failure while
wrapping wraps nothing of that hook and is logged as an error naming the package and saying
its calls are NOT budgeted; it is never raised there.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import wrapt
from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from otel_budget.cache import as_cache
from otel_budget.runtime import RuntimeSource

logger = logging.getLogger("otel_budget")

SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"

#: A wrapper factory: ``factory(*wiring)`` -> the wrapt wrapper of one attribute.
Factory = Callable[..., Any]

# Held to apply or undo a set of patches, nothing else: no import, no factory runs under it.
_LOCK = threading.Lock()
_NOTHING = object()  # what an attribute held before we wrapped one it inherited


class Switch:
    """On from ``instrument()`` to ``uninstrument()``: the ``enabled`` of every wrapper that
    instrumentation made (wrapt calls the original straight away while it is false)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = True

    def __bool__(self) -> bool:
        return self.on


class GivenOriginal:
    """A factory that also needs the callable it wraps (``given_original``)."""

    __slots__ = ("factory",)

    def __init__(self, factory: Callable[..., Any]) -> None:
        self.factory = factory


def given_original(factory: Callable[..., Any]) -> GivenOriginal:
    """Mark a factory that also needs the callable it wraps: ``factory(*wiring, original)``."""
    return GivenOriginal(factory)


#: (module, owner, name, factory): the attribute ``name`` of the class ``owner`` (a dotted
#: path; ``""``: the module itself) of ``module``.
Target = tuple[str, str, str, "Factory | GivenOriginal"]


class _Patch(NamedTuple):
    owner: Any
    name: str
    original: Any  # what ``vars(owner)[name]`` held (_NOTHING: it was inherited)
    wrapper: Any

    def undo(self) -> None:
        if vars(self.owner).get(self.name) is not self.wrapper:
            return  # wrapped again since by someone else: left to them (ours passes through)
        if self.original is _NOTHING:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.original)


def _resolve(module: Any, path: str) -> Any:
    for part in path.split(".") if path else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _owner(module_name: str, path: str, name: str) -> Any:
    """The object holding a row's attribute, None when the installed version lacks it."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a version without this module (or one that fails to import)
        return None
    owner = _resolve(module, path)
    return owner if owner is not None and callable(getattr(owner, name, None)) else None


def _defined(owner: Any, name: str) -> tuple[Any, Any]:
    """(the object whose ``__dict__`` holds ``name``, the value there): for a class, the
    first of its MRO that defines it, descriptor as is (a classmethod stays one)."""
    for holder in owner.__mro__ if isinstance(owner, type) else (owner,):
        if name in vars(holder):
            return holder, vars(holder)[name]
    return owner, getattr(owner, name)  # a module's ``__getattr__``: held by nothing


def tracer_of(instrumentor: Any, kwargs: dict[str, Any], schema_url: str | None = SCHEMA_URL) -> Any:
    """The tracer of ``instrument(tracer_provider=...)``, named after the instrumentor's module."""
    from otel_budget import __version__

    return trace.get_tracer(
        type(instrumentor).__module__, __version__, kwargs.get("tracer_provider"),
        schema_url=schema_url,
    )  # fmt: skip


def genai_tracer(instrumentor: Any, kwargs: dict[str, Any]) -> Any:
    """``tracer_of``, also emitting the GenAI events (``instrument(logger_provider=...)``)."""
    from otel_budget.instrumentation._content import event_tracer

    name = type(instrumentor).__module__
    return event_tracer(tracer_of(instrumentor, kwargs), name, kwargs.get("logger_provider"))


class SDKInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Wraps ``_TARGETS`` when their package (or, with ``_EACH_MODULE``, their module) is or
    once it is imported; see the module docstring."""

    _SDK: str = ""  # the package: named in logs, and its import wires the whole table
    _TARGETS: tuple[Target, ...] = ()
    _EACH_MODULE = False  # True: each module of the table is wired by its own import

    def _wiring(self, **kwargs: Any) -> tuple[Any, ...]:
        """What every factory of the table is called with, for this ``instrument()`` call
        (called once, before any hook is armed; it may refuse the call by raising): by
        default the tracer with the GenAI events and the ``RuntimeSource`` of ``runtime=``
        and ``cache=``."""
        source = RuntimeSource(kwargs.get("runtime"), as_cache(kwargs.get("cache")))
        return genai_tracer(self, kwargs), source

    def _absent(self, targets: Sequence[Target]) -> None:
        """Told the rows the installed version lacks (skipped), once per hook: nothing by
        default."""

    def _instrument(self, **kwargs: Any) -> None:
        wiring = self._wiring(**kwargs)
        switch = self._switch = Switch()
        self._patches: list[_Patch] = []
        self._wired: set[str] = set()  # the hooks that have wrapped under this switch
        hooks: dict[str, list[Target]] = {}
        for target in self._TARGETS:
            hooks.setdefault(target[0] if self._EACH_MODULE else self._SDK, []).append(target)
        for module, targets in hooks.items():
            # Called at once when the module is imported already, else when its import completes.
            hook = partial(self._on_import, switch, wiring, module, targets)
            wrapt.register_post_import_hook(hook, module)

    def _on_import(
        self, switch: Switch, wiring: tuple[Any, ...], module: str, targets: list[Target], _: Any
    ) -> None:
        # Runs inside the application's ``import``: it must never raise there.
        if not switch.on:
            return  # uninstrumented since this hook was armed: imports nothing
        try:
            self._wire(switch, wiring, module, targets)
        except Exception as exc:
            logger.error(
                "otel-budget: could not instrument %s; its calls are NOT budgeted: %s",
                self._SDK, exc, exc_info=exc,
            )  # fmt: skip

    def _wire(self, switch: Switch, wiring: tuple[Any, ...], module: str, targets: list[Target]) -> None:
        # Imports and factories first, outside the lock: an import another thread has in
        # progress is waited for here (and may run hooks of its own meanwhile).
        importlib.import_module(module)
        planned: list[_Patch] = []
        absent: list[Target] = []
        for target in targets:
            module_name, path, name, factory = target
            owner = _owner(module_name, path, name)
            if owner is None:
                absent.append(target)
                continue
            holder, original = _defined(owner, name)
            if any(p.owner is owner and p.name == name for p in planned) or (
                isinstance(original, wrapt.FunctionWrapper) and original._self_enabled is switch
            ):
                continue  # the same attribute reached through another row: wrapped once
            if holder is not owner and self._in_table(holder, name):
                continue  # inherited from a class the table wraps for it: wrapped there
            if isinstance(factory, GivenOriginal):
                made = factory.factory(*wiring, getattr(owner, name))
            else:
                made = factory(*wiring)
            held = original if holder is owner else _NOTHING
            planned.append(_Patch(owner, name, held, wrapt.FunctionWrapper(original, made, switch)))
        with _LOCK:
            if switch is not getattr(self, "_switch", None) or not switch.on or module in self._wired:
                return  # uninstrumented, or wired by another thread's import meanwhile
            self._wired.add(module)
            for patch in planned:
                setattr(patch.owner, patch.name, patch.wrapper)
                self._patches.append(patch)
        if absent:
            self._absent(absent)

    def _in_table(self, cls: type, name: str) -> bool:
        for module_name, path, other, _ in self._TARGETS:
            module = sys.modules.get(module_name)
            if other == name and module is not None and _resolve(module, path) is cls:
                return True
        return False

    def _uninstrument(self, **kwargs: Any) -> None:
        switch = getattr(self, "_switch", None)
        if switch is None:
            return
        switch.on = False  # from now on every wrapper passes through, every armed hook is inert
        with _LOCK:
            patches, self._patches = self._patches, []
            for patch in reversed(patches):
                patch.undo()


__all__ = [
    "Factory",
    "GivenOriginal",
    "SDKInstrumentor",
    "Switch",
    "Target",
    "genai_tracer",
    "given_original",
    "tracer_of",
]
