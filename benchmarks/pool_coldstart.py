"""Cold start of a pool of 2 workers: create the pool → the result of one tiny call.

Timed from the constructor to the first result; shutting down is not timed. Two floors,
one per kind of start: two bare ``python -c pass`` started at once with
:mod:`subprocess` (for pools that start fresh interpreters), and two bare
``os.fork()`` + ``os._exit(0)`` reaped with ``waitpid`` (for pools that fork). offload's
forkserver is measured *warm*: its template process, started by an earlier pool in this
process (the untimed warm-up start), already runs. Repetitions alternate between
contenders (:func:`benchmarks.coldstart.measure`).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import require
from benchmarks.coldstart import measure
from benchmarks.report import Row

WORKERS = 2
SPAWN_FLOOR = "2 bare python -c pass, concurrent (floor)"
FORK_FLOOR = "2 bare os.fork() + os._exit (floor)"

Starter = Callable[[], Callable[[], None]]  # start → close


def _bare_pythons() -> Callable[[], None]:
    procs = [
        subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL)
        for _ in range(WORKERS)
    ]
    try:
        for proc in procs:
            if proc.wait(timeout=30) != 0:
                raise RuntimeError(f"python -c pass exited with status {proc.returncode}")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    return lambda: None


def _bare_forks() -> Callable[[], None]:
    pids = []
    for _ in range(WORKERS):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return lambda: None


def _offload(method: str) -> Starter:
    def start() -> Callable[[], None]:
        import offload

        pool = offload.Pool(workers=WORKERS, start_method=method)
        try:
            pool.submit(abs, -1).result(timeout=30)
        except BaseException:
            pool.shutdown(kill=True)
            raise
        return lambda: pool.shutdown(timeout=5)

    return start


def _ppe(method: str) -> Starter:
    def start() -> Callable[[], None]:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context(method)
        ex = ProcessPoolExecutor(max_workers=WORKERS, mp_context=ctx)
        try:
            ex.submit(abs, -1).result(timeout=30)
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        return ex.shutdown

    return start


def _pebble(method: str) -> Starter:
    def start() -> Callable[[], None]:
        pebble: Any = require("pebble")
        pool = pebble.ProcessPool(max_workers=WORKERS, context=multiprocessing.get_context(method))

        def close() -> None:
            pool.close()
            pool.join(timeout=5)

        try:
            pool.schedule(abs, args=(-1,)).result(timeout=30)
        except BaseException:
            pool.stop()
            pool.join(timeout=5)
            raise
        return close

    return start


def run_spawn(reps: int) -> list[Row]:
    """Pools that start fresh interpreters, against two bare interpreter starts."""
    return measure(
        [
            (SPAWN_FLOOR, _bare_pythons, ""),
            ("offload (spawn)", _offload("spawn"), ""),
            ("ProcessPoolExecutor (spawn)", _ppe("spawn"), ""),
        ],
        reps,
    )


def run_fork(reps: int) -> list[Row]:
    """Pools that fork (the parent, or a warm template), against two bare forks."""
    return measure(
        [
            (FORK_FLOOR, _bare_forks, ""),
            ("offload (fork)", _offload("fork"), ""),
            ("offload (forkserver, warm)", _offload("forkserver"), "template already running"),
            ("ProcessPoolExecutor (fork)", _ppe("fork"), ""),
            ("pebble (fork)", _pebble("fork"), ""),
        ],
        reps,
    )
