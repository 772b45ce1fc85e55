"""``offload.Lock`` (SPEC section 6): a named lock shared by the processes of one user.

Real processes hold the lock (``lock_tasks.Holder``: a program that says "locked" on
its stdout and waits for a line on its stdin), so every test knows from a pipe, not
from a sleep, who holds it. Each test gets a private lock directory of its own
(``XDG_RUNTIME_DIR`` pointed at its ``tmp_path``), inherited by the programs it starts.
"""

from __future__ import annotations

import os
import pickle
import signal
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lock_tasks as lt
import offload
from offload.lock import lock_directory, lock_file_name

LIMIT = 20.0  # seconds any wait of a test may take before it fails


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private runtime directory for this test (and the processes it starts)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    yield runtime


@pytest.fixture
def name() -> str:
    return f"test-lock/{uuid.uuid4()}"


def acquire_in_thread(
    lock: offload.Lock, **kwargs: float | None
) -> tuple[threading.Thread, list[bool]]:
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(lock.acquire(**kwargs)))  # type: ignore[arg-type]
    thread.start()
    return thread, got


# --------------------------------------------------------------------------------------- #
# Exclusion between processes
# --------------------------------------------------------------------------------------- #


def test_a_lock_held_by_another_process_excludes_this_one(name: str) -> None:
    lock = offload.Lock(name)
    with lt.Holder(name) as holder:
        assert holder.first == "locked"
        assert lock.locked()
        assert not lock.locked_here()
        assert lock.acquire(blocking=False) is False
        assert lock.acquire(timeout=0) is False
        holder.release()
        assert lock.acquire(blocking=False) is True
        try:
            assert lock.locked() and lock.locked_here()
        finally:
            lock.release()
    assert not lock.locked()


@pytest.mark.parametrize("timeout", [LIMIT, None], ids=["polling", "blocking"])
def test_a_waiter_gets_the_lock_when_the_holder_releases_it(
    name: str, timeout: float | None
) -> None:
    lock = offload.Lock(name)
    with lt.Holder(name) as holder:
        thread, got = acquire_in_thread(lock, timeout=timeout)
        holder.release()  # the waiter may have started waiting or not: both must work
        thread.join(LIMIT)
        assert got == [True]
        lock.release()


def test_timeout_raises_lock_timeout_naming_the_lock_and_its_holder(name: str) -> None:
    lock = offload.Lock(name, timeout=0.05)
    with lt.Holder(name) as holder:
        with pytest.raises(offload.LockTimeout) as info, lock:
            pytest.fail("acquired a lock another process holds")
        holder.release()
    err = info.value
    assert isinstance(err, TimeoutError) and isinstance(err, offload.OffloadError)
    assert err.name == name and err.timeout == 0.05
    assert err.holder_pid == holder.pid
    assert err.path == lock.path
    assert repr(name) in str(err) and f"pid {holder.pid}" in str(err)
    assert pickle.loads(pickle.dumps(err)).holder_pid == holder.pid
    assert not lock.locked_here()


def test_the_lock_of_a_sigkilled_holder_is_released(name: str) -> None:
    lock = offload.Lock(name)
    with lt.Holder(name) as holder:
        assert holder.first == "locked"
        # One waiter blocks in flock before the kill; this thread then polls.
        waiter = offload.Lock(name)
        thread, got = acquire_in_thread(waiter, timeout=None)
        assert lock.acquire(blocking=False) is False
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.proc.wait(LIMIT) == -signal.SIGKILL
        thread.join(LIMIT)
        assert got == [True]
        waiter.release()
        assert lock.acquire(timeout=LIMIT) is True
        lock.release()


@pytest.mark.skipif(sys.platform != "linux", reason="the forked child reads /proc")
def test_a_forked_child_does_not_hold_its_parents_lock(name: str) -> None:
    with lt.Holder(name, lt.HOLD_AND_FORK) as holder:
        word, child_pid, report = holder.first.split(maxsplit=2)
        assert word == "locked"
        # The child: not held there, release refused, the parent still excludes it,
        # and no descriptor of the lock file left in it.
        assert report == "False not-held False False"
        # The parent dies; its child lives on, and does not keep the lock held.
        os.kill(holder.pid, signal.SIGKILL)
        holder.proc.wait(LIMIT)
        lock = offload.Lock(name)
        assert lock.acquire(timeout=LIMIT) is True
        lock.release()
        assert holder.proc.stdin is not None
        holder.proc.stdin.close()  # the orphaned child reads EOF and exits
        wait_gone(int(child_pid))


def wait_until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def wait_gone(pid: int) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(LIMIT)
    except psutil.NoSuchProcess:
        pass


# --------------------------------------------------------------------------------------- #
# Threads of one process
# --------------------------------------------------------------------------------------- #


def test_two_lock_objects_of_one_name_in_two_threads_exclude_each_other(name: str) -> None:
    first, second = offload.Lock(name), offload.Lock(name)
    assert first.acquire(blocking=False)
    try:
        outcome: list[bool] = []
        thread = threading.Thread(target=lambda: outcome.append(second.acquire(blocking=False)))
        thread.start()
        thread.join(LIMIT)
        assert outcome == [False]
        waiter, got = acquire_in_thread(second, timeout=LIMIT)
    finally:
        first.release()
    waiter.join(LIMIT)
    assert got == [True] and second.locked_here() and not first.locked_here()
    second.release()


def test_threads_sharing_one_lock_object_exclude_each_other(name: str) -> None:
    lock = offload.Lock(name)
    lock.acquire()
    thread, got = acquire_in_thread(lock, timeout=LIMIT)
    lock.release()  # any thread may release; the waiting thread then holds it
    thread.join(LIMIT)
    assert got == [True] and lock.locked_here()
    released = threading.Thread(target=lock.release)
    released.start()
    released.join(LIMIT)
    assert not lock.locked_here() and not lock.locked()


def test_it_is_not_reentrant(name: str) -> None:
    lock = offload.Lock(name)
    with lock:
        with pytest.raises(RuntimeError, match="not reentrant"):
            lock.acquire()
        with pytest.raises(RuntimeError, match="not reentrant"):
            lock.acquire(timeout=1)
        assert lock.acquire(blocking=False) is False
        assert lock.locked_here()
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


# --------------------------------------------------------------------------------------- #
# Names, files, directories
# --------------------------------------------------------------------------------------- #

NAMES = {
    "slashes": "a/b/../../etc/passwd",
    "dots": "..",
    "root": "/",
    "long": "x" * 10_000,
    "unicode": "ロック/größe/🔒",
    "nul": "a\x00b",
    "spaces": " leading and trailing ",
}


@pytest.mark.parametrize("key", NAMES)
def test_any_name_maps_to_a_safe_file_in_the_lock_directory(key: str, runtime_dir: Path) -> None:
    name = NAMES[key]
    lock = offload.Lock(name)
    with lock:
        path = Path(lock.path)
        assert path.parent == runtime_dir / "offload" / "locks"
        assert "/" not in path.name and "\x00" not in path.name
        assert len(path.name.encode()) <= 255 and not path.name.startswith(".")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == f"{os.getpid()}\n"  # the holder's pid, for LockTimeout
        assert offload.Lock(name).acquire(blocking=False) is False
    assert path.read_text() == ""
    assert os.listdir(path.parent) == [path.name]


def test_distinct_names_are_distinct_locks() -> None:
    files = {lock_file_name(n) for n in [*NAMES.values(), "a/b", "a_b", "a\\b", "A/b"]}
    assert len(files) == len(NAMES) + 4
    one, other = offload.Lock("a/b"), offload.Lock("a_b")
    with one, other:
        assert one.locked_here() and other.locked_here()


def test_the_lock_directories_are_private(runtime_dir: Path) -> None:
    with offload.Lock("private"):
        pass
    for path in (runtime_dir / "offload", runtime_dir / "offload" / "locks"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert lock_directory() == str(runtime_dir / "offload" / "locks")


def test_a_lock_directory_open_to_others_is_refused(runtime_dir: Path) -> None:
    (runtime_dir / "offload").mkdir(mode=0o700)
    (runtime_dir / "offload").chmod(0o777)
    with pytest.raises(PermissionError, match="0777"):
        offload.Lock("x").acquire()


def test_a_symlinked_lock_directory_is_refused(runtime_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (runtime_dir / "offload").symlink_to(elsewhere)
    with pytest.raises(OSError):
        offload.Lock("x").acquire()
    assert list(elsewhere.iterdir()) == []


def test_a_symlinked_lock_file_is_refused(runtime_dir: Path, tmp_path: Path) -> None:
    lock = offload.Lock("victim")
    with lock:
        pass
    target = tmp_path / "target"
    target.write_text("precious")
    Path(lock.path).unlink()
    Path(lock.path).symlink_to(target)
    with pytest.raises(OSError):
        lock.acquire()
    assert target.read_text() == "precious"


def test_an_explicit_directory(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "shared" / "locks"
    lock = offload.Lock(name, directory=str(directory))
    with lock:
        assert Path(lock.path).parent == directory
        assert offload.Lock(name, directory=str(directory)).acquire(blocking=False) is False
        elsewhere = offload.Lock(name)  # the default directory: another lock
        assert elsewhere.acquire(blocking=False) is True
        elsewhere.release()
    assert not lock.locked()


def test_a_deleted_lock_file_is_locked_anew(name: str) -> None:
    lock = offload.Lock(name)
    with lock:
        Path(lock.path).unlink()  # a /tmp cleaner, say
        other = offload.Lock(name)
        assert other.acquire(blocking=False) is True  # a new file: nobody can tell
        other.release()
    with lock:
        assert Path(lock.path).exists()


# --------------------------------------------------------------------------------------- #
# Workers, pickling, repr, arguments
# --------------------------------------------------------------------------------------- #


def test_tasks_in_pool_workers_exclude_each_other(name: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with offload.Pool(3) as pool:
        wait_until(lambda: pool.stats().idle == 3, "three idle workers")
        futures = [pool.submit(lt.guarded_append, name, str(log), 20) for _ in range(3)]
        pids = {fut.result(LIMIT) for fut in futures}
    lines = log.read_text().splitlines()
    assert len(lines) == 3 * 2 * 20 and len(pids) >= 2  # they did contend
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("enter ") and leave == "exit " + enter.split()[1]


def test_a_pickled_lock_is_an_unheld_lock_of_the_same_name(name: str) -> None:
    lock = offload.Lock(name, timeout=3)
    with lock:
        copy = pickle.loads(pickle.dumps(lock))
        assert (copy.name, copy.timeout, copy.path) == (name, 3.0, lock.path)
        assert not copy.locked_here() and copy.locked()
        with offload.spawn() as w:
            assert w.call(lt.lock_file_of, name) == lock.path


def test_repr_shows_the_state(name: str) -> None:
    lock = offload.Lock(name, timeout=2.5)
    assert repr(lock).startswith(f"<offload.Lock {name!r} not held here timeout=2.5 file=")
    with lock:
        assert f"held by this process (pid {os.getpid()}, thread MainThread)" in repr(lock)
    assert "not held here" in repr(lock)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        offload.Lock("")
    with pytest.raises(TypeError, match="str"):
        offload.Lock(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        offload.Lock("x", timeout=-1)
    lock = offload.Lock("x")
    with pytest.raises(TypeError, match="number"):
        lock.acquire(False)  # threading.Lock's positional blocking flag: refused
    with pytest.raises(ValueError, match="non-blocking"):
        lock.acquire(1, blocking=False)
    assert not lock.locked_here()


def test_a_lock_dropped_while_held_is_released_with_a_warning(name: str) -> None:
    lock = offload.Lock(name)
    lock.acquire()
    with pytest.warns(ResourceWarning, match="garbage-collected while held"):
        del lock
    other = offload.Lock(name)
    assert other.acquire(blocking=False)
    other.release()


def test_the_default_directory_without_a_runtime_dir(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    expected = (
        f"/run/user/{os.geteuid()}/offload/locks"
        if os.path.isdir(f"/run/user/{os.geteuid()}")
        else f"/tmp/offload-{os.geteuid()}/locks"
    )
    assert lock_directory() == expected
    lock = offload.Lock(name)
    with lock:
        assert os.path.dirname(lock.path) == expected
    os.unlink(lock.path)  # lock files stay by design; this test's own goes
