"""The ``fork`` start method, and :func:`become_worker`, which a forked child runs.

``fork`` forks this very process: fast (no interpreter start, no imports), but unsafe
when other threads hold locks. The forkserver's template forks its children the same
way, so both end in :func:`become_worker`.
"""

from __future__ import annotations

import _socket as socket  # not the socket package (see offload.process.spawn)
import os
import sys
from collections.abc import Callable

from offload.process.child import ChildProcess, reap_pid
from offload.process.spec import LaunchSpec
from offload.transport.loop import Loop

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any


def output_pipes(spec: LaunchSpec) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(stderr read, write) and, when the stdout mode needs one, (stdout read, write)."""
    stderr_pipe = os.pipe()
    piped = spec.pipe_stdout or spec.stdout not in ("inherit", "devnull")
    stdout_pipe = os.pipe() if piped else None
    return stderr_pipe, stdout_pipe


def become_worker(
    spec: LaunchSpec,
    sock_fd: int,
    stderr_w: int,
    stdout_w: int | None,
    *,
    ppid: int,
    keep: tuple[int, ...] = (),
) -> None:
    """In a freshly forked child: set up stdio, session, directory and environment,
    close every other inherited fd, and run the worker loop. Never returns."""
    try:
        os.setsid()
        while sock_fd <= 2 or stderr_w <= 2 or (stdout_w is not None and stdout_w <= 2):
            # A parent started with a closed stdio fd: move ours above 2 first.
            sock_fd, stderr_w = os.dup(sock_fd), os.dup(stderr_w)
            stdout_w = os.dup(stdout_w) if stdout_w is not None else None
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if stdout_w is not None:  # before devnull: a relayed worker's is piped anyway
            os.dup2(stdout_w, 1)
        elif spec.stdout == "devnull":
            os.dup2(devnull, 1)
        os.dup2(stderr_w, 2)
        _close_other_fds({0, 1, 2, sock_fd, *keep})
        # The parent's sys.stdout/sys.stderr may be objects on fds just closed (output
        # capture, a redirected stream): the worker writes to its own fds 1 and 2.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        if spec.cwd is not None:
            os.chdir(spec.cwd)
        if spec.umask is not None:
            os.umask(spec.umask)
        os.environ.update(spec.env)
        forget_unfinished_imports()
        from offload.worker.loop import run_worker  # loaded before the fork (launch_fork)

        run_worker(spec.worker_settings(sock_fd, ppid))
    except BaseException:  # noqa: BLE001 - a forked child must never return to the caller
        import traceback

        traceback.print_exc()
    finally:
        os._exit(70)


def forget_unfinished_imports() -> None:
    """In a forked child: drop the imports that other threads of the parent had under
    way when it forked.

    The child has only the forking thread. An import another thread was in the middle
    of (the caller's first by-value call importing cloudpickle, say, while the I/O loop
    forks a worker) left its module lock held by a thread that does not exist here, and
    its half-run module in ``sys.modules``: the first unpickling that needs that module
    would wait on the lock forever. Forgetting both lets the child import it afresh.
    """
    import importlib._bootstrap as bootstrap  # only in a forked child

    for registry in ("_module_locks", "_blocking_on"):
        table = getattr(bootstrap, registry, None)
        if table is not None and hasattr(table, "clear"):
            table.clear()
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            del sys.modules[name]


def _close_other_fds(keep: set[int]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def launch_fork(
    spec: LaunchSpec, loop: Loop, on_exit: Callable[[ChildProcess], Any]
) -> tuple[ChildProcess, socket.socket]:
    """Fork this very process as a worker; return it and the parent's socket end.

    Raises:
        OSError: the fork failed.
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    (err_r, err_w), out = output_pipes(spec)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()  # or the child would print the parent's buffered text again
        except (OSError, ValueError):
            pass
    # Imported here, in the parent, rather than in each forked child: a ``fork`` worker
    # then starts with the worker's code already loaded. Not at the top of this module: a
    # pool that spawns its workers never needs it.
    import offload.worker.loop  # noqa: F401

    ppid = os.getpid()
    pid = os.fork()
    if pid == 0:
        become_worker(spec, child_sock.fileno(), err_w, out[1] if out else None, ppid=ppid)
    child_sock.close()
    os.close(err_w)
    if out is not None:
        os.close(out[1])

    child = ChildProcess(
        pid,
        spec,
        loop,
        on_exit,
        stderr_fd=err_r,
        stdout_fd=out[0] if out else None,
        reap=lambda: reap_pid(pid),
    )
    return child, parent_sock
