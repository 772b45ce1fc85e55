"""A per-call timeout of 100 ms on a call that would sleep 10 s.

Lateness = when the error reaches the caller - (submission time + 100 ms). Only systems
with a per-call timeout that stops the call take part; the others are listed as such.
Every repetition starts from a warm worker, untimed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

from benchmarks import attempt, failure, require, tasks
from benchmarks.report import Row

TIMEOUT = 0.1
NO_TIMEOUT = {
    "ProcessPoolExecutor": "n/a: no per-call timeout (result(timeout) leaves the call running)",
    "multiprocessing.Pool": "n/a: no per-call timeout (get(timeout) leaves the call running)",
    "loky": "n/a: no per-call timeout (result(timeout) leaves the call running)",
}


class _Subject:
    name = ""
    expected: tuple[type[BaseException], ...] = ()

    def warm(self) -> None:
        raise NotImplementedError

    def submit_sleep(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Offload(_Subject):
    name = "offload"

    def __init__(self) -> None:
        import offload

        self.expected = (offload.TaskTimeout,)
        self.w = offload.spawn()
        self.task = offload.task(tasks.sleep, timeout=TIMEOUT)

    def warm(self) -> None:
        self.w.call(abs, -1)

    def submit_sleep(self) -> Any:
        return self.w.submit(self.task, 10.0)

    def close(self) -> None:
        self.w.shutdown(timeout=2)


class Pebble(_Subject):
    name = "pebble"

    def __init__(self) -> None:
        pebble: Any = require("pebble")
        self.expected = (TimeoutError,)
        self.pool = pebble.ProcessPool(max_workers=1)

    def warm(self) -> None:
        self.pool.schedule(abs, args=(-1,)).result(timeout=30)

    def submit_sleep(self) -> Any:
        return self.pool.schedule(tasks.sleep, args=(10.0,), timeout=TIMEOUT)

    def close(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=5)


FACTORIES: list[tuple[str, Callable[[], _Subject]]] = [
    ("offload", Offload),
    ("pebble", Pebble),
]


def run(reps: int, give_up: float) -> list[Row]:
    rows: dict[str, Row] = {}
    for name, factory in FACTORIES:
        subject, note = attempt(factory)
        if subject is None:
            rows[name] = Row(name, None, note=note)
            continue
        samples: list[float] = []
        problems: list[str] = []
        try:
            for _ in range(reps):
                try:
                    subject.warm()
                    t0 = time.perf_counter()
                    future = subject.submit_sleep()
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    problems.append(failure(exc))
                    break
                # wait() rather than result(timeout): a hang must not pass for the
                # TimeoutError pebble raises.
                done, _ = wait([future], timeout=TIMEOUT + give_up)
                t1 = time.perf_counter()
                if not done:
                    problems.append(f"no error: the call hangs (gave up after {give_up:g} s)")
                    break
                exc = future.exception()
                if isinstance(exc, subject.expected):
                    samples.append(t1 - t0 - TIMEOUT)
                elif exc is None:
                    problems.append("no error: the call returned")
                else:
                    problems.append(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            try:
                subject.close()
            except Exception as exc:  # noqa: BLE001 - report, keep going
                print(f"benchmarks: closing {name} failed: {exc!r}", file=sys.stderr)
        note = "raises " + "/".join(e.__name__ for e in subject.expected)
        if problems:
            note = "; ".join(sorted(set(problems)))
        rows[name] = Row(name, samples or None, note=note)
    order = ["offload", "ProcessPoolExecutor", "multiprocessing.Pool", "loky", "pebble"]
    for name, why in NO_TIMEOUT.items():
        rows[name] = Row(name, None, note=why)
    return [rows[name] for name in order]
