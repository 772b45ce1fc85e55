"""Slots whose worker holds state (actors): its first process is the only one.

A worker handle's slot starts a fresh process when the last one died; an actor's must
not, or its state would be silently recreated. :class:`StatefulSlots` is a slot factory
that wraps another one (a local process, a connection to an actor's listener, a worker
over ssh: whatever the inner factory makes, so *how* the actor's process is started
stays the inner factory's business):

* until a worker of the slot has been ready, it makes the inner kind (a connection
  that could not be made may be tried again: nothing was lost);
* it watches that worker's end (a :class:`~offload.client.slot.SlotHost` in between the
  worker and the engine notes the :class:`~offload.client.slot.ExitInfo`);
* every later start of the slot is a :class:`DeadSlot`, which reports that end as the
  reason it cannot start: the calls that were waiting, and every later call, fail with
  the error :func:`offload.client.outcome.actor_gone` makes of it (``WorkerCrashed``
  with the signal, exit status and stderr of the death; ``ConnectionLost`` for a
  connection; ``WorkerKilled`` when this handle killed it).

The engine needs no policy for this: to it, the slot's worker could not start again.
``on_failure`` fires once, for the one death (a DeadSlot never exits).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from offload.client import outcome
from offload.client.slot import ExitInfo, SlotFactory, SlotHost, WorkerSlot

if TYPE_CHECKING:
    from offload import protocol as p
    from offload.client.future import Future
    from offload.client.options import WorkerOptions
    from offload.protocol.messages import CallFields
    from offload.transport.loop import Loop


class StatefulSlots:
    """A slot factory (see :data:`~offload.client.slot.SlotFactory`) whose slot never
    gets a second worker: see the module documentation.

    Args:
        inner: makes the one worker (e.g. ``LocalSlot``).
    """

    def __init__(self, inner: SlotFactory) -> None:
        self.inner = inner
        self.first: WorkerSlot | None = None  # the worker that became ready
        self.end: ExitInfo | None = None  # how it ended
        self.ended = threading.Event()  # set once it has ended
        self._waiting: list[DeadSlot] = []  # started before the end was known

    def __repr__(self) -> str:
        state = "never ready" if self.first is None else "alive" if self.end is None else "dead"
        return f"<StatefulSlots {state} end={self.end}>"

    @property
    def dead(self) -> bool:
        """Whether the one worker has ended."""
        return self.end is not None

    def error(self) -> BaseException | None:
        """What a call made now fails with (None while the worker lives)."""
        end, first = self.end, self.first
        if end is None or first is None:
            return None
        return outcome.actor_gone(end, killed=first.expected_exit)

    def __call__(self, host: SlotHost, index: int, gen: int, name: str) -> WorkerSlot:
        if self.first is None:
            return self.inner(_Watch(host, self), index, gen, name)
        return DeadSlot(host, index, gen, name, self)

    def _ready(self, proc: WorkerSlot) -> None:
        if self.first is None:
            self.first = proc

    def _ended(self, proc: WorkerSlot, info: ExitInfo) -> None:
        if proc is not self.first or self.end is not None:
            return
        self.end = info
        self.ended.set()
        waiting, self._waiting = self._waiting, []
        for dead in waiting:
            dead.report()

    def _wait(self, dead: DeadSlot) -> None:
        if self.end is None:
            self._waiting.append(dead)
        else:
            dead.report()


class _Watch:
    """Stands between the one worker and the engine (a SlotHost): passes everything on,
    noting when the worker became ready and how it ended."""

    def __init__(self, host: SlotHost, slots: StatefulSlots) -> None:
        self._host = host
        self._slots = slots
        self.options: WorkerOptions = host.options
        self.loop: Loop = host.loop
        self.label: str = host.label

    def worker_ready(self, proc: WorkerSlot, capacity: int | None = None) -> None:
        self._slots._ready(proc)
        self._host.worker_ready(proc, capacity)

    def start_failed(self, proc: WorkerSlot, error: BaseException) -> None:
        self._host.start_failed(proc, error)

    def on_results(self, proc: WorkerSlot, msgs: list[p.Result]) -> None:
        self._host.on_results(proc, msgs)

    def on_progress(self, msg: p.Progress) -> None:
        self._host.on_progress(msg)

    def on_channel(self, msg: p.Message) -> None:
        self._host.on_channel(msg)

    def worker_failed(self, proc: WorkerSlot, reason: str, detail: str) -> None:
        self._host.worker_failed(proc, reason, detail)

    def check_memory(self, proc: WorkerSlot) -> None:
        self._host.check_memory(proc)

    def process_exited(self, proc: WorkerSlot, info: ExitInfo) -> None:
        # Noted first: the engine may start the slot again at once (calls that were
        # sent ahead go back to the queue), and that start must find the end known.
        self._slots._ended(proc, info)
        self._host.process_exited(proc, info)

    def discard(self, proc: WorkerSlot) -> None:
        self._host.discard(proc)


class DeadSlot:
    """A later start of an actor's slot: it never runs anything; it reports the end of
    the actor's one worker as the reason it cannot start (at once, or when that end is
    known: a worker killed on purpose is reported gone a moment after the kill)."""

    def __init__(self, host: SlotHost, slot: int, gen: int, name: str, slots: StatefulSlots):
        self.host = host
        self.slot = slot
        self.gen = gen
        self.name = name
        self.ready = False
        self.expected_exit = True  # it has nothing to lose
        self._slots = slots
        self._reported = False

    def __repr__(self) -> str:
        return f"<DeadSlot {self.name} slot={self.slot} gen={self.gen}>"

    @property
    def pid(self) -> int | None:
        """The pid of the actor's one worker, which is gone."""
        first = self._slots.first
        return first.pid if first is not None else None

    @property
    def local_pid(self) -> int | None:
        """None: no process."""
        return None

    @property
    def alive(self) -> bool:
        """False."""
        return False

    @property
    def launched(self) -> bool:
        """False: nothing was launched, no exit will be reported."""
        return False

    def start(self) -> None:
        """Report the actor's end (now, or once it is known)."""
        self._slots._wait(self)

    def report(self) -> None:
        """Tell the engine this worker cannot start, and why (loop thread)."""
        if self._reported:
            return
        self._reported = True
        error = self._slots.error()
        assert error is not None
        self.host.start_failed(self, error)

    def send_calls(self, calls: list[CallFields]) -> None:
        """Never called (never ready)."""

    def flush(self) -> None:
        """Nothing to write."""

    def pump(self, future: Future[Any]) -> None:
        """Nothing to read."""

    def claim(self) -> bool:
        """Nothing to read."""
        return False

    def pump_claimed(self, done: Callable[[], bool], window: float) -> None:
        """Nothing to read."""

    def stop(self) -> None:
        """Nothing to stop."""

    def kill(self, reason: str = "") -> None:
        """Nothing to kill."""

    def kill_call(self, call_id: int) -> None:
        """Nothing runs."""

    def rss(self) -> int:
        """No process."""
        return 0
