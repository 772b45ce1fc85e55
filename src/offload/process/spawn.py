"""The ``spawn`` and ``reexec`` start methods: a fresh interpreter, started as ``Popen``
would (:mod:`offload.process.forkexec`, which spares a fresh program ``subprocess``).

``spawn`` runs ``python -c`` with the worker's loop; ``reexec`` re-runs this very program
(its ``offload.init()`` then becomes the worker). Either way the worker's settings travel
in the ``OFFLOAD_WORKER`` environment variable and its socket is passed by number.
"""

from __future__ import annotations

import _socket as socket  # not the socket package: its enums cost a fresh program ~3 ms
import os
import sys
from collections.abc import Callable

from offload.process.child import ChildProcess, popen_lock, reap_pid
from offload.process.forkexec import start_process
from offload.process.spec import LaunchSpec
from offload.transport.loop import Loop
from offload.worker.settings import SETTINGS_ENV, encode_settings

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any


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
        stdout = "inherit"
        if spec.pipe_stdout or spec.stdout not in ("inherit", "devnull"):
            stdout = "pipe"
        elif spec.stdout == "devnull":
            stdout = "devnull"
        with popen_lock():
            started = start_process(
                worker_argv(spec),
                env=env,
                cwd=spec.cwd,
                umask=-1 if spec.umask is None else spec.umask,
                pass_fds=(child_sock.fileno(),),
                stdout=stdout,
                reap=reap_pid,
            )
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    # The loop owns the pipes' fds from here on.
    child = ChildProcess(
        started.pid,
        spec,
        loop,
        on_exit,
        stderr_fd=started.stderr_fd,
        stdout_fd=started.stdout_fd,
        reap=started.reap,
    )
    return child, parent_sock
