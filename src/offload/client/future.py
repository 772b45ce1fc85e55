"""``offload.Future``: a ``concurrent.futures.Future`` that can be awaited, polled with
:meth:`Future.status`, killed, and watched for progress.

Status values are frozen dataclasses for use with ``match``::

    match fut.status():
        case offload.Success(value): ...
        case offload.Raised(exc): ...          # the task raised
        case offload.Failed(error): ...        # an offload.ExecutionError
        case offload.Working() | offload.Cancelled(): ...
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import sys
import threading
from collections.abc import Callable, Generator, Iterable, Iterator

from offload.client.waiting import (
    FINAL_CONDITION,
    NO_WAITERS,
    InContext,
    Waiters,
    await_future,
    batched_handover,
    deliver_on_loop,
    from_asyncio,
    make_cancelled_error,
    running_loop,
)
from offload.errors import ExecutionError
from offload.transport.channel import in_dispatch

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    import asyncio
    import contextvars
    from typing import Any, Protocol, TypeVar

    from offload.client.status import Status

    T = TypeVar("T")
else:
    Protocol = object  # the protocols below are for type checkers only
log = logging.getLogger("offload")
_progress_lock = threading.Lock()  # guards every future's progress-callback list
_condition_lock = threading.Lock()  # makes each future's Condition exactly once
_NONE: tuple[Any, ...] = ()


# Waiting for a future that is not done in time raises the builtin TimeoutError on every
# Python version, as the docstrings promise. From 3.11 on, concurrent.futures raises it
# itself; before, its TimeoutError is a class of its own that an ``except TimeoutError``
# misses, so there a wait that timed out raises WaitTimeout, which is both.
_TIMEOUT_IS_BUILTIN = sys.version_info >= (3, 11)
if sys.version_info >= (3, 11):
    WaitTimeout = TimeoutError
else:

    class WaitTimeout(concurrent.futures.TimeoutError, TimeoutError):
        """Python 3.10: a wait for a future timed out. Both the builtin ``TimeoutError``
        and ``concurrent.futures.TimeoutError`` catch it (they are one class from 3.11)."""


def as_completed(
    fs: Iterable[concurrent.futures.Future[T]], timeout: float | None = None
) -> Iterator[concurrent.futures.Future[T]]:
    """``concurrent.futures.as_completed``, raising the builtin ``TimeoutError`` on every
    Python version.

    From Python 3.11 on this *is* ``concurrent.futures.as_completed``. On 3.10 the
    standard one raises ``concurrent.futures.TimeoutError``, which ``except
    TimeoutError`` does not catch; this one raises an error both catch.

    Raises:
        TimeoutError: ``timeout`` seconds passed before every future was done (the
            calls go on).
    """
    if _TIMEOUT_IS_BUILTIN:
        return concurrent.futures.as_completed(fs, timeout)
    return _as_completed_builtin_timeout(fs, timeout)


def _as_completed_builtin_timeout(
    fs: Iterable[concurrent.futures.Future[T]], timeout: float | None
) -> Iterator[concurrent.futures.Future[T]]:
    try:
        yield from concurrent.futures.as_completed(fs, timeout)
    except concurrent.futures.TimeoutError as exc:  # as_completed's own: no future's
        raise WaitTimeout(*exc.args) from None


class Reader(Protocol):
    """Where a running call's answer arrives: a waiting thread may read it there."""

    def pump(self, future: Future[Any]) -> None: ...


class CallOwner(Protocol):
    """What runs a future's call: it can drop the call or kill it."""

    def cancel(self, call_id: int) -> bool: ...
    def kill_call(self, call_id: int) -> bool: ...
    def check_owner(self) -> None: ...


class _FutureCondition(threading.Condition):
    """A ``threading.Condition`` for one future, made in a fraction of the time.

    ``Condition.__init__`` stores five bound methods of its lock on the instance; each is
    an object the garbage collector tracks, and a flood of pending futures made the
    collector a quarter of the cost of ``submit()``. Here they are plain methods that
    delegate to the (C) RLock, which is what they do anyway.
    """

    def __init__(self) -> None:  # no super().__init__(): it is what we avoid
        self._lock = threading.RLock()
        self._waiters: collections.deque[Any] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]


def _base_future_fields() -> set[str]:
    return set(vars(concurrent.futures.Future()))


_PENDING = concurrent.futures._base.PENDING
_RUNNING = concurrent.futures._base.RUNNING
_FINISHED = concurrent.futures._base.FINISHED
_CANCELLED_AND_NOTIFIED = concurrent.futures._base.CANCELLED_AND_NOTIFIED
_UNFINISHED = (_PENDING, _RUNNING)
_CANCELLED_STATES = frozenset(
    {concurrent.futures._base.CANCELLED, concurrent.futures._base.CANCELLED_AND_NOTIFIED}
)
_DONE = frozenset(
    {
        concurrent.futures._base.CANCELLED,
        concurrent.futures._base.CANCELLED_AND_NOTIFIED,
        _FINISHED,
    }
)
# Initialise futures field by field, and skip their lock where nobody can be waiting,
# only while the standard library's Future has exactly the fields we set (true from
# Python 3.8 to 3.13) and the GIL orders every thread's reads and writes; otherwise
# the standard library's code runs unchanged.
_LIGHT_INIT = (
    _base_future_fields()
    == {
        "_condition",
        "_state",
        "_result",
        "_exception",
        "_waiters",
        "_done_callbacks",
    }
    and getattr(sys, "_is_gil_enabled", lambda: True)()
)


# "T": the type variable exists for type checkers only (typing is not imported here);
# Future[int] still works at run time (concurrent.futures.Future's __class_getitem__).
class Future(concurrent.futures.Future["T"]):
    """The pending result of a call in another process. Always resolves.

    Besides everything ``concurrent.futures.Future`` offers, it can be awaited from any
    running asyncio loop, polled with :meth:`status`, stopped with :meth:`kill` and
    watched with :meth:`progress` / :meth:`add_progress_callback`.

    Done and progress callbacks run on offload's I/O thread (or on a thread that is
    reading its own result); like asyncio callbacks they must be quick and must not wait
    for other futures: hand longer work to a thread of your own. (Waiting for an
    unfinished future in a callback raises RuntimeError: it would never end.)
    """

    def __init__(self, owner: CallOwner | None = None, call_id: int = 0) -> None:
        """Made by whoever runs the call (an engine), which ``kill()`` and ``cancel()``
        ask, under the call's id there; a future without an owner is a plain one."""
        if _LIGHT_INIT:
            # concurrent.futures.Future.__init__, with a cheaper Condition (see above),
            # made on first use: a future that waits in the parent's queue has no lock.
            self._cond: threading.Condition | None = None
            self._state = _PENDING
            self._result = None
            self._exception = None
            # Empty until the lock exists: the standard library only adds waiters and
            # callbacks while holding it, and reading an empty tuple is like reading an
            # empty list (two fewer objects per pending future).
            self._waiters = _NONE  # type: ignore[assignment]
            self._done_callbacks: list[Callable[[concurrent.futures.Future[T]], object]] = _NONE  # type: ignore[assignment]
        else:
            super().__init__()
        # Whoever runs the call (an Engine) and its id there: kill() and cancel() ask it.
        self._owner = owner
        self._call_id = call_id
        # Set while the call is on a worker: reads the worker's answer on the waiting
        # thread (see offload.transport.channel.Channel.pump).
        self._pump: Reader | None = None
        self._task_raised = False
        self._progress: Any = None
        # Made on first use: most calls never report progress, and a flood of pending
        # futures should not carry a list and a lock each.
        self._progress_callbacks: list[Callable[[Any], Any]] | None = None

    @property
    def _condition(self) -> threading.Condition:
        """The future's Condition (every ``concurrent.futures`` method takes it).

        Made on first use, with the waiter and callback lists: they are five more
        objects for the garbage collector to walk per pending future, and a flood of
        submissions keeps tens of thousands of futures pending that nobody waits on yet.
        """
        cond = self._cond
        if cond is None and self._state in _DONE:
            # Finished before anyone took its lock: its state never changes again, so
            # there is nothing to lock or notify (see offload.client.waiting). What
            # concurrent.futures.wait does to each future then costs no allocation.
            with _condition_lock:
                cond = self._cond
                if cond is None:
                    self._waiters = NO_WAITERS  # type: ignore[assignment]
                    cond = self._cond = FINAL_CONDITION
            return cond
        if cond is None:
            # Allocate before taking the module-wide lock, never while holding it: any
            # allocation may run the garbage collector, and with it a finalizer (an
            # abandoned map's generator cancelling its futures) that needs this very
            # lock on this very thread. Under the lock only existing fields change.
            new_cond = _FutureCondition()
            waiters = Waiters.of(self)  # concurrent.futures.wait's waiters may pump
            callbacks: list[Any] = []
            with _condition_lock:
                cond = self._cond
                if cond is None:
                    self._waiters = waiters
                    self._done_callbacks = callbacks
                    cond = self._cond = new_cond
        return cond

    @_condition.setter
    def _condition(self, cond: threading.Condition) -> None:
        self._cond = cond  # concurrent.futures.Future.__init__ (when it is used)

    # -- status --------------------------------------------------------------------------

    def done(self) -> bool:
        """Whether the call finished or was cancelled (never blocks)."""
        if _LIGHT_INIT:
            return self._state in _DONE  # one read: no lock needed
        return super().done()

    def cancelled(self) -> bool:
        """Whether the call was cancelled (never blocks)."""
        if _LIGHT_INIT:
            return self._state in _CANCELLED_STATES  # one read, as in done()
        return super().cancelled()

    def status(self) -> Status:
        """Where the call is now, without blocking."""
        # Imported when first asked for (dataclasses: see offload.client.status).
        from offload.client.status import Cancelled, Failed, Raised, Success, Working

        if not self.done():
            return Working()
        if self.cancelled():
            return Cancelled()
        exc = self.exception(timeout=0)
        if exc is None:
            return Success(self.result(timeout=0))
        if isinstance(exc, ExecutionError) and not self._task_raised:
            return Failed(exc)
        return Raised(exc)

    def result(self, timeout: float | None = None) -> T:
        """The call's value; raises the task's exception or an offload error.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the call goes on). The
                builtin ``TimeoutError`` on every Python version (on 3.10 it is also a
                ``concurrent.futures.TimeoutError``).
            concurrent.futures.CancelledError: the call was cancelled.
        """
        if _LIGHT_INIT and self._state == _FINISHED and self._exception is None:
            return self._result  # type: ignore[return-value]  # set before the state
        if not self.done():
            self._before_wait(timeout)
        if _TIMEOUT_IS_BUILTIN:
            return super().result(timeout)
        try:
            return super().result(timeout)
        except concurrent.futures.TimeoutError as exc:
            if exc is self._exception:
                raise  # the task's own exception, re-raised as itself
            raise WaitTimeout(*exc.args) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception the call failed with, or None if it succeeded.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the call goes on); the
                builtin one on every Python version, as for :meth:`result`.
            concurrent.futures.CancelledError: the call was cancelled.
        """
        if _LIGHT_INIT and self._state == _FINISHED:
            return self._exception  # set before the state (asyncio.gather asks twice)
        if not self.done():
            self._before_wait(timeout)
        if _TIMEOUT_IS_BUILTIN:
            return super().exception(timeout)
        try:
            return super().exception(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise WaitTimeout(*exc.args) from None

    def _before_wait(self, timeout: float | None) -> None:
        """About to wait for this future: refuse where answers are dispatched (in a
        callback), which would never deliver this one, and read the answer on this
        thread if it can."""
        if timeout != 0 and in_dispatch():
            raise RuntimeError(
                "waiting for an offload future in a done or progress callback would never "
                "end: callbacks run on the thread that delivers the answers (offload's "
                "I/O thread, or one reading its own answer); hand the wait to a thread "
                "of your own"
            )
        owner = self._owner
        if owner is not None:
            owner.check_owner()  # inherited through fork: it would never resolve here
        pump = self._pump
        if pump is not None:
            pump.pump(self)

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the call if it has not been sent to a worker yet.

        Args:
            msg: accepted for asyncio, which passes its cancellation message along
                (``asyncio.gather``'s ``cancel()``); not kept.

        Returns:
            True if the call will never run.
        """
        owner = self._owner
        if owner is not None and not self.done() and not owner.cancel(self._call_id):
            return False
        return self._cancel_now()

    def _cancel_now(self, *, force: bool = False) -> bool:
        """Cancel, and tell those waiting in ``concurrent.futures.wait`` or
        ``as_completed`` too (``concurrent.futures.Future.cancel`` leaves that to an
        executor's later ``set_running_or_notify_cancel``, which nobody calls here: they
        would wait for their timeout). ``force`` also cancels a call marked running that
        never started on its worker (one sent ahead, dropped at shutdown)."""
        with self._condition:
            state = self._state
            if state == _FINISHED:
                return False
            if state in _CANCELLED_STATES:
                return True
            if state == _RUNNING and not force:
                return False
            self._pump = None
            self._state = _CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    # -- killing -------------------------------------------------------------------------

    def kill(self) -> bool:
        """Stop the call now: cancel it if it has not started, otherwise kill its worker
        process (and process group). The future then fails with
        :class:`~offload.WorkerKilled`; a pool replaces the worker.

        Returns:
            True if the call was stopped, False if it had already finished.
        """
        if self.done():
            return False
        if self.cancel():
            return True
        owner = self._owner
        return owner.kill_call(self._call_id) if owner is not None else False

    # -- progress ------------------------------------------------------------------------

    def progress(self) -> Any:
        """The last value the task passed to ``offload.report()``, or None."""
        return self._progress

    def add_progress_callback(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(value)`` (on offload's I/O thread) for every value the task reports
        from now on."""
        with _progress_lock:
            if self._progress_callbacks is None:
                self._progress_callbacks = []
            self._progress_callbacks.append(fn)

    def _set_progress(self, value: Any) -> None:
        self._progress = value
        with _progress_lock:
            callbacks = list(self._progress_callbacks or ())
        for cb in callbacks:
            try:
                cb(value)
            except Exception:
                log.exception("offload: progress callback %r raised", cb)

    # -- asyncio -------------------------------------------------------------------------

    def add_done_callback(
        self,
        fn: Callable[[concurrent.futures.Future[T]], object],
        *,
        context: contextvars.Context | None = None,
    ) -> None:
        """Call ``fn(future)`` once the future is done (at once if it is already).

        As ``concurrent.futures.Future.add_done_callback``, except for asyncio's
        callbacks. Given a ``context`` (as asyncio gives one), or installed by asyncio
        itself (``asyncio.gather``, ``wait``, ``as_completed``...), ``fn`` runs on the
        event loop running on the calling thread, soon (never at once), in
        ``context``, as an asyncio future's callback would; with no loop running
        there, as any other callback (in ``context``). asyncio's hand-over of a
        pending future to an event loop (``loop.run_in_executor``,
        ``asyncio.wrap_future``) wakes that loop once per batch of results rather than
        once per future (see :mod:`offload.client.waiting`).
        """
        handover = batched_handover(self, fn)
        if handover is fn and (context is not None or from_asyncio(fn)):
            if deliver_on_loop(self, fn, context, super().add_done_callback):
                return
            if context is not None:
                handover = InContext(fn, context)
        super().add_done_callback(handover)

    def remove_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> int:
        """Remove every pending ``fn`` installed with :meth:`add_done_callback` (as
        ``asyncio.Future.remove_done_callback``; ``asyncio.wait`` and ``as_completed``
        remove theirs).

        Returns:
            How many were removed (0 once the future is done: its callbacks have run).
        """
        if self.done():
            return 0
        with self._condition:
            if self._state in _DONE:  # resolved meanwhile: its callbacks are running
                return 0
            callbacks = self._done_callbacks
            kept = [cb for cb in callbacks if cb != fn and getattr(cb, "fn", None) != fn]
            removed = len(callbacks) - len(kept)
            if removed:
                callbacks[:] = kept
        return removed

    # asyncio's view of a future. A done offload future, looked at on a thread running
    # an event loop, is an asyncio future of that loop (asyncio.isfuture): asyncio.gather,
    # asyncio.wait, wrap_future and the like use it as it is, without a task or an
    # asyncio future of their own for each. A pending one is not: asyncio wraps it in a
    # task, whose cancellation stops the waiting at once while the call, if it runs
    # already, goes on (asyncio assumes that a future which refuses cancel() is done; a
    # running call refuses, and asyncio would then wait for the call to end: a timeout
    # would not fire). Nor is one looked at with no loop running (before
    # loop.run_until_complete(fut), say): no loop is the one it would belong to, and
    # asyncio refuses a future of another loop than the one it was given.
    _cancel_message = None  # asyncio.gather reads it from a cancelled child

    @property
    def _asyncio_future_blocking(self) -> bool | None:
        """False (an asyncio future, not waited on) once done, on a thread running an
        event loop; None otherwise."""
        return False if self.done() and running_loop() is not None else None

    @_asyncio_future_blocking.setter
    def _asyncio_future_blocking(self, value: bool) -> None:
        pass  # set by a task on a future it waits on: an offload future never is one

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop of the calling thread (asyncio asks its futures for theirs; an
        offload future belongs to no loop: any running loop can await it).

        Raises:
            RuntimeError: no event loop here (as ``asyncio.get_event_loop``).
        """
        loop = running_loop()
        if loop is not None:
            return loop
        import asyncio

        return asyncio.get_event_loop()

    def _make_cancelled_error(self) -> BaseException:
        return make_cancelled_error()  # asyncio.gather asks a cancelled child for it

    def __await__(self) -> Generator[Any, None, T]:
        # Wakes the event loop once per batch of results, not once per future (see
        # offload.client.waiting); asyncio is imported there, when first awaited.
        return await_future(self)

    # -- resolution (used by the client) -------------------------------------------------

    def _resolve_exception(self, exc: BaseException, *, task_raised: bool) -> bool:
        """Fail the future unless it is already resolved; True if this call did it."""
        self._pump = None  # a resolved future keeps no worker alive
        with self._condition:
            if self.done():
                return False
            self._task_raised = task_raised
        try:
            self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            return False
        return True

    def _set_reader(self, reader: Reader) -> None:
        """While the call is on a worker: ``reader`` reads its answer on a waiting
        thread (see :meth:`_before_wait`)."""
        self._pump = reader

    def _set_running(self) -> bool:
        """``set_running_or_notify_cancel()``, without making the lock if nobody has
        touched it (the client calls this under its own lock, which cancel() takes too,
        so the future is PENDING then)."""
        if _LIGHT_INIT and self._cond is None and self._state == _PENDING:
            self._state = _RUNNING  # waiters are told of results, never of running
            return True
        return self.set_running_or_notify_cancel()

    def _resolve_value(self, value: Any) -> bool:
        self._pump = None
        if _LIGHT_INIT and self._cond is None and self._state in _UNFINISHED:
            # Nobody has taken this future's lock, so nobody waits on it and it has no
            # callbacks. Publish the result, then look again: a thread that makes the
            # lock from now on finds the future finished (the GIL orders these steps);
            # one that made it in between gets the usual notification below. (PENDING
            # too: a call sent ahead is answered before it was ever marked running, and
            # nobody can cancel it meanwhile: the engine dropped it before delivering.)
            self._result = value
            self._state = _FINISHED
            if self._cond is None:
                return True
            with self._condition:
                for waiter in self._waiters:
                    waiter.add_result(self)
                self._condition.notify_all()
            self._invoke_callbacks()
            return True
        try:
            self.set_result(value)
        except concurrent.futures.InvalidStateError:
            return False
        return True

    def __repr__(self) -> str:
        state = type(self.status()).__name__
        return f"<offload.Future at {id(self):#x} state={state}>"
