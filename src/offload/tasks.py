"""Tasks: callables with a registered name and per-call defaults.

``@offload.task`` (or ``offload.task(fn, timeout=5)``) wraps a function in a :class:`Task`,
which is still an ordinary local callable, registers it under ``name`` (default
``"module:qualname"``) in this process's registry, and carries ``timeout`` and
``retries`` defaults that the client applies to every submission of it.

A worker asked to run a task by name looks it up here; a name of the form
``"module:qualname"`` that is not registered yet is imported on demand.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, ParamSpec, TypeVar, overload

P = ParamSpec("P")
R = TypeVar("R")

_registry: dict[str, Task[Any, Any]] = {}
_registry_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-call settings a task carries."""

    timeout: float | None = None
    retries: int = 0


class Task(Generic[P, R]):
    """A function with a registered name and per-call defaults.

    Calling a Task calls the function in this process. Submitting it to a worker runs it
    there with the task's ``timeout`` and ``retries``.

    Attributes:
        fn: the wrapped function.
        name: the registered name.
        timeout: seconds per call, or None.
        retries: re-runs on another worker after a worker failure.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        register: bool = True,
    ) -> None:
        if isinstance(fn, Task):
            fn = fn.fn
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        self.fn: Callable[P, R] = fn
        self.name = name or default_name(fn)
        self.task_options = TaskOptions(timeout=timeout, retries=retries)
        functools.update_wrapper(self, fn)
        if register:
            with _registry_lock:
                _registry[self.name] = self

    @property
    def timeout(self) -> float | None:
        """Seconds a call may run before its worker is killed, or None."""
        return self.task_options.timeout

    @property
    def retries(self) -> int:
        """How many times a call is re-run after its worker failed."""
        return self.task_options.retries

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def options(self, *, timeout: float | None = None, retries: int | None = None) -> Task[P, R]:
        """A copy with some per-call settings overridden (not registered again).

        Args:
            timeout: seconds per call.
            retries: re-runs after a worker failure.
        """
        clone: Task[P, R] = Task.__new__(Task)
        clone.__dict__.update(self.__dict__)
        changes: dict[str, Any] = {}
        if timeout is not None:
            changes["timeout"] = timeout
        if retries is not None:
            changes["retries"] = retries
        clone.task_options = replace(self.task_options, **changes)
        return clone

    def __repr__(self) -> str:
        opts = self.task_options
        return f"<Task {self.name} timeout={opts.timeout} retries={opts.retries}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # Travels as (function, name, options): the function goes by reference when it is
        # importable, by value (cloudpickle) otherwise.
        return (_rebuild_task, (self.fn, self.name, self.task_options))

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # Decorating a method keeps it a method.
        if obj is None:
            return self
        return functools.partial(self.fn, obj)


def _rebuild_task(fn: Callable[..., Any], name: str, opts: TaskOptions) -> Task[Any, Any]:
    existing = _registry.get(name)
    if existing is not None and existing.task_options == opts:
        return existing
    return Task(fn, name=name, timeout=opts.timeout, retries=opts.retries)


def default_name(fn: Callable[..., Any]) -> str:
    """``"module:qualname"`` of a callable."""
    module = getattr(fn, "__module__", None) or "__main__"
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    return f"{module}:{qualname}"


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(
    fn: Callable[P, R],
    /,
    *,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
) -> Task[P, R]: ...
@overload
def task(
    *, name: str | None = None, timeout: float | None = None, retries: int = 0
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    timeout: float | None = None,
    retries: int = 0,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Make a :class:`Task`: as ``@task``, ``@task(name=..., timeout=..., retries=...)``,
    or ``task(fn, timeout=5)`` for an undecorated function.

    Args:
        fn: the function (omit when used as ``@task(...)``).
        name: registered name; default ``"module:qualname"``.
        timeout: seconds per call; when it passes the worker is killed and replaced and
            the future fails with :class:`~offload.TaskTimeout`.
        retries: re-runs on another worker when the *worker* failed, never when the
            task raised.

    Raises:
        ValueError: a non-positive timeout or negative retries.
    """
    if fn is not None:
        return Task(fn, name=name, timeout=timeout, retries=retries)

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        return Task(f, name=name, timeout=timeout, retries=retries)

    return decorate


def lookup(name: str) -> Task[Any, Any] | None:
    """The task registered under ``name``; ``"module:qualname"`` names are imported."""
    found = _registry.get(name)
    if found is not None or ":" not in name:
        return found
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, Task):
        return obj
    return _registry.get(name)


def registered_task(name: str) -> Task[Any, Any] | None:
    """The task registered under ``name`` in this process, without importing anything
    (None if there is none)."""
    return _registry.get(name)


def registered() -> list[str]:
    """Names of every task registered in this process."""
    return sorted(_registry)
