"""Shared memory for the large buffers of a local connection (a worker's socketpair).

Theory of operation
-------------------
Between a client and its local worker, an out-of-band pickle buffer of at least
``threshold`` bytes (a large ``bytes``, a NumPy array...) does not travel through the
socket: the sender copies it into a *segment*, a memfd it owns and keeps mapped, and the
frame names the segment instead of holding the bytes (see
:mod:`offload.protocol.codec`). The first time a segment is used, its descriptor goes
with the frame (``SCM_RIGHTS``, sent with the frame's first byte, so it is there when
the frame is decoded); the receiver maps it once and keeps the mapping, so later
transfers through the same segment cost one copy into warm memory and nothing else.

A segment starts with a header whose first byte says who may touch it:

* ``BUSY``: set by its owner before the frame that fills it is sent;
* ``FREE``: set by the receiver when the last view of what it received is gone (a
  ``bytes`` is copied out at once; a NumPy array may be a view of the segment and keeps
  it busy as long as it lives); the owner may then fill it again;
* ``RETIRED``: set by the owner when it drops a free segment (it keeps a few free
  ones); the receiver unmaps it at its next attach.

The receiver hands out one ctypes array per transfer over the mapping: every view
derived from it (pickle's, NumPy's) keeps that object alive, so a weak reference to it
tells when the transfer's data is no longer used.

Nothing needs cleaning up by name: memfds have none, and the kernel frees a segment
when its last descriptor and mapping are gone, which a ``SIGKILL`` of either side
does too (descriptors still in flight in a socket die with it).
"""

from __future__ import annotations

import _socket as socket  # not the socket package: a worker imports this module
import os
from collections import deque

from offload.errors import ProtocolError

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    import mmap  # imported when a segment is first mapped (a worker starts faster)
    from array import array  # imported when descriptors first travel (idem)
    from collections.abc import Callable
    from typing import Any

THRESHOLD = 1 << 18  # buffers this large go through shared memory
HEADER = 64  # a segment's state byte, then padding: the data stays 64-byte aligned
FREE, BUSY, RETIRED = 0, 1, 2
WITH_FD = 1 << 63  # a segment reference with this bit: its descriptor comes with the frame
_MIN_SEGMENT = 1 << 20
_KEEP_FREE = 4  # free segments an owner keeps for reuse
# Bytes of segments the peer may still hold before buffers go through the socket instead
# (a peer that keeps what it receives, or frees it only when its garbage collector runs,
# must not make this side allocate without end).
_MAX_BUSY = 1 << 30
# Descriptors one read can bring: a frame has at most this many new segments (SCM_MAX_FD).
_MAX_FDS = 253
_ANCILLARY = socket.CMSG_SPACE(_MAX_FDS * 4)
_CTRUNC = socket.MSG_CTRUNC


class _Own:
    """A segment this side fills."""

    __slots__ = ("fd", "map", "number")

    def __init__(self, number: int, fd: int, mapping: mmap.mmap) -> None:
        self.number = number
        self.fd = fd  # until the first frame that uses it sends it (then -1)
        self.map = mapping


class SharedMemory:
    """The shared-memory state of one connection: the segments this side owns and the
    peer's that it has mapped, and the descriptors received and not yet claimed.

    The protocol connection calls :meth:`export` and :meth:`attach`; the transport
    calls :meth:`push_fds` and :meth:`close`. Not thread-safe: the sending side is
    called under the channel's send or outbox lock, the receiving side by the reader.

    Args:
        threshold: buffers of at least this many bytes travel through shared memory.
        track: called as ``track(fd, True)`` with the descriptor each mapping holds
            (Python's mmap keeps a duplicate of the file's) and ``track(fd, False)``
            when the mapping is gone: a client declares them part of its I/O machinery
            (:func:`offload.transport.loop.keep_open`), as a worker's socket is.
    """

    def __init__(
        self, threshold: int = THRESHOLD, track: Callable[[int, bool], object] | None = None
    ) -> None:
        self.threshold = threshold
        self._track = track
        self._own: list[_Own] = []
        self._numbers = 0
        self._peer: dict[int, mmap.mmap] = {}
        self._fds: deque[int] = deque()
        self._keep: dict[int, Any] = {}  # weak references to the transfers handed out
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<SharedMemory {len(self._own)} own segments, {len(self._peer)} mapped from "
            f"the peer, {len(self._fds)} descriptors waiting>"
        )

    # -- sending -------------------------------------------------------------------------

    def export(self, view: memoryview) -> tuple[int, int] | None:
        """Copy ``view`` (bytes) into a free segment; return its reference for the frame
        and the descriptor to send with the frame (-1 if the peer has it already), or
        None when the peer holds too many segments already (then the buffer goes
        through the socket). The caller closes that descriptor once sent.

        Raises:
            OSError: no memfd or mapping could be made.
        """
        size = view.nbytes
        seg = self._free_segment(size)
        if seg is None:
            return None
        seg.map[HEADER : HEADER + size] = view
        seg.map[0] = BUSY
        fd, seg.fd = seg.fd, -1
        return (seg.number | WITH_FD if fd >= 0 else seg.number), fd

    def _free_segment(self, size: int) -> _Own | None:
        best: _Own | None = None
        free = []
        busy = 0
        for seg in self._own:
            if seg.map[0] == FREE:
                free.append(seg)
                capacity = len(seg.map) - HEADER
                if capacity >= size and (best is None or capacity < len(best.map) - HEADER):
                    best = seg
            else:
                busy += len(seg.map)
        if best is not None:
            return best
        if busy >= _MAX_BUSY:
            return None
        for seg in free[: max(0, len(free) + 1 - _KEEP_FREE)]:
            self._retire(seg)
        capacity = max(_MIN_SEGMENT, 1 << (size + HEADER - 1).bit_length())
        fd = os.memfd_create("offload", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, capacity)  # pages come when first written
            mapping = self._map(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        self._numbers += 1
        seg = _Own(self._numbers, fd, mapping)
        self._own.append(seg)
        return seg

    def _map(self, fd: int, size: int) -> mmap.mmap:
        import mmap

        mapping = mmap.mmap(fd, size)
        track = self._track
        if track is not None:
            import weakref

            for held in _same_file(fd):
                track(held, True)
                weakref.finalize(mapping, track, held, False)
        return mapping

    def _retire(self, seg: _Own) -> None:
        seg.map[0] = RETIRED
        seg.map.close()
        if seg.fd >= 0:
            os.close(seg.fd)
        self._own.remove(seg)

    # -- receiving -------------------------------------------------------------------------

    def push_fds(self, fds: list[int] | array[int]) -> None:
        """Descriptors that arrived with the bytes of a read, in order."""
        if self._closed:
            for fd in fds:
                os.close(fd)
            return
        self._fds.extend(fds)

    def attach(self, ref: int, size: int) -> memoryview:
        """The ``size`` bytes of the peer's segment ``ref`` (see :meth:`export`), as a
        writable view of the mapping that frees the segment for the peer once it and
        every view made from it are gone.

        Raises:
            ProtocolError: the segment's descriptor did not come, the segment is
                unknown, too small, or cannot be mapped.
        """
        number = ref & ~WITH_FD
        if ref & WITH_FD:
            if not self._fds:
                raise ProtocolError("a shared buffer came without its segment's descriptor")
            fd = self._fds.popleft()
            try:
                mapping = self._map(fd, 0)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"cannot map a shared segment: {exc}") from None
            finally:
                os.close(fd)
            self._sweep()
            self._peer[number] = mapping
        else:
            found = self._peer.get(number)
            if found is None:
                raise ProtocolError(f"a shared buffer names unknown segment {number}")
            mapping = found
        capacity = len(mapping) - HEADER
        if size > capacity:
            raise ProtocolError(f"a shared buffer of {size} bytes overflows its segment")
        import ctypes  # only once large data arrives
        import weakref

        holder = (ctypes.c_ubyte * capacity).from_buffer(mapping, HEADER)
        watch = weakref.ref(holder, _Release(mapping, self._keep))
        self._keep[id(watch)] = watch
        return memoryview(holder).cast("B")[:size]

    def _sweep(self) -> None:
        """Drop the mappings of segments their owner retired."""
        for number, mapping in list(self._peer.items()):
            if mapping[0] == RETIRED:
                del self._peer[number]
                _close_quietly(mapping)

    def close(self) -> None:
        """Release everything this connection holds: own segments (a peer's mapping
        keeps one alive as long as it needs it), mappings of the peer's segments that
        nothing uses any more (the others go with their last view), and descriptors
        that arrived without their frame. Idempotent."""
        self._closed = True
        for seg in self._own:
            _close_quietly(seg.map)
            if seg.fd >= 0:
                os.close(seg.fd)
        self._own = []
        for mapping in self._peer.values():
            _close_quietly(mapping)
        self._peer = {}
        while self._fds:
            os.close(self._fds.popleft())


class _Release:
    """Weak-reference callback: a transfer's data is no longer used; its segment is
    free for the peer to fill again."""

    __slots__ = ("keep", "mapping")

    def __init__(self, mapping: mmap.mmap, keep: dict[int, Any]) -> None:
        self.mapping = mapping
        self.keep = keep

    def __call__(self, ref: Any) -> None:
        self.keep.pop(id(ref), None)
        try:
            if self.mapping[0] == BUSY:
                self.mapping[0] = FREE
        except ValueError:
            pass  # closed: the connection is gone


def _same_file(fd: int) -> list[int]:
    """This process's other descriptors of the file ``fd`` is open on."""
    me = os.fstat(fd)
    found = []
    for name in os.listdir("/proc/self/fd"):
        other = int(name)
        if other == fd:
            continue
        try:
            st = os.fstat(other)
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile
        if st.st_ino == me.st_ino and st.st_dev == me.st_dev:
            found.append(other)
    return found


def _close_quietly(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        pass  # views of it live on; it is unmapped with the last of them


def receive_into(sock: Any, buf: bytearray | memoryview, flags: int, shared: SharedMemory) -> int:
    """``sock.recv_into(buf, 0, flags)`` that hands the descriptors that come with the
    bytes to ``shared``.

    Raises:
        OSError: as ``recv_into`` (BlockingIOError when nothing is there).
        ProtocolError: descriptors were lost (more came than a frame may carry).
    """
    n, ancillary, msg_flags, _ = sock.recvmsg_into((buf,), _ANCILLARY, flags)
    if ancillary or msg_flags & _CTRUNC:  # (rarely: reads of small frames stay cheap)
        _take_fds(ancillary, msg_flags, shared)
    return n  # type: ignore[no-any-return]


def _take_fds(
    ancillary: list[tuple[int, int, bytes]], msg_flags: int, shared: SharedMemory
) -> None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            from array import array

            fds = array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            shared.push_fds(fds)
    if msg_flags & _CTRUNC:
        raise ProtocolError("the peer sent more descriptors than a frame may carry")


def send_chunks(sock: Any, chunks: list[Any], flags: int, iov_max: int) -> list[Any]:
    """Write ``chunks`` (bytes-like, and descriptors as ints before the bytes they
    must come with) with ``sendmsg``; return what the socket did not take now (empty
    once all is written). A descriptor sent is closed here.

    Raises:
        OSError: the socket failed (not BlockingIOError: then the rest is returned).
    """
    items = list(chunks)
    while items:
        fds: list[int] = []
        while items and type(items[0]) is int:
            fds.append(items.pop(0))
        views: list[memoryview] = []
        for item in items[:iov_max]:
            if type(item) is int:
                break
            views.append(memoryview(item).cast("B"))
        if not views:  # nothing to carry them (cannot happen: they precede their frame)
            close_fds(fds)
            return []
        ancillary: list[tuple[int, int, Any]] = []
        if fds:
            from array import array

            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds)))
        try:
            n = sock.sendmsg(views, ancillary, flags)
        except (BlockingIOError, InterruptedError):
            return fds + items
        except OSError:
            close_fds(fds)
            close_fds(items)
            raise
        close_fds(fds)
        del items[: len(views)]
        for i, view in enumerate(views):
            if n >= view.nbytes:
                n -= view.nbytes
                continue
            items[0:0] = [view[n:], *views[i + 1 :]]
            break
    return items


def is_shared(chunks: list[Any]) -> bool:
    """Whether ``chunks`` carry descriptors (see :func:`send_chunks`)."""
    return any(type(chunk) is int for chunk in chunks)


def close_fds(chunks: list[Any]) -> None:
    """Close the descriptors among unsent ``chunks``."""
    for chunk in chunks:
        if type(chunk) is int:
            os.close(chunk)
