"""The scheduler: which call runs on which worker slot, as a state machine with no I/O.

Theory of operation
-------------------
A *slot* is a place for one worker process; a worker handle has one slot, a pool has
``workers`` slots. Each slot goes through::

    EMPTY --start--> STARTING --ready--> READY --(max_tasks reached)--> RETIRING
      ^                 |                  |                               |
      |            start_failed         died / killed                 drained: stop
      |                 v                  |                               |
      +------ BACKOFF <-+    FAILED        +-------------------------------+--> EMPTY

Every process a slot starts gets a new *generation* number; events about an older
generation (a killed process that finally exits) are ignored, so a slot never confuses
its old process with its new one.

Calls wait in one FIFO queue in the parent; a READY slot is sent up to
``concurrency + prefetch`` of them. A slot with a deep pipeline (tiny calls) is refilled
only once half of its prefetch has run, so calls go out in batches, not one per result.
An adaptive prefetch sends nothing ahead to a slot whose running calls have all run far
longer than calls usually take (see ``_stalled``): the calls would wait behind them.
Calls sent ahead before its running calls turned out long are *asked back* once they
have, if another ready slot is not stalled (a KillCall each; ``_reclaim``): the worker
answers SKIPPED for those it has not started, and they go back to the front of the
queue (:meth:`Scheduler.reclaimed`), not counted as an attempt. The time at which a
slot will have stalled is a wake-up time, so the driver's timer brings that pass.
A worker starts the calls it receives in arrival
order, at most ``concurrency`` at once, so the first ``concurrency`` calls *outstanding*
on a slot are exactly the ones running: that is when their timeout clock starts, and
those are the only calls that fail when the worker dies. The others were never started
and go back to the front of the queue, to run on the replacement.

On an *independent* slot (a worker server) one call's process can die while the slot
lives on: the server replaces its worker and answers the call with a crash
(:meth:`Scheduler.call_crashed`). Like a call whose slot died, it goes back to the front
of the queue while its ``retries`` allow, and fails once it has crashed ``retries + 1``
times; both kinds of failure count against the same ``attempts``.

Every event method takes ``now`` (an injected clock reading) and returns the actions the
driver must carry out; the scheduler never does I/O, never sleeps and never reads a clock.
"""

from __future__ import annotations

import _heapq as heapq  # not heapq.py, which only adds what is not used here
import enum
from collections import deque
from collections.abc import Iterable

from offload._record import field, record  # not dataclasses: see offload._record

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

PIPELINE_SECONDS = 0.002  # work sent ahead to a worker running tiny calls
MAX_PREFETCH = 256  # calls sent ahead per unit of a worker's capacity, at most
SUBMIT_BATCH = 32  # submissions sent together to a worker that has work enough ahead
# A worker whose running calls have all run this long, and many times the average call,
# gets no calls sent ahead: they would wait for it while another worker may be free.
STALL_SECONDS = 0.05
STALL_FACTOR = 10


class SlotState(enum.Enum):
    """Where a worker slot is in its life."""

    EMPTY = "empty"
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"
    BACKOFF = "backoff"
    FAILED = "failed"


class Outcome(enum.Enum):
    """Why the scheduler resolves a call itself (results are resolved by the driver)."""

    TIMEOUT = "timeout"  # its own timeout passed: TaskTimeout
    KILLED = "killed"  # the user killed it (or shutdown(kill=True)): WorkerKilled
    CRASHED = "crashed"  # its worker died and no retries are left: WorkerCrashed
    COLLATERAL = "collateral"  # killed with a worker that was killed for another call
    START_FAILED = "start_failed"  # no worker could start for it: StartError
    CANCELLED = "cancelled"  # dropped from the queue by shutdown(cancel_futures=True)


# -- actions -------------------------------------------------------------------------------


@record(frozen=True, slots=True)
class StartWorker:
    """Start a process for ``slot``; report back with ``worker_ready``/``start_failed``."""

    slot: int
    gen: int


@record(frozen=True, slots=True)
class SendCalls:
    """Send these calls, in this order, to the process of ``slot``/``gen``."""

    slot: int
    gen: int
    call_ids: tuple[int, ...]


@record(frozen=True, slots=True)
class KillWorker:
    """Kill the process group of ``slot``/``gen`` now (its calls are already resolved)."""

    slot: int
    gen: int
    reason: str


@record(frozen=True, slots=True)
class KillCall:
    """Stop one call without the slot's process: on an *independent* slot (a remote
    server runs each call in its own process), or a call sent ahead that has not started
    (the worker drops it). The call is already resolved."""

    slot: int
    gen: int
    call_id: int


@record(frozen=True, slots=True)
class StopWorker:
    """Ask the process of ``slot``/``gen`` to exit once idle (graceful)."""

    slot: int
    gen: int


@record(frozen=True, slots=True)
class Resolve:
    """Fail (or cancel) a call; ``cause`` is what the driver passed with the event."""

    call_id: int
    outcome: Outcome
    slot: int | None = None
    cause: Any = None
    gen: int = 0  # the generation of the process the call was on


Action = StartWorker | SendCalls | KillWorker | KillCall | StopWorker | Resolve


# -- state ---------------------------------------------------------------------------------


@record(slots=True)
class CallEntry:
    """The scheduler's view of one call."""

    call_id: int
    timeout: float | None
    retries: int
    attempts: int = 0
    slot: int | None = None
    started_at: float | None = None
    deadline: float | None = None
    # Cancelled after it was sent ahead (already resolved): it keeps its place on the
    # slot until the worker answers, SKIPPED or, had it started, with a result, so the
    # calls behind it stay where the worker has them (a crash then is blamed right).
    withdrawn: bool = False
    # Sent ahead to a stalled worker and asked back (a Cancel) to run on another one:
    # a SKIPPED answer puts it back at the front of the queue (see Scheduler.reclaimed);
    # had it started meanwhile, its result counts as any other.
    reclaiming: bool = False


@record(slots=True)
class Slot:
    """The scheduler's view of one worker slot."""

    index: int
    capacity: int = 1  # calls its worker runs at once (a server says how many it has)
    independent: bool = False  # calls die one by one (remote servers), not with the slot
    state: SlotState = SlotState.EMPTY
    gen: int = 0
    outstanding: deque[int] = field(default_factory=deque)
    sent: int = 0  # calls sent to the current process
    start_failures: int = 0
    retry_at: float = 0.0


@record(frozen=True, slots=True)
class Counts:
    """Scheduler counters, for ``stats()`` and ``repr``."""

    busy: int
    idle: int
    starting: int
    queued: int  # not started: in the parent's queue, or sent ahead to a worker
    running: int


class Scheduler:
    """Assigns calls to worker slots.

    Args:
        slots: number of worker slots.
        concurrency: calls one worker runs at once.
        prefetch: calls sent to a worker beyond those it is running, to hide latency;
            None adapts it to how long calls take: deep pipelines for tiny calls (the
            round trip would dominate), none for long ones (a call waiting behind a long
            one on a busy worker could have run on an idle one), and none to a worker
            whose running calls have run far longer than the average.
        max_tasks: calls a process serves before it is replaced (None: unlimited).
        keep_warm: start processes before calls arrive (pools) rather than on demand
            (worker handles restart their process only when the next call comes).
        max_start_failures: consecutive start failures of a slot before the queued calls
            fail with StartError; the next submission tries again.
        backoff: first delay before restarting a slot whose start failed (doubles).
        independent: the slots whose calls die one by one, not with the slot (a worker
            server runs each call in a process of its own).
    """

    def __init__(
        self,
        slots: int,
        *,
        concurrency: int = 1,
        prefetch: int | None = None,
        max_tasks: int | None = None,
        keep_warm: bool = True,
        max_start_failures: int = 3,
        backoff: float = 0.05,
        independent: Iterable[int] = (),
    ) -> None:
        if slots < 1 or concurrency < 1:
            raise ValueError("slots and concurrency must be >= 1")
        self.concurrency = concurrency
        self.fixed_prefetch = None if prefetch is None else max(0, prefetch)
        self.avg_duration: float | None = None  # moving average of call durations
        self.max_tasks = max_tasks
        self.keep_warm = keep_warm
        self.max_start_failures = max_start_failures
        self.backoff = backoff
        independent = set(independent)
        self.slots = [
            Slot(i, capacity=concurrency, independent=i in independent) for i in range(slots)
        ]
        self.calls: dict[int, CallEntry] = {}
        self.queue: deque[int] = deque()
        self.closed = False
        self._deadlines: list[tuple[float, int]] = []
        # Set when a deadline or a back-off time was added: the driver re-arms its timer.
        self.wakeup_changed = False
        self.any_failed = False  # some slot is FAILED (kept, not recomputed per submit)
        # When a slot with calls sent ahead will have stalled, as the last scheduling
        # pass saw it (see _reclaim): never later than it will be (events that do not
        # schedule only make it later or moot), so a wake-up then is never late.
        self._stall_at: float | None = None

    def __repr__(self) -> str:
        states = " ".join(
            f"{slot.index}:{slot.state.value}/{len(slot.outstanding)}" for slot in self.slots
        )
        counts = self.counts()
        return (
            f"<Scheduler slots=[{states}] queued={counts.queued} running={counts.running} "
            f"calls={len(self.calls)}{' closed' if self.closed else ''}>"
        )

    # -- events from the caller ----------------------------------------------------------

    def set_keep_warm(self, keep_warm: bool) -> None:
        """Keep every slot started, or start one only when a call needs it."""
        self.keep_warm = keep_warm

    def start(self, now: float) -> list[Action]:
        """Start the slots that should be warm from the beginning."""
        actions: list[Action] = []
        for slot in self.slots:
            if slot.state is SlotState.EMPTY:
                actions.append(self._start(slot))
        return actions

    def submit(self, call_id: int, timeout: float | None, retries: int, now: float) -> list[Action]:
        """A new call."""
        return self.submit_entry(CallEntry(call_id, timeout, retries), now)

    def submit_entry(self, entry: CallEntry, now: float) -> list[Action]:
        """A new call, described by ``entry``: a driver may pass an instance of its own
        subclass that carries the driver's fields too (one object per call). The
        scheduler owns the fields of CallEntry; the driver never writes them."""
        call_id = entry.call_id
        self.calls[call_id] = entry
        queue = self.queue
        queue.append(call_id)
        if self.any_failed:  # a new call gives failed slots another try
            self.any_failed = False
            for slot in self.slots:
                if slot.state is SlotState.FAILED:
                    slot.state = SlotState.EMPTY
                    slot.start_failures = 0
        elif len(queue) > 1:
            if len(queue) % SUBMIT_BATCH:
                # Calls are waiting already: the slots are full or have work enough, and
                # the next result (or a full batch of submissions) decides where they go.
                return []
        elif not self.closed:
            # Nothing else waits: the first idle slot takes it, which is what the full
            # pass below would decide (an idle slot is the least loaded, and the pass
            # that ran at the previous event already started and stopped processes).
            for slot in self.slots:
                if slot.state is SlotState.READY and not slot.outstanding:
                    queue.pop()
                    entry.slot = slot.index
                    slot.outstanding.append(call_id)
                    self._count_sent(slot, 1)
                    self._mark_running(slot, now)
                    return [SendCalls(slot.index, slot.gen, (call_id,))]
        return self._schedule(now, eager=False)

    def cancel(self, call_id: int) -> bool:
        """Drop a call that is still queued in the parent; False if it was sent already."""
        entry = self.calls.get(call_id)
        if entry is None or entry.slot is not None:
            return False
        try:
            self.queue.remove(call_id)
        except ValueError:
            return False
        del self.calls[call_id]
        return True

    def withdraw(
        self, call_id: int, now: float, outcome: Outcome = Outcome.CANCELLED
    ) -> list[Action] | None:
        """Stop a call sent ahead to a worker that has not started it: it is resolved
        now (``outcome``) and the worker is told to skip it (KillCall). None if the call
        is unknown, still queued (see :meth:`cancel`), started or withdrawn already.

        A worker server drops it at once. A local worker may have read it already and
        answers SKIPPED when it comes to it (or its result, had it started meanwhile):
        until then the call keeps its place on the slot, withdrawn, so the scheduler
        still knows which calls the worker runs."""
        entry = self.calls.get(call_id)
        if entry is None or entry.slot is None or entry.started_at is not None:
            return None
        if entry.withdrawn:
            return None
        slot = self.slots[entry.slot]
        if slot.independent:
            return self._kill_one(slot, call_id, outcome, now) + self._schedule(now)
        entry.withdrawn = True
        return [
            KillCall(slot.index, slot.gen, call_id),
            Resolve(call_id, outcome, slot.index, call_id, slot.gen),
        ]

    def kill_call(self, call_id: int, now: float) -> list[Action]:
        """The user killed a call: its worker dies, the call fails with WorkerKilled."""
        entry = self.calls.get(call_id)
        if entry is None:
            return []
        if entry.slot is None:
            self.queue.remove(call_id)
            del self.calls[call_id]
            return [Resolve(call_id, Outcome.KILLED)]
        if entry.withdrawn:
            return []  # resolved already; the worker skips it or has run it
        slot = self.slots[entry.slot]
        if entry.started_at is None:
            # Sent ahead, not started: the worker drops it; the calls it runs go on.
            return self.withdraw(call_id, now, Outcome.KILLED) or []
        if slot.independent:
            # One call of a server: the server kills its process; the others go on.
            actions = self._kill_one(slot, call_id, Outcome.KILLED, now)
        else:
            actions = self._kill_slot(slot, "killed", now, primary=call_id, outcome=Outcome.KILLED)
        return actions + self._schedule(now)

    def kill_all(self, now: float) -> list[Action]:
        """Kill every worker; running calls fail with WorkerKilled (shutdown(kill=True))."""
        actions: list[Action] = []
        for slot in self.slots:
            # After shutdown, calls sent ahead die with the worker too (nothing may start
            # a replacement for them); otherwise they go to the next process.
            victims = [
                c for c in slot.outstanding if self.closed or self.calls[c].started_at is not None
            ]
            if slot.state in (SlotState.READY, SlotState.RETIRING, SlotState.STARTING):
                actions += self._kill_slot(
                    slot, "shutdown", now, primary=None, outcome=Outcome.KILLED, victims=victims
                )
        return actions + self._schedule(now)

    def shutdown(self, cancel_queued: bool, now: float) -> list[Action]:
        """No more submissions; idle workers stop once the queue has drained."""
        self.closed = True
        actions: list[Action] = []
        if cancel_queued:
            while self.queue:
                call_id = self.queue.popleft()
                del self.calls[call_id]
                actions.append(Resolve(call_id, Outcome.CANCELLED))
        return actions + self._schedule(now)

    def abort(self, now: float) -> list[Action]:
        """Shutdown's deadline passed: the calls still queued in the parent are
        cancelled, every worker is killed (its calls fail with WorkerKilled), and no
        process starts again. The scheduler is closed and idle afterwards."""
        self.closed = True
        actions: list[Action] = []
        while self.queue:
            call_id = self.queue.popleft()
            del self.calls[call_id]
            actions.append(Resolve(call_id, Outcome.CANCELLED))
        for slot in self.slots:
            # Calls sent ahead that the worker has not started are cancelled too.
            for call_id in self._split(slot)[1]:
                slot.outstanding.remove(call_id)
                del self.calls[call_id]
                actions.append(Resolve(call_id, Outcome.CANCELLED, slot.index, None, slot.gen))
        actions += self.kill_all(now)  # closed: nothing is requeued, nothing starts
        for slot in self.slots:
            if slot.state in (SlotState.BACKOFF, SlotState.FAILED):
                slot.state = SlotState.EMPTY
        return actions

    # -- events from the driver ----------------------------------------------------------

    def worker_ready(
        self, slot_index: int, gen: int, now: float, capacity: int | None = None
    ) -> list[Action]:
        """The process of ``slot``/``gen`` finished its handshake (and initializer);
        ``capacity`` is how many calls it runs at once, when the worker says so."""
        slot = self.slots[slot_index]
        if slot.gen != gen or slot.state is not SlotState.STARTING:
            return []
        if capacity is not None and capacity >= 1:
            slot.capacity = capacity
        slot.state = SlotState.READY
        slot.start_failures = 0
        return self._schedule(now)

    def start_failed(self, slot_index: int, gen: int, now: float, cause: Any) -> list[Action]:
        """The process of ``slot``/``gen`` could not start."""
        slot = self.slots[slot_index]
        if slot.gen != gen or slot.state is not SlotState.STARTING:
            return []
        slot.start_failures += 1
        actions: list[Action] = []
        if slot.start_failures >= self.max_start_failures:
            slot.state = SlotState.FAILED
            self.any_failed = True
            usable = (SlotState.READY, SlotState.STARTING, SlotState.RETIRING, SlotState.BACKOFF)
            if not any(s.state in usable for s in self.slots):
                while self.queue:
                    call_id = self.queue.popleft()
                    del self.calls[call_id]
                    actions.append(Resolve(call_id, Outcome.START_FAILED, slot_index, cause))
        else:
            slot.state = SlotState.BACKOFF
            slot.retry_at = now + self.backoff * 2 ** (slot.start_failures - 1)
            self.wakeup_changed = True
        return actions + self._schedule(now)

    def result(
        self, slot_index: int, gen: int, call_id: int, now: float, elapsed: float | None = None
    ) -> list[Action]:
        """The worker answered ``call_id``; the driver resolves the future itself.

        ``elapsed`` is how long the call ran in the worker, if it said. Results the
        scheduler does not expect (a call already resolved by a timeout or a kill; see
        :meth:`expects`) change nothing.
        """
        return self.results(slot_index, gen, [(call_id, elapsed)], now)

    def results(
        self,
        slot_index: int,
        gen: int,
        answered: Iterable[tuple[int, float | None]],
        now: float,
    ) -> list[Action]:
        """Several (call id, elapsed) results from one read: one scheduling pass."""
        slot = self.slots[slot_index]
        if slot.gen != gen:
            return []
        for call_id, elapsed in answered:
            entry = self.calls.get(call_id)
            if entry is None or entry.slot != slot_index:
                continue
            del self.calls[call_id]
            took = elapsed
            if took is None and entry.started_at is not None:
                took = now - entry.started_at
            if took is not None and not entry.withdrawn:
                avg = self.avg_duration
                self.avg_duration = took if avg is None else avg + 0.2 * (took - avg)
            try:
                slot.outstanding.remove(call_id)
            except ValueError:
                pass
        self._mark_running(slot, now)
        return self._schedule(now)

    def reclaimed(
        self, slot_index: int, gen: int, call_ids: Iterable[int], now: float
    ) -> list[Action]:
        """The worker of ``slot``/``gen`` answered these calls SKIPPED, which it was
        asked back (see :meth:`_reclaim`): they never ran, and go back to the front of
        the queue, for another worker (a withdrawn one was resolved already: it goes)."""
        slot = self.slots[slot_index]
        if slot.gen != gen:
            return []
        back: list[int] = []
        for call_id in call_ids:
            entry = self.calls.get(call_id)
            if entry is None or entry.slot != slot_index:
                continue
            try:
                slot.outstanding.remove(call_id)
            except ValueError:
                pass
            slot.sent -= 1  # it never ran here (max_tasks counts what a process ran)
            if entry.withdrawn:
                del self.calls[call_id]
            else:
                back.append(call_id)
        self._requeue_front(back)
        self._mark_running(slot, now)
        return self._schedule(now)

    def expects(self, slot_index: int, gen: int, call_id: int) -> bool:
        """Whether a result for ``call_id`` from ``slot``/``gen`` is current."""
        entry = self.calls.get(call_id)
        return entry is not None and entry.slot == slot_index and self.slots[slot_index].gen == gen

    def worker_died(self, slot_index: int, gen: int, now: float, cause: Any) -> list[Action]:
        """The process of ``slot``/``gen`` died without being asked to."""
        slot = self.slots[slot_index]
        if slot.gen != gen:
            return []
        if slot.state is SlotState.STARTING:
            return self.start_failed(slot_index, gen, now, cause)
        if slot.state not in (SlotState.READY, SlotState.RETIRING):
            return []
        return self._fail_slot(slot, now, cause, Outcome.CRASHED) + self._schedule(now)

    def worker_failed(self, slot_index: int, gen: int, now: float, cause: Any) -> list[Action]:
        """The driver decided the process of ``slot``/``gen`` must die (over memory,
        unresponsive): kill it, and its running calls fail as crashed (retryable)."""
        slot = self.slots[slot_index]
        if slot.gen != gen or slot.state not in (SlotState.READY, SlotState.RETIRING):
            return []
        old_gen = slot.gen
        actions = self._fail_slot(slot, now, cause, Outcome.CRASHED)
        return [KillWorker(slot_index, old_gen, "failed"), *actions, *self._schedule(now)]

    def call_crashed(
        self, slot_index: int, gen: int, call_id: int, now: float, cause: Any
    ) -> list[Action]:
        """The worker server on the independent slot ``slot``/``gen`` answered
        ``call_id`` with a crash of the process that ran it (the server replaced that
        process; the slot lives on). The call is sent again while its ``retries`` allow
        (each crash, here or of a whole slot, is one attempt), else it fails: a Resolve
        with ``Outcome.CRASHED`` and ``cause``. Nothing if the answer is not current
        (see :meth:`expects`)."""
        slot = self.slots[slot_index]
        entry = self.calls.get(call_id)
        if entry is None or entry.slot != slot_index or slot.gen != gen:
            return []
        try:
            slot.outstanding.remove(call_id)
        except ValueError:
            pass
        entry.attempts += 1
        actions: list[Action] = []
        if entry.withdrawn:  # resolved already: nothing to retry
            del self.calls[call_id]
        elif entry.attempts <= entry.retries:
            self._requeue_front([call_id])
        else:
            del self.calls[call_id]
            actions.append(Resolve(call_id, Outcome.CRASHED, slot_index, cause, gen))
        self._mark_running(slot, now)
        return actions + self._schedule(now)

    def recycle(self, slot_index: int, gen: int, now: float) -> list[Action]:
        """Replace the process of ``slot``/``gen`` once its calls finish (memory_limit)."""
        slot = self.slots[slot_index]
        if slot.gen != gen or slot.state is not SlotState.READY:
            return []
        slot.state = SlotState.RETIRING
        return self._schedule(now)

    def tick(self, now: float) -> list[Action]:
        """Time passed: fire timeouts and restart slots whose back-off is over."""
        actions: list[Action] = []
        expired: dict[int, list[int]] = {}  # slot -> calls whose own deadline passed
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, call_id = heapq.heappop(self._deadlines)
            entry = self.calls.get(call_id)
            if entry is None or entry.deadline != deadline or entry.slot is None:
                continue
            expired.setdefault(entry.slot, []).append(call_id)
        for index, call_ids in expired.items():
            slot = self.slots[index]
            if slot.independent:
                for call_id in call_ids:
                    actions += self._kill_one(slot, call_id, Outcome.TIMEOUT, now)
            else:  # one kill for all of them; each of them timed out itself
                actions += self._kill_slot(
                    slot,
                    "timeout",
                    now,
                    primary=call_ids[0],
                    outcome=Outcome.TIMEOUT,
                    victims=call_ids,
                )
        for slot in self.slots:
            if slot.state is SlotState.BACKOFF and slot.retry_at <= now:
                slot.state = SlotState.EMPTY
        return actions + self._schedule(now)

    def next_wakeup(self) -> float | None:
        """The clock reading at which :meth:`tick` has something to do, or None."""
        while self._deadlines:
            deadline, call_id = self._deadlines[0]
            entry = self.calls.get(call_id)
            if entry is not None and entry.deadline == deadline:
                break
            heapq.heappop(self._deadlines)
        times = [s.retry_at for s in self.slots if s.state is SlotState.BACKOFF]
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._stall_at is not None:  # as noted at the last scheduling pass
            times.append(self._stall_at)
        return min(times) if times else None

    # -- queries -------------------------------------------------------------------------

    def counts(self) -> Counts:
        """How many slots are busy/idle/starting and calls queued/running."""
        busy = idle = starting = running = 0
        waiting = len(self.queue)
        for slot in self.slots:
            if slot.state in (SlotState.STARTING, SlotState.BACKOFF):
                starting += 1
            elif slot.state in (SlotState.READY, SlotState.RETIRING):
                n = min(len(slot.outstanding), slot.capacity)
                running += n
                waiting += len(slot.outstanding) - n  # sent ahead, not started
                if n:
                    busy += 1
                else:
                    idle += 1
        return Counts(busy, idle, starting, waiting, running)

    def idle(self) -> bool:
        """No call queued or outstanding."""
        return not self.calls

    def slot_of(self, call_id: int) -> tuple[int, int] | None:
        """(slot, gen) a call was sent to, or None while it is queued."""
        entry = self.calls.get(call_id)
        if entry is None or entry.slot is None:
            return None
        return entry.slot, self.slots[entry.slot].gen

    # -- internals -----------------------------------------------------------------------

    def _start(self, slot: Slot) -> StartWorker:
        slot.gen += 1
        slot.state = SlotState.STARTING
        slot.sent = 0
        slot.outstanding.clear()
        return StartWorker(slot.index, slot.gen)

    def _count_sent(self, slot: Slot, count: int) -> None:
        """``count`` more calls went to ``slot``; it retires once it has had max_tasks."""
        slot.sent += count
        if self.max_tasks is not None and slot.sent >= self.max_tasks:
            slot.state = SlotState.RETIRING

    def _mark_running(self, slot: Slot, now: float) -> None:
        for i, call_id in enumerate(slot.outstanding):
            if i >= slot.capacity:
                break
            entry = self.calls[call_id]
            if entry.started_at is None:
                entry.started_at = now
                if entry.timeout is not None:
                    entry.deadline = now + entry.timeout
                    heapq.heappush(self._deadlines, (entry.deadline, call_id))
                    self.wakeup_changed = True

    def _requeue_front(self, call_ids: list[int]) -> None:
        for call_id in reversed(call_ids):
            entry = self.calls[call_id]
            if entry.withdrawn:  # resolved already: it never runs
                del self.calls[call_id]
                continue
            entry.slot = None
            entry.started_at = None
            entry.deadline = None
            entry.reclaiming = False
            self.queue.appendleft(call_id)

    def _fail_slot(self, slot: Slot, now: float, cause: Any, outcome: Outcome) -> list[Action]:
        """The slot's process is gone: resolve or retry its running calls, requeue the
        rest, and empty the slot. (Like every ``_kill``/``_fail`` helper it does not
        schedule: an event may kill several slots, and only then is it safe to send.)"""
        actions: list[Action] = []
        running, waiting = self._split(slot)
        retry: list[int] = []
        for call_id in running:
            entry = self.calls[call_id]
            entry.attempts += 1
            if entry.withdrawn:  # resolved already: it goes with its worker
                del self.calls[call_id]
            elif entry.attempts <= entry.retries:
                retry.append(call_id)
            else:
                del self.calls[call_id]
                actions.append(Resolve(call_id, outcome, slot.index, cause, slot.gen))
        self._requeue_front(retry + waiting)
        slot.outstanding.clear()
        slot.state = SlotState.EMPTY
        slot.gen += 1  # later events about the dead process are stale
        return actions

    def _kill_slot(
        self,
        slot: Slot,
        reason: str,
        now: float,
        *,
        primary: int | None,
        outcome: Outcome,
        victims: list[int] | None = None,
    ) -> list[Action]:
        """Kill the slot's process because of ``primary`` (or of all ``victims``)."""
        old_gen = slot.gen
        actions: list[Action] = [KillWorker(slot.index, old_gen, reason)]
        running, waiting = self._split(slot)
        retry: list[int] = []
        victims = victims if victims is not None else ([primary] if primary is not None else [])
        for call_id in running:
            if self.calls[call_id].withdrawn:  # resolved already: it goes with its worker
                del self.calls[call_id]
                continue
            if call_id in victims:
                del self.calls[call_id]
                actions.append(Resolve(call_id, outcome, slot.index, primary, old_gen))
                continue
            entry = self.calls[call_id]
            entry.attempts += 1
            if entry.attempts <= entry.retries:
                retry.append(call_id)
            else:
                del self.calls[call_id]
                actions.append(Resolve(call_id, Outcome.COLLATERAL, slot.index, primary, old_gen))
        for call_id in [c for c in waiting if c in victims and not self.calls[c].withdrawn]:
            waiting.remove(call_id)
            del self.calls[call_id]
            actions.append(Resolve(call_id, outcome, slot.index, primary, old_gen))
        self._requeue_front(retry + waiting)
        slot.outstanding.clear()
        slot.state = SlotState.EMPTY
        slot.gen += 1
        return actions

    def _kill_one(self, slot: Slot, call_id: int, outcome: Outcome, now: float) -> list[Action]:
        """Stop one call of an independent slot; the slot keeps its other calls."""
        del self.calls[call_id]
        try:
            slot.outstanding.remove(call_id)
        except ValueError:
            pass
        actions: list[Action] = [
            KillCall(slot.index, slot.gen, call_id),
            Resolve(call_id, outcome, slot.index, call_id, slot.gen),
        ]
        self._mark_running(slot, now)
        return actions

    def _split(self, slot: Slot) -> tuple[list[int], list[int]]:
        running = [c for c in slot.outstanding if self.calls[c].started_at is not None]
        waiting = [c for c in slot.outstanding if self.calls[c].started_at is None]
        return running, waiting

    def prefetch(self, slot: Slot) -> int:
        """Calls sent to ``slot`` beyond the ones it runs (see the class docstring)."""
        if self.fixed_prefetch is not None:
            return self.fixed_prefetch
        avg = self.avg_duration
        if avg is None:  # nothing known yet: a call might be long, keep slots balanced
            return 0 if len(self.slots) > 1 else slot.capacity
        if avg < 0.0005:
            # Tiny calls: about PIPELINE_SECONDS of work ahead, so the worker never waits
            # for the parent and sends and results travel in large batches.
            return min(MAX_PREFETCH, max(2, int(PIPELINE_SECONDS / max(avg, 1e-6)))) * slot.capacity
        if avg < 0.005:
            return 2 * slot.capacity
        return 0 if len(self.slots) > 1 else slot.capacity

    def prefetch_at(self, slot: Slot, now: float) -> int:
        """:meth:`prefetch` as a scheduling pass at ``now`` applies it: none while an
        adaptive slot is stalled (see :meth:`_stalled`)."""
        prefetch = self.prefetch(slot)
        if prefetch and self.fixed_prefetch is None and self._stalled(slot, now):
            return 0
        return prefetch

    def _stalled(self, slot: Slot, now: float) -> bool:
        """Whether each call ``slot`` runs has run for longer than STALL_SECONDS and
        STALL_FACTOR times the average call (adaptive prefetch then sends it nothing
        ahead: such calls would wait behind long ones, however fast they are)."""
        outstanding = slot.outstanding
        if len(outstanding) < slot.capacity:
            return False
        limit = max(STALL_SECONDS, STALL_FACTOR * (self.avg_duration or 0.0))
        calls = self.calls
        for i, call_id in enumerate(outstanding):
            if i >= slot.capacity:
                break
            started = calls[call_id].started_at
            if started is None or now - started <= limit:
                return False
        return True

    def _reclaim(self, now: float) -> list[Action]:
        """Ask a worker whose running calls have all run long (see :meth:`_stalled`)
        to give back the calls sent ahead to it (KillCall: it answers SKIPPED for those
        it has not started, see :meth:`reclaimed`), when another ready worker is not
        stalled: there, or wherever there is room first, they run before any call
        queued after them. Prefetch sends calls ahead only to workers that run short
        calls; this undoes it when one of them hits a long one.

        Also notes when the next such worker will be stalled (``_stall_at``, a wake-up
        time; ``wakeup_changed`` when it comes sooner than the one noted before).

        Not with a fixed prefetch: calls are sent ahead as asked, stalled or not (they
        would only be sent back); nor with one slot (there is nowhere else to run them)."""
        if self.fixed_prefetch is not None or len(self.slots) == 1:
            return []
        behind: list[Slot] = []  # slots with calls waiting behind their running ones
        progressing = False  # a ready slot is not stalled
        stalled: list[Slot] = []
        for slot in self.slots:
            if slot.state is not SlotState.READY and slot.state is not SlotState.RETIRING:
                continue
            is_stalled = self._stalled(slot, now)
            if len(slot.outstanding) > slot.capacity and not slot.independent:
                behind.append(slot)
                if is_stalled:
                    stalled.append(slot)
            if slot.state is SlotState.READY and not is_stalled:
                progressing = True
        actions: list[Action] = []
        at: float | None = None
        if behind and progressing:
            calls = self.calls
            for slot in stalled:
                for i, call_id in enumerate(slot.outstanding):
                    entry = calls[call_id]
                    if i < slot.capacity or entry.withdrawn or entry.reclaiming:
                        continue
                    entry.reclaiming = True
                    actions.append(KillCall(slot.index, slot.gen, call_id))
            at = self._stall_time(behind)
        before = self._stall_at
        self._stall_at = at
        if at is not None and (before is None or at < before or before <= now):
            self.wakeup_changed = True
        return actions

    def _stall_time(self, behind: list[Slot]) -> float | None:
        """The earliest time at which one of the slots ``behind`` will be stalled with
        calls waiting that were not asked back (None if there is none; a slot stalled
        already has none: :meth:`_reclaim` asked for them all)."""
        limit = max(STALL_SECONDS, STALL_FACTOR * (self.avg_duration or 0.0))
        calls = self.calls
        soonest: float | None = None
        for slot in behind:
            latest = 0.0  # the start of its last running call
            for i, call_id in enumerate(slot.outstanding):
                entry = calls[call_id]
                if i < slot.capacity:
                    if entry.started_at is None:
                        break
                    latest = max(latest, entry.started_at)
                elif not (entry.reclaiming or entry.withdrawn):  # one to take back
                    when = latest + limit + 1e-3  # just past the limit (see _stalled)
                    if soonest is None or when < soonest:
                        soonest = when
                    break
        return soonest

    def _schedule(self, now: float, *, eager: bool = True) -> list[Action]:
        """Send queued calls to ready slots; start, stop and retire processes.

        Not ``eager`` (a submission): a slot with a deep pipeline that still has work
        ahead of it takes calls only once a batch of them waits, so a flood of
        submissions goes out in batches instead of one write per call.
        """
        if not self.queue and not self.closed:
            for slot in self.slots:
                if slot.state is not SlotState.READY:
                    break
            else:
                # Every slot is busy or idle and nothing waits: nothing to send, but
                # calls waiting behind a long one may be taken back for another worker.
                return self._reclaim(now)
        actions: list[Action] = []
        sends: dict[int, list[int]] = {}
        limits: list[int] = []
        for slot in self.slots:
            prefetch = self.prefetch_at(slot, now)
            # A slot with a deep pipeline is refilled once it has run down to half of its
            # prefetch, in one batch: fewer, larger writes (each write wakes the worker).
            deep = prefetch >= 8
            low_water = slot.capacity + (prefetch // 2 if deep else prefetch)
            ahead = len(slot.outstanding)
            open_ = (
                slot.state is SlotState.READY
                and ahead < low_water
                and (
                    eager
                    or not deep
                    or ahead < 2 * slot.capacity
                    or len(self.queue) >= SUBMIT_BATCH
                )
            )
            limits.append(slot.capacity + prefetch if open_ else 0)
        queue, calls = self.queue, self.calls
        while queue:
            best: Slot | None = None
            best_load = 0.0
            candidates = 0
            for slot in self.slots:
                if slot.state is not SlotState.READY or len(slot.outstanding) >= limits[slot.index]:
                    continue
                candidates += 1
                load = len(slot.outstanding) / slot.capacity
                if best is None or load < best_load:
                    best, best_load = slot, load
            if best is None:
                break
            # The least loaded slot takes a call; when it is the only one with room, it
            # takes all it can at once (the usual refill of a deep pipeline).
            take = 1
            if candidates == 1:
                take = min(len(queue), limits[best.index] - len(best.outstanding))
                if self.max_tasks is not None:
                    take = max(1, min(take, self.max_tasks - best.sent))
            index = best.index
            batch = sends.setdefault(index, [])
            outstanding = best.outstanding
            for _ in range(take):
                call_id = queue.popleft()
                calls[call_id].slot = index
                outstanding.append(call_id)
                batch.append(call_id)
            self._count_sent(best, take)
        for index, call_ids in sends.items():
            slot = self.slots[index]
            self._mark_running(slot, now)
            actions.append(SendCalls(index, slot.gen, tuple(call_ids)))
        actions += self._reclaim(now)
        # Calls that slots already starting will take do not need another process.
        demand = len(self.queue) - sum(
            s.capacity for s in self.slots if s.state in (SlotState.STARTING, SlotState.BACKOFF)
        )
        for slot in self.slots:
            retiring = slot.state is SlotState.RETIRING
            closing = slot.state is SlotState.READY and self.closed and not self.queue
            if (retiring or closing) and not slot.outstanding:
                actions.append(StopWorker(slot.index, slot.gen))
                slot.state = SlotState.EMPTY
                slot.gen += 1
            wanted = demand > 0 or (self.keep_warm and not self.closed)
            if slot.state is SlotState.EMPTY and not self.closed_for_new(slot) and wanted:
                actions.append(self._start(slot))
                demand -= slot.capacity
        return actions

    def closed_for_new(self, slot: Slot) -> bool:
        """Whether no new process may start (shut down with nothing queued)."""
        return self.closed and not self.queue
