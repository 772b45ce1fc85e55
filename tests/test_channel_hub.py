"""The hub of a channel (``offload.client.channels``) driven by hand: no process, no
socket, no I/O loop. A call holding an end is a plain ``concurrent.futures.Future``
whose owner records what the hub sends to "its worker"; the worker's messages are built
here and routed as the engine would route them.
"""

from __future__ import annotations

import concurrent.futures
import pickle
from typing import Any

import pytest

import offload
from offload import protocol as p
from offload.client.channels import Hub, Receiver, Sender, bind, retried, route
from offload.worker.channels import RECEIVE, SEND


class Owner:
    """Stands for the engine: records what is sent to each call's worker."""

    def __init__(self) -> None:
        self.sent: list[p.Message] = []

    def send_channel(self, call_id: int, msgs: list[p.Message]) -> bool:
        self.sent.extend(msgs)
        return True

    def of(self, kind: type[p.Message]) -> list[Any]:
        return [m for m in self.sent if type(m) is kind]


def call(owner: Owner) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut._owner = owner  # type: ignore[attr-defined]
    return fut


def hub_of(end: Sender[Any] | Receiver[Any]) -> Hub:
    return end._hub


def items(call_id: int, hub: Hub, values: list[Any]) -> p.ChannelData:
    """A batch of items as a worker's sender frames it."""
    payload = pickle.dumps([pickle.dumps(v, 5) for v in values], 5)
    return p.ChannelData(call_id=call_id, channel_id=hub.id, kind=p.ITEMS, payload=payload)


def items_in(msgs: list[p.ChannelData]) -> list[Any]:
    return [pickle.loads(x) for m in msgs for x in pickle.loads(m.payload)]


def test_a_calls_sender_is_granted_credits_as_its_items_are_consumed() -> None:
    tx, rx = offload.channel(maxsize=4)
    hub, owner = hub_of(tx), Owner()
    fut = call(owner)
    bind([(hub, SEND)], 7, fut)
    assert "handed to a call" in repr(tx)
    route(items(7, hub, [0, 1, 2, 3]))  # its whole window
    assert rx.recv() == 0 and owner.sent == []  # grants go in batches of half a window
    assert rx.recv() == 1
    assert owner.of(p.ChannelCredit) == [p.ChannelCredit(call_id=7, channel_id=hub.id, count=2)]
    fut.set_result(None)  # the call ended: its sender is done
    assert list(rx) == [2, 3]


def test_a_crashed_senders_error_ends_the_iteration_after_its_items() -> None:
    tx, rx = offload.channel()
    hub = hub_of(tx)
    fut = call(Owner())
    bind([(hub, SEND)], 8, fut)
    route(items(8, hub, ["a", "b"]))
    fut.set_exception(offload.WorkerCrashed("the worker died"))
    got = []
    with pytest.raises(offload.WorkerCrashed, match="died"):
        for item in rx:
            got.append(item)
    assert got == ["a", "b"]


def test_a_task_that_raised_ends_the_iteration_quietly() -> None:
    tx, rx = offload.channel()
    fut = call(Owner())
    bind([(hub_of(tx), SEND)], 9, fut)
    fut.set_exception(ValueError("the task's own"))
    assert list(rx) == []


def test_a_receiving_call_gets_what_it_has_room_for_and_returns_the_rest() -> None:
    tx, rx = offload.channel(maxsize=8)
    hub, owner = hub_of(tx), Owner()
    fut = call(owner)
    bind([(hub, RECEIVE)], 11, fut)
    for i in range(6):
        tx.send(i)  # queued here: the call has granted nothing yet
    assert owner.sent == []
    route(p.ChannelCredit(call_id=11, channel_id=hub.id, count=4))  # its end is unpickled
    assert items_in(owner.of(p.ChannelData)) == [0, 1, 2, 3]
    route(p.ChannelCredit(call_id=11, channel_id=hub.id, count=2))  # it consumed 0 and 1
    assert items_in(owner.of(p.ChannelData)) == [0, 1, 2, 3, 4, 5]
    tx.close()
    hub.forward()  # what the I/O loop does soon after (the close is sent once)
    assert owner.of(p.ChannelClose) == [p.ChannelClose(call_id=11, channel_id=hub.id)]
    fut.set_result(None)  # it ended having consumed 0 and 1 only
    assert list(rx) == [2, 3, 4, 5]  # the rest is the next receiver's, in order


def test_one_receiver_at_a_time_and_ends_travel_only_in_calls() -> None:
    tx, rx = offload.channel()
    fut = call(Owner())
    bind([(hub_of(rx), RECEIVE)], 12, fut)
    with pytest.raises(offload.ChannelClosed, match="held by call 12"):
        rx.recv(timeout=0)
    with pytest.raises(TypeError, match="argument of a call"):
        pickle.dumps(tx)
    fut.set_result(None)
    tx.send("here again")
    assert rx.recv(timeout=0) == "here again"


def test_local_send_and_recv_time_out_typed() -> None:
    tx, rx = offload.channel(maxsize=1)
    tx.send(1)
    with pytest.raises(offload.ChannelTimeout) as info:
        tx.send(2, timeout=0.01)
    assert isinstance(info.value, TimeoutError) and info.value.timeout == 0.01
    assert rx.recv() == 1
    with pytest.raises(offload.ChannelTimeout):
        rx.recv(timeout=0.01)


def test_late_messages_of_ended_calls_are_dropped() -> None:
    tx, rx = offload.channel()
    hub = hub_of(tx)
    fut = call(Owner())
    bind([(hub, SEND)], 13, fut)
    fut.set_result(None)
    route(items(13, hub, ["late"]))  # after its end: nobody is told
    route(p.ChannelCredit(call_id=13, channel_id=hub.id, count=1))
    assert list(rx) == []


@pytest.mark.parametrize("bad", ["4", 1.5, None, True])
def test_maxsize_must_be_an_int(bad: Any) -> None:
    with pytest.raises(TypeError, match="maxsize must be an int"):
        offload.channel(maxsize=bad)


def test_maxsize_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="maxsize must be >= 0"):
        offload.channel(maxsize=-1)


# -- delivery: at most once; retries start afresh ------------------------------------------


def test_what_a_receiving_call_had_in_flight_when_its_worker_died_is_dropped_not_repeated() -> None:
    tx, rx = offload.channel(maxsize=8)
    hub, owner = hub_of(tx), Owner()
    fut = call(owner)
    bind([(hub, RECEIVE)], 21, fut)
    for i in range(6):
        tx.send(i)
    route(p.ChannelCredit(call_id=21, channel_id=hub.id, count=8))  # unpickled: 0..5 go
    assert items_in(owner.of(p.ChannelData)) == [0, 1, 2, 3, 4, 5]
    route(p.ChannelCredit(call_id=21, channel_id=hub.id, count=2))  # it took 0 and 1
    # It may have taken 2 (or more) just before it died, and never said so: rather than
    # risk a duplicate, 2..5 are dropped, and counted.
    fut.set_exception(offload.WorkerCrashed("the worker died"))
    tx.send(6)
    tx.close()
    assert list(rx) == [6]
    assert hub.lost == 4 and "4 lost" in repr(rx)


def test_a_retried_sender_gets_a_fresh_window_and_its_failed_attempts_items_stay() -> None:
    tx, rx = offload.channel(maxsize=4)
    hub, owner = hub_of(tx), Owner()
    fut = call(owner)
    bind([(hub, SEND)], 22, fut)
    route(items(22, hub, ["a0", "a1", "a2", "a3"]))  # attempt 1: its whole window; dies
    route(p.ChannelClose(call_id=22, channel_id=hub.id))  # (even after closing its end)
    retried(22)  # the engine sends the call again
    assert not hub.ended  # the new attempt's sender is open
    route(items(22, hub, ["b0", "b1", "b2", "b3"]))  # attempt 2: a window of its own
    got = [rx.recv(), rx.recv(), rx.recv(), rx.recv()]
    assert got == ["a0", "a1", "a2", "a3"]  # the failed attempt's items, in order ...
    assert owner.of(p.ChannelCredit) == []  # ... which earn the new attempt nothing
    got += [rx.recv(), rx.recv()]
    assert owner.of(p.ChannelCredit) == [p.ChannelCredit(call_id=22, channel_id=hub.id, count=2)]
    fut.set_result(None)
    assert got + list(rx) == ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"]


def test_a_retried_receiver_starts_with_a_fresh_window_after_the_failed_attempts() -> None:
    tx, _ = offload.channel(maxsize=4)
    hub, owner = hub_of(tx), Owner()
    fut = call(owner)
    bind([(hub, RECEIVE)], 23, fut)
    for i in range(4):
        tx.send(i)
    tx.close()
    route(p.ChannelCredit(call_id=23, channel_id=hub.id, count=4))  # attempt 1: 0..3, end
    hub.forward()
    assert items_in(owner.of(p.ChannelData)) == [0, 1, 2, 3]
    assert len(owner.of(p.ChannelClose)) == 1
    owner.sent.clear()
    retried(23)  # it died having acknowledged nothing: 0..3 are dropped
    hub.forward()
    assert owner.sent == []  # nothing goes before the new attempt's first grant
    route(p.ChannelCredit(call_id=23, channel_id=hub.id, count=4))
    assert owner.of(p.ChannelData) == []  # nothing left to send, but the end again:
    assert owner.of(p.ChannelClose) == [p.ChannelClose(call_id=23, channel_id=hub.id)]
    assert hub.lost == 4
    fut.set_result(None)
