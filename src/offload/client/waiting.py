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

* **An idle event loop reads the answer itself.** A single awaited call would cost one
  hand-off (the I/O thread reads the answer, then wakes the loop's thread). When the
  loop has nothing else to do (:func:`_idle`: no callback ready, no timer due within the
  pump's window, no descriptor ready), ``await`` reads the answer on the loop's thread
  as ``result()`` does (``Channel.pump``, at most :data:`PUMP_WINDOW`), and for
  ``run_in_executor`` the inbox does the same once the loop has run what was ready
  (:meth:`_Inbox.watch`). A descriptor that becomes ready meanwhile waits that long at
  most. (Watching a duplicate of the worker's socket with ``loop.add_reader`` instead
  was tried: setting it up and tearing it down per call cost what it saved.)

* **asyncio takes a done offload future as one of its own.** ``asyncio.isfuture`` is
  true of a done future (``Future._asyncio_future_blocking``), so ``asyncio.gather``,
  ``wait_for``, ``shield`` and ``wrap_future`` use it as it is instead of making a task
  per future (most of a flood's futures are done by the time they are gathered). A
  pending future is not one: asyncio wraps it in a task. It could not be, as asyncio
  assumes that a future whose ``cancel()`` returns False is done, and an offload
  future refuses once its call runs (``cancel()`` as the SPEC has it): a cancelled
  gather or a timeout would then wait for the call to end, where a task stops waiting
  at once. Callbacks that asyncio installs (``gather``'s, ``wait``'s, ``as_completed``'s;
  any given a ``context``) run on the loop that was running where they were installed,
  never at once and never on the I/O thread (:func:`deliver_on_loop`, :class:`_OnLoop`,
  through the inbox); ``asyncio.wait``, which from 3.11 on installs its callback on the
  futures themselves, depends on it.
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


# How long a reader may hold the thread that waits (offload.client.slot.PUMP_WINDOW; not
# imported from there: slot imports the future, which imports this module). An event
# loop with a timer due sooner does not read answers itself.
PUMP_WINDOW = 0.002

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
    """What resolved for one asyncio loop: delivered together, by one callback on that
    loop, however many futures resolved meanwhile."""

    __slots__ = ("_lock", "_ready", "_watched", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the inbox is the value of its loop's entry in _inboxes.
        self.loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._ready: list[_Wake | _OnLoop] = []
        # The last future handed over on the loop's thread, until the loop looks at it
        # (see watch); touched on the loop's thread only.
        self._watched: Future | None = None

    def watch(self, future: Future) -> None:
        """On the loop's thread: once the loop has run what is ready, read ``future``'s
        answer there if the loop has nothing else to do (see :func:`_idle`), rather than
        sleep until the I/O thread wakes it. One look per batch of hand-overs."""
        if self._watched is None:
            loop = self.loop()
            if loop is not None:
                loop.call_soon(self._pump_if_idle)
        self._watched = future

    def _pump_if_idle(self) -> None:
        future, self._watched = self._watched, None
        loop = self.loop()
        if future is not None and loop is not None and not future.done():
            reader = future._pump
            if reader is not None and _idle(loop) and not in_dispatch() and _owned_here(future):
                reader.pump(future)
                self._drain()  # what it resolved, now rather than on the next turn

    def add(self, entry: _Wake | _OnLoop) -> None:
        """Deliver ``entry`` on the loop, soon (from any thread)."""
        loop = self.loop()
        with self._lock:
            if loop is None or loop.is_closed():
                self._ready.clear()  # nobody awaits there any more
                return
            self._ready.append(entry)
            first = len(self._ready) == 1
        if first:
            try:
                if running_loop() is loop:  # read on the loop's thread (watch)
                    loop.call_soon(self._drain)  # no wake-up needed: it runs already
                else:
                    loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # closed meanwhile
                with self._lock:
                    self._ready.clear()

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for entry in ready:
            entry.deliver()


class _Wake:
    """A done callback: hand the resolved future over to its loop's inbox, which then
    resolves ``waiter`` (an asyncio future of that loop) with ``source``'s outcome, or
    with None (it only wakes an awaiting task)."""

    __slots__ = ("inbox", "source", "waiter")

    def __init__(
        self, inbox: _Inbox, waiter: asyncio.Future[Any], source: Future | None = None
    ) -> None:
        self.inbox = inbox
        self.waiter = waiter
        self.source = source

    def __call__(self, _: object) -> None:
        self.inbox.add(self)

    def deliver(self) -> None:
        """On the loop: resolve the waiter."""
        waiter, source = self.waiter, self.source
        self.source = None  # the future holds this callback: no cycle left behind
        if waiter.done():  # cancelled meanwhile: it stays so
            return
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


class _OnLoop:
    """A done callback that asyncio installed (or one given a ``context``) while its
    loop ran on this thread: it runs on that loop, as asyncio's callbacks do, delivered
    through the loop's inbox with the others of its batch."""

    __slots__ = ("context", "fn", "inbox", "source")

    def __init__(self, inbox: _Inbox, fn: Callable[[Any], object], context: Any) -> None:
        self.inbox = inbox
        self.fn = fn
        self.context = context
        self.source: Any = None

    def __call__(self, future: object) -> None:
        # Kept from now until delivered only: the future holds this callback, and a
        # cycle would keep both (and the result) until the garbage collector runs.
        self.source = future
        self.inbox.add(self)

    def deliver(self) -> None:
        """On the loop: ``fn(future)``, in its context; what it raises goes to the loop's
        exception handler, as for any asyncio callback."""
        future, self.source = self.source, None
        try:
            if self.context is None:
                self.fn(future)
            else:
                self.context.run(self.fn, future)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - reported as asyncio's Handle does
            loop = self.inbox.loop()
            if loop is not None:
                loop.call_exception_handler(
                    {"message": f"Exception in callback {self.fn!r}", "exception": exc}
                )


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
    inbox = _inbox(loop)
    if running_loop() is loop:  # loop.run_in_executor, on the loop's thread
        inbox.watch(future)
    return _Wake(inbox, waiter, future)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running on this thread, or None (asyncio's, if it is imported)."""
    asyncio = sys.modules.get("asyncio")
    return asyncio._get_running_loop() if asyncio is not None else None


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


def from_asyncio(fn: Callable[[Any], object]) -> bool:
    """Whether ``fn`` is one of asyncio's own callbacks (``gather``'s, ``wait``'s,
    ``shield``'s...): a function, bound method or partial of the asyncio package."""
    target = getattr(fn, "func", fn)  # functools.partial: asyncio.wait_for's waiter
    module = getattr(target, "__module__", None)
    return isinstance(module, str) and (module == "asyncio" or module.startswith("asyncio."))


def deliver_on_loop(
    future: Future, fn: Callable[[Any], object], context: Any, add: Callable[[Any], None]
) -> bool:
    """Call ``fn(future)`` as an asyncio future would: on the event loop running on this
    thread, never at once (asyncio's callers count on that: ``gather`` registers its
    callback before the future that it completes exists), in ``context``.

    ``add`` installs a done callback the ``concurrent.futures`` way. False if no loop
    runs on this thread; then nothing was done.
    """
    loop = running_loop()
    if loop is None:
        return False
    if future.done():
        loop.call_soon(fn, future, context=context)
    else:
        add(_OnLoop(_inbox(loop), fn, context))
    return True


class InContext:
    """``fn(future)`` run in ``context`` (a ``contextvars.Context``): a callback given a
    context with no event loop running where it was installed."""

    __slots__ = ("context", "fn")

    def __init__(self, fn: Callable[[Any], object], context: Any) -> None:
        self.fn = fn
        self.context = context

    def __call__(self, future: object) -> None:
        self.context.run(self.fn, future)


def make_cancelled_error() -> BaseException:
    """``asyncio.Future._make_cancelled_error`` for an offload future (asyncio's
    ``gather`` asks a cancelled child for it)."""
    import asyncio

    return asyncio.CancelledError()


def await_future(future: Future) -> Generator[Any, None, Any]:
    """``Future.__await__``: the value, or the exception, of ``future`` in a coroutine.

    A loop with nothing else to do reads the answer itself first (see :func:`_idle`);
    otherwise the task waits on an asyncio future of its loop, woken through the inbox.
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
        reader = future._pump
        if reader is not None and _idle(loop) and not in_dispatch() and _owned_here(future):
            # The loop has nothing else to do now: read the answer here, as result()
            # does, rather than sleep until the I/O thread wakes the loop.
            reader.pump(future)
    if not future.done():
        waiter: asyncio.Future[None] = loop.create_future()
        future.add_done_callback(_Wake(_inbox(loop), waiter))
        try:
            yield from waiter.__await__()
        except asyncio.CancelledError:
            future.cancel()
            raise
    return _outcome(future, asyncio)


def _idle(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` has nothing to run now, nor within the window of a pump: no
    callback ready, no timer due, no descriptor ready. Only asyncio's own loops say
    (others, uvloop's among them, are never idle here)."""
    ready = getattr(loop, "_ready", None)
    scheduled = getattr(loop, "_scheduled", None)
    selector = getattr(loop, "_selector", None)
    if ready or ready is None or scheduled is None or selector is None:
        return False
    if scheduled and scheduled[0].when() < loop.time() + PUMP_WINDOW:
        return False
    return not selector.select(0)


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
