"""Actor classes and tasks for ``test_actor.py`` (an importable module, not a test file).

Workers (local ones, an ``offload serve``'s, the actors' own processes) import this
module by reference, so everything here is module-level. Methods that block report
``"started"`` as progress first and wait with a bounded wait, so the tests synchronise
on that report, never on sleeps.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import offload

LIMIT = 30.0  # seconds a blocking method waits at most


class Boom(Exception):
    """A method's own exception; module-level, so it travels back as itself."""


class Counter(offload.Actor):
    """State, order, errors."""

    label = "a class attribute"

    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.seen: list[int] = []

    def add(self, k: int) -> int:
        self.n += k
        return self.n

    def get(self) -> int:
        return self.n

    def record(self, i: int) -> int:
        self.seen.append(i)
        return i

    def history(self) -> list[int]:
        return list(self.seen)

    def fail(self, message: str) -> None:
        self.n += 1000  # a change made before raising stays: the state is the actor's
        raise Boom(message)

    def pid(self) -> int:  # the handle's own `pid` wins: callable with handle.call
        return os.getpid()

    def getpid(self) -> int:
        return os.getpid()

    def block(self) -> None:
        offload.report("started")
        time.sleep(LIMIT)

    @property
    def doubled(self) -> int:
        return 2 * self.n

    def _private(self) -> int:
        return 1


class Overlap(offload.Actor):
    """Counts how many of its calls run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0

    def work(self, seconds: float = 0.002) -> int:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)  # work, not synchronisation: gives calls a chance to overlap
        with self.lock:
            self.now -= 1
        return self.calls

    def most_at_once(self) -> int:
        return self.most

    def meet(self, parties: int) -> bool:
        """Returns once ``parties`` calls are in here at once (bounded)."""
        barrier = self.__dict__.setdefault("barrier", threading.Barrier(parties))
        barrier.wait(LIMIT)
        return True


class Broken(offload.Actor):
    def __init__(self) -> None:
        raise Boom("no actor today")


def add_through(handle: Any, k: int) -> int:
    """In another worker: call the actor through the handle that travelled here."""
    return int(handle.add(k).result(LIMIT))


def add_nested(handles: list[Any], more: dict[str, Any], k: int) -> list[int]:
    """Handles nested in other arguments."""
    out = [int(h.add(k).result(LIMIT)) for h in handles]
    out += [int(h.add(k).result(LIMIT)) for h in more.values()]
    return out


def record_many(handle: Any, start: int, count: int) -> list[int]:
    """Submit ``count`` calls without waiting, then collect them (one client's order)."""
    futures = [handle.record(i) for i in range(start, start + count)]
    return [int(f.result(LIMIT)) for f in futures]


def work_many(handle: Any, count: int) -> int:
    futures = [handle.work() for _ in range(count)]
    return max(int(f.result(LIMIT)) for f in futures)


def call_on(worker: Any, fn: Any, *args: Any) -> Any:
    """In another worker: run ``fn`` on the worker whose handle travelled here."""
    return worker.call(fn, *args)


def getpid() -> int:
    return os.getpid()


class Forwarder(offload.Actor):
    """An actor that calls another actor through a handle it was given."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def add(self, k: int) -> int:
        return int(self.target.add(k).result(LIMIT))


def report_and_block() -> None:
    """Reports "started", then blocks (bounded)."""
    offload.report("started")
    time.sleep(LIMIT)
