"""``Pool.kill(signal)`` and ``Pool.map_reduce`` (SPEC section 6), with real workers.

Tasks that must be running when a signal comes write their pid to a marker file and
wait for a gate file (``pool_helpers.mark_wait_then``); creating ``ABORT`` in the test's
directory opens every gate, so nothing is left blocked. Polls are bounded waits for
something to be observed, never sleeps that hope it happened.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import operator
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import crashes
import kill_reduce_tasks as kt
import offload
import pool_helpers as ph

RESOLVE = 15.0  # every future must resolve well within this


def wait_until(pred: Callable[[], bool], what: str, timeout: float = RESOLVE) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


def wait_ready(pool: offload.Pool, n: int) -> list[int]:
    wait_until(lambda: pool.stats().idle == n and len(pool.worker_pids()) == n, "idle workers")
    return pool.worker_pids()


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    (tmp_path / "ABORT").touch()  # whatever still waits for a gate goes on


# --------------------------------------------------------------------------------------- #
# pool.kill(signal)
# --------------------------------------------------------------------------------------- #


def test_sigkill_fails_running_calls_as_crashed_and_the_pool_replaces_the_workers(
    gates: Path,
) -> None:
    failures = crashes.Recorder()
    with offload.Pool(2, on_failure=failures) as pool:
        old = set(wait_ready(pool, 2))
        futures = [
            pool.submit(ph.mark_wait_then, str(gates / f"m{i}"), str(gates / "never"))
            for i in range(2)
        ]
        running = set()
        for i in range(2):
            wait_until((gates / f"m{i}").exists, f"call {i} to start")
            running.add(int((gates / f"m{i}").read_text()))
        assert running == old

        assert set(pool.kill(signal.SIGKILL)) == old

        for fut in futures:
            err = fut.exception(RESOLVE)
            assert isinstance(err, offload.WorkerCrashed), err
            assert not isinstance(err, offload.WorkerKilled)
            assert (err.signal, err.reason) == ("SIGKILL", "signal")
            assert err.pid in old and "pool.kill() sent it SIGKILL" in str(err), err
            assert "out-of-memory" not in str(err)  # no guessing at a cause it knows
        # kill(SIGKILL) returned once the pool saw them die: this call goes to a new one.
        assert pool.submit(kt.square, 7).result(RESOLVE) == 49
        new = set(wait_ready(pool, 2))
        assert new.isdisjoint(old)
        assert pool.stats().restarts == 2
        failures.wait_for(2, RESOLVE)
    assert all(
        isinstance(e, offload.WorkerCrashed) and e.signal == "SIGKILL" for e in failures.errors
    )


def test_workers_that_handle_the_signal_survive_it(gates: Path) -> None:
    with offload.Pool(2, initializer=kt.install_usr1_handler, initargs=(str(gates),)) as pool:
        pids = wait_ready(pool, 2)
        fut = pool.submit(ph.mark_wait_then, str(gates / "m"), str(gates / "go"), value="done")
        wait_until((gates / "m").exists, "the call to start")

        assert sorted(pool.kill(signal.SIGUSR1)) == sorted(pids)

        for pid in pids:  # each handler ran
            wait_until((gates / f"usr1-{pid}").exists, f"worker {pid}'s SIGUSR1 handler")
        (gates / "go").touch()
        assert fut.result(RESOLVE) == "done"  # the call running through it went on
        assert pool.submit(kt.square, 3).result(RESOLVE) == 9
        assert sorted(pool.worker_pids()) == sorted(pids)
        assert pool.stats().restarts == 0


def test_the_default_signal_is_sigterm_and_idle_workers_are_replaced() -> None:
    with offload.Pool(2) as pool:
        old = set(wait_ready(pool, 2))
        assert set(pool.kill()) == old
        wait_until(
            lambda: len(pool.worker_pids()) == 2 and old.isdisjoint(pool.worker_pids()),
            "two new workers",
        )
        assert pool.submit(kt.square, 5).result(RESOLVE) == 25
        assert pool.stats().restarts == 2


def test_kill_refuses_what_is_not_a_signal() -> None:
    with offload.Pool(1) as pool:
        with pytest.raises(ValueError):
            pool.kill(0)
        with pytest.raises(ValueError):
            pool.kill(100_000)


def test_kill_after_shutdown_signals_nothing() -> None:
    pool = offload.Pool(1)
    wait_ready(pool, 1)
    pool.shutdown()
    assert pool.kill(signal.SIGKILL) == []


# --------------------------------------------------------------------------------------- #
# pool.map_reduce
# --------------------------------------------------------------------------------------- #


@pytest.fixture
def pool() -> Iterator[offload.Pool]:
    with offload.Pool(3) as p:
        wait_ready(p, 3)
        yield p


def test_sum_of_squares_is_the_local_result_with_one_call_per_slot(pool: offload.Pool) -> None:
    items = list(range(1000))
    before = pool.stats().done
    counting = kt.CountingAdd()
    assert pool.map_reduce(kt.square, counting, items, 0) == sum(x * x for x in items)
    assert counting.calls == 3  # one partial per slot crossed back, folded here
    wait_until(lambda: pool.stats().done >= before + 3, "the calls to be counted")
    assert pool.stats().done == before + 3


@pytest.mark.parametrize(
    "items",
    [tuple(range(100)), range(100), set(range(100)), {i: None for i in range(100)}],
    ids=["tuple", "range", "set", "dict"],
)
def test_any_sized_input_goes_in_one_chunk_per_slot(pool: offload.Pool, items: object) -> None:
    counting = kt.CountingAdd()
    assert pool.map_reduce(kt.square, counting, items, 0) == sum(x * x for x in range(100))  # type: ignore[call-overload]
    assert counting.calls == 3


def test_fewer_items_than_slots(pool: offload.Pool) -> None:
    counting = kt.CountingAdd()
    assert pool.map_reduce(kt.square, counting, [4, 5], 0) == 41
    assert counting.calls == 2


def test_a_generator_is_streamed_in_chunks(pool: offload.Pool) -> None:
    counting = kt.CountingAdd()
    total = pool.map_reduce(kt.square, counting, (x for x in range(5000)), 0)
    assert total == sum(x * x for x in range(5000))
    assert 1 <= counting.calls <= 5000  # one partial per chunk
    fixed = kt.CountingAdd()
    assert pool.map_reduce(kt.square, fixed, iter(range(95)), 0, chunksize=10) == sum(
        x * x for x in range(95)
    )
    assert fixed.calls == 10


def test_an_explicit_chunksize_for_a_list(pool: offload.Pool) -> None:
    counting = kt.CountingAdd()
    assert pool.map_reduce(kt.square, counting, list(range(30)), 0, chunksize=7) == sum(
        x * x for x in range(30)
    )
    assert counting.calls == 5


@pytest.mark.parametrize(
    "empty", [[], (), range(0), iter([])], ids=["list", "tuple", "range", "iter"]
)
def test_an_empty_input_gives_initial_and_runs_nothing(pool: offload.Pool, empty: object) -> None:
    before = pool.stats().done
    marker = object()
    assert pool.map_reduce(kt.square, kt.add, empty, marker) is marker  # type: ignore[call-overload]
    assert pool.stats().done == before


def test_a_non_identity_initial_counts_once(pool: offload.Pool) -> None:
    assert pool.map_reduce(kt.square, kt.add, list(range(10)), 10) == 10 + 285
    assert pool.map_reduce(kt.square, kt.add, (x for x in range(10)), 10) == 10 + 285
    assert pool.map_reduce(kt.square, operator.mul, [1, 2, 3, 4], 2) == 2 * 576


def test_an_associative_but_not_commutative_fold_keeps_input_order(pool: offload.Pool) -> None:
    expected = "".join(str(i) for i in range(200))
    assert pool.map_reduce(str, kt.concat, list(range(200)), "") == expected
    assert pool.map_reduce(str, kt.concat, (i for i in range(200)), "") == expected
    assert pool.map_reduce(str, kt.concat, range(200), ">") == ">" + expected


def test_lambdas_travel_by_value(pool: offload.Pool) -> None:
    offset = 3
    assert (
        pool.map_reduce(lambda x: x + offset, lambda a, b: a if a > b else b, list(range(50)), -1)
        == 52
    )


def test_an_exception_in_map_fn_propagates_as_itself(pool: offload.Pool) -> None:
    for items in (list(range(20)), (x for x in range(20))):
        with pytest.raises(KeyError) as info:
            pool.map_reduce(kt.fail_at_seven, kt.add, items, 0)
        assert info.value.args == ("seven", 7)
        assert isinstance(info.value.__cause__, offload.RemoteTraceback)
        assert "fail_at_seven" in str(info.value.__cause__)
    assert pool.map_reduce(kt.square, kt.add, [1, 2], 0) == 5  # the pool goes on


def test_an_exception_in_reduce_fn_propagates_as_itself(pool: offload.Pool) -> None:
    def bad(a: int, b: int) -> int:
        raise ZeroDivisionError(f"no {a} + {b}")

    with pytest.raises(ZeroDivisionError, match="no"):
        pool.map_reduce(kt.square, bad, list(range(20)), 0)
    with pytest.raises(ZeroDivisionError, match="no 0 \\+ 0"):  # in the parent's fold
        pool.map_reduce(kt.square, bad, [0], 0)


def test_timeout_raises_timeout_error(pool: offload.Pool, gates: Path) -> None:
    waiting = functools.partial(ph.gated, gate=str(gates / "never"))
    with pytest.raises((TimeoutError, cf.TimeoutError)):
        pool.map_reduce(waiting, kt.add, [0, 1, 2], 0, timeout=0.05)
    # (the call still waiting for its gate is let go by the gates fixture)


def test_bad_arguments(pool: offload.Pool) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        pool.map_reduce(kt.square, kt.add, [1], 0, chunksize=0)
    with pytest.raises(TypeError, match="callables"):
        pool.map_reduce("square", kt.add, [1], 0)  # type: ignore[arg-type]
