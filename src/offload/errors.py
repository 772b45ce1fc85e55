"""Every error offload raises itself.

::

    OffloadError                     base of every error offload raises itself
    ├── ExecutionError               the call did not complete for a reason outside the task
    │   ├── WorkerCrashed            the worker died or stopped answering mid-call
    │   │   └── ConnectionLost       a remote worker's connection dropped or its heartbeat stopped
    │   ├── WorkerKilled             you killed it (fut.kill(), worker.kill(), shutdown(kill=True))
    │   ├── TaskTimeout              also a builtin TimeoutError; the per-call timeout passed
    │   ├── NoWorkerAvailable        no worker knows that task, or the pool is shut down
    │   ├── SerializationError       an argument or result could not be (un)pickled
    │   └── RemoteError              the task raised an exception that cannot travel as itself
    ├── StartError                   a worker could not start
    ├── ProtocolError                the peer broke the wire protocol
    │   └── VersionMismatch          the two sides run different offload/protocol/Python versions
    ├── AuthenticationError          wrong or missing token, TLS failure
    ├── ChannelClosed                a channel end closed, or handed to a call
    ├── ChannelTimeout               also a builtin TimeoutError; rx.recv(timeout) got nothing
    └── LockTimeout                  also a builtin TimeoutError; offload.Lock not acquired in time

A task's *own* exception is never wrapped: ``Future.result()`` re-raises it as itself, with
``__cause__`` set to a :class:`RemoteTraceback` carrying the worker-side traceback text.

All errors pickle and unpickle with their fields intact (they travel between processes:
a task may itself call another worker and let the error propagate).
"""

from __future__ import annotations

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from typing import Any, Literal

    CrashReason = Literal["exit", "signal", "unresponsive", "memory", "disconnected"]
    Direction = Literal["argument", "result"]

__all__ = [
    "AuthenticationError",
    "ChannelClosed",
    "ChannelTimeout",
    "ConnectionLost",
    "ExecutionError",
    "LockTimeout",
    "NoWorkerAvailable",
    "OffloadError",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "StartError",
    "TaskTimeout",
    "VersionMismatch",
    "WorkerCrashed",
    "WorkerKilled",
]


def _tail_excerpt(text: str, limit: int = 300) -> str:
    """The telling part of a worker's stderr, for one-sentence messages.

    A faulthandler report gives its "Fatal Python error" line and the innermost frame of
    the crashing thread; anything else gives its last three non-empty lines.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    picked = lines[-3:]
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error:")]
    if fatal:
        start = fatal[-1]
        picked = [lines[start]]
        current = [i for i in range(start, len(lines)) if lines[i].startswith("Current thread")]
        if current and current[0] + 1 < len(lines):
            picked.append(lines[current[0] + 1])
    excerpt = " | ".join(picked)
    return excerpt if len(excerpt) <= limit else "..." + excerpt[-limit:]


class OffloadError(Exception):
    """Base of every error offload raises itself.

    Subclasses keep their keyword fields in ``self._fields`` so that they pickle and
    unpickle intact across processes.
    """

    _fields: dict[str, Any]

    def __init__(self, message: str = "", **fields: Any) -> None:
        super().__init__(message)
        self._fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    @property
    def message(self) -> str:
        """The human-readable sentence."""
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.message, self._fields))

    def __str__(self) -> str:
        return self.message


def _rebuild_error(cls: type[OffloadError], message: str, fields: dict[str, Any]) -> OffloadError:
    err = cls.__new__(cls)
    OffloadError.__init__(err, message, **fields)
    return err


class ExecutionError(OffloadError):
    """The call did not complete, for a reason outside the task's own code."""


class WorkerCrashed(ExecutionError):
    """The worker process died, or stopped answering, while running the call.

    Attributes:
        pid: the worker's process id (None if it never started).
        exitcode: its exit status when it exited, else None.
        signal: the name of the signal that ended it (``"SIGSEGV"``), else None.
        reason: ``"exit"``, ``"signal"``, ``"unresponsive"``, ``"memory"`` or ``"disconnected"``.
        stderr_tail: the last (at most 64 KiB) text the worker wrote to stderr.
        worker: the worker's name.
    """

    pid: int | None
    exitcode: int | None
    signal: str | None
    reason: CrashReason
    stderr_tail: str
    worker: str

    def __init__(
        self,
        message: str = "",
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        signal: str | None = None,
        reason: CrashReason = "exit",
        stderr_tail: str = "",
        worker: str = "",
    ) -> None:
        super().__init__(
            message,
            pid=pid,
            exitcode=exitcode,
            signal=signal,
            reason=reason,
            stderr_tail=stderr_tail,
            worker=worker,
        )


class ConnectionLost(WorkerCrashed):
    """A remote worker's connection dropped, or its heartbeat stopped."""


class WorkerKilled(ExecutionError):
    """You killed the call: ``fut.kill()``, ``worker.kill()`` or ``shutdown(kill=True)``.

    Attributes:
        pid: the process that was killed.
        worker: its name.
    """

    pid: int | None
    worker: str

    def __init__(self, message: str = "", *, pid: int | None = None, worker: str = "") -> None:
        super().__init__(message, pid=pid, worker=worker)


class TaskTimeout(ExecutionError, TimeoutError):
    """The call ran longer than its ``timeout``; its worker was killed and replaced.

    Attributes:
        timeout: the limit in seconds.
        pid: the worker that was killed.
        worker: its name.
    """

    timeout: float
    pid: int | None
    worker: str

    def __init__(
        self, message: str = "", *, timeout: float = 0.0, pid: int | None = None, worker: str = ""
    ) -> None:
        super().__init__(message, timeout=timeout, pid=pid, worker=worker)


class NoWorkerAvailable(ExecutionError):
    """No worker can run the call: the task name is unknown, the pool is shut down,
    or no host can be reached.

    Attributes:
        task: the task name asked for (or None when the pool itself is unavailable).
    """

    task: str | None

    def __init__(self, message: str = "", *, task: str | None = None) -> None:
        super().__init__(message, task=task)


class SerializationError(ExecutionError):
    """An argument or a result could not be pickled or unpickled; only this call fails.

    Attributes:
        direction: ``"argument"`` (client to worker) or ``"result"`` (worker to client).
        type_name: the type of the object that failed, when known.
    """

    direction: Direction
    type_name: str | None

    def __init__(
        self, message: str = "", *, direction: Direction = "argument", type_name: str | None = None
    ) -> None:
        super().__init__(message, direction=direction, type_name=type_name)


class RemoteError(ExecutionError):
    """The task raised an exception that cannot travel back as itself.

    Attributes:
        type_name: the qualified name of the original exception type.
        message: ``str()`` of the original exception.
        traceback: the worker-side traceback text.
    """

    type_name: str
    traceback: str

    def __init__(self, message: str = "", *, type_name: str = "", traceback: str = "") -> None:
        super().__init__(message, type_name=type_name, traceback=traceback)

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


class StartError(OffloadError):
    """A worker could not start: exec failed, its initializer raised, or it did not
    finish the handshake within ``start_timeout``.

    Attributes:
        worker: the worker's name.
        pid: its pid, if it got that far.
        exitcode: its exit status, if it exited.
        stderr_tail: the last text it wrote to stderr.
    """

    worker: str
    pid: int | None
    exitcode: int | None
    stderr_tail: str

    def __init__(
        self,
        message: str = "",
        *,
        worker: str = "",
        pid: int | None = None,
        exitcode: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(
            message, worker=worker, pid=pid, exitcode=exitcode, stderr_tail=stderr_tail
        )


class ProtocolError(OffloadError):
    """The peer broke the wire protocol: a bad frame, an unknown message, or a message
    larger than ``max_message_size``."""


class VersionMismatch(ProtocolError):
    """The two sides run different offload, protocol or Python versions.

    Attributes:
        local: this side's ``(offload, protocol, python)`` versions.
        remote: the peer's.
    """

    local: tuple[str, int, str]
    remote: tuple[str, int, str]

    def __init__(
        self,
        message: str = "",
        *,
        local: tuple[str, int, str] = ("", 0, ""),
        remote: tuple[str, int, str] = ("", 0, ""),
    ) -> None:
        super().__init__(message, local=local, remote=remote)


class AuthenticationError(OffloadError):
    """The peer did not prove the shared token, or TLS failed.

    Attributes:
        shed: True when the server closed or reset the connection before it sent its
            challenge: what a server does to silent connections when a flood of them
            fills it up, so worth another try (``offload.connect`` tries again itself,
            within ``start_timeout``). False for a refusal: a wrong token, TLS.
    """

    shed: bool = False  # a keyword field when set (see OffloadError)


class ChannelClosed(OffloadError):
    """A channel end cannot be used: you closed it, or handed it to a call (a sender
    given to a call sends from there; a receiver given to a call receives there until
    that call ends); or the channel's receiver is gone."""


class ChannelTimeout(OffloadError, TimeoutError):
    """``rx.recv(timeout=...)`` found no item within ``timeout`` seconds (the channel
    stays open: receive again). Also a builtin ``TimeoutError``.

    Attributes:
        timeout: how long it waited, in seconds.
    """

    timeout: float

    def __init__(self, message: str = "", *, timeout: float = 0.0) -> None:
        super().__init__(message, timeout=timeout)


class LockTimeout(OffloadError, TimeoutError):
    """An :class:`offload.Lock` was not acquired within its ``timeout`` (raised by
    ``with lock:``; ``lock.acquire(timeout=...)`` returns False instead).

    Attributes:
        name: the lock's name.
        timeout: how long it waited, in seconds.
        holder_pid: the pid of the process that held it, when known (it writes its pid
            into the lock file; the pid is of the holder's PID namespace).
        path: the lock file.
    """

    name: str
    timeout: float
    holder_pid: int | None
    path: str

    def __init__(
        self,
        message: str = "",
        *,
        name: str = "",
        timeout: float = 0.0,
        holder_pid: int | None = None,
        path: str = "",
    ) -> None:
        super().__init__(message, name=name, timeout=timeout, holder_pid=holder_pid, path=path)


class RemoteTraceback(Exception):
    """The worker-side traceback of a task's exception, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class UnknownExitStatus(int):
    """The exit status of a process that nobody could collect: the program ignores
    SIGCHLD (``signal.signal(SIGCHLD, SIG_IGN)``), so the kernel reaped the process
    itself and dropped its status. An ``int`` (255, the largest status: never mistaken
    for a clean exit) whose ``str()`` is ``"unknown"``."""

    def __new__(cls, value: int = 255) -> UnknownExitStatus:
        return super().__new__(cls, value)

    def __str__(self) -> str:
        return "unknown"

    def __repr__(self) -> str:
        return "UnknownExitStatus()"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


UNKNOWN_STATUS_CAUSE = (
    "its exit status is lost: this program ignores SIGCHLD (SIG_IGN), so the kernel "
    "reaped the worker before offload could"
)


def describe_exit(exitcode: int | None) -> tuple[str | None, CrashReason]:
    """Turn a ``Popen.returncode``-style status into (signal name, reason)."""
    import signal as _signal

    if isinstance(exitcode, UnknownExitStatus):
        return None, "exit"
    if exitcode is not None and exitcode < 0:
        try:
            return _signal.Signals(-exitcode).name, "signal"
        except ValueError:
            return f"signal {-exitcode}", "signal"
    return None, "exit"


def likely_cause(signal_name: str | None, exitcode: int | None) -> str:
    """A short hint on why a process ended that way, for error messages."""
    if signal_name == "SIGKILL":
        return "killed from outside, possibly by the out-of-memory killer"
    if signal_name == "SIGSEGV":
        return "a segmentation fault, usually in C code"
    if signal_name == "SIGABRT":
        return "abort(), usually a failed assertion in C code"
    if signal_name == "SIGBUS":
        return "a bus error (memory-mapped file truncated?)"
    if signal_name == "SIGTERM":
        return "terminated from outside"
    if isinstance(exitcode, UnknownExitStatus):
        return UNKNOWN_STATUS_CAUSE
    if exitcode is not None and exitcode >= 0:
        return "the process exited (os._exit or sys.exit outside a task?)"
    return ""
