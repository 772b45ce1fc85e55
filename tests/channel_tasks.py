"""Tasks and an actor for ``test_channels.py`` (an importable module, not a test file).

Workers (local ones, an ``offload serve``'s, an actor's process) import this module by
reference, so everything here is module-level. Every wait here is bounded.
"""

from __future__ import annotations

import os
from typing import Any

import offload

LIMIT = 30.0  # seconds a task waits at most


def produce(tx: Any, n: int) -> str:
    """Send 0..n-1, then return (the call's end closes ``tx``)."""
    for i in range(n):
        tx.send(i)
    return "produced"


def produce_and_close(tx: Any, n: int) -> str:
    """Send 0..n-1 inside ``with tx:`` (closed explicitly), then return."""
    with tx:
        for i in range(n):
            tx.send(i)
    return "closed"


def produce_reporting(tx: Any, n: int) -> int:
    """Send 0..n-1, reporting how many were sent after each send (the parent compares
    that with what it consumed: back-pressure)."""
    for i in range(n):
        tx.send(i)
        offload.report(i + 1)
    return n


def produce_blobs(tx: Any, sizes: list[int]) -> int:
    """Send one blob of each size (``send_bytes``), byte value = its index."""
    for i, size in enumerate(sizes):
        tx.send_bytes(bytes([i % 256]) * size)
    return len(sizes)


def produce_then_die(tx: Any, n: int) -> None:
    """Send ``n`` items, then end the worker process abruptly (a crash)."""
    for i in range(n):
        tx.send(i)
    tx.flush()  # what was sent is on the wire before the process ends
    os._exit(3)


def consume(rx: Any) -> list[Any]:
    """Everything ``rx`` yields, until the channel ends."""
    return list(rx)


def consume_sum(rx: Any) -> int:
    """The sum of what ``rx`` yields."""
    total = 0
    for x in rx:
        total += x
    return total


def consume_after(go: Any, rx: Any) -> int:
    """Wait for one item on ``go``, then count what ``rx`` yields (a slow consumer that
    starts when told)."""
    go.recv(timeout=LIMIT)
    return sum(1 for _ in rx)


def consume_blobs(rx: Any) -> list[tuple[int, int]]:
    """(length, first byte) of each blob on ``rx`` (``recv_bytes``)."""
    out = []
    while True:
        try:
            blob = rx.recv_bytes(timeout=LIMIT)
        except offload.ChannelClosed:
            return out
        out.append((len(blob), blob[0] if blob else -1))


def echo(rx: Any, tx: Any) -> int:
    """Send back every item of ``rx``, doubled; then close ``tx``."""
    n = 0
    with tx:
        for x in rx:
            tx.send(x * 2)
            n += 1
    return n


def recv_timeout(rx: Any, timeout: float) -> str:
    """The name of what ``rx.recv(timeout)`` raises."""
    try:
        rx.recv(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - its type is the answer
        return type(exc).__name__
    return "nothing"


class Streamer(offload.Actor):
    """An actor whose methods stream."""

    def __init__(self) -> None:
        self.total = 0

    def produce(self, tx: Any, n: int) -> str:
        for i in range(n):
            tx.send(i)
        return "produced"

    def consume(self, rx: Any) -> int:
        for x in rx:
            self.total += x
        return self.total


def consume_until_error(rx: Any) -> tuple[list[Any], str]:
    """What ``rx`` yields, then the name of the error that ended it ("" for none)."""
    got: list[Any] = []
    try:
        for x in rx:
            got.append(x)
    except Exception as exc:  # noqa: BLE001 - its type is the answer
        return got, type(exc).__name__
    return got, ""


def produce_then_raise(tx: Any, n: int) -> None:
    """Send ``n`` items, then raise the task's own exception."""
    for i in range(n):
        tx.send(i)
    raise ValueError("the task's own error")


def take(rx: Any, k: int) -> list[Any]:
    """The first ``k`` items of ``rx``; the call then ends, still holding ``rx``."""
    return [rx.recv(timeout=LIMIT) for _ in range(k)]


def send_until_full(tx: Any, timeout: float) -> int:
    """Send until a send times out (nobody reads); how many went."""
    sent = 0
    while True:
        try:
            tx.send(sent, timeout=timeout)
        except offload.ChannelTimeout:
            return sent
        sent += 1


def produce_nested(where: dict[str, Any], n: int) -> int:
    """Send 0..n-1 on the sender found at ``where["out"][0]`` (an end nested in an
    argument)."""
    tx = where["out"][0]
    for i in range(n):
        tx.send(i)
    return n


def _first_attempt(marker: str) -> bool:
    """True once: the first call to find no file at ``marker`` makes it (a retried
    call's attempts tell themselves apart by it). No marker (""): always."""
    if not marker:
        return True
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False


def produce_dying_once(tx: Any, n: int, marker: str) -> str:
    """Send (attempt, i) for i in 0..n-1; the first attempt then dies abruptly."""
    first = _first_attempt(marker)
    label = "first" if first else "again"
    for i in range(n):
        tx.send((label, i))
    if first:
        tx.flush()  # what was sent is on the wire before the process ends
        os._exit(3)
    return label


def take_dying_once(rx: Any, k: int, marker: str) -> list[Any]:
    """The first attempt takes ``k`` items and dies abruptly; the next returns the rest."""
    if _first_attempt(marker):
        for _ in range(k):
            rx.recv(timeout=LIMIT)
        os._exit(3)
    return list(rx)


def consume_async(rx: Any, announce: bool = False) -> tuple[list[Any], str]:
    """What ``rx`` yields to ``async for`` (in ``asyncio.run``), then the name of the
    error that ended it ("" for none). With ``announce``, a second coroutine reports
    "waiting" when it first runs, which is only once the iteration waits (the parent
    sends nothing before): were the wait to block the event loop, nothing would come."""
    import asyncio

    async def main() -> tuple[list[Any], str]:
        async def announce_waiting() -> None:
            if announce:
                offload.report("waiting")

        other = asyncio.ensure_future(announce_waiting())  # runs at the first wait
        got: list[Any] = []
        error = ""
        try:
            async for x in rx:
                got.append(x)
        except Exception as exc:  # noqa: BLE001 - its type is the answer
            error = type(exc).__name__
        await other
        return got, error

    return asyncio.run(main())
