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


def test_a_writer_watch_fires_when_the_socket_takes_more_and_leaves_its_reader(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    mine, peer = pair
    mine.setblocking(False)
    try:
        while True:
            mine.send(b"x" * 65536)  # fill the socket
    except BlockingIOError:
        pass
    writable = threading.Event()
    readable = threading.Event()
    loop.add_reader(mine.fileno(), readable.set)
    token = loop.run_sync(loop.add_writer, mine.fileno(), writable.set)
    try:
        assert not writable.wait(0.2)  # full: no callback
        peer.send(b"r")
        assert readable.wait(WAIT)  # the reader of the same fd still works
        peer.setblocking(False)
        try:
            while peer.recv(1 << 20):  # drain what we wrote
                pass
        except BlockingIOError:
            pass
        assert writable.wait(WAIT)
    finally:
        loop.remove_writer(token)
        loop.remove_reader(mine.fileno())
        done = threading.Event()
        loop.call_soon(done.set)  # remove_writer from another thread happens on the loop
        assert done.wait(WAIT)


def test_a_channel_never_waits_for_a_peer_that_does_not_read(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Sending to a peer that does not read returns at once, whatever the size; what
    the socket did not take is written by the loop once the peer reads, all of it and in
    order."""
    mine, peer = pair
    conn = p.Connection("client", name="test", pid=0, slots=0)
    conn.state = p.State.OPEN
    channel = Channel(mine, conn, loop)
    loop.add_reader(mine.fileno(), channel._on_readable)
    sent = [p.Progress(call_id=i, payload=bytes([i]) * 200_000) for i in range(40)]
    try:
        done = threading.Event()

        def send_all() -> None:
            for msg in sent:
                assert channel.send(msg)
            done.set()

        threading.Thread(target=send_all, daemon=True).start()
        assert done.wait(WAIT), "send() waited for the peer to read"
        assert channel.pending_output > 0  # 8 MB do not fit in the socket
        reader = p.Connection("worker", name="peer", pid=0, slots=1)
        reader.state = p.State.OPEN
        got: list[p.Message] = []
        peer.settimeout(WAIT)
        while len(got) < len(sent):
            reader.receive_data(peer.recv(1 << 20))
            reader.next_events(got)
        assert [(m.call_id, m.payload) for m in got] == [(m.call_id, m.payload) for m in sent]
        for _ in range(100):
            if channel.pending_output == 0 and channel._write_watch is None:
                break
            threading.Event().wait(0.01)
        assert channel.pending_output == 0
        assert channel._write_watch is None  # the loop stopped watching once written
    finally:
        loop.remove_reader(mine.fileno())
        peer.close()  # a write still blocked (it must not be) fails instead of hanging
        loop.run_sync(channel.close)


def test_a_goodbye_read_by_a_waiting_thread_is_closed_by_the_loop(
    loop: Loop, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A thread reading its own answers (``Channel.pump``) that reads the peer's Goodbye
    leaves the closing to the loop thread: closing unregisters the socket on the loop and
    waits for it, while the loop may be waiting for the reader's lock (``drain()`` as
    the worker exits). Here the loop is held busy while the thread reads the Goodbye:
    the thread must return all the same, and the loop closes the channel once free."""
    mine, peer = pair
    conn = p.Connection("client", name="test", pid=0, slots=0)
    peer_conn = p.Connection("worker", name="peer", pid=0, slots=1)
    conn.state = peer_conn.state = p.State.OPEN
    channel = Channel(mine, conn, loop)
    closed = threading.Event()
    channel.on_messages = lambda msgs: None
    channel.on_close = lambda error: closed.set()
    loop.add_reader(mine.fileno(), channel._on_readable)
    channel._reading = True
    loop_busy, release_loop = threading.Event(), threading.Event()

    def hold_the_loop() -> None:
        loop_busy.set()
        release_loop.wait(WAIT)

    try:
        assert channel.claim()
        loop.call_soon(hold_the_loop)
        assert loop_busy.wait(WAIT)
        for chunk in peer_conn.send(p.Goodbye(reason="done")):
            peer.sendall(chunk)
        returned = threading.Event()
        reader = threading.Thread(
            target=lambda: (channel.pump_claimed(closed.is_set, WAIT), returned.set())
        )
        reader.start()
        assert returned.wait(WAIT), "the reading thread waited for the busy loop"
        assert not closed.is_set()  # the loop, still busy, has not closed it yet
    finally:
        release_loop.set()
        reader.join(WAIT)
    assert closed.wait(WAIT)
    assert channel.closed
