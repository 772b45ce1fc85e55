"""A call's ``async for`` over its channel's receiving end: items per second.

The parent streams tiny items (small ints) to a call that iterates its ``rx`` with
``async for`` inside ``asyncio.run``, on two kinds of worker: a pool worker that runs its
calls on the thread that reads its socket (``concurrency=1``: an end waiting for items
reads the socket itself) and one with ``concurrency=2`` (a reader thread routes the
items). The floor is the same stream consumed by a plain ``for`` loop in a
``concurrency=1`` worker. A sample is the time per item of one run, from the submission
to the result (shown as items per second). Run alone with
``python -m benchmarks.channel_async [items] [reps]``, or as the ``channel-async``
section of ``python -m benchmarks``.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks import failure
from benchmarks.report import Row

ASYNC_INLINE = "async for in a call (worker reads its own socket)"
ASYNC_THREADED = "async for in a call (concurrency=2: a reader thread)"
SYNC = "for in a call (worker reads its own socket)"
MAXSIZE = 1024  # bounded: back-pressure is part of what is measured


def consume_async(rx: Any) -> int:
    """Count what ``rx`` yields to ``async for`` (in the worker)."""
    import asyncio

    async def count() -> int:
        n = 0
        async for _ in rx:
            n += 1
        return n

    return asyncio.run(count())


def consume_sync(rx: Any) -> int:
    """Count what ``rx`` yields to a plain ``for`` (in the worker)."""
    n = 0
    for _ in rx:
        n += 1
    return n


def _one_run(pool: Any, consume: Any, n: int) -> float:
    """Seconds per item of one run of ``n`` items."""
    import offload

    tx, rx = offload.channel(maxsize=MAXSIZE)
    start = time.perf_counter()
    fut = pool.submit(consume, rx)
    send = tx.send
    for i in range(n):
        send(i)
    tx.close()
    got = fut.result(timeout=600)
    elapsed = time.perf_counter() - start
    if got != n:
        raise RuntimeError(f"the worker counted {got} items, not {n}")
    return elapsed / n


def run(items: int, reps: int) -> list[Row]:
    """One row per contender, ``reps`` runs of ``items`` items each."""
    import offload

    rows: list[Row] = []
    for name, consume, options in (
        (ASYNC_INLINE, consume_async, {"workers": 1}),
        (ASYNC_THREADED, consume_async, {"workers": 1, "concurrency": 2}),
        (SYNC, consume_sync, {"workers": 1}),
    ):
        try:
            with offload.Pool(**options) as pool:
                _one_run(pool, consume, min(items, 1000))  # warm: started, imports done
                rows.append(Row(name, [_one_run(pool, consume, items) for _ in range(reps)]))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append(Row(name, None, note=failure(exc)))
    return rows


if __name__ == "__main__":
    import sys

    from benchmarks import make_importable

    make_importable()
    # The module by its name: the workers import the consumers by reference.
    from benchmarks.channel_async import run as run_by_reference

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    for row in run_by_reference(n, r):
        rate = f"{1 / row.median:,.0f} items/s" if row.median else row.note
        print(f"{row.system}: {rate} (median of {r})")
