"""A worker's settings: what the parent tells a worker process at start-up.

The parent passes them in the ``OFFLOAD_WORKER`` environment variable
(:data:`SETTINGS_ENV`) as :func:`encode_settings` writes them: the hex digits of a pickle
of the fields as a plain dict. Not JSON: the pickle needs only ``_pickle``, which the
worker imports anyway, and a dict of plain values (not the record itself) keeps the
encoding independent of this class's layout. A ``fork`` or ``forkserver`` worker gets
its record directly, without the environment.

:class:`WorkerSettings` is a frozen record written by hand rather than a
``dataclasses.dataclass``: every worker imports this module at start-up, and
``dataclasses`` (with ``inspect``) would cost it about 15 ms, more than the rest of
its start.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from typing import Any

SETTINGS_ENV = "OFFLOAD_WORKER"
DEFAULT_NAME = "offload-worker"
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30  # offload.protocol's (not imported: see above)
# Buffers this large travel through shared memory between a client and its local
# workers (offload.transport.shared); 0 where there are no memfds.
SHARED_MEMORY = 1 << 18 if hasattr(os, "memfd_create") else 0
# The fields in their documented order (``__slots__`` is sorted).
_FIELDS = (
    "fd",
    "name",
    "ppid",
    "sys_path",
    "concurrency",
    "max_message_size",
    "preload",
    "heartbeat",
    "shutdown_on",
    "shared_memory",
)


class WorkerSettings:
    """The settings of one worker process (immutable; make changed copies with
    :meth:`replace`).

    Attributes:
        fd: the worker's end of the socketpair to its client (-1 until the launch
            knows it).
        name: the worker's name (its process title, and in every message about it).
        ppid: the pid of the parent that started it (0: unknown); the worker dies when
            it finds another parent.
        sys_path: entries put in front of the worker's ``sys.path`` (the parent's).
        concurrency: how many calls the worker runs at once.
        max_message_size: the largest message either side may send, in bytes.
        preload: modules imported before the worker says hello.
        heartbeat: ``(interval, timeout)`` in seconds, or None for no heartbeats.
        shutdown_on: when the worker ends by itself: ``"parent_exit"``,
            ``"heartbeat_timeout"`` or ``"explicit"``.
        shared_memory: buffers of at least this many bytes go through shared memory
            on the worker's socket, both ways (0: none do).
    """

    __slots__ = (
        "concurrency",
        "fd",
        "heartbeat",
        "max_message_size",
        "name",
        "ppid",
        "preload",
        "shared_memory",
        "shutdown_on",
        "sys_path",
    )
    fd: int
    name: str
    ppid: int
    sys_path: tuple[str, ...]
    concurrency: int
    max_message_size: int
    preload: tuple[str, ...]
    heartbeat: tuple[float, float] | None
    shutdown_on: str
    shared_memory: int

    def __init__(
        self,
        *,
        fd: int = -1,
        name: str = DEFAULT_NAME,
        ppid: int = 0,
        sys_path: tuple[str, ...] = (),
        concurrency: int = 1,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        preload: tuple[str, ...] = (),
        heartbeat: tuple[float, float] | None = None,
        shutdown_on: str = "parent_exit",
        shared_memory: int = 0,
    ) -> None:
        """Make a record; sequences are stored as tuples.

        Raises:
            ValueError: ``heartbeat`` is not a pair.
        """
        if heartbeat is not None:
            interval, timeout = heartbeat
            heartbeat = (float(interval), float(timeout))
        setter = object.__setattr__  # the record's own construction, never after
        setter(self, "fd", int(fd))
        setter(self, "name", str(name))
        setter(self, "ppid", int(ppid))
        setter(self, "sys_path", tuple(sys_path))
        setter(self, "concurrency", max(1, int(concurrency)))
        setter(self, "max_message_size", int(max_message_size))
        setter(self, "preload", tuple(preload))
        setter(self, "heartbeat", heartbeat)
        setter(self, "shutdown_on", str(shutdown_on))
        setter(self, "shared_memory", int(shared_memory))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"WorkerSettings is immutable (use replace(), not .{name} =)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("WorkerSettings is immutable")

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict of plain values (field name → value)."""
        return {name: getattr(self, name) for name in _FIELDS}

    def replace(self, **changes: Any) -> WorkerSettings:
        """A copy with ``changes`` applied.

        Raises:
            TypeError: a name in ``changes`` is not a field.
        """
        fields = self.as_dict()
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"WorkerSettings has no field {', '.join(sorted(unknown))}")
        fields.update(changes)
        return WorkerSettings(**fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not WorkerSettings:
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in _FIELDS))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"WorkerSettings({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its fields (forkserver requests carry it inside a LaunchSpec).
        return (_rebuild, (self.as_dict(),))


def _rebuild(fields: dict[str, Any]) -> WorkerSettings:
    return WorkerSettings(**fields)


def encode_settings(settings: WorkerSettings) -> str:
    """``settings`` as an environment-variable value: the hex digits of a pickle of its
    fields (a dict of plain values; decoding it needs nothing the worker does not import
    anyway)."""
    import _pickle

    return _pickle.dumps(settings.as_dict(), 4).hex()


def decode_settings(text: str) -> WorkerSettings:
    """The inverse of :func:`encode_settings`.

    Fields this version does not know are ignored: a worker of another offload version
    must get as far as its hello, where the handshake reports the mismatch.

    Raises:
        ValueError: ``text`` is not hex digits.
        pickle.UnpicklingError, TypeError: ``text`` is not a settings pickle.
    """
    import _pickle

    fields = _pickle.loads(bytes.fromhex(text))
    if not isinstance(fields, dict):
        raise TypeError(f"worker settings must be a dict, got {type(fields).__name__}")
    known = set(_FIELDS)
    return WorkerSettings(**{k: v for k, v in fields.items() if k in known})
