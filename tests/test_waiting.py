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
