"""A killed and a timed-out call in a forkserver pool: the error, then the replacement.

The pool has one worker, so the first call after the failure must wait for the
replacement process. *Kill*: the call sleeps; the benchmark sends SIGKILL to the worker
(the clock starts just before ``kill()``). *Timeout*: a 100 ms per-call timeout on a call
that would sleep 10 s (the clock starts at the deadline: submission + 100 ms). Two times
per repetition: until the caller's ``result()`` raises, and until a call submitted right
after that returns (from a new pid). That call is ``os.getpid``, which needs no import in
the new process (a function of a module the template has not imported, such as
``benchmarks.tasks``, would add that module's import to the time). Every repetition starts
from a warm worker, untimed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

from benchmarks import attempt, failure, require, tasks
from benchmarks.report import Row

TIMEOUT = 0.1
MODES = ("kill", "timeout")


class _Subject:
    name = ""
    expected: dict[str, tuple[type[BaseException], ...]]

    def getpid(self, limit: float) -> int:
        raise NotImplementedError

    def submit_sleep(self, path: str) -> Any:
        """A call that writes its pid to ``path``, then sleeps 10 s."""
        raise NotImplementedError

    def submit_timed_out(self) -> Any:
        """A call that sleeps 10 s with a per-call timeout of :data:`TIMEOUT`."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Offload(_Subject):
    name = "offload"

    def __init__(self) -> None:
        import offload

        self.expected = {"kill": (offload.WorkerCrashed,), "timeout": (offload.TaskTimeout,)}
        self.pool = offload.Pool(workers=1, start_method="forkserver")
        self.sleep = offload.task(tasks.sleep, timeout=TIMEOUT)

    def getpid(self, limit: float) -> int:
        pid: int = self.pool.submit(os.getpid).result(timeout=limit)
        return pid

    def submit_sleep(self, path: str) -> Any:
        return self.pool.submit(tasks.sleep_marked_pid, path, 10.0)

    def submit_timed_out(self) -> Any:
        return self.pool.submit(self.sleep, 10.0)

    def close(self) -> None:
        self.pool.shutdown(timeout=2)


class Pebble(_Subject):
    name = "pebble (forkserver)"

    def __init__(self) -> None:
        pebble: Any = require("pebble")
        self.expected = {"kill": (pebble.ProcessExpired,), "timeout": (TimeoutError,)}
        ctx = multiprocessing.get_context("forkserver")
        self.pool = pebble.ProcessPool(max_workers=1, context=ctx)

    def getpid(self, limit: float) -> int:
        pid: int = self.pool.schedule(os.getpid).result(timeout=limit)
        return pid

    def submit_sleep(self, path: str) -> Any:
        return self.pool.schedule(tasks.sleep_marked_pid, args=(path, 10.0))

    def submit_timed_out(self) -> Any:
        return self.pool.schedule(tasks.sleep, args=(10.0,), timeout=TIMEOUT)

    def close(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=5)


FACTORIES: list[tuple[str, Callable[[], _Subject]]] = [
    ("offload", Offload),
    ("pebble (forkserver)", Pebble),
]


def _one(subject: _Subject, mode: str, tmp: str, give_up: float) -> tuple[float, float] | str:
    """(seconds to the error, seconds to the replacement's answer), both from the kill
    or the deadline; or what went wrong instead."""
    old = subject.getpid(30)
    if mode == "kill":
        path = os.path.join(tmp, "started")
        future = subject.submit_sleep(path)
        pid = tasks.wait_for_pid(path)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
    else:
        t0 = time.perf_counter() + TIMEOUT
        future = subject.submit_timed_out()
    # wait() rather than result(timeout): a hang must not pass for a TimeoutError.
    done, _ = wait([future], timeout=TIMEOUT + give_up)
    t1 = time.perf_counter()
    if not done:
        return f"no error: the call hangs (gave up after {give_up:g} s)"
    exc = future.exception()
    if exc is None:
        return "no error: the call returned"
    if not isinstance(exc, subject.expected[mode]):
        return f"unexpected {type(exc).__name__}: {exc}"
    new = subject.getpid(give_up)
    t2 = time.perf_counter()
    if new == old:
        return "the same process answered after the failure"
    return t1 - t0, t2 - t0


def run(reps: int, give_up: float) -> dict[str, tuple[list[Row], list[Row]]]:
    """Per mode: (rows for the error, rows for the replacement)."""
    out: dict[str, tuple[list[Row], list[Row]]] = {m: ([], []) for m in MODES}
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        for name, factory in FACTORIES:
            subject, note = attempt(factory)
            if subject is None:
                for errors, answers in out.values():
                    errors.append(Row(name, None, note=note))
                    answers.append(Row(name, None, note=note))
                continue
            try:
                for mode in MODES:
                    to_error: list[float] = []
                    to_answer: list[float] = []
                    problems: list[str] = []
                    for _ in range(reps):
                        try:
                            outcome = _one(subject, mode, tmp, give_up)
                        except Exception as exc:  # noqa: BLE001 - reported in the table
                            problems.append(failure(exc))
                            break
                        if isinstance(outcome, str):
                            problems.append(outcome)
                            break
                        to_error.append(outcome[0])
                        to_answer.append(outcome[1])
                    raised = "raises " + "/".join(e.__name__ for e in subject.expected[mode])
                    note = "; ".join(sorted(set(problems))) if problems else ""
                    errors, answers = out[mode]
                    errors.append(Row(name, to_error or None, note=note or raised))
                    answers.append(Row(name, to_answer or None, note=note or "a new pid answers"))
            finally:
                try:
                    subject.close()
                except Exception as exc:  # noqa: BLE001 - report, keep going
                    print(f"benchmarks: closing {name} failed: {exc!r}", file=sys.stderr)
    return out
