"""Module-level task functions (picklable by reference in every system benchmarked).

Timestamps use :func:`time.perf_counter`, which on Linux (``CLOCK_MONOTONIC``) and macOS
is one clock for the whole machine, so a value taken in a worker can be compared with one
taken in the parent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def getpid() -> int:
    """The worker's pid."""
    return os.getpid()


def die_at(path: str) -> None:
    """Write the time of death to ``path``, then exit the process at once (status 1)."""
    now = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, repr(now).encode())
    os.close(fd)
    os._exit(1)


def sleep_marked(path: str, seconds: float) -> None:
    """Create ``path`` (the call has started), then sleep."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    time.sleep(seconds)


def sleep(seconds: float) -> None:
    """Sleep (a call that outlives its timeout)."""
    time.sleep(seconds)


def read_time(path: str) -> float:
    """The timestamp :func:`die_at` wrote to ``path``."""
    with open(path) as f:
        return float(f.read())


def wait_for_file(path: str, limit: float = 10.0) -> None:
    """Poll until ``path`` exists (bounded by ``limit`` seconds), then remove it."""
    _wait_exists(path, limit)
    os.unlink(path)


def map_chunk(fn: Callable[[Any], Any], chunk: list[Any]) -> list[Any]:
    """``[fn(x) for x in chunk]``: one message of the raw chunked floor."""
    return [fn(x) for x in chunk]


def sleep_marked_pid(path: str, seconds: float) -> None:
    """Write this worker's pid to ``path`` (the call has started), then sleep."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.rename(path + ".tmp", path)
    time.sleep(seconds)


def wait_for_pid(path: str, limit: float = 10.0) -> int:
    """Poll until :func:`sleep_marked_pid` has written ``path``; remove it and return
    the pid it holds (bounded by ``limit`` seconds)."""
    _wait_exists(path, limit)
    with open(path) as f:
        pid = int(f.read())
    os.unlink(path)
    return pid


def _wait_exists(path: str, limit: float) -> None:
    """Poll until ``path`` exists (bounded by ``limit`` seconds)."""
    deadline = time.perf_counter() + limit
    while not os.path.exists(path):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"the call did not start within {limit:g} s")
        time.sleep(0.0005)
