"""Tasks for ``test_remote_retries.py`` (not a test module).

The tests start ``offload serve`` with ``PYTHONPATH`` including ``tests/``, so the
server's worker processes import this module by reference. Each task appends its pid to
an *attempts* file before doing anything else, so a test counts the attempts a call made
(and sees which processes ran them) by reading that file, never by timing. Tasks that
block wait for a release file with a bounded wait.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

LIMIT = 30.0  # seconds a blocking task waits at most; every test releases or kills it


class TaskError(Exception):
    """A task's own exception; module-level, so it travels back as itself."""


def note_attempt(attempts: str) -> int:
    """Append this process's pid to ``attempts``; how many attempts came before."""
    before = attempts_of(attempts)
    with open(attempts, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(before)


def attempts_of(attempts: str) -> list[int]:
    """The pids of the attempts noted in ``attempts`` (none if it does not exist)."""
    try:
        with open(attempts) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def die() -> None:
    """End this process as the out-of-memory killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_first(attempts: str, crashes: int = 1) -> int:
    """The first ``crashes`` attempts kill their own process; the next returns its pid."""
    if note_attempt(attempts) < crashes:
        die()
    return os.getpid()


def raise_always(attempts: str) -> None:
    """Every attempt raises the task's own exception."""
    note_attempt(attempts)
    raise TaskError("task failed", attempts)


def wait_for(path: str, limit: float = LIMIT) -> None:
    """Wait (bounded) until ``path`` exists."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            raise TaskError("never released", path)
        time.sleep(0.01)


def hold(attempts: str, release: str) -> int:
    """Every attempt waits for ``release``: a call the test means to time out."""
    note_attempt(attempts)
    wait_for(release)
    return os.getpid()


def crash_then_hold(attempts: str, release: str) -> int:
    """Attempt 1 kills its own process; attempt 2 waits for ``release`` (the test
    kills its server meanwhile); attempt 3 returns its pid at once."""
    n = note_attempt(attempts)
    if n == 0:
        die()
    if n == 1:
        wait_for(release)
    return os.getpid()


def produce(tx: Any, n: int, attempts: str) -> int:
    """Send ``n`` items tagged with the attempt; the first attempt then kills its own
    process (having flushed what it sent)."""
    first = note_attempt(attempts) == 0
    for i in range(n):
        tx.send(("first" if first else "retry", i))
    if first:
        tx.flush()
        die()
    return os.getpid()
