"""Running one call in this process: no file descriptors, no sockets.

:class:`Execution` turns a :class:`~offload.protocol.Call` into its
:class:`~offload.protocol.Result` and never raises:

1. The callable and its arguments are unpickled: a task looked up by name
   (``Call.kind == BY_NAME``), a function sent by reference once and cached
   (``Call.function``), or a pickled ``(callable, args, kwargs)`` (``BY_VALUE``, and
   ``INIT_KIND``, the worker's initializer, which runs like any call). Any failure here
   (an exception, even ``SystemExit`` raised by a ``__reduce__``) is a ``BAD_ARGUMENT``
   result; an unknown task name is ``UNKNOWN_TASK``.
2. The callable runs on the calling thread. While it runs, :func:`report` on that thread
   hands its values to the execution's ``report`` callback with the call's id. Channel
   ends among the arguments bind to the call as they are unpickled, and its senders are
   flushed when it returns, before its result (:mod:`offload.worker.channels`).
3. The value is pickled into an ``OK`` result (``BAD_RESULT`` when it cannot be, or when
   it exceeds ``max_message_size``); an exception the call raised becomes a ``RAISED``
   result carrying its pickle when it survives a round trip, and its text and traceback
   always.

Each result carries ``elapsed``, the seconds from the start of :meth:`Execution.run`
to the result: the client sizes its pipelines and map chunks with it.

A worker process (:mod:`offload.worker.loop`) and a server's inline runner use this same
class; what carries the result (and the progress values) onwards is theirs.
"""

from __future__ import annotations

import _thread
import sys

from offload import protocol as p
from offload.serde import dumps, loads, type_name

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Bytes of an OK Result besides its payload and buffers: tag and numbers (25), three
# empty strings (12), the payload's length (4) and the buffer count (4).
_RESULT_OVERHEAD = 45
_MAX_FUNCTIONS = 1024  # functions sent by reference that an execution keeps unpickled

_clock = __import__("time").perf_counter
# The call running on this thread: its id and where its progress goes (see report()).
_current = _thread._local()


def report(value: Any) -> None:
    """Inside a task: publish ``value`` as the progress of the running call.

    The client's ``fut.progress()`` returns the latest value and
    ``fut.add_progress_callback(cb)`` sees every one. Outside a call (or where the
    caller takes no progress) this does nothing.

    Raises:
        Exception: whatever pickling ``value`` raises, in a worker process.
    """
    sink: Callable[[int, Any], None] | None = getattr(_current, "report", None)
    if sink is not None:
        sink(_current.call_id, value)


class Execution:
    """Runs calls in this process (no fds, no sockets).

    Thread-safe: several threads may run calls through one execution at once.
    """

    def __init__(
        self,
        *,
        name: str,
        report: Callable[[int, Any], None] | None = None,
        max_message_size: int = p.DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        """Args:
        name: whose calls these are (the worker's name), for messages about them.
        report: called as ``report(call_id, value)`` for each ``offload.report(value)``
            of a running call, on the call's thread; None drops progress.
        max_message_size: results that pickle to more than this become ``BAD_RESULT``.
        """
        self.name = name
        self.max_message_size = max_message_size
        self._report = report
        # Functions that calls name by reference (Call.function), unpickled once.
        self._functions: dict[bytes, Callable[..., Any]] = {}
        # A lock (or semaphore) every call holds while its function runs, when calls of
        # this process come through more than one door (an actor's creator and the other
        # holders of its handle): ``concurrency`` then holds across all of them. None:
        # no gate (calls run as the loop that feeds them decides).
        self.gate: Any = None
        # The channel ends of the calls run here (offload.worker.channels.Ends), made
        # by make_ends (set by whatever feeds the calls) when the first end arrives;
        # with no make_ends, an end cannot be unpickled here.
        self.ends: Any = None
        self.make_ends: Callable[[], Any] | None = None

    def __repr__(self) -> str:
        progress = "progress reported" if self._report is not None else "progress dropped"
        return f"<Execution {self.name} [{len(self._functions)} functions cached | {progress}]>"

    def run(self, call: p.Call) -> p.Result:
        """Run one call and build its Result, with ``elapsed`` set. Never raises."""
        started = _clock()
        call_id = call.call_id
        # Channel ends among the arguments bind to this call as they are unpickled.
        _current.call_id = call_id
        _current.execution = self
        try:
            if call.kind == p.BY_NAME:
                from offload.tasks import lookup

                task = lookup(call.target)
                if task is None:
                    return p.Result(
                        call_id=call_id,
                        status=p.UNKNOWN_TASK,
                        elapsed=_clock() - started,
                        type_name=call.target,
                    )
                args, kwargs = loads(call.payload, call.buffers)
                fn: Callable[..., Any] = task
            elif call.function:
                fn = self._function(call.function)
                args, kwargs = loads(call.payload, call.buffers)
            else:
                fn, args, kwargs = loads(call.payload, call.buffers)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in __reduce__ included
            if self.ends is not None:
                self.ends.call_ended(self.ends.current_key())
            return p.Result(
                call_id=call_id,
                status=p.BAD_ARGUMENT,
                elapsed=_clock() - started,
                type_name=type_name(exc),
                message=f"the call's arguments could not be unpickled in the worker: "
                f"{type_name(exc)}: {exc}",
                traceback=_format(exc),
            )
        _current.report = self._report
        gate = self.gate  # read once: it may be installed while this call runs
        if gate is not None:
            gate.acquire()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the task's exception, whatever it is
            return _raised(call_id, exc, started)
        finally:
            if gate is not None:
                gate.release()
            _current.report = None
            del args, kwargs, fn
            if self.ends is not None:  # its items go before its result
                self.ends.call_ended(self.ends.current_key())
            flush_stdio()
        return self._result(call_id, value, started)

    def _function(self, reference: bytes) -> Callable[..., Any]:
        fn = self._functions.get(reference)
        if fn is None:
            fn = loads(reference)
            if len(self._functions) >= _MAX_FUNCTIONS:
                self._functions.clear()
            self._functions[reference] = fn
        return fn

    def _result(self, call_id: int, value: Any, started: float) -> p.Result:
        try:
            data, buffers = dumps(value)
        except BaseException as exc:  # noqa: BLE001
            return p.Result(
                call_id=call_id,
                status=p.BAD_RESULT,
                elapsed=_clock() - started,
                type_name=type_name(value),
                message=f"the result of type {type_name(value)} could not be pickled: "
                f"{type_name(exc)}: {exc}",
                traceback=_format(exc),
            )
        size = len(data) + sum(8 + b.nbytes for b in buffers) if buffers else len(data)
        if size + _RESULT_OVERHEAD > self.max_message_size:
            return p.Result(
                call_id=call_id,
                status=p.BAD_RESULT,
                elapsed=_clock() - started,
                type_name=type_name(value),
                message=f"the result ({type_name(value)}, {size} bytes pickled) exceeds "
                f"max_message_size ({self.max_message_size} bytes)",
            )
        return p.Result(
            call_id=call_id,
            status=p.OK,
            elapsed=_clock() - started,
            payload=data,
            buffers=tuple(buffers) if buffers else (),
        )


def _raised(call_id: int, exc: BaseException, started: float) -> p.Result:
    tb = _format(exc, skip=1)  # the first frame is Execution.run's
    try:
        data, buffers = dumps(exc)
        loads(data, buffers)  # an exception that cannot be rebuilt travels as text
    except BaseException:  # noqa: BLE001
        data, buffers = b"", []
    return p.Result(
        call_id=call_id,
        status=p.RAISED,
        elapsed=_clock() - started,
        type_name=type_name(exc),
        message=_safe_str(exc),
        traceback=tb,
        payload=data,
        buffers=tuple(buffers),
    )


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001
        return f"<unprintable {type_name(exc)}>"


def _format(exc: BaseException, skip: int = 0) -> str:
    import traceback

    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001
        return f"{type_name(exc)}: <traceback unavailable>"


def flush_stdio() -> None:
    """Flush what the call printed, so it comes out before its result is back."""
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):  # None, closed or broken
        pass
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
