"""Worker lifecycle (SPEC section 4): parent death, restarts, on_failure, shutdown, leaks.

Processes are only ever signalled by pid, and only those this test (or a script it ran)
started. Waiting is done on futures, conditions and pipes; the only polls are bounded
checks that a process has gone or that background cleanup has settled.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import crashes
import offload

RESOLVE_TIMEOUT = 10.0
TESTS_DIR = str(Path(__file__).resolve().parent)


def resolve(fut: offload.Future[Any]) -> BaseException | None:
    return fut.exception(timeout=RESOLVE_TIMEOUT)


# --------------------------------------------------------------------------------------- #
# The parent dies
# --------------------------------------------------------------------------------------- #

PARENT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests_dir!r})
    import crashes
    import offload

    mode, fifo_path = sys.argv[1], sys.argv[2]
    busy = offload.spawn(name="busy-worker")
    idle = offload.spawn(name="idle-worker")
    # The busy worker runs a call that starts a grandchild and sleeps; wait until the
    # grandchild is up so that it is there to be cleaned up.
    with crashes.Fifo(fifo_path) as fifo:
        fut = busy.submit(crashes.start_grandchild, fifo.path)
        grandchild = fifo.read_pid()
    print(busy.pid, idle.pid, grandchild, flush=True)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "raise":
        raise RuntimeError("uncaught-in-parent")
    # mode == "exit": fall off the end without shutting anything down
    """
)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the script printed nothing within {timeout} s"
    return proc.stdout.readline().decode()


@pytest.fixture
def parent_died(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[int]]:
    """Run the parent script in mode ``request.param`` until it has ended; yield
    ``[busy worker, idle worker, grandchild]`` pids, and SIGKILL any survivors after."""
    mode = request.param
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(tests_dir=TESTS_DIR))
    pids: list[int] = []
    with subprocess.Popen(
        [sys.executable, str(script), mode, str(tmp_path / "grandchild")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            line = _read_line(proc, RESOLVE_TIMEOUT)
            pids = [int(x) for x in line.split()]
            assert len(pids) == 3, line
            if mode != "sigkill":
                # An exit (normal or by an uncaught exception) waits for the calls
                # already submitted, as ProcessPoolExecutor does: the busy call sleeps,
                # so the parent is still there. Its worker dying ends the call (it fails
                # with WorkerCrashed) and lets the exit go on.
                with pytest.raises(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
                crashes.kill_quietly(pids[0])
            _, err = proc.communicate(timeout=RESOLVE_TIMEOUT)
            if mode == "sigkill":
                assert proc.returncode == -signal.SIGKILL
            elif mode == "raise":
                assert proc.returncode == 1
                assert b"uncaught-in-parent" in err
            else:
                assert proc.returncode == 0, err.decode(errors="replace")
            yield pids
        finally:
            for pid in pids:
                crashes.kill_quietly(pid)
            if proc.returncode is None:
                proc.kill()
                proc.communicate()


PARENT_MODES = ["sigkill", "exit", "raise"]


@pytest.mark.parametrize("parent_died", PARENT_MODES, indirect=True)
def test_workers_die_with_their_parent(parent_died: list[int]) -> None:
    workers = parent_died[:2]
    left = crashes.wait_gone(workers, 2.0)
    assert left == [], f"workers still alive 2 s after their parent ended: {left}"


@pytest.mark.parametrize(
    "parent_died",
    ["sigkill", "exit", "raise"],
    indirect=True,
)
def test_task_subprocesses_die_with_their_parent(parent_died: list[int]) -> None:
    grandchild = parent_died[2]
    left = crashes.wait_gone([grandchild], 2.0)
    assert left == [], f"the busy call's subprocess outlived the parent by 2 s: {left}"


# --------------------------------------------------------------------------------------- #
# No leaks over many cycles
# --------------------------------------------------------------------------------------- #


def _running(fut: offload.Future[Any]) -> offload.Future[Any]:
    """``fut`` once its call runs on the worker: until then kill() and shutdown() only
    cancel it (on a loaded machine the I/O thread may not have sent it yet)."""
    deadline = time.monotonic() + RESOLVE_TIMEOUT
    while not fut.running():
        assert not fut.done() and time.monotonic() < deadline, f"the call never started: {fut}"
        time.sleep(0.002)
    return fut


def _cycle(i: int) -> None:
    """Spawn, crash, restart, kill a call, and end the worker one of three ways."""
    w = offload.spawn(stderr="devnull")
    try:
        pid = w.pid
        crash = resolve(w.submit(crashes.os_exit))
        assert isinstance(crash, offload.WorkerCrashed)
        assert w.call(os.getpid) != pid
        fut = _running(w.submit(crashes.sleep))
        assert fut.kill() is True
        assert isinstance(resolve(fut), offload.WorkerKilled)
        if i % 3 == 1:
            w.call(os.getpid)
            w.kill()
        elif i % 3 == 2:
            fut = _running(w.submit(crashes.sleep))
            w.shutdown(timeout=0.2)
            assert isinstance(resolve(fut), offload.WorkerKilled)
    finally:
        w.shutdown(timeout=5)


def _resources() -> tuple[int, int, set[int]]:
    return (
        len(os.listdir("/proc/self/fd")),
        threading.active_count(),
        {c.pid for c in psutil.Process().children(recursive=True)},
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_fd_thread_or_child_leaks_over_cycles() -> None:
    _cycle(0)  # the first use starts offload's I/O loop (a thread and a few fds)
    base = _resources()
    for i in range(30):
        _cycle(i)
    # Bounded wait for background cleanup (reaping, pipe closing) to settle.
    deadline = time.monotonic() + 5
    now = _resources()
    while now != base and time.monotonic() < deadline:
        time.sleep(0.02)
        now = _resources()
    fds, threads, children = now
    assert children == base[2], f"leaked children: {children - base[2]}"
    assert threads == base[1], [t.name for t in threading.enumerate()]
    assert fds == base[0], f"fds: {base[0]} before, {fds} after"


# --------------------------------------------------------------------------------------- #
# Context manager, shutdown
# --------------------------------------------------------------------------------------- #


def test_context_manager_leaves_no_process() -> None:
    with offload.spawn() as w:
        pid = w.pid
        assert pid is not None
        assert w.alive
        assert w.call(os.getpid) == pid
        assert pid in {c.pid for c in psutil.Process().children()}
    assert not w.alive
    assert crashes.is_gone(pid)
    assert pid not in {c.pid for c in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError):
        w.submit(os.getpid)
    with pytest.raises(RuntimeError):
        w.call(os.getpid)


def test_submit_after_shutdown_raises() -> None:
    w = offload.spawn()
    pid = w.pid
    w.shutdown()
    assert pid is not None
    assert crashes.is_gone(pid)
    with pytest.raises(RuntimeError):
        w.submit(crashes.identity, 1)
    w.shutdown()  # idempotent


def test_graceful_shutdown_finishes_queued_calls() -> None:
    w = offload.spawn()
    futs = [w.submit(crashes.identity, i) for i in range(20)]
    w.shutdown()
    assert [f.result(timeout=0) for f in futs] == list(range(20))


def test_shutdown_timeout_kills_a_long_call() -> None:
    w = offload.spawn()
    pid = w.pid
    assert pid is not None
    fut = w.submit(crashes.sleep)
    started = time.monotonic()
    w.shutdown(timeout=0.5)
    elapsed = time.monotonic() - started
    err = fut.exception(timeout=0)  # resolved by the time shutdown() returned
    assert isinstance(err, offload.WorkerKilled), repr(err)
    assert err.pid == pid
    assert err.worker == w.name
    assert 0.4 < elapsed < 4, elapsed
    assert crashes.is_gone(pid)


def test_shutdown_without_wait_returns_at_once() -> None:
    w = offload.spawn()
    fut = w.submit(crashes.identity, "done")
    w.shutdown(wait=False)
    assert fut.result(timeout=RESOLVE_TIMEOUT) == "done"
    with pytest.raises(RuntimeError):
        w.submit(os.getpid)
    w.shutdown()  # wait for the process to go (leak check)


def test_a_dropped_handle_stops_its_worker() -> None:
    w = offload.spawn()
    pid = w.pid
    assert pid is not None and w.call(os.getpid) == pid
    del w  # no shutdown(): its finalizer stops the worker
    assert crashes.wait_gone([pid], RESOLVE_TIMEOUT) == []


DROPPED_IN_A_CYCLE = """
import gc, os, sys, threading
import psutil
import offload

w = offload.spawn()
pid, engine = w.pid, w._engine
cycle = [w]
cycle.append(cycle)
del w, cycle  # only the garbage collector can free the handle now

def collect_holding_the_engine_lock():
    # As if the collector ran during an allocation inside the engine, on the thread
    # that holds its lock (the I/O thread handling a result, or a submitting thread).
    with engine.lock:
        gc.collect()

t = threading.Thread(target=collect_holding_the_engine_lock, daemon=True)
t.start()
t.join(10)
print("stuck" if t.is_alive() else "collected", flush=True)
if t.is_alive():
    os._exit(1)
# The I/O thread ran the shutdown the finalizer handed it: the worker exits.
try:
    psutil.Process(pid).wait(10)
    print("stopped", flush=True)
except psutil.NoSuchProcess:
    print("stopped", flush=True)
except psutil.TimeoutExpired:
    print("still running", flush=True)
"""


def test_a_handle_collected_while_its_engine_lock_is_held_does_not_deadlock() -> None:
    """The finalizer of a dropped handle may run on any thread, wherever the garbage
    collector runs: it hands the shutdown to the I/O thread instead of taking locks."""
    proc = subprocess.run(
        [sys.executable, "-c", DROPPED_IN_A_CYCLE],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": TESTS_DIR},
    )
    assert proc.stdout.split() == ["collected", "stopped"], (proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------- #
# Restarts and on_failure
# --------------------------------------------------------------------------------------- #


@pytest.fixture
def recorded() -> Iterator[tuple[offload.Worker, crashes.Recorder]]:
    rec = crashes.Recorder()
    w = offload.spawn(on_failure=rec, stderr="devnull")
    try:
        yield w, rec
    finally:
        w.shutdown(timeout=5)


def test_restart_after_crash(recorded: tuple[offload.Worker, crashes.Recorder]) -> None:
    w, _ = recorded
    pid = w.pid
    assert pid is not None
    assert isinstance(resolve(w.submit(crashes.os_exit)), offload.WorkerCrashed)
    assert not w.alive
    new_pid = w.call(os.getpid)
    assert w.alive
    assert w.pid == new_pid != pid
    assert crashes.is_gone(pid)
    assert w.call(crashes.identity, {"ok": 1}) == {"ok": 1}


def test_on_failure_once_per_unexpected_death(
    recorded: tuple[offload.Worker, crashes.Recorder], tmp_path: Path
) -> None:
    w, rec = recorded
    # 1. A crash mid-call.
    pid1 = w.pid
    assert isinstance(resolve(w.submit(crashes.os_exit)), offload.WorkerCrashed)
    (err1,) = rec.wait_for(1)
    assert isinstance(err1, offload.WorkerCrashed)
    assert err1.pid == pid1
    assert err1.reason == "exit"
    assert err1.exitcode == crashes.EXIT_CODE
    assert err1.worker == w.name
    assert w.name in str(err1)
    assert str(pid1) in str(err1)
    assert rec.threads[0] != threading.current_thread().name  # a background thread

    # 2. SIGKILL from outside while idle: still an unexpected death.
    pid2 = w.call(os.getpid)
    os.kill(pid2, signal.SIGKILL)
    errs = rec.wait_for(2)
    assert isinstance(errs[1], offload.WorkerCrashed)
    assert errs[1].pid == pid2
    assert errs[1].signal == "SIGKILL"
    assert w.call(os.getpid) not in (pid1, pid2)

    # 3. A crash mid-call from SIGKILL while a call runs.
    with crashes.Fifo(tmp_path / "started") as fifo:
        fut = w.submit(crashes.notify_and_sleep, fifo.path)
        pid3 = fifo.read_pid()
    os.kill(pid3, signal.SIGKILL)
    assert isinstance(resolve(fut), offload.WorkerCrashed)
    errs = rec.wait_for(3)
    assert isinstance(errs[2], offload.WorkerCrashed)
    assert errs[2].pid == pid3
    w.call(os.getpid)
    assert len(rec.errors) == 3


def test_on_failure_not_called_for_deliberate_ends(
    recorded: tuple[offload.Worker, crashes.Recorder],
) -> None:
    w, rec = recorded
    # fut.kill()
    fut = w.submit(crashes.sleep)
    assert fut.kill() is True
    assert isinstance(resolve(fut), offload.WorkerKilled)
    # w.kill() mid-call
    w.call(os.getpid)
    fut = w.submit(crashes.sleep)
    w.kill()
    assert isinstance(resolve(fut), offload.WorkerKilled)
    # w.kill() while idle
    w.call(os.getpid)
    w.kill()
    # a timeout
    fut = w.submit(offload.task(crashes.sleep, timeout=0.3))
    assert isinstance(resolve(fut), offload.TaskTimeout)
    # Then one unexpected death: it must be the only one reported.
    pid = w.call(os.getpid)
    assert isinstance(resolve(w.submit(crashes.os_exit)), offload.WorkerCrashed)
    errs = rec.wait_for(1)
    assert len(errs) == 1, errs
    assert isinstance(errs[0], offload.WorkerCrashed)
    assert errs[0].pid == pid
    # shutdown(timeout) killing a running call is deliberate too.
    fut = w.submit(crashes.sleep)
    w.shutdown(timeout=0.3)
    assert isinstance(fut.exception(timeout=0), offload.WorkerKilled)
    assert len(rec.errors) == 1, rec.errors


def test_kill_while_a_replacement_is_starting() -> None:
    """``w.kill()`` right after a crash, while the next process is still starting: that
    process must be killed too, and a graceful shutdown must not wait for it."""
    w = offload.spawn(stderr="devnull")
    try:
        assert isinstance(resolve(w.submit(crashes.os_exit)), offload.WorkerCrashed)
        fut = w.submit(os.getpid)  # starts a replacement process; the call waits for it
        w.kill()
        err = resolve(fut)
        assert err is None or isinstance(err, offload.WorkerKilled), repr(err)
        started = time.monotonic()
        w.shutdown(timeout=5)
        assert time.monotonic() - started < 3, "shutdown() waited for an orphaned process"
    finally:
        w.shutdown(timeout=5)


def test_a_fork_while_a_worker_starts_does_not_hang_the_start() -> None:
    """A fork in another thread (multiprocessing's "fork" workers, a user's os.fork)
    while offload's I/O thread runs Popen must not copy Popen's error pipe into a
    process that never execs: Popen would wait for that process to exit, and every
    call of the pool with it. A thread forks over and over while workers start; the
    forked copies live until the end of the test, like pool workers."""
    r, w = os.pipe()
    pids: list[int] = []
    stop = threading.Event()

    def fork_repeatedly() -> None:
        while not stop.is_set() and len(pids) < 200:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the forked copy only waits
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            pids.append(pid)

    forker = threading.Thread(target=fork_repeatedly)
    forker.start()
    try:
        for _ in range(5):
            with offload.Pool(workers=2) as pool:
                assert pool.submit(abs, -3).result(timeout=20) == 3
    finally:
        stop.set()
        forker.join()
        os.close(w)
        os.close(r)
        for pid in pids:
            os.waitpid(pid, 0)
