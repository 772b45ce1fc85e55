"""Tasks for ``test_stress.py`` (not a test module).

Workers import this module by reference (they inherit the parent's ``sys.path``), so
everything a worker runs lives at module level here. Each task's outcome is a pure
function of its arguments, so the test can check every result against its input.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import time
from typing import Any

CRASH_EXIT_CODE = 3


def ident(x: Any) -> Any:
    """Tiny call: returns its argument."""
    return x


def echo(data: bytes) -> bytes:
    """Large call: returns its (1 MB) argument, which travels out-of-band both ways."""
    return data


def raise_value_error(x: Any) -> None:
    raise ValueError(x)


def sleep_then(x: Any, seconds: float) -> Any:
    time.sleep(seconds)
    return x


def exit_hard(x: Any) -> None:
    """Crash with ``os._exit(CRASH_EXIT_CODE)``: no cleanup, no result."""
    del x
    os._exit(CRASH_EXIT_CODE)


def segfault(x: Any) -> None:
    """Crash with SIGSEGV (a read of address 0)."""
    del x
    if not faulthandler.is_enabled():
        faulthandler.enable()
    ctypes.string_at(0)
