"""The promise under shutdown, exit and fork: every future resolves, nothing submitted
vanishes, and a forked child never talks to its parent's workers.

Where a hang is the failure, the scenario runs in a fresh interpreter under a hard
deadline (``subprocess.run(..., timeout=...)``) and reports what it saw as JSON on its
last line: a hang then fails one test instead of the whole run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import offload
from offload.client import call as call_module
from offload.client import engine as engine_module

TESTS_DIR = str(Path(__file__).resolve().parent)
DEADLINE = 60.0  # a scenario that has not finished by then hung


def run_scenario(code: str, *args: str, timeout: float = DEADLINE) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (tests/ importable); return the JSON object
    it printed last. Fails the test if it hangs or exits non-zero."""
    script = f"import sys\nsys.path.insert(0, {TESTS_DIR!r})\n" + textwrap.dedent(code)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the scenario hung for {timeout:g} s; stderr: {exc.stderr!r}")
    out = proc.stdout.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}; stderr: {proc.stderr.decode()}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"no output; stderr: {proc.stderr.decode()}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------------------- #
# shutdown(wait=True, timeout=...) with calls queued
# --------------------------------------------------------------------------------------- #

SHUTDOWN_WITH_QUEUE = """
import json, time, offload
kind = sys.argv[1]
if kind == "pool":
    owner = offload.Pool(2)
    futs = [owner.submit(time.sleep, 1) for _ in range(12)]
else:
    owner = offload.spawn()
    futs = [owner.submit(time.sleep, 1) for _ in range(6)]
# Wait until the first calls run (their workers started them), not for a fixed time.
deadline = time.monotonic() + 30
while sum(f.running() for f in futs) < (2 if kind == "pool" else 1):
    assert time.monotonic() < deadline, "the first calls never started"
    time.sleep(0.005)
time.sleep(0.1)
start = time.monotonic()
owner.shutdown(wait=True, timeout=0.5)
took = time.monotonic() - start
outcomes = []
for f in futs:
    if f.cancelled():
        outcomes.append("cancelled")
    elif not f.done():
        outcomes.append("pending")
    else:
        exc = f.exception()
        outcomes.append(type(exc).__name__ if exc else "ok")
print(json.dumps({"took": took, "outcomes": outcomes}))
"""


@pytest.mark.parametrize("kind", ["pool", "worker"])
def test_shutdown_timeout_with_queued_calls_returns_in_time(kind: str) -> None:
    seen = run_scenario(SHUTDOWN_WITH_QUEUE, kind)
    outcomes = seen["outcomes"]
    # Within the timeout plus the kill grace (and a margin for a loaded machine).
    assert seen["took"] < 0.5 + 0.5 + 3.0, seen
    assert "pending" not in outcomes, outcomes
    running = 2 if kind == "pool" else 1
    assert outcomes.count("WorkerKilled") == running, outcomes
    assert outcomes.count("cancelled") == len(outcomes) - running, outcomes


def test_abort_leaves_a_closed_idle_pool(tmp_path: Path) -> None:
    import reliability_tasks as t

    pool = offload.Pool(2)
    started = [tmp_path / f"started-{i}" for i in range(2)]
    futs = [pool.submit(t.touch_then_sleep, str(path), 30.0) for path in started]
    queued = [pool.submit(int, "1") for _ in range(5)]
    assert all(t.wait_for_file(str(path), 30.0) for path in started)
    pool.shutdown(wait=True, timeout=0.2)
    assert all(isinstance(f.exception(timeout=5), offload.WorkerKilled) for f in futs)
    assert all(f.cancelled() for f in queued)
    stats = pool.stats()
    assert (stats.queued, stats.running, stats.busy) == (0, 0, 0), stats
    assert pool.worker_pids() == []
    with pytest.raises(RuntimeError):
        pool.submit(int, "1")


# --------------------------------------------------------------------------------------- #
# A script that ends without shutdown()
# --------------------------------------------------------------------------------------- #

EXIT_WITHOUT_SHUTDOWN = """
import os, offload
import reliability_tasks as t
out, kind = sys.argv[1], sys.argv[2]

def done(fut):
    open(os.path.join(out, f"callback-{fut.result()}"), "w").close()

if kind == "pool":
    pool = offload.Pool(2)
    submit = pool.submit
elif kind == "dropped-pool":
    submit = offload.Pool(2).submit  # the pool object itself is gone at once
elif kind == "spawn":
    worker = offload.spawn()
    submit = worker.submit
elif kind == "pool-shutdown-nowait":
    pool = offload.Pool(2)
    submit = pool.submit
else:
    submit = offload.delegate
for i in range(6):
    submit(t.write_marker, out, i).add_done_callback(done)
if kind == "pool-shutdown-nowait":
    pool.shutdown(wait=False)
print("{}")
"""


@pytest.mark.parametrize(
    "kind", ["pool", "dropped-pool", "spawn", "delegate", "pool-shutdown-nowait"]
)
def test_calls_submitted_before_exit_run_to_completion(kind: str, tmp_path: Path) -> None:
    run_scenario(EXIT_WITHOUT_SHUTDOWN, str(tmp_path), kind)
    names = set(os.listdir(tmp_path))
    assert names >= {f"marker-{i}" for i in range(6)}, sorted(names)
    assert names >= {f"callback-{i}" for i in range(6)}, sorted(names)


# --------------------------------------------------------------------------------------- #
# A pool inherited through os.fork()
# --------------------------------------------------------------------------------------- #

FORK_INHERITS_POOL = """
import json, os, time, offload
import reliability_tasks as t
pool = offload.Pool(2, start_method=sys.argv[1])
assert pool.submit(t.ident, 0).result(timeout=30) == 0
pending = pool.submit(t.ident_after, -1, 0.3)  # still running at the fork
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    seen = {}
    for name, action in [
        ("submit", lambda: pool.submit(t.ident, 1000001)),
        ("map", lambda: list(pool.map(t.ident, [1, 2]))),
        ("worker_pids", pool.worker_pids),
        ("stats", pool.stats),
        ("result", lambda: pending.result(timeout=5)),
    ]:
        try:
            action()
            seen[name] = "no error"
        except RuntimeError as exc:
            seen[name] = str(exc)
    seen["repr"] = repr(pool)
    start = time.monotonic()
    pool.shutdown(wait=True, timeout=2)
    seen["shutdown_took"] = time.monotonic() - start
    with offload.Pool(1) as fresh:  # a pool of the child's own works
        seen["fresh"] = fresh.submit(t.ident, 7).result(timeout=30)
    os.write(w, json.dumps(seen).encode())
    os.close(w)
    sys.exit(0)  # a normal exit: finalizers and exit hooks run in the child
os.close(w)
results = [pool.submit(t.ident, i).result(timeout=30) for i in range(200)]
child = b""
while chunk := os.read(r, 65536):
    child += chunk
_, status = os.waitpid(pid, 0)
seen = {
    "child": json.loads(child),
    "child_status": status,
    "parent_ok": results == list(range(200)),
    "pending": pending.result(timeout=30),
}
pool.shutdown(wait=True)
stats = pool.stats()
seen["stats"] = [stats.busy, stats.running, stats.queued, stats.done]
print(json.dumps(seen))
"""


@pytest.mark.parametrize("start_method", ["spawn", "fork", "forkserver"])
def test_pool_inherited_through_fork(start_method: str) -> None:
    seen = run_scenario(FORK_INHERITS_POOL, start_method)
    child = seen["child"]
    parent_pid_note = "the parent of this forked process"
    for name in ("submit", "map", "worker_pids", "stats", "result"):
        assert parent_pid_note in child[name], (name, child[name])
        assert "make a new offload.Pool" in child[name], (name, child[name])
    assert "inherited from process" in child["repr"]
    assert child["shutdown_took"] < 1.0  # the parent's workers are not the child's to stop
    assert child["fresh"] == 7
    assert seen["child_status"] == 0
    assert seen["parent_ok"] is True
    assert seen["pending"] == -1
    busy, running, queued, done = seen["stats"]
    assert (busy, running, queued) == (0, 0, 0)
    assert done == 202  # the parent's own calls, none of the child's


# --------------------------------------------------------------------------------------- #
# Memory of queued calls
# --------------------------------------------------------------------------------------- #


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """A bounded poll for a state another thread reaches by blocking (nothing signals
    that a thread has started to wait)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the state was not reached in time"
        time.sleep(0.002)


def test_queued_calls_hold_bounded_pickled_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reliability_tasks as t

    limit = 4 << 20
    monkeypatch.setattr(call_module, "MAX_QUEUED_BYTES", limit)
    big = os.urandom(1 << 20)
    gate = tmp_path / "gate"
    with offload.Pool(1) as pool:
        blocker = pool.submit(t.wait_for_file, str(gate), 30.0)
        engine = pool._engine
        futs: list[offload.Future[int]] = []
        highest = 0

        def flood() -> None:
            nonlocal highest
            for _ in range(20):
                futs.append(pool.submit(len, big))
                highest = max(highest, engine.budget.used)

        thread = threading.Thread(target=flood)
        thread.start()
        # The flood stops at the limit and waits for room, holding no more than that.
        wait_until(lambda: engine.budget.waiters == 1)
        assert engine.budget.used <= limit
        assert thread.is_alive()
        assert len(futs) < 20
        gate.write_text("go")
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert blocker.result(timeout=30) is True
        assert [f.result(timeout=30) for f in futs] == [1 << 20] * 20
        assert highest <= limit
        assert engine.budget.used == 0


def test_submit_waiting_for_room_raises_when_the_pool_shuts_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reliability_tasks as t

    monkeypatch.setattr(call_module, "MAX_QUEUED_BYTES", 2 << 20)
    big = os.urandom(1 << 20)
    pool = offload.Pool(1)
    started = tmp_path / "started"
    blocker = pool.submit(t.touch_then_sleep, str(started), 30.0)
    assert t.wait_for_file(str(started), 30.0)
    engine = pool._engine
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            for _ in range(10):
                pool.submit(len, big)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=flood)
    thread.start()
    wait_until(lambda: engine.budget.waiters == 1)
    pool.shutdown(wait=True, cancel_futures=True, kill=True)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(errors) == 1 and "shutdown" in str(errors[0])
    assert isinstance(blocker.exception(timeout=10), offload.WorkerKilled)


# --------------------------------------------------------------------------------------- #
# An exception on offload's I/O thread fails the futures it concerns
# --------------------------------------------------------------------------------------- #


def test_failure_handling_a_workers_messages_fails_its_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import reliability_tasks as t

    real = engine_module.Engine.on_results
    failures = iter([True])

    def broken(self: Any, proc: Any, msgs: Any) -> None:
        if next(failures, False):
            raise AttributeError("an offload defect")
        real(self, proc, msgs)

    monkeypatch.setattr(engine_module.Engine, "on_results", broken)
    with offload.Pool(1) as pool:
        fut = pool.submit(t.ident, 1)
        err = fut.exception(timeout=30)
        assert isinstance(err, offload.WorkerCrashed), repr(err)
        assert "offload failed handling its messages" in str(err)
        assert "an offload defect" in str(err)
        assert pool.submit(t.ident, 2).result(timeout=30) == 2  # a fresh worker


def test_failure_setting_up_a_worker_is_a_start_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from offload import protocol

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'int' object has no attribute 'encode'")

    monkeypatch.setattr(protocol, "Connection", broken)
    with pytest.raises(offload.StartError, match="could not be set up"):
        offload.spawn(start_timeout=30)


def test_bad_option_fails_when_the_pool_is_made() -> None:
    with pytest.raises(TypeError, match="name"):
        offload.Pool(1, name=123)  # type: ignore[arg-type]


KILL_WITH_A_STOPPED_IDLE_WORKER = """
import json, os, signal, time, offload
pool = offload.Pool(2, start_method=sys.argv[1])
assert pool.submit(int, "1").result(timeout=30) == 1
deadline = time.monotonic() + 30
while len(pool.worker_pids()) < 2:
    assert time.monotonic() < deadline
    time.sleep(0.005)
stopped = pool.worker_pids()[0]
os.kill(stopped, signal.SIGSTOP)  # idle, and it cannot exit by itself
start = time.monotonic()
pool.shutdown(wait=True, kill=True)
took = time.monotonic() - start
print(json.dumps({"took": took, "pids": pool.worker_pids()}))
"""


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_shutdown_kill_ends_a_stopped_idle_worker(start_method: str) -> None:
    seen = run_scenario(KILL_WITH_A_STOPPED_IDLE_WORKER, start_method)
    assert seen["took"] < 0.5 + 3.0, seen
    assert seen["pids"] == []
