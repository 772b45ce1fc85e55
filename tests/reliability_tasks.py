"""Tasks for the reliability tests (not a test module).

Workers import this module by reference (the worker inherits the parent's ``sys.path``),
so everything a worker runs lives at module level here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import offload

LONG = 60.0  # seconds the escapees and the task sleep; every test stops them long before

# A process that ignores SIGTERM, says so on stdout, then sleeps.
_IGNORE_TERM = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print(os.getpid(), flush=True)\n"
    f"time.sleep({LONG})\n"
)

# A classic daemon: fork, the first child starts a session of its own and forks again,
# both intermediate processes exit; the grandchild ignores SIGTERM, says its pid, sleeps.
_DAEMON = (
    "import os, signal, sys, time\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "os.setsid()\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "os.write(1, b'%d\\n' % os.getpid())\n"
    "devnull = os.open(os.devnull, os.O_RDWR)\n"
    "os.dup2(devnull, 1)\n"
    f"time.sleep({LONG})\n"
)


def _start(code: str, *, new_session: bool) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=new_session,
    )
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())  # written once SIGTERM is ignored
    return proc, pid


def start_escapees_and_sleep(path: str) -> None:
    """Start (a) a subprocess in a session of its own that ignores SIGTERM and (b) a
    double-forked daemon that ignores SIGTERM; write both pids to the FIFO at ``path``;
    sleep (the test kills the call or lets it time out)."""
    _, session_pid = _start(_IGNORE_TERM, new_session=True)
    launcher, daemon_pid = _start(_DAEMON, new_session=False)
    launcher.wait()  # the daemon's launcher exits at once, as daemons' launchers do
    with open(path, "w") as f:
        f.write(f"{session_pid} {daemon_pid}\n")
    time.sleep(LONG)


def start_daemon_then_return() -> int:
    """Start a double-forked daemon that exits soon (it becomes the worker's orphan)
    and return its pid."""
    code = _DAEMON.replace(f"time.sleep({LONG})", "time.sleep(0.05)")
    launcher, pid = _start(code, new_session=False)
    launcher.wait()
    return pid


def zombie_children() -> list[int]:
    """Pids of this process's children that are zombies (exited, not reaped)."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
            except OSError:
                continue
            if state == "Z":
                found.append(pid)
    return found


_kept: list[subprocess.Popen[bytes]] = []


def start_unwaited_popen(code: int) -> int:
    """Start a subprocess that exits with ``code``, keep its Popen for a later call
    (:func:`wait_kept_popen`) and return once it is a zombie, unwaited."""
    proc = subprocess.Popen([sys.executable, "-c", f"import os; os._exit({code})"])
    _kept.append(proc)
    deadline = time.monotonic() + 10
    while proc.pid not in zombie_children() and time.monotonic() < deadline:
        time.sleep(0.005)
    return proc.pid


def wait_kept_popen() -> int | None:
    """The exit status of the subprocess :func:`start_unwaited_popen` kept."""
    return _kept.pop().wait(10)


def getpid() -> int:
    return os.getpid()


def os_exit(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    import ctypes
    import faulthandler

    if not faulthandler.is_enabled():
        faulthandler.enable()
    ctypes.string_at(0)


def sleep_then(seconds: float) -> None:
    time.sleep(seconds)


def touch_then_sleep(path: str, seconds: float) -> None:
    """Create ``path`` (the call has started), then sleep."""
    with open(path, "w"):
        pass
    time.sleep(seconds)


def wait_for_file(path: str, timeout: float = 20.0) -> bool:
    """Parent side: whether ``path`` appeared within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def ident(x: object) -> object:
    """Return the argument (results must never cross between calls)."""
    return x


def ident_after(x: object, seconds: float) -> object:
    """Return the argument after ``seconds``."""
    time.sleep(seconds)
    return x


def write_marker(directory: str, i: int) -> int:
    """Sleep a little (the caller's program is ending meanwhile), then write
    ``marker-i`` in ``directory``; return ``i``."""
    time.sleep(0.2)
    with open(os.path.join(directory, f"marker-{i}"), "w"):
        pass
    return i


def _flaky_exit(path: str) -> str:
    """Crash the worker the first time (no marker yet), succeed the second."""
    if not os.path.exists(path):
        with open(path, "w"):
            pass
        os._exit(9)
    return "second try"


# Registered by name with options of their own: a call by name gets them too.
slow_by_name = offload.task(name="reliability-slow", timeout=0.3)(sleep_then)
flaky_by_name = offload.task(name="reliability-flaky", retries=1)(_flaky_exit)


def touch_then_wait(started: str, release: str, timeout: float = 30.0) -> None:
    """Create ``started``, then wait (bounded) until ``release`` exists."""
    with open(started, "w"):
        pass
    wait_for_file(release, timeout)
