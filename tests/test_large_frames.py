"""Large frames, sans-IO: received in place, their MAC checked as they arrive.

A frame whose body is a MiB or more gets memory of its own once its length is known;
the transport reads the rest straight into it (``receive_buffer`` / ``received_into``),
and the message's buffers are views of it. These tests drive two
:class:`offload.protocol.Connection` objects back to back, with no sockets: the body
arrives whole and bit-exact, in order with the frames around it, only once its MAC
matched, and a length announced but never sent takes no memory.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
import struct
from hashlib import blake2b

import psutil
import pytest

from offload import protocol as p
from offload.errors import ProtocolError
from offload.protocol.auth import LARGE_FRAME, MAC_SIZE, Sealer
from offload.protocol.connection import HEADER

BIG = 3 << 20  # bytes of the buffer that makes a frame large
KEY_A, KEY_B = os.urandom(32), os.urandom(32)


def pair(*, sealed: bool) -> tuple[p.Connection, p.Connection]:
    """A sender and a receiver past their Hellos (sealed with matching keys)."""
    sender, receiver = p.Connection("client"), p.Connection("server")
    for conn in (sender, receiver):
        conn.state = p.State.OPEN
    if sealed:
        sender.sealer = Sealer(KEY_A, KEY_B)
        receiver.sealer = Sealer(KEY_B, KEY_A)
    return sender, receiver


def big_call(call_id: int = 1, size: int = BIG) -> tuple[p.Call, bytes]:
    blob = os.urandom(size)
    call = p.Call(
        call_id=call_id, kind=p.BY_VALUE, timeout=0.0, target="t", payload=b"x", buffers=(blob,)
    )
    return call, blob


def framed(conn: p.Connection, msg: p.Message) -> bytes:
    return b"".join(bytes(c) for c in conn.send(msg))


def feed_in_place(receiver: p.Connection, data: bytes, first: int, piece: int) -> None:
    """``data``: ``first`` bytes through receive_data (the header and a head start),
    the rest read into receive_buffer() ``piece`` bytes at a time, as a socket would."""
    receiver.receive_data(data[:first])
    assert receiver.next_event() is p.NEED_DATA
    pos = first
    while pos < len(data):
        target = receiver.receive_buffer()
        assert target is not None, "a large frame under way offers its memory"
        n = min(piece, len(target), len(data) - pos)
        target[:n] = data[pos : pos + n]
        receiver.received_into(n)
        pos += n
        if pos < len(data):
            assert receiver.next_event() is p.NEED_DATA  # nothing before the whole frame
    assert receiver.receive_buffer() is None


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_large_frame_is_read_into_its_own_memory_and_decoded_once_whole(sealed: bool) -> None:
    sender, receiver = pair(sealed=sealed)
    call, blob = big_call()
    frame = framed(sender, call)
    feed_in_place(receiver, frame, first=1000, piece=300_007)
    msg = receiver.next_event()
    assert isinstance(msg, p.Call) and msg.call_id == 1
    (buf,) = msg.buffers
    assert bytes(buf) == blob
    # A view of the memory the body was read into: no copy was made after the reads.
    assert isinstance(buf.obj, mmap.mmap)
    assert receiver.next_event() is p.NEED_DATA
    assert receiver.buffered == 0


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_frames_around_a_large_frame_keep_their_order(sealed: bool) -> None:
    sender, receiver = pair(sealed=sealed)
    call, blob = big_call(call_id=2)
    stream = (
        framed(sender, p.Ping(seq=1))
        + framed(sender, call)
        + framed(sender, p.Ping(seq=3))
        + framed(sender, p.Ping(seq=4))
    )
    out: list[p.Message] = []
    for start in range(0, len(stream), 1 << 18):  # as 256 KiB reads hand it over
        receiver.receive_data(stream[start : start + (1 << 18)])
        assert receiver.next_events(out) is p.NEED_DATA
    assert [type(m).__name__ for m in out] == ["Ping", "Call", "Ping", "Ping"]
    assert [m.seq for m in out if isinstance(m, p.Ping)] == [1, 3, 4]
    call_msg = out[1]
    assert isinstance(call_msg, p.Call)
    assert bytes(call_msg.buffers[0]) == blob


@pytest.mark.parametrize("where", ["body-start", "body-middle", "body-end", "mac"])
def test_a_large_frame_with_a_wrong_mac_is_refused_before_it_is_decoded(where: str) -> None:
    sender, receiver = pair(sealed=True)
    call, _ = big_call()
    frame = bytearray(framed(sender, call))
    index = {
        "body-start": HEADER.size,
        "body-middle": len(frame) // 2,
        "body-end": len(frame) - MAC_SIZE - 1,
        "mac": len(frame) - 1,
    }[where]
    frame[index] ^= 0x01
    feed_in_place(receiver, bytes(frame), first=HEADER.size + 10, piece=1 << 20)
    with pytest.raises(ProtocolError, match="integrity"):
        receiver.next_event()
    assert receiver.state is p.State.CLOSED


def test_the_end_of_the_stream_inside_a_large_frame_is_an_error() -> None:
    sender, receiver = pair(sealed=True)
    call, _ = big_call()
    frame = framed(sender, call)
    receiver.receive_data(frame[: len(frame) // 2])
    assert receiver.next_event() is p.NEED_DATA
    assert receiver.buffered == len(frame) // 2
    receiver.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed inside a frame"):
        receiver.next_event()


def test_a_length_announced_and_never_sent_takes_no_memory() -> None:
    _, receiver = pair(sealed=True)
    size = receiver.max_message_size  # 1 GiB: the largest a peer may announce
    me = psutil.Process()
    before = me.memory_info().rss
    receiver.receive_data(HEADER.pack(size + MAC_SIZE) + b"\x07" * 10)
    assert receiver.next_event() is p.NEED_DATA
    target = receiver.receive_buffer()
    assert target is not None and len(target) == size + MAC_SIZE - 10
    grown = me.memory_info().rss - before
    assert grown < 32 << 20, f"an announced frame took {grown >> 20} MiB before it came"
    del target


@pytest.mark.parametrize("size", [0, LARGE_FRAME - 1, LARGE_FRAME, 1 << 20])
def test_small_frames_are_sealed_with_keyed_blake2b_large_ones_with_hmac_sha256(
    size: int,
) -> None:
    body = os.urandom(size)
    sender, receiver = Sealer(KEY_A, KEY_B), Sealer(KEY_B, KEY_A)
    for seq in range(2):
        mac = sender.seal([body[: size // 3], body[size // 3 :]])
        number = struct.pack("!Q", seq)
        if size >= LARGE_FRAME:
            expected = hmac.new(KEY_A, number + body, hashlib.sha256).digest()
        else:
            expected = blake2b(number + body, key=KEY_A, digest_size=MAC_SIZE).digest()
        assert mac == expected
        receiver.open(memoryview(body), mac)  # in one go
    check = receiver.opening(size)  # and piece by piece, as a frame arrives
    for start in range(0, size, 4096):
        check.update(body[start : start + 4096])
    receiver.finish_opening(check, sender.seal([body]))
    with pytest.raises(ProtocolError, match="integrity"):
        receiver.open(memoryview(body), sender.seal([body + b"!"]))
