"""Tasks and probes for ``test_large_data.py`` (importable by workers: not a test file).

The probes read ``/proc/self``: a shared-memory segment of offload's is a memfd named
``offload``, seen as ``/memfd:offload (deleted)`` in a process's descriptors and maps.
"""

from __future__ import annotations

import os
import time
from typing import Any

import offload

LONG = 60.0  # seconds a holding task sleeps; every test kills it long before
SEGMENT = "memfd:offload"


def echo(x: Any) -> Any:
    return x


def notify(path: str) -> None:
    """Tell the test (through the FIFO at ``path``) that the call runs, and where."""
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def hold(path: str, data: Any) -> None:
    """Receive ``data``, tell the test, then wait to be killed."""
    notify(path)
    time.sleep(LONG)


def report_then_hold(path: str, size: int) -> None:
    """Send ``size`` bytes as progress (through shared memory), tell the test, then
    wait to be killed."""
    offload.report(os.urandom(size))
    notify(path)
    time.sleep(LONG)


def segments_in_maps(pid: int | str = "self") -> int:
    """How many mappings of offload segments ``pid`` has."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(SEGMENT in line for line in f)


def segment_fds(pid: int | str = "self") -> int:
    """How many descriptors of offload segments ``pid`` holds."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += SEGMENT in os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass  # closed meanwhile
    return count


def dev_shm() -> set[str]:
    """The names in /dev/shm (offload makes none: its segments are memfds)."""
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()
