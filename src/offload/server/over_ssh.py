"""The entry point of a worker server started over ssh (by :mod:`offload.bootstrap`).

The bootstrap calls :func:`serve` on the remote machine with the Unix socket to listen
on (ssh forwards it to the client), the token the client sent over ssh's stdin and the
settings of the server; :func:`serve` tells the bootstrap when clients may connect.
It is ``offload serve`` without the command line: the same
:class:`~offload.server.server.Server`, run by the same
:func:`~offload.server.main.serve_until_signalled`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from offload.server.main import serve_until_signalled
from offload.server.server import Server

ENTRY = "offload.server.over_ssh:serve"
"""How the client names :func:`serve` to the bootstrap."""


def serve(listen: str, token: bytes, settings: dict[str, Any], ready: Callable[[str], Any]) -> int:
    """Serve on ``listen`` with ``token`` until the process is signalled or killed (the
    bootstrap kills it when the ssh connection ends).

    Args:
        listen: ``unix:PATH``.
        token: the shared secret the client sent.
        settings: ``workers`` (calls run at once; default: the CPU count),
            ``preload`` (modules the workers import), ``start_method`` (how the
            workers start; default ``"fork"``).
        ready: called with ``"pid N"`` once clients may connect.

    Returns:
        the exit status of :func:`~offload.server.main.serve_until_signalled`.
    """
    # A program, not a library, like `offload serve`: its warnings (a worker that
    # crashed) go to stderr, which ssh relays to the client.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("offload").addHandler(handler)
    server = Server(
        listen,
        token=token,
        workers=settings.get("workers"),
        preload=tuple(settings.get("preload") or ()),
        # Its workers fork from this process rather than start an interpreter each:
        # a worker then answers a few milliseconds after the server starts, not after a
        # second interpreter start and its imports (over ssh, the whole start must stay
        # within 1.5x a bare `ssh host python -c pass`). Forking a threaded process is
        # unsafe when another thread holds a lock the child needs; the threads here
        # are offload's own (the I/O loop, which forks, and the accepting thread), and
        # a forked worker drops the imports other threads had under way.
        worker_options={"start_method": settings.get("start_method") or "fork"},
    )
    return serve_until_signalled(server, 0.0, lambda _: ready(f"pid {os.getpid()}"))
