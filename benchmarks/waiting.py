"""Every way of waiting for offload futures, and functions that travel by value.

*Flood*: ``calls`` tiny calls (``abs(-1)``) submitted at once to a pool of 2, then
waited for in one of the ways Python offers: ``result()`` on each (the reference),
``concurrent.futures.wait``, ``as_completed``, a done callback on each, ``await`` on
each, ``asyncio.gather``, and ``loop.run_in_executor`` for every call (gathered). The
time covers submitting and waiting. ``multiprocessing.Pool`` (``apply_async``, then
``get()`` on each) is the peer. A reference row measures asyncio alone: the same
``run_in_executor`` flood (and, in the round trip, one call) on an executor that runs
``abs(-1)`` in place and returns a done ``concurrent.futures.Future``; what asyncio
spends per call there bounds offload's ``run_in_executor`` ratios. Another measures
``asyncio.gather`` of one awaitable whose value is ready (the task asyncio makes for
a pending offload future, and its turns of the loop).

*Round trip*: one tiny call at a time, submitted then waited for in each of those ways,
on a pool of 1 (``multiprocessing.Pool.apply`` as the peer). Asynchronous ways are timed
inside one running event loop.

*Functions*: the round trip of ``echo(1)`` with ``echo`` a module-level function (it
travels by reference), a function defined in ``__main__``, a lambda and a closure (these
travel by value), on a local worker and through a local ``offload serve``.

All contenders of a section share one pool and run in rounds (each style measured once
per round, in turn), so that a machine whose speed drifts moves every style alike; the
ratios are against the ``result()`` path (the module function) in the same run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from benchmarks import failure
from benchmarks.report import Row, Section, Target

WORKERS = 2
RESULT = "offload, result() on each"
PEER = "multiprocessing.Pool"
FLOOD_STYLES = (
    RESULT,
    "offload, concurrent.futures.wait",
    "offload, as_completed",
    "offload, add_done_callback",
    "offload, await each",
    "offload, asyncio.gather",
    "offload, loop.run_in_executor",
)
SINGLE_STYLES = (
    "offload, result()",
    "offload, concurrent.futures.wait([f])",
    "offload, as_completed([f])",
    "offload, add_done_callback",
    "offload, await f",
    "offload, asyncio.gather(f)",
    "offload, loop.run_in_executor",
)
# asyncio's own cost, with no offload in it: what bounds the run_in_executor ratios.
ASYNCIO_FLOOR = "reference: asyncio alone, run_in_executor on an executor doing nothing"
GATHER_FLOOR = "reference: asyncio alone, gather(an awaitable with its value ready)"
MODULE_FUNCTION = "module function (by reference)"
FUNCTION_KINDS = (
    MODULE_FUNCTION,
    "function defined in __main__",
    "lambda",
    "closure",
)
REMOTE = "remote: "


def echo(x: Any) -> Any:
    """A module-level task: travels by reference."""
    return x


def _main_echo() -> Callable[[Any], Any]:
    """``echo`` defined in ``__main__`` (as in a script or a notebook): it travels by
    value, like any function a worker cannot import."""
    main = sys.modules["__main__"]
    name = "_offload_benchmark_echo"
    if not hasattr(main, name):
        exec(
            compile("def _offload_benchmark_echo(x):\n    return x\n", "<main>", "exec"), vars(main)
        )
    fn: Callable[[Any], Any] = getattr(main, name)
    assert fn.__module__ == "__main__"
    return fn


def _closure(k: int) -> Callable[[Any], Any]:
    def add(x: Any) -> Any:
        return x + k

    return add


# -- flood ---------------------------------------------------------------------------------


class _Inline(concurrent.futures.Executor):
    """An executor that does nothing but run the call where it is submitted: what
    ``loop.run_in_executor`` costs asyncio itself, with no executor to speak of."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


class _Ready:
    """An awaitable whose value is ready: what ``asyncio.gather`` costs asyncio itself
    (a task, and its turns of the loop) for one awaitable that is not an asyncio
    future."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self.value
        yield  # a generator that never waits


def _flood(pool: Any, style: str, n: int, loop: asyncio.AbstractEventLoop) -> None:
    """Submit ``n`` calls of ``abs(-1)`` and wait for them the way ``style`` says."""
    if style == ASYNCIO_FLOOR:
        pool = _Inline()
    if style.endswith("run_in_executor") or style == ASYNCIO_FLOOR:

        async def via_executor() -> list[Any]:
            running = asyncio.get_running_loop()
            return await asyncio.gather(*[running.run_in_executor(pool, abs, -1) for _ in range(n)])

        _check(loop.run_until_complete(via_executor()), n)
        return
    futures = [pool.submit(abs, -1) for _ in range(n)]
    if style == RESULT:
        results = [f.result() for f in futures]
    elif style.endswith("concurrent.futures.wait"):
        concurrent.futures.wait(futures)
        results = [f.result() for f in futures]
    elif style.endswith("as_completed"):
        results = [f.result() for f in concurrent.futures.as_completed(futures)]
    elif style.endswith("add_done_callback"):
        _callbacks(futures)
        results = [f.result() for f in futures]
    elif style.endswith("await each"):

        async def each() -> list[Any]:
            return [await f for f in futures]

        results = loop.run_until_complete(each())
    else:

        async def gather() -> list[Any]:
            return await asyncio.gather(*futures)

        results = loop.run_until_complete(gather())
    _check(results, n)


def _callbacks(futures: list[Any]) -> None:
    """Wait for ``futures`` with a done callback on each (the last one sets an event)."""
    left = [len(futures)]
    lock = threading.Lock()
    done = threading.Event()

    def one(_: object) -> None:
        with lock:
            left[0] -= 1
            if not left[0]:
                done.set()

    for f in futures:
        f.add_done_callback(one)
    done.wait()


def _check(results: list[Any], n: int) -> None:
    if len(results) != n or results.count(1) != n:
        raise RuntimeError(f"wrong results ({len(results)} for {n} calls)")


def _mp_flood(pool: Any, n: int) -> None:
    pending = [pool.apply_async(abs, (-1,)) for _ in range(n)]
    _check([r.get() for r in pending], n)


def run_flood(calls: int, reps: int) -> list[Row]:
    """``reps`` rounds of a flood per style (and the peer); samples are seconds per call."""
    import multiprocessing

    import offload

    samples: dict[str, list[float]] = {s: [] for s in (*FLOOD_STYLES, PEER, ASYNCIO_FLOOR)}
    errors: dict[str, str] = {}
    loop = asyncio.new_event_loop()
    pool = offload.Pool(workers=WORKERS)
    peer = multiprocessing.Pool(WORKERS)
    try:
        pool.submit(abs, -1).result()
        peer.apply(abs, (-1,))
        runs: list[tuple[str, Callable[[], None]]] = [
            (s, lambda s=s: _flood(pool, s, calls, loop))  # type: ignore[misc]
            for s in FLOOD_STYLES
        ]
        runs.append((PEER, lambda: _mp_flood(peer, calls)))
        runs.append((ASYNCIO_FLOOR, lambda: _flood(pool, ASYNCIO_FLOOR, calls, loop)))
        for _ in range(reps):
            for name, run in runs:
                if name in errors:
                    continue
                gc.collect()  # see pool_throughput: no contender pays another's debt
                started = time.perf_counter()
                try:
                    run()
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    errors[name] = failure(exc)
                    continue
                samples[name].append((time.perf_counter() - started) / calls)
    finally:
        pool.shutdown(timeout=5)
        peer.close()
        peer.join()
        loop.close()
    return [
        Row(name, None if name in errors else samples[name], errors.get(name, ""))
        for name in samples
    ]


# -- round trips ------------------------------------------------------------------------------


@dataclass
class _Timed:
    """A contender timed one call at a time: ``run(n)`` returns ``n`` samples (seconds)."""

    name: str
    run: Callable[[int], list[float]]
    samples: list[float] = field(default_factory=list)
    error: str = ""


def _sync(name: str, call: Callable[[], object]) -> _Timed:
    def run(n: int) -> list[float]:
        clock = time.perf_counter
        out = []
        for _ in range(n):
            t0 = clock()
            call()
            out.append(clock() - t0)
        return out

    return _Timed(name, run)


def _async(name: str, loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> _Timed:
    """``call()`` makes the awaitable to time; timed inside the running loop."""

    async def slice_(n: int) -> list[float]:
        clock = time.perf_counter
        out = []
        for _ in range(n):
            t0 = clock()
            await call()
            out.append(clock() - t0)
        return out

    return _Timed(name, lambda n: loop.run_until_complete(slice_(n)))


def _by_style(pool: Any, loop: asyncio.AbstractEventLoop) -> list[_Timed]:
    def waited(f: Any) -> object:
        concurrent.futures.wait([f])
        return f.result()

    def completed(f: Any) -> object:
        for done in concurrent.futures.as_completed([f]):
            return done.result()
        raise RuntimeError("as_completed yielded nothing")

    def called_back(f: Any) -> object:
        event = threading.Event()
        f.add_done_callback(lambda _: event.set())
        event.wait()
        return f.result()

    async def gathered() -> object:
        return await asyncio.gather(pool.submit(abs, -1))

    async def executor() -> object:
        return await asyncio.get_running_loop().run_in_executor(pool, abs, -1)

    async def awaited() -> object:
        return await pool.submit(abs, -1)

    inline = _Inline()

    async def asyncio_alone() -> object:
        return await asyncio.get_running_loop().run_in_executor(inline, abs, -1)

    async def gather_alone() -> object:
        return await asyncio.gather(_Ready(abs(-1)))

    styles = iter(SINGLE_STYLES)
    return [
        _sync(next(styles), lambda: pool.submit(abs, -1).result()),
        _sync(next(styles), lambda: waited(pool.submit(abs, -1))),
        _sync(next(styles), lambda: completed(pool.submit(abs, -1))),
        _sync(next(styles), lambda: called_back(pool.submit(abs, -1))),
        _async(next(styles), loop, awaited),
        _async(next(styles), loop, gathered),
        _async(next(styles), loop, executor),
        _async(ASYNCIO_FLOOR, loop, asyncio_alone),
        _async(GATHER_FLOOR, loop, gather_alone),
    ]


def _measure(contenders: list[_Timed], calls: int, warmup: int, rounds: int) -> list[Row]:
    """Warm each contender up, then time ``calls`` calls each in ``rounds`` alternating
    slices; one row per contender."""
    for c in contenders:
        try:
            c.run(warmup)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            c.error = failure(exc)
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for c in contenders:
            if c.error:
                continue
            try:
                c.samples += c.run(per_round)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                c.error = failure(exc)
    return [Row(c.name, None if c.error else c.samples, c.error) for c in contenders]


def run_single(calls: int, warmup: int, rounds: int) -> list[Row]:
    """The round trip of one tiny call per way of waiting (and the peer's)."""
    import multiprocessing

    import offload

    loop = asyncio.new_event_loop()
    pool = offload.Pool(workers=1)
    peer = multiprocessing.Pool(1)
    try:
        contenders = [*_by_style(pool, loop), _sync(PEER, lambda: peer.apply(abs, (-1,)))]
        return _measure(contenders, calls, warmup, rounds)
    finally:
        pool.shutdown(timeout=5)
        peer.close()
        peer.join()
        loop.close()


# -- functions by value ------------------------------------------------------------------------


def _by_kind(submit: Callable[..., Any], prefix: str) -> list[_Timed]:
    functions = (echo, _main_echo(), lambda x: x, _closure(0))
    return [
        _sync(f"{prefix}{kind}", lambda fn=fn: submit(fn, 1).result())  # type: ignore[misc]
        for kind, fn in zip(FUNCTION_KINDS, functions, strict=True)
    ]


def run_functions(calls: int, warmup: int, rounds: int) -> tuple[list[Row], list[Row]]:
    """(local rows, remote rows): the round trip by kind of function."""
    import offload
    from benchmarks.remote import _SERVING, _offload_command, _Server, _token_file

    with offload.Pool(workers=1) as pool:
        local = _measure(_by_kind(pool.submit, ""), calls, warmup, rounds)
    with tempfile.TemporaryDirectory(prefix="offload-bench-functions-") as tmp:
        token_path, token = _token_file(tmp)
        argv = [*_offload_command(), "serve", "--listen", "127.0.0.1:0"]
        argv += ["--token-file", token_path, "--workers", "1"]
        try:
            server = _Server("offload serve", argv, _SERVING, os.path.join(tmp, "serve.stderr"))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            note = failure(exc)
            return local, [Row(REMOTE + kind, None, note) for kind in FUNCTION_KINDS]
        try:
            with offload.connect(server.address, token=token) as worker:
                remote = _measure(_by_kind(worker.submit, REMOTE), calls, warmup, rounds)
        finally:
            server.stop()
    return local, remote


# -- the sections ------------------------------------------------------------------------------


def waiting_sections(
    flood_calls: int, flood_reps: int, calls: int, warmup: int, rounds: int
) -> list[Section]:
    """The flood and the round trip, by way of waiting."""
    return [
        Section(
            f"Pool of 2: {flood_calls} tiny calls submitted at once, by way of waiting",
            "calls/s",
            run_flood(flood_calls, flood_reps),
            floor=RESULT,
            subjects=FLOOD_STYLES[1:],
            target=Target("≥ 0.8x the result() path", 0.8, relative=True),
        ),
        Section(
            "Round trip of one tiny call, by way of waiting",
            "µs",
            run_single(calls, warmup, rounds),
            floor=SINGLE_STYLES[0],
            subjects=SINGLE_STYLES[1:],
            target=Target("≤ 1.2x the result() path", 1.2, relative=True),
        ),
    ]


def function_sections(calls: int, warmup: int, rounds: int) -> list[Section]:
    """The round trip of ``echo(1)`` by kind of function, locally and remotely."""
    local, remote = run_functions(calls, warmup, rounds)
    target = Target("≤ 1.1x a module-level function", 1.1, relative=True)
    return [
        Section(
            "Round trip of echo(1) by kind of function, local worker",
            "µs",
            local,
            floor=MODULE_FUNCTION,
            subjects=FUNCTION_KINDS[1:],
            target=target,
        ),
        Section(
            "Round trip of echo(1) by kind of function, through offload serve",
            "µs",
            remote,
            floor=REMOTE + MODULE_FUNCTION,
            subjects=tuple(REMOTE + kind for kind in FUNCTION_KINDS[1:]),
            target=target,
        ),
    ]
