"""Waiting for offload futures in the ways besides ``result()``: ``concurrent.futures``'
``wait`` and ``as_completed``, ``await``, and the shared machinery that keeps each as
cheap as ``result()``.

``result()`` is fast because the waiting thread reads the worker's answer itself for a
moment (``Channel.pump``) instead of being woken by the I/O thread once that thread has
read it: a thread hand-off costs more than the rest of a small call's round trip. The
other ways of waiting get the same, or at least one hand-off per batch instead of one
per future:

* **A future done before anyone took its lock** (most of a flood's futures, resolved by
  the I/O thread while the caller was still submitting) never gets a lock of its own:
  its state will never change again, so :data:`FINAL_CONDITION`, a condition that locks
  nothing, stands in for it, and :data:`NO_WAITERS` for its waiter list.
  ``concurrent.futures.wait`` and ``as_completed`` take every future's lock and install
  their waiter on each: for a finished future that is now a few method calls.

* **``wait`` and ``as_completed`` pump.** They wait on a ``threading.Event`` of their
  waiter object, which they install on each future (``future._waiters.append``). A
  pending future's waiter list is a :class:`Waiters`, which turns that event into a
  :class:`PumpingEvent` (in place) that knows the pending futures. When it then waits
  for a single pending future (one call; the last of several) whose answer can be read
  on the waiting thread, it reads the answer itself as ``result()`` does, and the
  future's resolution sets the event on the same thread. With several futures still
  pending it waits as before (it cannot read several workers at once, and reading one
  would delay noticing another).

* **``await`` wakes its event loop once per batch.** ``asyncio.wrap_future`` hands each
  result over with its own ``call_soon_threadsafe`` (a write to the loop's self-pipe,
  and a wake-up of the loop, per future). :func:`await_future` instead files the awaiting
  task's waiter in its loop's :class:`_Inbox`; the first future of a batch to resolve
  schedules one drain, which wakes every waiter filed by then. A future already done is
  not waited for at all. asyncio's own hand-over (``asyncio.wrap_future``, which
  ``loop.run_in_executor`` uses) is recognised when it is installed as a done callback
  and goes through the same inbox (:func:`batched_handover`).

  A single awaited call still costs one hand-off (the I/O thread reads the answer, the
  event loop's thread is woken). Reading the worker's socket from the event loop instead
  (a duplicate of its descriptor watched with ``loop.add_reader`` while the I/O thread
  stops watching it) was tried: the loop's thread then read most answers itself, but
  setting that up and tearing it down per call cost what it saved.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Generator, Iterator

from offload.transport.channel import in_dispatch

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    import asyncio
    from typing import Any, Protocol

    class Future(Protocol):
        """What waiting needs of an ``offload.Future`` (described here, not imported:
        ``offload.client.future`` imports this module)."""

        _state: str
        _pump: Any  # offload.client.future.Reader | None
        _owner: Any  # offload.client.future.CallOwner | None
        _result: Any
        _exception: BaseException | None

        def done(self) -> bool: ...
        def cancelled(self) -> bool: ...
        def cancel(self) -> bool: ...
        def result(self, timeout: float | None = None) -> Any: ...
        def exception(self, timeout: float | None = None) -> BaseException | None: ...
        def add_done_callback(self, fn: Callable[[Any], object]) -> None: ...


_PENDING = concurrent.futures._base.PENDING
_RUNNING = concurrent.futures._base.RUNNING
_FINISHED = concurrent.futures._base.FINISHED


class _FinalCondition(threading.Condition):
    """The condition of a future that finished before anyone took its lock: its state
    never changes again, so there is nothing to lock, wait for or notify."""

    def __init__(self) -> None:  # no lock to make
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        return True  # what it would wait for has happened

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        return predicate()

    def notify(self, n: int = 1) -> None:
        pass

    def notify_all(self) -> None:
        pass

    def _is_owned(self) -> bool:
        return True


class _NoWaiters:
    """The waiter list of a finished future: a waiter installed there would never be
    told anything (the future is done already), so it is not kept."""

    __slots__ = ()

    def append(self, waiter: Any) -> None:
        pass

    def remove(self, waiter: Any) -> None:
        pass

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0


FINAL_CONDITION = _FinalCondition()
NO_WAITERS = _NoWaiters()


class Waiters(list["Any"]):  # "Any": typing is not imported at run time
    """The waiters of a pending future (``concurrent.futures`` installs its ``wait`` and
    ``as_completed`` waiters here): a waiter's event becomes a :class:`PumpingEvent`
    that knows this future."""

    __slots__ = ("future",)

    # No __init__ (a Python one would cost more than the rest of making a future's
    # lock): made empty, then given its future, weakly: a future that held its waiter
    # list that held it would be a reference cycle, freed (with its result) only when
    # the garbage collector runs.
    future: weakref.ref[Future]

    @classmethod
    def of(cls, future: Future) -> Waiters:
        """An empty waiter list of ``future``."""
        waiters = cls()
        waiters.future = weakref.ref(future)
        return waiters

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        future = self.future()
        if future is None or future._state not in (_PENDING, _RUNNING):
            return  # done already: nothing to wait for
        event = getattr(waiter, "event", None)
        if type(event) is threading.Event:
            # Installed under the locks of all the futures waited on, before the waiting
            # starts. The event becomes a PumpingEvent in place (the same fields; no
            # second event to make, nothing to copy).
            event.__class__ = PumpingEvent
            pumping: PumpingEvent = event  # type: ignore[assignment]  # its class now
            pumping._watched = collections.deque()
        elif type(event) is PumpingEvent:
            pumping = event
        else:
            return  # a waiter of some other kind: left as it is
        pumping.watch(future)


def _owned_here(future: Future) -> bool:
    """Whether this process runs ``future``'s call: a forked child that inherited it
    must not touch the parent's sockets (it waits, as for any other future)."""
    owner = future._owner
    try:
        if owner is not None:
            owner.check_owner()
    except RuntimeError:
        return False
    return True


class PumpingEvent(threading.Event):
    """The event of a ``concurrent.futures`` waiter: waiting for it with one future
    still pending reads that future's answer on the waiting thread first."""

    _watched: collections.deque[Future]  # set where a threading.Event becomes one

    def watch(self, future: Future) -> None:
        """``future``, pending, sets this event when it resolves."""
        self._watched.append(future)

    def wait(self, timeout: float | None = None) -> bool:
        """``threading.Event.wait``, reading the answer first when only one watched
        future is pending (the window of ``Channel.pump``; bounded by ``timeout``)."""
        if self.is_set() or (timeout is not None and timeout <= 0) or in_dispatch():
            return super().wait(timeout)
        future = self._only_pending()
        reader = future._pump if future is not None else None
        if future is None or reader is None or not _owned_here(future):
            return super().wait(timeout)
        started = time.monotonic()
        reader.pump(future)
        if timeout is not None:
            timeout = max(0.0, timeout - (time.monotonic() - started))
        return super().wait(timeout)

    def _only_pending(self) -> Future | None:
        """The one watched future still pending, or None (none, or several)."""
        watched = self._watched
        while watched and watched[0].done():
            watched.popleft()
        while watched and watched[-1].done():
            watched.pop()
        return watched[0] if len(watched) == 1 else None


# -- asyncio -----------------------------------------------------------------------------


class _Inbox:
    """What resolved for one asyncio loop: woken together, by one callback on that loop,
    however many futures resolved meanwhile."""

    __slots__ = ("_lock", "_ready", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the inbox is the value of its loop's entry in _inboxes.
        self.loop = weakref.ref(loop)
        self._lock = threading.Lock()
        # (an asyncio future of the loop, the offload future whose state it gets, or
        # None: it only wakes an awaiting task)
        self._ready: list[tuple[asyncio.Future[Any], Future | None]] = []

    def add(self, waiter: asyncio.Future[Any], source: Future | None = None) -> None:
        """Resolve ``waiter`` on its loop, soon (any thread): with ``source``'s outcome,
        or with None."""
        loop = self.loop()
        with self._lock:
            if loop is None or loop.is_closed():
                self._ready.clear()  # nobody awaits there any more
                return
            self._ready.append((waiter, source))
            first = len(self._ready) == 1
        if first:
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # closed meanwhile
                with self._lock:
                    self._ready.clear()

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for waiter, source in ready:
            if waiter.done():  # cancelled meanwhile: it stays so
                continue
            if source is None:
                waiter.set_result(None)
            elif source.cancelled():
                waiter.cancel()
            else:
                exc = source.exception(timeout=0)
                if exc is None:
                    waiter.set_result(source.result(timeout=0))
                else:
                    waiter.set_exception(_asyncio_error(exc))


class _Wake:
    """A done callback: hand the resolved future over to its loop's inbox."""

    __slots__ = ("inbox", "source", "waiter")

    def __init__(
        self, inbox: _Inbox, waiter: asyncio.Future[Any], source: Future | None = None
    ) -> None:
        self.inbox = inbox
        self.waiter = waiter
        self.source = source

    def __call__(self, _: object) -> None:
        self.inbox.add(self.waiter, self.source)


def batched_handover(future: Future, fn: Callable[[Any], object]) -> Callable[[Any], object]:
    """The done callback to install for ``fn``: ``fn`` itself, unless it is asyncio's
    hand-over of ``future`` to an asyncio future (``asyncio.wrap_future``, which
    ``loop.run_in_executor`` uses): that one wakes the loop once per future, so the
    same hand-over goes through the loop's inbox instead, once per batch.

    asyncio's hand-over is a closure of ``asyncio.futures._chain_future``; it is
    recognised by name and by the variables it closes over (learned once), and left
    alone should an asyncio version make it differently.
    """
    layout = _layout
    code = getattr(fn, "__code__", None)
    if layout is None or code is not layout[0]:
        if getattr(fn, "__qualname__", "") != _HANDOVER:
            return fn
        layout = _learn(fn)
        if layout is None:
            return fn
    _, destination, dest_loop, source_loop = layout
    closure: Any = getattr(fn, "__closure__", None)
    try:
        loop = closure[dest_loop].cell_contents
        if loop is None or closure[source_loop].cell_contents is not None:
            return fn  # not an asyncio future of another loop: nothing to batch
        waiter = closure[destination].cell_contents
    except (ValueError, IndexError, TypeError):  # another layout after all
        return fn
    return _Wake(_inbox(loop), waiter, future)


_HANDOVER = "_chain_future.<locals>._call_set_state"
# asyncio's hand-over code, and where its closure holds the destination future, the
# destination's loop and the source's loop (None for a concurrent.futures source).
_layout: tuple[types.CodeType, int, int, int] | None = None


def _learn(fn: Any) -> tuple[types.CodeType, int, int, int] | None:
    global _layout
    code = getattr(fn, "__code__", None)
    if getattr(fn, "__module__", "") != "asyncio.futures" or not isinstance(code, types.CodeType):
        return None
    names = code.co_freevars
    if not {"destination", "dest_loop", "source_loop"} <= set(names):
        return None
    _layout = (
        code,
        names.index("destination"),
        names.index("dest_loop"),
        names.index("source_loop"),
    )
    return _layout


_inboxes: weakref.WeakKeyDictionary[Any, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()
_last_inbox: _Inbox | None = None  # the inbox looked up last (one loop, usually)


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    global _last_inbox
    inbox = _last_inbox
    if inbox is not None and inbox.loop() is loop:
        return inbox
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.get(loop)
            if inbox is None:
                inbox = _inboxes[loop] = _Inbox(loop)
    _last_inbox = inbox
    return inbox


def await_future(future: Future) -> Generator[Any, None, Any]:
    """``Future.__await__``: the value, or the exception, of ``future`` in a coroutine.

    Cancelling the awaiting task cancels the call if it has not started (as with
    ``asyncio.wrap_future``); a call cancelled elsewhere raises
    ``asyncio.CancelledError`` in the awaiting task.
    """
    # Imported here, not at the top: only code that awaits needs asyncio (and has it).
    import asyncio

    if not future.done():
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # iterated by hand, outside a loop: the standard way
            wrapped: asyncio.Future[Any] = asyncio.wrap_future(future)  # type: ignore[arg-type]
            return (yield from wrapped.__await__())
        waiter: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(_Wake(_inbox(loop), waiter))
        try:
            yield from waiter.__await__()
        except asyncio.CancelledError:
            future.cancel()
            raise
    return _outcome(future, asyncio)


def _outcome(future: Future, asyncio: Any) -> Any:
    """What awaiting the done ``future`` gives, as ``asyncio.wrap_future`` would."""
    if future._state == _FINISHED and future._exception is None:
        return future._result  # set before the state
    if future.cancelled():
        raise asyncio.CancelledError()
    exc = future.exception(timeout=0)
    if exc is None:
        return future.result(timeout=0)
    raise _asyncio_error(exc)


def _asyncio_error(exc: BaseException) -> BaseException:
    """asyncio's own classes for concurrent.futures' (as in asyncio's ``wrap_future``)."""
    import asyncio

    kind = type(exc)
    if kind is concurrent.futures.CancelledError:
        return asyncio.CancelledError(*exc.args).with_traceback(exc.__traceback__)
    if kind is concurrent.futures.InvalidStateError:
        return asyncio.InvalidStateError(*exc.args).with_traceback(exc.__traceback__)
    if sys.version_info < (3, 11) and kind is concurrent.futures.TimeoutError:
        return asyncio.TimeoutError(*exc.args).with_traceback(exc.__traceback__)
    return exc
