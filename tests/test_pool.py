"""``offload.Pool`` (SPEC sections 2, 3 and 6), with real worker processes.

* executor semantics, modelled on CPython's ``Lib/test/test_concurrent_futures`` (written
  afresh): ``wait``, ``as_completed``, ``shutdown`` in its variants, ``map`` and
  ``imap_unordered``, asyncio, and any library's use of an executor (dask);
* "never broken": every way a call can fail, for every start method, fails that call only,
  and the pool replaces the worker and goes on;
* retries, initializers, Ctrl-C and SIGTERM in a parent program, load and leaks, stats.

Synchronisation with tasks goes through files with bounded waits (``pool_helpers``);
nothing sleeps in the hope that something has happened meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import functools
import itertools
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import channel_tasks as ct
import offload
import pool_helpers as ph
from offload.client.scheduler import STALL_SECONDS

RESOLVE = 15.0  # every future must resolve well within this
START_METHODS = ["spawn", "forkserver", "fork"]
CYCLES = 100  # create/crash/shutdown cycles in the leak test (its check is exact: one leak shows)


# --------------------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------------------- #


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``pred`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


def read_pid(path: Path, timeout: float = 10.0) -> int:
    """The pid a task wrote to ``path`` (it is running once the file exists)."""
    wait_until(path.exists, timeout, f"a task to write {path.name}")
    return int(path.read_text())


def wait_ready(pool: offload.Pool, n: int) -> None:
    """Wait until all ``n`` workers of ``pool`` have started and are idle."""
    wait_until(
        lambda: pool.stats().idle == n and len(pool.worker_pids()) == n,
        RESOLVE,
        f"{n} idle workers ({pool!r})",
    )


def is_gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie runs nothing: it counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until every pid is gone or ``timeout`` passes; return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [pid for pid in alive if not is_gone(pid)]
    return alive


def _templates() -> set[int]:
    from offload.process import forkserver

    return forkserver.template_pids()


def worker_children() -> set[int]:
    """Our child processes, except offload's long-lived forkserver templates."""
    templates = _templates()
    return {p.pid for p in psutil.Process().children(recursive=True) if p.pid not in templates}


def open_fds() -> set[int]:
    """Our open fds, except those of offload's process-wide I/O loop."""
    from offload.transport import loop

    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the fd of the listing itself, closed by now
        fds.add(fd)
    return fds - set(loop.owned_fds())


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[Callable[..., offload.Pool]]:
    """Make pools that are shut down after the test, whatever happened.

    Teardown first opens every gate a task may still wait for (``ABORT``), so that a
    failed test never leaves shutdown waiting on a blocked call.
    """
    made: list[offload.Pool] = []

    def make(workers: int = 2, **options: Any) -> offload.Pool:
        pool = offload.Pool(workers, **options)
        made.append(pool)
        return pool

    yield make
    (tmp_path / "ABORT").touch()
    for pool in made:
        pool.shutdown(wait=True, timeout=10)


def blocked_call(
    pool: offload.Pool, tmp_path: Path, name: str, action: str = "return", value: Any = None
) -> tuple[offload.Future[Any], Path]:
    """Submit a call that runs until ``gate`` exists, then does ``action``; wait until it
    runs. Returns the future and the gate."""
    marker = tmp_path / f"{name}.pid"
    gate = tmp_path / f"{name}.gate"
    fut = pool.submit(ph.mark_wait_then, str(marker), str(gate), action, value)
    read_pid(marker)
    return fut, gate


# --------------------------------------------------------------------------------------- #
# 1. concurrent.futures semantics
# --------------------------------------------------------------------------------------- #


def test_wait_first_completed(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    blocked, gate = blocked_call(pool, tmp_path, "blocked", value="late")
    quick = pool.submit(ph.square, 21)
    cancelled: cf.Future[Any] = cf.Future()
    assert cancelled.cancel()

    done, not_done = cf.wait(
        [cancelled, quick, blocked], timeout=RESOLVE, return_when=cf.FIRST_COMPLETED
    )
    assert done == {quick}
    assert not_done == {cancelled, blocked}
    assert quick.result(0) == 441

    # An already finished future makes FIRST_COMPLETED return at once.
    done, not_done = cf.wait([quick, blocked], timeout=RESOLVE, return_when=cf.FIRST_COMPLETED)
    assert done == {quick}
    assert not_done == {blocked}

    gate.touch()
    done, not_done = cf.wait([blocked], timeout=RESOLVE, return_when=cf.FIRST_COMPLETED)
    assert done == {blocked}
    assert blocked.result(0) == "late"


def test_wait_first_exception(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    ok = pool.submit(ph.square, 6)
    assert ok.result(RESOLVE) == 36
    blocked, gate = blocked_call(pool, tmp_path, "blocked")
    failing = pool.submit(ph.raise_error, "first exception")

    done, not_done = cf.wait(
        [ok, failing, blocked], timeout=RESOLVE, return_when=cf.FIRST_EXCEPTION
    )
    assert done == {ok, failing}
    assert not_done == {blocked}
    err = failing.exception(0)
    assert isinstance(err, ValueError)
    assert err.args == ("first exception",)

    # One already failed: returns at once.
    done, not_done = cf.wait([failing, blocked], timeout=RESOLVE, return_when=cf.FIRST_EXCEPTION)
    assert done == {failing}
    assert not_done == {blocked}

    # A worker crash is an exception too.
    crashing = pool.submit(ph.mark_wait_then, str(tmp_path / "c.pid"), str(gate), "os_exit")
    gate.touch()
    done, _ = cf.wait([crashing], timeout=RESOLVE, return_when=cf.FIRST_EXCEPTION)
    assert done == {crashing}
    assert isinstance(crashing.exception(0), offload.WorkerCrashed)
    assert blocked.result(RESOLVE) is None


def test_wait_all_completed_and_timeout(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    futures = [pool.submit(ph.square, i) for i in range(5)] + [pool.submit(ph.raise_error, "x")]
    done, not_done = cf.wait(futures, timeout=RESOLVE, return_when=cf.ALL_COMPLETED)
    assert done == set(futures)
    assert not_done == set()
    assert [f.result() for f in futures[:5]] == [0, 1, 4, 9, 16]
    assert isinstance(futures[-1].exception(), ValueError)

    # With a timeout, a call still running comes back in not_done.
    blocked, gate = blocked_call(pool, tmp_path, "blocked", value=1)
    started = time.monotonic()
    done, not_done = cf.wait([futures[0], blocked], timeout=0.5)
    assert time.monotonic() - started >= 0.45
    assert done == {futures[0]}
    assert not_done == {blocked}
    gate.touch()
    done, not_done = cf.wait([futures[0], blocked], timeout=RESOLVE)
    assert done == {futures[0], blocked}
    assert not not_done


def test_as_completed(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    finished = pool.submit(ph.square, 2)
    assert finished.result(RESOLVE) == 4
    blocked, gate = blocked_call(pool, tmp_path, "blocked", value="last")
    fresh = pool.submit(ph.square, 3)

    # A timeout: the finished ones are yielded, then TimeoutError for the running one
    # (the builtin one on every version: offload.as_completed; the standard library's
    # raises its own class on 3.10).
    seen = []
    with pytest.raises(TimeoutError):
        for fut in offload.as_completed([finished, blocked], timeout=0.5):
            seen.append(fut)
    assert seen == [finished]
    seen = []
    with pytest.raises(cf.TimeoutError):
        for fut in cf.as_completed([finished, blocked], timeout=0.5):
            seen.append(fut)
    assert seen == [finished]

    # Duplicates are yielded once.
    assert list(cf.as_completed([finished, finished, finished], timeout=RESOLVE)) == [finished]

    it = cf.as_completed([finished, blocked, fresh], timeout=RESOLVE)
    first_two = {next(it), next(it)}
    assert first_two == {finished, fresh}
    assert not blocked.done()
    gate.touch()
    assert next(it) is blocked
    with pytest.raises(StopIteration):
        next(it)
    assert blocked.result(0) == "last"


def test_shutdown_cancel_futures(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    """Queued calls are cancelled and never run; the running one finishes."""
    pool = pools(1)
    wait_ready(pool, 1)
    running, gate = blocked_call(pool, tmp_path, "running", value="finished")
    queued = [pool.submit(ph.mark, str(tmp_path / f"ran-{i}"), i) for i in range(10)]

    stopper = threading.Thread(
        target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, name="stopper"
    )
    stopper.start()
    try:
        wait_until(queued[-1].cancelled, RESOLVE, "the queued calls to be cancelled")
        assert stopper.is_alive()  # waits for the running call
        assert not running.done()
    finally:
        gate.touch()
        stopper.join(RESOLVE)
    assert not stopper.is_alive()
    assert running.result(0) == "finished"

    cancelled = [i for i, f in enumerate(queued) if f.cancelled()]
    # A call already sent to the worker (prefetched) is no longer cancellable; everything
    # still queued in the parent is.
    assert len(cancelled) >= len(queued) - 2, cancelled
    for i, fut in enumerate(queued):
        assert fut.done()
        if fut.cancelled():
            assert not (tmp_path / f"ran-{i}").exists(), f"cancelled call {i} ran"
        else:
            assert fut.result(0) == i
            assert (tmp_path / f"ran-{i}").exists()
    assert pool.worker_pids() == []


def test_shutdown_without_wait(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    pids = pool.worker_pids()
    running, gate = blocked_call(pool, tmp_path, "running", value="done")
    queued = pool.submit(ph.square, 5)

    started = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - started < 1.0
    assert not running.done()
    with pytest.raises(RuntimeError):
        pool.submit(ph.square, 1)

    gate.touch()
    assert running.result(RESOLVE) == "done"
    assert queued.result(RESOLVE) == 25
    assert wait_gone(pids, 10) == []
    wait_until(lambda: pool.worker_pids() == [], 10, "no live workers")
    wait_until(lambda: not worker_children(), 10, "every worker process reaped")


def test_submit_and_map_after_shutdown_raise(pools: Callable[..., offload.Pool]) -> None:
    pool = pools(1)
    assert pool.submit(ph.square, 3).result(RESOLVE) == 9
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(ph.square, 3)
    with pytest.raises(RuntimeError):
        pool.map(ph.square, range(3))
    with pytest.raises(RuntimeError):
        pool.imap_unordered(ph.square, range(3))
    pool.shutdown()  # twice is harmless
    assert "shutdown" in repr(pool)

    with offload.Pool(1) as other:
        assert other.submit(ph.square, 4).result(RESOLVE) == 16
    with pytest.raises(RuntimeError):
        other.submit(ph.square, 3)
    with pytest.raises(RuntimeError):
        other.map(ph.square, range(3))


def test_shutdown_while_a_worker_crashes(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    """shutdown(wait=True) is waiting when the running call os._exit's: no deadlock, the
    call fails with WorkerCrashed and the call queued behind it still runs."""
    pool = pools(1)
    wait_ready(pool, 1)
    crasher, gate = blocked_call(pool, tmp_path, "crasher", action="os_exit")
    pid = read_pid(tmp_path / "crasher.pid")
    behind = pool.submit(ph.square, 7)

    stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True}, name="stopper")
    stopper.start()
    try:
        wait_until(lambda: "shutdown" in repr(pool), RESOLVE, "shutdown to begin")
    finally:
        gate.touch()
        stopper.join(RESOLVE)
    assert not stopper.is_alive(), "shutdown deadlocked"

    err = crasher.exception(0)
    assert isinstance(err, offload.WorkerCrashed), repr(err)
    assert err.pid == pid
    assert err.exitcode == ph.EXIT_CODE
    assert behind.result(0) == 49
    assert pool.worker_pids() == []
    assert is_gone(pid)


def test_map_keeps_order(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    assert list(pool.map(ph.square, range(200))) == [i * i for i in range(200)]
    assert list(pool.map(ph.square, [])) == []

    # Item 0 finishes after later items: results still come in input order.
    wait_ready(pool, 2)
    gate = tmp_path / "gate"
    results = pool.map(ph.gated, range(20), itertools.repeat(str(gate)), chunksize=1)
    first = pool.submit(ph.square, 0)  # the pool's done count starts after this
    first.result(RESOLVE)
    done_before = pool.stats().done
    # Advance the generator in a thread: it blocks on item 0 while later items finish.
    got: list[int] = []
    consumer = threading.Thread(target=lambda: got.extend(results), name="consumer")
    consumer.start()
    try:
        wait_until(lambda: pool.stats().done >= done_before + 3, RESOLVE, "later items done")
        assert got == []
    finally:
        gate.touch()
        consumer.join(RESOLVE)
    assert not consumer.is_alive()
    assert got == [i * i for i in range(20)]


def test_map_several_iterables_stops_at_shortest(pools: Callable[..., offload.Pool]) -> None:
    pool = pools(2)
    assert list(pool.map(ph.add, range(10), range(100, 105))) == [100, 102, 104, 106, 108]
    assert list(pool.map(ph.add, range(5), itertools.count(10))) == [10, 12, 14, 16, 18]
    assert list(pool.map(ph.add, [], itertools.count())) == []


def test_map_timeout(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    gate = tmp_path / "gate"
    started = time.monotonic()
    results = pool.map(ph.gated, [1, 2, 0], itertools.repeat(str(gate)), timeout=1.5, chunksize=1)
    got = []
    with pytest.raises(TimeoutError) as info:
        for r in results:
            got.append(r)
    elapsed = time.monotonic() - started
    assert got == [1, 4]
    assert not isinstance(info.value, offload.TaskTimeout)  # the map's timeout, not the call's
    assert isinstance(info.value, cf.TimeoutError)  # the builtin one, and on 3.10 also this
    assert 1.4 <= elapsed < RESOLVE
    gate.touch()
    # The call itself goes on and the pool is fine.
    assert list(pool.map(ph.square, range(4))) == [0, 1, 4, 9]


@pytest.mark.parametrize("chunksize", [1, 3, None])
def test_map_raises_at_the_failing_item(
    pools: Callable[..., offload.Pool], chunksize: int | None
) -> None:
    pool = pools(2)
    results = pool.map(ph.fail_at, range(10), itertools.repeat(5), chunksize=chunksize)
    assert [next(results) for _ in range(5)] == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="bad item 5") as info:
        next(results)
    assert isinstance(info.value.__cause__, offload.RemoteTraceback)
    assert "fail_at" in str(info.value.__cause__)
    with pytest.raises(StopIteration):
        next(results)
    assert list(pool.map(ph.square, range(3))) == [0, 1, 4]


@pytest.mark.parametrize("kind", [list, tuple])
@pytest.mark.parametrize("chunksize", [7, None])
def test_map_over_a_list_or_tuple(
    pools: Callable[..., offload.Pool], kind: type, chunksize: int | None
) -> None:
    """A list or tuple is read in slices, not item by item: every item once, in order,
    the last short slice included, and a failure still raises at its own item."""
    pool = pools(2)
    items = kind(range(100))
    assert list(pool.map(ph.square, items, chunksize=chunksize)) == [i * i for i in range(100)]
    assert sorted(pool.imap_unordered(ph.square, items, chunksize=chunksize)) == [
        i * i for i in range(100)
    ]
    results = pool.map(functools.partial(ph.fail_at, bad=40), items, chunksize=chunksize)
    assert [next(results) for _ in range(40)] == [i * i for i in range(40)]
    with pytest.raises(ValueError, match="bad item 40"):
        next(results)
    assert list(pool.map(ph.square, kind())) == []


def test_imap_unordered(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    assert sorted(pool.imap_unordered(ph.square, range(500))) == [i * i for i in range(500)]

    # Yields as calls finish: item 0 is held back, others (on the other worker) come first.
    gate = tmp_path / "gate"
    fn = functools.partial(ph.gated, gate=str(gate))
    results = pool.imap_unordered(fn, range(10), chunksize=1)
    early = [next(results) for _ in range(4)]
    assert 0 not in early
    gate.touch()
    rest = list(results)
    assert sorted(early + rest) == [i * i for i in range(10)]


def _quick_calls_around(
    pool: offload.Pool,
    tmp_path: Path,
    start_long: Callable[[], offload.Future[Any]],
    long_for: float = 0.0,
    marker: Path | None = None,
) -> tuple[list[offload.Future[Any]], offload.Future[Any]]:
    """After many tiny calls (the pool then sends calls ahead), a long call (submitted
    by ``start_long``), and ``long_for`` seconds after it was submitted (it has written
    its pid to ``marker`` then) six short ones, all submitted before any of them
    finishes (they wait for one gate, opened here). Returns the short calls and the
    long one."""
    assert list(pool.map(ph.square, range(500))) == [i * i for i in range(500)]
    long_call = start_long()
    submitted = time.monotonic()
    quick_gate = tmp_path / "quick.gate"
    if long_for:
        assert marker is not None
        read_pid(marker)
        # The property under test is about a call that has run this long: let it.
        time.sleep(max(0.0, submitted + long_for - time.monotonic()))
    quick = [
        pool.submit(ph.mark_wait_then, str(tmp_path / f"q{i}.pid"), str(quick_gate), "return", i)
        for i in range(6)
    ]
    quick_gate.touch()
    return quick, long_call


def _quick_calls_around_a_long_one(
    pool: offload.Pool, tmp_path: Path, long_for: float
) -> tuple[list[offload.Future[Any]], offload.Future[Any], Path]:
    """:func:`_quick_calls_around` a call that writes its pid to ``long.pid`` and waits
    for a gate; returns the short calls, the long one and its gate (closed)."""
    marker, gate = tmp_path / "long.pid", tmp_path / "long.gate"
    quick, long_call = _quick_calls_around(
        pool,
        tmp_path,
        lambda: pool.submit(ph.mark_wait_then, str(marker), str(gate), "return", None),
        long_for,
        marker,
    )
    return quick, long_call, gate


def test_no_call_is_sent_behind_a_call_that_has_run_long(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    """Short calls submitted once a call has run for a while (past the scheduler's stall
    limit) go to the free worker, not ahead of the running one, on its worker."""
    pool = pools(2)
    wait_ready(pool, 2)
    quick, long_call, gate = _quick_calls_around_a_long_one(pool, tmp_path, 3 * STALL_SECONDS)
    try:
        _, not_done = cf.wait(quick, timeout=RESOLVE)
        assert not not_done, f"{len(not_done)} of 6 short calls stuck behind the long one"
    finally:
        gate.touch()
    assert [f.result(RESOLVE) for f in quick] == list(range(6))
    assert long_call.result(RESOLVE) is None


@pytest.mark.parametrize(
    ("options", "waits_on"),
    [
        ({}, "gate"),  # inline: another thread of the worker reads while the call runs
        ({}, "channel"),  # inline, the call reading its channel: it gives the calls back
        ({"heartbeat": (1.0, 60.0)}, "gate"),  # threaded: the reader thread answers
    ],
    ids=["inline", "inline-channel", "threaded"],
)
def test_no_call_waits_behind_a_long_one_while_a_worker_is_idle(
    pools: Callable[..., offload.Pool], tmp_path: Path, options: dict[str, Any], waits_on: str
) -> None:
    """Calls sent ahead to a worker just before its call turned out long are taken back
    (it answers SKIPPED: they never ran there) and run on the idle worker."""
    pool = pools(2, **options)
    wait_ready(pool, 2)
    if waits_on == "gate":
        quick, long_call, gate = _quick_calls_around_a_long_one(pool, tmp_path, 0.0)
        release = gate.touch
    else:
        go_tx, go = offload.channel()
        tx, rx = offload.channel()
        quick, long_call = _quick_calls_around(
            pool, tmp_path, lambda: pool.submit(ct.consume_after, go, rx)
        )

        def release() -> None:
            go_tx.send("go")
            tx.send(1)
            tx.close()

    try:
        # One worker is free: every short call can run there, one after the other.
        _, not_done = cf.wait(quick, timeout=RESOLVE)
        assert not not_done, f"{len(not_done)} of 6 short calls stuck behind the long one"
        assert not long_call.done()
    finally:
        release()
    assert [f.result(RESOLVE) for f in quick] == list(range(6))
    assert long_call.result(RESOLVE) == (None if waits_on == "gate" else 1)
    if waits_on == "gate":  # they all ran on the other worker
        busy = read_pid(tmp_path / "long.pid")
        assert busy not in {read_pid(tmp_path / f"q{i}.pid") for i in range(6)}


@pytest.mark.parametrize("options", [{}, {"heartbeat": (1.0, 60.0)}], ids=["inline", "threaded"])
def test_calls_taken_back_in_a_flood_each_run_exactly_once(
    pools: Callable[..., offload.Pool], tmp_path: Path, options: dict[str, Any]
) -> None:
    """Floods of tiny calls with a long one among them: the calls pipelined behind it
    are taken back while it runs, whatever its worker is doing then, and run on the
    other worker, queued calls or not; every call runs once (a second run would find its
    file) and returns its own value."""
    pool = pools(2, **options)
    wait_ready(pool, 2)
    for round_, long_at in enumerate([3, 200, 1400]):
        directory = tmp_path / f"round{round_}"
        directory.mkdir()
        gate = tmp_path / f"gate{round_}"
        futures = [
            pool.submit(ph.run_once, str(directory), i, str(gate) if i == long_at else "")
            for i in range(1500)
        ]
        short = [f for i, f in enumerate(futures) if i != long_at]
        try:
            _, not_done = cf.wait(short, timeout=RESOLVE)
            assert not not_done, f"{len(not_done)} short calls stuck behind the long one"
            assert not futures[long_at].done()
        finally:
            gate.touch()
        assert [f.result(RESOLVE) for f in futures] == list(range(1500))
        assert len(os.listdir(directory)) == 1500


def test_map_over_an_infinite_iterator_reads_lazily(pools: Callable[..., offload.Pool]) -> None:
    pool = pools(2)
    assert list(itertools.islice(pool.map(ph.square, itertools.count()), 1000)) == [
        i * i for i in range(1000)
    ]

    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    results = pool.map(ph.square, source())
    try:
        got = [r for _, r in zip(range(1000), results, strict=False)]
    finally:
        results.close()  # type: ignore[attr-defined]
    assert got == [i * i for i in range(1000)]
    # Bounded read-ahead (a few chunks per worker), not the whole iterable.
    assert pulled < 100_000, pulled
    assert pool.submit(ph.square, 9).result(RESOLVE) == 81


def test_map_iterator_next_and_loops_share_one_position(
    pools: Callable[..., offload.Pool],
) -> None:
    pool = pools(2)
    results = pool.map(ph.square, range(10), chunksize=3)
    assert iter(results) is iter(results)
    assert next(results) == 0
    assert [r for _, r in zip(range(2), results, strict=False)] == [1, 4]
    assert next(results) == 9
    assert list(results) == [i * i for i in range(4, 10)]
    with pytest.raises(StopIteration):
        next(results)


def test_map_explicit_chunksize(pools: Callable[..., offload.Pool]) -> None:
    pool = pools(2)
    out = list(pool.map(ph.with_pid, range(100), chunksize=25))
    assert [x for x, _ in out] == list(range(100))
    # Each chunk is one call, on one worker.
    for start in range(0, 100, 25):
        assert len({pid for _, pid in out[start : start + 25]}) == 1
    assert {pid for _, pid in out} <= set(pool.worker_pids())
    assert list(pool.map(ph.square, range(7), chunksize=1000)) == [i * i for i in range(7)]
    assert sorted(pool.imap_unordered(ph.square, range(7), chunksize=2)) == [
        i * i for i in range(7)
    ]
    with pytest.raises(ValueError):
        pool.map(ph.square, range(3), chunksize=0)


def _record_chunks(pool: offload.Pool) -> list[list[int]]:
    """Make ``pool`` record the size of each chunk it submits (the calls it makes, seen
    in this process) into the last list of the returned list: append an empty list
    before each map. The patch lives on this pool's engine only."""
    maps: list[list[int]] = []
    engine = pool._engine
    submit = engine.submit

    def recording_submit(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], **kw: Any) -> Any:
        maps[-1].append(len(args[1]))  # run_chunk's arguments: (fn, chunk, star)
        return submit(fn, args, kwargs, **kw)

    engine.submit = recording_submit  # type: ignore[method-assign]
    return maps


def test_map_automatic_chunks_grow_and_stay_a_share_of_a_known_input(
    pools: Callable[..., offload.Pool],
) -> None:
    """chunksize=None: chunks start small, grow while they finish fast, and never exceed
    a sixteenth of each worker's share of an input of known length (so the workers end
    together)."""
    pool = pools(2)
    maps = _record_chunks(pool)
    total = 64_000
    maps.append([])
    assert list(pool.map(abs, range(-total, 0))) == list(range(total, 0, -1))
    sizes = maps[0]
    assert sum(sizes) == total
    assert sizes[0] <= 64
    assert max(sizes) <= total // (16 * 2)
    assert max(sizes) > sizes[0], f"chunks never grew: {sizes}"


def test_map_starts_at_the_chunk_size_an_earlier_map_of_the_function_ended_with(
    pools: Callable[..., offload.Pool],
) -> None:
    """A second automatic map of a module-level function starts with the chunk size the
    first one grew to (still within the share of its own input); a lambda, whose name
    says nothing, and an explicit chunksize start from scratch."""
    pool = pools(2)
    maps = _record_chunks(pool)
    total = 64_000
    for fn in (ph.square, ph.square, lambda x: x * x, lambda x: x * x):
        maps.append([])
        assert list(pool.map(fn, range(total))) == [i * i for i in range(total)]
    first, second, lambda_1, lambda_2 = maps
    assert first[0] <= 64 and max(first) > 64
    assert 64 < second[0] <= max(first), (first[:12], second[:12])
    assert sum(second) == total and max(second) <= total // (16 * 2)
    assert lambda_1[0] <= 64 and lambda_2[0] <= 64
    # A small input: the learned size is capped by its own share.
    maps.append([])
    assert list(pool.map(ph.square, range(640))) == [i * i for i in range(640)]
    assert max(maps[-1]) <= 640 // 32, maps[-1]
    maps.append([])
    assert len(list(pool.map(ph.square, range(1000), chunksize=10))) == 1000
    assert set(maps[-1]) == {10}


def test_a_dropped_pool_finishes_its_calls_then_its_workers_exit(tmp_path: Path) -> None:
    pool = offload.Pool(2)
    wait_ready(pool, 2)
    pids = pool.worker_pids()
    fut, gate = blocked_call(pool, tmp_path, "dropped", value="kept")
    queued = pool.submit(ph.square, 12)
    del pool  # no shutdown(): the finalizer stops accepting, the calls still run
    gate.touch()
    assert fut.result(RESOLVE) == "kept"
    assert queued.result(RESOLVE) == 144
    assert wait_gone(pids, RESOLVE) == []


def test_asyncio_await_and_run_in_executor(pools: Callable[..., offload.Pool]) -> None:
    pool = pools(2)

    async def main() -> tuple[int, int, list[int]]:
        loop = asyncio.get_running_loop()
        a = await pool.submit(ph.square, 7)
        b = await loop.run_in_executor(pool, ph.square, 8)
        c = await asyncio.gather(*(loop.run_in_executor(pool, ph.square, i) for i in range(10)))
        with pytest.raises(ValueError, match="from asyncio"):
            await pool.submit(ph.raise_error, "from asyncio")
        return a, b, list(c)

    assert asyncio.run(main()) == (49, 64, [i * i for i in range(10)])


def test_async_with(tmp_path: Path) -> None:
    async def main() -> tuple[offload.Pool, int]:
        async with offload.Pool(2) as pool:
            pid = await pool.submit(ph.getpid)
            assert pid in pool.worker_pids()
        return pool, pid

    pool, pid = asyncio.run(main())
    assert "shutdown" in repr(pool)
    with pytest.raises(RuntimeError):
        pool.submit(ph.square, 1)
    assert wait_gone([pid], 5) == []
    assert pool.worker_pids() == []


def test_async_with_cancelled_kills_running_calls(tmp_path: Path) -> None:
    marker = tmp_path / "running.pid"
    gate = tmp_path / "gate"
    futures: list[offload.Future[Any]] = []

    async def body() -> None:
        async with offload.Pool(1) as pool:
            fut = pool.submit(ph.mark_wait_then, str(marker), str(gate), "hang")
            futures.append(fut)
            await fut

    async def main() -> float:
        task = asyncio.create_task(body())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, read_pid, marker)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        (tmp_path / "ABORT").touch()
    assert took < 5.0
    assert isinstance(futures[0].exception(0), offload.WorkerKilled)
    assert wait_gone([int(marker.read_text())], 5) == []


# --------------------------------------------------------------------------------------- #
# 2. Any library's executor: dask
# --------------------------------------------------------------------------------------- #


def test_dask_compute_with_pool_as_scheduler(pools: Callable[..., offload.Pool]) -> None:
    dask = pytest.importorskip("dask")
    pool = pools(2)
    incs = [dask.delayed(ph.add)(i, 1) for i in range(10)]
    total = dask.delayed(sum)(incs)
    pids = [dask.delayed(ph.getpid)(i) for i in range(4)]
    got_total, got_incs, got_pids = dask.compute(total, incs, pids, scheduler=pool)
    assert got_total == 55
    assert list(got_incs) == list(range(1, 11))
    assert os.getpid() not in got_pids  # ran in workers
    assert pool.stats().done >= 1


# --------------------------------------------------------------------------------------- #
# 3. Never broken: the crash matrix, for every start method
# --------------------------------------------------------------------------------------- #

# kind -> does the worker process survive?
KINDS = {
    "raise": True,
    "sys_exit": True,
    "os_exit": False,
    "segfault": False,
    "sigkill": False,
    "kill": False,
    "timeout": False,
}


def _check_error(kind: str, err: BaseException | None, pid: int) -> None:
    if kind == "raise":
        assert type(err) is ValueError, repr(err)
        assert err.args == ph.ERROR_ARGS
        assert isinstance(err.__cause__, offload.RemoteTraceback)
        assert "mark_wait_then" in str(err.__cause__)
    elif kind == "sys_exit":
        assert type(err) is SystemExit, repr(err)
        assert err.code == ph.EXIT_CODE
    elif kind == "os_exit":
        assert isinstance(err, offload.WorkerCrashed), repr(err)
        assert err.reason == "exit"
        assert err.exitcode == ph.EXIT_CODE
        assert err.signal is None
        assert err.pid == pid
    elif kind == "segfault":
        assert isinstance(err, offload.WorkerCrashed), repr(err)
        assert err.reason == "signal"
        assert err.signal == "SIGSEGV"
        assert err.pid == pid
        assert "SIGSEGV" in str(err)
        assert "Segmentation fault" in err.stderr_tail  # faulthandler's report
    elif kind == "sigkill":
        assert isinstance(err, offload.WorkerCrashed), repr(err)
        assert err.reason == "signal"
        assert err.signal == "SIGKILL"
        assert err.pid == pid
    elif kind == "kill":
        assert isinstance(err, offload.WorkerKilled), repr(err)
        assert not isinstance(err, offload.WorkerCrashed)
        assert err.pid == pid
    elif kind == "timeout":
        assert isinstance(err, offload.TaskTimeout), repr(err)
        assert isinstance(err, TimeoutError)
        assert err.pid == pid
    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_crash_matrix(
    pools: Callable[..., offload.Pool], tmp_path: Path, kind: str, start_method: str
) -> None:
    pool = pools(2, start_method=start_method)
    wait_ready(pool, 2)
    pids_before = set(pool.worker_pids())
    failed_before = pool.stats().failed

    # A bystander runs on one worker...
    bystander, by_gate = blocked_call(pool, tmp_path, "bystander", value="unaffected")
    by_pid = read_pid(tmp_path / "bystander.pid")
    # ...and the victim on the other.
    action = kind if kind in ("raise", "sys_exit", "os_exit", "segfault") else "hang"
    fn: Any = offload.task(ph.mark_wait_then, timeout=0.5) if kind == "timeout" else None
    marker, gate = tmp_path / "victim.pid", tmp_path / "victim.gate"
    started = time.monotonic()
    victim = pool.submit(fn or ph.mark_wait_then, str(marker), str(gate), action)
    pid = read_pid(marker)
    assert {pid, by_pid} == pids_before
    # Calls queued meanwhile (in the parent, or already sent to either worker).
    queued = [pool.submit(ph.square, i) for i in range(6)]

    if kind == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif kind == "kill":
        assert victim.kill()
    elif kind != "timeout":
        gate.touch()

    err = victim.exception(timeout=RESOLVE)
    _check_error(kind, err, pid)
    if kind == "timeout":
        assert time.monotonic() - started < 10.0
    if kind == "kill":
        assert not victim.kill()  # already finished
    assert pool.stats().failed >= failed_before + 1

    # Only the victim failed: the bystander still runs, on its own worker, and finishes.
    assert not bystander.done()
    assert not is_gone(by_pid)
    by_gate.touch()
    assert bystander.result(RESOLVE) == "unaffected"
    assert [f.result(RESOLVE) for f in queued] == [i * i for i in range(6)]

    # The pool goes on, with the victim's worker replaced if it died.
    if KINDS[kind]:
        assert set(pool.worker_pids()) == pids_before
    else:
        assert wait_gone([pid], 5) == []
        wait_until(
            lambda: len(pool.worker_pids()) == 2 and pid not in pool.worker_pids(),
            RESOLVE,
            "a replacement worker",
        )
        assert by_pid in pool.worker_pids()
    assert list(pool.map(ph.square, range(20))) == [i * i for i in range(20)]
    seen = {pool.submit(ph.getpid).result(RESOLVE) for _ in range(4)}
    assert seen <= set(pool.worker_pids())
    assert pool.stats().workers == 2


def test_fork_worker_stderr_when_sys_stderr_is_not_fd_2(
    pools: Callable[..., offload.Pool], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under pytest's capture, in Jupyter, or wherever sys.stderr was replaced, a forked
    worker must still write to its own stderr (the pipe the parent reads)."""
    with open(tmp_path / "parent-stderr", "w") as parent_stderr:
        monkeypatch.setattr(sys, "stderr", parent_stderr)
        pool = pools(1, start_method="fork")
        printed = pool.submit(ph.print_to_stderr, "hello from the worker").exception(RESOLVE)
        crashed = pool.submit(ph.segfault).exception(RESOLVE)
        monkeypatch.undo()
    assert printed is None, repr(printed)
    assert isinstance(crashed, offload.WorkerCrashed), repr(crashed)
    assert crashed.signal == "SIGSEGV"
    assert "hello from the worker" in crashed.stderr_tail
    assert "Segmentation fault" in crashed.stderr_tail


@pytest.mark.parametrize(
    "kind",
    [
        "os_exit",
        "segfault",
        "sigkill",
        "kill",
        "timeout",
    ],
)
def test_restarts_count_every_replacement(
    pools: Callable[..., offload.Pool], tmp_path: Path, kind: str
) -> None:
    pool = pools(1, start_method="fork")
    wait_ready(pool, 1)
    before = pool.stats().restarts
    action = kind if kind in ("os_exit", "segfault") else "hang"
    fn: Any = offload.task(ph.mark_wait_then, timeout=0.5) if kind == "timeout" else None
    marker, gate = tmp_path / "victim.pid", tmp_path / "victim.gate"
    victim = pool.submit(fn or ph.mark_wait_then, str(marker), str(gate), action)
    pid = read_pid(marker)
    if kind == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif kind == "kill":
        victim.kill()
    elif kind != "timeout":
        gate.touch()
    assert isinstance(victim.exception(RESOLVE), offload.ExecutionError)
    wait_until(lambda: pool.worker_pids() not in ([], [pid]), RESOLVE, "a replacement worker")
    assert pool.submit(ph.getpid).result(RESOLVE) != pid
    assert pool.stats().restarts == before + 1


# --------------------------------------------------------------------------------------- #
# 4. Retries
# --------------------------------------------------------------------------------------- #


def test_retries_poison_call_fails_after_retries_plus_one_attempts(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    pool = pools(2)
    attempts = tmp_path / "attempts"
    poison = offload.task(ph.poison, retries=2)
    err = pool.submit(poison, str(attempts)).exception(timeout=30)
    assert isinstance(err, offload.WorkerCrashed), repr(err)
    assert err.exitcode == ph.EXIT_CODE
    assert count_lines(attempts) == 3
    assert len(set(attempts.read_text().split())) == 3  # three different processes
    # The pool still works, and nothing runs the poison call again.
    assert list(pool.map(ph.square, range(10))) == [i * i for i in range(10)]
    assert pool.submit(ph.square, 3).result(RESOLVE) == 9
    assert count_lines(attempts) == 3


def test_retries_crash_on_first_attempt_then_succeed(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    pool = pools(2)
    attempts = tmp_path / "attempts"
    flaky = offload.task(ph.crash_first, retries=1)
    assert pool.submit(flaky, str(attempts)).result(timeout=30) == 2
    assert count_lines(attempts) == 2
    # Without retries the same call fails.
    again = tmp_path / "again"
    err = pool.submit(ph.crash_first, str(again)).exception(timeout=30)
    assert isinstance(err, offload.WorkerCrashed)
    assert count_lines(again) == 1


def test_retries_not_used_when_the_task_raises(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    pool = pools(2)
    attempts = tmp_path / "attempts"
    task = offload.task(ph.raise_counted, retries=3)
    with pytest.raises(ValueError, match="the task itself failed"):
        pool.submit(task, str(attempts)).result(timeout=RESOLVE)
    assert count_lines(attempts) == 1
    # Also through map.
    more = tmp_path / "more"
    with pytest.raises(ValueError):
        list(pool.map(task, [str(more)]))
    assert count_lines(more) == 1


# --------------------------------------------------------------------------------------- #
# 5. Initializers
# --------------------------------------------------------------------------------------- #


def test_failing_initializer_gives_start_error_and_stops_respawning(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    log = tmp_path / "init.log"
    pool = pools(2, initializer=ph.failing_initializer, initargs=(str(log),))
    err = pool.submit(ph.square, 3).exception(timeout=30)
    assert isinstance(err, offload.StartError), repr(err)
    assert "initializer failed on purpose" in str(err)

    def settled() -> bool:
        s = pool.stats()
        return s.starting == 0 and s.busy == 0 and s.idle == 0 and pool.worker_pids() == []

    # It gives up: no worker starting, none waiting to be restarted.
    wait_until(settled, RESOLVE, "the pool to stop respawning")
    first = count_lines(log)
    assert 1 <= first <= 12, first

    # A new submission tries again, a bounded number of times.
    futures = [pool.submit(ph.square, i) for i in range(3)]
    for fut in futures:
        assert isinstance(fut.exception(timeout=30), offload.StartError)
    wait_until(settled, RESOLVE, "the pool to stop respawning again")
    assert count_lines(log) - first <= 12
    assert pool.stats().failed >= 4


def test_hanging_initializer_hits_start_timeout(
    pools: Callable[..., offload.Pool], tmp_path: Path
) -> None:
    log = tmp_path / "init.log"
    pool = pools(1, initializer=ph.hanging_initializer, initargs=(str(log),), start_timeout=1)
    started = time.monotonic()
    err = pool.submit(ph.square, 3).exception(timeout=30)
    took = time.monotonic() - started
    assert isinstance(err, offload.StartError), repr(err)
    assert "start_timeout" in str(err)
    assert took < 10.0, took
    assert 1 <= count_lines(log) <= 6
    wait_until(lambda: pool.worker_pids() == [], RESOLVE, "the hung workers to be killed")


# --------------------------------------------------------------------------------------- #
# 6. Ctrl-C and SIGTERM in a program using a pool
# --------------------------------------------------------------------------------------- #

_SCRIPT = textwrap.dedent(
    """
    import os
    import signal
    import sys
    import threading
    import time

    import offload

    MARKS = sys.argv[1]
    # Ctrl-C as at a terminal: a program started by a background job of a non-interactive
    # shell (CI's lanes) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt (the test would pass or fail by how the suite was started).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[2] == "term":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))


    def nap(seconds):
        open(os.path.join(MARKS, str(os.getpid())), "w").close()
        time.sleep(seconds)


    def announce(pool):
        deadline = time.monotonic() + 30
        while len(os.listdir(MARKS)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        print(" ".join(map(str, pool.worker_pids())), flush=True)
        print("ready", flush=True)


    if __name__ == "__main__":
        with offload.Pool(2) as pool:
            threading.Thread(target=announce, args=(pool,), daemon=True).start()
            list(pool.map(nap, [30] * 8))
    """
)


class _Lines:
    """Read lines from a pipe with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line within {timeout} s (got {self.buf!r})")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise AssertionError(f"EOF before a full line (got {self.buf!r})")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def _interrupt_script(tmp_path: Path, mode: str) -> tuple[int | None, str, list[int]]:
    """Run the script, wait until its calls run, signal it; return (returncode or None
    if it did not exit within 5 s, stderr, worker pids)."""
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marks), mode],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        lines = _Lines(proc.stdout.fileno())
        pids = [int(x) for x in lines.readline(30).split()]
        assert lines.readline(10) == "ready"
        assert len(pids) == 2
        os.kill(proc.pid, signal.SIGINT if mode == "int" else signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=5)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
            proc.kill()
            _, err = proc.communicate()
        return code, err.decode(errors="replace"), pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        # Workers exit when their parent does; make sure, whatever the test found.
        for pid in wait_gone(pids, 5):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ctrl_c_in_parent(tmp_path: Path) -> None:
    code, err, pids = _interrupt_script(tmp_path, "int")
    assert code is not None, f"the program did not exit within 5 s of SIGINT; stderr:\n{err}"
    assert "Traceback" in err
    assert err.rstrip().endswith("KeyboardInterrupt"), err
    assert err.count("KeyboardInterrupt") == 1, err
    assert "offload/worker" not in err, err
    assert wait_gone(pids, 2) == []


def test_sigterm_in_parent(tmp_path: Path) -> None:
    code, err, pids = _interrupt_script(tmp_path, "term")
    assert code is not None, f"the program did not exit within 5 s of SIGTERM; stderr:\n{err}"
    assert code == 1, err
    assert "offload/worker" not in err, err
    assert wait_gone(pids, 2) == []


# --------------------------------------------------------------------------------------- #
# 7. Load
# --------------------------------------------------------------------------------------- #


def test_flood_of_tiny_calls(pools: Callable[..., offload.Pool]) -> None:
    pool = pools(2)
    futures = [pool.submit(ph.square, i) for i in range(10_000)]
    assert [f.result(60) for f in futures] == [i * i for i in range(10_000)]
    assert pool.stats().done >= 10_000
    assert pool.stats().failed == 0


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_flood_of_large_arguments_and_results(
    pools: Callable[..., offload.Pool], start_method: str
) -> None:
    """Calls sent ahead to a worker fill its socket while it writes its results back,
    which fill ours: the loop that reads those results must never wait to write (it did,
    and the pool hung for good on the first 1 000 calls of 100 kB each way)."""
    pool = pools(2, start_method=start_method)
    blob = b"x" * 100_000
    for _ in range(2):
        futures = [pool.submit(bytes, blob) for _ in range(1000)]
        assert all(f.result(60) == blob for f in futures)
    assert pool.stats().failed == 0


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_create_crash_shutdown_cycles_leak_nothing(start_method: str, tmp_path: Path) -> None:
    marker_dir = tmp_path / "m"
    marker_dir.mkdir()

    def cycle() -> None:
        with offload.Pool(1, start_method=start_method) as pool:
            err = pool.submit(
                ph.mark_wait_then, str(marker_dir / "x.pid"), str(marker_dir / "go"), "os_exit"
            ).exception(RESOLVE)
            assert isinstance(err, offload.WorkerCrashed), repr(err)
            assert pool.submit(ph.square, 12).result(RESOLVE) == 144
        assert pool.worker_pids() == []

    (marker_dir / "go").touch()  # the crash happens at once
    cycle()  # warm-up: the I/O loop, the forkserver template
    wait_until(lambda: not worker_children(), 5, "the warm-up workers to be reaped")
    fds, threads = open_fds(), threading.active_count()

    for _ in range(CYCLES):
        cycle()

    def at_baseline() -> bool:
        return not worker_children() and open_fds() == fds and threading.active_count() == threads

    wait_until(at_baseline, 5, "fds, threads and children back at the baseline")


# --------------------------------------------------------------------------------------- #
# 8. stats(), repr, worker_pids()
# --------------------------------------------------------------------------------------- #


def test_stats_repr_and_worker_pids(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2)
    wait_ready(pool, 2)
    stats = pool.stats()
    assert isinstance(stats, offload.PoolStats)
    assert (stats.workers, stats.busy, stats.idle, stats.starting) == (2, 0, 2, 0)
    assert (stats.queued, stats.running, stats.done, stats.failed) == (0, 0, 0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.done = 5  # type: ignore[misc]

    pids = pool.worker_pids()
    assert len(pids) == len(set(pids)) == 2
    assert os.getpid() not in pids
    assert all(psutil.Process(pid).is_running() for pid in pids)

    n = 25
    seen = {pool.submit(ph.getpid).result(RESOLVE) for _ in range(n)}
    assert seen <= set(pids)
    assert pool.stats().done >= n
    assert pool.stats().failed == 0

    for fut in [pool.submit(ph.raise_error, i) for i in range(3)]:
        assert isinstance(fut.exception(RESOLVE), ValueError)
    crash = pool.submit(ph.mark_wait_then, str(tmp_path / "c.pid"), str(tmp_path / "go"), "os_exit")
    (tmp_path / "go").touch()
    assert isinstance(crash.exception(RESOLVE), offload.WorkerCrashed)
    stats = pool.stats()
    assert stats.failed == 4
    assert stats.done >= n

    # While a call runs: one worker busy, one running call; more calls than workers queue.
    wait_ready(pool, 2)
    blocked, gate = blocked_call(pool, tmp_path, "blocked")
    stats = pool.stats()
    assert (stats.busy, stats.idle, stats.running) == (1, 1, 1)
    text = repr(pool)
    assert text.startswith("<Pool ") and text.endswith(">")
    assert "workers=2" in text
    assert "busy=1" in text
    assert pool.name in text
    gate.touch()
    assert blocked.result(RESOLVE) is None
    pool.shutdown()
    assert "shutdown" in repr(pool)
    assert pool.worker_pids() == []
    assert pool.stats().workers == 2


def test_pool_name_names_workers(pools: Callable[..., offload.Pool], tmp_path: Path) -> None:
    pool = pools(2, name="crunchers", start_method="fork")
    assert pool.name == "crunchers"
    assert "crunchers" in repr(pool)
    crash = pool.submit(ph.mark_wait_then, str(tmp_path / "c.pid"), str(tmp_path / "go"), "os_exit")
    (tmp_path / "go").touch()
    err = crash.exception(RESOLVE)
    assert isinstance(err, offload.WorkerCrashed)
    assert err.worker in ("crunchers-1", "crunchers-2")
    assert err.worker in str(err)
