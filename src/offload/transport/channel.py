"""A protocol connection over a stream socket, driven by the I/O loop.

:class:`Channel` is the thin I/O driver around :class:`offload.protocol.Connection`:
any thread may :meth:`send` (frames are written whole, under a lock, with ``sendmsg`` so
large buffers are not joined); the loop thread reads, decodes and hands each message to
``on_message``. When the peer closes, breaks the protocol, or the socket fails,
``on_close(error)`` runs once on the loop thread (``error`` is None for a clean close).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from offload import protocol as p
from offload.errors import ProtocolError
from offload.transport.loop import Loop

_READ_SIZE = 1 << 18
_IOV_MAX = 512


class Channel:
    """A framed, message-level view of a connected socket.

    Args:
        sock: a connected stream socket (blocking).
        conn: the sans-IO protocol state for it.
        loop: the I/O loop that reads it.
    """

    def __init__(self, sock: socket.socket, conn: p.Connection, loop: Loop) -> None:
        self.sock = sock
        self.conn = conn
        self.loop = loop
        self.on_message: Callable[[p.Message], Any] = lambda msg: None
        self.on_close: Callable[[BaseException | None], Any] = lambda err: None
        self._send_lock = threading.Lock()
        self._closed = False
        self._reading = False

    def start(self) -> None:
        """Send our Hello and start reading on the loop."""
        self.write(self.conn.hello())
        self._reading = True
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    # -- output --------------------------------------------------------------------------

    def send(self, msg: p.Message) -> bool:
        """Encode and write one message; False if the channel is closed. Thread-safe."""
        with self._send_lock:
            if self._closed:
                return False
            return self._write_locked(self.conn.send(msg))

    def send_many(self, msgs: list[p.Message]) -> bool:
        """Write several messages in as few system calls as possible."""
        with self._send_lock:
            if self._closed:
                return False
            chunks: list[Any] = []
            for msg in msgs:
                chunks.extend(self.conn.send(msg))
            return self._write_locked(chunks)

    def write(self, chunks: list[Any]) -> bool:
        """Write pre-encoded frame chunks."""
        with self._send_lock:
            return self._write_locked(chunks)

    def _write_locked(self, chunks: list[Any]) -> bool:
        views = [memoryview(c).cast("B") for c in chunks]
        try:
            while views:
                n = self.sock.sendmsg(views[:_IOV_MAX])
                while n and views:
                    first = views[0]
                    if n >= first.nbytes:
                        n -= first.nbytes
                        views.pop(0)
                    else:
                        views[0] = first[n:]
                        n = 0
        except OSError:
            # The reader sees the same failure as EOF and reports it through on_close.
            return False
        return True

    # -- input ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while not self._closed:
            try:
                msg = self.conn.next_event()
            except ProtocolError as exc:
                self._finish(exc)
                return
            if msg is p.NEED_DATA:
                return
            if msg is p.CLOSED:
                self._finish(None)
                return
            assert isinstance(msg, p.Message)
            self.on_message(msg)

    def drain(self) -> None:
        """Read and dispatch whatever the peer already sent, without blocking (used when
        its process has exited, so results written just before a crash are not lost)."""
        if self._closed or not self._reading:
            return
        self.sock.setblocking(False)
        while not self._closed:
            try:
                data = self.sock.recv(_READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            self._feed(data)
        if not self._closed:
            self.sock.setblocking(True)

    def _finish(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self.close()
        self.on_close(error)

    def close(self) -> None:
        """Stop reading and close the socket (no callback). Idempotent; loop thread."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    @property
    def closed(self) -> bool:
        """Whether the channel is closed."""
        return self._closed
