"""The raw floor for pools: worker processes pipelining length-prefixed pickles.

Like :mod:`benchmarks.raw_floor`, each worker is a fresh interpreter holding one end of
a socketpair, and every message is ``pickle.dumps(...)`` behind a 4-byte big-endian
length. Unlike it, the parent does not wait for each reply: it writes requests in
batches (many frames per ``send``), keeps a bounded number outstanding per worker, and
reads replies as they come from whichever worker has some (one thread, ``selectors``).
The child reads whatever has arrived, runs every complete request and writes all the
replies at once. Each request and reply is still pickled on its own: this is what a pool
of tiny calls costs at the least, with no futures, no threads and no bookkeeping.

``python -m benchmarks.raw_pool FD`` is the child.
"""

from __future__ import annotations

import pickle
import selectors
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.raw_floor import start_child, stop_child

_HEADER = struct.Struct("!I")
_READ = 1 << 20
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _frames(messages: Sequence[Any]) -> bytes:
    """The messages, each pickled on its own behind its length."""
    parts = []
    for message in messages:
        data = pickle.dumps(message, protocol=_PROTOCOL)
        parts.append(_HEADER.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _parse(buf: bytearray) -> list[Any]:
    """Unpickle and remove every complete frame at the start of ``buf``."""
    out = []
    pos, end = 0, len(buf)
    view = memoryview(buf)
    try:
        while end - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if end - pos - 4 < size:
                break
            out.append(pickle.loads(view[pos + 4 : pos + 4 + size]))
            pos += 4 + size
    finally:
        view.release()
    del buf[:pos]
    return out


class _Worker:
    def __init__(self) -> None:
        self.proc, self.sock = start_child("benchmarks.raw_pool")
        self.buf = bytearray()
        self.todo: Sequence[Any] = ()
        self.sent = 0
        self.outstanding = 0

    def close(self) -> None:
        stop_child(self.proc, self.sock)


class RawPool:
    """``workers`` raw child processes; :meth:`run` sends them messages round-robin."""

    def __init__(self, workers: int = 2) -> None:
        self.workers: list[_Worker] = []
        try:
            for _ in range(workers):
                self.workers.append(_Worker())
        except BaseException:
            self.close()
            raise

    def run(self, messages: Sequence[Any], *, batch: int, window: int, limit: float) -> list[Any]:
        """Send every message (``(fn, args)``) and return the replies (in no particular
        order across workers): ``batch`` frames per send, at most ``window`` messages
        outstanding per worker.

        Raises:
            TimeoutError: not every reply came within ``limit`` seconds.
            EOFError: a worker exited.
        """
        n = len(self.workers)
        for i, w in enumerate(self.workers):
            w.todo = messages[i::n]
            w.sent = w.outstanding = 0
            w.buf.clear()
        replies: list[Any] = []
        deadline = time.perf_counter() + limit
        with selectors.DefaultSelector() as sel:
            for w in self.workers:
                sel.register(w.sock, selectors.EVENT_READ, w)
                self._feed(w, batch, window)
            while len(replies) < len(messages):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(f"raw pool: no reply within {limit:g} s")
                for key, _ in sel.select(min(remaining, 1.0)):
                    w = key.data
                    data = w.sock.recv(_READ)
                    if not data:
                        raise EOFError("raw pool: a worker exited")
                    w.buf += data
                    got = _parse(w.buf)
                    w.outstanding -= len(got)
                    replies += got
                    self._feed(w, batch, window)
        return replies

    @staticmethod
    def _feed(w: _Worker, batch: int, window: int) -> None:
        while w.sent < len(w.todo) and w.outstanding < window:
            k = min(batch, len(w.todo) - w.sent, window - w.outstanding)
            w.sock.sendall(_frames(w.todo[w.sent : w.sent + k]))
            w.sent += k
            w.outstanding += k

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []


def _child(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    buf = bytearray()
    while True:
        data = sock.recv(_READ)
        if not data:
            return
        buf += data
        out = []
        for fn, args in _parse(buf):
            try:
                result = fn(*args)
            except Exception as exc:  # noqa: BLE001 - sent back to the parent
                result = exc
            out.append(result)
        if out:
            sock.sendall(_frames(out))


if __name__ == "__main__":
    _child(int(sys.argv[1]))
