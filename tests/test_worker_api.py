"""End-to-end tests of the public worker API (SPEC sections 1-5) with real processes.

Every worker is started through the ``spawn`` fixture (conftest), which shuts it down in
teardown.
Tests that need a parent process of their own (``__main__`` functions, stdout
pass-through, ``start_method="reexec"``) write a small script to ``tmp_path`` and run
it with :mod:`subprocess`, bounded by a timeout. Tasks and the test synchronise through
files with bounded waits (``helpers_api.wait_for`` / :func:`wait_path`), never sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import crashes
import helpers_api as h
import offload
from offload.tasks import lookup

MiB = 1 << 20
WAIT = 15.0  # seconds the test waits for something a worker does


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def wait_until(predicate: Callable[[], bool], limit: float = WAIT) -> bool:
    return crashes.wait_until(predicate, limit)


def wait_path(path: Path, limit: float = WAIT) -> bool:
    return wait_until(path.exists, limit)


def reaped(pid: int) -> bool:
    """The process no longer exists at all (not even as a zombie)."""
    return not psutil.pid_exists(pid)


def gone(pid: int) -> bool:
    """The process is dead (a zombie whose parent is not us counts as dead)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run_script(
    tmp_path: Path, source: str, *args: str, timeout: float = 30.0, name: str = "script.py"
) -> subprocess.CompletedProcess[str]:
    """Write ``source`` to ``tmp_path/name`` and run it with this interpreter."""
    script = tmp_path / name
    script.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        check=False,
    )


class Recorder:
    """A thread-safe callback that records its arguments; ``first`` is set on the first call."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.lock = threading.Lock()
        self.first = threading.Event()

    def __call__(self, value: Any) -> None:
        with self.lock:
            self.calls.append(value)
        self.first.set()


# --------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------- #


def test_name_in_handle_repr_and_process_title(spawn: Callable[..., offload.Worker]) -> None:
    name = "api-test-worker-with-a-long-name"
    w = spawn(name=name)
    assert w.name == name
    assert name in repr(w)
    assert w.pid == w.call(h.getpid)
    comm = Path(f"/proc/{w.pid}/comm").read_text().strip()
    assert comm == name[:15]


def test_default_name(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    assert re.fullmatch(r"offload-worker-\d+", w.name)
    assert w.name in repr(w)


def test_env_extends_parent_environment(
    spawn: Callable[..., offload.Worker], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_TEST_FROM_PARENT", "parent-value")
    w = spawn(env={"API_TEST_EXTRA": "extra-value"})
    assert w.call(h.getenv, "API_TEST_EXTRA") == "extra-value"
    assert w.call(h.getenv, "API_TEST_FROM_PARENT") == "parent-value"
    assert w.call(h.getenv, "PATH") == os.environ["PATH"]
    assert "API_TEST_EXTRA" not in os.environ  # the parent's environment is untouched


def test_cwd(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    w = spawn(cwd=tmp_path)
    assert os.path.realpath(w.call(h.getcwd)) == os.path.realpath(tmp_path)


@pytest.mark.parametrize(("umask", "mode"), [(0o077, 0o600), (0o027, 0o640)])
def test_umask(spawn: Callable[..., offload.Worker], tmp_path: Path, umask: int, mode: int) -> None:
    w = spawn(umask=umask)
    path = tmp_path / "created"
    assert w.call(h.create_file, str(path)) == mode
    assert path.stat().st_mode & 0o777 == mode


def test_preload_imports_before_first_call(spawn: Callable[..., offload.Worker]) -> None:
    plain = spawn()
    assert plain.call(h.is_imported, "colorsys") is False  # control: not imported by default
    w = spawn(preload=["colorsys", "wave"])
    assert w.call(h.is_imported, "colorsys") is True
    assert w.call(h.is_imported, "wave") is True


def test_preload_of_a_missing_module_is_a_start_error() -> None:
    with pytest.raises(offload.StartError) as info:
        offload.spawn(preload=["no_such_module_api_4471"], stderr="devnull")
    assert "no_such_module_api_4471" in info.value.stderr_tail
    assert "no_such_module_api_4471" in str(info.value)


def test_initializer_runs_once_with_initargs(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    log = tmp_path / "init.log"
    w = spawn(initializer=h.init_state, initargs=(str(log), {"k": [1, 2]}))
    assert [w.call(h.get_state) for _ in range(3)] == [{"k": [1, 2]}] * 3
    assert log.read_text().splitlines() == [f"init {w.pid}"]


def test_initializer_that_raises_is_a_start_error() -> None:
    with pytest.raises(offload.StartError) as info:
        offload.spawn(initializer=h.init_fail, initargs=("marker-7781",))
    message = str(info.value)
    assert "initializer exploded: marker-7781" in message
    assert "RuntimeError" in message
    assert "init_fail" in message  # the initializer's traceback


STDIO_SCRIPT = """
    import sys
    import offload

    def emit():
        print("worker-out-line")
        print("worker-err-line", file=sys.stderr)
        return 1

    if __name__ == "__main__":
        mode = sys.argv[1]
        print("PARENT-START", flush=True)
        with offload.spawn(name="io-worker", stdout=mode, stderr=mode) as w:
            assert w.call(emit) == 1
        print("PARENT-END", flush=True)
"""


def test_stdio_inherit_passes_output_through(tmp_path: Path) -> None:
    proc = run_script(tmp_path, STDIO_SCRIPT, "inherit")
    assert proc.returncode == 0, proc.stderr
    assert "worker-out-line\n" in proc.stdout.splitlines(keepends=True)
    assert "worker-err-line\n" in proc.stderr.splitlines(keepends=True)
    assert "[io-worker]" not in proc.stdout + proc.stderr


def test_stdio_prefix_marks_every_line(tmp_path: Path) -> None:
    proc = run_script(tmp_path, STDIO_SCRIPT, "prefix")
    assert proc.returncode == 0, proc.stderr
    assert "[io-worker] worker-out-line" in proc.stdout.splitlines()
    assert "[io-worker] worker-err-line" in proc.stderr.splitlines()
    assert "PARENT-START" in proc.stdout.splitlines()
    assert "PARENT-END" in proc.stdout.splitlines()


def test_stdio_devnull_discards_output(tmp_path: Path) -> None:
    proc = run_script(tmp_path, STDIO_SCRIPT, "devnull")
    assert proc.returncode == 0, proc.stderr
    assert "worker-" not in proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["PARENT-START", "PARENT-END"]


def test_stdio_to_files_appends(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    err = tmp_path / "err.log"
    out.write_text("earlier out\n")
    err.write_text("earlier err\n")
    w = spawn(stdout=out, stderr=str(err))  # a PathLike and a str both work
    w.call(h.print_lines, "first out", "first err")
    w.call(h.print_lines, "second out", "second err")
    w.shutdown()
    assert out.read_text() == "earlier out\nfirst out\nsecond out\n"
    assert err.read_text() == "earlier err\nfirst err\nsecond err\n"


def test_stderr_tail_is_kept_even_with_devnull(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn(stderr="devnull")
    with pytest.raises(offload.WorkerCrashed) as info:
        w.call(h.crash, 3, "last words 5521")
    assert "last words 5521" in info.value.stderr_tail


def test_concurrency_two_runs_calls_at_once(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    w = spawn(concurrency=2)
    a, b = tmp_path / "a", tmp_path / "b"
    fa = w.submit(h.rendezvous, str(a), str(b), WAIT)
    fb = w.submit(h.rendezvous, str(b), str(a), WAIT)
    (saw_a, pid_a, tid_a), (saw_b, pid_b, tid_b) = fa.result(WAIT + 5), fb.result(WAIT + 5)
    assert saw_a and saw_b
    assert pid_a == pid_b == w.pid
    assert tid_a != tid_b


def test_concurrency_one_runs_calls_one_at_a_time(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    w = spawn()  # concurrency=1: the first call cannot see the second one start
    a, b = tmp_path / "a", tmp_path / "b"
    fa = w.submit(h.rendezvous, str(a), str(b), 0.3)
    fb = w.submit(h.rendezvous, str(b), str(a), 0.3)
    assert fa.result(WAIT)[0] is False
    assert fb.result(WAIT)[0] is True


def test_max_tasks_recycles_the_process(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn(max_tasks=2)
    first = w.pid
    pids = [w.call(h.getpid) for _ in range(5)]
    assert pids[0] == pids[1] == first
    assert pids[2] == pids[3] != first
    assert pids[4] not in (first, pids[2])
    assert wait_until(lambda: reaped(first) and reaped(pids[2]))


def test_memory_limit_kills_a_call_above_it(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    failures = Recorder()
    w = spawn(memory_limit=200 * MiB, on_failure=failures)
    pid = w.pid
    release = tmp_path / "release"
    fut = w.submit(h.hold_memory, 400 * MiB, str(tmp_path / "allocated"), str(release))
    try:
        with pytest.raises(offload.WorkerCrashed) as info:
            fut.result(WAIT)
    finally:
        release.touch()
    err = info.value
    assert err.reason == "memory"
    assert err.pid == pid
    assert "memory" in str(err)
    assert w.call(h.getpid) != pid  # the worker handle keeps working
    assert failures.first.wait(WAIT)


def test_memory_limit_recycles_an_idle_worker(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    failures = Recorder()
    w = spawn(memory_limit=200 * MiB, on_failure=failures)
    go, done = tmp_path / "go", tmp_path / "done"
    pid = w.call(h.leak_when_idle, 300 * MiB, str(go), str(done))
    assert pid == w.pid
    go.touch()  # the worker now grows above its limit between calls
    assert wait_until(lambda: reaped(pid)), "an idle worker over memory_limit was not recycled"
    new_pid = w.call(h.getpid)  # no error: the next call simply runs in a fresh process
    assert new_pid != pid
    w.shutdown()
    assert failures.calls == []  # a planned recycle is not a failure


def test_start_timeout(tmp_path: Path) -> None:
    shell_pid, sleep_pid = tmp_path / "shell.pid", tmp_path / "sleep.pid"
    fake = tmp_path / "slow-python"
    fake.write_text(
        f"#!/bin/sh\necho $$ > '{shell_pid}'\nsleep 30 &\necho $! > '{sleep_pid}'\nwait\n"
    )
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(offload.StartError) as info:
        offload.spawn(python=str(fake), start_timeout=1.0)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 6.0
    assert "start_timeout" in str(info.value)
    pids = [int(shell_pid.read_text()), int(sleep_pid.read_text())]
    assert wait_until(lambda: all(gone(p) for p in pids)), "the slow start was not killed"


SPAWN_SCRIPT = """
    import json
    import sys
    import time
    import offload

    options = json.loads(sys.argv[1])
    started = time.monotonic()
    try:
        w = offload.spawn(**options)
    except Exception as exc:
        out = {"type": type(exc).__name__, "message": str(exc)}
    else:
        w.shutdown()
        out = {"type": None}
    out["elapsed"] = time.monotonic() - started
    print(json.dumps(out))
"""


def spawn_in_subprocess(tmp_path: Path, **options: Any) -> dict[str, Any]:
    """``offload.spawn(**options)`` in a child interpreter, so that a spawn() that never
    returns fails this test instead of hanging the run; the outcome as a dict."""
    try:
        proc = run_script(tmp_path, SPAWN_SCRIPT, json.dumps(options), timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"offload.spawn(**{options!r}) did not return within 5 s")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("what", ["python", "cwd", "stdout"])
def test_launch_failure_is_a_start_error(tmp_path: Path, what: str) -> None:
    missing = tmp_path / "no" / "such" / "thing"
    options = {
        "python": {"python": str(missing)},
        "cwd": {"cwd": str(missing)},
        "stdout": {"stdout": str(missing)},  # a log file in a directory that does not exist
    }[what]
    out = spawn_in_subprocess(tmp_path, **options)
    assert out["type"] == "StartError"
    assert str(missing) in out["message"]


def test_max_message_size(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn(max_message_size=4096)
    pid = w.pid
    with pytest.raises(offload.SerializationError) as info:
        w.call(h.argument_length, b"a" * 10240)
    assert info.value.direction == "argument"
    assert info.value.type_name == "bytes"
    assert w.call(h.argument_length, b"a" * 100) == 100
    with pytest.raises(offload.SerializationError) as info:
        w.call(h.make_bytes, 10240)
    assert info.value.direction == "result"
    assert "bytes" in str(info.value)
    assert w.call(h.make_bytes, 10) == b"r" * 10
    assert w.pid == pid  # neither failure cost the worker its process
    assert w.alive


def test_on_failure_called_once_on_crash(spawn: Callable[..., offload.Worker]) -> None:
    failures = Recorder()
    w = spawn(name="api-fragile", on_failure=failures)
    pid = w.pid
    with pytest.raises(offload.WorkerCrashed) as info:
        w.call(h.crash, 9, "goodbye 4412")
    assert info.value.exitcode == 9
    assert info.value.reason == "exit"
    assert failures.first.wait(WAIT)
    assert w.call(h.getpid) != pid
    w.shutdown()
    assert len(failures.calls) == 1
    err = failures.calls[0]
    assert isinstance(err, offload.WorkerCrashed)
    assert err.pid == pid
    assert err.worker == "api-fragile"


def test_on_failure_not_called_for_kill_or_shutdown(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    failures = Recorder()
    w = spawn(on_failure=failures)
    started = tmp_path / "started"
    fut = w.submit(h.block, str(started), str(tmp_path / "never"))
    assert wait_path(started)
    w.kill()
    with pytest.raises(offload.WorkerKilled):
        fut.result(WAIT)
    assert w.call(h.getpid) > 0
    w.shutdown()
    assert failures.calls == []


def test_heartbeat_detects_a_stopped_worker(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    failures = Recorder()
    w = spawn(heartbeat=(0.2, 1.0), on_failure=failures)
    pid = w.pid
    assert pid is not None
    started, go = tmp_path / "started", tmp_path / "go"
    fut = w.submit(h.block, str(started), str(go))
    try:
        assert wait_path(started)
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(offload.WorkerCrashed) as info:
            fut.result(WAIT)
    finally:
        go.touch()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert info.value.reason == "unresponsive"
    assert info.value.pid == pid
    assert failures.first.wait(WAIT)
    assert wait_until(lambda: reaped(pid))
    assert w.call(h.getpid) != pid
    w.shutdown()
    assert len(failures.calls) == 1


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"concurrency": 0}, ValueError),
        ({"start_method": "nope"}, ValueError),
        ({"no_such_option": 1}, TypeError),
        ({"max_tasks": 0}, ValueError),
        ({"memory_limit": 0}, ValueError),
        ({"start_timeout": 0}, ValueError),
        ({"heartbeat": (1.0, 0.5)}, ValueError),
        ({"max_message_size": 10}, ValueError),
        ({"shutdown_on": "never"}, ValueError),
        ({"stdout": 5}, TypeError),
        ({"initializer": 42}, TypeError),
    ],
)
def test_invalid_options_raise_at_spawn(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        offload.spawn(**options)


def test_invalid_env_raises_at_spawn(tmp_path: Path) -> None:
    out = spawn_in_subprocess(tmp_path, env={"API_TEST_VAR": 1})
    assert out["type"] == "TypeError"


# --------------------------------------------------------------------------- #
# Futures
# --------------------------------------------------------------------------- #


def test_future_is_a_concurrent_future(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    fut = w.submit(h.echo, 5)
    assert isinstance(fut, offload.Future)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(WAIT) == 5
    assert fut.done() and not fut.cancelled()
    assert fut.exception() is None


def test_wait_and_as_completed(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    w = spawn(concurrency=2)
    started, go = tmp_path / "started", tmp_path / "go"
    slow = w.submit(h.block, str(started), str(go), "slow")
    try:
        assert wait_path(started)
        quick = w.submit(h.echo, "quick")
        done, not_done = concurrent.futures.wait(
            [slow, quick], timeout=WAIT, return_when=concurrent.futures.FIRST_COMPLETED
        )
        assert done == {quick}
        assert not_done == {slow}
    finally:
        go.touch()
    futures = [w.submit(h.echo, i) for i in range(6)]
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, WAIT)) == list(
        range(6)
    )
    done, not_done = concurrent.futures.wait([slow, *futures], timeout=WAIT)
    assert not not_done
    assert slow.result() == "slow"


def test_add_done_callback(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    seen = Recorder()
    fut = w.submit(h.echo, "value")
    fut.add_done_callback(seen)
    assert seen.first.wait(WAIT)
    assert seen.calls == [fut]
    late = Recorder()
    fut.add_done_callback(late)  # already done: called at once, in this thread
    assert late.calls == [fut]
    failed = w.submit(h.raise_value_error, "boom")
    failed_seen = Recorder()
    failed.add_done_callback(failed_seen)
    assert failed_seen.first.wait(WAIT)
    assert isinstance(failed_seen.calls[0].exception(), ValueError)


def test_waiting_in_a_done_callback_raises_instead_of_hanging(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    """Done callbacks run on offload's I/O thread, which delivers every answer: a
    callback that waited there for another call would wait forever, so it gets a
    RuntimeError at once, and the I/O thread goes on."""
    w = spawn()
    started, go = tmp_path / "started", tmp_path / "go"
    blocked = w.submit(h.block, str(started), str(go), "later")
    assert wait_path(started)
    other = spawn()
    seen: list[BaseException] = []
    threads: list[str] = []
    called = threading.Event()

    def wait_inside(_: Any) -> None:
        threads.append(threading.current_thread().name)
        try:
            blocked.result()
        except BaseException as exc:  # noqa: BLE001 - what the wait raised
            seen.append(exc)
        called.set()

    fut = other.submit(h.echo, "first")
    fut.add_done_callback(wait_inside)
    assert called.wait(WAIT)
    assert threads == ["offload-io"]
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError), seen
    assert "I/O thread" in str(seen[0])
    assert not blocked.done()
    go.touch()
    assert blocked.result(WAIT) == "later"  # the I/O thread still delivers


def test_waiting_in_a_callback_raises_whichever_thread_runs_it(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    """While this thread waits for ``second`` (reading the worker's socket itself for a
    moment), ``first``'s answer is delivered by this thread or by the I/O thread; either
    way its callback's wait for a later answer of the same worker raises. (The reading
    thread's side is checked directly in test_loop.py.)"""
    w = spawn()
    first_started, first_go = tmp_path / "first.started", tmp_path / "first.go"
    started, go = tmp_path / "started", tmp_path / "go"
    seen: list[BaseException] = []
    first = w.submit(h.block, str(first_started), str(first_go), "first")
    second = w.submit(h.echo, "second")
    third = w.submit(h.block, str(started), str(go), "third")

    def wait_inside(_: Any) -> None:
        try:
            third.result(WAIT)  # bounded: a wrong thread would time out, not hang
        except BaseException as exc:  # noqa: BLE001 - what the wait raised
            seen.append(exc)

    first.add_done_callback(wait_inside)  # before it can finish: it waits for first_go
    first_go.touch()
    try:
        assert second.result(WAIT) == "second"
        assert first.result(WAIT) == "first"
        assert len(seen) == 1 and isinstance(seen[0], RuntimeError), seen
    finally:
        go.touch()
    assert third.result(WAIT) == "third"


def test_status_working_then_success(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    w = spawn()
    started, go = tmp_path / "started", tmp_path / "go"
    fut = w.submit(h.block, str(started), str(go), {"answer": 42})
    try:
        assert wait_path(started)
        assert fut.status() == offload.Working()
        assert fut.running() and not fut.done()
    finally:
        go.touch()
    assert fut.result(WAIT) == {"answer": 42}
    match fut.status():
        case offload.Success(value):
            assert value == {"answer": 42}
        case other:
            pytest.fail(f"unexpected status {other!r}")


def test_status_raised(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    fut = w.submit(h.raise_value_error, "bad input")
    with pytest.raises(ValueError) as info:
        fut.result(WAIT)
    assert info.value.args == ("bad input", 42)
    match fut.status():
        case offload.Raised(exc):
            assert type(exc) is ValueError
            assert exc.args == ("bad input", 42)
        case other:
            pytest.fail(f"unexpected status {other!r}")
    cause = info.value.__cause__
    assert isinstance(cause, offload.RemoteTraceback)
    assert "raise_value_error" in str(cause)


def test_status_failed(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn(name="api-crasher")
    pid = w.pid
    fut = w.submit(h.crash, 5, "about to exit 3310")
    with pytest.raises(offload.WorkerCrashed):
        fut.result(WAIT)
    match fut.status():
        case offload.Failed(err):
            assert isinstance(err, offload.WorkerCrashed)
            assert isinstance(err, offload.ExecutionError)
            assert err.reason == "exit"
            assert err.exitcode == 5
            assert err.pid == pid
            assert err.worker == "api-crasher"
            assert "about to exit 3310" in err.stderr_tail
            assert "api-crasher" in str(err)
        case other:
            pytest.fail(f"unexpected status {other!r}")


def test_cancel_only_before_the_call_is_sent(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    """A call can be cancelled only while it waits in the parent: calls already sent to
    the worker (the running one, plus any prefetched) report ``cancel() == False`` and run;
    a cancelled call never runs, and the calls behind it still do."""
    w = spawn()
    started, go = tmp_path / "started", tmp_path / "go"
    running = w.submit(h.block, str(started), str(go))
    markers = [tmp_path / f"marker-{i}" for i in range(4)]
    try:
        assert wait_path(started)
        queued = [w.submit(h.touch, str(m)) for m in markers]
        # Nothing is sent while the only slot is busy, so this is stable: a call that was
        # sent ahead (prefetched) counts as running in concurrent.futures terms.
        sent = [f.running() for f in queued]
        assert running.cancel() is False  # started: cannot be cancelled
        # Cancel from the back: what was sent to the worker is a prefix of the queue.
        cancelled = [f.cancel() for f in reversed(queued)][::-1]
    finally:
        go.touch()
    assert cancelled[-1] is True, "the last of four queued calls must still be in the parent"
    assert cancelled == [not s for s in sent]
    first_cancelled = cancelled.index(True)
    assert all(cancelled[first_cancelled:]), cancelled
    assert running.result(WAIT) == "released"
    after = tmp_path / "after"
    assert w.call(h.touch, str(after)) is None  # runs after everything queued before it
    for fut, was_cancelled, marker in zip(queued, cancelled, markers, strict=True):
        if was_cancelled:
            assert fut.cancelled()
            assert fut.status() == offload.Cancelled()
            with pytest.raises(concurrent.futures.CancelledError):
                fut.result(0)
        else:
            assert fut.result(0) is None
        assert marker.exists() is not was_cancelled
    w.shutdown()
    assert all(m.exists() is not c for m, c in zip(markers, cancelled, strict=True))


def test_kill_a_running_call(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    w = spawn()
    pid = w.pid
    started = tmp_path / "started"
    fut = w.submit(h.block, str(started), str(tmp_path / "never"))
    assert wait_path(started)
    assert fut.kill() is True
    with pytest.raises(offload.WorkerKilled) as info:
        fut.result(WAIT)
    assert info.value.pid == pid
    match fut.status():
        case offload.Failed(offload.WorkerKilled()):
            pass
        case other:
            pytest.fail(f"unexpected status {other!r}")
    assert fut.kill() is False  # already finished
    assert wait_until(lambda: reaped(pid))
    assert w.call(h.getpid) != pid


def test_kill_a_call_that_has_not_started_spares_the_running_one(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    w = spawn()
    started, go, marker = tmp_path / "started", tmp_path / "go", tmp_path / "marker"
    running = w.submit(h.block, str(started), str(go))
    try:
        assert wait_path(started)
        waiting = w.submit(h.touch, str(marker))  # sent ahead to the busy worker, or queued
        assert waiting.kill() is True
    finally:
        go.touch()
    assert waiting.done()
    assert isinstance(waiting.status(), (offload.Cancelled, offload.Failed))
    assert running.result(WAIT) == "released"  # the running call is not collateral damage
    w.shutdown()
    assert not marker.exists()


def test_handle_lifecycle() -> None:
    with offload.spawn() as w:
        pid = w.pid
        assert w.alive
        assert w.call(h.getpid) == pid
    assert not w.alive
    assert reaped(pid)  # shutdown(wait=True) returns after the process is reaped
    with pytest.raises(RuntimeError):
        w.submit(h.getpid)


def test_await_in_asyncio(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn(concurrency=2)

    async def main() -> tuple[int, list[int]]:
        one = await w.submit(h.add, 20, 22)
        many = await asyncio.gather(*(w.submit(h.echo, i) for i in range(4)))
        with pytest.raises(ValueError):
            await w.submit(h.raise_value_error, "async")
        return one, list(many)

    assert asyncio.run(main()) == (42, [0, 1, 2, 3])


def test_progress_reports(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    w = spawn()
    go = tmp_path / "go"
    fut = w.submit(h.report_values, 50, str(go))
    assert fut.progress() is None
    seen = Recorder()
    fut.add_progress_callback(seen)
    go.touch()
    assert fut.result(WAIT) == 50
    assert seen.calls == list(range(50))
    assert fut.progress() == 49


# --------------------------------------------------------------------------- #
# Tasks
# --------------------------------------------------------------------------- #


def test_task_decorator_keeps_local_call(spawn: Callable[..., offload.Worker]) -> None:
    assert isinstance(h.add, offload.Task)
    assert h.add(2, 3) == 5  # an ordinary local call
    assert h.add.name == "helpers_api:add"
    assert h.add.timeout is None
    assert h.add.retries == 0
    w = spawn()
    assert w.call(h.add, 2, 3) == 5


def test_task_with_options() -> None:
    t = h.named_add
    assert isinstance(t, offload.Task)
    assert (t.name, t.timeout, t.retries) == ("api-add", 30, 1)
    assert t(1, 1) == 2
    assert lookup("api-add") is t
    assert "api-add" in repr(t)
    faster = t.options(timeout=2)
    assert (faster.timeout, faster.retries, faster.name) == (2, 1, "api-add")
    assert t.timeout == 30  # the original is unchanged
    assert lookup("api-add") is t  # options() does not register a copy
    adhoc = offload.task(h.echo, timeout=5)
    assert (adhoc.timeout, adhoc(7)) == (5, 7)


def test_task_timeout_and_per_call_override(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    w = spawn()
    pid = w.pid
    missing = str(tmp_path / "never")
    with pytest.raises(offload.TaskTimeout) as info:
        w.call(h.timed_wait, missing, WAIT)  # the task's own timeout: 0.5 s
    assert isinstance(info.value, TimeoutError)
    assert info.value.timeout == 0.5
    assert wait_until(lambda: reaped(pid))
    # The override lets the same task run longer than its default timeout.
    assert w.call(h.timed_wait.options(timeout=10), missing, 1.0) is False
    assert w.pid != pid


def test_submit_by_registered_name(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn(preload=["helpers_api"])
    assert w.call("api-add", 40, 2) == 42
    assert w.submit("api-add", a=1, b=2).result(WAIT) == 3


def test_submit_by_default_name_imports_the_module(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    assert w.call("helpers_api:add", 2, 5) == 7


@pytest.mark.parametrize("name", ["no-such-task-9123", "helpers_api:no_such_function"])
def test_unknown_task_name(spawn: Callable[..., offload.Worker], name: str) -> None:
    w = spawn(preload=["helpers_api"])
    pid = w.pid
    with pytest.raises(offload.NoWorkerAvailable) as info:
        w.call(name, 1)
    assert info.value.task == name
    assert name in str(info.value)
    assert w.call("api-add", 1, 1) == 2
    assert w.pid == pid


def test_retries_after_a_worker_crash(spawn: Callable[..., offload.Worker], tmp_path: Path) -> None:
    w = spawn()
    pid = w.pid
    value, ran_in = w.call(h.crash_once, str(tmp_path / "crashed"))  # retries=1
    assert value == "second attempt"
    assert ran_in != pid
    # Without retries the same crash fails the call.
    with pytest.raises(offload.WorkerCrashed) as info:
        w.call(h.crash_once.options(retries=0), str(tmp_path / "crashed-again"))
    assert info.value.exitcode == 7


def test_retries_not_used_when_the_task_raises(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    w = spawn()
    pid = w.pid
    runs = tmp_path / "runs"
    with pytest.raises(ValueError, match="task failed on purpose"):
        w.call(h.count_and_raise, str(runs))  # retries=2
    assert runs.read_text() == "run\n"
    assert w.pid == pid


# --------------------------------------------------------------------------- #
# Serialization
# --------------------------------------------------------------------------- #


def test_lambda_travels_by_value(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    assert w.call(lambda x: x * 2, 21) == 42
    assert w.call(lambda n: os.getpid() + n, 0) == w.pid


def test_module_functions_travel_by_reference_and_the_rest_by_value(
    spawn: Callable[..., offload.Worker],
) -> None:
    """Module-level functions and builtins are pickled once, as a name; bound methods,
    closures and lambdas still travel whole with each call."""
    from offload.serde import function_reference

    assert function_reference(os.path.join).endswith(b"join\x94\x93\x94.")
    assert function_reference(abs) is function_reference(abs)  # remembered
    items = [1, 2]
    for by_value in (items.append, items.copy, lambda: 0, h.__dict__.get, str.upper):
        assert function_reference(by_value) == b"", by_value
    w = spawn()
    for _ in range(3):
        assert w.call(os.path.join, "a", "b") == os.path.join("a", "b")
        assert w.call(abs, -3) == 3
    assert w.call(items.copy) == [1, 2]  # the list goes along with its method
    assert w.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]


def test_tiny_results_do_not_wait_for_a_long_call_sent_with_them(
    spawn: Callable[..., offload.Worker], tmp_path: Path
) -> None:
    """Calls sent together (a deep pipeline of tiny calls) come back one by one: a
    result is never held back to share a write with a later call's, which may run long."""
    w = spawn()
    for f in [w.submit(abs, -1) for _ in range(200)]:  # tiny calls: a deep pipeline
        assert f.result(timeout=30) == 1
    first = w.submit(h.block, str(tmp_path / "a-started"), str(tmp_path / "a-go"))
    assert h.wait_for(tmp_path / "a-started")
    tiny = [w.submit(abs, -i) for i in range(1, 40)]  # they queue up behind `first`
    long = w.submit(h.block, str(tmp_path / "b-started"), str(tmp_path / "b-go"))
    h.touch(tmp_path / "a-go")
    assert h.wait_for(tmp_path / "b-started")  # the long call runs: the tiny ones ran
    assert [f.result(timeout=10) for f in tiny] == list(range(1, 40))
    assert not long.done()
    h.touch(tmp_path / "b-go")
    assert long.result(timeout=10) == "released"
    assert first.result(timeout=10) == "released"


def test_closure_travels_by_value(spawn: Callable[..., offload.Worker]) -> None:
    def make_adder(k: int) -> Callable[[int], int]:
        def adder(x: int) -> int:
            return x + k

        return adder

    w = spawn()
    assert w.call(make_adder(100), 5) == 105


def test_main_functions_and_classes_travel_by_value(tmp_path: Path) -> None:
    source = """
        import json
        import os
        import offload

        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm2(self):
                return self.x * self.x + self.y * self.y

        def make_point(x, y):
            return Point(x, y), os.getpid()

        if __name__ == "__main__":
            with offload.spawn() as w:
                point, pid = w.call(make_point, 3, 4)
                norm = w.call(Point.norm2, Point(6, 8))
                print(json.dumps({
                    "norm": point.norm2(),
                    "is_point": isinstance(point, Point),
                    "remote_norm": norm,
                    "other_pid": pid != os.getpid() and pid == w.pid,
                }))
    """
    proc = run_script(tmp_path, source)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "norm": 25,
        "is_point": True,
        "remote_norm": 100,
        "other_pid": True,
    }


def test_large_bytes_round_trip(spawn: Callable[..., offload.Worker]) -> None:
    data = os.urandom(64 * MiB)
    w = spawn()
    back = w.call(h.echo, data)
    assert type(back) is bytes
    assert back == data
    import hashlib

    assert w.call(h.sha256, data) == hashlib.sha256(data).hexdigest()


def test_unpicklable_argument_and_result(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    pid = w.pid
    with pytest.raises(offload.SerializationError) as info:
        w.call(h.echo, threading.Lock())
    assert info.value.direction == "argument"
    assert "lock" in str(info.value)
    with pytest.raises(offload.SerializationError) as info:
        w.call(h.make_lock)
    assert info.value.direction == "result"
    assert "lock" in str(info.value)
    assert w.call(h.echo, "still fine") == "still fine"
    assert w.pid == pid


def test_custom_exception_round_trips(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    with pytest.raises(h.CustomError) as info:
        w.call(h.raise_custom, "custom failure", 17, {"where": ["here", 1]})
    exc = info.value
    assert type(exc) is h.CustomError
    assert exc.args == ("custom failure",)
    assert exc.code == 17
    assert exc.detail == {"where": ["here", 1]}
    assert isinstance(exc.__cause__, offload.RemoteTraceback)
    assert "raise_custom" in str(exc.__cause__)


def test_unpicklable_exception_becomes_remote_error(spawn: Callable[..., offload.Worker]) -> None:
    w = spawn()
    with pytest.raises(offload.RemoteError) as info:
        w.call(h.raise_locked, "cannot travel")
    assert info.value.type_name == "helpers_api.LockedError"
    assert "cannot travel" in str(info.value)
    assert "raise_locked" in info.value.traceback


# --------------------------------------------------------------------------- #
# delegate
# --------------------------------------------------------------------------- #


def test_delegate_runs_each_call_in_a_fresh_process() -> None:
    first = offload.delegate(h.getpid)
    second = offload.delegate(h.add, 2, 3)
    third = offload.delegate(os.getpid)
    assert isinstance(first, offload.Future)
    pid1 = first.result(WAIT)
    pid3 = third.result(WAIT)
    assert second.result(WAIT) == 5
    assert len({pid1, pid3, os.getpid()}) == 3
    assert wait_until(lambda: reaped(pid1) and reaped(pid3)), "delegated process still there"


def test_delegate_failure_resolves_the_future() -> None:
    fut = offload.delegate(h.raise_value_error, "delegated")
    with pytest.raises(ValueError, match="delegated"):
        fut.result(WAIT)
    crashed = offload.delegate(h.crash, 4, "bye")
    with pytest.raises(offload.WorkerCrashed) as info:
        crashed.result(WAIT)
    assert info.value.exitcode == 4
    assert wait_until(lambda: info.value.pid is not None and reaped(info.value.pid))


# --------------------------------------------------------------------------- #
# offload.init() and start_method="reexec"
# --------------------------------------------------------------------------- #


def test_reexec_worker_after_init(tmp_path: Path) -> None:
    source = """
        import json
        import os
        import sys
        import offload

        def triple(x):
            return x * 3, os.getpid(), os.path.basename(sys.argv[0])

        def main():
            offload.init(start_method="reexec")  # also the default for delegate()
            with offload.spawn(start_method="reexec") as w:
                value, pid, argv0 = w.call(triple, 14)
                handle_pid = w.pid
            delegated = offload.delegate(triple, 5).result(timeout=20)
            print(json.dumps({
                "value": value,
                "worker_pid": pid,
                "handle_pid": handle_pid,
                "argv0": argv0,
                "parent_pid": os.getpid(),
                "delegated": delegated,
            }))

        if __name__ == "__main__":
            main()
    """
    proc = run_script(tmp_path, source, name="reexec_main.py")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["value"] == 42
    assert out["worker_pid"] == out["handle_pid"] != out["parent_pid"]
    assert out["argv0"] == "reexec_main.py"  # the worker is a re-run of the script
    value, pid, argv0 = out["delegated"]
    assert (value, argv0) == (15, "reexec_main.py")
    assert pid not in (out["parent_pid"], out["worker_pid"])


NO_INIT_SCRIPT = """
    import json
    import os
    import sys
    import time
    import offload

    def main():
        child = os.environ.get("API_TEST_REEXEC_CHILD")
        if child == "exit":  # the re-executed copy: no offload.init(), just exits
            print("child ran without offload.init", file=sys.stderr)
            return
        if child == "hang":  # the re-executed copy: no offload.init(), never answers
            time.sleep(30)
            return
        mode = sys.argv[1]
        started = time.monotonic()
        try:
            offload.spawn(
                start_method="reexec", env={"API_TEST_REEXEC_CHILD": mode}, start_timeout=1
            )
        except offload.StartError as exc:
            print(json.dumps({"error": str(exc), "elapsed": time.monotonic() - started}))
        else:
            print(json.dumps({"error": None}))

    if __name__ == "__main__":
        main()
"""


@pytest.mark.parametrize("child", ["exit", "hang"])
def test_reexec_without_init_is_a_start_error(tmp_path: Path, child: str) -> None:
    proc = run_script(tmp_path, NO_INIT_SCRIPT, child, timeout=20)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["error"] is not None
    assert "offload.init()" in out["error"]
    assert out["elapsed"] < 10
