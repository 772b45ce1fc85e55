"""Round trip of a tiny call (``abs(-1)``) on a warm worker.

Every contender is started and warmed up first; then the calls are measured in rounds,
one slice per contender per round, so that slow drifts of the machine (frequency, other
load) hit every contender alike.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks import attempt, failure, require
from benchmarks.raw_floor import RawWorker
from benchmarks.report import Row


@dataclass
class Contender:
    name: str
    call: Callable[[], object]
    close: Callable[[], None]
    samples: list[float] = field(default_factory=list)
    error: str = ""


def _raw() -> Contender:
    w = RawWorker()
    return Contender("raw socketpair (floor)", lambda: w.call(abs, -1), w.close)


def _offload() -> Contender:
    import offload

    w = offload.spawn()
    return Contender("offload", lambda: w.call(abs, -1), lambda: w.shutdown(timeout=5))


def _ppe() -> Contender:
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(max_workers=1)
    return Contender("ProcessPoolExecutor", lambda: ex.submit(abs, -1).result(), ex.shutdown)


def _mp_pool() -> Contender:
    import multiprocessing

    pool = multiprocessing.Pool(1)

    def close() -> None:
        pool.close()
        pool.join()

    return Contender("multiprocessing.Pool", lambda: pool.apply(abs, (-1,)), close)


def _loky() -> Contender:
    loky: Any = require("loky")
    ex = loky.get_reusable_executor(max_workers=1)
    return Contender(
        "loky", lambda: ex.submit(abs, -1).result(), lambda: ex.shutdown(kill_workers=True)
    )


def _pebble() -> Contender:
    pebble: Any = require("pebble")
    pool = pebble.ProcessPool(max_workers=1)

    def close() -> None:
        pool.close()
        pool.join()

    return Contender("pebble", lambda: pool.schedule(abs, args=(-1,)).result(), close)


FACTORIES: list[tuple[str, Callable[[], Contender]]] = [
    ("raw socketpair (floor)", _raw),
    ("offload", _offload),
    ("ProcessPoolExecutor", _ppe),
    ("multiprocessing.Pool", _mp_pool),
    ("loky", _loky),
    ("pebble", _pebble),
]


def run(calls: int, warmup: int, rounds: int) -> list[Row]:
    """``calls`` measured calls per contender, after ``warmup`` unmeasured ones."""
    return measure(FACTORIES, calls, warmup, rounds)


def measure(
    factories: list[tuple[str, Callable[[], Contender]]], calls: int, warmup: int, rounds: int
) -> list[Row]:
    """Start every contender, warm it up, then time its calls in ``rounds`` slices that
    alternate between contenders; rows in the order of ``factories``."""
    contenders: list[Contender] = []
    rows: dict[str, Row] = {}
    try:
        for name, factory in factories:
            c, note = attempt(factory)
            if c is None:
                rows[name] = Row(name, None, note=note)
                continue
            c.name = name
            contenders.append(c)
            try:
                for _ in range(warmup):
                    c.call()
            except Exception as exc:  # noqa: BLE001 - reported in the table
                c.error = failure(exc)
        per_round = max(1, calls // rounds)
        clock = time.perf_counter
        for _ in range(rounds):
            for c in contenders:
                if c.error:
                    continue
                call, out = c.call, c.samples
                try:
                    for _ in range(per_round):
                        t0 = clock()
                        call()
                        out.append(clock() - t0)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    c.error = failure(exc)
    finally:
        for c in contenders:
            try:
                c.close()
            except Exception as exc:  # noqa: BLE001 - report, keep cleaning up
                print(f"benchmarks: closing {c.name} failed: {exc!r}", file=sys.stderr)
    for c in contenders:
        rows[c.name] = Row(c.name, None if c.error else c.samples, note=c.error)
    return [rows[name] for name, _ in factories]
