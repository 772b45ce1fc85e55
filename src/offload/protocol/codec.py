"""The binary encoding of offload's messages: frames, and the bytes of each message.

Theory of operation
-------------------
A frame is ``length:u64 (network order) | body``, and a message's body is::

    tag:u8 | fixed fields (one struct, network order) | variable fields | buffers

* numeric fields (``int``: u64, ``float``: f64) are packed together by one precompiled
  ``struct`` per message type, in the order of the class's ``FIELDS``;
* ``str`` and ``bytes`` fields follow in declaration order, each as ``len:u32 | data``
  (``str`` as UTF-8 with ``surrogateescape``);
* a message with a ``buffers`` field ends with ``count:u32`` then ``len:u64 | data`` for
  each out-of-band pickle buffer (pickle protocol 5), so large ``bytes``/NumPy payloads
  are never copied into the pickle stream.
* on a connection with shared memory (a local worker's, see
  :mod:`offload.transport.shared`), a large buffer is ``len | 1 << 63 : u64`` then
  ``segment:u64``: its bytes are in the sender's shared-memory segment, and a segment
  reference with bit 63 set means the segment's descriptor comes with the frame. The
  encoder and decoder get the object that does that (:class:`Sharing`); nothing here
  touches memory maps or descriptors, and the encoder returns the descriptors to send as
  ints in front of the frame's chunks.

Encoding returns a *list* of byte chunks so the transport can hand them to
``sendmsg``/``writev`` without joining large buffers. Decoding works on one contiguous
frame body and returns ``memoryview`` slices of it for buffers (no copy).

Two paths produce and accept exactly the same bytes:

* the generic one (:func:`encode_generic`, :func:`decode_generic`), driven by a layout
  computed once per message type from its ``FIELDS``: the reference;
* hand-written fast codecs for the shape of almost every message on the wire, a Call or
  Result with no out-of-band buffers and small fields (:func:`frame_common`,
  :func:`frame_call`, :func:`decode_common`). They build the whole frame in one
  ``join`` and decode in place; anything else makes them answer None and the generic
  path decides. The tests hold them to the reference byte for byte.

Nothing here unpickles. This module imports nothing of offload's but the errors.
"""

from __future__ import annotations

import _struct as struct  # not struct.py, which only re-exports it (a worker imports this)

from offload.errors import ProtocolError
from offload.protocol.messages import (
    MESSAGE_TYPES,
    Call,
    Message,
    Result,
    _new_call,
    _new_result,
)

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from typing import Any, Protocol, TypeAlias

    from offload.protocol.messages import Buffers, CallFields

    Chunks: TypeAlias = list[bytes | bytearray | memoryview]  # what a frame is sent as

    class Sharing(Protocol):
        """What moves large buffers through shared memory (offload.transport.shared)."""

        threshold: int

        def export(self, view: memoryview) -> tuple[int, int] | None:
            """Copy ``view`` into a segment: (segment reference, descriptor or -1), or
            None to send it in the frame."""

        def attach(self, ref: int, size: int) -> Any:
            """The buffer of ``size`` bytes in the segment ``ref`` names."""


FRAME_HEADER = struct.Struct("!Q")  # a frame: its body's length, then the body
_NUMERIC = {"int": "Q", "float": "d"}
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_SMALL = 4096  # below this, a str/bytes field or buffer is copied into the head chunk
SHARED = 1 << 63  # a buffer length with this bit: its bytes are in shared memory


# -- the generic codec: one precompiled layout per message type ---------------------------


class _Layout:
    """How one message type is laid out on the wire (computed once from its FIELDS)."""

    __slots__ = ("cls", "fixed", "fixed_names", "has_buffers", "var_is_str", "var_names")

    def __init__(self, cls: type[Message]) -> None:
        fmt = "!B"
        fixed_names: list[str] = []
        var_names: list[str] = []
        var_is_str: list[bool] = []
        has_buffers = False
        for name, kind in cls.FIELDS:
            if kind == "buffers":
                has_buffers = True
            elif kind in _NUMERIC:
                fmt += _NUMERIC[kind]
                fixed_names.append(name)
            else:
                var_names.append(name)
                var_is_str.append(kind == "str")
        self.cls = cls
        self.fixed = struct.Struct(fmt)  # tag + numeric fields
        self.fixed_names = tuple(fixed_names)
        self.var_names = tuple(var_names)  # str / bytes fields
        self.var_is_str = tuple(var_is_str)
        self.has_buffers = has_buffers


_BY_TAG: dict[int, _Layout] = {cls.TAG: _Layout(cls) for cls in MESSAGE_TYPES}
_BY_CLASS: dict[type[Message], _Layout] = {lay.cls: lay for lay in _BY_TAG.values()}


def encode_generic(msg: Message, sharing: Sharing | None = None) -> Chunks:
    """:func:`encode_body` without the fast paths (the reference they are tested against).

    With ``sharing``, buffers of at least ``sharing.threshold`` bytes go through shared
    memory, and the descriptors to send with the frame come first in the list, as ints.

    Raises:
        OSError: ``sharing`` could not make a segment.
    """
    lay = _BY_CLASS[type(msg)]
    head = bytearray(lay.fixed.pack(lay.cls.TAG, *[getattr(msg, n) for n in lay.fixed_names]))
    chunks: Chunks = [head]
    for name, is_str in zip(lay.var_names, lay.var_is_str, strict=True):
        value = getattr(msg, name)
        data = value.encode("utf-8", "surrogateescape") if is_str else value
        head += _U32.pack(len(data))
        if len(data) < _SMALL:
            head += data
        else:
            chunks.append(data)
            head = bytearray()
            chunks.append(head)
    fds: list[int] = []
    if lay.has_buffers:
        buffers: Buffers = getattr(msg, "buffers", ())
        head += _U32.pack(len(buffers))
        for buf in buffers:
            view = memoryview(buf).cast("B")
            exported = None
            if sharing is not None and view.nbytes >= sharing.threshold:
                exported = sharing.export(view)
            if exported is not None:
                ref, fd = exported
                if fd >= 0:
                    fds.append(fd)
                head += _U64.pack(view.nbytes | SHARED)
                head += _U64.pack(ref)
                continue
            head += _U64.pack(view.nbytes)
            if view.nbytes < _SMALL:
                head += view
            else:
                chunks.append(view)
                head = bytearray()
                chunks.append(head)
    if fds:
        return [*fds, *[c for c in chunks if len(c)]]  # type: ignore[list-item]
    return [c for c in chunks if len(c)]


def decode_generic(body: memoryview, sharing: Sharing | None = None) -> Message:
    """:func:`decode_body` without the fast paths (the reference they are tested against).

    Raises:
        ProtocolError: an empty body, an unknown tag, a field or buffer that runs past
            the end, an impossible buffer count, stray bytes after the message, or a
            buffer in shared memory on a connection without it (or that ``sharing``
            cannot attach).
    """
    if len(body) < 1:
        raise ProtocolError("empty frame")
    tag = body[0]
    lay = _BY_TAG.get(tag)
    if lay is None:
        raise ProtocolError(f"unknown message type {body[0]}")
    try:
        values = dict(zip(("tag", *lay.fixed_names), lay.fixed.unpack_from(body, 0), strict=True))
        pos = lay.fixed.size
        end = len(body)
        for name, is_str in zip(lay.var_names, lay.var_is_str, strict=True):
            (n,) = _U32.unpack_from(body, pos)
            pos += 4
            if pos + n > end:
                raise ProtocolError(f"{lay.cls.__name__}.{name} runs past the end of the frame")
            raw = body[pos : pos + n]
            pos += n
            values[name] = str(raw, "utf-8", "surrogateescape") if is_str else bytes(raw)
        if lay.has_buffers:
            (count,) = _U32.unpack_from(body, pos)
            pos += 4
            if count > end - pos:  # each buffer needs at least its 8-byte length
                raise ProtocolError(f"{lay.cls.__name__}: impossible buffer count {count}")
            buffers = []
            for _ in range(count):
                (n,) = _U64.unpack_from(body, pos)
                pos += 8
                if n & SHARED:
                    if sharing is None:
                        raise ProtocolError(f"{lay.cls.__name__}: a buffer in shared memory")
                    (ref,) = _U64.unpack_from(body, pos)
                    pos += 8
                    buffers.append(sharing.attach(ref, n & ~SHARED))
                    continue
                if pos + n > end:
                    raise ProtocolError(f"{lay.cls.__name__}: a buffer runs past the frame")
                buffers.append(body[pos : pos + n])
                pos += n
            values["buffers"] = tuple(buffers)
    except struct.error as exc:  # type: ignore[attr-defined]  # typeshed: only struct's
        raise ProtocolError(f"truncated {lay.cls.__name__} message") from exc
    if pos != end:
        raise ProtocolError(f"{end - pos} stray bytes after a {lay.cls.__name__} message")
    del values["tag"]
    return lay.cls(**values)


def message_size(msg: Message) -> int:
    """The encoded body size, without encoding (for max_message_size checks)."""
    lay = _BY_CLASS[type(msg)]
    size = lay.fixed.size
    for name, is_str in zip(lay.var_names, lay.var_is_str, strict=True):
        value = getattr(msg, name)
        size += 4 + (len(value.encode("utf-8", "surrogateescape")) if is_str else len(value))
    if lay.has_buffers:
        buffers: Buffers = getattr(msg, "buffers", ())
        size += 4 + sum(8 + memoryview(b).nbytes for b in buffers)
    return size


# -- the fast codecs: common calls and results ---------------------------------------------
# Calls and results are most of the traffic: their common shape (no out-of-band buffers,
# small fields) has hand-written codecs, which produce and accept exactly the bytes of
# the generic layout above.

_CALL_FIXED = struct.Struct("!BQQd")  # tag, call_id, kind, timeout
_RESULT_FIXED = struct.Struct("!BQQd")  # tag, call_id, status, elapsed
_NO_TEXT_PAYLOAD = struct.Struct("!IIII")  # empty type_name, message, traceback; payload size
_NO_BUFFERS = bytes(4)

# Whole frames (length header and body) of the common calls and results, built in one
# join: what an unsealed connection sends for almost every message.
_CALL_FRAME = struct.Struct("!QBQQdI")  # length, tag, call_id, kind, timeout, len(target)
_RESULT_FRAME = struct.Struct("!QBQQdIIII")  # ... status, elapsed, 3 empty texts, len(payload)
_CALL_BODY_FIXED = _CALL_FRAME.size - FRAME_HEADER.size + 12  # + function, payload, buffers
_RESULT_BODY_FIXED = _RESULT_FRAME.size - FRAME_HEADER.size + 4  # + buffer count


def frame_call(fields: CallFields) -> bytes | None:
    """The whole frame of the Call with these fields (in wire order), without making
    the Call; None if it has buffers or a field too large for this path."""
    call_id, kind, timeout, target, function, payload, buffers = fields
    if buffers or len(payload) >= _SMALL or len(function) >= _SMALL:
        return None
    name = target.encode("utf-8", "surrogateescape")
    if len(name) >= _SMALL:
        return None
    return b"".join(
        (
            _CALL_FRAME.pack(
                _CALL_BODY_FIXED + len(name) + len(function) + len(payload),
                Call.TAG,
                call_id,
                kind,
                timeout,
                len(name),
            ),
            name,
            _U32.pack(len(function)),
            function,
            _U32.pack(len(payload)),
            payload,
            _NO_BUFFERS,
        )
    )


def frame_common(msg: Message) -> bytes | None:
    """The whole frame of a Call or Result of the common shape (no buffers, small
    fields), or None: then frame :func:`encode_body`'s chunks."""
    kind = type(msg)
    if kind is Call:
        call: Call = msg  # type: ignore[assignment]
        return frame_call(
            (
                call.call_id,
                call.kind,
                call.timeout,
                call.target,
                call.function,
                call.payload,
                call.buffers,
            )
        )
    if kind is Result:
        result: Result = msg  # type: ignore[assignment]
        payload = result.payload
        if (
            result.buffers
            or result.type_name
            or result.message
            or result.traceback
            or len(payload) >= _SMALL
        ):
            return None
        return b"".join(
            (
                _RESULT_FRAME.pack(
                    _RESULT_BODY_FIXED + len(payload),
                    Result.TAG,
                    result.call_id,
                    result.status,
                    result.elapsed,
                    0,
                    0,
                    0,
                    len(payload),
                ),
                payload,
                _NO_BUFFERS,
            )
        )
    return None


def _decode_call(buf: memoryview, start: int, end: int) -> Call | None:
    """The Call in ``buf[start:end]`` if it has no buffers, or None to let the generic
    decoder judge the frame."""
    pos = start + _CALL_FIXED.size
    if end < pos + 16:
        return None
    _, call_id, kind, timeout = _CALL_FIXED.unpack_from(buf, start)
    (n,) = _U32.unpack_from(buf, pos)
    pos += 4
    if pos + n + 12 > end:
        return None
    target = str(buf[pos : pos + n], "utf-8", "surrogateescape")
    pos += n
    (n,) = _U32.unpack_from(buf, pos)
    pos += 4
    if pos + n + 8 > end:
        return None
    function = bytes(buf[pos : pos + n]) if n else b""
    pos += n
    (n,) = _U32.unpack_from(buf, pos)
    pos += 4
    if pos + n + 4 != end or buf[pos + n : end] != _NO_BUFFERS:
        return None
    return _new_call(call_id, kind, timeout, target, function, bytes(buf[pos : pos + n]), ())


def _decode_result(buf: memoryview, start: int, end: int) -> Result | None:
    """The Result in ``buf[start:end]`` if it has no text and no buffers, or None to
    let the generic decoder judge the frame."""
    pos = start + _RESULT_FIXED.size + _NO_TEXT_PAYLOAD.size
    if end < pos + 4:
        return None
    _, call_id, status, elapsed = _RESULT_FIXED.unpack_from(buf, start)
    a, b, c, n = _NO_TEXT_PAYLOAD.unpack_from(buf, start + _RESULT_FIXED.size)
    if a or b or c or pos + n + 4 != end or buf[pos + n : end] != _NO_BUFFERS:
        return None
    return _new_result(call_id, status, elapsed, "", "", "", bytes(buf[pos : pos + n]), ())


def decode_common(body: memoryview, start: int = 0, end: int | None = None) -> Message | None:
    """Decode the frame body ``body[start:end]`` if it is a Call or Result of the common
    shape (no buffers); None otherwise, and then :func:`decode_body` decides. Keeps no
    reference to ``body``."""
    if end is None:
        end = len(body)
    if end <= start:
        return None
    tag = body[start]
    if tag == Result.TAG:
        return _decode_result(body, start, end)
    if tag == Call.TAG:
        return _decode_call(body, start, end)
    return None


# -- the entry points ------------------------------------------------------------------------


def encode_body(msg: Message) -> Chunks:
    """Encode a message into frame-body chunks (no frame header)."""
    whole = frame_common(msg)
    if whole is not None:  # the common shapes: their frame, without the length header
        return [memoryview(whole)[FRAME_HEADER.size :]]
    return encode_generic(msg)


def decode_body(body: memoryview, sharing: Sharing | None = None) -> Message:
    """Decode one frame body (``sharing``: see :func:`decode_generic`).

    Raises:
        ProtocolError: anything malformed (see :func:`decode_generic`).
    """
    if len(body) < 1:
        raise ProtocolError("empty frame")
    fast = decode_common(body)
    if fast is not None:
        return fast
    return decode_generic(body, sharing)
