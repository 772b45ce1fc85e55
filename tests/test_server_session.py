"""The worker server's parts, in this process: a :class:`Session` driven over a socket
pair by a raw protocol client against a fake runner, and the :class:`InlineRunner`
against a recording sink. No ``offload serve`` process, no handshake (sessions start
after it: these run unsealed, as under TLS)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from offload import protocol as p
from offload.errors import WorkerKilled
from offload.serde import dumps, loads
from offload.server.inline import InlineRunner
from offload.server.server import Server
from offload.server.session import Session, Tally
from offload.transport.loop import get_loop

WAIT = 10.0  # seconds: a bound on every wait, never a synchronisation by itself


def _call(call_id: int, fn: Any = abs, *args: Any) -> p.Call:
    payload, _ = dumps((fn, args, {}))
    return p.Call(call_id=call_id, kind=p.BY_VALUE, timeout=0.0, target="t", payload=payload)


class FakeRunner:
    """Records what a session asks of its runner; the test plays the workers."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.submitted: list[tuple[int, p.Call, Any]] = []
        self.killed: list[int] = []
        self.cancelled: list[int] = []
        self.cancel_ok = True

    def submit_raw(self, call_id: int, call: p.Call, sink: Any) -> None:
        with self.cond:
            self.submitted.append((call_id, call, sink))
            self.cond.notify_all()

    def cancel(self, call_id: int) -> bool:
        with self.cond:
            self.cancelled.append(call_id)
            self.cond.notify_all()
        return self.cancel_ok

    def kill_call(self, call_id: int) -> bool:
        with self.cond:
            self.killed.append(call_id)
            self.cond.notify_all()
        return True

    def wait_for(self, what: str, count: int) -> list[Any]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(getattr(self, what)) >= count, WAIT), what
            return list(getattr(self, what))


class Client:
    """The client end of a socket pair, speaking the protocol with no I/O loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT)
        self.conn = p.Connection("client", name="test-client", pid=os.getpid())
        self._write(self.conn.hello())

    def _write(self, chunks: list[Any]) -> None:
        self.sock.sendall(b"".join(bytes(memoryview(c)) for c in chunks))

    def send(self, msg: p.Message) -> None:
        self._write(self.conn.send(msg))

    def receive(self) -> p.Message:
        """The next message other than the server's Hello."""
        while True:
            event = self.conn.next_event()
            if isinstance(event, p.Hello):
                continue
            if isinstance(event, p.Message):
                return event
            if event is p.CLOSED:
                raise EOFError("the server closed the connection")
            self.conn.receive_data(self.sock.recv(1 << 16))


class Harness:
    """Sessions on the process-wide loop, each with a connected client."""

    def __init__(self, runner: Any, disconnect_grace: float = 5.0) -> None:
        self.runner = runner
        self.tally = Tally()
        self.gone: list[Session] = []
        self.gone_event = threading.Event()
        self.disconnect_grace = disconnect_grace
        self.sessions: list[Session] = []
        self.clients: list[Client] = []

    def connect(self) -> tuple[Session, Client]:
        server_end, client_end = socket.socketpair()
        session = Session(
            server_end,
            None,
            b"",
            runner=self.runner,
            loop=get_loop(),
            tally=self.tally,
            name="test-server",
            slots=2,
            max_message_size=1 << 20,
            disconnect_grace=self.disconnect_grace,
            status=lambda: {"busy": 0},
            on_gone=self._on_gone,
        )
        client = Client(client_end)
        session.start()
        self.sessions.append(session)
        self.clients.append(client)
        return session, client

    def _on_gone(self, session: Session) -> None:
        self.gone.append(session)
        self.gone_event.set()

    def close(self) -> None:
        """Close every session's end (on the loop, which owns it), then the clients'."""
        for session in self.sessions:
            get_loop().run_sync(session.channel.abort)
            assert session.closed
        for client in self.clients:
            client.sock.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(FakeRunner())
    try:
        yield h
    finally:
        h.close()


@pytest.mark.network
def test_a_call_is_relayed_under_a_server_wide_id_and_answered_under_the_clients(
    harness: Harness,
) -> None:
    session, client = harness.connect()
    client.send(_call(7, abs, -3))
    ((call_id, call, sink),) = harness.runner.wait_for("submitted", 1)
    assert call.call_id == 7  # relayed as the client sent it, still pickled
    assert session.calls == {7: call_id}
    assert "calls=1" in repr(session)

    data, buffers = dumps("half way")
    sink.call_progress(p.Progress(call_id=call_id, payload=data, buffers=tuple(buffers)))
    progress = client.receive()
    assert isinstance(progress, p.Progress) and progress.call_id == 7
    assert loads(progress.payload, progress.buffers) == "half way"

    data, buffers = dumps(3)
    sink.call_done(call_id, p.Result(call_id=call_id, status=p.OK, payload=data))
    result = client.receive()
    assert isinstance(result, p.Result) and result.call_id == 7 and result.status == p.OK
    assert loads(result.payload, result.buffers) == 3
    assert session.calls == {}
    assert (harness.tally.served, harness.tally.failed) == (1, 0)
    sink.call_done(call_id, p.Result(call_id=call_id, status=p.OK))  # a late duplicate
    assert (harness.tally.served, harness.tally.failed) == (1, 0)


@pytest.mark.network
def test_two_clients_with_the_same_call_id_each_get_their_own_answer(
    harness: Harness,
) -> None:
    (_, first), (_, second) = harness.connect(), harness.connect()
    first.send(_call(1))
    harness.runner.wait_for("submitted", 1)
    second.send(_call(1))
    submitted = harness.runner.wait_for("submitted", 2)
    ids = [call_id for call_id, _, _ in submitted]
    assert len(set(ids)) == 2, "colliding client ids must not collide on the server"
    for n, (call_id, _, sink) in enumerate(reversed(submitted)):
        data, _ = dumps(f"answer {n}")
        sink.call_done(call_id, p.Result(call_id=call_id, status=p.OK, payload=data))
    answers = {}
    for name, client in (("first", first), ("second", second)):
        msg = client.receive()
        assert isinstance(msg, p.Result) and msg.call_id == 1
        answers[name] = loads(msg.payload, msg.buffers)
    assert answers == {"first": "answer 1", "second": "answer 0"}


@pytest.mark.network
def test_cancel_and_kill_reach_the_runner_under_the_server_wide_id(
    harness: Harness,
) -> None:
    _, client = harness.connect()
    client.send(_call(5))
    client.send(_call(6))
    (first_id, _, _), (second_id, _, _) = harness.runner.wait_for("submitted", 2)

    client.send(p.Cancel(call_id=5))
    assert harness.runner.wait_for("cancelled", 1) == [first_id]
    msg = client.receive()  # dropped before it started: the client is told
    assert isinstance(msg, p.Result) and msg.call_id == 5 and msg.status == p.FAILED
    assert msg.type_name == "WorkerKilled" and "cancelled" in msg.message

    client.send(p.Kill(call_id=6))
    assert harness.runner.wait_for("killed", 1) == [second_id]
    client.send(p.Kill(call_id=99))  # unknown: ignored
    client.send(p.Ping(seq=3))
    pong = client.receive()
    assert isinstance(pong, p.Pong) and pong.seq == 3
    assert harness.runner.killed == [second_id]
    assert harness.tally.failed == 1


@pytest.mark.network
def test_a_vanished_clients_calls_are_killed_after_the_grace() -> None:
    h = Harness(FakeRunner(), disconnect_grace=0.0)
    try:
        session, client = h.connect()
        client.send(_call(1))
        ((call_id, _, _),) = h.runner.wait_for("submitted", 1)
        client.sock.close()
        assert h.runner.wait_for("killed", 1) == [call_id]
        assert h.gone_event.wait(WAIT) and h.gone == [session]
        assert "closed" in repr(session)
    finally:
        h.close()


# -- the inline runner -----------------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.outcomes: dict[int, Any] = {}
        self.progress: list[tuple[int, Any]] = []

    def call_done(self, call_id: int, outcome: Any, *, flush: bool = True) -> None:
        with self.cond:
            self.outcomes[call_id] = outcome
            self.cond.notify_all()

    def flush(self) -> None:
        pass

    def call_progress(self, msg: p.Progress) -> None:
        with self.cond:
            self.progress.append((msg.call_id, loads(msg.payload, msg.buffers)))

    def wait(self, call_id: int) -> Any:
        with self.cond:
            assert self.cond.wait_for(lambda: call_id in self.outcomes, WAIT)
            return self.outcomes[call_id]


def _report_twice(tag: str) -> str:
    import offload

    offload.report(f"{tag} 1")
    offload.report(f"{tag} 2")
    return tag


# What _hold signals (calls are pickled, even inline: events travel by name).
_started = threading.Event()
_release = threading.Event()


def _hold() -> str:
    _started.set()
    _release.wait(WAIT)
    return "held"


@pytest.mark.unit
def test_inline_runner_runs_calls_and_routes_progress_by_the_server_wide_id() -> None:
    runner = InlineRunner(2, max_message_size=1 << 20)
    sink = RecordingSink()
    try:
        # Two calls that a client numbered alike: the server-wide ids tell them apart.
        runner.submit_raw(101, _call(1, _report_twice, "a"), sink)
        runner.submit_raw(102, _call(1, _report_twice, "b"), sink)
        for call_id, tag in ((101, "a"), (102, "b")):
            result = sink.wait(call_id)
            assert isinstance(result, p.Result) and result.status == p.OK
            assert result.call_id == 1 and result.elapsed > 0  # the session relabels it
            assert loads(result.payload, result.buffers) == tag
        assert sorted(sink.progress) == [(101, "a 1"), (101, "a 2"), (102, "b 1"), (102, "b 2")]
        assert runner.busy == 0
    finally:
        runner.shutdown(wait=True)
    assert "closed" in repr(runner)


@pytest.mark.unit
def test_inline_runner_kills_a_queued_call_and_not_a_running_one() -> None:
    runner = InlineRunner(1, max_message_size=1 << 20)
    sink = RecordingSink()
    _started.clear()
    _release.clear()
    try:
        runner.submit_raw(1, _call(1, _hold), sink)
        assert _started.wait(WAIT)
        runner.submit_raw(2, _call(2), sink)
        assert repr(runner) == "<InlineRunner threads=1 running=1 queued=1>"
        assert runner.kill_call(1) is False  # a thread cannot be killed
        assert runner.kill_call(2) is True
        killed = sink.wait(2)
        assert isinstance(killed, WorkerKilled) and "before it started" in str(killed)
        assert runner.cancel(2) is False  # gone already
        _release.set()
        assert loads(sink.wait(1).payload) == "held"
    finally:
        _release.set()
        runner.shutdown(wait=True)


# -- the server ------------------------------------------------------------------------

TOKEN = b"0123456789abcdef" * 2


@pytest.mark.unit
def test_server_repr_before_it_starts() -> None:
    server = Server("127.0.0.1:0", token=TOKEN, workers=3, isolation="inline")
    assert repr(server) == (
        "<Server 127.0.0.1:0 serving isolation=inline slots=3 sessions=0 busy=0 queued=0 "
        "pending=0 served=0 failed=0>"
    )


@pytest.mark.network
def test_an_inline_server_in_this_process_serves_counts_and_stops() -> None:
    """The server's parts together, with no process: an inline server, one client."""
    import offload

    server = Server("127.0.0.1:0", token=TOKEN, workers=1, isolation="inline")
    address = server.start()
    try:
        with offload.connect(str(address), token=TOKEN) as w:
            assert w.call(abs, -2) == 2
            with pytest.raises(ZeroDivisionError):
                w.call(divmod, 1, 0)
            assert "sessions=1" in repr(server) and "served=2" in repr(server)
            status = server.status()
            assert (status["connections"], status["calls_served"]) == (1, 2)
            assert status["isolation"] == "inline" and status["busy"] == 0
    finally:
        assert server.stop(5.0) is True
    assert repr(server).startswith(f"<Server {address} stopped ")
