"""Pool throughput with 2 workers: many tiny calls submitted at once, and ``map``.

*Submit all, then wait all*: ``calls`` calls of ``abs(-1)`` are submitted one by one with
no chunking by the user, then every result is collected; the time covers both. *Map*:
``map(abs, range(items))`` into a list; offload sizes its chunks itself
(``chunksize=None``), every peer gets the best of a few chunk sizes (tried once each,
then measured at the best). Calls with a chunk size below 100 go over a tenth of the
items (their cost is per item; the full run would take minutes).

Contenders run one at a time: each pool is started, warmed up, measured and shut down
before the next one starts, so no idle pool's threads compete with the one measured.
The runs go in rounds (each contender started, measured once and closed per round), so
that a machine whose speed drifts during the run moves every contender's samples alike. A
sample is the run's time divided by its number of calls (items); the table shows its
inverse, calls (items) per second.

Each timed run starts after a full garbage collection (:func:`_settled`). Every run
leaves objects that survived into the oldest generation; once enough of them accumulate,
the collector walks the whole heap of this process (which holds every benchmark's
imports and samples), and after a fork (the fork pools, the raw floor) that walk also
takes a page fault for each page the children shared: 100 ms and more, landing in
whichever contender's run happens to cross the threshold. Collecting before each timed
run clears that debt for everyone alike; a collection a run triggers itself still counts.
"""

from __future__ import annotations

import gc
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any

from benchmarks import attempt, failure, require, tasks
from benchmarks.raw_pool import RawPool
from benchmarks.report import Row

WORKERS = 2
SUBMIT_FLOOR = "raw pipelined socketpairs (floor)"
MAP_FLOOR = "raw chunked socketpairs (floor)"
SMALL_CHUNK = 100  # chunk sizes below this run over a tenth of the items


def _check(results: Sequence[Any], n: int, total: int | None = None) -> None:
    """Raise unless there are ``n`` results: ones, or summing to ``total``."""
    if len(results) != n:
        raise RuntimeError(f"{len(results)} results for {n} calls")
    if (results.count(1) != n) if total is None else (sum(results) != total):
        raise RuntimeError("wrong results")


def _remaining(deadline: float) -> float:
    left = deadline - time.perf_counter()
    if left <= 0:
        raise TimeoutError("gave up waiting for the results")
    return left


class _Watchdog:
    """Calls ``abort`` if the block takes longer than ``limit`` seconds (for APIs with no
    timeout of their own); the aborted call then fails instead of hanging."""

    def __init__(self, limit: float, abort: Callable[[], None]) -> None:
        self.fired = False

        def fire() -> None:
            self.fired = True
            abort()

        self.timer = threading.Timer(limit, fire)
        self.timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        if self.fired:
            raise TimeoutError("gave up waiting for the results (pool aborted)")


# -- submit all, then wait all --------------------------------------------------------------


@dataclass
class Submitter:
    name: str
    run: Callable[[int, float], list[Any]]  # (calls, limit) -> results
    close: Callable[[], None]
    note: str = ""
    samples: list[float] = field(default_factory=list)
    error: str = ""


def offload_submit(method: str) -> Callable[[], Submitter]:
    def make() -> Submitter:
        import offload

        pool = offload.Pool(workers=WORKERS, start_method=method)

        return Submitter(f"offload ({method})", submit_all(pool), lambda: pool.shutdown(timeout=5))

    return make


def submit_all(pool: Any) -> Callable[[int, float], list[Any]]:
    """Submit ``n`` tiny calls to an offload pool, then wait for them all; a hang is
    reported with how far it got and the pool's state."""

    def run(n: int, limit: float) -> list[Any]:
        deadline = time.perf_counter() + limit
        futures = [pool.submit(abs, -1) for _ in range(n)]
        out = []
        try:
            for f in futures:
                out.append(f.result(_remaining(deadline)))
        except TimeoutError:
            s = pool.stats()
            raise TimeoutError(
                f"{len(out)}/{n} results in {limit:g} s (busy={s.busy} idle={s.idle} "
                f"starting={s.starting} queued={s.queued} running={s.running} "
                f"restarts={s.restarts})"
            ) from None
        return out

    return run


def _executor_submit(name: str, ex: Any, close: Callable[[], None], note: str) -> Submitter:
    def run(n: int, limit: float) -> list[Any]:
        deadline = time.perf_counter() + limit
        futures = [ex.submit(abs, -1) for _ in range(n)]
        return [f.result(_remaining(deadline)) for f in futures]

    return Submitter(name, run, close, note)


def _ppe_submit() -> Submitter:
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(max_workers=WORKERS)
    method = multiprocessing.get_start_method()
    return _executor_submit("ProcessPoolExecutor", ex, ex.shutdown, f"{method}; submit")


def _loky_submit() -> Submitter:
    loky: Any = require("loky")
    ex = loky.get_reusable_executor(max_workers=WORKERS)
    return _executor_submit("loky", ex, lambda: ex.shutdown(wait=True, kill_workers=True), "submit")


def _async_results_submit(
    name: str, apply_async: Callable[[], Any], close: Callable[[], None], note: str
) -> Submitter:
    """Pools whose ``apply_async`` returns an object with ``get(timeout)``."""

    def run(n: int, limit: float) -> list[Any]:
        deadline = time.perf_counter() + limit
        pending = [apply_async() for _ in range(n)]
        return [r.get(_remaining(deadline)) for r in pending]

    return Submitter(name, run, close, note)


def _mp_pool_submit() -> Submitter:
    pool = multiprocessing.Pool(WORKERS)

    def close() -> None:
        pool.close()
        pool.join()

    method = multiprocessing.get_start_method()
    return _async_results_submit(
        "multiprocessing.Pool",
        lambda: pool.apply_async(abs, (-1,)),
        close,
        f"{method}; apply_async",
    )


def _pebble_submit() -> Submitter:
    pebble: Any = require("pebble")
    pool = pebble.ProcessPool(max_workers=WORKERS)

    def close() -> None:
        pool.stop()
        pool.join(timeout=5)

    return _executor_submit(
        "pebble", _Schedule(pool), close, f"{multiprocessing.get_start_method()}; schedule"
    )


class _Schedule:
    """pebble's ``schedule`` as ``submit``."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.schedule(fn, args=args)


def _mpire_submit() -> Submitter:
    mpire: Any = require("mpire")
    pool = mpire.WorkerPool(n_jobs=WORKERS)
    return _async_results_submit(
        "mpire",
        lambda: pool.apply_async(abs, args=(-1,)),
        pool.terminate,
        "fork; apply_async",
    )


def _raw_submit() -> Submitter:
    raw = RawPool(WORKERS)
    request = (abs, (-1,))

    def run(n: int, limit: float) -> list[Any]:
        return raw.run([request] * n, batch=256, window=1024, limit=limit)

    return Submitter(SUBMIT_FLOOR, run, raw.close, "256 calls per write, 1024 in flight")


SUBMITTERS: list[tuple[str, Callable[[], Submitter]]] = [
    (SUBMIT_FLOOR, _raw_submit),
    ("offload (spawn)", offload_submit("spawn")),
    ("offload (fork)", offload_submit("fork")),
    ("ProcessPoolExecutor", _ppe_submit),
    ("multiprocessing.Pool", _mp_pool_submit),
    ("loky", _loky_submit),
    ("pebble", _pebble_submit),
    ("mpire", _mpire_submit),
]


def run_submit(
    calls: int,
    reps: int,
    limit: float,
    factories: list[tuple[str, Callable[[], Submitter]]] = SUBMITTERS,
) -> list[Row]:
    """``reps`` runs of ``calls`` tiny calls per contender, each after a warm-up run, in
    rounds (see :func:`_in_rounds`)."""

    def measure_once(c: Submitter) -> None:
        warm = min(calls, 5000)  # a fresh pool: its processes' first calls are slower
        _check(c.run(warm, limit), warm)
        _settled()
        t0 = time.perf_counter()
        results = c.run(calls, limit)
        t1 = time.perf_counter()
        _check(results, calls)
        c.samples.append((t1 - t0) / calls)

    return _in_rounds(factories, reps, measure_once)


def _in_rounds(
    factories: Sequence[tuple[str, Callable[[], Any]]], rounds: int, measure_once: Any
) -> list[Row]:
    """``rounds`` rounds; in each, every contender in turn is started, measured once
    (``measure_once`` adds one sample) and closed. Only one pool lives at a time, so no
    idle pool's threads compete for the GIL with the one measured (and offload's pools,
    which share one I/O thread per process, don't share it here); and every contender's
    samples span the whole run, so a machine that slows down or speeds up halfway
    through shifts all of them alike instead of the ratios. The order rotates from
    round to round, so no contender always follows the same one (whose processes may
    still be exiting). A contender that fails is left out of the later rounds. Rows in
    the order of ``factories``."""
    made: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for r in range(rounds):
        shift = r % len(factories)  # each round starts with another contender
        for name, factory in [*factories[shift:], *factories[:shift]]:
            if name in notes:
                continue  # could not start, or failed in an earlier round
            c, note = attempt(factory)
            if c is None:
                notes[name] = note
                continue
            c.name = name
            if name in made:  # what the earlier rounds found out
                c.__dict__.update(made[name].__dict__ | {"run": c.run, "close": c.close})
            made[name] = c
            try:
                measure_once(c)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                print(f"benchmarks: {name}: {exc!r}", file=sys.stderr)
                c.error = failure(exc)
                notes[name] = c.error
            finally:
                _close_all([c])
    rows: dict[str, Row] = {}
    for name, _ in factories:
        c = made.get(name)
        if c is None or c.error:
            rows[name] = Row(name, None, note=notes.get(name, ""))
        else:
            rows[name] = Row(name, c.samples or None, note=c.note)
    return [rows[name] for name, _ in factories]


def _close_all(contenders: Sequence[Any]) -> None:
    for c in contenders:
        try:
            c.close()
        except Exception as exc:  # noqa: BLE001 - report, keep cleaning up
            print(f"benchmarks: closing {c.name} failed: {exc!r}", file=sys.stderr)


# -- map ----------------------------------------------------------------------------------


@dataclass
class Mapper:
    name: str
    run: Callable[[list[int], int | None, float], list[Any]]  # (items, chunksize, limit)
    close: Callable[[], None]
    sweep: bool = True  # try several chunk sizes (False: chunksize=None, offload's own)
    note: str = ""
    best: int | None = None
    tried: dict[int, float] = field(default_factory=dict)  # chunk size -> seconds/item
    samples: list[float] = field(default_factory=list)
    error: str = ""


def _offload_map(auto: bool) -> Callable[[], Mapper]:
    def make() -> Mapper:
        import offload

        pool = offload.Pool(workers=WORKERS)

        def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
            return list(pool.map(abs, items, chunksize=chunksize, timeout=limit))

        name = "offload" if auto else "offload (fixed chunksize)"
        note = "spawn; chunksize=None" if auto else "spawn; for comparison"
        return Mapper(name, run, lambda: pool.shutdown(timeout=5), sweep=not auto, note=note)

    return make


def _ppe_map() -> Mapper:
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(max_workers=WORKERS)

    def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
        return list(ex.map(abs, items, chunksize=chunksize or 1, timeout=limit))

    return Mapper("ProcessPoolExecutor", run, ex.shutdown, note=multiprocessing.get_start_method())


def _mp_pool_map() -> Mapper:
    pool = multiprocessing.Pool(WORKERS)

    def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
        result: list[Any] = pool.map_async(abs, items, chunksize=chunksize).get(limit)
        return result

    def close() -> None:
        pool.close()
        pool.join()

    return Mapper("multiprocessing.Pool", run, close, note=multiprocessing.get_start_method())


def _loky_map() -> Mapper:
    loky: Any = require("loky")
    ex = loky.get_reusable_executor(max_workers=WORKERS)

    def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
        return list(ex.map(abs, items, chunksize=chunksize or 1, timeout=limit))

    return Mapper("loky", run, lambda: ex.shutdown(wait=True, kill_workers=True))


def _pebble_map() -> Mapper:
    pebble: Any = require("pebble")
    pool = pebble.ProcessPool(max_workers=WORKERS)

    def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
        future = pool.map(abs, items, chunksize=chunksize or 1)
        _, pending = wait(future.futures, timeout=limit)
        if pending:
            future.cancel()
            raise TimeoutError("gave up waiting for the results")
        return list(future.result())

    def close() -> None:
        pool.stop()
        pool.join(timeout=5)

    return Mapper("pebble", run, close, note=multiprocessing.get_start_method())


def _mpire_map() -> Mapper:
    mpire: Any = require("mpire")
    # keep_alive: the workers survive between map calls, like every other pool's.
    pool = mpire.WorkerPool(n_jobs=WORKERS, keep_alive=True)

    def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
        with _Watchdog(limit, pool.terminate):
            result: list[Any] = pool.map(abs, items, chunk_size=chunksize)
        return result

    return Mapper("mpire", run, pool.terminate, note="fork; keep_alive=True")


def _raw_map() -> Mapper:
    raw = RawPool(WORKERS)

    def run(items: list[int], chunksize: int | None, limit: float) -> list[Any]:
        size = chunksize or 1
        messages = [
            (tasks.map_chunk, (abs, items[i : i + size])) for i in range(0, len(items), size)
        ]
        out: list[Any] = []
        for chunk in raw.run(messages, batch=1, window=4, limit=limit):
            out += chunk
        return out

    return Mapper(MAP_FLOOR, run, raw.close, note="unordered; 4 chunks in flight per worker")


MAPPERS: list[tuple[str, Callable[[], Mapper]]] = [
    (MAP_FLOOR, _raw_map),
    ("offload", _offload_map(auto=True)),
    ("offload (fixed chunksize)", _offload_map(auto=False)),
    ("ProcessPoolExecutor", _ppe_map),
    ("multiprocessing.Pool", _mp_pool_map),
    ("loky", _loky_map),
    ("pebble", _pebble_map),
    ("mpire", _mpire_map),
]


def _rate(seconds_per_item: float) -> str:
    rate = 1.0 / seconds_per_item
    if rate >= 1e6:
        return f"{rate / 1e6:.1f}M"
    if rate >= 1e3:
        return f"{rate / 1e3:.0f}k"
    return f"{rate:.0f}"


def _settled() -> None:
    """A full garbage collection before a timed run (see the module docstring)."""
    gc.collect()


def _map_once(m: Mapper, items: list[int], chunksize: int | None, limit: float) -> float:
    """Seconds per item of one checked run (after a full collection, as every timed run)."""
    _settled()
    t0 = time.perf_counter()
    results = m.run(items, chunksize, limit)
    t1 = time.perf_counter()
    _check(results, len(items), sum(abs(x) for x in items))
    return (t1 - t0) / len(items)


def run_map(items: int, reps: int, chunksizes: Sequence[int], limit: float) -> list[Row]:
    """``reps`` runs per contender, in rounds (see :func:`_in_rounds`), each after an
    untimed one; in the first, each peer's chunk-size sweep (once each) is that one."""
    data = list(range(-items // 2, items - items // 2))

    def measure_once(m: Mapper) -> None:
        _map_once(m, data[: min(items, 2000)], 100 if m.sweep else None, limit)
        if m.best is not None or not m.sweep:
            _map_once(m, data, m.best, limit)  # a fresh pool: a first full run, untimed
        else:
            for size in chunksizes:
                part = data if size >= SMALL_CHUNK else data[: max(1, items // 10)]
                m.tried[size] = _map_once(m, part, size, limit)
            m.best = min(m.tried, key=lambda size: m.tried[size])
            tried = ", ".join(f"{size}: {_rate(s)}" for size, s in m.tried.items())
            m.note = "; ".join(x for x in (m.note, f"chunksize={m.best} (tried {tried} /s)") if x)
        m.samples.append(_map_once(m, data, m.best, limit))

    return _in_rounds(MAPPERS, reps, measure_once)
