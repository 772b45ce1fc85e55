"""``retries`` for calls whose worker crashed on a worker server (SPEC sections 1 and 6).

A server replaces a worker that died under a call and answers the call with the crash
(a Result carrying ``WorkerCrashed``, told by its type name); the client's connection
lives on. The call must then be sent again per its ``retries``, exactly as when a local
worker or a whole connection (``ConnectionLost``) fails, the attempts of both kinds
counting together, and it fails for good once it has crashed ``retries + 1`` times. A
task's own exception and ``TaskTimeout`` are never retried.

Servers are real ``offload serve`` processes on 127.0.0.1 whose workers import
:mod:`retry_tasks`; every task notes its pid in an attempts file first, so the tests
count attempts by reading that file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import offload
import retry_tasks as rt
from crashes import Recorder, wait_until
from offload.client.scheduler import Outcome, Resolve, Scheduler, SendCalls
from remote_helpers import ServerProcess, clean_env, write_token_file

WAIT = 30.0  # seconds a test waits for a call (several servers start on a busy machine)
TESTS_DIR = Path(__file__).resolve().parent

Serve = Callable[..., ServerProcess]


@pytest.fixture
def token(tmp_path: Path) -> tuple[Path, str]:
    path, token = write_token_file(tmp_path)
    return path, token.decode()


@pytest.fixture
def serve(tmp_path: Path, token: tuple[Path, str]) -> Iterator[Serve]:
    """Start ``offload serve`` processes (``workers`` each); stopped, by pid, after."""
    started: list[ServerProcess] = []

    def start(workers: int = 1) -> ServerProcess:
        server = ServerProcess(
            tmp_path,
            ["--listen", "127.0.0.1:0", "--token-file", str(token[0]), "--workers", str(workers)],
            env=clean_env(PYTHONPATH=str(TESTS_DIR)),
            name=f"server-{len(started)}",
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def runs_under(pid: int, server: ServerProcess) -> bool:
    """Whether ``pid`` is a process the server started."""
    try:
        kids = psutil.Process(server.pid).children(recursive=True)
    except psutil.Error:
        return False
    return any(kid.pid == pid for kid in kids)


def wait_ready(pool: offload.Pool, slots: int) -> None:
    """Wait (bounded) until every slot of ``pool`` is connected and idle."""
    assert wait_until(lambda: pool.stats().idle == slots, WAIT), pool.stats()


# --------------------------------------------------------------------------- #
# The scheduler, with no I/O
# --------------------------------------------------------------------------- #


def test_scheduler_retries_server_crashes() -> None:
    sched = Scheduler(1, independent=[0])
    sched.start(0.0)
    sched.worker_ready(0, 1, 0.0, capacity=2)
    assert sched.submit(1, None, 1, 0.0) == [SendCalls(0, 1, (1,))]
    # The server answered with a crash: sent again at once (the slot lives on).
    assert sched.call_crashed(0, 1, 1, 0.1, "crash") == [SendCalls(0, 1, (1,))]
    assert sched.calls[1].attempts == 1
    # A stale answer (another generation, or a call not on that slot) changes nothing.
    assert sched.call_crashed(0, 2, 1, 0.1, "stale") == []
    assert sched.call_crashed(0, 1, 99, 0.1, "unknown") == []
    # The second crash exhausts retries=1: it fails for good with that cause.
    assert sched.call_crashed(0, 1, 1, 0.2, "crash 2") == [
        Resolve(1, Outcome.CRASHED, 0, "crash 2", 1)
    ]
    assert sched.idle() and not sched.slots[0].outstanding

    # A crash on the server and a lost connection count against the same retries.
    sched.submit(2, None, 1, 1.0)
    assert sched.call_crashed(0, 1, 2, 1.1, "crash") == [SendCalls(0, 1, (2,))]
    actions = sched.worker_died(0, 1, 1.2, "connection lost")
    assert Resolve(2, Outcome.CRASHED, 0, "connection lost", 1) in actions
    assert 2 not in sched.calls

    # retries=0: the first crash fails it.
    sched = Scheduler(1, independent=[0])
    sched.start(0.0)
    sched.worker_ready(0, 1, 0.0)
    sched.submit(3, None, 0, 0.0)
    assert sched.call_crashed(0, 1, 3, 0.1, "c") == [Resolve(3, Outcome.CRASHED, 0, "c", 1)]


# --------------------------------------------------------------------------- #
# offload.connect()
# --------------------------------------------------------------------------- #


def test_a_call_crashed_on_a_server_runs_again_on_its_new_worker(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    server = serve(workers=1)
    attempts = str(tmp_path / "attempts")
    with offload.connect(server.address, token=token[1]) as w:
        fut = w.submit(offload.Task(rt.crash_first, retries=1, register=False), attempts)
        pid = fut.result(WAIT)
        first, second = rt.attempts_of(attempts)
        assert pid == second != first  # the server's replacement worker ran it
        assert runs_under(pid, server)
        assert isinstance(fut.status(), offload.Success)
        assert w.call(rt.attempts_of, attempts) == [first, second]  # the handle goes on
    assert server.stop() == 0


def test_a_call_crashing_retries_plus_one_times_fails_for_good(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    server = serve(workers=1)
    attempts = str(tmp_path / "attempts")
    with offload.connect(server.address, token=token[1]) as w:
        task = offload.Task(rt.crash_first, retries=2, register=False)
        err = w.submit(task, attempts, 100).exception(WAIT)
        assert type(err) is offload.WorkerCrashed, repr(err)  # not ConnectionLost
        assert err.signal == "SIGKILL" and err.reason == "signal", err
        assert "it failed on all 3 attempts (retries=2)" in str(err), err
        pids = rt.attempts_of(attempts)
        assert len(pids) == 3 and len(set(pids)) == 3, pids  # three workers, no more
        assert err.pid == pids[-1]
        # No attempt is left running: the next call is the only one on the server.
        assert w.call(rt.crash_first, str(tmp_path / "other"), 0) != pids[-1]
        assert len(rt.attempts_of(attempts)) == 3
    assert server.stop() == 0


def test_without_retries_a_crash_on_a_server_fails_at_once(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    server = serve(workers=1)
    attempts = str(tmp_path / "attempts")
    with offload.connect(server.address, token=token[1]) as w:
        err = w.submit(rt.crash_first, attempts).exception(WAIT)
        assert type(err) is offload.WorkerCrashed, repr(err)
        assert "attempts" not in str(err), err
        assert len(rt.attempts_of(attempts)) == 1
        assert isinstance(w.submit(rt.crash_first, attempts).result(WAIT), int)  # 2nd call
    assert server.stop() == 0


def test_a_task_that_raises_on_a_server_is_not_retried(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    server = serve(workers=1)
    attempts = str(tmp_path / "attempts")
    with offload.connect(server.address, token=token[1]) as w:
        fut = w.submit(offload.Task(rt.raise_always, retries=3, register=False), attempts)
        with pytest.raises(rt.TaskError):
            fut.result(WAIT)
        assert isinstance(fut.status(), offload.Raised)
        assert w.call(rt.attempts_of, attempts) == rt.attempts_of(attempts)
        assert len(rt.attempts_of(attempts)) == 1
    assert server.stop() == 0


def test_a_call_timing_out_on_a_server_is_not_retried(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    server = serve(workers=1)
    attempts = str(tmp_path / "attempts")
    release = tmp_path / "release"
    try:
        with offload.connect(server.address, token=token[1]) as w:
            task = offload.Task(rt.hold, timeout=0.5, retries=2, register=False)
            err = w.submit(task, attempts, str(release)).exception(WAIT)
            assert isinstance(err, offload.TaskTimeout), repr(err)
            # Had it been retried, the attempt would run before this call.
            assert w.call(rt.attempts_of, attempts) == rt.attempts_of(attempts)
            assert len(rt.attempts_of(attempts)) == 1
    finally:
        release.touch()
    assert server.stop() == 0


def test_a_channel_producer_retried_through_a_server(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    server = serve(workers=1)
    attempts = str(tmp_path / "attempts")
    with offload.connect(server.address, token=token[1]) as w:
        # A window smaller than what each attempt sends: the retry needs fresh credit.
        tx, rx = offload.channel(maxsize=2)
        task = offload.Task(rt.produce, retries=1, register=False)
        fut = w.submit(task, tx, 5, attempts)
        tx.close()
        # The failed attempt's items stay in the stream; the retry's follow (docs/channels.md).
        assert list(rx) == [("first", i) for i in range(5)] + [("retry", i) for i in range(5)]
        assert fut.result(WAIT) == rt.attempts_of(attempts)[1]
    assert server.stop() == 0


def test_on_failure_fires_for_each_process_a_server_lost_under_a_call(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    """SPEC section 4: ``on_failure`` fires for a worker's unexpected death, so for a
    server's process that died under a call too (retried or not), never for a task's
    own exception or a timeout (the server killed that process on purpose)."""
    server = serve(workers=1)
    attempts, release = str(tmp_path / "attempts"), tmp_path / "release"
    failures = Recorder()
    try:
        with offload.connect(server.address, token=token[1], on_failure=failures) as w:
            pid = w.submit(offload.Task(rt.crash_first, retries=1, register=False), attempts)
            assert pid.result(WAIT) == rt.attempts_of(attempts)[1]
            [first] = failures.wait_for(1, WAIT)
            assert type(first) is offload.WorkerCrashed, repr(first)
            assert first.pid == rt.attempts_of(attempts)[0] and first.signal == "SIGKILL"
            with pytest.raises(rt.TaskError):
                w.call(rt.raise_always, str(tmp_path / "raises"))
            task = offload.Task(rt.hold, timeout=0.5, register=False)
            with pytest.raises(offload.TaskTimeout):
                w.submit(task, str(tmp_path / "holds"), str(release)).result(WAIT)
            err = w.submit(rt.crash_first, str(tmp_path / "again")).exception(WAIT)
            assert type(err) is offload.WorkerCrashed, repr(err)
            second = failures.wait_for(2, WAIT)[1]
            assert second.pid == err.pid != first.pid, (first, second)
            assert len(failures.errors) == 2, failures.errors
    finally:
        release.touch()
    assert server.stop() == 0


# --------------------------------------------------------------------------- #
# Pools over hosts
# --------------------------------------------------------------------------- #


def test_a_pool_over_two_hosts_retries_a_call_crashed_on_a_server(
    serve: Serve, token: tuple[Path, str], tmp_path: Path
) -> None:
    a, b = serve(), serve()
    once, always = str(tmp_path / "once"), str(tmp_path / "always")
    with offload.Pool(hosts=[a.address, b.address], token=token[1]) as pool:
        wait_ready(pool, 2)
        pid = pool.submit(offload.Task(rt.crash_first, retries=1, register=False), once)
        assert pid.result(WAIT) == rt.attempts_of(once)[1]
        task = offload.Task(rt.crash_first, retries=2, register=False)
        err = pool.submit(task, always, 100).exception(WAIT)
        assert type(err) is offload.WorkerCrashed, repr(err)
        assert "it failed on all 3 attempts (retries=2)" in str(err), err
        assert len(rt.attempts_of(always)) == 3
        assert pool.submit(rt.attempts_of, always).result(WAIT) == rt.attempts_of(always)
    assert a.stop() == 0
    assert b.stop() == 0


@pytest.mark.parametrize("retries", [1, 2])
def test_a_crash_on_a_server_and_a_lost_host_count_together(
    serve: Serve, token: tuple[Path, str], tmp_path: Path, retries: int
) -> None:
    """Attempt 1 crashes its worker on a server; attempt 2 is running when its whole
    server is killed (ConnectionLost, retried as before); attempt 3, if allowed, runs on
    the host that is left."""
    a, b = serve(), serve()
    attempts = str(tmp_path / "attempts")
    release = tmp_path / "release"
    try:
        with offload.Pool(hosts=[a.address, b.address], token=token[1]) as pool:
            wait_ready(pool, 2)
            task = offload.Task(rt.crash_then_hold, retries=retries, register=False)
            fut = pool.submit(task, attempts, str(release))
            assert wait_until(lambda: len(rt.attempts_of(attempts)) == 2, WAIT)
            holding = rt.attempts_of(attempts)[1]
            owners = [s for s in (a, b) if runs_under(holding, s)]
            assert len(owners) == 1, holding
            lost = owners[0]
            other = b if lost is a else a
            lost.kill()
            if retries == 2:
                pid = fut.result(WAIT)
                assert pid == rt.attempts_of(attempts)[2]
                assert runs_under(pid, other)
            else:
                err = fut.exception(WAIT)
                assert isinstance(err, offload.ConnectionLost), repr(err)
                assert "it failed on all 2 attempts (retries=1)" in str(err), err
                assert len(rt.attempts_of(attempts)) == 2
    finally:
        release.touch()
    assert other.stop() == 0
