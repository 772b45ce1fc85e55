"""The raw floor: two processes exchanging length-prefixed pickles over a socketpair.

The parent sends ``pickle.dumps((fn, args, kwargs))`` behind a 4-byte big-endian length;
the child (a fresh interpreter started with :mod:`subprocess`, inheriting its end of the
socket) loads it, calls it and replies the same way. No threads, no futures, no
bookkeeping: what any process-based executor costs at the least on this machine.

``python -m benchmarks.raw_floor FD`` is the child.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from benchmarks import ROOT, tasks

_HEADER = struct.Struct("!I")


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at end of file."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    """The next message; raises EOFError at end of file."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    body = _recv_exact(sock, size)
    if body is None:
        raise EOFError
    return pickle.loads(body)


def start_child(module: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Run ``python -m module FD`` with one end of a socketpair; return the process and
    the parent's end (the raw floors' children)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


def stop_child(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """Close the parent's end (the child exits on EOF); kill the child if it lingers."""
    sock.close()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RawWorker:
    """The parent's side: one child process and its socket."""

    def __init__(self) -> None:
        self.proc, self.sock = start_child("benchmarks.raw_floor")
        self.pid = self.proc.pid

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        _send(self.sock, (fn, args, {}))
        return _recv(self.sock)

    def send(self, fn: Callable[..., Any], *args: Any) -> None:
        _send(self.sock, (fn, args, {}))

    def wait_eof(self) -> None:
        """Block until the child's end closes (raises if a message arrives instead)."""
        if self.sock.recv(1) != b"":
            raise RuntimeError("expected end of file from the raw worker")

    def close(self) -> None:
        """Close the socket (the child exits on EOF); kill it if it lingers."""
        stop_child(self.proc, self.sock)

    def __enter__(self) -> RawWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.returncode is None and exc[0] is not None:
            self.proc.kill()
        self.close()


def death_exit(tmp: str) -> float:
    """Seconds from the child's ``os._exit`` to EOF in the parent (one fresh child)."""
    path = os.path.join(tmp, "raw-death")
    with RawWorker() as w:
        w.call(abs, -1)
        w.send(tasks.die_at, path)
        w.wait_eof()
        t1 = time.perf_counter()
    return t1 - tasks.read_time(path)


def death_kill(tmp: str) -> float:
    """Seconds from ``kill(pid, SIGKILL)`` to EOF in the parent (one fresh child)."""
    path = os.path.join(tmp, "raw-started")
    with RawWorker() as w:
        w.call(abs, -1)
        w.send(tasks.sleep_marked, path, 10.0)
        tasks.wait_for_file(path)
        t0 = time.perf_counter()
        os.kill(w.pid, signal.SIGKILL)
        w.wait_eof()
        t1 = time.perf_counter()
    return t1 - t0


def _child(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    while True:
        try:
            fn, args, kwargs = _recv(sock)
        except EOFError:
            return
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sent back to the parent
            result = exc
        _send(sock, result)


if __name__ == "__main__":
    _child(int(sys.argv[1]))
