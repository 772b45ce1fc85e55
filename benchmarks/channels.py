"""Channel throughput: tiny items (small ints) streamed between a parent and one worker.

Both directions: a worker sending to the parent, the parent sending to a worker. The
peer is a ``multiprocessing.Queue`` between the parent and a ``multiprocessing.Process``
(the ``spawn`` context, like offload's default), with the same item count; both sides
are started and warm before the clock runs. A sample is the time per item of one run
(from the first item to the last one received), shown as items per second.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from benchmarks import failure
from benchmarks.report import Row

OFFLOAD_UP = "offload channel (worker → parent)"
OFFLOAD_DOWN = "offload channel (parent → worker)"
QUEUE_UP = "multiprocessing.Queue (worker → parent)"
QUEUE_DOWN = "multiprocessing.Queue (parent → worker)"
MAXSIZE = 1024  # both: bounded, so that back-pressure is part of what is measured


# -- what the workers run (module-level: imported by reference) --------------------------


def produce(tx: Any, n: int) -> float:
    """Send 0..n-1 on an offload channel."""
    send = tx.send
    for i in range(n):
        send(i)
    return 0.0


def consume(rx: Any, n: int) -> int:
    """Receive everything on an offload channel; how many."""
    count = 0
    for _ in rx:
        count += 1
    return count


def queue_produce(q: Any, n: int, ready: Any, go: Any) -> None:
    """Send 0..n-1 then None on a multiprocessing.Queue, when told to start."""
    ready.set()
    go.wait()
    put = q.put
    for i in range(n):
        put(i)
    put(None)


def queue_consume(q: Any, ready: Any, done: Any) -> None:
    """Receive until None on a multiprocessing.Queue, then say so."""
    ready.set()
    get = q.get
    while get() is not None:
        pass
    done.set()


# -- the runs -----------------------------------------------------------------------------


def _offload_up(pool: Any, n: int) -> float:
    import offload

    tx, rx = offload.channel(maxsize=MAXSIZE)
    t0 = time.perf_counter()
    fut = pool.submit(produce, tx, n)
    count = sum(1 for _ in rx)
    t1 = time.perf_counter()
    fut.result(timeout=60)
    assert count == n, count
    return (t1 - t0) / n


def _offload_down(pool: Any, n: int) -> float:
    import offload

    tx, rx = offload.channel(maxsize=MAXSIZE)
    fut = pool.submit(consume, rx, n)
    t0 = time.perf_counter()
    send = tx.send
    for i in range(n):
        send(i)
    tx.close()
    count = fut.result(timeout=60)
    t1 = time.perf_counter()
    assert count == n, count
    return (t1 - t0) / n


def _queue_up(ctx: Any, n: int) -> float:
    q = ctx.Queue(MAXSIZE)
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=queue_produce, args=(q, n, ready, go))
    proc.start()
    try:
        ready.wait(60)
        t0 = time.perf_counter()
        go.set()
        get = q.get  # no timeout: the queue's fastest path (the producer is up)
        count = 0
        while get() is not None:
            count += 1
        t1 = time.perf_counter()
        assert count == n, count
        return (t1 - t0) / n
    finally:
        proc.join(60)


def _queue_down(ctx: Any, n: int) -> float:
    q = ctx.Queue(MAXSIZE)
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=queue_consume, args=(q, ready, done))
    proc.start()
    try:
        ready.wait(60)
        t0 = time.perf_counter()
        put = q.put
        for i in range(n):
            put(i)
        put(None)
        done.wait(60)
        t1 = time.perf_counter()
        return (t1 - t0) / n
    finally:
        proc.join(60)


def run(items: int, reps: int) -> list[Row]:
    """Rows for both directions, offload first; ``reps`` runs of ``items`` items each."""
    rows: list[Row] = []
    import offload

    samples: dict[str, list[float]] = {OFFLOAD_UP: [], OFFLOAD_DOWN: []}
    notes: dict[str, str] = {}
    try:
        with offload.Pool(workers=1) as pool:
            pool.submit(abs, -1).result(timeout=60)  # warm
            _offload_up(pool, min(items, 1000))
            _offload_down(pool, min(items, 1000))
            for _ in range(reps):
                samples[OFFLOAD_UP].append(_offload_up(pool, items))
                samples[OFFLOAD_DOWN].append(_offload_down(pool, items))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        notes[OFFLOAD_UP] = notes[OFFLOAD_DOWN] = failure(exc)
    ctx = multiprocessing.get_context("spawn")
    queue_samples: dict[str, list[float]] = {QUEUE_UP: [], QUEUE_DOWN: []}
    try:
        for _ in range(reps):
            queue_samples[QUEUE_UP].append(_queue_up(ctx, items))
            queue_samples[QUEUE_DOWN].append(_queue_down(ctx, items))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        notes[QUEUE_UP] = notes[QUEUE_DOWN] = failure(exc)
    for name, values in (*samples.items(), *queue_samples.items()):
        rows.append(Row(name, values or None, note=notes.get(name, "")))
    return rows
