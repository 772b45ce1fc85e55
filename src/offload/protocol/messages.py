"""The messages of the offload wire protocol: immutable records, one class per tag.

Theory of operation
-------------------
The protocol's vocabulary is a closed, tagged union: every message is an instance of
exactly one class of :data:`MESSAGE_TYPES`, and its ``TAG`` is the byte that opens its
frame body (:mod:`offload.protocol.codec` turns messages into bytes and back). Receivers
dispatch on the class, with ``match``::

    match msg:
        case Result(call_id):  # __match_args__: the field that routes the message
            ...
        case Progress(call_id):
            ...

===  ===============  ==================  ====================================================
tag  message          sent by             meaning
===  ===============  ==================  ====================================================
1    Hello            both, first         who the sender is; which versions it speaks
2    Call             client              run a callable (``kind``: BY_VALUE, BY_NAME,
                                          INIT_KIND)
3    Result           worker              how a call ended (``status``: OK, RAISED, ...)
4    Progress         worker              a value a running task reported
5    Cancel           client              drop a call that has not started
6    Kill             client              kill the process running a call (remote servers)
7/8  Ping / Pong      both                heartbeat
9    Shutdown         client              finish the calls already sent, then exit
10   Goodbye          both                closing on purpose (``reason``)
11   ChannelData      both                items on a channel, for or from a call's end
12   ChannelClose     both                a call's sender is done / the channel ended
13   ChannelCredit    both                room for more items (back-pressure)
14   Failure          both                a protocol error: closing
15   StatusRequest    operator            ask a server for its :class:`Status`
16   Status           server              the server's state, as JSON
17   Output           server              bytes a relayed call's process wrote (``stream``:
                                          STDOUT or STDERR)
===  ===============  ==================  ====================================================

A message is frozen and slotted: its constructor sets every field once (keyword
arguments only), and ``msg.field = ...``, ``del msg.field`` or a new attribute raise
:class:`AttributeError`. To change a field, make a new message (:meth:`Result.with_call_id`).
``FIELDS`` lists each field's name and wire kind (``int``: u64, ``float``: f64, ``str``,
``bytes``, ``buffers``: out-of-band pickle buffers) in wire order.

Payloads are opaque ``bytes``: nothing here unpickles, so a message can be decoded
before the receiver decides it trusts the peer. This module imports nothing of offload's.

(Plain classes rather than ``@dataclass(frozen=True, slots=True)``: a worker imports this
module at start-up, and importing :mod:`dataclasses` (which imports :mod:`inspect`) would
add more than the rest of the worker's imports cost; the classes behave as frozen,
slotted, keyword-only dataclasses would.)
"""

from __future__ import annotations

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeAlias

    Buffers: TypeAlias = tuple[bytes | bytearray | memoryview, ...]
    # A Call's fields in wire order: call_id, kind, timeout, target, function, payload,
    # buffers (a sender can frame a call from them without making the Call).
    CallFields: TypeAlias = tuple[int, int, float, str, bytes, bytes, Buffers]


PROTOCOL_VERSION = 3  # 3: Output (a peer of version 2 would call it a broken protocol)


# Result.status values.
OK = 0  # payload: the pickled return value
RAISED = 1  # payload: the pickled exception (may be empty); type_name/message/traceback set
FAILED = 2  # payload: a pickled ExecutionError decided by the peer (remote servers)
BAD_ARGUMENT = 3  # the call could not be unpickled in the worker; message says why
BAD_RESULT = 4  # the result could not be pickled in the worker; message says why
UNKNOWN_TASK = 5  # the worker has no task of that name; type_name carries the name
SKIPPED = 6  # the call was cancelled before it started: it never ran (the answer to Cancel)

# Call.kind values.
BY_VALUE = 0  # payload: pickled (callable, args, kwargs); or, when ``function`` holds
#               the pickled callable (a reference by name), pickled (args, kwargs)
BY_NAME = 1  # target: a registered task name; payload: pickled (args, kwargs)
INIT_KIND = 2  # the worker's initializer, sent as call 0 before any user call;
#                payload as for BY_VALUE


# Fills one field of a message that is being made: only a message's own ``__init__``
# and _new_call/_new_result, each on the instance it has just created, ever call it
# (the classes' own __setattr__ refuses every assignment).
_fill = object.__setattr__
_new = object.__new__


class Message:
    """Base of every message: a frozen record with typed, slotted fields.

    Subclasses declare ``TAG`` (their wire tag), ``FIELDS`` (``(name, kind)`` in wire
    order) and a keyword-only constructor that sets each field once.
    """

    __slots__ = ()
    TAG: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()  # (name, kind) in wire order
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: make a new one")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: make a new one")

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

    def __reduce__(self) -> tuple[Any, ...]:
        # copy and pickle make a new message through its constructor (the default
        # protocol would set the slots of an existing one, which __setattr__ refuses).
        return (_remake, (type(self), tuple(getattr(self, n) for n, _ in self.FIELDS)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):  # buffers: compare contents
        return len(a) == len(b) and all(bytes(x) == bytes(y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _remake(cls: type[Message], values: tuple[Any, ...]) -> Message:
    """``cls`` made from its field values in wire order (for copy and pickle)."""
    return cls(**{name: value for (name, _), value in zip(cls.FIELDS, values, strict=True)})


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
        _fill(self, "role", role)
        _fill(self, "offload_version", offload_version)
        _fill(self, "protocol_version", protocol_version)
        _fill(self, "python_version", python_version)
        _fill(self, "pid", pid)
        _fill(self, "name", name)
        _fill(self, "slots", slots)


class Call(Message):
    """Run a callable; the answer is a :class:`Result` with the same ``call_id``."""

    __slots__ = ("buffers", "call_id", "function", "kind", "payload", "target", "timeout")
    TAG = 2
    FIELDS = (
        ("call_id", "int"),
        ("kind", "int"),  # BY_VALUE, BY_NAME or INIT_KIND
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
        _fill(self, "call_id", call_id)
        _fill(self, "kind", kind)
        _fill(self, "timeout", timeout)
        _fill(self, "target", target)
        _fill(self, "function", function)
        _fill(self, "payload", payload)
        _fill(self, "buffers", buffers)


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
        _fill(self, "call_id", call_id)
        _fill(self, "status", status)
        _fill(self, "elapsed", elapsed)
        _fill(self, "type_name", type_name)
        _fill(self, "message", message)
        _fill(self, "traceback", traceback)
        _fill(self, "payload", payload)
        _fill(self, "buffers", buffers)

    def with_call_id(self, call_id: int) -> Result:
        """This result under another call id (a server relaying a worker's result to
        its client, who numbered the call its own way)."""
        return _new_result(
            call_id,
            self.status,
            self.elapsed,
            self.type_name,
            self.message,
            self.traceback,
            self.payload,
            self.buffers,
        )


def _new_call(  # noqa: PLR0917 - positional: no keyword parsing per call
    call_id: int,
    kind: int,
    timeout: float,
    target: str,
    function: bytes,
    payload: bytes,
    buffers: Buffers,
) -> Call:
    """A new :class:`Call` from all its fields, positionally in wire order.

    The same Call as ``Call(call_id=..., ...)``, without parsing keywords: the codec's
    fast decoder and :meth:`Connection.send_call` make one per call, and keyword parsing
    would cost them about a tenth of a frame's encoding and decoding. Like a
    constructor, it fills the fields of the Call it has just created, never another.
    """
    msg = _new(Call)
    _fill(msg, "call_id", call_id)
    _fill(msg, "kind", kind)
    _fill(msg, "timeout", timeout)
    _fill(msg, "target", target)
    _fill(msg, "function", function)
    _fill(msg, "payload", payload)
    _fill(msg, "buffers", buffers)
    return msg


def _new_result(  # noqa: PLR0917 - positional: no keyword parsing per call
    call_id: int,
    status: int,
    elapsed: float,
    type_name: str,
    message: str,
    traceback: str,
    payload: bytes,
    buffers: Buffers,
) -> Result:
    """A new :class:`Result` from all its fields, positionally in wire order (see
    :func:`_new_call`: the codec's fast decoder and :meth:`Result.with_call_id` use it).
    """
    msg = _new(Result)
    _fill(msg, "call_id", call_id)
    _fill(msg, "status", status)
    _fill(msg, "elapsed", elapsed)
    _fill(msg, "type_name", type_name)
    _fill(msg, "message", message)
    _fill(msg, "traceback", traceback)
    _fill(msg, "payload", payload)
    _fill(msg, "buffers", buffers)
    return msg


# with_call_id(result, call_id): Result.with_call_id as a function, for relays.
with_call_id = Result.with_call_id


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
        _fill(self, "call_id", call_id)
        _fill(self, "payload", payload)
        _fill(self, "buffers", buffers)


class Cancel(Message):
    """Drop a call that has not started. The worker answers every call it drops with a
    Result of status SKIPPED, in the call's place; a call that had started runs on and
    is answered as usual (so the client always learns which it was)."""

    __slots__ = ("call_id",)
    TAG = 5
    FIELDS = (("call_id", "int"),)
    __match_args__ = ("call_id",)
    call_id: int

    def __init__(self, *, call_id: int) -> None:
        _fill(self, "call_id", call_id)


class Kill(Message):
    """Kill the process running a call (remote servers own their processes)."""

    __slots__ = ("call_id",)
    TAG = 6
    FIELDS = (("call_id", "int"),)
    __match_args__ = ("call_id",)
    call_id: int

    def __init__(self, *, call_id: int) -> None:
        _fill(self, "call_id", call_id)


class Ping(Message):
    """Heartbeat request; answered by :class:`Pong` with the same ``seq``."""

    __slots__ = ("seq",)
    TAG = 7
    FIELDS = (("seq", "int"),)
    __match_args__ = ("seq",)
    seq: int

    def __init__(self, *, seq: int) -> None:
        _fill(self, "seq", seq)


class Pong(Message):
    """Heartbeat answer."""

    __slots__ = ("seq",)
    TAG = 8
    FIELDS = (("seq", "int"),)
    __match_args__ = ("seq",)
    seq: int

    def __init__(self, *, seq: int) -> None:
        _fill(self, "seq", seq)


class Shutdown(Message):
    """Finish the calls already sent, then exit."""

    __slots__ = ()
    TAG = 9


class Goodbye(Message):
    """The sender is closing the connection on purpose; ``reason`` says why."""

    __slots__ = ("reason",)
    TAG = 10
    FIELDS = (("reason", "str"),)
    __match_args__ = ("reason",)
    reason: str

    def __init__(self, *, reason: str = "") -> None:
        _fill(self, "reason", reason)


# ChannelData.kind values.
ITEMS = 0  # payload: the pickle of a list of items' pickles (each in-band); no buffers
BLOBS = 1  # payload: the pickle of a list of blobs (send_bytes); no buffers
OBJECT = 2  # one item: payload is its pickle, buffers its out-of-band pickle buffers


class ChannelData(Message):
    """Items on a channel, for (or from) the end that call ``call_id`` holds.

    One frame carries a batch: ``kind`` says how (ITEMS, BLOBS, OBJECT). A batch is one
    pickled list, so that packing and unpacking a thousand items is one call into the C
    pickler each, not a loop here. A sender puts on the wire no more items than the
    receiving side granted with :class:`ChannelCredit`.
    """

    __slots__ = ("buffers", "call_id", "channel_id", "kind", "payload")
    TAG = 11
    FIELDS = (
        ("call_id", "int"),  # the call holding the end at the worker's side
        ("channel_id", "int"),  # the channel, numbered by the process that made it
        ("kind", "int"),  # ITEMS, BLOBS or OBJECT
        ("payload", "bytes"),
        ("buffers", "buffers"),
    )
    __match_args__ = ("call_id",)
    call_id: int
    channel_id: int
    kind: int
    payload: bytes
    buffers: Buffers

    def __init__(
        self,
        *,
        call_id: int,
        channel_id: int,
        kind: int,
        payload: bytes = b"",
        buffers: Buffers = (),
    ) -> None:
        _fill(self, "call_id", call_id)
        _fill(self, "channel_id", channel_id)
        _fill(self, "kind", kind)
        _fill(self, "payload", payload)
        _fill(self, "buffers", buffers)

    def with_call_id(self, call_id: int) -> ChannelData:
        """These items for the same end under another call id (a server relaying)."""
        return ChannelData(
            call_id=call_id,
            channel_id=self.channel_id,
            kind=self.kind,
            payload=self.payload,
            buffers=self.buffers,
        )


class ChannelClose(Message):
    """From a call's sender: that sender is done. To a call's receiver: the channel
    ended (every sender is done); ``error``, when not empty, is the pickled error its
    iteration raises after the items (a sender's call crashed)."""

    __slots__ = ("call_id", "channel_id", "error")
    TAG = 12
    FIELDS = (("call_id", "int"), ("channel_id", "int"), ("error", "bytes"))
    __match_args__ = ("call_id",)
    call_id: int
    channel_id: int
    error: bytes

    def __init__(self, *, call_id: int, channel_id: int, error: bytes = b"") -> None:
        _fill(self, "call_id", call_id)
        _fill(self, "channel_id", channel_id)
        _fill(self, "error", error)

    def with_call_id(self, call_id: int) -> ChannelClose:
        """This close for the same end under another call id (a server relaying)."""
        return ChannelClose(call_id=call_id, channel_id=self.channel_id, error=self.error)


class ChannelCredit(Message):
    """The receiving side has room for ``count`` more items from the end that call
    ``call_id`` holds (back-pressure)."""

    __slots__ = ("call_id", "channel_id", "count")
    TAG = 13
    FIELDS = (("call_id", "int"), ("channel_id", "int"), ("count", "int"))
    __match_args__ = ("call_id",)
    call_id: int
    channel_id: int
    count: int

    def __init__(self, *, call_id: int, channel_id: int, count: int) -> None:
        _fill(self, "call_id", call_id)
        _fill(self, "channel_id", channel_id)
        _fill(self, "count", count)

    def with_call_id(self, call_id: int) -> ChannelCredit:
        """This credit for the same end under another call id (a server relaying)."""
        return ChannelCredit(call_id=call_id, channel_id=self.channel_id, count=self.count)


class Failure(Message):
    """The sender found a protocol error and is closing the connection."""

    __slots__ = ("message",)
    TAG = 14
    FIELDS = (("message", "str"),)
    __match_args__ = ("message",)
    message: str

    def __init__(self, *, message: str) -> None:
        _fill(self, "message", message)


class StatusRequest(Message):
    """Ask a server for its :class:`Status` (operators' ``offload status``)."""

    __slots__ = ()
    TAG = 15


class Status(Message):
    """A server's state as JSON: version, slots, busy, calls served, uptime."""

    __slots__ = ("json",)
    TAG = 16
    FIELDS = (("json", "str"),)
    __match_args__ = ("json",)
    json: str

    def __init__(self, *, json: str) -> None:
        _fill(self, "json", json)


# Output.stream values: the file descriptor the bytes were written to.
STDOUT = 1
STDERR = 2


class Output(Message):
    """Bytes the process running a relayed call wrote while it ran (a worker server to
    its client): the client passes them on as its ``stdout``/``stderr`` options say.
    Sent before the call's :class:`Result`, in the order they were written per stream."""

    __slots__ = ("call_id", "data", "stream")
    TAG = 17
    FIELDS = (("call_id", "int"), ("stream", "int"), ("data", "bytes"))
    __match_args__ = ("call_id",)
    call_id: int
    stream: int
    data: bytes

    def __init__(self, *, call_id: int, stream: int, data: bytes) -> None:
        _fill(self, "call_id", call_id)
        _fill(self, "stream", stream)
        _fill(self, "data", data)


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
    Output,
)
