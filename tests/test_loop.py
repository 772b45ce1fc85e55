"""The I/O loop: busy polling (``offload.transport.loop.Loop.busy_poll``) and handing
work over from code that may hold a lock.

The process-wide loop is used (a second loop would be a thread that never ends); each
test sets the hook and takes it away again.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from offload import protocol as p
from offload.transport.channel import Channel, in_dispatch
from offload.transport.loop import Loop, get_loop

WAIT = 10.0


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = get_loop()
    yield loop
    loop.busy_poll = None


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_busy_polling_loop_still_serves_readers_and_timers(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    asked = threading.Event()
    got: list[bytes] = []
    readable = threading.Event()
    timer_ran = threading.Event()

    def budget() -> float:
        asked.set()
        return 0.05  # far longer than any poll here: the events must cut it short

    def on_readable() -> None:
        got.append(pair[1].recv(100))
        readable.set()

    loop.add_reader(pair[1].fileno(), on_readable)
    try:
        loop.busy_poll = budget
        loop.call_soon(lambda: None)  # the loop asks the hook before its next wait
        assert asked.wait(WAIT)
        pair[0].send(b"ping")
        assert readable.wait(WAIT)
        assert got == [b"ping"]
        loop.call_later(0.01, timer_ran.set)
        assert timer_ran.wait(WAIT)
        done = threading.Event()
        loop.call_soon(done.set)  # from another thread, while the loop polls
        assert done.wait(WAIT)
    finally:
        loop.remove_reader(pair[1].fileno())


def test_a_zero_budget_means_the_loop_blocks_as_usual(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    calls = 0
    readable = threading.Event()

    def budget() -> float:
        nonlocal calls
        calls += 1
        return 0.0

    def on_readable() -> None:
        pair[1].recv(100)
        readable.set()

    loop.add_reader(pair[1].fileno(), on_readable)
    try:
        loop.busy_poll = budget
        pair[0].send(b"x")
        assert readable.wait(WAIT)
        assert calls >= 1
    finally:
        loop.remove_reader(pair[1].fileno())


def test_call_soon_from_anywhere_takes_no_lock(loop: Loop) -> None:
    """A finalizer may run on a thread that holds the loop's own lock (the garbage
    collector runs during any allocation): handing work over must not need that lock."""
    ran = threading.Event()
    ran_on: list[str] = []

    def work() -> None:
        ran_on.append(threading.current_thread().name)
        ran.set()

    with loop._lock:  # as if the collector ran inside call_soon on this thread
        loop.call_soon_from_anywhere(work)
    assert ran.wait(WAIT)
    assert ran_on == ["offload-io"]


def test_messages_are_dispatched_where_waiting_is_refused(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Futures refuse to wait (RuntimeError) wherever ``in_dispatch()`` holds: on the
    loop's thread, and on a thread that reads its own answers (``Channel.pump``) while it
    dispatches them, but not on that thread otherwise."""
    mine, peer = pair
    conn = p.Connection("client", name="test", pid=0, slots=0)
    peer_conn = p.Connection("worker", name="peer", pid=0, slots=1)
    conn.state = peer_conn.state = p.State.OPEN
    channel = Channel(mine, conn, loop)
    seen: list[tuple[str, bool]] = []
    got = threading.Event()

    def on_messages(msgs: list[p.Message]) -> None:
        seen.append((threading.current_thread().name, in_dispatch()))
        got.set()

    channel.on_messages = on_messages

    def answer(call_id: int) -> None:
        for chunk in peer_conn.send(p.Result(call_id=call_id, status=p.OK, payload=b"x")):
            peer.sendall(chunk)

    loop.add_reader(mine.fileno(), channel._on_readable)
    try:
        # Read by the loop.
        answer(1)
        assert got.wait(WAIT)
        # Read by this thread, which claimed the socket before the answer was sent.
        got.clear()
        assert channel.claim()
        answer(2)
        channel.pump_claimed(got.is_set, WAIT)
        assert got.is_set()
        assert not in_dispatch()  # back outside the dispatch
    finally:
        loop.remove_reader(mine.fileno())
    assert seen == [("offload-io", True), (threading.current_thread().name, True)]
