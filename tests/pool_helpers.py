"""Worker-side helpers for ``test_pool.py``: an importable module, not a test file.

Workers inherit the parent's ``sys.path`` (pytest puts ``tests/`` on it), so these
functions travel by reference.

Tests and tasks synchronise through files with a bounded wait (:func:`wait_for`), never a
bare sleep. Every gate file a task waits for lives in the test's ``tmp_path``; creating
``ABORT`` in that directory opens every gate at once, which is how a test's teardown
releases whatever it left blocked, so that shutting the pool down never hangs.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Any

WAIT_LIMIT = 20.0  # seconds a task waits for a gate before giving up
EXIT_CODE = 3
ERROR_ARGS = ("pool-test", 42)
_POLL = 0.005


def wait_for(path: str | os.PathLike[str], limit: float = WAIT_LIMIT) -> bool:
    """Wait (bounded) until ``path``, or ``ABORT`` next to it, exists; True if ``path``
    (or ``ABORT``) appeared."""
    path = os.fspath(path)
    abort = os.path.join(os.path.dirname(path), "ABORT")
    deadline = time.monotonic() + limit
    while not (os.path.exists(path) or os.path.exists(abort)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def touch(path: str | os.PathLike[str]) -> None:
    Path(path).touch()


def write_pid(path: str | os.PathLike[str]) -> None:
    """Write this process's pid to ``path`` atomically (write, then rename)."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def append_line(path: str | os.PathLike[str]) -> int:
    """Append this process's pid as one line to ``path``; return the number of lines."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        return len(f.read().splitlines())


# -- plain tasks ---------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def run_once(directory: str, i: int, hold: str = "") -> int:
    """Create ``directory/i`` (it must not exist: a call that ran twice fails here),
    wait for ``hold`` if given (a long call), and return ``i``."""
    os.close(os.open(os.path.join(directory, str(i)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    if hold:
        wait_for(hold)
    return i


def getpid(_: Any = None) -> int:
    return os.getpid()


def with_pid(x: Any) -> tuple[Any, int]:
    return x, os.getpid()


def fail_at(x: int, bad: int) -> int:
    """``x * x``, except that item ``bad`` raises ValueError."""
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * x


def mark(path: str, value: Any = None) -> Any:
    """Create ``path`` (proof that the call ran), return ``value``."""
    touch(path)
    return value


def gated(x: int, gate: str) -> int:
    """``x * x``; item 0 first waits for ``gate``."""
    if x == 0:
        wait_for(gate)
    return x * x


def print_to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def raise_error(*args: Any) -> None:
    raise ValueError(*args)


# -- tasks that run until the test lets them go, then do something ------------------------


def mark_wait_then(marker: str, gate: str, action: str = "return", value: Any = None) -> Any:
    """Write the worker's pid to ``marker``, wait for ``gate``, then ``action``:
    "return" (``value``), "raise", "sys_exit", "os_exit", "segfault"; "hang" waits for a
    gate the test never opens (bounded by WAIT_LIMIT, and by ABORT)."""
    write_pid(marker)
    if action == "hang":
        wait_for(gate + ".never")
        return value
    wait_for(gate)
    if action == "raise":
        raise ValueError(*ERROR_ARGS)
    if action == "sys_exit":
        sys.exit(EXIT_CODE)
    if action == "os_exit":
        os._exit(EXIT_CODE)
    if action == "segfault":
        segfault()
    return value


def segfault() -> None:
    if not faulthandler.is_enabled():
        faulthandler.enable()
    ctypes.string_at(0)


# -- attempts, counted in a file -----------------------------------------------------------


def poison(path: str) -> None:
    """Crash the worker, every time (each attempt leaves a line in ``path``)."""
    append_line(path)
    os._exit(EXIT_CODE)


def crash_first(path: str) -> int:
    """Crash the worker on the first attempt; later attempts return the attempt number."""
    n = append_line(path)
    if n == 1:
        os._exit(EXIT_CODE)
    return n


def raise_counted(path: str) -> None:
    """Raise (the task's own failure: no retry), leaving a line in ``path``."""
    append_line(path)
    raise ValueError("the task itself failed")


# -- initializers ----------------------------------------------------------------------------


def failing_initializer(path: str) -> None:
    append_line(path)
    raise RuntimeError("initializer failed on purpose")


def hanging_initializer(path: str) -> None:
    append_line(path)
    wait_for(path + ".never", limit=60.0)
