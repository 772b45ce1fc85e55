"""Cold start of a pool of 2 workers: create the pool → the result of one tiny call.

Timed from the constructor to the first result; shutting down is not timed. Two floors,
one per kind of start: two bare ``python -c pass`` started at once with
:mod:`subprocess` (for pools that start fresh interpreters), and two bare
``os.fork()`` + ``os._exit(0)`` reaped with ``waitpid`` (for pools that fork). offload's
forkserver is measured *warm*: its template process, started by an earlier pool in this
process (the untimed warm-up start), already runs. Repetitions alternate between
contenders (:func:`benchmarks.coldstart.measure`).

:func:`run_fresh` times *fresh programs* instead: each repetition runs a new interpreter
that imports its library, makes a pool of 2, gets one result and shuts the pool down,
timed as a whole process from outside (start to exit), so the program's own imports
count. The contenders are whole programs too: ``import offload`` alone against a bare
``python -c pass``; an offload pool against the same program with
``ProcessPoolExecutor(2)`` and ``multiprocessing.Pool(2)``, forking and spawning; for
spawn, two bare interpreters started at once (by this process) are the floor, and a
program that does nothing but start them is shown next to it.
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


# -- fresh programs: whole processes -------------------------------------------------------

BARE = "bare python -c pass"
IMPORT_OFFLOAD = "python -c 'import offload'"
IMPORT_LESS_BARE = "import offload, less a bare start (paired)"
OFFLOAD_FORK = "offload Pool(2) (fork)"
PPE_FORK = "ProcessPoolExecutor(2) (fork)"
OFFLOAD_SPAWN = "offload Pool(2) (spawn)"

_OFFLOAD_PROGRAM = """\
import offload
pool = offload.Pool(2, start_method={method!r})
pool.submit(abs, -1).result(timeout=60)
pool.shutdown()
"""
_PPE_PROGRAM = """\
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context({method!r}))
ex.submit(abs, -1).result(timeout=60)
ex.shutdown()
"""
# A program whose whole work is starting two bare interpreters at once: what a spawning
# pool's program would cost if its imports and its pool were free.
_TWO_PYTHONS_PROGRAM = """\
import subprocess, sys
procs = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
for proc in procs:
    proc.wait()
"""
TWO_PYTHONS_PROGRAM = "program starting 2 bare python -c pass at once"
_MP_POOL_PROGRAM = """\
import multiprocessing
pool = multiprocessing.get_context({method!r}).Pool(2)
pool.apply(abs, (-1,))
pool.close()
pool.join()
"""


def _program(code: str) -> Starter:
    """A fresh interpreter running ``code`` to its exit, timed whole."""

    def start() -> Callable[[], None]:
        subprocess.run(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            check=True,
            timeout=60,
        )
        return lambda: None

    return start


def run_fresh(reps: int) -> dict[str, list[Row]]:
    """Fresh programs as whole processes, every contender in one alternating series:
    ``{"import": rows, "fork": rows, "spawn": rows}``, one table section each."""
    contenders: list[tuple[str, Starter, str]] = [
        (BARE, _program("pass"), ""),
        (IMPORT_OFFLOAD, _program("import offload"), ""),
    ]
    methods = ["spawn"]
    if hasattr(os, "fork"):
        methods.insert(0, "fork")
    for method in methods:
        contenders += [
            (f"offload Pool(2) ({method})", _program(_OFFLOAD_PROGRAM.format(method=method)), ""),
            (
                f"ProcessPoolExecutor(2) ({method})",
                _program(_PPE_PROGRAM.format(method=method)),
                "same program",
            ),
            (
                f"multiprocessing.Pool(2) ({method})",
                _program(_MP_POOL_PROGRAM.format(method=method)),
                "same program, for reference",
            ),
        ]
    contenders.append((SPAWN_FLOOR, _bare_pythons, "started by the benchmark, not a program"))
    contenders.append(
        (TWO_PYTHONS_PROGRAM, _program(_TWO_PYTHONS_PROGRAM), "a fresh program, for reference")
    )
    rows = {row.system: row for row in measure(contenders, reps)}
    bare, imported = rows[BARE].samples, rows[IMPORT_OFFLOAD].samples
    paired = (
        [a - b for a, b in zip(imported, bare, strict=True)]
        if bare and imported and len(bare) == len(imported)
        else None
    )
    less_bare = Row(IMPORT_LESS_BARE, paired, note="" if paired else "no pair measured")
    return {
        "import": [rows[BARE], rows[IMPORT_OFFLOAD], less_bare],
        "fork": [rows[n] for n in rows if n.endswith("(fork)")],
        "spawn": [
            rows[SPAWN_FLOOR],
            rows[TWO_PYTHONS_PROGRAM],
            *(rows[n] for n in rows if n.endswith("(spawn)")),
        ],
    }
