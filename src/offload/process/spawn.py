"""The ``spawn`` and ``reexec`` start methods: a fresh interpreter, through ``Popen``.

``spawn`` runs ``python -c`` with the worker's loop; ``reexec`` re-runs this very program
(its ``offload.init()`` then becomes the worker). Either way the worker's settings travel
in the ``OFFLOAD_WORKER`` environment variable and its socket is passed by number.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

from offload.process.child import ChildProcess, popen, reap_pid
from offload.process.spec import LaunchSpec
from offload.transport.loop import Loop
from offload.worker.settings import SETTINGS_ENV, encode_settings

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import IO, Any


def worker_argv(spec: LaunchSpec) -> list[str]:
    """The command line that starts a worker for ``spec.start_method``.

    Raises:
        ValueError: the start method is neither ``spawn`` nor ``reexec``.
    """
    if spec.start_method == "spawn":
        # -c rather than -m: runpy's imports would cost every worker start-up time.
        return [spec.python, "-c", "from offload.worker.loop import run_worker; run_worker()"]
    if spec.start_method == "reexec":
        argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
        argv[0] = sys.executable  # absolute, so a worker cwd= cannot break it
        script = sys.argv[0] if sys.argv else ""
        if script and script not in ("-c", "-m") and os.path.exists(script):
            # The same program, found from any working directory.
            for i in range(1, len(argv)):
                if argv[i] == script:
                    argv[i] = os.path.abspath(script)
                    break
        return argv
    raise ValueError(f"unknown start_method {spec.start_method!r}")


def launch_spawn(
    spec: LaunchSpec, loop: Loop, on_exit: Callable[[ChildProcess], Any]
) -> tuple[ChildProcess, socket.socket]:
    """Start a fresh interpreter as a worker; return it and the parent's socket end.

    Raises:
        OSError: the process could not be started (e.g. the interpreter does not exist).
        ValueError: the start method is neither ``spawn`` nor ``reexec``.
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ)
        env.update(spec.env)
        settings = spec.worker_settings(child_sock.fileno(), os.getpid())
        env[SETTINGS_ENV] = encode_settings(settings)
        stdout: Any = None
        if spec.pipe_stdout or spec.stdout not in ("inherit", "devnull"):
            stdout = subprocess.PIPE
        elif spec.stdout == "devnull":
            stdout = subprocess.DEVNULL
        process = popen(
            worker_argv(spec),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            pass_fds=(child_sock.fileno(),),
            env=env,
            cwd=spec.cwd,
            umask=-1 if spec.umask is None else spec.umask,
            start_new_session=True,
        )
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    # The loop owns the pipes' fds from here on (Popen must not close them).
    stderr_fd = _take_fd(process.stderr)
    stdout_fd = _take_fd(process.stdout)
    child = ChildProcess(
        process.pid,
        spec,
        loop,
        on_exit,
        stderr_fd=stderr_fd,
        stdout_fd=stdout_fd,
        reap=lambda: _reap_popen(process),
    )
    return child, parent_sock


def _reap_popen(process: subprocess.Popen[bytes]) -> int | None:
    code = reap_pid(process.pid)
    if code is not None:
        process.returncode = code  # reaped: the Popen must never wait for the pid again
    return code


def _take_fd(pipe: IO[bytes] | None) -> int | None:
    if pipe is None:
        return None
    fd = os.dup(pipe.fileno())
    pipe.close()
    return fd
