"""Crash helpers for the crash-matrix and lifecycle tests (not a test module).

Workers import this module by reference (pytest puts ``tests/`` on ``sys.path`` and the
worker inherits the parent's ``sys.path``), so everything a worker must run or unpickle
lives at module level here. Modelled on loky's ``crash_cases``, written afresh:

* ``*AtPickle`` objects fail while being pickled (their ``__reduce__`` does it);
* ``*AtUnpickle`` objects pickle fine and fail while being unpickled (their
  ``__reduce__`` returns ``(crashing_function, ())``);
* ``raise_error`` / ``sys_exit`` / ``os_exit`` / ``segfault`` fail when run;
* ``return_instance(cls)`` makes a worker return one of those objects as its result.

The parent-side :class:`Fifo`, :class:`Recorder` (an ``on_failure`` callback to wait on)
and :func:`is_gone` are for synchronising with tasks and checking that processes died,
without sleeping.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psutil

EXIT_CODE = 7
ERROR_ARGS = ("crash-test", 42)
LONG = 60.0  # seconds a "long" task sleeps; every test stops it long before


# --------------------------------------------------------------------------------------- #
# Functions that fail when called (also the targets of the *AtUnpickle reducers)
# --------------------------------------------------------------------------------------- #


class CrashTestError(Exception):
    """The exception the helpers raise (picklable, travels back as itself)."""


def raise_error(*_: Any) -> None:
    raise CrashTestError(*ERROR_ARGS)


def sys_exit(*_: Any) -> None:
    sys.exit(EXIT_CODE)


def os_exit(*_: Any) -> None:
    os._exit(EXIT_CODE)


def segfault(*_: Any) -> None:
    # The worker enables faulthandler itself; make sure of it in any other process too.
    if not faulthandler.is_enabled():
        faulthandler.enable()
    ctypes.string_at(0)


# --------------------------------------------------------------------------------------- #
# Objects that fail while being pickled
# --------------------------------------------------------------------------------------- #


class ErrorAtPickle:
    def __reduce__(self) -> Any:
        raise CrashTestError("refusing to be pickled")


class ExitAtPickle:
    def __reduce__(self) -> Any:
        sys.exit(EXIT_CODE)


class OsExitAtPickle:
    def __reduce__(self) -> Any:
        os._exit(EXIT_CODE)


class SegfaultAtPickle:
    def __reduce__(self) -> Any:
        segfault()
        return None  # pragma: no cover - never reached


# --------------------------------------------------------------------------------------- #
# Objects that pickle fine and fail while being unpickled
# --------------------------------------------------------------------------------------- #


class ErrorAtUnpickle:
    def __reduce__(self) -> Any:
        return raise_error, ()


class ExitAtUnpickle:
    def __reduce__(self) -> Any:
        return sys_exit, ()


class OsExitAtUnpickle:
    def __reduce__(self) -> Any:
        return os_exit, ()


class SegfaultAtUnpickle:
    def __reduce__(self) -> Any:
        return segfault, ()


class UnpicklableError(Exception):
    """Pickles, but cannot be rebuilt: ``__init__`` needs two arguments and passes one
    to ``super()``, so unpickling calls ``UnpicklableError(a)`` and fails."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__(a)
        self.b = b


def raise_unpicklable_error(*_: Any) -> None:
    raise UnpicklableError("cannot-travel", "second")


def raise_error_with_lock(*_: Any) -> None:
    """Raise an exception that cannot even be pickled (it carries a lock)."""
    raise CrashTestError("carries a lock", threading.Lock())


# --------------------------------------------------------------------------------------- #
# Plain tasks
# --------------------------------------------------------------------------------------- #


def identity(x: Any) -> Any:
    return x


def return_instance(cls: type) -> Any:
    return cls()


def sleep(seconds: float = LONG) -> None:
    time.sleep(seconds)


def notify(path: str, text: str) -> None:
    """Write one line to ``path`` (a FIFO the test reads)."""
    with open(path, "w") as f:
        f.write(text + "\n")


def notify_and_sleep(path: str, seconds: float = LONG) -> None:
    """Tell the test (through the FIFO at ``path``) that the call is running, then sleep."""
    notify(path, str(os.getpid()))
    time.sleep(seconds)


def wait_for_file_then(path: str, action: str = "exit") -> None:
    """Block (inside the worker) until the test creates ``path``, then crash with
    ``action`` ("exit": os._exit, "segfault") or, if the file never comes, return."""
    deadline = time.monotonic() + LONG
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    if action == "exit":
        os_exit()
    elif action == "segfault":
        segfault()


def _start_sleeper(code: str, *, new_session: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=new_session,
    )


_IGNORE_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ignoring SIGTERM', flush=True)\n"
    f"time.sleep({LONG})\n"
)


def start_term_ignoring_child(path: str) -> None:
    """Start a subprocess that ignores SIGTERM, wait until it does, write its pid to the
    FIFO at ``path``, then sleep (the test kills the call)."""
    proc = _start_sleeper(_IGNORE_TERM)
    assert proc.stdout is not None
    proc.stdout.readline()  # the handler is installed
    notify(path, str(proc.pid))
    time.sleep(LONG)


def start_grandchild(path: str, new_session: bool = False) -> None:
    """Start a subprocess (optionally in a session of its own, i.e. outside the worker's
    process group), write its pid to the FIFO at ``path``, then sleep."""
    proc = _start_sleeper(
        f"import time; print('up', flush=True); time.sleep({LONG})", new_session=new_session
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    notify(path, str(proc.pid))
    time.sleep(LONG)


# --------------------------------------------------------------------------------------- #
# stderr, then a crash
# --------------------------------------------------------------------------------------- #


def _write_stderr(data: bytes) -> None:
    sys.stderr.flush()
    view = memoryview(data)
    while view:
        view = view[os.write(2, view) :]


def stderr_then_exit(text: str, code: int = 3) -> None:
    _write_stderr(text.encode())
    os._exit(code)


def stderr_then_segfault(text: str) -> None:
    _write_stderr(text.encode())
    segfault()


def big_stderr_data(size: int) -> bytes:
    """``size`` bytes of numbered lines (so the tail is recognisable), ending in a marker."""
    lines = []
    total = 0
    i = 0
    while total < size:
        line = f"line {i:08d} of the big stderr test\n".encode()
        lines.append(line)
        total += len(line)
        i += 1
    data = b"".join(lines)
    end = b"END-OF-BIG-STDERR\n"
    return data[: size - len(end)] + end


def big_stderr_then_exit(size: int, code: int = 3) -> None:
    _write_stderr(big_stderr_data(size))
    os._exit(code)


# --------------------------------------------------------------------------------------- #
# Parent side
# --------------------------------------------------------------------------------------- #


class Fifo:
    """A named pipe a task writes a line to; the test reads it with a deadline.

    The read end is opened non-blocking before the task runs, so the task's ``open()``
    for writing never blocks and the test never waits longer than its timeout.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._buf = b""

    def read_line(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing written to {self.path} within {timeout} s")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                # The writer closed without a full line; wait for another writer.
                if b"\n" not in self._buf:
                    self._reopen()
                continue
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def read_pid(self, timeout: float = 10.0) -> int:
        return int(self.read_line(timeout))

    def _reopen(self) -> None:
        # After the last writer closed, select() reports EOF forever; a fresh read end
        # waits for the next writer instead.
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Fifo:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Recorder:
    """An ``on_failure`` callback that records its calls; the test waits on it."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self.threads: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, err: BaseException) -> None:
        with self._cond:
            self.errors.append(err)
            self.threads.append(threading.current_thread().name)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[BaseException]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.errors) >= n, timeout), (
                f"on_failure called {len(self.errors)} times, expected {n}"
            )
            return list(self.errors)


def started_event(future: Any) -> threading.Event:
    """An event set once ``future``'s call has reported progress (``offload.report``),
    or at once if it already has.

    A progress callback sees only the reports made after it is added, and under load
    the call can report before the test adds it: its report is then in
    ``future.progress()`` (set before the callbacks are read, so one of the two sees it).
    """
    event = threading.Event()
    future.add_progress_callback(lambda _value: event.set())
    if future.progress() is not None:
        event.set()
    return event


def wait_until(predicate: Callable[[], bool], limit: float) -> bool:
    """Poll ``predicate`` (what nothing can be told about, e.g. a process's end) until it
    holds or ``limit`` seconds pass; its last value."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(0.01)
    return True


def is_gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie counts: it runs nothing; an orphan's zombie
    waits for init, which may be slow to reap in a container)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int] | tuple[int, ...], timeout: float) -> list[int]:
    """Poll until every pid is gone or ``timeout`` passes; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [pid for pid in alive if not is_gone(pid)]
    return alive


def kill_quietly(pid: int) -> None:
    """SIGKILL one process this test started (cleanup after a failed assertion)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
