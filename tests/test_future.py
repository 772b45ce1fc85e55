"""offload.Future on its own (no processes): the standard Future contract holds with the
lighter per-future Condition."""

from __future__ import annotations

import concurrent.futures
import sys
import threading

import pytest

import offload
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
    # The builtin TimeoutError on every version (on 3.10 concurrent.futures has its own,
    # which `except TimeoutError` misses): both catch what a wait that timed out raises.
    with pytest.raises(TimeoutError) as info:
        fut.result(timeout=0.01)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    with pytest.raises(TimeoutError) as info:
        fut.exception(timeout=0.01)
    assert isinstance(info.value, concurrent.futures.TimeoutError)
    fut.set_exception(ValueError("x"))
    assert isinstance(fut.exception(timeout=0), ValueError)


def test_a_tasks_own_concurrent_futures_timeout_error_is_raised_as_itself() -> None:
    fut: Future[int] = Future()
    own = concurrent.futures.TimeoutError("the task's own")
    fut.set_exception(own)
    with pytest.raises(concurrent.futures.TimeoutError) as info:
        fut.result(timeout=0.01)
    assert info.value is own
    assert fut.exception(timeout=0.01) is own


def test_as_completed_times_out_with_the_builtin_timeout_error() -> None:
    done: Future[int] = Future()
    done.set_result(1)
    pending: Future[int] = Future()
    seen = []
    with pytest.raises(TimeoutError) as info:
        for fut in offload.as_completed([done, pending], timeout=0.05):
            seen.append(fut)
    assert seen == [done]
    assert isinstance(info.value, concurrent.futures.TimeoutError)


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="one TimeoutError class from 3.11 on")
def test_concurrent_futures_as_completed_on_3_10_raises_its_own_timeout_error() -> None:
    """The documented limitation offload.as_completed is there for."""
    pending: Future[int] = Future()
    with pytest.raises(concurrent.futures.TimeoutError) as info:
        list(concurrent.futures.as_completed([pending], timeout=0.01))
    assert not isinstance(info.value, TimeoutError)


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


@pytest.mark.parametrize("how", ["result", "wait", "callback", "as_completed", "exception"])
def test_lock_free_resolution_races_with_waiters(how: str) -> None:
    """A future that nobody has waited on is resolved without taking its lock; a thread
    that starts waiting at that very moment still sees the result, exactly once."""
    rounds = 400
    futures: list[Future[int]] = []
    ready = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def resolver() -> None:
        try:
            for i in range(rounds):
                ready.wait()
                futures[i]._resolve_value(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            ready.abort()

    for _ in range(rounds):
        fut: Future[int] = Future()
        assert fut._set_running()
        futures.append(fut)
    thread = threading.Thread(target=resolver)
    thread.start()
    try:
        for i, fut in enumerate(futures):
            calls: list[int] = []
            ready.wait()
            if how == "result":
                assert fut.result(timeout=10) == i
            elif how == "exception":
                assert fut.exception(timeout=10) is None
            elif how == "wait":
                done, _ = concurrent.futures.wait([fut], timeout=10)
                assert done == {fut}
            elif how == "as_completed":
                assert list(concurrent.futures.as_completed([fut], timeout=10)) == [fut]
            else:
                seen = threading.Event()
                fut.add_done_callback(
                    lambda f, seen=seen, calls=calls: (calls.append(f.result()), seen.set())
                )
                assert seen.wait(10)
                assert calls == [i]
            assert fut.done() and fut.result() == i
    finally:
        thread.join(10)
    assert not errors


def test_set_running_without_the_lock_then_cancel_fails() -> None:
    fut: Future[int] = Future()
    assert fut._set_running()
    assert fut.running()
    assert not fut.cancel()  # concurrent.futures: a running future cannot be cancelled
    fut._resolve_value(3)
    assert fut.result(timeout=0) == 3 and fut.done() and not fut.running()


def test_resolution_after_someone_took_the_lock_notifies_them() -> None:
    fut: Future[int] = Future()
    assert fut._set_running()
    seen: list[int] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))  # makes the lock
    fut._resolve_value(5)
    assert seen == [5]
    assert not fut._resolve_value(6)  # resolved once only
    assert fut.result() == 5


def test_no_garbage_collection_runs_while_the_condition_lock_is_held() -> None:
    """A collection while offload.client.future's module-wide lock is held could run a
    finalizer needing that lock on the same thread (a dropped ``map`` iterator cancels
    its futures): a deadlock. Make the collector run at every allocation and look."""
    import gc

    from offload.client import future as future_module

    seen_locked: list[bool] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen_locked.append(future_module._condition_lock.locked())

    old = gc.get_threshold()
    gc.callbacks.append(callback)
    try:
        gc.set_threshold(1, 1, 1)
        futures = [Future[int]() for _ in range(50)]
        for fut in futures:
            fut.add_done_callback(lambda _: None)  # makes each future's condition
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(callback)
    assert seen_locked, "the collector never ran"
    assert not any(seen_locked), "a garbage collection ran while the lock was held"
