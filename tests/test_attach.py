"""Workers started by hand (``start_method="attach"``; SPEC section 11).

The caller listens on 127.0.0.1 and logs the command to run; each test runs that command
in a subprocess, as a human would in another terminal (``shlex.split`` of the very
text), and checks what the caller then sees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shlex
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import crashes
import debug_tasks
import offload

LIMIT = 30.0  # every wait below is bounded by this


class _Commands(logging.Handler):
    """Collects the commands that attach slots log (``... by hand: COMMAND``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.commands: queue.Queue[str] = queue.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "waits to be started by hand: " in message:
            self.commands.put(message.split("waits to be started by hand: ", 1)[1])


@pytest.fixture
def commands() -> Iterator[queue.Queue[str]]:
    logger = logging.getLogger("offload")
    handler = _Commands()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.commands
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class Spawning:
    """``offload.spawn(**options)`` on a thread (it waits for the worker to attach)."""

    def __init__(self, **options: Any) -> None:
        self.worker: offload.Worker | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(options,))
        self.thread.start()

    def _run(self, options: dict[str, Any]) -> None:
        try:
            self.worker = offload.spawn(**options)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.error = exc

    def result(self) -> offload.Worker:
        self.thread.join(LIMIT)
        assert not self.thread.is_alive(), "spawn() did not return"
        if self.error is not None:
            raise self.error
        assert self.worker is not None
        return self.worker


@contextlib.contextmanager
def by_hand(command: str, workdir: Path, name: str = "worker") -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` as typed in a shell (its output to files); kill it if it outlives
    the test."""
    with open(workdir / f"{name}.out", "wb") as out:
        proc = subprocess.Popen(
            shlex.split(command), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(LIMIT)


def token_path_of(command: str) -> Path:
    argv = shlex.split(command)
    return Path(argv[argv.index("--token-file") + 1])


def test_a_worker_started_by_hand_runs_calls_and_its_segfault_is_a_typed_error(
    commands: queue.Queue[str], tmp_path: Path
) -> None:
    spawning = Spawning(start_method="attach", name="by-hand", preload=("debug_tasks",))
    command = commands.get(timeout=LIMIT)
    assert f"{sys.executable} -m offload.worker --connect 127.0.0.1:" in command
    token = token_path_of(command)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    with by_hand(command, tmp_path) as proc:
        w = spawning.result()
        try:
            assert not token.parent.exists()  # one worker per token: gone once attached
            assert w.pid == proc.pid
            assert w.call(os.getpid) == proc.pid
            assert w.call(crashes.identity, b"x" * (1 << 20)) == b"x" * (1 << 20)
            # The settings travelled: its name and its preload (the task's registry).
            assert w.call(lambda: sys.modules["debug_tasks"].REMEMBERED) == 0
            err = w.submit(crashes.segfault).exception(timeout=LIMIT)
            assert isinstance(err, offload.WorkerCrashed), err
            assert err.reason == "disconnected"
            assert err.pid == proc.pid
            assert "started by hand" in str(err)
            assert "stderr" not in str(err).split("while running")[1]  # not ours to read
            assert proc.wait(LIMIT) == -signal.SIGSEGV
        finally:
            w.shutdown(timeout=5)
    assert "Fatal Python error: Segmentation fault" in (tmp_path / "worker.out").read_text()
    assert debug_tasks.REMEMBERED == 0  # (nothing ran here)


def test_a_worker_with_the_wrong_token_is_refused_and_the_caller_waits_on(
    commands: queue.Queue[str], tmp_path: Path
) -> None:
    spawning = Spawning(
        start_method="attach", name="picky", initializer=debug_tasks.remember, initargs=(5,)
    )
    command = commands.get(timeout=LIMIT)
    wrong = tmp_path / "wrong-token"
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32).hex().encode())
    impostor = command.replace(str(token_path_of(command)), str(wrong))
    with by_hand(impostor, tmp_path, "impostor") as proc:
        assert proc.wait(LIMIT) == 1
    assert "AuthenticationError" in (tmp_path / "impostor.out").read_text()
    with by_hand(command, tmp_path) as proc:
        w = spawning.result()
        try:
            # The initializer ran in it, after the handshake, like any worker's.
            assert w.call(lambda: sys.modules["debug_tasks"].REMEMBERED) == 5
            w.shutdown(timeout=LIMIT)  # graceful: the worker says goodbye and exits 0
            assert proc.wait(LIMIT) == 0
        finally:
            w.shutdown(timeout=5)


def test_killing_the_call_of_a_worker_started_by_hand_ends_it(
    commands: queue.Queue[str], tmp_path: Path
) -> None:
    spawning = Spawning(start_method="attach")
    with by_hand(commands.get(timeout=LIMIT), tmp_path) as proc:
        w = spawning.result()
        try:
            fut = w.submit(crashes.sleep)
            assert crashes.wait_until(fut.running, LIMIT)
            assert fut.kill()
            assert isinstance(fut.exception(LIMIT), offload.WorkerKilled)
            # Its connection closed: it dies as a worker whose parent is gone does.
            assert proc.wait(LIMIT) != 0
        finally:
            w.shutdown(timeout=5)


def test_nobody_attaching_within_start_timeout_is_a_start_error(
    commands: queue.Queue[str],
) -> None:
    with pytest.raises(offload.StartError) as info:
        offload.spawn(start_method="attach", start_timeout=0.3, name="lonely")
    command = commands.get(timeout=LIMIT)
    assert "start_timeout" in str(info.value)
    assert command in str(info.value)
    assert not token_path_of(command).parent.exists()  # no token left behind


class Robot:
    """A stand-in for the human: runs every command the attach slots log, as it
    appears, until stopped (then ends and reaps what it started)."""

    def __init__(self, commands: queue.Queue[str], workdir: Path) -> None:
        self.commands = commands
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                command = self.commands.get(timeout=0.05)
            except queue.Empty:
                continue
            with open(self.workdir / f"robot-{len(self.procs)}.out", "wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        shlex.split(command),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(LIMIT)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(LIMIT)


def test_a_pool_of_workers_started_by_hand_replaces_a_crashed_one(
    commands: queue.Queue[str], tmp_path: Path
) -> None:
    robot = Robot(commands, tmp_path)
    try:
        with offload.Pool(workers=2, start_method="attach") as pool:
            assert list(pool.map(crashes.identity, range(20))) == list(range(20))
            err = pool.submit(crashes.segfault).exception(timeout=LIMIT)
            assert isinstance(err, offload.WorkerCrashed) and err.reason == "disconnected"
            # The slot waits for a new worker started by hand (the robot runs it).
            assert pool.submit(crashes.identity, 7).result(timeout=LIMIT) == 7
            assert sorted(pool.map(crashes.identity, range(5))) == list(range(5))
        assert len(robot.procs) == 3  # two, then one to replace the crashed one
    finally:
        robot.stop()


def test_workers_started_by_hand_exit_0_after_a_graceful_shutdown(
    commands: queue.Queue[str], tmp_path: Path
) -> None:
    """Whoever started a worker by hand sees status 0 after a graceful shutdown, even
    when its reader sees the connection close before the worker's own exit (the caller
    closes it once the Goodbye is in): several workers, several chances for that race."""
    robot = Robot(commands, tmp_path)
    try:
        with offload.Pool(workers=4, start_method="attach") as pool:
            assert sorted(pool.map(crashes.identity, range(40))) == list(range(40))
        assert crashes.wait_until(lambda: len(robot.procs) == 4, LIMIT)
        statuses = [proc.wait(LIMIT) for proc in robot.procs]
        assert statuses == [0, 0, 0, 0], [
            (tmp_path / f"robot-{i}.out").read_text() for i in range(len(robot.procs))
        ]
    finally:
        robot.stop()
