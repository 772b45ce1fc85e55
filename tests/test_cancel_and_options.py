"""Calls sent ahead but not started, tasks called by name, and ``delegate.options``."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import pytest

import offload
import reliability_tasks as t

RESOLVE_TIMEOUT = 30.0


def _wait_running(fut: offload.Future[object]) -> None:
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    while not fut.running():
        assert time.monotonic() < deadline, "the call never started"
        time.sleep(0.002)


def test_a_call_sent_ahead_is_not_running_and_can_be_cancelled(tmp_path: Path) -> None:
    started = tmp_path / "started"
    release = tmp_path / "release"
    with offload.spawn() as worker:  # one slot: calls behind the first are sent ahead
        first = worker.submit(t.touch_then_wait, str(started), str(release))
        behind = [worker.submit(t.ident, i) for i in range(6)]
        assert t.wait_for_file(str(started), RESOLVE_TIMEOUT)
        _wait_running(first)
        counts = worker._engine.scheduler.counts()
        assert (counts.running, counts.queued) == (1, 6), counts
        assert not any(f.running() for f in behind)
        # A waiter in concurrent.futures.wait hears of the cancellation at once.
        waiter = concurrent.futures.ThreadPoolExecutor(1)
        waited = waiter.submit(concurrent.futures.wait, [behind[0]], RESOLVE_TIMEOUT)
        assert behind[0].cancel() is True
        assert behind[0].cancelled()
        done, not_done = waited.result(timeout=RESOLVE_TIMEOUT)
        waiter.shutdown()
        assert behind[0] in done and not not_done
        assert first.cancel() is False  # it runs
        release.write_text("go")
        assert first.result(timeout=RESOLVE_TIMEOUT) is None
        assert [f.result(timeout=RESOLVE_TIMEOUT) for f in behind[1:]] == [1, 2, 3, 4, 5]


def test_pool_stats_count_calls_sent_ahead_as_queued(tmp_path: Path) -> None:
    # One worker: with two, the second long call could be sent ahead behind the first
    # (the limitation test_pool.py marks), and never start while the test waits for it.
    release = tmp_path / "release"
    with offload.Pool(1) as pool:
        for _ in range(30):  # tiny calls: the pool learns to send work ahead
            pool.submit(t.ident, 0).result(timeout=RESOLVE_TIMEOUT)
        started = tmp_path / "started"
        running = [pool.submit(t.touch_then_wait, str(started), str(release))]
        assert t.wait_for_file(str(started), RESOLVE_TIMEOUT)
        # Sent ahead to the busy worker or held here, they count as queued, not running.
        waiting = [pool.submit(t.ident, i) for i in range(6)]
        stats = pool.stats()
        assert stats.running == 1 and stats.queued == 6, stats
        release.write_text("go")
        assert [f.result(timeout=RESOLVE_TIMEOUT) for f in waiting] == list(range(6))
        for f in running:
            f.result(timeout=RESOLVE_TIMEOUT)


def test_a_task_called_by_name_keeps_its_timeout() -> None:
    with offload.spawn(preload=["reliability_tasks"]) as worker:
        err = worker.submit("reliability-slow", 10.0).exception(timeout=RESOLVE_TIMEOUT)
        assert isinstance(err, offload.TaskTimeout), repr(err)
        assert err.timeout == 0.3


def test_a_task_called_by_name_keeps_its_retries(tmp_path: Path) -> None:
    with offload.spawn(preload=["reliability_tasks"]) as worker:
        fut = worker.submit("reliability-flaky", str(tmp_path / "crashed-once"))
        assert fut.result(timeout=RESOLVE_TIMEOUT) == "second try"


def test_delegate_options_apply_per_call() -> None:
    fut = offload.delegate.options(timeout=0.2)(t.sleep_then, 10.0)
    err = fut.exception(timeout=RESOLVE_TIMEOUT)
    assert isinstance(err, offload.TaskTimeout), repr(err)
    named = offload.delegate.options(name="crunch")(t.sleep_then, 10.0)
    _wait_running(named)
    assert named.kill() is True
    err = named.exception(timeout=RESOLVE_TIMEOUT)
    assert isinstance(err, offload.WorkerKilled) and err.worker == "crunch", repr(err)
    assert offload.delegate(t.ident, 3).result(timeout=RESOLVE_TIMEOUT) == 3


def test_delegate_options_are_checked_at_once() -> None:
    with pytest.raises(TypeError, match="name"):
        offload.delegate.options(name=5)
    with pytest.raises(ValueError, match="timeout"):
        offload.delegate.options(timeout=-1)
    with pytest.raises(TypeError, match="unknown"):
        offload.delegate.options(colour="blue")


def test_init_name_names_delegated_workers() -> None:
    from offload.client.worker import _delegate_defaults, set_delegate_defaults

    saved = dict(_delegate_defaults)
    set_delegate_defaults(name="from-init")
    try:
        fut = offload.delegate(t.sleep_then, 10.0)
        _wait_running(fut)
        fut.kill()
        err = fut.exception(timeout=RESOLVE_TIMEOUT)
        assert isinstance(err, offload.WorkerKilled) and err.worker == "from-init", repr(err)
    finally:
        set_delegate_defaults(**saved)


@pytest.mark.parametrize("how", ["cancel", "kill"])
def test_a_withdrawn_call_never_runs_and_nothing_is_blamed_on_the_next(
    tmp_path: Path, how: str
) -> None:
    """The worker may have read the call with the one it runs: it must still skip it
    (it looks for Cancels between calls) and say so, and the call behind it must not
    inherit its place."""
    started = tmp_path / "started"
    release = tmp_path / "release"
    with offload.spawn() as worker:
        first = worker.submit(t.touch_then_wait, str(started), str(release))
        doomed = worker.submit(t.segfault)  # would crash the worker if it ran
        innocent = worker.submit(t.ident, "innocent")
        assert t.wait_for_file(str(started), RESOLVE_TIMEOUT)
        assert not doomed.running()
        assert (doomed.cancel() if how == "cancel" else doomed.kill()) is True
        release.write_text("go")
        assert first.result(timeout=RESOLVE_TIMEOUT) is None
        assert innocent.result(timeout=RESOLVE_TIMEOUT) == "innocent"
        assert doomed.cancelled()
        assert worker.call(t.ident, 1) == 1
        assert worker._engine.stats_failed == 0
