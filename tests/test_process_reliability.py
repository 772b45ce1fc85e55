"""The process layer under hostile conditions: escaping subprocesses, ignored SIGCHLD.

* A task's subprocess that left the worker's process group and ignores SIGTERM, and a
  double-forked daemon that ignores SIGTERM, die when the call is killed or times out,
  with every start method (the worker dies of the SIGTERM at once, so the SIGKILL after
  the grace must reach descendants found while it lived; the daemon is found because
  the worker is a child subreaper).
* The worker reaps the zombies of the orphans it adopts, and never one that a task's
  ``Popen`` will wait for.
* A program that ignores SIGCHLD (the kernel then reaps its children itself and their
  exit statuses are lost) still gets every future resolved, truthful crash reports (no
  "exited with status 0" for a segfault) and a shutdown that returns.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import crashes
import offload
import reliability_tasks as rt

LINUX = sys.platform.startswith("linux")
RESOLVE_TIMEOUT = 10.0
GONE_TIMEOUT = 5.0  # the bound: escapees must be gone within this
METHODS = ["spawn", "fork", "forkserver"]
TESTS_DIR = str(Path(__file__).resolve().parent)


@pytest.fixture(params=METHODS)
def worker(request: pytest.FixtureRequest) -> Iterator[offload.Worker]:
    w = offload.spawn(start_method=request.param)
    try:
        yield w
    finally:
        w.shutdown(timeout=5)


# --------------------------------------------------------------------------------------- #
# Defect 3: subprocesses that left the group, and daemons, die with a killed call
# --------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_escaped_subprocesses_die_with_the_call(
    worker: offload.Worker, tmp_path: Path, how: str
) -> None:
    fn: Any = rt.start_escapees_and_sleep
    if how == "timeout":
        fn = offload.task(rt.start_escapees_and_sleep, timeout=1.0)
    pid = worker.call(rt.getpid)
    with crashes.Fifo(tmp_path / "pids") as fifo:
        fut = worker.submit(fn, fifo.path)
        escapees = [int(x) for x in fifo.read_line(timeout=30).split()]
    try:
        if how == "kill":
            assert fut.kill() is True
            err = fut.exception(timeout=RESOLVE_TIMEOUT)
            assert isinstance(err, offload.WorkerKilled), repr(err)
        else:
            err = fut.exception(timeout=RESOLVE_TIMEOUT)
            assert isinstance(err, offload.TaskTimeout), repr(err)
        expected = escapees if LINUX else escapees[:1]  # a daemon needs the subreaper
        assert crashes.wait_gone([pid, *expected], GONE_TIMEOUT) == []
    finally:
        for escapee in escapees:
            crashes.kill_quietly(escapee)
    assert worker.call(rt.getpid) != pid  # replaced; the handle still works


@pytest.mark.skipif(not LINUX, reason="child subreapers are a Linux feature")
def test_worker_reaps_adopted_orphans_but_not_its_popens(worker: offload.Worker) -> None:
    popen_pid = worker.call(rt.start_unwaited_popen, 5)  # a zombie the task will wait for
    daemon = worker.call(rt.start_daemon_then_return)  # an orphan: the worker adopts it
    assert crashes.wait_gone([daemon], GONE_TIMEOUT) == []  # exited: the worker's zombie
    # Calls end with a look for adopted orphans' zombies (at most every 0.1 s).
    deadline = time.monotonic() + GONE_TIMEOUT
    zombies = worker.call(rt.zombie_children)
    while set(zombies) - {popen_pid} and time.monotonic() < deadline:
        time.sleep(0.02)
        zombies = worker.call(rt.zombie_children)
    assert set(zombies) == {popen_pid}, zombies  # the task's own zombie was left alone
    assert worker.call(rt.wait_kept_popen) == 5  # and its Popen gets the real status
    assert worker.call(rt.zombie_children) == []


# --------------------------------------------------------------------------------------- #
# Defect 5: a program that ignores SIGCHLD
# --------------------------------------------------------------------------------------- #

# Runs in a fresh interpreter (SIGCHLD stays ignored there), with a hard deadline. It
# prints one JSON line per observation; the test checks them.
_SIGCHLD_IGNORED = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    import offload
    offload.init()  # start_method="reexec" re-runs this program as the worker
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    import reliability_tasks as rt

    def crash_info(fut):
        err = fut.exception(timeout=20)
        return {{
            "type": type(err).__name__,
            "message": str(err),
            "exitcode": None if getattr(err, "exitcode", None) is None else int(err.exitcode),
            "signal": getattr(err, "signal", None),
        }}

    def out(key, value):
        print(json.dumps({{key: value}}), flush=True)

    pool = offload.Pool(workers=1, start_method=sys.argv[1])
    first = pool.submit(rt.getpid).result(timeout=20)
    out("first", first)
    out("exit", crash_info(pool.submit(rt.os_exit, 7)))
    out("after_exit", pool.submit(rt.getpid).result(timeout=20) != first)
    out("segfault", crash_info(pool.submit(rt.segfault)))
    fut = pool.submit(rt.os_exit, 3)
    queued = [pool.submit(rt.getpid) for _ in range(2)]  # behind the crash
    out("queued", [f.result(timeout=20) > 0 for f in queued] + [crash_info(fut)["type"]])
    slow = pool.submit(offload.task(rt.sleep_then, timeout=0.5), 30)
    out("timeout", crash_info(slow)["type"])
    started = os.path.join(sys.argv[2], "started")
    slow = pool.submit(rt.touch_then_sleep, started, 30)
    assert rt.wait_for_file(started)
    slow.kill()
    out("kill", crash_info(slow)["type"])
    out("final", pool.submit(rt.getpid).result(timeout=20) > 0)
    pool.shutdown(wait=True)
    out("shutdown", True)
    """
)


@pytest.mark.parametrize("method", [*METHODS, "reexec"])
def test_sigchld_ignored_by_the_program(method: str, tmp_path: Path) -> None:
    script = tmp_path / "sigchld_ignored.py"
    script.write_text(_SIGCHLD_IGNORED.format(tests=TESTS_DIR))
    try:
        proc = subprocess.run(
            [sys.executable, str(script), method, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # the hang of the issue
        pytest.fail(f"hung; output so far: {exc.stdout!r}")
    seen: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        seen.update(json.loads(line))
    assert proc.returncode == 0, (proc.returncode, seen, proc.stderr[-3000:])
    assert seen.get("shutdown") is True, seen

    exit_info = seen["exit"]
    assert exit_info["type"] == "WorkerCrashed", exit_info
    assert "status 0" not in exit_info["message"], exit_info
    assert exit_info["exitcode"] != 0, exit_info
    if method == "forkserver":  # the template is the parent: it sees the real status
        assert exit_info["exitcode"] == 7, exit_info
        assert "exited with status 7" in exit_info["message"], exit_info
    else:
        assert exit_info["exitcode"] in (7, 255, None), exit_info
        assert "ignores SIGCHLD" in exit_info["message"], exit_info

    segv = seen["segfault"]
    assert segv["type"] == "WorkerCrashed", segv
    assert segv["signal"] == "SIGSEGV", segv
    assert "status 0" not in segv["message"], segv

    assert seen["after_exit"] is True
    assert seen["queued"] == [True, True, "WorkerCrashed"]
    assert seen["timeout"] == "TaskTimeout"
    assert seen["kill"] == "WorkerKilled"
    assert seen["final"] is True
