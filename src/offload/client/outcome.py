"""From what happened to the typed error a future fails with: the one place where
offload's error messages are made ("worker X (pid N) was killed by SIGKILL while
running resize('a.png', 100); ...").

Everything here is a pure function of its arguments (no processes, no sockets, no
clock), so every sentence can be tested on its own. What happened comes in as:

* an :class:`~offload.client.slot.ExitInfo` (a worker exited, was killed by a signal,
  stopped answering, went over memory, lost its connection): :func:`crashed`, or
  :func:`start_failed_by_exit` when it died before its handshake;
* a scheduler :class:`~offload.client.scheduler.Outcome` (timeout, kill, collateral,
  start failure) for a call the engine resolves itself: :func:`scheduler_error`;
* a worker's Result that is not a value (the task raised; an argument or result that
  could not travel; an unknown task; a server's own error): :func:`result_error`.
"""

from __future__ import annotations

import reprlib

from offload import protocol as p
from offload.client.scheduler import Outcome
from offload.client.slot import CallRecord, ExitInfo
from offload.errors import (
    ConnectionLost,
    NoWorkerAvailable,
    OffloadError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    StartError,
    TaskTimeout,
    WorkerCrashed,
    WorkerKilled,
    _tail_excerpt,
    likely_cause,
)
from offload.serde import loads, type_name

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def describe_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(arg, key=value)``, shortened, for error messages."""
    name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", None) or repr(fn)
    parts = [_repr.repr(a) for a in args[:4]]
    if len(args) > 4:
        parts.append("...")
    parts += [f"{k}={_repr.repr(v)}" for k, v in list(kwargs.items())[:4]]
    return f"{name}({', '.join(parts)})"


def describe(record: CallRecord) -> str:
    """The call of ``record`` for error messages (a relayed call by its target)."""
    if record.sink is not None:
        return record.target or "a relayed call"
    return describe_call(record.fn, record.args, record.kwargs)


def crashed(info: ExitInfo, call: str) -> WorkerCrashed:
    """The WorkerCrashed (ConnectionLost for a worker server) of a call that was running
    on the worker ``info`` describes, in one sentence."""
    if info.remote:
        what = info.detail or "lost its connection"
        # A server started over ssh has the ssh client's last words (and the server's).
        return ConnectionLost(
            f"worker server {info.name} (pid {info.pid}) {what} while running {call}"
            + _stderr_clause(info.stderr_tail),
            pid=info.pid,
            reason=info.reason,  # type: ignore[arg-type]
            stderr_tail=info.stderr_tail,
            worker=info.name,
        )
    return _ended(
        info, f"worker {info.name} (pid {info.pid}) {_how_ended(info)} while running {call}"
    )


def _how_ended(info: ExitInfo) -> str:
    """How a local worker ended, as a verb phrase ("was killed by SIGKILL")."""
    if info.reason == "signal":
        return f"was killed by {info.signal}"
    if info.reason == "exit":
        return f"exited with status {info.exitcode}"
    return info.detail or f"failed ({info.reason})"


def _ended(info: ExitInfo, message: str) -> WorkerCrashed:
    """The WorkerCrashed of a local worker that ended: ``message``, then the likely
    cause (of a signal or an exit status) and what the worker wrote to stderr."""
    if info.reason in ("signal", "exit"):
        hint = info.detail or likely_cause(info.signal, info.exitcode)
        if hint:
            message += f"; {hint}"
    message += _stderr_clause(
        info.stderr_tail, "; it wrote nothing to stderr" if info.stderr_seen else ""
    )
    return WorkerCrashed(
        message,
        pid=info.pid,
        exitcode=info.exitcode,
        signal=info.signal,
        reason=info.reason,  # type: ignore[arg-type]
        stderr_tail=info.stderr_tail,
        worker=info.name,
    )


def actor_gone(info: ExitInfo, *, killed: bool) -> OffloadError:
    """What a call to an actor fails with once the actor's one worker has ended (it is
    never restarted: its state would be silently lost). ``killed``: this handle killed
    or shut it down."""
    lost = "its state is gone with it, and an actor is never restarted"
    if killed:
        return WorkerKilled(
            f"actor {info.name} (pid {info.pid}) was killed or shut down through this "
            f"handle; {lost}",
            pid=info.pid,
            worker=info.name,
        )
    if info.remote:
        what = info.detail or "lost its connection"
        return ConnectionLost(
            f"actor {info.name} (pid {info.pid}) {what}; this handle does not reconnect "
            "(the actor may be gone, and its state with it)",
            pid=info.pid,
            reason=info.reason,  # type: ignore[arg-type]
            worker=info.name,
        )
    return _ended(info, f"actor {info.name} (pid {info.pid}) {_how_ended(info)}; {lost}")


def not_a_method(cls_name: str, name: str, kind: str | None) -> str:
    """Why ``handle.<name>`` is refused (an AttributeError at the call site): the
    actor's class has no public method of that name."""
    if kind is None:
        what = "nothing of that name" if not name.startswith("_") else "a private name"
        return (
            f"{cls_name!r} actor handle has no method {name!r}: the class {cls_name} has "
            f"{what}; a handle exposes the class's public methods"
        )
    return (
        f"{cls_name!r} actor handle has no method {name!r}: {cls_name}.{name} is a {kind}, "
        "and a handle only calls methods (read state through a method that returns it)"
    )


def start_failed_by_exit(info: ExitInfo, *, reexec: bool) -> StartError:
    """A worker that died before finishing its handshake."""
    how = (
        f"exited with status {info.exitcode}"
        if info.reason == "exit"
        else f"was killed by {info.signal}"
    )
    message = f"worker {info.name} (pid {info.pid}) {how} before finishing its handshake"
    if reexec:
        message += (
            "; with start_method='reexec' the program must be able to run again and call "
            "offload.init() first"
        )
    return StartError(
        message + _stderr_clause(info.stderr_tail),
        worker=info.name,
        pid=info.pid,
        exitcode=info.exitcode,
        stderr_tail=info.stderr_tail,
    )


def start_failed(
    message: str,
    *,
    worker: str,
    pid: int | None = None,
    exitcode: int | None = None,
    stderr_tail: str = "",
) -> StartError:
    """A worker that could not start: ``message`` says why (launch, initializer,
    handshake timeout), with the last of its stderr."""
    return StartError(
        message + _stderr_clause(stderr_tail),
        worker=worker,
        pid=pid,
        exitcode=exitcode,
        stderr_tail=stderr_tail,
    )


def handshake_timeout(name: str, pid: int | None, timeout: float, *, reexec: bool) -> str:
    """Why a worker that did not finish its handshake in time failed to start."""
    message = (
        f"worker {name} (pid {pid}) did not finish its handshake within {timeout:g} s "
        "(start_timeout)"
    )
    if reexec:
        message += "; with start_method='reexec' the program must call offload.init() first"
    return message


def scheduler_error(
    outcome: Outcome,
    *,
    call: str,
    worker: str,
    pid: int | None,
    remote: bool,
    timeout: float | None,
    cause: object,
    other_call: str | None = None,
    attempts: int = 0,
    retries: int = 0,
) -> OffloadError:
    """The error of a call the engine resolved itself (its timeout passed, it was
    killed, its worker was killed for another call, no worker could start, its worker
    died). ``cause`` is what came with the event: an ExitInfo for a crash, the
    worker server's Result for a crash there, the start error for a start failure.
    A crash of a call that had ``retries`` says how many ``attempts`` it made."""
    if outcome is Outcome.TIMEOUT:
        where = (
            f"it was killed on the worker server {worker}"
            if remote
            else f"worker {worker} (pid {pid}) was killed and will be replaced"
        )
        return TaskTimeout(
            f"{call} did not finish within its timeout of {timeout or 0.0:g} s; {where}",
            timeout=timeout or 0.0,
            pid=pid,
            worker=worker,
        )
    if outcome is Outcome.KILLED:
        where = f"the worker server {worker}" if remote else f"worker {worker} (pid {pid})"
        return WorkerKilled(f"{call} was killed on {where}", pid=pid, worker=worker)
    if outcome is Outcome.COLLATERAL:
        why = (
            f"because {other_call} on the same worker"
            if other_call
            else "because another call on it"
        )
        return WorkerCrashed(
            f"worker {worker} (pid {pid}) was killed while running {call}, {why} timed out "
            "or was killed",
            pid=pid,
            signal="SIGKILL",
            reason="signal",
            worker=worker,
        )
    if outcome is Outcome.START_FAILED:
        if isinstance(cause, OffloadError):
            return clone_error(cause)
        return StartError(f"no worker could start to run {call}", worker=worker)
    if isinstance(cause, ExitInfo):
        return _after_attempts(crashed(cause, call), attempts, retries)
    if isinstance(cause, p.Result):  # a worker server's answer: the crash there
        error = result_error(cause, call=call, worker=worker, pid=pid)
        if not isinstance(error, OffloadError):  # a server sends only offload's errors
            error = RemoteError(cause.message, type_name=cause.type_name)
        return _after_attempts(error, attempts, retries)
    raise ValueError(f"no error for outcome {outcome} with cause {cause!r}")


def is_crash(msg: p.Result) -> bool:
    """Whether a worker server answered a call with the crash of the process that ran
    it (``retries`` apply), told by the error's type name alone: nothing is unpickled."""
    return msg.status == p.FAILED and msg.type_name in _CRASH_TYPES


_CRASH_TYPES = frozenset({WorkerCrashed.__name__, ConnectionLost.__name__})


def _after_attempts(error: OffloadError, attempts: int, retries: int) -> OffloadError:
    """``error`` (a call's last crash), saying that every attempt its ``retries``
    allowed failed, so nobody wonders whether it was retried."""
    if retries > 0 and error.args:
        error.args = (f"{error.message}; it failed on all {attempts} attempts (retries={retries})",)
    return error


def result_error(msg: p.Result, *, call: str, worker: str, pid: int | None) -> BaseException:
    """What a call fails with when its worker's Result is not a value: the task's own
    exception (its ``__cause__`` the worker's traceback), or an offload error."""
    status = msg.status
    if status == p.RAISED:
        return task_exception(msg)
    if status in (p.BAD_ARGUMENT, p.BAD_RESULT):
        return SerializationError(
            f"{call}: {msg.message}",
            direction="argument" if status == p.BAD_ARGUMENT else "result",
            type_name=msg.type_name,
        )
    if status == p.FAILED:  # decided by a worker server: one of offload's errors
        try:
            error = loads(msg.payload, msg.buffers)
        except BaseException:  # noqa: BLE001 - anything that fails becomes a RemoteError
            error = None
        if isinstance(error, BaseException):
            return error
        return RemoteError(msg.message, type_name=msg.type_name, traceback=msg.traceback)
    if status == p.UNKNOWN_TASK:
        return NoWorkerAvailable(
            f"worker {worker} (pid {pid}) knows no task named {msg.type_name!r}; register "
            "it with @offload.task(name=...) in a module the worker imports (preload=...)",
            task=msg.type_name,
        )
    return ProtocolError(f"worker {worker} sent an unknown result status {status}")


def deliver(record: CallRecord, msg: p.Result, *, worker: str, pid: int | None) -> bool:
    """Resolve the future of a (not relayed) call with its worker's Result: the value,
    or what the call failed with. True if it got a value."""
    future = record.future
    if msg.status == p.SKIPPED:  # dropped unstarted (a withdrawn call has no record)
        future._cancel_now(force=True)
        return False
    if msg.status == p.OK:
        try:
            value = loads(msg.payload, msg.buffers)
        except BaseException as exc:  # noqa: BLE001 - SystemExit from __setstate__ too
            future._resolve_exception(unpicklable_result(describe(record), exc), task_raised=False)
            return False
        future._resolve_value(value)
        return True
    error = result_error(msg, call=describe(record), worker=worker, pid=pid)
    future._resolve_exception(error, task_raised=msg.status == p.RAISED)
    return False


def unpicklable_result(call: str, exc: BaseException) -> SerializationError:
    """A result that arrived but could not be unpickled here."""
    err = SerializationError(
        f"the result of {call} could not be unpickled: {type_name(exc)}: {exc}",
        direction="result",
    )
    err.__cause__ = exc
    return err


def unpicklable_argument(call: str, culprit: str, exc: BaseException) -> SerializationError:
    """An argument that could not be pickled (``culprit`` names its type)."""
    err = SerializationError(
        f"an argument of {call} could not be pickled: {culprit}: {type_name(exc)}: {exc}",
        direction="argument",
        type_name=culprit,
    )
    err.__cause__ = exc
    return err


def too_large(call: str, size: int, limit: int, first_type: str | None) -> SerializationError:
    """Arguments that pickle to more than ``max_message_size``."""
    return SerializationError(
        f"the arguments of {call} pickle to {size} bytes, more than max_message_size ({limit})",
        direction="argument",
        type_name=first_type,
    )


def task_exception(msg: p.Result) -> BaseException:
    """The task's own exception, as itself when it travelled, else a RemoteError; its
    ``__cause__`` is the worker-side traceback."""
    exc: BaseException | None = None
    if msg.payload:
        try:
            loaded = loads(msg.payload, msg.buffers)
            if isinstance(loaded, BaseException):
                exc = loaded
        except BaseException:  # noqa: BLE001 - falls back to RemoteError
            exc = None
    if exc is None:
        exc = RemoteError(msg.message, type_name=msg.type_name, traceback=msg.traceback)
    exc.__cause__ = RemoteTraceback(msg.traceback)
    return exc


def clone_error(err: OffloadError) -> OffloadError:
    """A fresh copy of ``err`` (each future gets its own exception object)."""
    rebuild, args = err.__reduce__()[:2]
    copy: OffloadError = rebuild(*args)
    return copy


def _stderr_clause(tail: str, nothing: str = "") -> str:
    excerpt = _tail_excerpt(tail)
    return f"; last stderr: {excerpt}" if excerpt else nothing
