"""Every way a call can fail, and what its future says about it (SPEC sections 2-4).

One parametrised test covers the matrix *where* (pickling the call in the parent,
unpickling it in the worker, running it, pickling the result in the worker, unpickling the
result in the parent) x *how* (exception, ``sys.exit``, ``os._exit``, segfault), each on a
fresh worker. For every case: the future resolves within a bounded time, the error has the
right type and fields, and the worker handle keeps working afterwards (same process when
the worker survived, a new one when it died).

The other tests kill, stop and time out workers from outside and check what becomes of the
task's own subprocesses and of the worker's stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import crashes
import offload

RESOLVE_TIMEOUT = 10.0  # every future must resolve well within this
GONE_TIMEOUT = 5.0  # a killed task's subprocesses must be gone within this
# A call queued behind a failed one needs one worker start (~0.1 s) to run; a short bound
# keeps the known-bug cases below from costing 10 s each.
REQUEUE_TIMEOUT = 3.0


@pytest.fixture
def worker() -> Iterator[offload.Worker]:
    w = offload.spawn()
    try:
        yield w
    finally:
        w.shutdown(timeout=5)


def resolve(fut: offload.Future[Any]) -> BaseException | None:
    """The future's exception (None on success), failing the test if it does not resolve."""
    return fut.exception(timeout=RESOLVE_TIMEOUT)


# --------------------------------------------------------------------------------------- #
# Expectations
# --------------------------------------------------------------------------------------- #

Check = Callable[[BaseException, offload.Worker, int], None]


def serialization_error(direction: str, *words: str) -> Check:
    def check(err: BaseException, w: offload.Worker, pid: int) -> None:
        assert isinstance(err, offload.SerializationError), repr(err)
        assert err.direction == direction
        for word in words:
            assert word in str(err), (word, str(err))

    return check


def crashed(
    reason: str, *, exitcode: int | None = None, sig: str | None = None, stderr: str = ""
) -> Check:
    def check(err: BaseException, w: offload.Worker, pid: int) -> None:
        assert isinstance(err, offload.WorkerCrashed), repr(err)
        assert err.reason == reason
        assert err.pid == pid
        assert err.worker == w.name
        assert err.exitcode == exitcode
        assert err.signal == sig
        assert stderr in err.stderr_tail
        text = str(err)
        assert w.name in text, text
        assert str(pid) in text, text
        if sig is not None:
            assert sig in text, text
        if exitcode is not None:
            assert str(exitcode) in text, text

    return check


def task_raised(typ: type[BaseException], args: tuple[Any, ...], fn_name: str) -> Check:
    def check(err: BaseException, w: offload.Worker, pid: int) -> None:
        assert type(err) is typ, repr(err)
        assert err.args == args
        assert isinstance(err.__cause__, offload.RemoteTraceback)
        assert fn_name in str(err.__cause__)

    return check


def remote_error(type_name: str, fn_name: str) -> Check:
    def check(err: BaseException, w: offload.Worker, pid: int) -> None:
        assert isinstance(err, offload.RemoteError), repr(err)
        assert err.type_name.endswith(type_name), err.type_name
        assert fn_name in err.traceback
        assert type_name in str(err)

    return check


def expect(check: Check, err: BaseException | None, w: offload.Worker, pid: int | None) -> None:
    """Run ``check`` on a call's error (which must exist) from the worker process ``pid``."""
    assert err is not None, "the call succeeded"
    assert pid is not None
    check(err, w, pid)


@dataclass(frozen=True)
class Case:
    id: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    check: Check
    survives: bool  # the worker process outlives the failure

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


SEGV = "Segmentation fault"  # what faulthandler prints

CASES = [
    # -- pickling the call in the parent: the worker never sees it -------------------------
    Case(
        "pickle-arg/exception",
        crashes.identity,
        (crashes.ErrorAtPickle(),),
        serialization_error("argument", "ErrorAtPickle", "refusing to be pickled"),
        survives=True,
    ),
    Case(
        "pickle-arg/sys.exit",
        crashes.identity,
        (crashes.ExitAtPickle(),),
        serialization_error("argument", "ExitAtPickle", "SystemExit"),
        survives=True,
    ),
    Case(
        "pickle-arg/nested-exception",
        crashes.identity,
        ([1, {"k": crashes.ErrorAtPickle()}],),
        serialization_error("argument", "ErrorAtPickle"),
        survives=True,
    ),
    # -- unpickling the call in the worker ----------------------------------------------------
    Case(
        "unpickle-arg/exception",
        crashes.identity,
        (crashes.ErrorAtUnpickle(),),
        serialization_error("argument", "CrashTestError"),
        survives=True,
    ),
    Case(
        "unpickle-arg/sys.exit",
        crashes.identity,
        (crashes.ExitAtUnpickle(),),
        serialization_error("argument", "SystemExit"),
        survives=True,
    ),
    Case(
        "unpickle-arg/os._exit",
        crashes.identity,
        (crashes.OsExitAtUnpickle(),),
        crashed("exit", exitcode=crashes.EXIT_CODE),
        survives=False,
    ),
    Case(
        "unpickle-arg/segfault",
        crashes.identity,
        (crashes.SegfaultAtUnpickle(),),
        crashed("signal", sig="SIGSEGV", stderr=SEGV),
        survives=False,
    ),
    # -- running the call ----------------------------------------------------------------------
    Case(
        "run/exception",
        crashes.raise_error,
        (),
        task_raised(crashes.CrashTestError, crashes.ERROR_ARGS, "raise_error"),
        survives=True,
    ),
    Case(
        "run/sys.exit",
        crashes.sys_exit,
        (),
        task_raised(SystemExit, (crashes.EXIT_CODE,), "sys_exit"),
        survives=True,
    ),
    Case(
        "run/os._exit",
        crashes.os_exit,
        (),
        crashed("exit", exitcode=crashes.EXIT_CODE),
        survives=False,
    ),
    Case(
        "run/segfault",
        crashes.segfault,
        (),
        crashed("signal", sig="SIGSEGV", stderr=SEGV),
        survives=False,
    ),
    # -- pickling the result in the worker ---------------------------------------------------
    Case(
        "pickle-result/exception",
        crashes.return_instance,
        (crashes.ErrorAtPickle,),
        serialization_error("result", "ErrorAtPickle"),
        survives=True,
    ),
    Case(
        "pickle-result/sys.exit",
        crashes.return_instance,
        (crashes.ExitAtPickle,),
        serialization_error("result", "ExitAtPickle"),
        survives=True,
    ),
    Case(
        "pickle-result/os._exit",
        crashes.return_instance,
        (crashes.OsExitAtPickle,),
        crashed("exit", exitcode=crashes.EXIT_CODE),
        survives=False,
    ),
    Case(
        "pickle-result/segfault",
        crashes.return_instance,
        (crashes.SegfaultAtPickle,),
        crashed("signal", sig="SIGSEGV", stderr=SEGV),
        survives=False,
    ),
    # -- unpickling the result in the parent ---------------------------------------------------
    Case(
        "unpickle-result/exception",
        crashes.return_instance,
        (crashes.ErrorAtUnpickle,),
        serialization_error("result", "CrashTestError"),
        survives=True,
    ),
    Case(
        "unpickle-result/sys.exit",
        crashes.return_instance,
        (crashes.ExitAtUnpickle,),
        serialization_error("result", "SystemExit"),
        survives=True,
    ),
    # -- an exception that cannot travel back as itself --------------------------------------
    Case(
        "exception/cannot-unpickle",
        crashes.raise_unpicklable_error,
        (),
        remote_error("UnpicklableError", "raise_unpicklable_error"),
        survives=True,
    ),
    Case(
        "exception/cannot-pickle",
        crashes.raise_error_with_lock,
        (),
        remote_error("CrashTestError", "raise_error_with_lock"),
        survives=True,
    ),
]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_crash_matrix(worker: offload.Worker, case: Case) -> None:
    pid = worker.pid
    assert pid is not None
    fut = worker.submit(case.fn, *case.args)

    err = resolve(fut)
    assert fut.done()
    assert err is not None, f"{case.id}: succeeded with {fut.result()!r}"
    expect(case.check, err, worker, pid)

    status = fut.status()
    if isinstance(err, offload.ExecutionError) and not isinstance(err, offload.RemoteError):
        assert status == offload.Failed(err)
    elif not isinstance(err, offload.ExecutionError):
        assert status == offload.Raised(err)
    with pytest.raises(type(err)):
        fut.result(timeout=0)

    # The handle still works: same process if it survived, a fresh one if it died.
    new_pid = worker.call(os.getpid)
    assert new_pid == worker.pid
    if case.survives:
        assert new_pid == pid
    else:
        assert new_pid != pid
    # ...and keeps working for ordinary calls.
    assert worker.call(crashes.identity, [1, "two"]) == [1, "two"]


def test_crash_matrix_survivors_keep_one_process() -> None:
    """All the non-fatal failures in a row on one worker: one process throughout."""
    with offload.spawn() as w:
        pid = w.pid
        assert pid is not None
        for case in CASES:
            if case.survives:
                expect(case.check, resolve(w.submit(case.fn, *case.args)), w, pid)
        assert w.call(os.getpid) == pid


# --------------------------------------------------------------------------------------- #
# Killed, stopped and timed out from outside
# --------------------------------------------------------------------------------------- #


def test_sigkill_from_outside(worker: offload.Worker, tmp_path: Path) -> None:
    with crashes.Fifo(tmp_path / "started") as fifo:
        fut = worker.submit(crashes.notify_and_sleep, fifo.path)
        pid = fifo.read_pid()
    assert pid == worker.pid
    os.kill(pid, signal.SIGKILL)

    err = resolve(fut)
    expect(crashed("signal", sig="SIGKILL"), err, worker, pid)
    new_pid = worker.call(os.getpid)
    assert new_pid != pid


def test_sigstop_then_timeout(worker: offload.Worker, tmp_path: Path) -> None:
    task = offload.task(crashes.notify_and_sleep, timeout=0.5)
    with crashes.Fifo(tmp_path / "started") as fifo:
        fut = worker.submit(task, fifo.path)
        pid = fifo.read_pid()
        os.kill(pid, signal.SIGSTOP)

    started = time.monotonic()
    err = resolve(fut)
    assert isinstance(err, offload.TaskTimeout), repr(err)
    assert isinstance(err, TimeoutError)
    assert err.timeout == 0.5
    assert err.pid == pid
    assert err.worker == worker.name
    assert time.monotonic() - started < 5
    assert crashes.wait_gone([pid], GONE_TIMEOUT) == []

    new_pid = worker.call(os.getpid)
    assert new_pid != pid
    assert worker.call(crashes.identity, "after") == "after"


def test_kill_call_whose_subprocess_ignores_sigterm(worker: offload.Worker, tmp_path: Path) -> None:
    pid = worker.pid
    with crashes.Fifo(tmp_path / "child") as fifo:
        fut = worker.submit(crashes.start_term_ignoring_child, fifo.path)
        child = fifo.read_pid()
    try:
        assert fut.kill() is True
        err = resolve(fut)
        assert isinstance(err, offload.WorkerKilled), repr(err)
        assert err.pid == pid
        assert err.worker == worker.name
        assert crashes.wait_gone([child, pid], GONE_TIMEOUT) == []
    finally:
        crashes.kill_quietly(child)
    assert fut.kill() is False  # already resolved
    assert worker.call(os.getpid) != pid


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "own-session"])
@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_grandchild_dies_with_the_call(
    worker: offload.Worker, tmp_path: Path, how: str, new_session: bool
) -> None:
    pid = worker.pid
    fn: Any = crashes.start_grandchild
    if how == "timeout":
        fn = offload.task(crashes.start_grandchild, timeout=0.5)
    with crashes.Fifo(tmp_path / "grandchild") as fifo:
        fut = worker.submit(fn, fifo.path, new_session)
        grandchild = fifo.read_pid()
    try:
        if how == "kill":
            assert fut.kill() is True
            err = resolve(fut)
            assert isinstance(err, offload.WorkerKilled), repr(err)
        else:
            err = resolve(fut)
            assert isinstance(err, offload.TaskTimeout), repr(err)
        assert crashes.wait_gone([grandchild, pid], GONE_TIMEOUT) == []
    finally:
        crashes.kill_quietly(grandchild)
    assert worker.call(os.getpid) != pid


# --------------------------------------------------------------------------------------- #
# stderr tail
# --------------------------------------------------------------------------------------- #


def test_stderr_tail_of_exit(worker: offload.Worker) -> None:
    pid = worker.pid
    err = resolve(worker.submit(crashes.stderr_then_exit, "hello-from-worker\n", 3))
    expect(crashed("exit", exitcode=3, stderr="hello-from-worker"), err, worker, pid)
    assert "hello-from-worker" in str(err)


def test_stderr_tail_of_segfault(worker: offload.Worker) -> None:
    pid = worker.pid
    err = resolve(worker.submit(crashes.stderr_then_segfault, "about-to-segfault\n"))
    expect(crashed("signal", sig="SIGSEGV", stderr="about-to-segfault"), err, worker, pid)
    assert isinstance(err, offload.WorkerCrashed)
    assert SEGV in err.stderr_tail
    assert err.stderr_tail.index("about-to-segfault") < err.stderr_tail.index(SEGV)


def test_stderr_tail_is_bounded() -> None:
    size = 200 * 1024
    # devnull: keep 200 KiB out of the test output; the tail is kept all the same.
    w = offload.spawn(stderr="devnull")
    try:
        pid = w.pid
        err = resolve(w.submit(crashes.big_stderr_then_exit, size, 3))
        expect(crashed("exit", exitcode=3), err, w, pid)
        assert isinstance(err, offload.WorkerCrashed)
        tail = err.stderr_tail
        assert 0 < len(tail) <= 65536
        assert len(tail.encode()) <= 65536
        expected = crashes.big_stderr_data(size).decode()
        assert tail.endswith("END-OF-BIG-STDERR\n")
        assert expected.endswith(tail)
        assert len(tail) > 60000  # the whole bound is used, not just the last read
        assert len(str(err)) < 2000  # the message quotes an excerpt, not 64 KiB
    finally:
        w.shutdown(timeout=5)


def test_sigterm_from_outside_is_reported_as_sigterm(
    worker: offload.Worker, tmp_path: Path
) -> None:
    """An operator's ``kill PID`` ends the worker; the error must name SIGTERM, not blame
    a SIGKILL / the out-of-memory killer."""
    with crashes.Fifo(tmp_path / "started") as fifo:
        fut = worker.submit(crashes.notify_and_sleep, fifo.path)
        pid = fifo.read_pid()
    os.kill(pid, signal.SIGTERM)
    err = resolve(fut)
    assert isinstance(err, offload.WorkerCrashed), repr(err)
    assert err.pid == pid
    assert worker.call(os.getpid) != pid
    assert err.reason == "signal"
    assert err.signal == "SIGTERM", str(err)
    assert "out-of-memory" not in str(err)


# --------------------------------------------------------------------------------------- #
# A call queued behind the one that fails
# --------------------------------------------------------------------------------------- #


def _fail_first_call(
    w: offload.Worker, how: str, tmp_path: Path
) -> tuple[offload.Future[Any], offload.Future[int]]:
    """Start a call, queue ``os.getpid`` behind it, then make the first call's worker die
    ``how``. The first call blocks until the test says so, so the second one is always
    queued on the same process when it dies."""
    go = tmp_path / "go"
    action = how if how in ("exit", "segfault") else "none"
    fn: Any = crashes.wait_for_file_then
    if how == "timeout":
        fn = offload.task(crashes.wait_for_file_then, timeout=0.5)
    first = w.submit(fn, str(go), action)
    second = w.submit(os.getpid)
    if how in ("exit", "segfault"):
        go.touch()
    elif how == "sigkill":
        assert w.pid is not None
        os.kill(w.pid, signal.SIGKILL)
    elif how == "kill":
        assert first.kill() is True
    return first, second


FIRST_ERROR = {
    "exit": offload.WorkerCrashed,
    "segfault": offload.WorkerCrashed,
    "sigkill": offload.WorkerCrashed,
    "kill": offload.WorkerKilled,
    "timeout": offload.TaskTimeout,
}


@pytest.mark.parametrize("how", list(FIRST_ERROR))
def test_call_queued_behind_a_failed_call_runs_on_the_new_worker(
    worker: offload.Worker, tmp_path: Path, how: str
) -> None:
    pid = worker.pid
    first, second = _fail_first_call(worker, how, tmp_path)
    try:
        assert isinstance(resolve(first), FIRST_ERROR[how])
        # It never started, so the worker's death is not its failure (SPEC section 3).
        new_pid = second.result(timeout=REQUEUE_TIMEOUT)
        assert new_pid != pid
        assert worker.call(os.getpid) == new_pid
    finally:
        if not second.done():
            worker.kill()  # resolve it, so that teardown does not wait for it


@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_error_names_the_killed_pid_when_calls_are_queued(
    worker: offload.Worker, tmp_path: Path, how: str
) -> None:
    pid = worker.pid
    first, second = _fail_first_call(worker, how, tmp_path)
    try:
        err = resolve(first)
        assert isinstance(err, FIRST_ERROR[how]), repr(err)
        assert isinstance(err, (offload.WorkerKilled, offload.TaskTimeout))
        assert err.pid == pid, str(err)
        assert f"pid {pid}" in str(err)
    finally:
        with contextlib.suppress(BaseException):
            second.exception(timeout=REQUEUE_TIMEOUT)
        if not second.done():
            worker.kill()
