"""Shared test fixtures.

Every test runs under ``no_leaks``: a test that leaves behind a child process
(running or zombie), a thread, or an open file descriptor fails at teardown.
The one exception is offload's process-wide I/O loop, which is started lazily
by the first test that needs it and lives for the rest of the process: its
thread (named ``offload-io...``) and the fds it reports through
``offload.transport.loop.owned_fds()`` are ignored.

Hung tests are handled by pytest-timeout (configured in pyproject.toml with
``timeout_method = "thread"``), which dumps the stack of every thread before
ending the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest

# How long teardown waits for the library's own background cleanup (reaping
# workers, joining helper threads, closing pipes) before calling it a leak.
LEAK_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.02
_IO_THREAD_PREFIX = "offload-io"
_HAVE_PROC_FD = os.path.isdir("/proc/self/fd")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a slow test (deselect with -m 'not slow')")
    config.addinivalue_line(
        "markers",
        "leak_grace(seconds): how long the no_leaks fixture waits for background "
        f"cleanup before reporting a leak (default {LEAK_GRACE_SECONDS:g})",
    )


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


# --------------------------------------------------------------------------- #
# Leak detection
# --------------------------------------------------------------------------- #


@dataclass
class _Snapshot:
    children: set[int]
    threads: set[int]
    fds: set[int]  # fd numbers where /proc/self/fd exists
    fd_count: int  # fallback elsewhere


@dataclass
class _Leaks:
    children: list[psutil.Process] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    extra_fd_count: int = 0

    def __bool__(self) -> bool:
        return bool(self.children or self.threads or self.fds or self.extra_fd_count)


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _open_fds() -> set[int]:
    if not _HAVE_PROC_FD:
        return set()
    # The listing itself opens an fd that shows up in the result; it is closed
    # again by the time we look, so drop entries that no longer resolve.
    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in fds if _fd_target(fd) is not None}


def _fd_count() -> int:
    try:
        return psutil.Process().num_fds()
    except (AttributeError, psutil.Error):  # num_fds() is POSIX-only
        return 0


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _snapshot() -> _Snapshot:
    return _Snapshot(
        children={p.pid for p in _children()},
        threads={t.ident for t in threading.enumerate() if t.ident is not None},
        fds=_open_fds(),
        fd_count=0 if _HAVE_PROC_FD else _fd_count(),
    )


def _loop_owned_fds() -> set[int]:
    """Fds belonging to offload's process-wide I/O loop, if it exists yet."""
    try:
        from offload.transport import loop
    except ImportError:
        return set()
    owned_fds = getattr(loop, "owned_fds", None)
    if owned_fds is None:
        return set()
    return {int(fd) for fd in owned_fds()}


def _forkserver_templates() -> set[int]:
    """offload's forkserver template processes: started once, shared, long-lived."""
    try:
        from offload.process import forkserver
    except ImportError:
        return set()
    return forkserver.template_pids()


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _find_leaks(base: _Snapshot) -> _Leaks:
    leaks = _Leaks()
    # A new child that exited but was never waited for (a zombie) is a leak too:
    # the library must reap what it starts.
    templates = _forkserver_templates()
    leaks.children = [
        p for p in _children() if p.pid not in base.children and p.pid not in templates
    ]
    leaks.threads = [
        t
        for t in threading.enumerate()
        if t.ident not in base.threads and t.is_alive() and not t.name.startswith(_IO_THREAD_PREFIX)
    ]
    owned = _loop_owned_fds()
    if _HAVE_PROC_FD:
        leaks.fds = sorted(_open_fds() - base.fds - owned)
    else:
        leaks.extra_fd_count = max(0, _fd_count() - base.fd_count - len(owned))
    return leaks


def _describe_process(proc: psutil.Process) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        cmdline = ""
    if not cmdline:  # zombies and kernel-ish processes have no command line
        try:
            cmdline = f"[{proc.name()}]"
        except psutil.Error:
            cmdline = "?"
    state = " (zombie)" if _is_zombie(proc) else ""
    return f"pid {proc.pid}{state}: {cmdline}"


def _kill_and_reap(procs: list[psutil.Process]) -> None:
    """SIGKILL exactly the given pids; reap those that are our direct children."""
    me = os.getpid()
    direct = []
    for proc in procs:
        try:
            if proc.ppid() == me:
                direct.append(proc.pid)
        except psutil.Error:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
    for pid in direct:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _report(leaks: _Leaks, child_lines: list[str]) -> str:
    lines = ["resource leak after test:"]
    if child_lines:
        lines.append("  leaked child processes (killed):")
        lines.extend(f"    {line}" for line in child_lines)
    if leaks.threads:
        lines.append("  leaked threads:")
        lines.extend(f"    {t.name} (ident {t.ident}, daemon={t.daemon})" for t in leaks.threads)
    if leaks.fds:
        lines.append("  leaked file descriptors:")
        lines.extend(f"    fd {fd} -> {_fd_target(fd) or '?'}" for fd in leaks.fds)
    if leaks.extra_fd_count:
        lines.append(f"  leaked file descriptors: {leaks.extra_fd_count} more open than before")
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("leak_grace")
    grace = float(marker.args[0]) if marker is not None else LEAK_GRACE_SECONDS

    base = _snapshot()
    yield

    # Bounded wait for the library's own background cleanup; this is not test
    # synchronisation, and it returns at once when nothing is outstanding.
    deadline = time.monotonic() + grace
    leaks = _find_leaks(base)
    while leaks and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        leaks = _find_leaks(base)
    if not leaks:
        return

    child_lines = [_describe_process(p) for p in leaks.children]
    _kill_and_reap(leaks.children)
    pytest.fail(_report(leaks, child_lines), pytrace=False)
