"""The process-wide I/O loop: one daemon thread, ``offload-io``, that waits on sockets,
pipes and process handles (pidfds), and runs timers.

Why one thread: every worker connection, stderr pipe and exit notification of the
process is multiplexed here, so a pool of 64 workers costs one thread, not 192. Callbacks
run on the loop thread and must not block; blocking work (waiting for a result) happens
in the caller's thread.

Worker processes are also started from this thread (:meth:`Loop.run_sync`): on Linux a
child's parent-death signal fires when the *thread* that forked it exits, so children
must be forked by a thread that lives as long as the process.

Busy polling: a process whose job is relaying messages (a worker server) may set
:attr:`Loop.busy_poll`. Before the loop blocks, it asks that hook how long to keep
polling without blocking; the next message is then handled without a wake-up. On a
virtual machine, waking a thread on a halted CPU costs tens of microseconds, and a relay
pays that twice per call.

Code that may run while its own thread holds a lock, such as a finalizer (the garbage
collector runs them during any allocation, possibly inside the engine or the loop
itself), hands work over with :meth:`Loop.call_soon_from_anywhere`, which takes no lock.

The clock is injectable (``Loop(clock=...)``) for tests of timer logic.
"""

from __future__ import annotations

import _heapq as heapq  # not heapq.py (see offload.client.scheduler)
import itertools
import logging
import os
import select
import selectors
import threading
import time
from _queue import SimpleQueue  # not queue's: its module costs a fresh program ~1 ms
from collections import deque
from collections.abc import Callable

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")

log = logging.getLogger("offload")


class Timer:
    """A scheduled callback; :meth:`cancel` stops it from running."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run this timer (idempotent, callable from any thread)."""
        self.cancelled = True


class Loop:
    """A selector loop on its own daemon thread.

    Args:
        clock: a monotonic clock in seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        # epoll lets another thread pause an fd cheaply (see suspend_reader).
        self._epoll: Any = getattr(self._selector, "_selector", None)
        if not isinstance(self._selector, getattr(selectors, "EpollSelector", ())):
            self._epoll = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._woken = False
        # Filled by call_soon_from_anywhere, which takes no lock (SimpleQueue.put is
        # reentrant); drained once per loop iteration.
        self._deferred: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = SimpleQueue()
        # Seconds to poll without blocking before each wait (see the module docstring);
        # read on every loop iteration, so it may change (or be unset) at any time.
        self.busy_poll: Callable[[], float] | None = None
        self._thread = threading.Thread(target=self._run, name="offload-io", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        with self._lock:
            ready, timers = len(self._ready), len(self._timers)
        watched = len(self._selector.get_map()) - 1  # less the wake-up pipe
        alive = "running" if self._thread.is_alive() else "stopped"
        return (
            f"<Loop {self._thread.name} {alive} fds={watched} ready={ready} timers={timers}"
            f"{' busy-poll' if self.busy_poll is not None else ''}>"
        )

    # -- scheduling ----------------------------------------------------------------------

    def in_loop(self) -> bool:
        """Whether the caller runs on the loop thread."""
        return threading.current_thread() is self._thread

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread, soon. Thread-safe."""
        with self._lock:
            self._ready.append((callback, args))
            wake = not self._woken and not self.in_loop()
            self._woken = self._woken or wake
        if wake:
            self._wake()

    def call_soon_from_anywhere(self, callback: Callable[..., Any], *args: Any) -> None:
        """:meth:`call_soon` for code that may run while its own thread holds some lock
        (a weakref finalizer or ``__del__``, run wherever the garbage collector runs; a
        signal handler): takes no lock at all."""
        self._deferred.put((callback, args))
        self._wake()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the loop thread at ``clock() >= when``. Thread-safe."""
        timer = Timer(when, callback, args)
        with self._lock:
            heapq.heappush(self._timers, (when, next(self._seq), timer))
            first = self._timers[0][2] is timer
            wake = first and not self._woken and not self.in_loop()
            self._woken = self._woken or wake
        if wake:
            self._wake()
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` on the loop thread after ``delay`` seconds."""
        return self.call_at(self.clock() + delay, callback, *args)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result (or raise)."""
        if self.in_loop():
            return fn(*args)
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box.append((False, exc))
            done.set()

        self.call_soon(run)
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""

        def register() -> None:
            self._selector.register(fd, selectors.EVENT_READ, callback)

        self.run_sync(register)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (call before closing it). Idempotent."""
        self.run_sync(self._unregister, fd)

    def _unregister(self, fd: int) -> None:
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def add_writer(self, fd: int, callback: Callable[[], Any]) -> int:
        """Call ``callback()`` on the loop thread whenever ``fd`` can take more output;
        returns the token for :meth:`remove_writer`. Loop thread only.

        The watch uses a duplicate of ``fd`` of its own, so it leaves a reader of the
        same fd (and :meth:`suspend_reader`) alone.
        """
        watch = os.dup(fd)
        try:
            self._selector.register(watch, selectors.EVENT_WRITE, callback)
        except BaseException:
            os.close(watch)
            raise
        return watch

    def remove_writer(self, token: int) -> None:
        """Undo :meth:`add_writer` (which returned ``token``). Any thread: from another
        one it happens soon on the loop thread."""

        def unregister() -> None:
            self._unregister(token)
            os.close(token)

        if self.in_loop():
            unregister()
        else:
            self.call_soon(unregister)

    def suspend_reader(self, fd: int) -> bool:
        """Stop waking for ``fd`` without unregistering it. Any thread; cheap (one
        ``epoll_ctl``). Returns False where the platform cannot do this (then the caller
        must leave reading to the loop).

        A callback already under way may still run once: callbacks that share their fd
        with other threads must take the fd's own read lock.
        """
        epoll = self._epoll
        if epoll is None:
            return False
        try:
            epoll.modify(fd, 0)
        except OSError:
            return False
        return True

    def resume_reader(self, fd: int) -> None:
        """Undo :meth:`suspend_reader`."""
        epoll = self._epoll
        if epoll is not None:
            try:
                epoll.modify(fd, select.EPOLLIN)
            except OSError:
                pass

    def owned_fds(self) -> set[int]:
        """The file descriptors the loop itself keeps open for its lifetime."""
        fds = {self._wake_r, self._wake_w}
        fileno = getattr(self._selector, "fileno", None)
        if fileno is not None:
            fds.add(fileno())
        return fds

    # -- the loop ------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        while True:
            timeout: float | None = None
            with self._lock:
                if self._ready:
                    timeout = 0.0
                elif self._timers:
                    # Capped: a far-away timer must not overflow the poll timeout.
                    timeout = min(3600.0, max(0.0, self._timers[0][0] - self.clock()))
            events = None
            busy_poll = self.busy_poll
            if busy_poll is not None and timeout != 0.0:
                spin = busy_poll()
                if spin > 0.0:
                    if timeout is not None:
                        spin = min(spin, timeout)
                    events = self._spin(spin)
                    if not events and timeout is not None:
                        timeout = max(0.0, timeout - spin)
            if not events:
                events = self._selector.select(timeout)
            for key, _ in events:
                if key.data is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                self._invoke(key.data, ())
            now = self.clock()
            with self._lock:
                self._woken = False
                due: list[Timer] = []
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
                ready = list(self._ready)
                self._ready.clear()
            for timer in due:
                if not timer.cancelled:
                    self._invoke(timer.callback, timer.args)
            for callback, args in ready:
                self._invoke(callback, args)
            deferred = self._deferred
            while not deferred.empty():
                callback, args = deferred.get()
                self._invoke(callback, args)

    def _spin(self, seconds: float) -> list[tuple[selectors.SelectorKey, int]]:
        """Poll without blocking for up to ``seconds``; the events, or [] if none came."""
        select = self._selector.select
        end = time.perf_counter() + seconds
        while True:
            events = select(0)
            if events or time.perf_counter() >= end:
                return events

    @staticmethod
    def _invoke(callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("offload: an I/O loop callback failed")


_loop: Loop | None = None
_loop_lock = threading.Lock()


def get_loop() -> Loop:
    """The process-wide loop, started on first use."""
    global _loop
    loop = _loop
    if loop is None:
        with _loop_lock:
            if _loop is None:
                _loop = Loop()
            loop = _loop
    return loop


def on_loop_thread() -> bool:
    """Whether the caller runs on the process-wide loop's thread (never starts it)."""
    loop = _loop
    return loop is not None and loop.in_loop()


_long_lived: set[int] = set()


def keep_open(fd: int, keep: bool = True) -> None:
    """Declare ``fd`` part of offload's process-wide machinery (a forkserver's control
    socket): it lives as long as the process, like the loop's own fds."""
    if keep:
        _long_lived.add(fd)
    else:
        _long_lived.discard(fd)


def owned_fds() -> set[int]:
    """The fds of offload's process-wide machinery: the loop's (once started) and those
    declared with :func:`keep_open`. For leak checks in tests."""
    fds = set(_long_lived)
    if _loop is not None:
        fds |= _loop.owned_fds()
    return fds


def _after_fork_in_child() -> None:
    # The loop thread does not exist in a forked child; start afresh on first use.
    global _loop, _loop_lock
    _loop = None
    _loop_lock = threading.Lock()
    _long_lived.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
