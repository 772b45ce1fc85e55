"""A sans-IO offload connection: bytes in, messages out; messages in, bytes out.

Theory of operation
-------------------
Frames are ``length:u64 (network order) | body``. The length is checked against
``max_message_size`` as soon as its 8 bytes arrive, before anything is buffered for the
body, so a hostile length prefix (2**63) costs nothing.

The connection has three states::

    HANDSHAKE --(peer Hello, versions match)--> OPEN --(EOF / Goodbye / error)--> CLOSED

1. Each side sends its :class:`Hello` first (``Connection.hello()``).
2. On the peer's Hello, the offload version, the protocol version and the Python
   major.minor are compared; any difference raises :class:`VersionMismatch` naming
   both sides. Any other first message is a :class:`ProtocolError`.
3. After that, every message type may flow in both directions.

``next_event()`` returns a message, :data:`NEED_DATA` when more bytes are needed, or
:data:`CLOSED` once the peer closed cleanly. Errors are raised as :class:`ProtocolError`
and leave the connection CLOSED. There are no sockets, threads or clocks here.

Large frames (a body of a MiB or more: out-of-band buffers sent remotely) are received in
place: once the length is known, the body gets memory of its own, of exactly its size,
and :meth:`Connection.receive_buffer` offers the part still missing, for the transport to
read into straight from the socket (:meth:`Connection.received_into` then counts it), in
as few reads as the socket allows. Nothing of it is copied again: the message's buffers
are views of that memory. The memory is an anonymous mapping, so its pages are only
taken as bytes arrive (a length announced and never sent costs no memory). On a sealed
connection the MAC is computed piece by piece as the body arrives, and the frame is
decoded only after it matched.
"""

from __future__ import annotations

import sys

from offload._version import __version__
from offload.errors import ProtocolError, VersionMismatch
from offload.protocol.codec import (
    FRAME_HEADER,
    decode_body,
    decode_common,
    encode_generic,
    frame_call,
    frame_common,
    message_size,
)
from offload.protocol.messages import PROTOCOL_VERSION, Goodbye, Hello, Message, _new_call

TYPE_CHECKING = False  # workers import this at start-up; typing and hashlib cost time
if TYPE_CHECKING:
    from typing import Any

    from offload.protocol.auth import Sealer
    from offload.protocol.codec import Sharing
    from offload.protocol.messages import CallFields

MAC_SIZE = 32  # offload.protocol.auth.MAC_SIZE (not imported: workers never seal)
HEADER = FRAME_HEADER
DEFAULT_MAX_MESSAGE_SIZE = 1 << 30
_DETACH = 1 << 20  # a frame body this large is received in place (see receive_buffer)
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


class Sentinel:
    """Non-message results of :meth:`Connection.next_event` (compare with ``is``).

    (Not an enum: a worker imports this at start-up, and ``enum`` costs milliseconds.)
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")
CLOSED = Sentinel("CLOSED")


class State:
    """Where a connection is in its life (compare with ``is``)."""

    __slots__ = ("name",)
    HANDSHAKE: State
    OPEN: State
    CLOSED: State

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"State.{self.name}"


State.HANDSHAKE = State("HANDSHAKE")
State.OPEN = State("OPEN")
State.CLOSED = State("CLOSED")


def versions() -> tuple[str, int, str]:
    """This side's (offload, protocol, python) versions."""
    return (__version__, PROTOCOL_VERSION, PYTHON_VERSION)


class Connection:
    """One end of an offload connection, with no I/O.

    Args:
        role: ``"client"``, ``"worker"`` or ``"server"`` (sent in our Hello).
        name: our name, for the peer's logs and errors.
        pid: our process id.
        slots: calls we run at once (0 for clients).
        max_message_size: the largest frame body we accept or send.
    """

    def __init__(
        self,
        role: str,
        *,
        name: str = "",
        pid: int = 0,
        slots: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.role = role
        self.name = name
        self.pid = pid
        self.slots = slots
        self.max_message_size = max_message_size
        self.state = State.HANDSHAKE
        self.peer: Hello | None = None
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        # After an authenticated handshake without TLS: MACs every frame (see auth.py).
        self.sealer: Sealer | None = None
        # A large frame being received in place (see receive_buffer): its memory, the
        # view of it to fill, how much arrived, and its MAC check so far (when sealed).
        self._large: Any = None
        self._large_view: memoryview | None = None
        self._large_got = 0
        self._large_check: Any = None
        # Between local processes: moves large buffers through shared memory (set by
        # the transport, see offload.transport.shared); frames then begin with the
        # descriptors to send with them, as ints.
        self.sharing: Sharing | None = None

    def __repr__(self) -> str:
        """``<Connection client 'c-1' OPEN with worker 'w-1' (pid 22) | 12 bytes
        buffered in | sealed>``: the bytes received and not yet returned as messages
        (nothing is ever buffered out: :meth:`send` returns its frames), whether the
        peer has closed its end, and whether frames carry a MAC."""
        me = f"{self.role} {self.name!r}" if self.name else self.role
        peer = self.peer
        with_peer = f" with {peer.role} {peer.name!r} (pid {peer.pid})" if peer else ""
        eof = ", peer closed its end" if self._eof else ""
        sealed = "sealed" if self.sealer is not None else "unsealed"
        return (
            f"<Connection {me} {self.state.name}{with_peer} | "
            f"{self.buffered} bytes buffered in{eof} | {sealed}>"
        )

    # -- sending -------------------------------------------------------------------------

    def hello(self) -> list[bytes | bytearray | memoryview]:
        """Our Hello frame; send it first."""
        offload_version, protocol_version, python_version = versions()
        msg = Hello(
            role=self.role,
            offload_version=offload_version,
            protocol_version=protocol_version,
            python_version=python_version,
            pid=self.pid,
            name=self.name,
            slots=self.slots,
        )
        return self._frame(msg)

    def send(self, msg: Message) -> list[bytes | bytearray | memoryview]:
        """Encode one message as frame chunks.

        Raises:
            ProtocolError: the encoded message would exceed ``max_message_size``
                (callers check :meth:`fits` first to turn this into a per-call error).
        """
        if self.state is State.CLOSED:
            raise ProtocolError("send on a closed connection")
        if isinstance(msg, Goodbye):
            self.state = State.CLOSED
        return self._frame(msg)

    def send_call(self, fields: CallFields) -> list[bytes | bytearray | memoryview]:
        """``send(Call(...))`` from the Call's fields in wire order, without making the
        Call when it can."""
        if self.state is not State.CLOSED:
            whole = frame_call(fields)
            if whole is not None and len(whole) - HEADER.size <= self.max_message_size:
                return [whole if self.sealer is None else self._sealed(whole)]
        return self.send(_new_call(*fields))

    def fits(self, msg: Message) -> bool:
        """Whether ``msg`` is within ``max_message_size``."""
        return message_size(msg) <= self.max_message_size

    def _frame(self, msg: Message) -> list[bytes | bytearray | memoryview]:
        sealer = self.sealer
        whole = frame_common(msg)
        if whole is not None:
            if len(whole) - HEADER.size > self.max_message_size:
                raise ProtocolError(
                    f"{type(msg).__name__} of {len(whole) - HEADER.size} bytes exceeds "
                    f"max_message_size ({self.max_message_size})"
                )
            return [whole if sealer is None else self._sealed(whole)]
        chunks: list[Any] = encode_generic(msg, self.sharing)
        fds: list[int] = []
        while type(chunks[0]) is int:  # descriptors of shared buffers: before the frame
            fds.append(chunks.pop(0))
        if len(chunks) == 1 and isinstance(chunks[0], bytearray):
            size = len(chunks[0])
        else:
            size = sum(memoryview(c).nbytes for c in chunks)
        if size > self.max_message_size:
            raise ProtocolError(
                f"{type(msg).__name__} of {size} bytes exceeds max_message_size "
                f"({self.max_message_size})"
            )
        if sealer is not None:
            mac = sealer.seal(chunks)
            if len(chunks) == 1 and isinstance(chunks[0], bytearray):
                chunks[0] += mac
            else:
                chunks.append(mac)
            size += MAC_SIZE
        if len(chunks) == 1 and isinstance(chunks[0], bytearray):
            chunks[0][0:0] = HEADER.pack(size)  # one contiguous write for small messages
            return [*fds, *chunks] if fds else chunks  # type: ignore[list-item]
        return [*fds, HEADER.pack(size), *chunks]

    def _sealed(self, whole: bytes) -> bytes:
        """The sealed form of an unsealed frame (its length then its body): the length
        grows by the MAC, which follows the body."""
        assert self.sealer is not None
        with memoryview(whole) as view, view[HEADER.size :] as body:
            mac = self.sealer.seal([body])
            return b"".join((HEADER.pack(len(body) + MAC_SIZE), body, mac))

    # -- receiving -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed its end."""
        if not data:
            self._eof = True
            return
        view = self._large_view
        if view is not None:  # a large frame in place: its bytes go there first
            got = self._large_got
            n = min(len(data), len(view) - got)
            view[got : got + n] = memoryview(data).cast("B")[:n]
            self.received_into(n)
            if n == len(data):
                return
            data = memoryview(data).cast("B")[n:]
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def receive_buffer(self) -> memoryview | None:
        """Where to read the peer's next bytes straight into, if anywhere: the part
        still missing of a large frame's body (see the module docstring); None
        otherwise (read into a buffer of your own and call :meth:`receive_data`).

        After reading ``n`` bytes into the start of it, call :meth:`received_into`.
        """
        view = self._large_view
        if view is None or self._large_got == len(view):
            return None
        return view[self._large_got :]

    def received_into(self, n: int) -> None:
        """``n`` bytes were read into the start of :meth:`receive_buffer`."""
        view = self._large_view
        assert view is not None
        start = self._large_got
        end = self._large_got = start + n
        check = self._large_check
        if check is not None:
            body_end = len(view) - MAC_SIZE  # the MAC is not part of what it covers
            if start < body_end:
                check.update(view[start : min(end, body_end)])

    def next_event(self) -> Message | Sentinel:
        """The next complete message, NEED_DATA, or CLOSED.

        Raises:
            ProtocolError: malformed frame, oversized frame, or a handshake violation.
            VersionMismatch: the peer's Hello names other versions.
        """
        if self.state is State.CLOSED:
            return CLOSED
        try:
            msg = self._next_message()
            if isinstance(msg, Message) and self.state is State.HANDSHAKE:
                self._check_hello(msg)
                self.state = State.OPEN
                return msg
        except ProtocolError:
            self.state = State.CLOSED
            raise
        if msg is NEED_DATA:
            if self._eof:
                self.state = State.CLOSED
                if self._pos < len(self._buf) or self._large is not None:
                    raise ProtocolError(
                        f"connection closed inside a frame ({self.buffered} bytes of it received)"
                    )
                return CLOSED
            return NEED_DATA
        assert isinstance(msg, Message)
        if isinstance(msg, Goodbye):
            self.state = State.CLOSED
        return msg

    def next_events(self, out: list[Message]) -> Sentinel:
        """Append every complete message to ``out``, then return what
        :meth:`next_event` would return next: NEED_DATA or CLOSED. (One call per read
        rather than one per message: a batch of results decodes in one loop.)

        Raises:
            ProtocolError, VersionMismatch: as :meth:`next_event`; the messages before
                the bad frame are in ``out``.
        """
        if self.state is State.OPEN and self.sealer is None and self._large is None:
            self._decode_common_frames(out)
        next_message = self._next_message
        while True:
            if self.state is not State.OPEN:
                event = self.next_event()
                if event is NEED_DATA or event is CLOSED:
                    return event
                assert isinstance(event, Message)
                out.append(event)
                continue
            try:
                msg = next_message()
            except ProtocolError:
                self.state = State.CLOSED
                raise
            if msg is NEED_DATA:
                event = self.next_event()  # NEED_DATA, or CLOSED at the end of the stream
                assert not isinstance(event, Message)  # nothing arrived in between
                return event
            assert isinstance(msg, Message)
            out.append(msg)
            if type(msg) is Goodbye:
                self.state = State.CLOSED
                return CLOSED

    def _decode_common_frames(self, out: list[Message]) -> None:
        """Decode the leading complete frames that are common calls and results in one
        pass over the buffer (no copies but what the messages keep); stop at anything
        else, which the general path then handles."""
        buf = self._buf
        pos = start = self._pos
        end = len(buf)
        limit = self.max_message_size
        unpack = HEADER.unpack_from
        with memoryview(buf) as view:
            while end - pos >= 8:
                (size,) = unpack(view, pos)
                body = pos + 8
                if size > limit or end - body < size:
                    break
                msg = decode_common(view, body, body + size)
                if msg is None:
                    break
                out.append(msg)
                pos = body + size
        if pos != start:
            self._pos = pos
            self._compact()

    def _next_message(self) -> Message | Sentinel:
        if self._large is not None:
            return self._large_frame()
        available = len(self._buf) - self._pos
        if available < HEADER.size:
            return NEED_DATA
        (size,) = HEADER.unpack_from(self._buf, self._pos)
        sealer = self.sealer
        if sealer is not None:
            if size < MAC_SIZE:
                raise ProtocolError(f"a sealed frame of {size} bytes cannot hold its MAC")
            size_limit = self.max_message_size + MAC_SIZE
        else:
            size_limit = self.max_message_size
        if size > size_limit:
            raise ProtocolError(
                f"peer sent a frame of {size} bytes; max_message_size is {self.max_message_size}"
            )
        if available < HEADER.size + size:
            if size >= _DETACH:
                self._receive_in_place(size)
            return NEED_DATA
        start = self._pos + HEADER.size
        end = self._pos = start + size
        with memoryview(self._buf) as view:
            if sealer is not None:
                end -= MAC_SIZE
                with view[start:end] as sealed:
                    sealer.open(sealed, bytes(view[end : self._pos]))
            # The common calls and results decode in place (they copy what they keep).
            msg = decode_common(view, start, end)
            if msg is None and end - start < _DETACH:
                # Copy the body out so buffers handed to pickle stay valid after compaction.
                body = memoryview(bytes(view[start:end]))
        if msg is None and end - start >= _DETACH:
            # A large frame (out-of-band buffers, remotely): the buffer becomes its body
            # (no copy of it); what follows it starts a new buffer.
            whole = self._buf
            self._buf = whole[self._pos :]
            self._pos = 0
            body = memoryview(whole)[start:end]
        self._compact()
        if msg is not None:
            return msg
        return decode_body(body, self.sharing)

    def _receive_in_place(self, size: int) -> None:
        """Give the large frame whose header is at the read position memory of its own
        (see the module docstring), with the part of it buffered already."""
        import mmap  # only for large frames (a worker imports this module at start-up)

        # Private and anonymous: zero pages, taken as written; unmapped with the last
        # view of it (the message's buffers are views).
        try:
            memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        except OSError as exc:  # more than the system will commit to
            raise ProtocolError(f"no memory for a frame of {size} bytes: {exc}") from exc
        huge_pages = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux
        if huge_pages is not None:
            # 2 MiB pages where the kernel has them to spare: a 64 MiB body then costs
            # 32 page faults instead of 16 384, and is read in about half the time.
            memory.madvise(huge_pages)
        start = self._pos + HEADER.size
        self._large = memory
        self._large_view = memoryview(memory)
        self._large_got = 0
        sealer = self.sealer
        self._large_check = sealer.opening(size - MAC_SIZE) if sealer is not None else None
        with memoryview(self._buf) as buf, buf[start:] as head:
            self._large_view[: len(head)] = head
            have = len(head)
        self._buf.clear()  # nothing follows the part of the frame received so far
        self._pos = 0
        self.received_into(have)

    def _large_frame(self) -> Message | Sentinel:
        """The large frame received in place, once all of it arrived (its MAC checked)."""
        view = self._large_view
        assert view is not None
        if self._large_got < len(view):
            return NEED_DATA
        check = self._large_check
        self._large = self._large_view = self._large_check = None
        self._large_got = 0
        end = len(view)
        if check is not None:
            assert self.sealer is not None
            end -= MAC_SIZE
            self.sealer.finish_opening(check, view[end:])
        return decode_body(view[:end], self.sharing)

    def _compact(self) -> None:
        """Drop the consumed bytes (all of them, or a large prefix) from the buffer."""
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 20:
            del self._buf[: self._pos]
            self._pos = 0

    def _check_hello(self, msg: Message) -> None:
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected Hello first, got {type(msg).__name__}")
        mine = versions()
        theirs = (msg.offload_version, msg.protocol_version, msg.python_version)
        if mine != theirs:
            raise VersionMismatch(
                f"version mismatch: this side ({self.role}) runs offload {mine[0]}, "
                f"protocol {mine[1]}, Python {mine[2]}; the {msg.role} {msg.name!r} "
                f"(pid {msg.pid}) runs offload {theirs[0]}, protocol {theirs[1]}, "
                f"Python {theirs[2]}",
                local=mine,
                remote=theirs,
            )
        self.peer = msg

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        frame = self._large_got + HEADER.size if self._large is not None else 0
        return len(self._buf) - self._pos + frame
