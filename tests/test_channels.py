"""``offload.channel()``: streams both ways through every kind of worker.

Worker kinds: local pools started with ``spawn`` and ``forkserver`` (calls run on the
thread that reads the socket: a channel end waiting for items reads it itself), a local
worker with ``concurrency=2`` (a reader thread routes the channel messages), a worker
handle from ``offload.spawn()`` with heartbeats (a reader thread too), a real
``offload serve`` on 127.0.0.1 (the server relays the channel messages to its child
worker), and actors (calls from the creator over the worker's connection, and calls
through a handle that travelled, which go to the actor's listener).

Back-pressure is measured by counting: a producer reports how many items it has sent,
and that count never runs more than ``maxsize`` ahead of what was consumed.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import channel_tasks as ct
import offload
from crashes import wait_until
from offload import protocol as p
from remote_helpers import RawClient, ServerProcess, clean_env, write_token_file

WAIT = 60.0
TESTS_DIR = Path(__file__).resolve().parent
KINDS = ["spawn", "forkserver", "threaded", "handle", "remote"]
Submit = Callable[..., "offload.Future[Any]"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An ``offload serve`` (2 workers) on 127.0.0.1 for the test: (address, token)."""
    workdir = tmp_path
    token_path, token = write_token_file(workdir)
    env = clean_env(PYTHONPATH=str(TESTS_DIR))
    srv = ServerProcess(
        workdir,
        ["--listen", "127.0.0.1:0", "--token-file", str(token_path), "--workers", "2"],
        env=env,
    ).start()
    try:
        yield srv.address, token.decode()
    finally:
        srv.stop()


@pytest.fixture(params=KINDS)
def submit(request: pytest.FixtureRequest) -> Iterator[Submit]:
    """``submit(fn, *args)`` on a worker of the kind named by the parameter."""
    kind = request.param
    if kind == "remote":
        address, token = request.getfixturevalue("server")
        ctx: Any = offload.Pool(hosts=[address], token=token)
    elif kind == "threaded":
        ctx = offload.Pool(workers=1, concurrency=2)
    elif kind == "handle":  # one worker's handle, heartbeats, two calls at once (A to B)
        ctx = offload.spawn(heartbeat=(0.5, 30.0), concurrency=2)
    else:
        ctx = offload.Pool(workers=2, start_method=kind)
    with ctx as pool:
        yield pool.submit


# --------------------------------------------------------------------------- #
# Both directions, through every kind of worker
# --------------------------------------------------------------------------- #


def test_a_worker_streams_to_the_parent(submit: Submit) -> None:
    tx, rx = offload.channel(maxsize=8)
    fut = submit(ct.produce, tx, 500)
    assert list(rx) == list(range(500))  # ends when the call ends (its tx closes)
    assert fut.result(WAIT) == "produced"


def test_the_parent_streams_to_a_worker(submit: Submit) -> None:
    tx, rx = offload.channel(maxsize=8)
    fut = submit(ct.consume_sum, rx)
    for i in range(500):
        tx.send(i)
    tx.close()
    assert fut.result(WAIT) == sum(range(500))


def test_a_sender_to_one_call_and_the_receiver_to_another(submit: Submit) -> None:
    tx, rx = offload.channel(maxsize=4)
    consumer = submit(ct.consume_sum, rx)
    producer = submit(ct.produce_and_close, tx, 300)
    assert producer.result(WAIT) == "closed"
    assert consumer.result(WAIT) == sum(range(300))


def test_an_end_nested_inside_an_argument(submit: Submit) -> None:
    tx, rx = offload.channel(maxsize=4)
    fut = submit(ct.produce_nested, {"out": [tx], "also": (tx,)}, 20)  # twice: one end
    assert list(rx) == list(range(20))
    assert fut.result(WAIT) == 20


def test_a_round_trip_through_one_call(submit: Submit) -> None:
    to_worker, rx = offload.channel(maxsize=16)
    tx, from_worker = offload.channel(maxsize=16)
    fut = submit(ct.echo, rx, tx)
    got = []
    for i in range(200):
        to_worker.send(i)
        if i % 10 == 9:  # both ways at once: ten out, then their ten answers back
            got.extend(from_worker.recv(timeout=WAIT) for _ in range(10))
    to_worker.close()
    assert list(from_worker) == []
    assert got == [2 * i for i in range(200)]
    assert fut.result(WAIT) == 200


def test_a_receiver_handed_from_one_call_to_the_next_loses_nothing(submit: Submit) -> None:
    tx, rx = offload.channel(maxsize=32)
    for i in range(20):  # the first call is sent more than it takes
        tx.send(i)
    tx.close()
    first = submit(ct.take, rx, 3)
    assert first.result(WAIT) == [0, 1, 2]
    # What the first call was sent and did not take is the next receiver's.
    assert submit(ct.consume, rx).result(WAIT) == list(range(3, 20))


def test_blobs_both_ways(submit: Submit) -> None:
    sizes = [0, 1, 100, 70_000, 3 << 20]  # in-band, and large ones on their own
    tx, rx = offload.channel(maxsize=2)
    fut = submit(ct.produce_blobs, tx, sizes)
    blobs = []
    while True:
        try:
            blobs.append(rx.recv_bytes(timeout=WAIT))
        except offload.ChannelClosed:
            break
    assert [len(b) for b in blobs] == sizes
    assert all(b == bytes([i]) * len(b) for i, b in enumerate(blobs))
    assert fut.result(WAIT) == len(sizes)

    tx, rx = offload.channel(maxsize=2)
    fut = submit(ct.consume_blobs, rx)
    for i, size in enumerate(sizes):
        tx.send_bytes(bytes([i]) * size)
    tx.close()
    assert fut.result(WAIT) == [(size, i if size else -1) for i, size in enumerate(sizes)]


def test_a_crashing_producer_ends_the_stream_with_worker_crashed(submit: Submit) -> None:
    tx, rx = offload.channel()
    fut = submit(ct.produce_then_die, tx, 5)
    got = []
    with pytest.raises(offload.WorkerCrashed):
        for item in rx:  # the items sent before the crash, then the typed error
            got.append(item)
    assert got == list(range(5))
    with pytest.raises(offload.WorkerCrashed):
        fut.result(WAIT)


def test_a_crashing_producer_ends_another_calls_stream_with_worker_crashed() -> None:
    with offload.Pool(workers=2) as pool:
        tx, rx = offload.channel(maxsize=2)
        consumer = pool.submit(ct.consume_until_error, rx)
        producer = pool.submit(ct.produce_then_die, tx, 4)
        with pytest.raises(offload.WorkerCrashed):
            producer.result(WAIT)
        assert consumer.result(WAIT) == ([0, 1, 2, 3], "WorkerCrashed")


def test_a_task_that_raises_ends_the_stream_cleanly() -> None:
    with offload.Pool(workers=1) as pool:
        tx, rx = offload.channel()
        fut = pool.submit(ct.produce_then_raise, tx, 3)
        assert list(rx) == [0, 1, 2]  # its own exception is the future's, not the stream's
        with pytest.raises(ValueError, match="own error"):
            fut.result(WAIT)


def test_the_server_drops_channel_messages_of_calls_it_does_not_know(
    server: tuple[str, str],
) -> None:
    # Late messages (a credit sent as the call ended) are normal: the session goes on.
    address, token = server
    with RawClient(int(address.rsplit(":", 1)[1])) as raw:
        raw.open(token.encode())
        raw.send(p.ChannelData(call_id=4242, channel_id=1, kind=p.OBJECT, payload=b"\x80"))
        raw.send(p.ChannelCredit(call_id=4242, channel_id=1, count=3))
        raw.send(p.ChannelClose(call_id=4242, channel_id=1))
        raw.send(p.Ping(seq=7))
        reply = raw.recv(WAIT)
        assert isinstance(reply, p.Pong) and reply.seq == 7, reply


# --------------------------------------------------------------------------- #
# Back-pressure, counted
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["spawn", "remote"])
def test_a_slow_parent_bounds_a_worker_producer(kind: str, request: pytest.FixtureRequest) -> None:
    maxsize, n = 4, 200
    if kind == "remote":
        address, token = request.getfixturevalue("server")
        ctx: Any = offload.Pool(hosts=[address], token=token)
    else:
        ctx = offload.Pool(workers=1, start_method=kind)
    with ctx as pool:
        tx, rx = offload.channel(maxsize=maxsize)
        fut = pool.submit(ct.produce_reporting, tx, n)
        # Nothing consumed yet: the producer gets exactly maxsize items out.
        assert wait_until(lambda: (fut.progress() or 0) >= maxsize, WAIT), fut
        assert fut.progress() == maxsize
        if kind == "remote":
            # The full channel holds up neither the connection nor the server's other
            # worker: another call on the same connection gets its answer.
            assert pool.submit(abs, -5).result(WAIT) == 5
        for consumed in range(1, n + 1):
            assert rx.recv(timeout=WAIT) == consumed - 1
            # What it reported sent never runs ahead of what was consumed by more
            # than the window (reports lag sends, so this is a lower bound on sent).
            assert (fut.progress() or 0) <= consumed + maxsize
        assert fut.result(WAIT) == n


def test_without_maxsize_the_producer_runs_ahead() -> None:
    # The measurement above can see a producer that is not held back.
    with offload.Pool(workers=1) as pool:
        tx, rx = offload.channel()
        fut = pool.submit(ct.produce_reporting, tx, 200)
        assert fut.result(WAIT) == 200  # finished with nothing consumed
        assert len(list(rx)) == 200


@pytest.mark.parametrize("kind", ["spawn", "remote"])
def test_a_slow_worker_bounds_the_parent_producer(
    kind: str, request: pytest.FixtureRequest
) -> None:
    maxsize = 4
    if kind == "remote":
        address, token = request.getfixturevalue("server")
        ctx: Any = offload.Pool(hosts=[address], token=token)
    else:
        ctx = offload.Pool(workers=1, start_method=kind)
    with ctx as pool:
        go_tx, go = offload.channel()
        tx, rx = offload.channel(maxsize=maxsize)
        fut = pool.submit(ct.consume_after, go, rx)
        sent = 0
        with pytest.raises(offload.ChannelTimeout):
            for i in range(100):
                tx.send(i, timeout=1.0)
                sent += 1
        # At most maxsize in the worker's end and maxsize queued here: the producer
        # blocked there, with the consumer not reading.
        assert maxsize <= sent <= 2 * maxsize
        go_tx.send("go")
        tx.close()
        assert fut.result(WAIT) == sent


@pytest.mark.parametrize("concurrency", [1, 2])  # the call's thread reads; a reader does
def test_a_send_in_a_worker_times_out_when_nobody_reads(concurrency: int) -> None:
    with offload.Pool(workers=1, concurrency=concurrency) as pool:
        tx, rx = offload.channel(maxsize=3)
        assert pool.submit(ct.send_until_full, tx, 0.2).result(WAIT) == 3
        assert list(rx) == [0, 1, 2]


def test_fan_in_from_several_calls() -> None:
    with offload.Pool(workers=3) as pool:
        tx, rx = offload.channel(maxsize=2)
        futs = [pool.submit(ct.produce, tx, 50) for _ in range(3)]
        got = sorted(rx)  # ends when all three calls ended
        assert got == sorted(list(range(50)) * 3)
        assert [f.result(WAIT) for f in futs] == ["produced"] * 3


# --------------------------------------------------------------------------- #
# Async iteration, timeouts, the local API
# --------------------------------------------------------------------------- #


def test_async_iteration() -> None:
    async def main(pool: offload.Pool) -> list[int]:
        tx, rx = offload.channel(maxsize=3)
        fut = pool.submit(ct.produce, tx, 100)
        got = [item async for item in rx]
        assert await fut == "produced"
        return got

    with offload.Pool(workers=1) as pool:
        assert asyncio.run(main(pool)) == list(range(100))


def test_a_call_iterates_its_rx_with_async_for(submit: Submit) -> None:
    tx, rx = offload.channel(maxsize=16)
    fut = submit(ct.consume_async, rx, True)
    # Another coroutine ran while the iteration waited: the wait blocks no event loop.
    assert wait_until(lambda: fut.progress() == "waiting", WAIT), fut
    for i in range(500):
        tx.send(i, timeout=WAIT)
    tx.close()
    assert fut.result(WAIT) == (list(range(500)), "")


def test_async_for_in_a_call_ends_with_a_crashed_producers_error() -> None:
    with offload.Pool(workers=2) as pool:
        tx, rx = offload.channel(maxsize=2)
        consumer = pool.submit(ct.consume_async, rx)
        producer = pool.submit(ct.produce_then_die, tx, 4)
        with pytest.raises(offload.WorkerCrashed):
            producer.result(WAIT)
        assert consumer.result(WAIT) == ([0, 1, 2, 3], "WorkerCrashed")


def test_recv_timeout_is_typed_on_both_sides() -> None:
    tx, rx = offload.channel()
    with pytest.raises(offload.ChannelTimeout) as info:
        rx.recv(timeout=0.01)
    assert isinstance(info.value, TimeoutError)
    with offload.Pool(workers=1) as pool:
        assert pool.submit(ct.recv_timeout, rx, 0.01).result(WAIT) == "ChannelTimeout"
    tx.close()


def test_local_use_and_reprs() -> None:
    tx, rx = offload.channel(maxsize=2)
    tx.send({"a": 1})
    tx.send_bytes(b"blob")
    assert "2 queued" in repr(rx) and "maxsize=2" in repr(tx)
    assert rx.recv() == {"a": 1}
    assert rx.recv_bytes() == b"blob"
    tx.close()
    with pytest.raises(offload.ChannelClosed):
        tx.send(1)
    with pytest.raises(offload.ChannelClosed):
        rx.recv()
    assert list(rx) == []


def test_ends_travel_only_as_call_arguments() -> None:
    tx, rx = offload.channel()
    with pytest.raises(TypeError, match="argument of a call"):
        pickle.dumps(rx)
    with offload.Pool(workers=2) as pool:
        first = pool.submit(ct.consume, rx)
        # One receiver at a time: a second call cannot take rx while the first has it.
        second = pool.submit(ct.consume, rx)
        with pytest.raises(offload.SerializationError):
            second.result(WAIT)
        with pytest.raises(offload.ChannelClosed, match="held by call"):
            rx.recv(timeout=0)
        tx.send(1)
        tx.close()
        assert first.result(WAIT) == [1]


def test_a_handed_tx_sends_from_the_call_only() -> None:
    tx, rx = offload.channel()
    with offload.Pool(workers=1) as pool:
        fut = pool.submit(ct.produce, tx, 3)
        with pytest.raises(offload.ChannelClosed, match="handed to a call"):
            tx.send(99)
        assert list(rx) == [0, 1, 2]
        fut.result(WAIT)


def test_report_still_works_next_to_channels() -> None:
    with offload.Pool(workers=1) as pool:
        tx, rx = offload.channel()
        fut = pool.submit(ct.produce_reporting, tx, 10)
        assert list(rx) == list(range(10))
        assert fut.result(WAIT) == 10
        assert fut.progress() == 10


# --------------------------------------------------------------------------- #
# Retries and crashes of a receiving call: at most once, a fresh window per attempt
# --------------------------------------------------------------------------- #


def _pool(kind: str) -> offload.Pool:
    if kind == "threaded":
        return offload.Pool(workers=1, concurrency=2)
    return offload.Pool(workers=1, start_method=kind)


@pytest.mark.parametrize("kind", ["spawn", "threaded"])
def test_a_retried_producers_failed_attempt_items_stay_and_the_retry_follows(
    kind: str, tmp_path: Path
) -> None:
    task = offload.Task(ct.produce_dying_once, retries=1, register=False)
    with _pool(kind) as pool:
        tx, rx = offload.channel(maxsize=4)
        fut = pool.submit(task, tx, 6, str(tmp_path / "marker"))
        got = list(rx)  # the crash of the first attempt does not end the stream
        assert fut.result(WAIT) == "again"
    assert got == [("first", i) for i in range(6)] + [("again", i) for i in range(6)]


@pytest.mark.parametrize("kind", ["spawn", "threaded"])
def test_a_retried_consumer_never_gets_an_item_twice(kind: str, tmp_path: Path) -> None:
    task = offload.Task(ct.take_dying_once, retries=1, register=False)
    k, maxsize, n = 3, 4, 40
    with _pool(kind) as pool:
        tx, rx = offload.channel(maxsize=maxsize)
        fut = pool.submit(task, rx, k, str(tmp_path / "marker"))
        for i in range(n):
            tx.send(i, timeout=WAIT)
        tx.close()
        rest = fut.result(WAIT)
    # The first attempt took 0..k-1 and died; what was in flight to it beyond what it
    # acknowledged (at most a window) is dropped, never sent again: the retry gets a
    # suffix, in order, with nothing it could have seen before.
    first = rest[0]
    assert rest == list(range(first, n))
    assert k <= first <= k + maxsize
    assert 0 < rx._hub.lost <= maxsize and f"{rx._hub.lost} lost" in repr(rx)  # type: ignore[attr-defined]


def test_a_consumer_that_crashed_loses_its_in_flight_items_and_rx_comes_back() -> None:
    with offload.Pool(workers=1) as pool:
        tx, rx = offload.channel(maxsize=4)
        fut = pool.submit(ct.take_dying_once, rx, 3, "")  # "": no marker: it dies
        for i in range(6):
            tx.send(i, timeout=WAIT)
        with pytest.raises(offload.WorkerCrashed):
            fut.result(WAIT)
        tx.close()
        rest = list(rx)  # rx is here again: what was never sent to the call
    assert rest == list(range(6 - len(rest), 6))  # a suffix: nothing comes twice
    assert 3 <= 6 - len(rest) <= 3 + 4


# --------------------------------------------------------------------------- #
# Actors: from the creator, and through a handle that travelled
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("door", ["creator", "travelled"])
def test_an_actor_streams_both_ways(door: str) -> None:
    handle = ct.Streamer.spawn()
    try:
        # A handle unpickled here is a holder's: its calls go to the actor's listener.
        h = handle if door == "creator" else pickle.loads(pickle.dumps(handle))
        tx, rx = offload.channel(maxsize=4)
        fut = h.produce(tx, 100)
        assert list(rx) == list(range(100))
        assert fut.result(WAIT) == "produced"

        tx, rx = offload.channel(maxsize=4)
        fut = h.consume(rx)
        for i in range(100):
            tx.send(i)
        tx.close()
        assert fut.result(WAIT) == sum(range(100))
        if h is not handle:
            h.close()
    finally:
        handle.shutdown(timeout=10)
