"""Worker-side helpers for ``test_contract.py`` (an importable module, not a test file).

Workers inherit the parent's ``sys.path`` (pytest puts ``tests/`` on it), so everything
here travels by reference, and ``preload=["contract_helpers"]`` imports this module (and
registers its tasks) in a worker at start-up.

Tasks synchronise with the test through files with bounded waits, never bare sleeps.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import offload

WAIT_LIMIT = 20.0  # seconds a task waits for a file before giving up
LONG = 60.0  # seconds a "long" call blocks; every test stops it long before
_POLL = 0.005
TRIPLE_NAME = "contract.triple"  # a custom registered name (not "module:qualname")

# What the initializer did in *this* process (a worker's own copy of the module).
INIT_CALLS: list[tuple[Any, ...]] = []


def wait_for(path: str | os.PathLike[str], limit: float = WAIT_LIMIT) -> bool:
    """Wait (bounded) until ``path`` exists; True if it did."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


# -- plain functions (travel by reference) -----------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def getpid() -> int:
    return os.getpid()


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def getcwd() -> str:
    return os.getcwd()


def stdio_target(fd: int) -> str:
    """Where the worker's fd ``fd`` points (``/proc/self/fd``)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def write_stdio(out: str, err: str) -> None:
    print(out, flush=True)
    print(err, file=sys.stderr, flush=True)


class ContractError(Exception):
    """A picklable exception defined outside the standard library."""


def raise_value_error(*args: Any) -> None:
    raise ValueError(*args)


def raise_contract_error(*args: Any) -> None:
    raise ContractError(*args)


def report_steps(n: int, gate: str) -> int:
    """Wait for ``gate`` (so the test can attach its callback), then report 0..n-1."""
    if not wait_for(gate):
        raise TimeoutError(f"gate {gate} never appeared")
    for i in range(n):
        offload.report(i)
    return n


def roundtrip(data: bytes) -> tuple[str, bytes]:
    """The digest of ``data`` as the worker saw it, and ``data`` itself back."""
    return hashlib.sha256(data).hexdigest(), data


def numpy_roundtrip(arr: Any) -> tuple[float, Any]:
    return float(arr.sum()), arr * 2


def os_exit(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def block(started: str, limit: float = LONG) -> str:
    """Signal that the call is running (create ``started``, holding this process's pid),
    then block for ``limit`` s."""
    path = Path(started)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(str(os.getpid()))
    partial.replace(path)  # whoever sees the file sees the whole pid
    time.sleep(limit)
    return "not stopped"


def record_init(path: str, tag: str) -> None:
    """An initializer: note the call in this process and append a line to ``path``."""
    INIT_CALLS.append((os.getpid(), tag))
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {tag}\n")


def init_calls() -> list[tuple[Any, ...]]:
    return list(INIT_CALLS)


# -- tasks -------------------------------------------------------------------------------


@offload.task
def double(x: int) -> int:
    """Registered under its default name ``"contract_helpers:double"``."""
    return 2 * x


@offload.task(name=TRIPLE_NAME)
def triple(x: int) -> int:
    """Registered under a custom name, known only where this module was imported."""
    return 3 * x
