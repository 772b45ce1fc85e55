"""Tasks for the remote-worker tests (not a test module).

The tests start ``offload serve`` with ``PYTHONPATH`` including ``tests/``, so the
server's worker processes import this module by reference, just as the test process
does. Tasks that block write their pid to a file first (atomically: write, then rename)
and wait for a release file with a bounded wait, so the test synchronises on files and
never on sleeps.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import time
from pathlib import Path
from typing import Any

import offload

LIMIT = 30.0  # seconds a blocking task waits at most; every test releases or kills it first


class TaskError(Exception):
    """A task's own exception; module-level, so it travels back as itself."""


def getpid() -> int:
    return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def pid_and_value(value: Any) -> tuple[int, Any]:
    return os.getpid(), value


def fail(message: str, code: int) -> None:
    raise TaskError(message, code)


def segfault() -> None:
    if not faulthandler.is_enabled():
        faulthandler.enable()
    ctypes.string_at(0)


def write_pid(path: str) -> None:
    """Write this process's pid to ``path`` atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def hold(pid_path: str, release_path: str, limit: float = LIMIT) -> int:
    """Write the pid to ``pid_path``, then wait (bounded) for ``release_path``; return
    the pid. A call the test means to kill is never released."""
    write_pid(pid_path)
    deadline = time.monotonic() + limit
    while not os.path.exists(release_path):
        if time.monotonic() >= deadline:
            raise TaskError("never released", pid_path)
        time.sleep(0.01)
    return os.getpid()


def hold_once(marker: str, pid_path: str, release_path: str, limit: float = LIMIT) -> int:
    """The first run (``marker`` absent) holds like :func:`hold`; a re-run (after the
    first one's worker was lost) returns at once. Returns the pid."""
    if not os.path.exists(marker):
        Path(marker).touch()
        return hold(pid_path, release_path, limit)
    return os.getpid()


def rendezvous(directory: str, count: int, limit: float) -> bool:
    """Arrive in ``directory`` and wait (bounded by ``limit``) until ``count`` calls have
    arrived; True if they all met (they ran at the same time)."""
    Path(directory, str(os.getpid())).touch()
    deadline = time.monotonic() + limit
    while len(os.listdir(directory)) < count:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def report_steps(count: int, go_path: str, limit: float = LIMIT) -> int:
    """Wait (bounded) for ``go_path`` (the test has added its progress callback), then
    report 0 .. count-1."""
    deadline = time.monotonic() + limit
    while not os.path.exists(go_path):
        if time.monotonic() >= deadline:
            raise TaskError("no go", go_path)
        time.sleep(0.01)
    for i in range(count):
        offload.report(i)
    return count


def square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()
