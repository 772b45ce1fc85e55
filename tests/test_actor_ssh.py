"""Actors over ssh (``MyActor.options(where=offload.SSH(...)).spawn(...)``), against a
real sshd on 127.0.0.1 (:mod:`sshd`).

The "remote" machine is this one, so "nothing left behind there" is checked by pid:
the actor's process (``handle.pid``) must be gone, and so must the ssh client and the
forwarded sockets' directories. The actor classes travel in ``actor_tasks``, shipped
with ``SSH(ship=...)``.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
import pytest

import actor_tasks as t
import crashes
import offload
from offload import SSH
from sshd import MISSING, SSHD, have_sshd, python_wrapper, ssh_children, wait_gone

pytestmark = pytest.mark.skipif(not have_sshd(), reason=MISSING)

LIMIT = 60.0  # seconds any one result may take (a bound, not an expectation)


@pytest.fixture
def remote(sshd: SSHD, tmp_path: Path) -> SSH:
    """This virtualenv's Python over ssh, the remote cache in the test's directory."""
    python = python_wrapper(tmp_path / "python", tmp_path / "cache")
    return sshd.ssh(python=python, ship=("actor_tasks",))


def _socket_dir(handle: Any) -> str:
    """The private directory of the socket ssh forwards here (removed at the end)."""
    address = handle.address
    assert address.startswith("unix:" + tempfile.gettempdir())
    return os.path.dirname(address.removeprefix("unix:"))


_started = crashes.started_event


# -- options -----------------------------------------------------------------------------------


def test_explicit_and_listen_are_refused_over_ssh_at_options_time() -> None:
    where = SSH("h1")
    with pytest.raises(ValueError, match="ends with the ssh connection"):
        t.Counter.options(where=where, shutdown_on="explicit")
    with pytest.raises(ValueError, match="listen"):
        t.Counter.options(where=where, listen="127.0.0.1:7000")
    launcher = t.Counter.options(where=where, shutdown_on="heartbeat_timeout", heartbeat=(1, 5))
    assert "h1" in repr(launcher)
    with pytest.raises(ValueError, match="worker server"):
        t.Counter.options(where="h1:1111")


# -- calls -------------------------------------------------------------------------------------


def test_actor_over_ssh_keeps_state_and_order_and_exceptions(remote: SSH) -> None:
    c = t.Counter.options(where=remote, name="counter-ssh").spawn(5)
    forwarded = _socket_dir(c)
    try:
        assert c.add(2).result(LIMIT) == 7
        futures = [c.record(i) for i in range(50)]
        assert [f.result(LIMIT) for f in futures] == list(range(50))
        assert c.history().result(LIMIT) == list(range(50))
        with pytest.raises(t.Boom, match="oops"):
            c.fail("oops").result(LIMIT)
        assert c.get().result(LIMIT) == 1007  # the state survived the exception
        assert c.pid is not None and c.pid != os.getpid()
        assert c.call(t.Counter.getpid).result(LIMIT) == c.pid  # the remote process
        assert c.address.startswith("unix:")  # the socket ssh forwards here
        assert c.alive
        shown = repr(c)
        assert "counter-ssh" in shown and "alive" in shown and f"pid={c.pid}" in shown
        assert len(ssh_children()) == 1
        remote_pid = c.pid
    finally:
        c.shutdown()
    assert wait_gone([remote_pid], LIMIT) == []
    assert not ssh_children()
    assert not os.path.exists(forwarded)
    assert "shut down" in repr(c)
    with pytest.raises(RuntimeError, match="shut down"):
        c.add(1)


def test_concurrency_over_ssh(remote: SSH) -> None:
    with t.Overlap.options(where=remote, concurrency=2).spawn() as o:
        assert all(f.result(LIMIT) for f in [o.meet(2), o.meet(2)])  # two at once


def test_handle_passed_to_a_local_worker_calls_the_actor_over_ssh(remote: SSH) -> None:
    with t.Counter.options(where=remote).spawn(10) as c, offload.spawn() as w:
        assert w.call(t.add_through, c, 5) == 15
        assert w.call(t.record_many, c, 0, 20) == list(range(20))
        assert c.add(1).result(LIMIT) == 16  # one state, whoever calls


def test_a_holder_can_shut_the_actor_over_ssh_down(remote: SSH) -> None:
    c = t.Counter.options(where=remote).spawn(1)
    remote_pid = c.pid
    assert remote_pid is not None
    holder = pickle.loads(pickle.dumps(c))  # connects through the forwarded socket
    assert holder.add(1).result(LIMIT) == 2
    holder.shutdown()
    assert wait_gone([remote_pid], LIMIT) == []
    with pytest.raises((offload.ConnectionLost, offload.WorkerCrashed)):
        c.add(1).result(LIMIT)
    c.shutdown()
    assert not ssh_children()


def test_start_failure_over_ssh_is_a_start_error_quoting_the_traceback(remote: SSH) -> None:
    with pytest.raises(offload.StartError, match="no actor today") as info:
        t.Broken.options(where=remote, name="broken-ssh").spawn()
    assert "broken-ssh" in str(info.value)
    assert not ssh_children()


# -- the end -----------------------------------------------------------------------------------


def test_killing_ssh_ends_the_actor_for_good(remote: SSH) -> None:
    failures = crashes.Recorder()
    c = t.Counter.options(where=remote, name="doomed-ssh", on_failure=failures).spawn(1)
    try:
        assert c.add(1).result(LIMIT) == 2
        forwarded = _socket_dir(c)
        remote_pid = c.pid
        assert remote_pid is not None
        pending = c.block()
        assert _started(pending).wait(LIMIT)
        queued = c.add(1)  # waits behind block(): concurrency 1
        (ssh,) = ssh_children()
        os.kill(ssh.pid, signal.SIGKILL)
        lost = (offload.ConnectionLost, offload.WorkerCrashed)
        with pytest.raises(lost, match="doomed-ssh"):
            pending.result(LIMIT)
        with pytest.raises(lost):
            queued.result(LIMIT)
        with pytest.raises(lost, match=r"never restarted|does not reconnect"):
            c.add(1).result(LIMIT)  # later calls: the same story, nothing restarted
        failures.wait_for(1, LIMIT)
        assert wait_gone([remote_pid], LIMIT) == []  # the bootstrap killed it
        assert not ssh_children()  # no new ssh: no restart
        assert not c.alive and "dead" in repr(c)
        assert len(failures.errors) == 1
    finally:
        c.shutdown()
    assert len(failures.errors) == 1
    assert not os.path.exists(forwarded)


def test_an_actor_over_ssh_whose_process_dies_fires_on_failure_once(remote: SSH) -> None:
    failures = crashes.Recorder()
    c = t.Counter.options(where=remote, name="fragile-ssh", on_failure=failures).spawn(1)
    try:
        remote_pid = c.pid
        assert remote_pid is not None
        running = c.block()
        assert _started(running).wait(LIMIT)
        os.kill(remote_pid, signal.SIGKILL)  # its process: a child of our own ssh
        with pytest.raises(offload.WorkerCrashed, match="fragile-ssh"):
            running.result(LIMIT)
        with pytest.raises(offload.WorkerCrashed):
            c.add(1).result(LIMIT)  # dead for good: the same story
        [err] = failures.wait_for(1, LIMIT)
        assert isinstance(err, offload.WorkerCrashed), repr(err)
    finally:
        c.shutdown()
    assert len(failures.errors) == 1, failures.errors
    assert not ssh_children()


def test_kill_ends_the_actor_over_ssh_at_once(remote: SSH) -> None:
    failures: list[BaseException] = []
    c = t.Counter.options(where=remote, on_failure=failures.append).spawn(1)
    remote_pid = c.pid
    assert remote_pid is not None
    running = c.block()
    assert _started(running).wait(LIMIT)
    c.kill()
    with pytest.raises(offload.WorkerKilled):
        running.result(LIMIT)
    with pytest.raises(offload.WorkerKilled):
        c.add(1).result(LIMIT)
    assert wait_gone([remote_pid], LIMIT) == []
    c.shutdown()
    assert not ssh_children()
    assert failures == []  # killed on purpose: not a failure


_CREATOR = """
import pickle, sys
import actor_tasks as t
with open(sys.argv[1], "rb") as f:
    where = pickle.load(f)
c = t.Counter.options(where=where, shutdown_on=sys.argv[2], heartbeat=(0.2, 3.0)).spawn(1)
assert c.add(1).result(60) == 2
print(c.pid, flush=True)
sys.stdin.read()  # until the test ends this program
"""


@pytest.mark.parametrize(
    ("shutdown_on", "signum"),
    [("parent_exit", signal.SIGKILL), ("heartbeat_timeout", signal.SIGSTOP)],
)
def test_the_actor_over_ssh_ends_with_its_killed_or_frozen_creator(
    remote: SSH, tmp_path: Path, shutdown_on: str, signum: int
) -> None:
    # The creator is another program. SIGKILLed: its ssh connection ends, and the actor
    # with it. Frozen with SIGSTOP: its ssh connection stays up, but its heartbeats
    # stop, and a heartbeat_timeout actor ends by itself.
    where_file = tmp_path / "where.pickle"
    where_file.write_bytes(pickle.dumps(remote))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    creator = subprocess.Popen(
        [sys.executable, "-c", _CREATOR, str(where_file), shutdown_on],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert creator.stdout is not None
        ready, _, _ = select.select([creator.stdout], [], [], LIMIT)
        assert ready, "the creator did not start its actor in time"
        remote_pid = int(creator.stdout.readline())
        assert psutil.pid_exists(remote_pid)
        os.kill(creator.pid, signum)
        assert wait_gone([remote_pid], LIMIT) == []
    finally:
        creator.kill()
        creator.wait(LIMIT)
        for pipe in (creator.stdin, creator.stdout):
            if pipe is not None:
                pipe.close()
