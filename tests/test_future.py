"""offload.Future on its own (no processes): the standard Future contract holds with the
lighter per-future Condition."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from offload.client.future import _LIGHT_INIT, Future


def test_light_init_is_used_on_this_python() -> None:
    # Python 3.8-3.13 share the field layout; if a new version changes it, the plain
    # __init__ is used and this test says so.
    assert _LIGHT_INIT


def test_result_waits_across_threads() -> None:
    fut: Future[int] = Future()
    fut.set_running_or_notify_cancel()
    threading.Timer(0.05, fut.set_result, (7,)).start()
    assert fut.result(timeout=5) == 7


def test_result_timeout_and_exception() -> None:
    fut: Future[int] = Future()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    fut.set_exception(ValueError("x"))
    assert isinstance(fut.exception(timeout=0), ValueError)


def test_cancel_and_callbacks() -> None:
    fut: Future[int] = Future()
    seen: list[bool] = []
    fut.add_done_callback(lambda f: seen.append(f.cancelled()))
    assert fut.cancel()
    assert seen == [True]
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result(timeout=0)


def test_wait_and_as_completed_from_several_threads() -> None:
    futs: list[Future[int]] = [Future() for _ in range(20)]
    for f in futs:
        f.set_running_or_notify_cancel()
    done_first = threading.Event()

    def waiter() -> None:
        done, _ = concurrent.futures.wait(
            futs, timeout=5, return_when=concurrent.futures.FIRST_COMPLETED
        )
        if done:
            done_first.set()

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for t in threads:
        t.start()
    futs[13].set_result(13)
    for t in threads:
        t.join(5)
    assert done_first.is_set()
    for i, f in enumerate(futs):
        if i != 13:
            f.set_result(i)
    assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=5)) == list(
        range(20)
    )


def test_condition_wait_for_and_notify() -> None:
    fut: Future[int] = Future()
    cond = fut._condition
    flag: list[int] = []

    def setter() -> None:
        with cond:
            flag.append(1)
            cond.notify_all()

    with cond:
        threading.Timer(0.02, setter).start()
        assert cond.wait_for(lambda: flag, timeout=5)
