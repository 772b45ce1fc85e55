"""Worker-side helpers for ``test_pool_kill_reduce.py`` (not a test module): workers
import them by reference (they inherit the parent's ``sys.path``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any


def install_usr1_handler(directory: str) -> None:
    """Initializer: on SIGUSR1, create ``<directory>/usr1-<pid>`` (and go on living)."""
    marker = Path(directory) / f"usr1-{os.getpid()}"
    signal.signal(signal.SIGUSR1, lambda *_: marker.touch())


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def concat(a: str, b: str) -> str:
    return a + b


def fail_at_seven(x: int) -> int:
    if x == 7:
        raise KeyError("seven", x)
    return x


class CountingAdd:
    """``a + b`` that counts its calls in the process that made it (the parent): calls
    in workers run on unpickled copies and count nothing here."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.calls = 0

    def __call__(self, a: Any, b: Any) -> Any:
        if os.getpid() == self.pid:
            self.calls += 1
        return a + b

    def __getstate__(self) -> dict[str, Any]:
        return {"pid": self.pid, "calls": 0}
