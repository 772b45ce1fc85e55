"""Tasks for ``test_ssh.py``, shipped to the remote side with ``SSH(ship=["ssh_tasks"])``
(an importable module, not a test file; standard library only)."""

from __future__ import annotations

import os
import time


def pid() -> int:
    """The pid of the worker process running the call."""
    return os.getpid()


def module_file(name: str) -> str:
    """Where the worker imports module ``name`` from."""
    import importlib

    return str(importlib.import_module(name).__file__)


def meet(path: str, role: str) -> int:
    """Rendezvous of two calls through the FIFO ``path``: opening one end blocks until
    the other end is opened, so both calls return only if they ran at the same time.
    Returns the worker's pid."""
    if role == "read":
        with open(path, "rb") as f:
            f.read()
    else:
        with open(path, "wb") as f:
            f.write(b"x")
    return os.getpid()


def report_and_sleep(seconds: float) -> None:
    """Tell the caller the call runs (a progress report), then sleep."""
    import offload

    offload.report(os.getpid())
    time.sleep(seconds)


def echo_server(listen: str, token: bytes, settings: dict[str, str], ready: object) -> int:
    """An entry point for ``offload.client.ssh.start_remote``: listen on ``listen``, say
    ready, send the greeting and the token to the first client, and end."""
    import socket

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(listen.removeprefix("unix:"))
        server.listen(1)
        ready("echo")  # type: ignore[operator]
        conn, _ = server.accept()
        with conn:
            conn.sendall(settings["greeting"].encode() + token)
    return 0
