"""The messages of the offload wire protocol, and their binary encoding.

Theory of operation
-------------------
A message is an immutable, slotted record. On the wire, its frame body is::

    tag:u8 | fixed fields (one struct, network order) | variable fields | buffers

* numeric fields (``u8``, ``u32``, ``u64``, ``f64``) are packed together by one
  precompiled ``struct`` per message type;
* ``str`` and ``bytes`` fields follow in declaration order, each as ``len:u32 | data``;
* a message with a ``buffers`` field ends with ``count:u32`` then ``len:u64 | data`` for
  each out-of-band pickle buffer (pickle protocol 5), so large ``bytes``/NumPy payloads
  are never copied into the pickle stream.

Encoding returns a *list* of byte chunks so the transport can hand them to
``sendmsg``/``writev`` without joining large buffers. Decoding works on one contiguous
frame body and returns ``memoryview`` slices of it for buffers (no copy).

Nothing here unpickles: payloads stay opaque ``bytes`` until the client or worker
decides it trusts the peer. This module imports nothing from offload but the errors.
"""

from __future__ import annotations

import struct

from offload.errors import ProtocolError

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeAlias

    Buffers: TypeAlias = tuple[bytes | bytearray | memoryview, ...]
    # A Call's fields in wire order: call_id, kind, timeout, target, function, payload,
    # buffers (a sender can frame a call from them without making the Call).
    CallFields: TypeAlias = tuple[int, int, float, str, bytes, bytes, Buffers]


PROTOCOL_VERSION = 2


# Result.status values.
OK = 0  # payload: the pickled return value
RAISED = 1  # payload: the pickled exception (may be empty); type_name/message/traceback set
FAILED = 2  # payload: a pickled ExecutionError decided by the peer (remote servers)
BAD_ARGUMENT = 3  # the call could not be unpickled in the worker; message says why
BAD_RESULT = 4  # the result could not be pickled in the worker; message says why
UNKNOWN_TASK = 5  # the worker has no task of that name; type_name carries the name

# Call.kind values.
BY_VALUE = 0  # payload: pickled (callable, args, kwargs); or, when ``function`` holds
#               the pickled callable (a reference by name), pickled (args, kwargs)
BY_NAME = 1  # target: a registered task name; payload: pickled (args, kwargs)


_set = object.__setattr__  # messages are immutable: their own __setattr__ refuses


class Message:
    """Base of every message: an immutable record with typed, slotted fields.

    (Plain classes rather than dataclasses: a worker imports this module at start-up,
    and dataclass creation costs milliseconds there.)
    """

    __slots__ = ()
    TAG: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()  # (name, kind) in wire order
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def _init(self, values: dict[str, Any]) -> None:
        for name, _ in self.FIELDS:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, n), getattr(other, n)) for n, _ in self.FIELDS)

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, n) for n, k in self.FIELDS if k != "buffers")))

    def __repr__(self) -> str:
        parts = []
        for name, kind in self.FIELDS:
            value = getattr(self, name)
            if kind in ("bytes", "buffers") and len(value) > 32:
                value = f"<{len(value)} {'bytes' if kind == 'bytes' else 'buffers'}>"
            parts.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):  # buffers: compare contents
        return len(a) == len(b) and all(bytes(x) == bytes(y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class Hello(Message):
    """First message of each side: who it is and which versions it speaks."""

    __slots__ = (
        "name",
        "offload_version",
        "pid",
        "protocol_version",
        "python_version",
        "role",
        "slots",
    )
    TAG = 1
    FIELDS = (
        ("role", "str"),  # "client", "worker" or "server"
        ("offload_version", "str"),
        ("protocol_version", "int"),
        ("python_version", "str"),  # "3.11"
        ("pid", "int"),
        ("name", "str"),
        ("slots", "int"),  # calls the peer runs at once; 0 for clients
    )
    __match_args__ = ("role",)
    role: str
    offload_version: str
    protocol_version: int
    python_version: str
    pid: int
    name: str
    slots: int

    def __init__(
        self,
        *,
        role: str,
        offload_version: str,
        protocol_version: int,
        python_version: str,
        pid: int,
        name: str,
        slots: int,
    ) -> None:
        self._init(locals())


class Call(Message):
    """Run a callable; the answer is a :class:`Result` with the same ``call_id``."""

    __slots__ = ("buffers", "call_id", "function", "kind", "payload", "target", "timeout")
    TAG = 2
    FIELDS = (
        ("call_id", "int"),
        ("kind", "int"),  # BY_VALUE or BY_NAME
        ("timeout", "float"),  # seconds, 0.0 for none (enforced by the process owner)
        ("target", "str"),  # the task name for BY_NAME; a description otherwise
        # BY_VALUE: the callable pickled on its own, when it travels by reference (a
        # module-level function): both sides keep it, so it is pickled and looked up
        # once, not per call. Empty: the callable is in the payload.
        ("function", "bytes"),
        ("payload", "bytes"),
        ("buffers", "buffers"),
    )
    __match_args__ = ("call_id",)
    call_id: int
    kind: int
    timeout: float
    target: str
    function: bytes
    payload: bytes
    buffers: Buffers

    def __init__(
        self,
        *,
        call_id: int,
        kind: int,
        timeout: float,
        target: str,
        payload: bytes,
        buffers: Buffers = (),
        function: bytes = b"",
    ) -> None:
        _set(self, "call_id", call_id)  # field by field: this is on every call's path
        _set(self, "kind", kind)
        _set(self, "timeout", timeout)
        _set(self, "target", target)
        _set(self, "function", function)
        _set(self, "payload", payload)
        _set(self, "buffers", buffers)


class Result(Message):
    """The outcome of a call; ``elapsed`` is how long it ran in the worker (seconds)."""

    __slots__ = (
        "buffers",
        "call_id",
        "elapsed",
        "message",
        "payload",
        "status",
        "traceback",
        "type_name",
    )
    TAG = 3
    FIELDS = (
        ("call_id", "int"),
        ("status", "int"),
        ("elapsed", "float"),
        ("type_name", "str"),
        ("message", "str"),
        ("traceback", "str"),
        ("payload", "bytes"),
        ("buffers", "buffers"),
    )
    __match_args__ = ("call_id",)
    call_id: int
    status: int
    elapsed: float
    type_name: str
    message: str
    traceback: str
    payload: bytes
    buffers: Buffers

    def __init__(
        self,
        *,
        call_id: int,
        status: int,
        elapsed: float = 0.0,
        type_name: str = "",
        message: str = "",
        traceback: str = "",
        payload: bytes = b"",
        buffers: Buffers = (),
    ) -> None:
        _set(self, "call_id", call_id)
        _set(self, "status", status)
        _set(self, "elapsed", elapsed)
        _set(self, "type_name", type_name)
        _set(self, "message", message)
        _set(self, "traceback", traceback)
        _set(self, "payload", payload)
        _set(self, "buffers", buffers)


class Progress(Message):
    """A value a running task passed to ``offload.report``."""

    __slots__ = ("buffers", "call_id", "payload")
    TAG = 4
    FIELDS = (("call_id", "int"), ("payload", "bytes"), ("buffers", "buffers"))
    __match_args__ = ("call_id",)
    call_id: int
    payload: bytes
    buffers: Buffers

    def __init__(self, *, call_id: int, payload: bytes, buffers: Buffers = ()) -> None:
        self._init(locals())


class Cancel(Message):
    """Drop a call that has not started."""

    __slots__ = ("call_id",)
    TAG = 5
    FIELDS = (("call_id", "int"),)
    __match_args__ = ("call_id",)
    call_id: int

    def __init__(self, *, call_id: int) -> None:
        self._init(locals())


class Kill(Message):
    """Kill the process running a call (remote servers own their processes)."""

    __slots__ = ("call_id",)
    TAG = 6
    FIELDS = (("call_id", "int"),)
    __match_args__ = ("call_id",)
    call_id: int

    def __init__(self, *, call_id: int) -> None:
        self._init(locals())


class Ping(Message):
    """Heartbeat request; answered by :class:`Pong` with the same ``seq``."""

    __slots__ = ("seq",)
    TAG = 7
    FIELDS = (("seq", "int"),)
    __match_args__ = ("seq",)
    seq: int

    def __init__(self, *, seq: int) -> None:
        self._init(locals())


class Pong(Message):
    """Heartbeat answer."""

    __slots__ = ("seq",)
    TAG = 8
    FIELDS = (("seq", "int"),)
    __match_args__ = ("seq",)
    seq: int

    def __init__(self, *, seq: int) -> None:
        self._init(locals())


class Shutdown(Message):
    """Finish the calls already sent, then exit."""

    __slots__ = ()
    TAG = 9

    def __init__(self) -> None:
        pass


class Goodbye(Message):
    """The sender is closing the connection on purpose; ``reason`` says why."""

    __slots__ = ("reason",)
    TAG = 10
    FIELDS = (("reason", "str"),)
    __match_args__ = ("reason",)
    reason: str

    def __init__(self, *, reason: str = "") -> None:
        self._init(locals())


class ChannelData(Message):
    """One item (or raw blob) on a channel."""

    __slots__ = ("buffers", "channel_id", "payload", "raw")
    TAG = 11
    FIELDS = (
        ("channel_id", "int"),
        ("raw", "int"),  # 1 when payload is raw bytes (send_bytes), 0 for a pickle
        ("payload", "bytes"),
        ("buffers", "buffers"),
    )
    __match_args__ = ("channel_id",)
    channel_id: int
    raw: int
    payload: bytes
    buffers: Buffers

    def __init__(self, *, channel_id: int, raw: int, payload: bytes, buffers: Buffers = ()) -> None:
        self._init(locals())


class ChannelClose(Message):
    """A sender of that channel is done."""

    __slots__ = ("channel_id",)
    TAG = 12
    FIELDS = (("channel_id", "int"),)
    __match_args__ = ("channel_id",)
    channel_id: int

    def __init__(self, *, channel_id: int) -> None:
        self._init(locals())


class ChannelCredit(Message):
    """The receiver has room for ``count`` more items (back-pressure)."""

    __slots__ = ("channel_id", "count")
    TAG = 13
    FIELDS = (("channel_id", "int"), ("count", "int"))
    __match_args__ = ("channel_id",)
    channel_id: int
    count: int

    def __init__(self, *, channel_id: int, count: int) -> None:
        self._init(locals())


class Failure(Message):
    """The sender found a protocol error and is closing the connection."""

    __slots__ = ("message",)
    TAG = 14
    FIELDS = (("message", "str"),)
    __match_args__ = ("message",)
    message: str

    def __init__(self, *, message: str) -> None:
        self._init(locals())


class StatusRequest(Message):
    """Ask a server for its :class:`Status` (operators' ``offload status``)."""

    __slots__ = ()
    TAG = 15

    def __init__(self) -> None:
        pass


class Status(Message):
    """A server's state as JSON: version, slots, busy, calls served, uptime."""

    __slots__ = ("json",)
    TAG = 16
    FIELDS = (("json", "str"),)
    __match_args__ = ("json",)
    json: str

    def __init__(self, *, json: str) -> None:
        self._init(locals())


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    Call,
    Result,
    Progress,
    Cancel,
    Kill,
    Ping,
    Pong,
    Shutdown,
    Goodbye,
    ChannelData,
    ChannelClose,
    ChannelCredit,
    Failure,
    StatusRequest,
    Status,
)

# ---------------------------------------------------------------------------------------
# Codec: one precompiled layout per message type.

_NUMERIC = {"int": "Q", "float": "d"}
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class _Layout:
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


# Calls and results are most of the traffic: they have hand-written codecs for their
# common shape (no out-of-band buffers, small payload), which produce and accept exactly
# the bytes of the generic layout above.
_SMALL = 4096  # below this, a str/bytes field is copied into the head chunk
_CALL_FIXED = struct.Struct("!BQQd")  # tag, call_id, kind, timeout
_RESULT_FIXED = struct.Struct("!BQQd")  # tag, call_id, status, elapsed
_NO_TEXT_PAYLOAD = struct.Struct("!IIII")  # empty type_name, message, traceback; payload size
_NO_BUFFERS = bytes(4)


# Whole frames (length header and body) of the common calls and results, built in one
# join: what an unsealed connection sends for almost every message.
FRAME_HEADER = struct.Struct("!Q")  # a frame: its body's length, then the body
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
    msg = Call.__new__(Call)
    _set(msg, "call_id", call_id)
    _set(msg, "kind", kind)
    _set(msg, "timeout", timeout)
    _set(msg, "target", target)
    _set(msg, "function", function)
    _set(msg, "payload", bytes(buf[pos : pos + n]))
    _set(msg, "buffers", ())
    return msg


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
    msg = Result.__new__(Result)
    _set(msg, "call_id", call_id)
    _set(msg, "status", status)
    _set(msg, "elapsed", elapsed)
    _set(msg, "type_name", "")
    _set(msg, "message", "")
    _set(msg, "traceback", "")
    _set(msg, "payload", bytes(buf[pos : pos + n]))
    _set(msg, "buffers", ())
    return msg


def with_call_id(msg: Result, call_id: int) -> Result:
    """A copy of ``msg`` under another call id (a server relaying a worker's result to
    its client), made without the keyword checks of the constructor."""
    copy = Result.__new__(Result)
    _set(copy, "call_id", call_id)
    _set(copy, "status", msg.status)
    _set(copy, "elapsed", msg.elapsed)
    _set(copy, "type_name", msg.type_name)
    _set(copy, "message", msg.message)
    _set(copy, "traceback", msg.traceback)
    _set(copy, "payload", msg.payload)
    _set(copy, "buffers", msg.buffers)
    return copy


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


def encode_body(msg: Message) -> list[bytes | bytearray | memoryview]:
    """Encode a message into frame-body chunks (no frame header)."""
    whole = frame_common(msg)
    if whole is not None:  # the common shapes: their frame, without the length header
        return [memoryview(whole)[FRAME_HEADER.size :]]
    return encode_generic(msg)


def encode_generic(msg: Message) -> list[bytes | bytearray | memoryview]:
    """:func:`encode_body` without the fast paths (the reference they are tested against)."""
    lay = _BY_CLASS[type(msg)]
    head = bytearray(lay.fixed.pack(lay.cls.TAG, *[getattr(msg, n) for n in lay.fixed_names]))
    chunks: list[bytes | bytearray | memoryview] = [head]
    for name, is_str in zip(lay.var_names, lay.var_is_str, strict=True):
        value = getattr(msg, name)
        data = value.encode("utf-8", "surrogateescape") if is_str else value
        head += _U32.pack(len(data))
        if len(data) < 4096:
            head += data
        else:
            chunks.append(data)
            head = bytearray()
            chunks.append(head)
    if lay.has_buffers:
        buffers: Buffers = getattr(msg, "buffers", ())
        head += _U32.pack(len(buffers))
        for buf in buffers:
            view = memoryview(buf).cast("B")
            head += _U64.pack(view.nbytes)
            if view.nbytes < 4096:
                head += view
            else:
                chunks.append(view)
                head = bytearray()
                chunks.append(head)
    return [c for c in chunks if len(c)]


def decode_body(body: memoryview) -> Message:
    """Decode one frame body. Raises ProtocolError on anything malformed."""
    if len(body) < 1:
        raise ProtocolError("empty frame")
    fast = decode_common(body)
    if fast is not None:
        return fast
    return decode_generic(body)


def decode_generic(body: memoryview) -> Message:
    """:func:`decode_body` without the fast paths (the reference they are tested against)."""
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
                if pos + n > end:
                    raise ProtocolError(f"{lay.cls.__name__}: a buffer runs past the frame")
                buffers.append(body[pos : pos + n])
                pos += n
            values["buffers"] = tuple(buffers)
    except struct.error as exc:
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
