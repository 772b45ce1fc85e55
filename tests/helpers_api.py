"""Worker-side helpers for ``test_worker_api.py``: an importable module, not a test file.

Workers inherit the parent's ``sys.path`` (which pytest extends with ``tests/``), so these
functions travel by reference and a worker can ``preload`` this module by name.

Synchronisation between the test and a task is always through files with a bounded
wait (:func:`wait_for`), never a bare sleep.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import offload

WAIT_LIMIT = 20.0  # seconds a task waits for a file before giving up
_POLL = 0.005

_STATE: Any = None
_LEAK: list[bytearray] = []


def wait_for(path: str | os.PathLike[str], limit: float = WAIT_LIMIT) -> bool:
    """Wait (bounded) until ``path`` exists; True if it did."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def touch(path: str | os.PathLike[str]) -> None:
    Path(path).touch()


def allocate(nbytes: int) -> bytearray:
    """A bytearray of ``nbytes`` whose every page is really resident."""
    buf = bytearray(nbytes)
    buf[::4096] = b"\x01" * len(range(0, nbytes, 4096))
    return buf


# -- introspection -------------------------------------------------------------------------


def getpid() -> int:
    return os.getpid()


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def getcwd() -> str:
    return os.getcwd()


def is_imported(module: str) -> bool:
    return module in sys.modules


def create_file(path: str) -> int:
    """Create ``path`` asking for mode 0o666; return the permission bits it got."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)
    os.close(fd)
    return os.stat(path).st_mode & 0o777


def echo(value: Any) -> Any:
    return value


def make_lock() -> Any:
    return threading.Lock()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_bytes(nbytes: int) -> bytes:
    return b"r" * nbytes


def argument_length(data: bytes) -> int:
    return len(data)


# -- initializers ----------------------------------------------------------------------


def init_state(log_path: str, value: Any) -> None:
    global _STATE
    with open(log_path, "a") as f:
        f.write(f"init {os.getpid()}\n")
    _STATE = value


def get_state() -> Any:
    return _STATE


def init_fail(text: str) -> None:
    raise RuntimeError(f"initializer exploded: {text}")


# -- blocking, concurrency, memory -----------------------------------------------------------


def block(started: str, go: str, value: Any = "released") -> Any:
    """Signal ``started``, then wait for ``go``."""
    touch(started)
    return value if wait_for(go) else "gave up waiting"


def rendezvous(mine: str, other: str, limit: float) -> tuple[bool, int, int]:
    """Create ``mine`` and wait (bounded) for ``other``: (saw it, pid, thread id)."""
    touch(mine)
    return wait_for(other, limit), os.getpid(), threading.get_ident()


def hold_memory(nbytes: int, allocated: str, release: str) -> int:
    """Allocate ``nbytes`` and hold them until ``release`` exists (bounded)."""
    buf = allocate(nbytes)
    touch(allocated)
    wait_for(release)
    return len(buf)


def leak_when_idle(nbytes: int, go: str, done: str) -> int:
    """Return at once; a background thread then waits for ``go`` and leaves ``nbytes``
    allocated in a global (so the memory grows while the worker is idle)."""

    def grow() -> None:
        if wait_for(go):
            _LEAK.append(allocate(nbytes))
            touch(done)

    threading.Thread(target=grow, daemon=True).start()
    return os.getpid()


# -- crashes and exceptions ----------------------------------------------------------------


def crash(code: int, message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


def print_lines(out: str, err: str) -> int:
    print(out)
    print(err, file=sys.stderr)
    return os.getpid()


class CustomError(Exception):
    """A task exception with extra fields, pickle-friendly (args match __init__)."""

    def __init__(self, message: str, code: int = 0, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.detail = detail


def raise_custom(message: str, code: int, detail: dict[str, Any]) -> None:
    raise CustomError(message, code=code, detail=detail)


def raise_value_error(message: str) -> None:
    raise ValueError(message, 42)


class LockedError(Exception):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_locked(message: str) -> None:
    raise LockedError(message)


def report_values(count: int, go: str) -> int:
    """Wait for ``go``, then report 0..count-1 as progress."""
    if not wait_for(go):
        return -1
    for i in range(count):
        offload.report(i)
    return count


# -- tasks -----------------------------------------------------------------------------------


@offload.task
def add(a: int, b: int) -> int:
    return a + b


@offload.task(name="api-add", timeout=30, retries=1)
def named_add(a: int, b: int) -> int:
    return a + b


@offload.task(name="api-timed-wait", timeout=0.5)
def timed_wait(path: str, limit: float) -> bool:
    """Wait up to ``limit`` seconds for ``path``; the task's own timeout is 0.5 s."""
    return wait_for(path, limit)


@offload.task(retries=1)
def crash_once(marker: str) -> tuple[str, int]:
    """Crash the worker the first time (``marker`` absent), succeed the second."""
    if not os.path.exists(marker):
        touch(marker)
        os._exit(7)
    return "second attempt", os.getpid()


@offload.task(retries=2)
def count_and_raise(path: str) -> None:
    with open(path, "a") as f:
        f.write("run\n")
    raise ValueError("task failed on purpose")
