"""A protocol connection over a stream socket, driven by the I/O loop.

:class:`Channel` is the thin I/O driver around :class:`offload.protocol.Connection`:
any thread may :meth:`send` (frames are written in order, under a lock, with ``sendmsg``
so large buffers are not joined); the loop thread reads, decodes and hands the messages
of each read to ``on_messages`` as one batch. When the peer closes, breaks the protocol,
or the socket fails, ``on_close(error)`` runs once on the loop thread (``error`` is None
for a clean close).

Writes never block: what the socket does not take at once stays queued, and the loop
writes it when the socket can take more. A peer that is not reading (a worker busy
writing its own results back, a client that stopped reading) can thus never hold up the
thread that writes to it; above all not the loop thread, which reads everyone's results
(a blocking write there, to a worker blocked writing its results, was a deadlock).

TLS connections are read on a thread of their own (a readable socket may hold part of a
record only). OpenSSL forbids two threads in one connection at once, reading and
writing included, so every call into the TLS object takes the channel's TLS lock; the
socket is non-blocking, so none of them waits inside it: the reader waits for input
with ``select`` outside the lock, and a write the socket cannot take is retried later,
with the same bytes, as OpenSSL requires. Closing shuts the socket down, which wakes the
reader, and leaves closing the descriptor to the reader as it leaves: a descriptor
closed under a thread about to select on its number can be given to a new file first.
"""

from __future__ import annotations

import _socket as socket  # not the socket package (see offload.process.spawn)
import select
import threading
import time
from collections.abc import Callable, Sequence

from offload import protocol as p
from offload.errors import ProtocolError
from offload.transport import shared
from offload.transport.loop import Loop, keep_open, on_loop_thread

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from offload.protocol.messages import CallFields

# Reads go into one preallocated buffer per channel: a fresh 256 KiB bytes object per
# read costs an mmap/munmap pair, more than the rest of a small call's round trip.
_READ_SIZE = 1 << 18
_IOV_MAX = 512
_JOIN_LIMIT = 1 << 16  # frames of a write up to this many bytes in all are joined first
_TLS_PIECE = 1 << 18  # bytes handed to one TLS write
_FAIR_SHARE = 1 << 24  # bytes of a large frame read in one go before others are served

# Threads other than the loop's dispatching messages they read (a waiting thread, see
# Channel.pump; a TLS connection's reader): the callbacks of the futures they resolve run
# there, and while they do, nobody else reads that socket.
_dispatching = threading.local()


def in_dispatch() -> bool:
    """Whether the caller runs where answers are dispatched: on the I/O loop's thread,
    or on a thread dispatching what it read itself (see :meth:`Channel.pump`, and TLS
    readers). Waiting for another answer there could wait for this very thread."""
    return on_loop_thread() or getattr(_dispatching, "depth", 0) > 0


class Channel:
    """A framed, message-level view of a connected socket.

    Args:
        sock: a connected stream socket (blocking).
        conn: the sans-IO protocol state for it.
        loop: the I/O loop that reads it.
        threaded: read on a thread of its own instead of the loop. For TLS sockets: a
            readable socket may hold only part of a TLS record, and a read would then
            block the loop for everyone.
    """

    def __init__(
        self, sock: socket.socket, conn: p.Connection, loop: Loop, *, threaded: bool = False
    ) -> None:
        self.sock = sock
        self.threaded = threaded
        self.conn = conn
        self.loop = loop
        self.on_messages: Callable[[list[p.Message]], Any] = lambda msgs: None
        self.on_close: Callable[[BaseException | None], Any] = lambda err: None
        self._send_lock = threading.Lock()  # held while writing: frames never interleave
        self._outbox_lock = threading.Lock()
        self._outbox: list[Any] = []  # encoded frame chunks not written yet
        self._read_lock = threading.Lock()  # whoever holds it reads: the loop or a waiter
        self._closed = False
        self._ending = False  # ended, its closing left to the loop (see _feed)
        self._reading = False
        self._read_buf = bytearray(_READ_SIZE)
        self._read_view = memoryview(self._read_buf)
        self._poller: select.poll | None = None  # for waiting threads (see pump)
        # Output the socket did not take: it waits at the front of the outbox, and the
        # loop writes it once the socket is writable (_blocked, under the outbox lock;
        # _write_watch, the loop's writability watch, on the loop thread).
        self._blocked = False
        self._write_watch: int | None = None
        # TLS: one call into the TLS object at a time; a write the socket did not take,
        # to be retried with the same bytes (under the send lock).
        self._tls_lock = threading.Lock()
        self._tls_retry: bytes | None = None
        # TLS: the reader thread while it runs, and whether close() has shut the socket
        # down (both under the TLS lock): the last of the two to finish closes it.
        self._reader: threading.Thread | None = None
        self._shut_down = False
        # A local peer's connection: large buffers go through shared memory.
        self.shared_memory: shared.SharedMemory | None = None

    def share_memory(self, threshold: int) -> None:
        """Send buffers of ``threshold`` bytes or more through shared memory (the peer
        must do the same: a local worker told so by its settings); before :meth:`start`."""
        if threshold > 0 and not self.threaded:
            # The mappings' descriptors live as long as the channel, like its socket.
            memory = shared.SharedMemory(threshold, track=keep_open)
            self.shared_memory = self.conn.sharing = memory

    def start(self, initial: bytes = b"") -> None:
        """Send our Hello and start reading; ``initial`` are bytes already received."""
        if self.threaded:
            self.sock.setblocking(False)  # see the module docstring
        self.write(self.conn.hello())
        self._reading = True
        if self.threaded:
            reader = threading.Thread(
                target=self._run_reader, args=(initial,), name="offload-tls-reader", daemon=True
            )
            self._reader = reader
            try:
                reader.start()
            except BaseException:
                self._reader_gone()
                raise
            return
        if initial:
            self.loop.call_soon(self._feed, initial)
        self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _run_reader(self, initial: bytes) -> None:
        """The TLS reader thread: :meth:`_read_thread`, then the socket's close if the
        channel was closed meanwhile (see :meth:`close`)."""
        try:
            self._read_thread(initial)
        finally:
            self._reader_gone()

    def _reader_gone(self) -> None:
        with self._tls_lock:
            self._reader = None
            shut_down = self._shut_down
        if shut_down:
            self.sock.close()

    def _read_thread(self, initial: bytes) -> None:
        import ssl

        if initial:
            self._dispatch(initial)
        sock = self.sock
        while not self._closed:
            # The rest of a large frame is read straight into its own memory.
            target = self.conn.receive_buffer()
            try:
                with self._tls_lock:
                    n = sock.recv_into(self._read_buf if target is None else target)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
                if _wait_until_ready(sock, write=isinstance(exc, ssl.SSLWantWriteError)):
                    continue
                n = 0
            except (OSError, ValueError):
                n = 0
            with self._read_lock:
                if n and target is not None:
                    self.conn.received_into(n)
                    if self.conn.receive_buffer() is None:  # the frame is whole
                        self._dispatch(None)
                    continue
                self._dispatch(self._read_view[:n] if n else b"")
            if not n:
                return

    def _dispatch(self, data: bytes | memoryview | None) -> None:
        """:meth:`_feed` on a thread other than the loop's (see :func:`in_dispatch`)."""
        _dispatching.depth = getattr(_dispatching, "depth", 0) + 1
        try:
            self._feed(data)
        finally:
            _dispatching.depth -= 1

    # -- output --------------------------------------------------------------------------

    # Output goes through an outbox: messages are encoded onto it in order (under the
    # outbox lock: sealed frames are numbered in that order) and written by whoever
    # flushes first, in the same order. A caller can thus queue messages while holding
    # a lock of its own and make the system call after releasing it.

    def send(self, msg: p.Message) -> bool:
        """Encode and write one message; False if the channel is closed. Thread-safe."""
        return self.enqueue((msg,)) and self.flush()

    def enqueue(self, msgs: Sequence[p.Message]) -> bool:
        """Encode messages onto the outbox; :meth:`flush` writes them. Thread-safe."""
        with self._outbox_lock:
            if self._closed or self.conn.state is p.State.CLOSED:
                return False
            for msg in msgs:
                self._outbox += self.conn.send(msg)
        return True

    def enqueue_calls(self, calls: Sequence[CallFields]) -> bool:
        """Encode calls, given as the fields of a Call in wire order (call_id, kind,
        timeout, target, function, payload, buffers), onto the outbox."""
        with self._outbox_lock:
            if self._closed or self.conn.state is p.State.CLOSED:
                return False
            send_call = self.conn.send_call
            for fields in calls:
                self._outbox += send_call(fields)
        return True

    def write(self, chunks: list[Any]) -> bool:
        """Write pre-encoded frame chunks (after what is queued already)."""
        with self._outbox_lock:
            self._outbox += chunks
        return self.flush()

    def flush(self) -> bool:
        """Write everything queued so far, without blocking: what the socket does not
        take now is written by the loop as soon as it can (see the module docstring).
        False if the socket failed."""
        with self._send_lock:
            with self._outbox_lock:
                chunks, self._outbox = self._outbox, []
            if not chunks and self._tls_retry is None:
                return not self._closed
            return self._write_locked(chunks)

    def _write_locked(self, chunks: list[Any]) -> bool:
        if self.threaded:
            return self._write_tls(chunks)
        if self.shared_memory is not None and shared.is_shared(chunks):
            return self._write_shared(chunks)
        if len(chunks) > 1:
            size = 0
            for c in chunks:
                size += len(c) if not isinstance(c, memoryview) else c.nbytes
            if size <= _JOIN_LIMIT:
                # Many small frames (a batch of calls): one copy is cheaper than a
                # memoryview per frame and a long iovec.
                chunks = [b"".join(chunks)]
        views = [memoryview(c).cast("B") for c in chunks]
        try:
            while views:
                n = self.sock.sendmsg(views[:_IOV_MAX], (), socket.MSG_DONTWAIT)
                while n and views:
                    first = views[0]
                    if n >= first.nbytes:
                        n -= first.nbytes
                        views.pop(0)
                    else:
                        views[0] = first[n:]
                        n = 0
        except BlockingIOError:
            # The peer is not reading as fast: the rest goes first when the socket can
            # take more (the loop then writes it; so may the next flush).
            self._put_back(views)
        except OSError:
            # The reader sees the same failure as EOF and reports it through on_close.
            return False
        return True

    def _write_shared(self, chunks: list[Any]) -> bool:
        """:meth:`_write_locked` of output that carries descriptors (shared memory)."""
        try:
            rest = shared.send_chunks(self.sock, chunks, socket.MSG_DONTWAIT, _IOV_MAX)
        except OSError:
            return False
        if rest:
            self._put_back(rest)
        return True

    def _write_tls(self, chunks: list[Any]) -> bool:
        """:meth:`_write_locked` on a TLS socket (TLS sockets have no sendmsg)."""
        import ssl

        views = _tls_pieces(chunks)
        sock = self.sock
        try:
            if self._tls_retry is not None:
                with self._tls_lock:
                    sock.send(self._tls_retry)
                self._tls_retry = None
            while views:
                view = views[0]
                piece = view[:_TLS_PIECE]
                try:
                    with self._tls_lock:
                        n = sock.send(piece)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    self._tls_retry = bytes(piece)  # OpenSSL wants these bytes again
                    _consume(views, len(piece))
                    raise
                _consume(views, n)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self._put_back(views)
        except (OSError, ValueError):
            return False
        return True

    def _put_back(self, views: list[Any]) -> None:
        """Output the socket did not take: first in line for the loop to write when the
        socket can take more (send lock held)."""
        with self._outbox_lock:
            self._outbox[0:0] = views
            watch = not self._blocked
            self._blocked = True
        if watch:
            self.loop.call_soon(self._watch_writable)

    def _watch_writable(self) -> None:
        """Start watching for writability while output waits (loop thread)."""
        if self._closed or self._write_watch is not None:
            return
        with self._outbox_lock:
            if not self._blocked:
                return  # another flush wrote it meanwhile
        self._write_watch = self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        with self._outbox_lock:
            self._blocked = False  # a flush that cannot write it all sets it again
        if not self.flush():
            self._unwatch_writable()
            return
        with self._outbox_lock:
            if self._blocked:
                return
        self._unwatch_writable()

    def _unwatch_writable(self) -> None:
        watch, self._write_watch = self._write_watch, None
        if watch is not None:
            self.loop.remove_writer(watch)

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by the socket (a reading for diagnostics)."""
        retry = self._tls_retry
        with self._outbox_lock:
            queued = sum(memoryview(c).nbytes for c in self._outbox)
        return queued + (len(retry) if retry is not None else 0)

    # -- input ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if not self._read_lock.acquire(blocking=False):
            return  # a waiting caller is reading this socket itself (see pump)
        try:
            if self._closed:
                return
            try:
                # Non-blocking: a waiting thread (see pump) may have read the bytes that
                # woke us, and a blocking read would then stall the loop for everyone.
                n = self._receive()
            except BlockingIOError:
                return
            except OSError:
                n = 0
            except ProtocolError as exc:
                self._finish(exc)
                return
            self._feed(None if n else b"")
        finally:
            self._read_lock.release()

    def pump(self, done: Callable[[], bool], window: float) -> None:
        """Read and dispatch messages on the calling thread until ``done()`` or
        ``window`` seconds pass.

        A thread blocked on a result calls this so that the answer is decoded where it
        is awaited, without a hand-off from the loop thread (that hand-off costs more
        than the rest of a round trip). It gives up at once if another thread is
        reading, and leaves end-of-file to the loop, which owns the process's death.
        """
        if self.claim():
            self.pump_claimed(done, window)

    def claim(self) -> bool:
        """Take over reading from the loop (before sending a call whose answer this
        thread will wait for, so the loop cannot win the race for it). False if another
        thread reads or the platform cannot pause the loop; then nothing was taken."""
        if self._closed or not self._read_lock.acquire(blocking=False):
            return False
        if not self.loop.suspend_reader(self.sock.fileno()):
            self._read_lock.release()
            return False
        return True

    def pump_claimed(self, done: Callable[[], bool], window: float) -> None:
        """:meth:`pump` after a successful :meth:`claim`; gives reading back after."""
        try:
            self._pump_locked(done, window)
        finally:
            if not self._closed:
                self.loop.resume_reader(self.sock.fileno())
            self._read_lock.release()

    def _pump_locked(self, done: Callable[[], bool], window: float) -> None:
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + window
        while not done() and not self._closed and not self._ending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not poller.poll(remaining * 1000.0):
                return
            try:
                n = self._receive()
            except BlockingIOError:
                continue
            except (OSError, ProtocolError):
                return  # the loop sees the failure too, and reports it
            if not n:
                return  # end of file: the loop handles the worker's exit
            self._dispatch(None)

    def _receive(self) -> int:
        """Read what the socket holds, without blocking, and give it to the protocol
        state (not decoded yet: see :meth:`_feed`); the bytes read, 0 at end of file.

        The rest of a large frame is read straight into its own memory (see
        :meth:`Connection.receive_buffer <offload.protocol.Connection.receive_buffer>`),
        read after read until the socket is empty, the frame whole, or
        :data:`_FAIR_SHARE` bytes read (the loop then serves the others before it comes
        back): no copy, and no wake-up of the loop per 256 KiB.

        Raises:
            OSError: as ``recv_into`` (BlockingIOError: nothing to read).
            ProtocolError: descriptors were lost.
        """
        conn = self.conn
        target = conn.receive_buffer()
        if target is None:
            n = self._recv(self._read_buf)
            if n:
                conn.receive_data(self._read_view[:n])
            return n
        total = 0
        while target is not None and total < _FAIR_SHARE:
            try:
                n = self._recv(target)
            except BlockingIOError:
                if total:
                    return total
                raise
            if not n:
                return total  # (the end of file, if any, is read again next time)
            conn.received_into(n)
            total += n
            target = conn.receive_buffer()
        return total

    def _recv(self, buf: bytearray | memoryview) -> int:
        """Read what the socket holds into ``buf``, without blocking (with the
        descriptors that come with it on a connection with shared memory).

        Raises:
            OSError: as ``recv_into`` (BlockingIOError: nothing to read).
            ProtocolError: descriptors were lost.
        """
        memory = self.shared_memory
        if memory is None:
            return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
        return shared.receive_into(self.sock, buf, socket.MSG_DONTWAIT, memory)

    def _feed(self, data: bytes | memoryview | None) -> None:
        """Decode what ``data`` completes (None: what :meth:`_receive` gave the
        protocol state already) and hand it over as one batch."""
        if data is not None:
            self.conn.receive_data(data)
        batch: list[p.Message] = []
        ended = False
        error: BaseException | None = None
        try:
            ended = self.conn.next_events(batch) is p.CLOSED
        except ProtocolError as exc:
            ended, error = True, exc
        if batch:
            self.on_messages(batch)
        if ended:
            if self.threaded or self.loop.in_loop():
                self._finish(error)
            else:
                # A thread reading its own answers (pump) holds the read lock, and
                # closing unregisters the socket on the loop thread and waits for it:
                # if the loop is meanwhile waiting for that lock (drain() as the
                # worker exits), each waits for the other forever. The loop closes it.
                self._ending = True  # the reading thread stops reading now
                self.loop.call_soon(self._finish, error)

    def drain(self) -> None:
        """Read and dispatch whatever the peer already sent, without blocking (used when
        its process has exited, so results written just before a crash are not lost)."""
        with self._read_lock:
            while not self._closed and self._reading:
                try:
                    n = self._receive()
                except BlockingIOError:
                    break
                except (OSError, ProtocolError):
                    n = 0
                self._feed(None if n else b"")

    def _finish(self, error: BaseException | None) -> None:
        if self._closed:
            return
        self.close()
        self.on_close(error)

    def close(self) -> None:
        """Stop reading and close the socket (no callback). Idempotent; loop thread."""
        with self._send_lock, self._outbox_lock:
            if self._closed:
                return
            self._closed = True
            if self.shared_memory is not None:
                shared.close_fds(self._outbox)  # segments never sent
            self._outbox = []
        if self._reading:
            self._reading = False
            if not self.threaded:
                self.loop.remove_reader(self.sock.fileno())
        if self.loop.in_loop():
            self._unwatch_writable()
        else:
            self.loop.call_soon(self._unwatch_writable)
        reader_closes = False
        if self.threaded:
            with self._tls_lock:  # no TLS call under way (shutdown drops the TLS object)
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread
                except OSError:
                    pass
                self._shut_down = True
                # The reader may have taken the socket's descriptor number for select
                # and not be waiting yet: closed now, the number could go to a new file
                # (under load it did), and the reader would wait on that file forever,
                # never seeing the shutdown. The reader closes the socket as it leaves.
                reader = self._reader
                reader_closes = reader is not None and reader is not threading.current_thread()
        if not reader_closes:
            self.sock.close()
        if self.shared_memory is not None:
            self.shared_memory.close()

    def abort(self) -> None:
        """Close now and report it through ``on_close(None)`` (once)."""
        self._finish(None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.conn.state.name.lower()
        peer = self.conn.peer
        who = f" peer={peer.role}:{peer.name}(pid {peer.pid})" if peer is not None else ""
        return f"<Channel fd={self.sock.fileno()} {state}{who}>"

    @property
    def closed(self) -> bool:
        """Whether the channel is closed."""
        return self._closed


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views[0]`` (written)."""
    if n >= len(views[0]):
        views.pop(0)
    else:
        views[0] = views[0][n:]


def _tls_pieces(chunks: list[Any]) -> list[memoryview]:
    """``chunks`` as views to write in turn: runs of small chunks joined (each TLS write
    makes records of its own), large ones as they are (a large frame is not copied
    into one more buffer)."""
    views: list[memoryview] = []
    small: list[Any] = []
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if view.nbytes < _JOIN_LIMIT:
            small.append(view)
            continue
        if small:
            views.append(memoryview(b"".join(small)))
            small = []
        views.append(view)
    if small:
        views.append(memoryview(b"".join(small)))
    return views


def _wait_until_ready(sock: socket.socket, *, write: bool) -> bool:
    """Wait until ``sock`` is readable (or writable); False once it is closed."""
    try:
        select.select([] if write else [sock], [sock] if write else [], [])
    except (OSError, ValueError):
        return False
    return True
