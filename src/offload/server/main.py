"""The life of an ``offload serve`` process: start, serve until signalled, drain, exit.

1. :func:`serve_until_signalled` starts the :class:`~offload.server.server.Server`
   (exit status 1 if it cannot listen) and prints ``offload: serving on HOST:PORT
   (pid N)`` on stdout: clients and tests read the address there.
2. It waits for SIGTERM or SIGINT. The handlers only note the signal; a wakeup fd ends
   the wait at once.
3. It drains the server (:meth:`Server.stop <offload.server.server.Server.stop>`) for up
   to ``drain_timeout`` seconds and returns the exit status: 0 if every call finished by
   itself, 3 if calls were killed at the deadline.
4. Calls that run on the server's own threads (``--isolation inline``) cannot be killed:
   past the deadline the process ends with ``os._exit(3)``.

Whatever happens, the token file that ``offload serve`` generated for itself is
removed before the process ends.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable

from offload.server.server import Server
from offload.tokens import remove_generated_tokens

EXIT_DRAINED = 0
EXIT_CANNOT_START = 1
EXIT_KILLED_AT_DEADLINE = 3


def serve_until_signalled(
    server: Server, drain_timeout: float, announce: Callable[[str], object] | None = None
) -> int:
    """Start ``server``, serve until SIGTERM or SIGINT, drain; return the exit status
    (0: every call finished; 3: calls were killed at the drain deadline; 1: could not
    start). Removes the token ``offload serve`` generated before it returns.

    ``announce(address)`` is called once it listens, instead of printing the address
    (a server started over ssh tells its client so).

    Must run on the main thread (it installs signal handlers).
    """
    try:
        return _serve_until_signalled(server, drain_timeout, announce)
    finally:
        remove_generated_tokens()


def _serve_until_signalled(
    server: Server, drain_timeout: float, announce: Callable[[str], object] | None
) -> int:
    if server.isolation == "inline":
        # Calls run on this process's threads: what they print goes to their callers.
        from offload.server.thread_output import install

        install()
    try:
        bound = server.start()
    except OSError as exc:
        print(f"offload serve: cannot listen on {server.address}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    if announce is not None:
        announce(str(bound))
    else:
        print(f"offload: serving on {bound} (pid {os.getpid()})", flush=True)
    _wait_for_signal()
    print(f"offload: draining (up to {drain_timeout:g} s): {server!r}", file=sys.stderr, flush=True)
    clean = server.stop(drain_timeout)
    outcome = "drained" if clean else "killed the calls still running at the deadline"
    print(f"offload: {outcome}; exiting", file=sys.stderr, flush=True)
    if not clean and server.inline_running:
        # Inline calls run on threads of this process, which the interpreter would wait
        # for at exit: ending the process is the only way to kill them (and os._exit
        # runs no atexit hook: the generated token goes now).
        remove_generated_tokens()
        sys.stdout.flush()
        os._exit(EXIT_KILLED_AT_DEADLINE)
    return EXIT_DRAINED if clean else EXIT_KILLED_AT_DEADLINE


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT arrives."""
    # The handler only sets a flag: it runs on the main thread between two bytecodes,
    # wherever that thread is, so it must take no lock (Event.set from a handler that
    # interrupts Event.wait on the same thread deadlocks). The wakeup fd ends the wait
    # at once: Python writes to it when any signal arrives.
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signum)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not signalled:
            select.select([wake_r], [], [], 1.0)
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)
