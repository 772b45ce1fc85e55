"""What a future and a pool say of themselves: ``Future.status()`` and ``Pool.stats()``.

These are the frozen dataclasses the SPEC promises (for ``match``, ``dataclasses``
functions, ``FrozenInstanceError``). They live apart from :mod:`offload.client.future`
and :mod:`offload.client.pool` and are imported when first asked for: importing
:mod:`dataclasses` (which imports :mod:`inspect`) and making these classes would
otherwise cost every fresh program its first pool's start (the classes the client
needs on that path are :mod:`offload._record` records instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from offload.errors import ExecutionError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Working:
    """The call is queued or running."""


@dataclass(frozen=True, slots=True)
class Success(Generic[T]):
    """The call returned ``value``."""

    value: T


@dataclass(frozen=True, slots=True)
class Raised:
    """The task raised ``exception`` (re-raised by ``result()`` as itself)."""

    exception: BaseException


@dataclass(frozen=True, slots=True)
class Failed:
    """The call did not complete for a reason outside the task: ``error`` says which."""

    error: ExecutionError


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The call was cancelled before it started."""


Status = Working | Success[Any] | Raised | Failed | Cancelled


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of a pool (``Pool.stats()``)."""

    workers: int
    busy: int
    idle: int
    starting: int
    queued: int
    running: int
    done: int
    failed: int
    restarts: int
