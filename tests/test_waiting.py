"""Every way of waiting for offload futures gives the same outcomes as ``result()``:
values, the task's own exceptions, offload's typed errors, cancellation, timeouts.

The ways: ``result()``, ``concurrent.futures.wait`` (all, first completed),
``concurrent.futures.as_completed`` and ``offload.as_completed``, done callbacks,
``await`` on each, ``asyncio.gather``, ``asyncio.wrap_future`` and
``loop.run_in_executor``. They take different paths in offload (see
``offload.client.waiting``): futures finished before anyone waits share a lock-free
condition, a single pending future is read on the waiting thread, and asyncio is woken
once per batch of results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import offload
import pool_helpers as ph
from crashes import wait_until
from offload.client import waiting
from offload.client.future import Future
from offload.client.waiting import FINAL_CONDITION

WAIT = 30.0

Outcome = tuple[str, Any]  # ("value", v) | ("raised", exception) | ("cancelled", None)


def _outcome_of(future: cf.Future[Any]) -> Outcome:
    if future.cancelled():
        return ("cancelled", None)
    exc = future.exception(timeout=0)
    return ("raised", exc) if exc is not None else ("value", future.result(timeout=0))


def by_result(futures: list[Future[Any]]) -> list[Outcome]:
    out: list[Outcome] = []
    for f in futures:
        try:
            out.append(("value", f.result(WAIT)))
        except cf.CancelledError:
            out.append(("cancelled", None))
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            out.append(("raised", exc))
    return out


def by_wait(futures: list[Future[Any]]) -> list[Outcome]:
    done, not_done = cf.wait(futures, timeout=WAIT)
    assert not not_done and done == set(futures)
    return [_outcome_of(f) for f in futures]


def by_wait_first(futures: list[Future[Any]]) -> list[Outcome]:
    pending: set[Any] = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=WAIT, return_when=cf.FIRST_COMPLETED)
        assert done, "FIRST_COMPLETED returned with nothing done"
    return [_outcome_of(f) for f in futures]


def by_as_completed(futures: list[Future[Any]]) -> list[Outcome]:
    seen = list(cf.as_completed(futures, timeout=WAIT))
    assert sorted(map(id, seen)) == sorted(map(id, set(futures)))  # each once
    return [_outcome_of(f) for f in futures]


def by_offload_as_completed(futures: list[Future[Any]]) -> list[Outcome]:
    seen = list(offload.as_completed(futures, timeout=WAIT))
    assert sorted(map(id, seen)) == sorted(map(id, set(futures)))
    return [_outcome_of(f) for f in futures]


def by_callback(futures: list[Future[Any]]) -> list[Outcome]:
    events = []
    for f in futures:
        event = threading.Event()
        f.add_done_callback(lambda _, event=event: event.set())  # type: ignore[misc]
        events.append(event)
    assert all(event.wait(WAIT) for event in events)
    return [_outcome_of(f) for f in futures]


async def _await_one(awaitable: Any) -> Outcome:
    try:
        return ("value", await awaitable)
    except asyncio.CancelledError:
        return ("cancelled", None)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return ("raised", exc)


def by_await(futures: list[Future[Any]]) -> list[Outcome]:
    async def main() -> list[Outcome]:
        return [await asyncio.wait_for(_await_one(f), WAIT) for f in futures]

    return asyncio.run(main())


def by_gather(futures: list[Future[Any]]) -> list[Outcome]:
    async def main() -> list[Any]:
        return await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)

    out: list[Outcome] = []
    for item in asyncio.run(main()):
        if isinstance(item, asyncio.CancelledError):
            out.append(("cancelled", None))
        elif isinstance(item, BaseException):
            out.append(("raised", item))
        else:
            out.append(("value", item))
    return out


def by_wrap_future(futures: list[Future[Any]]) -> list[Outcome]:
    async def main() -> list[Outcome]:
        wrapped = [asyncio.wrap_future(f) for f in futures]
        return [await asyncio.wait_for(_await_one(w), WAIT) for w in wrapped]

    return asyncio.run(main())


def by_asyncio_wait(futures: list[Future[Any]]) -> list[Outcome]:
    """asyncio.wait on the futures themselves: from 3.11 on it installs its callback on
    each pending one (it ran on the I/O thread once, and woke no loop)."""

    async def main() -> list[Outcome]:
        done, pending = await asyncio.wait(futures, timeout=WAIT)
        assert not pending and len(done) == len(set(futures))
        return [_outcome_of(f) for f in futures]

    return asyncio.run(main())


STYLES: dict[str, Callable[[list[Future[Any]]], list[Outcome]]] = {
    "result": by_result,
    "wait": by_wait,
    "wait_first": by_wait_first,
    "as_completed": by_as_completed,
    "offload_as_completed": by_offload_as_completed,
    "callback": by_callback,
    "await": by_await,
    "gather": by_gather,
    "wrap_future": by_wrap_future,
    "asyncio_wait": by_asyncio_wait,
}
styles = pytest.mark.parametrize("style", list(STYLES))


@pytest.fixture(scope="module")
def pool() -> Iterator[offload.Pool]:
    """A pool shared by the tests that leave it as they found it: every worker up first
    (the leak check of the first test would count one that started during it)."""
    with offload.Pool(workers=2) as pool:
        assert wait_until(lambda: pool.stats().idle == 2, WAIT), pool.stats()
        yield pool


# -- values and exceptions ---------------------------------------------------------------


@styles
def test_values_come_back(pool: offload.Pool, style: str) -> None:
    futures = [pool.submit(ph.square, i) for i in range(300)]
    assert STYLES[style](futures) == [("value", i * i) for i in range(300)]


@styles
def test_a_single_call_comes_back(pool: offload.Pool, style: str) -> None:
    for i in range(20):  # one pending future at a time: read on the waiting thread
        assert STYLES[style]([pool.submit(ph.square, i)]) == [("value", i * i)]


@styles
def test_futures_done_before_the_wait(pool: offload.Pool, style: str) -> None:
    futures = [pool.submit(ph.square, i) for i in range(50)]
    for f in futures:
        f.result(WAIT)
    assert STYLES[style](futures) == [("value", i * i) for i in range(50)]
    assert STYLES[style](futures) == [("value", i * i) for i in range(50)]  # again


@styles
def test_the_tasks_exceptions_come_back_as_themselves(pool: offload.Pool, style: str) -> None:
    futures = [
        pool.submit(ph.raise_error, "boom", i) if i % 3 == 0 else pool.submit(ph.square, i)
        for i in range(60)
    ]
    outcomes = STYLES[style](futures)
    for i, (kind, value) in enumerate(outcomes):
        if i % 3 == 0:
            assert kind == "raised" and type(value) is ValueError, (i, kind, value)
            assert value.args == ("boom", i)
        else:
            assert (kind, value) == ("value", i * i)


# -- typed errors and cancellation ------------------------------------------------------------


@styles
def test_a_killed_call_fails_with_worker_killed(tmp_path: Path, style: str) -> None:
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "hang")
        assert ph.wait_for(marker, WAIT)
        waiter = _waiting(style, [held])
        assert held.kill()
        [(kind, error)] = waiter.outcomes()
        assert kind == "raised" and isinstance(error, offload.WorkerKilled), (kind, error)
        assert pool.submit(ph.square, 3).result(WAIT) == 9  # a replacement answers


@styles
def test_a_cancelled_call_is_seen_cancelled(tmp_path: Path, style: str) -> None:
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", "held")
        assert ph.wait_for(marker, WAIT)
        queued = pool.submit(ph.square, 4)
        waiter = _waiting(style, [queued, held])
        assert queued.cancel()
        ph.touch(gate)
        assert waiter.outcomes() == [("cancelled", None), ("value", "held")]


class _Waiting:
    """A style's wait, on a thread of its own (it waits while the test acts)."""

    def __init__(self, style: str, futures: list[Future[Any]]) -> None:
        self._result: list[Outcome] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(style, futures))
        self._thread.start()

    def _run(self, style: str, futures: list[Future[Any]]) -> None:
        try:
            self._result = STYLES[style](futures)
        except BaseException as exc:  # noqa: BLE001 - re-raised by outcomes()
            self._result = exc

    def outcomes(self) -> list[Outcome]:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the wait did not end"
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


def _waiting(style: str, futures: list[Future[Any]]) -> _Waiting:
    return _Waiting(style, futures)


def test_cancelling_the_awaiting_task_cancels_a_queued_call(tmp_path: Path) -> None:
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", "held")
        assert ph.wait_for(marker, WAIT)
        queued = pool.submit(ph.square, 4)

        async def main() -> None:
            task = asyncio.ensure_future(_await_queued(queued))
            await asyncio.sleep(0)  # the task now awaits the future
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
        assert queued.cancelled()
        ph.touch(gate)
        assert held.result(WAIT) == "held"


async def _await_queued(future: Future[Any]) -> Any:
    return await future


def test_a_call_ending_after_its_event_loop_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The awaiting task was cancelled (the call runs on) and its loop closed: the call's
    end finds a closed loop, which is no error; another loop awaits as usual."""
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", 5)
        assert ph.wait_for(marker, WAIT)
        loop = asyncio.new_event_loop()
        task = loop.create_task(_await_queued(held))
        loop.run_until_complete(asyncio.sleep(0))  # the task awaits the future now
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        loop.close()
        ph.touch(gate)
        assert held.result(WAIT) == 5
        assert asyncio.run(_await_queued(pool.submit(ph.square, 3))) == 9
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# -- timeouts -----------------------------------------------------------------------------------


def test_waits_with_a_timeout_end_without_the_call(tmp_path: Path) -> None:
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", 7)
        assert ph.wait_for(marker, WAIT)
        done, not_done = cf.wait([held], timeout=0.01)
        assert not done and not_done == {held}
        with pytest.raises(TimeoutError):
            next(offload.as_completed([held], timeout=0.01))
        with pytest.raises(cf.TimeoutError):  # the builtin one from 3.11 on
            next(cf.as_completed([held], timeout=0.01))
        ph.touch(gate)
        done, not_done = cf.wait([held], timeout=WAIT)
        assert done == {held} and held.result(0) == 7


# -- run_in_executor ------------------------------------------------------------------------------


def test_run_in_executor_gives_values_and_exceptions(pool: offload.Pool) -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        calls = [
            loop.run_in_executor(pool, ph.raise_error, "bad")
            if i == 7
            else loop.run_in_executor(pool, ph.square, i)
            for i in range(500)
        ]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), WAIT)

    results = asyncio.run(main())
    assert [r for i, r in enumerate(results) if i != 7] == [i * i for i in range(500) if i != 7]
    assert type(results[7]) is ValueError and results[7].args == ("bad",)


def test_run_in_executor_single_calls(pool: offload.Pool) -> None:
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(pool, ph.square, i) for i in range(20)]

    assert asyncio.run(main()) == [i * i for i in range(20)]
    # asyncio's hand-over was recognised, so it went through the batching inbox (were a
    # Python version to make it differently, it would work unbatched: look here then)
    assert waiting._layout is not None


def test_two_event_loops_await_at_once(pool: offload.Pool) -> None:
    """Each loop is woken for its own futures (inboxes are per loop)."""
    results: dict[int, list[Any]] = {}

    def run(n: int) -> None:
        async def main() -> list[Any]:
            futures = [pool.submit(ph.square, i) for i in range(200)]
            return await asyncio.gather(*futures)

        results[n] = asyncio.run(main())

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results == {n: [i * i for i in range(200)] for n in range(2)}


# -- futures finished before anyone waits -------------------------------------------------------


@pytest.mark.parametrize("style", ["result", "wait", "as_completed", "await"])
def test_a_waited_future_is_freed_without_the_garbage_collector(
    pool: offload.Pool, style: str
) -> None:
    """No reference cycle through a future's waiter list: its result (a shared-memory
    segment, for large data) is freed as soon as the future is dropped."""
    gc.disable()
    try:
        for i in range(20):
            future = pool.submit(ph.square, i)
            assert STYLES[style]([future]) == [("value", i * i)]
            ref = weakref.ref(future)
            del future
            # The thread that resolved it may still be returning from its done
            # callbacks (which wake the loop) and hold it a moment longer; a cycle
            # would hold it for good, the collector being off.
            assert wait_until(lambda: ref() is None, WAIT)  # noqa: B023 - this iteration's
    finally:
        gc.enable()


def test_a_future_finished_untouched_needs_no_lock_of_its_own() -> None:
    future: Future[int] = Future()
    future._set_running()
    future._resolve_value(5)
    assert future._condition is FINAL_CONDITION
    done, not_done = cf.wait([future], timeout=0)
    assert done == {future} and not not_done
    assert list(cf.as_completed([future])) == [future]
    called: list[Any] = []
    future.add_done_callback(called.append)
    assert called == [future]
    assert future.result() == 5 and future.exception() is None
    assert not future.cancel()


# -- asyncio's view of an offload future ----------------------------------------------------------


def test_a_done_future_is_an_asyncio_future_a_pending_one_is_not(pool: offload.Pool) -> None:
    """asyncio takes a done offload future as one of its own (no task per future in
    gather, wait_for, wrap_future); a pending one it wraps in a task, which it can cancel
    at once whether or not the call runs."""
    done = pool.submit(ph.square, 3)
    done.result(WAIT)

    async def main() -> None:
        assert asyncio.isfuture(done)
        assert asyncio.ensure_future(done) is done
        assert asyncio.wrap_future(done) is done
        assert done.get_loop() is asyncio.get_running_loop()
        assert await done == 9
        assert await asyncio.wait_for(done, WAIT) == 9
        assert await asyncio.shield(done) == 9

    asyncio.run(main())
    pending: Future[Any] = Future()
    assert not asyncio.isfuture(pending)


def test_run_until_complete_on_a_loop_that_is_not_current(pool: offload.Pool) -> None:
    """``loop.run_until_complete(fut)`` on a loop nobody set as current: with no loop
    running, an offload future is no loop's future, so asyncio wraps it in a task of
    that loop rather than refusing it as "a future of another loop"; done or not."""
    done = pool.submit(ph.square, 5)
    done.result(WAIT)
    assert not asyncio.isfuture(done)  # no loop runs here
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(done) == 25
        assert loop.run_until_complete(pool.submit(ph.square, 6)) == 36
    finally:
        loop.close()


def test_gather_over_many_futures_with_errors(pool: offload.Pool) -> None:
    """Done and pending futures (a flood resolves most of them before gather looks),
    values and the task's exceptions as themselves, with and without
    return_exceptions; a future given twice is one child."""

    async def main() -> None:
        futures = [
            pool.submit(ph.raise_error, "boom", i) if i % 7 == 3 else pool.submit(ph.square, i)
            for i in range(400)
        ]
        gathered = await asyncio.wait_for(
            asyncio.gather(*futures, futures[0], return_exceptions=True), WAIT
        )
        assert len(gathered) == 401 and gathered[400] == 0
        for i, item in enumerate(gathered[:400]):
            if i % 7 == 3:
                assert type(item) is ValueError and item.args == ("boom", i), (i, item)
            else:
                assert item == i * i
        with pytest.raises(ValueError) as raised:  # the first error, as itself
            await asyncio.wait_for(asyncio.gather(*futures), WAIT)
        assert raised.value.args[0] == "boom"
        # All done now: gathered as asyncio futures, the errors still themselves.
        assert all(asyncio.isfuture(f) for f in futures)
        again = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(x) for x in again] == [type(x) for x in gathered[:400]]

    asyncio.run(main())


def test_gather_of_done_futures_with_a_cancelled_one(pool: offload.Pool) -> None:
    cancelled: Future[Any] = Future()
    assert cancelled.cancel()
    done = pool.submit(ph.square, 5)
    done.result(WAIT)

    async def main() -> None:
        [value, error] = await asyncio.gather(done, cancelled, return_exceptions=True)
        assert value == 25 and type(error) is asyncio.CancelledError
        with pytest.raises(asyncio.CancelledError):
            await asyncio.gather(done, cancelled)
        outer = asyncio.gather(done)
        assert not outer.cancel()  # nothing left to cancel: it completes
        assert await outer == [25]

    asyncio.run(main())


def test_cancelling_a_gather_stops_waiting_at_once(tmp_path: Path) -> None:
    """A gather over a running call, a queued one and a done one: cancelling it cancels
    the queued call and ends the gather now; the running call goes on (as for
    ``fut.cancel()``, only a call that has not started is cancelled)."""
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        done = pool.submit(ph.square, 2)
        done.result(WAIT)
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", "held")
        assert ph.wait_for(marker, WAIT)
        queued = pool.submit(ph.square, 4)

        async def main() -> None:
            outer = asyncio.gather(held, queued, done)
            await asyncio.sleep(0)  # its tasks now await the pending futures
            assert outer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await outer
            # A timeout around a running call fires too.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(held), 0.05)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(held, 0.05)

        asyncio.run(main())
        assert queued.cancelled() and not held.done()
        ph.touch(gate)
        assert held.result(WAIT) == "held"


def test_one_future_awaited_from_two_loops_at_once(tmp_path: Path) -> None:
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", 11)
        assert ph.wait_for(marker, WAIT)
        waiting_now = threading.Barrier(3)
        results: dict[int, Any] = {}

        def run(n: int) -> None:
            async def main() -> Any:
                task = asyncio.ensure_future(_await_queued(held))
                await asyncio.sleep(0)  # the task awaits the future now
                await asyncio.get_running_loop().run_in_executor(None, waiting_now.wait, WAIT)
                return await task, await asyncio.gather(held, held)

            results[n] = asyncio.run(main())

        threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        waiting_now.wait(WAIT)  # both loops await the running call
        ph.touch(gate)
        for t in threads:
            t.join(WAIT)
        assert results == {0: (11, [11, 11]), 1: (11, [11, 11])}


def test_asyncio_callbacks_run_on_the_loop(pool: offload.Pool) -> None:
    """A callback given a context, or installed by asyncio on a done future, runs on the
    loop's thread, later (never at once, which asyncio's callers count on), in that
    context; a plain callback of a done future still runs at once."""
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[tuple[str, bool, str]] = []
    loop_thread = threading.current_thread()  # asyncio.run runs the loop here

    def record(name: str) -> Callable[[Any], None]:
        return lambda _: seen.append((name, threading.current_thread() is loop_thread, var.get()))

    async def main() -> None:
        context = contextvars.copy_context()
        context.run(var.set, "theirs")
        done = pool.submit(ph.square, 1)
        done.result(WAIT)
        done.add_done_callback(record("done, with context"), context=context)
        done.add_done_callback(record("done, plain"))
        assert seen == [("done, plain", True, "unset")]  # at once
        pending: Future[Any] = Future()
        pending.add_done_callback(record("pending, with context"), context=context)
        removed = record("removed")
        pending.add_done_callback(removed, context=context)
        assert pending.remove_done_callback(removed) == 1
        assert pending.remove_done_callback(removed) == 0
        resolver = threading.Thread(target=pending._resolve_value, args=(2,))
        resolver.start()
        resolver.join(WAIT)
        for _ in range(100):  # delivered through the loop's inbox: a few turns of it
            if len(seen) == 3:
                break
            await asyncio.sleep(0)
        assert done.remove_done_callback(removed) == 0

    asyncio.run(main())
    assert sorted(seen) == [
        ("done, plain", True, "unset"),
        ("done, with context", True, "theirs"),
        ("pending, with context", True, "theirs"),
    ]


def test_asyncio_wait_and_as_completed_take_offload_futures(pool: offload.Pool) -> None:
    async def main() -> None:
        futures = [pool.submit(ph.square, i) for i in range(50)]
        done, pending = await asyncio.wait(futures, timeout=WAIT)
        assert not pending and len(done) == 50
        values = sorted([await f for f in asyncio.as_completed(futures, timeout=WAIT)])
        assert values == sorted(i * i for i in range(50))

    asyncio.run(main())


def test_a_loop_reads_an_answer_itself_only_when_it_has_nothing_else_to_do() -> None:
    """An awaited call's answer is read on the loop's thread (as result() reads it) only
    while the loop would otherwise sleep: nothing ready, no timer due within the read's
    window, no descriptor ready."""
    import socket

    from offload.client.slot import PUMP_WINDOW

    assert waiting.PUMP_WINDOW >= PUMP_WINDOW  # a timer due within a read is not missed

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert waiting._idle(loop)
        handle = loop.call_soon(lambda: None)
        assert not waiting._idle(loop)  # a callback is ready
        handle.cancel()
        await asyncio.sleep(0)
        assert waiting._idle(loop)
        r, w = socket.socketpair()
        try:
            loop.add_reader(r.fileno(), lambda: None)
            assert waiting._idle(loop)
            w.send(b"x")
            assert not waiting._idle(loop)  # a descriptor is ready
            loop.remove_reader(r.fileno())
        finally:
            r.close()
            w.close()
        assert waiting._idle(loop)
        timer = loop.call_later(0.0005, lambda: None)
        assert not waiting._idle(loop)  # a timer is due within the window
        timer.cancel()

    asyncio.run(main())


def test_an_awaited_call_that_runs_long_does_not_hold_up_its_loop(tmp_path: Path) -> None:
    """The loop reads an answer itself for a moment only: while a call runs on, its
    other tasks and timers run (the call ends only once they have)."""
    marker, gate = str(tmp_path / "started"), str(tmp_path / "gate")
    with offload.Pool(workers=1) as pool:
        held = pool.submit(ph.mark_wait_then, marker, gate, "return", "held")
        assert ph.wait_for(marker, WAIT)

        async def others(turns: list[int]) -> None:
            for _ in range(20):
                await asyncio.sleep(0.001)  # timers, each due within a read's window
                turns.append(1)
            ph.touch(gate)  # only now may the call end

        async def main() -> tuple[Any, int]:
            turns: list[int] = []
            other = asyncio.ensure_future(others(turns))
            value = await asyncio.wait_for(_await_queued(held), WAIT)
            await other
            return value, len(turns)

        assert asyncio.run(main()) == ("held", 20)
