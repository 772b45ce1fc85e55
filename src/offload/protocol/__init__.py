"""The offload wire protocol, sans-IO: messages, their encoding, connections, handshake.

* :mod:`~offload.protocol.messages`: the messages, frozen records of a tagged union,
  and the wire constants (statuses, call kinds, the protocol version);
* :mod:`~offload.protocol.codec`: frames and the bytes of each message;
* :mod:`~offload.protocol.connection`: one end of a connection, bytes in and messages
  out, with the version handshake;
* :mod:`~offload.protocol.auth`: the token handshake and per-frame MACs (imported on
  its own: workers never need it).

This package imports nothing of offload's but :mod:`offload.errors` and the version.
"""

from offload.protocol.codec import decode_body, encode_body
from offload.protocol.connection import (
    CLOSED,
    DEFAULT_MAX_MESSAGE_SIZE,
    NEED_DATA,
    PYTHON_VERSION,
    Connection,
    Sentinel,
    State,
    versions,
)
from offload.protocol.messages import (
    BAD_ARGUMENT,
    BAD_RESULT,
    BY_NAME,
    BY_VALUE,
    FAILED,
    INIT_KIND,
    MESSAGE_TYPES,
    OK,
    PROTOCOL_VERSION,
    RAISED,
    SKIPPED,
    UNKNOWN_TASK,
    Call,
    Cancel,
    ChannelClose,
    ChannelCredit,
    ChannelData,
    Failure,
    Goodbye,
    Hello,
    Kill,
    Message,
    Ping,
    Pong,
    Progress,
    Result,
    Shutdown,
    Status,
    StatusRequest,
    with_call_id,
)

__all__ = [
    "BAD_ARGUMENT",
    "BAD_RESULT",
    "BY_NAME",
    "BY_VALUE",
    "CLOSED",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FAILED",
    "INIT_KIND",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "OK",
    "PROTOCOL_VERSION",
    "PYTHON_VERSION",
    "RAISED",
    "SKIPPED",
    "UNKNOWN_TASK",
    "Call",
    "Cancel",
    "ChannelClose",
    "ChannelCredit",
    "ChannelData",
    "Connection",
    "Failure",
    "Goodbye",
    "Hello",
    "Kill",
    "Message",
    "Ping",
    "Pong",
    "Progress",
    "Result",
    "Sentinel",
    "Shutdown",
    "State",
    "Status",
    "StatusRequest",
    "decode_body",
    "encode_body",
    "versions",
    "with_call_id",
]
