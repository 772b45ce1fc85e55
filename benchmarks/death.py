"""Time from a worker's death to the error in the caller.

Two ways to die: the call runs ``os._exit(1)`` (timed from the worker's own timestamp
just before it exits), or the benchmark sends SIGKILL to the worker's pid while the call
sleeps (timed from just before the ``kill()`` syscall). The clock stops when the caller's
``result()`` raises. Every repetition starts from a warm worker, untimed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from benchmarks import attempt, failure, raw_floor, require, tasks
from benchmarks.report import Row

MODES = {
    "exit": "Worker death → error: os._exit(1) in the call",
    "kill": "Worker death → error: SIGKILL while the call sleeps",
}


class Subject:
    """A system under test: ``warm()`` returns the pid of a live worker."""

    name = ""
    expected: tuple[type[BaseException], ...] = ()
    repetitions: int | None = None  # None: as many as asked

    def warm(self) -> int:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """An object with ``result(timeout)``."""
        raise NotImplementedError

    def died(self) -> None:
        """Called after each death (recreate a broken executor...)."""

    def close(self) -> None:
        raise NotImplementedError


class Offload(Subject):
    name = "offload"

    def __init__(self) -> None:
        import offload

        self.expected = (offload.WorkerCrashed,)
        self.w = offload.spawn()

    def warm(self) -> int:
        self.w.call(abs, -1)  # after a death, this starts the next process
        pid = self.w.pid
        assert pid is not None
        return pid

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.w.submit(fn, *args)

    def close(self) -> None:
        self.w.shutdown(timeout=5)


class _Executor(Subject):
    """concurrent.futures-style executors that break for good when a worker dies."""

    def __init__(self) -> None:
        self.ex: Any = None

    def make(self) -> Any:
        raise NotImplementedError

    def warm(self) -> int:
        if self.ex is None:
            self.ex = self.make()
        pid: int = self.ex.submit(tasks.getpid).result(timeout=30)
        return pid

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = self.ex.submit(fn, *args)
        return future

    def died(self) -> None:
        self.close()

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True)
            self.ex = None


class PPE(_Executor):
    name = "ProcessPoolExecutor"

    def __init__(self) -> None:
        from concurrent.futures.process import BrokenProcessPool

        super().__init__()
        self.expected = (BrokenProcessPool,)

    def make(self) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=1)


class Loky(_Executor):
    name = "loky"

    def __init__(self) -> None:
        self.loky: Any = require("loky")
        super().__init__()
        self.expected = (self.loky.process_executor.TerminatedWorkerError,)

    def make(self) -> Any:
        return self.loky.get_reusable_executor(max_workers=1)

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, kill_workers=True)
            self.ex = None


class Pebble(Subject):
    name = "pebble"

    def __init__(self) -> None:
        pebble: Any = require("pebble")
        self.expected = (pebble.ProcessExpired,)
        self.pool = pebble.ProcessPool(max_workers=1)

    def warm(self) -> int:
        pid: int = self.pool.schedule(tasks.getpid).result(timeout=30)
        return pid

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)

    def close(self) -> None:
        self.pool.stop()
        self.pool.join(timeout=5)


class _AsyncResult:
    def __init__(self, result: Any) -> None:
        self._result = result

    def result(self, timeout: float) -> Any:
        try:
            return self._result.get(timeout)
        except multiprocessing.TimeoutError:
            raise TimeoutError from None


class MpPool(Subject):
    """multiprocessing.Pool never reports a dead worker: the call hangs. One bounded
    repetition shows it."""

    name = "multiprocessing.Pool"
    repetitions = 1

    def __init__(self) -> None:
        self.pool = multiprocessing.Pool(1)

    def warm(self) -> int:
        pid: int = self.pool.apply(tasks.getpid)
        return pid

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return _AsyncResult(self.pool.apply_async(fn, args))

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


FACTORIES: list[tuple[str, Callable[[], Subject]]] = [
    ("offload", Offload),
    ("ProcessPoolExecutor", PPE),
    ("multiprocessing.Pool", MpPool),
    ("loky", Loky),
    ("pebble", Pebble),
]


def _one(subject: Subject, mode: str, tmp: str, give_up: float) -> float | str:
    """Seconds from death to error, or what went wrong instead."""
    pid = subject.warm()
    path = os.path.join(tmp, f"{subject.name}-{mode}")
    if mode == "exit":
        future = subject.submit(tasks.die_at, path)
    else:
        future = subject.submit(tasks.sleep_marked, path, 10.0)
        tasks.wait_for_file(path)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
    try:
        future.result(timeout=give_up)
    except subject.expected:
        t1 = time.perf_counter()
    except TimeoutError:
        return f"no error: the call hangs (gave up after {give_up:g} s)"
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"unexpected {type(exc).__name__}: {exc}"
    else:
        return "no error: the call returned"
    finally:
        subject.died()
    if mode == "exit":
        t0 = tasks.read_time(path)
        os.unlink(path)
    return t1 - t0


def _floor(mode: str, reps: int, tmp: str) -> Row:
    measure = raw_floor.death_exit if mode == "exit" else raw_floor.death_kill
    return Row("raw socketpair EOF (floor)", [measure(tmp) for _ in range(reps)])


def run(reps: int, give_up: float) -> dict[str, list[Row]]:
    """Rows for each mode: the floor, then each contender (``reps`` repetitions each)."""
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        for mode in MODES:
            rows = [_floor(mode, reps, tmp)]
            for name, factory in FACTORIES:
                subject, note = attempt(factory)
                if subject is None:
                    rows.append(Row(name, None, note=note))
                    continue
                samples: list[float] = []
                problems: list[str] = []
                try:
                    for _ in range(subject.repetitions or reps):
                        try:
                            outcome = _one(subject, mode, tmp, give_up)
                        except Exception as exc:  # noqa: BLE001 - reported in the table
                            problems.append(failure(exc))
                            break
                        if isinstance(outcome, str):
                            problems.append(outcome)
                        else:
                            samples.append(outcome)
                finally:
                    try:
                        subject.close()
                    except Exception as exc:  # noqa: BLE001 - report, keep going
                        print(f"benchmarks: closing {name} failed: {exc!r}", file=sys.stderr)
                note = "raises " + "/".join(e.__name__ for e in subject.expected)
                if problems:
                    note = "; ".join(sorted(set(problems)))
                rows.append(Row(name, samples or None, note=note))
            results[mode] = rows
    return results
