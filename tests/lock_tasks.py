"""Helpers for ``test_lock.py`` (not a test module): programs that hold an
``offload.Lock`` in a process of their own, and tasks that take one in a pool worker.

Each program talks to the test over its stdin and stdout, one line at a time: it says
what it did ("locked", a pid, ...) and waits for the test's next line before going on.
So the test knows, without sleeping, that the lock is held; and a program whose stdin
closes (the test ended, or failed) releases the lock and exits.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import offload

WAIT_LIMIT = 20.0  # seconds a task waits for the lock before the test fails

# Take the lock, say "locked", wait for a line (or EOF), release, say "released".
HOLD = """
import sys, offload
lock = offload.Lock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""

# Take the lock, then fork: the child reports (over a pipe of its own) whether it holds
# the lock, whether release() works there, whether another Lock of the name can be taken
# (it cannot: the parent still holds it) and whether it has a descriptor of the lock
# file, then waits for EOF on stdin (it outlives its parent when the test kills that);
# the parent says "locked <child pid> <report>" and waits for a line.
HOLD_AND_FORK = """
import os, sys, offload
lock = offload.Lock(sys.argv[1])
lock.acquire()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used, closed by now
            pass
    try:
        lock.release()
        released = "released"
    except RuntimeError:
        released = "not-held"
    other = offload.Lock(sys.argv[1]).acquire(blocking=False)
    has_fd = any(f.endswith(lock.file_name) for f in fds)
    os.write(w, f"{lock.locked_here()} {released} {other} {has_fd}".encode())
    os.close(w)
    sys.stdin.read()
    os._exit(0)
os.close(w)
report = b""
while chunk := os.read(r, 100):
    report += chunk
print("locked", pid, report.decode(), flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


class Holder:
    """A program holding a Lock: ``Holder(name)`` starts it and returns once it holds
    the lock; ``release()`` lets it go; leaving the ``with`` block ends it."""

    def __init__(self, name: str, script: str = HOLD) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._buffer = b""
        self.first = self.line()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def line(self) -> str:
        """The program's next line; AssertionError if none comes within WAIT_LIMIT
        (the program failed: its traceback is on the test's stderr)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + WAIT_LIMIT
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"no line from the lock holder in {WAIT_LIMIT:g} s")
            data = os.read(fd, 4096)
            if not data:
                raise AssertionError(f"the lock holder ended early: {self._buffer!r}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def send(self, text: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def release(self) -> None:
        self.send()
        assert self.line() == "released"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_LIMIT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


def guarded_append(name: str, path: str, rounds: int) -> int:
    """``rounds`` times: under the Lock ``name``, append "enter <pid>" and "exit <pid>"
    to ``path`` (a file the lock makes sure no two processes write at once)."""
    lock = offload.Lock(name, timeout=WAIT_LIMIT)
    line_in, line_out = f"enter {os.getpid()}\n", f"exit {os.getpid()}\n"
    for _ in range(rounds):
        with lock:
            # Two separate appends: a rival writer, were it not excluded, would get
            # its lines in between.
            with open(path, "a") as f:
                f.write(line_in)
            with open(path, "a") as f:
                f.write(line_out)
    return os.getpid()


def lock_file_of(name: str) -> str:
    """The path of lock ``name``'s file, as a worker sees it."""
    return offload.Lock(name).path


def exists(path: str) -> bool:
    return Path(path).exists()
