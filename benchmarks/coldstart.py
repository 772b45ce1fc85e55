"""Cold start: create one worker and get the result of a tiny call.

Timed from the constructor call to the first result; shutting down is not timed. The
floor is a bare ``python -c pass`` of the same interpreter, started with
:mod:`subprocess`. Each contender has one untimed warm-up start first (so the parent's
own imports are not counted), and the repetitions are interleaved across contenders.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import attempt, failure, require
from benchmarks.report import Row

FLOOR = "bare python -c pass (floor)"
FORK_NOTE = "forks the parent: no fresh interpreter"


def _bare() -> Callable[[], None]:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return lambda: None


def _offload() -> Callable[[], None]:
    import offload

    w = offload.spawn()
    w.call(abs, -1)
    return lambda: w.shutdown(timeout=5)


def _ppe(method: str | None) -> Callable[[], Callable[[], None]]:
    def start() -> Callable[[], None]:
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context(method)
        ex = ProcessPoolExecutor(max_workers=1, mp_context=ctx)
        ex.submit(abs, -1).result()
        return ex.shutdown

    return start


def _mp_pool() -> Callable[[], None]:
    pool = multiprocessing.Pool(1)
    pool.apply(abs, (-1,))

    def close() -> None:
        pool.close()
        pool.join()

    return close


def _loky() -> Callable[[], None]:
    loky: Any = require("loky")
    ex = loky.ProcessPoolExecutor(max_workers=1)
    ex.submit(abs, -1).result()
    return lambda: ex.shutdown(wait=True, kill_workers=True)


def _pebble() -> Callable[[], None]:
    pebble: Any = require("pebble")
    pool = pebble.ProcessPool(max_workers=1)
    pool.schedule(abs, args=(-1,)).result()

    def close() -> None:
        pool.close()
        pool.join(timeout=5)

    return close


def _contenders() -> list[tuple[str, Callable[[], Callable[[], None]], str]]:
    """(name, start → close, note) in table order."""
    default = multiprocessing.get_start_method()
    fork_note = FORK_NOTE if default == "fork" else ""
    out = [
        (FLOOR, _bare, ""),
        ("offload", _offload, "spawn: fresh interpreter"),
        (f"ProcessPoolExecutor ({default})", _ppe(None), fork_note),
    ]
    if default != "spawn":
        out.append(("ProcessPoolExecutor (spawn)", _ppe("spawn"), "fresh interpreter"))
    out += [
        (f"multiprocessing.Pool ({default})", _mp_pool, fork_note),
        ("loky", _loky, "loky: fresh interpreter"),
        (f"pebble ({default})", _pebble, fork_note),
    ]
    return out


def stale_bytecode_note() -> str | None:
    """A warning when workers must compile offload from source at every start: Python
    does not write bytecode (``PYTHONDONTWRITEBYTECODE``, ``-B``) and offload's cached
    ``.pyc`` files are missing or older than their sources."""
    if not sys.dont_write_bytecode:
        return None
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("offload")
    if spec is None or spec.origin is None:
        return None
    stale = 0
    for source in Path(spec.origin).parent.rglob("*.py"):
        cached = Path(importlib.util.cache_from_source(str(source)))
        if not cached.exists() or cached.stat().st_mtime < source.stat().st_mtime:
            stale += 1
    if not stale:
        return None
    return (
        f"Python writes no bytecode here (PYTHONDONTWRITEBYTECODE / -B) and {stale} of "
        "offload's modules have no up-to-date .pyc, so every worker compiles them at start; "
        "an installed offload would not (try PYTHONPYCACHEPREFIX=/tmp/pyc with "
        "PYTHONDONTWRITEBYTECODE unset)"
    )


def run(reps: int) -> list[Row]:
    return measure(_contenders(), reps)


def measure(
    contenders: list[tuple[str, Callable[[], Callable[[], None]], str]], reps: int
) -> list[Row]:
    """``reps`` timed starts per contender (``start()`` returns the untimed ``close``),
    after one untimed warm-up start each; repetitions alternate between contenders."""
    rows = {name: Row(name, [], note=note) for name, _, note in contenders}
    active = []
    for name, start, _ in contenders:
        # Warm-up: the parent's imports, the interpreter's file cache.
        _, note = attempt(lambda start=start: start()())
        if note:
            rows[name] = Row(name, None, note=note)
            continue
        active.append((name, start))
    for _ in range(reps):
        for name, start in list(active):
            try:
                t0 = time.perf_counter()
                close = start()
                t1 = time.perf_counter()
                close()
            except Exception as exc:  # noqa: BLE001 - reported in the table
                rows[name] = Row(name, None, note=failure(exc))
                active.remove((name, start))
                continue
            samples = rows[name].samples
            assert samples is not None
            samples.append(t1 - t0)
    return [rows[name] for name, _, _ in contenders]
