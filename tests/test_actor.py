"""Actors (SPEC section 8) and travelling worker handles, with real processes.

Actors are started by the tests and shut down (or killed) by them; the classes and the
tasks that use a handle elsewhere live in ``actor_tasks`` (workers import it). Programs
of their own (a creator that exits, a creator that is SIGKILLed, a program that loads a
handle from a file) are scripts run with :mod:`subprocess`, bounded by timeouts, and
synchronised through their output. A method that blocks reports ``"started"`` first;
the tests wait for that report, never sleep.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import actor_tasks as t
import crashes
import offload
from crashes import is_gone
from offload.actor import ActorHandle
from remote_helpers import ServerProcess, clean_env, write_token_file

TESTS_DIR = str(Path(__file__).resolve().parent)
WAIT = 20.0


def wait_until(predicate: Callable[[], bool], limit: float = WAIT) -> bool:
    return crashes.wait_until(predicate, limit)


started = crashes.started_event


def pythonpath() -> str:
    """``PYTHONPATH`` for a program that imports ``actor_tasks``: this folder first."""
    return os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")])


def run_script(code: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": pythonpath()},
        check=False,
    )


@contextlib.contextmanager
def creator(code: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run ``code``, a creator that spawns an actor, prints its pid and reads stdin until
    the test kills it; yield the creator and the actor's pid. At the end the creator is
    killed (and continued, were it stopped) and reaped."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath()},
    )
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.send_signal(signal.SIGCONT)
        proc.wait(WAIT)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()


@pytest.fixture
def actors() -> Iterator[Callable[..., ActorHandle[Any]]]:
    """Spawn actors (``actors(Cls, *args, **options)``); teardown shuts down the rest."""
    made: list[ActorHandle[Any]] = []

    def make(cls: Any, *args: Any, **options: Any) -> ActorHandle[Any]:
        handle = cls.options(**options).spawn(*args)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        handle.shutdown(timeout=10)


# --------------------------------------------------------------------------- #
# State, order, concurrency, errors
# --------------------------------------------------------------------------- #


def test_state_lives_in_the_actor_and_calls_run_in_order(actors: Any) -> None:
    c = actors(t.Counter, 5)
    assert c.add(2).result(WAIT) == 7
    futures = [c.record(i) for i in range(200)]  # none waited for: sent ahead
    assert [f.result(WAIT) for f in futures] == list(range(200))
    assert c.history().result(WAIT) == list(range(200))
    assert c.call(t.Counter.add, 3).result(WAIT) == 10
    assert c.call(t.Counter.pid).result(WAIT) == c.pid != os.getpid()
    assert c.alive and c.address.startswith("127.0.0.1:")
    assert "alive" in repr(c) and str(c.pid) in repr(c) and "pending=0" in repr(c)


def test_a_method_that_raises_leaves_the_actor_and_its_state(actors: Any) -> None:
    c = actors(t.Counter, 1)
    with pytest.raises(t.Boom, match="on purpose") as info:
        c.fail("on purpose").result(WAIT)
    assert isinstance(info.value.__cause__, offload.RemoteTraceback)
    assert c.get().result(WAIT) == 1001  # the change made before raising stays
    assert c.add(1).result(WAIT) == 1002
    assert c.alive


def test_calls_run_one_at_a_time_unless_concurrency(actors: Any) -> None:
    one = actors(t.Overlap)
    for f in [one.work() for _ in range(20)]:
        f.result(WAIT)
    assert one.most_at_once().result(WAIT) == 1
    two = actors(t.Overlap, concurrency=2)
    first, second = two.meet(2), two.meet(2)  # each returns only when both run at once
    assert first.result(WAIT) and second.result(WAIT)


def test_concurrency_one_holds_across_the_creator_and_other_holders(
    actors: Any, spawn: Any
) -> None:
    a = actors(t.Overlap)
    w = spawn()
    elsewhere = w.submit(t.work_many, a, 30)  # another client, through the listener
    mine = [a.work() for _ in range(30)]
    for f in mine:
        f.result(WAIT)
    elsewhere.result(WAIT)
    assert a.most_at_once().result(WAIT) == 1


def test_not_a_method_is_an_attribute_error_at_the_call_site(actors: Any) -> None:
    c = actors(t.Counter)
    with pytest.raises(AttributeError, match=r"has no method 'n'.*nothing of that name"):
        c.n  # noqa: B018 - the attribute access is the test
    with pytest.raises(AttributeError, match=r"Counter.doubled is a property"):
        c.doubled  # noqa: B018
    with pytest.raises(AttributeError, match=r"Counter.label is a class attribute"):
        c.label  # noqa: B018
    with pytest.raises(AttributeError, match=r"private name"):
        c._private  # noqa: B018
    with pytest.raises(AttributeError, match=r"has no method 'getpid'"):
        c.call(t.getpid)  # a function, not a method of the class
    assert c.getpid().result(WAIT) == c.pid  # nothing was sent for the refused ones


def test_init_that_raises_is_a_start_error() -> None:
    with pytest.raises(offload.StartError, match="no actor today"):
        t.Broken.spawn()


def test_actor_options_are_checked_before_anything_starts() -> None:
    with pytest.raises(TypeError, match="unknown actor option"):
        t.Counter.options(nope=1)
    with pytest.raises(ValueError, match="max_tasks does not apply to an actor"):
        t.Counter.options(max_tasks=1)
    with pytest.raises(ValueError, match="memory_limit does not apply"):
        t.Counter.options(memory_limit=1 << 30)
    with pytest.raises(ValueError, match="cannot run on the worker server"):
        t.Counter.options(where="127.0.0.1:1111")
    with pytest.raises(ValueError, match="concurrency"):
        t.Counter.options(concurrency=0)
    with pytest.raises(ValueError, match="listen"):
        t.Counter.options(listen="host:notaport")
    with pytest.raises(ValueError, match="only apply to spawn"):
        t.Counter.options(start_method="fork").serve()
    with pytest.raises(ValueError, match="shutdown_on='explicit' is for actors"):
        offload.spawn(shutdown_on="explicit")
    with pytest.raises(offload.SerializationError, match="could not be pickled"):
        t.Counter.spawn(threading.Lock())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Handles that travel
# --------------------------------------------------------------------------- #


def test_a_handle_passed_to_a_task_on_another_worker(actors: Any, spawn: Any) -> None:
    c = actors(t.Counter, 10)
    w = spawn()
    assert w.call(t.add_through, c, 5) == 15
    assert w.call(t.add_nested, [c], {"again": c}, 1) == [16, 17]
    assert c.get().result(WAIT) == 17


def test_several_clients_each_keep_their_order(actors: Any, spawn: Any) -> None:
    c = actors(t.Counter)
    ws = [spawn() for _ in range(2)]
    futures = [w.submit(t.record_many, c, 1000 * (i + 1), 50) for i, w in enumerate(ws)]
    mine = [c.record(i) for i in range(50)]
    assert [f.result(WAIT) for f in mine] == list(range(50))
    for i, f in enumerate(futures):
        assert f.result(WAIT) == list(range(1000 * (i + 1), 1000 * (i + 1) + 50))
    seen = c.history().result(WAIT)
    for start in (0, 1000, 2000):
        mine_seen = [x for x in seen if start <= x < start + 50]
        assert mine_seen == list(range(start, start + 50))


def test_a_handle_passed_to_another_actor(actors: Any) -> None:
    c = actors(t.Counter, 1)
    f = actors(t.Forwarder, c)
    assert f.add(2).result(WAIT) == 3
    assert c.get().result(WAIT) == 3


def test_a_handle_passed_to_a_remote_servers_worker(actors: Any, tmp_path: Path) -> None:
    token_path, token = write_token_file(tmp_path)
    env = clean_env(PYTHONPATH=pythonpath())
    server = ServerProcess(
        tmp_path,
        ["--listen", "127.0.0.1:0", "--token-file", str(token_path), "--workers", "1"],
        env=env,
    )
    server.start()
    try:
        c = actors(t.Counter, 100)
        with offload.connect(server.address, token=token) as remote:
            assert remote.call(t.add_through, c, 1) == 101
            assert remote.call(t.add_nested, [c, c], {}, 1) == [102, 103]
        assert c.get().result(WAIT) == 103
    finally:
        assert server.stop() == 0


def test_a_handle_pickled_to_a_file_and_loaded_by_another_program(
    actors: Any, tmp_path: Path
) -> None:
    path = tmp_path / "counter.handle"
    c = actors(t.Counter, 1, handle_file=str(path))
    assert path.stat().st_mode & 0o777 == 0o600
    out = run_script(
        """
        import pickle, sys
        import offload
        h = offload.Actor.load(sys.argv[1])
        print(h.add(1).result(20), h.pid)
        with open(sys.argv[1], "rb") as f:
            again = pickle.load(f)       # plain pickle works too
        print(again.add(1).result(20))
        again.close()
        h.close()
        """,
        str(path),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", str(c.pid), "3"]
    assert c.get().result(WAIT) == 3
    os.chmod(path, 0o644)
    with pytest.raises(offload.OffloadError, match="open to others"):
        offload.Actor.load(path)


def test_a_loaded_handle_in_this_process(actors: Any) -> None:
    c = actors(t.Counter, 1)
    holder = pickle.loads(pickle.dumps(c))
    try:
        assert holder.add(1).result(WAIT) == 2
        assert holder.pid == c.pid and holder.address == c.address
        assert "role=holder" in repr(holder)
    finally:
        holder.close()
    assert c.add(1).result(WAIT) == 3  # closing a holder's handle leaves the actor


def test_a_plain_worker_handle_travels(spawn: Any) -> None:
    w1 = spawn()
    w2 = spawn()
    assert w2.call(t.call_on, w1, t.getpid) == w1.pid
    assert w2.call(t.call_on, [w1][0], t.getpid) == w1.pid  # its listener is started once
    assert w1.call(t.getpid) == w1.pid  # the creator's own channel still works


# --------------------------------------------------------------------------- #
# Lifetimes: explicit, parent_exit, serve
# --------------------------------------------------------------------------- #


CREATOR = """
import sys
import actor_tasks as t
c = t.Counter.options(shutdown_on="explicit", handle_file=sys.argv[1]).spawn(40)
print(c.add(1).result(20), c.pid, flush=True)
"""


def test_an_explicit_actor_outlives_its_creator_until_shut_down(tmp_path: Path) -> None:
    path = tmp_path / "daemon.handle"
    out = run_script(CREATOR, str(path))
    assert out.returncode == 0, out.stderr
    value, pid = out.stdout.split()
    assert value == "41"
    pid_ = int(pid)
    try:
        assert not is_gone(pid_)  # its creator exited; it did not
        h = offload.Actor.load(path)
        assert h.add(1).result(WAIT) == 42  # the same state
        assert h.call(t.Counter.pid).result(WAIT) == pid_
        h.shutdown()
        assert wait_until(lambda: is_gone(pid_))
        with pytest.raises(RuntimeError):
            h.add(1)
    finally:
        if not is_gone(pid_):
            os.kill(pid_, signal.SIGKILL)


PARENT = """
import sys
import actor_tasks as t
c = t.Counter.spawn(1)
print(c.pid, flush=True)
sys.stdin.read()   # until the test kills us
"""


def test_a_default_actor_dies_with_its_sigkilled_creator() -> None:
    with creator(PARENT) as (parent, pid):
        assert not is_gone(pid)
        parent.kill()
        parent.wait(WAIT)
        assert wait_until(lambda: is_gone(pid))


def test_serve_hosts_the_actor_in_this_process(spawn: Any) -> None:
    h = t.Counter.serve(3)
    try:
        assert h.pid == os.getpid()
        assert h.add(1).result(WAIT) == 4
        assert h.call(t.Counter.getpid).result(WAIT) == os.getpid()
        w = spawn()
        assert w.call(t.add_through, h, 2) == 6  # the handle travels to another process
    finally:
        h.shutdown()
    with pytest.raises(RuntimeError):
        h.add(1)


def test_serve_shut_down_through_a_holders_handle() -> None:
    h = t.Counter.serve(0, listen="127.0.0.1:0")
    holder = pickle.loads(pickle.dumps(h))
    try:
        assert holder.add(5).result(WAIT) == 5
        holder.shutdown()
        assert wait_until(lambda: not h.alive)
    finally:
        h.shutdown()


# --------------------------------------------------------------------------- #
# Death is final
# --------------------------------------------------------------------------- #


def test_an_actor_killed_mid_call_stays_dead(actors: Any) -> None:
    # (A forkserver, say, that an earlier test started lives on: not counted here.)
    before = {child.pid for child in psutil.Process().children()}
    failures = crashes.Recorder()
    c = actors(t.Counter, 1, on_failure=failures)
    pid = c.pid
    assert pid is not None
    running = c.block()
    pending = [c.add(1), c.add(2)]
    assert started(running).wait(WAIT)
    os.kill(pid, signal.SIGKILL)
    for f in [running, *pending]:
        with pytest.raises(offload.WorkerCrashed) as info:
            f.result(WAIT)
        assert info.value.signal == "SIGKILL" and info.value.pid == pid
    with pytest.raises(offload.WorkerCrashed, match="never restarted") as later:
        c.add(1).result(WAIT)
    assert later.value.signal == "SIGKILL"
    (failure,) = failures.wait_for(1, WAIT)
    assert isinstance(failure, offload.WorkerCrashed)
    assert not c.alive and c.pid == pid and "dead" in repr(c)
    now = {child.pid for child in psutil.Process().children()}
    assert now <= before, now - before  # nothing was started again


def test_kill_ends_the_actor_for_good(actors: Any) -> None:
    c = actors(t.Counter, 1)
    running = c.block()
    assert started(running).wait(WAIT)
    c.kill()
    with pytest.raises(offload.WorkerKilled):
        running.result(WAIT)
    with pytest.raises(offload.WorkerKilled, match="never restarted"):
        c.add(1).result(WAIT)


def test_a_holder_sees_the_actor_die(actors: Any) -> None:
    c = actors(t.Counter, 1)
    holder = pickle.loads(pickle.dumps(c))
    try:
        assert holder.add(1).result(WAIT) == 2
        c.kill()
        assert wait_until(lambda: c.pid is not None and is_gone(c.pid))  # kill() does not wait
        with pytest.raises(offload.ConnectionLost):
            holder.add(1).result(WAIT)
        with pytest.raises(offload.ConnectionLost, match="does not reconnect"):
            holder.add(1).result(WAIT)
    finally:
        holder.close()


def test_heartbeat_timeout_actor_runs(actors: Any) -> None:
    c = actors(t.Counter, 1, shutdown_on="heartbeat_timeout", heartbeat=(0.5, 5.0))
    assert c.add(1).result(WAIT) == 2


def test_a_holder_shuts_down_an_actor_its_creator_still_holds(actors: Any) -> None:
    failures = crashes.Recorder()
    c = actors(t.Counter, 1, on_failure=failures)
    holder = pickle.loads(pickle.dumps(c))
    assert holder.add(1).result(WAIT) == 2
    holder.shutdown()  # the creator did not ask: to it, its actor ended
    assert wait_until(lambda: c.pid is not None and is_gone(c.pid))
    with pytest.raises(offload.WorkerCrashed, match="shut down through a handle") as info:
        c.add(1).result(WAIT)
    assert info.value.exitcode == 0
    assert len(failures.wait_for(1, WAIT)) == 1


def test_holders_of_a_worker_handle_see_its_process_replaced(spawn: Any) -> None:
    w = spawn()
    first_pid = w.pid
    holder = pickle.loads(pickle.dumps(w))
    try:
        running = holder.submit(t.report_and_block)
        assert started(running).wait(WAIT)  # progress travels back through the listener
        w.kill()  # the creator's handle restarts its worker on the next call...
        with pytest.raises(offload.ConnectionLost):
            running.result(WAIT)  # ...but the holder's connection died with the process
    finally:
        holder.shutdown()
    assert w.call(t.getpid) != first_pid
    again = pickle.loads(pickle.dumps(w))  # a handle pickled now reaches the new process
    try:
        assert again.call(t.getpid) == w.pid
    finally:
        again.shutdown()


HEARTBEAT_PARENT = """
import sys
import actor_tasks as t
c = t.Counter.options(shutdown_on="heartbeat_timeout", heartbeat=(0.1, 1.0)).spawn(1)
print(c.pid, flush=True)
sys.stdin.read()   # until the test kills us
"""


def test_a_heartbeat_timeout_actor_ends_when_its_creator_stops_answering() -> None:
    with creator(HEARTBEAT_PARENT) as (parent, pid):
        assert not is_gone(pid)
        parent.send_signal(signal.SIGSTOP)  # alive, but its heartbeats stop
        assert wait_until(lambda: is_gone(pid))
