"""The driver: carries out the scheduler's decisions with whatever fills the slots.

:class:`Engine` owns a :class:`~offload.client.scheduler.Scheduler`, the worker of each
slot (a :class:`~offload.client.slot.WorkerSlot` made by the slot factory it was given:
a local process, a connection to a worker server, ...) and a record per call. Every
stimulus (a submission from a user thread; a result, an exit or a timer from the I/O
loop) is handled the same way: under the engine lock, feed the scheduler, then carry out
its actions. Sends happen under the lock so a slot's calls reach its worker in the order
the scheduler decided; resolving futures (which runs user callbacks) happens after the
lock is released. The errors futures fail with are made in :mod:`offload.client.outcome`.

The engine never knows which kind of worker a slot holds, and no slot kind imports it:
slots report through the :class:`~offload.client.slot.SlotHost` protocol.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import sys
import threading
from collections.abc import Iterable

from offload import protocol as p
from offload._record import replace
from offload.client import lifetime, outcome
from offload.client.call import QueueBudget, encode_call
from offload.client.future import Future
from offload.client.options import WorkerOptions
from offload.client.scheduler import (
    Action,
    KillCall,
    KillWorker,
    Outcome,
    Resolve,
    Scheduler,
    SendCalls,
    StartWorker,
    StopWorker,
)
from offload.client.slot import (
    PUMP_WINDOW,
    CallRecord,
    ExitInfo,
    RawSink,
    SlotFactory,
    WorkerSlot,
)
from offload.errors import OffloadError, WorkerCrashed
from offload.process.child import KILL_GRACE
from offload.serde import loads
from offload.transport.loop import Loop, Timer, get_loop

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("offload")
log.addHandler(logging.NullHandler())  # a library stays quiet unless configured
# After the kill grace, how long an abort waits for killed processes to be reported
# gone (a pidfd fires at once; this only bounds a process that cannot be reaped).
ABORT_MARGIN = 5.0
_call_ids = itertools.count(1)


def _new_attempt(call_id: int) -> None:
    """A call is sent again after its worker failed (``retries``): the channel ends it
    holds start afresh, before the new attempt can talk (see ``channels.retried``)."""
    channels = sys.modules.get("offload.client.channels")
    if channels is not None:  # not imported: no call holds a channel end
        channels.retried(call_id)


def _forget_arguments(record: CallRecord) -> None:
    """Drop what a relayed call that started carries, now that its frame holds it: a
    worker server then holds a client's 64 MiB argument until the worker has read it,
    not until the result comes back (a second 64 MiB). Such a call is never sent again
    (relayed calls have no retries); a crash dump, if asked for, still wants it."""
    if not os.environ.get("OFFLOAD_DUMP_DIR"):
        record.payload, record.buffers = b"", ()


class Engine:
    """Runs calls on ``slots`` workers with the given options.

    Args:
        options: the worker options.
        slots: number of worker slots.
        slot_factory: makes the worker of a slot (see :data:`~offload.client.slot.SlotFactory`).
        independent: the slots whose calls die one by one (a worker server runs each
            call in its own process), not with the slot.
        keep_warm: keep every slot started (pools) or start on demand (handles).
        max_start_failures: see :class:`Scheduler`.
        prefetch: see :class:`Scheduler` (None: adaptive).
        label: a name for this engine in logs (the pool or worker name).
        names: the name of each slot's worker.
        loop: the I/O loop (the process-wide one by default).
    """

    def __init__(
        self,
        options: WorkerOptions,
        slots: int = 1,
        *,
        keep_warm: bool = False,
        max_start_failures: int = 3,
        prefetch: int | None = None,
        label: str = "",
        names: list[str] | None = None,
        slot_factory: SlotFactory,
        independent: Iterable[int] = (),
        loop: Loop | None = None,
    ) -> None:
        self.options = options
        self.slot_factory = slot_factory
        self.independent = frozenset(independent)
        self.loop = loop or get_loop()
        self.label = label
        self.names = names or [options.name or "offload-worker"] * slots
        self.scheduler = Scheduler(
            slots,
            concurrency=options.concurrency,
            prefetch=prefetch,
            max_tasks=options.max_tasks,
            keep_warm=keep_warm,
            max_start_failures=max_start_failures,
            independent=self.independent,
        )
        self.lock = threading.Lock()
        self.records: dict[int, CallRecord] = {}
        self.procs: dict[tuple[int, int], WorkerSlot] = {}  # (slot, gen) -> its worker
        self.current: dict[int, WorkerSlot] = {}  # slot -> its newest worker
        self.exited = threading.Condition(self.lock)
        # Outcomes counted where futures resolve, outside the engine lock: their own lock.
        self._stats_lock = threading.Lock()
        self.stats_done = 0
        self.stats_failed = 0
        self.restarts = 0
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._ready_events: dict[int, threading.Event] = {}
        self._waiting_call = 0  # a call whose submitter will block on it (lock held)
        self._killed_pids: dict[int, tuple[int, int | None]] = {}  # slot -> (gen, pid)
        self._started_slots: set[int] = set()  # a later start there is a restart
        self._claimed: WorkerSlot | None = None  # whose answers that submitter reads
        self._unflushed: list[WorkerSlot] = []  # calls queued on them, not yet written
        self._last_start_error: dict[int, BaseException] = {}
        self._signalled: dict[int, str] = {}  # pid -> the signal pool.kill() sent it
        self._drain_waiters = 0  # threads in wait_calls (lock held to change)
        self.budget = QueueBudget(self.lock)  # pickled arguments waiting in the queue
        # The process that made this engine: its workers, sockets and threads exist
        # only there. A forked child that inherited the object must not touch them.
        self.owner_pid = os.getpid()
        self._forks = lifetime.forks  # how many forks deep this process is (see owned_here)
        lifetime.track(self)

    def __repr__(self) -> str:
        counts = self.scheduler.counts()
        state = " closed" if self.scheduler.closed else ""
        return (
            f"<Engine {self.label or '-'} slots={len(self.scheduler.slots)} busy={counts.busy} "
            f"idle={counts.idle} starting={counts.starting} queued={counts.queued} "
            f"running={counts.running}{state}>"
        )

    # -- user-facing operations ----------------------------------------------------------

    def start(self) -> None:
        """Start the slots that are kept warm."""
        with self.lock:
            deferred = self._apply(self.scheduler.start(self.loop.clock()))
        self._resolve(deferred)

    def submit(
        self,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        timeout: float | None = None,
        retries: int = 0,
        wait: bool = False,
    ) -> Future[Any]:
        """Queue a call; the returned future always resolves.

        With ``wait``, the caller is about to block on the result: if the call goes to a
        worker at once, this thread reads the answer itself (see ``Channel.claim``).

        Raises:
            RuntimeError: after shutdown.
        """
        call_id = next(_call_ids)
        future: Future[Any] = Future(self, call_id)
        record = encode_call(
            fn,
            args,
            kwargs,
            call_id=call_id,
            future=future,
            timeout=timeout,
            retries=retries,
            max_message_size=self.options.max_message_size,
        )
        if record is None:
            return future  # failed already: the arguments could not travel
        try:
            self._schedule_new(record, wait=wait)
        except RuntimeError:
            # Never to run: a channel end it holds must not wait for it to end.
            future._cancel_now(force=True)
            raise
        return future

    @property
    def in_flight(self) -> int:
        """Calls submitted and not resolved yet (queued or on a worker); a lock-free
        reading, for heuristics."""
        return len(self.records)

    @staticmethod
    def new_call_id() -> int:
        """A fresh call id (for :meth:`submit_raw`)."""
        return next(_call_ids)

    def submit_raw(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        """Run a call that is already pickled (a server relaying a client's call) under
        ``call_id`` (from :meth:`new_call_id`; the caller files it before the outcome can
        arrive, which may be on another thread at once).

        Nothing is unpickled here: ``sink.call_done`` gets the worker's Result message,
        or the OffloadError the call failed with, on the thread that learned it; it must
        be quick.

        Raises:
            RuntimeError: after shutdown.
        """
        record = CallRecord(
            call_id=call_id,
            timeout=call.timeout or None,
            retries=0,
            future=Future(self, call_id),
            kind=call.kind,
            target=call.target,
            function=call.function,
            payload=call.payload,
            buffers=call.buffers,
            fn=call.target,
            sink=sink,
        )
        self._schedule_new(record, wait=False)

    def _schedule_new(self, record: CallRecord, *, wait: bool) -> None:
        """Hand a new call to the scheduler. With ``wait``, a call that goes to a
        worker at once has its answer read on this thread (see ``Channel.claim``).

        Raises:
            RuntimeError: after shutdown.
        """
        future = record.future
        self.check_owner()
        with self.lock:
            if record.queued_bytes:
                self.budget.wait_for_room(record.queued_bytes, self.scheduler)
            if self.scheduler.closed:
                raise RuntimeError("cannot submit after shutdown")
            self.budget.take(record)
            self.records[record.call_id] = record
            self._waiting_call = record.call_id if wait else 0
            deferred = self._apply(self.scheduler.submit_entry(record, self.loop.clock()))
            claimed, self._claimed = self._claimed, None
        self._resolve(deferred)
        if claimed is not None:
            claimed.pump_claimed(future.done, PUMP_WINDOW)

    def cancel(self, call_id: int) -> bool:
        """Drop a call that has not started: queued here, or sent ahead to a worker (which
        is told to skip it). False once its worker started it. The caller (the future)
        marks itself cancelled."""
        self.check_owner()
        with self.lock:
            if not self.scheduler.cancel(call_id):
                actions = self.scheduler.withdraw(call_id, self.loop.clock())
                if actions is None:
                    return False
                # The call's own Resolve is the caller's to carry out.
                deferred = self._apply(
                    [a for a in actions if not (isinstance(a, Resolve) and a.call_id == call_id)]
                )
            else:
                deferred = []
            record = self.records.pop(call_id, None)
            if record is not None:
                self.budget.release(record)
            self._note_drained()
        self._resolve(deferred)
        return True

    def kill_call(self, call_id: int) -> bool:
        """Kill the worker running ``call_id``; the call fails with WorkerKilled."""
        self.check_owner()
        with self.lock:
            if call_id not in self.records:
                return False
            deferred = self._apply(self.scheduler.kill_call(call_id, self.loop.clock()))
            self._promote_all()
        self._resolve(deferred)
        return True

    def kill_all(self) -> None:
        """Kill every worker now; running calls fail with WorkerKilled."""
        self.check_owner()
        with self.lock:
            deferred = self._apply(self.scheduler.kill_all(self.loop.clock()))
        self._resolve(deferred)

    def shutdown(self, *, wait: bool, cancel_futures: bool, timeout: float | None) -> None:
        """Stop accepting calls; let workers finish (or kill them after ``timeout``).

        In a forked child that inherited this engine it does nothing: the workers are
        the parent's, and so is shutting them down."""
        if not self.owned_here():
            return
        with self.lock:
            deferred = self._apply(self.scheduler.shutdown(cancel_futures, self.loop.clock()))
            self.budget.wake_all()  # a submit() waiting for room raises: shut down
        self._resolve(deferred)
        if not wait:
            return
        if not self.wait_idle(timeout):
            self.abort()

    def abort(self, *, wait: bool = True) -> None:
        """End everything now: queued calls are cancelled, running ones fail with
        WorkerKilled, every process (also those stopping gracefully) is killed, and no
        process starts again. With ``wait``, returns once they have exited (SIGTERM,
        the kill grace, then SIGKILL), or, should one never be reported gone, after a
        bound. In a forked child that inherited the engine it does nothing."""
        if not self.owned_here():
            return
        with self.lock:
            deferred = self._apply(self.scheduler.abort(self.loop.clock()))
            procs = list(self.procs.values())
        self._resolve(deferred)
        for proc in procs:
            proc.kill("shutdown")
        if wait and not self.wait_idle(KILL_GRACE + ABORT_MARGIN):
            log.warning("offload: %r did not see every worker exit after killing it", self)

    def shutdown_dropped(self, cancel_futures: bool) -> None:
        """:meth:`shutdown` without waiting, for the finalizer of a handle or pool
        dropped without ``shutdown()``.

        The garbage collector runs finalizers wherever it runs: possibly on a thread that
        holds this engine's lock or one of its channels' (an allocation inside the
        engine), where shutting down at once would wait for that lock forever. So the
        shutdown goes to the I/O thread, without taking any lock on the way; at
        interpreter exit (the main thread has stopped, nothing of offload runs on it) it
        happens here.
        """
        if not self.owned_here():
            return  # inherited through fork: the parent's to shut down
        if threading.main_thread().is_alive():
            self.loop.call_soon_from_anywhere(self._shutdown_nowait, cancel_futures)
        else:
            self._shutdown_nowait(cancel_futures)

    def _shutdown_nowait(self, cancel_futures: bool) -> None:
        self.shutdown(wait=False, cancel_futures=cancel_futures, timeout=None)

    def owned_here(self) -> bool:
        """Whether this process made the engine (False in a forked child). Reads a
        counter that every fork's child increments, not the pid: no system call on the
        path of each submission."""
        return self._forks == lifetime.forks

    def check_owner(self) -> None:
        """Raise unless this process made the engine.

        Raises:
            RuntimeError: called in a process forked from the one that made it.
        """
        if self._forks != lifetime.forks:
            raise RuntimeError(
                f"{self.label or 'this offload object'} was made in process {self.owner_pid}, "
                f"the parent of this forked process ({os.getpid()}); its workers belong to "
                "the parent and cannot be used here: make a new offload.Pool or "
                "offload.spawn() in the child"
            )

    def barrier(self) -> None:
        """Return once the I/O loop has run everything handed to it so far (the last
        done-callbacks included)."""
        if not self.loop.in_loop():
            try:
                self.loop.run_sync(lambda: None)
            except Exception:  # noqa: BLE001 - a loop that is gone has nothing left to run
                pass

    def _note_drained(self) -> None:
        """Calls were removed from ``records`` (lock held): wake :meth:`wait_calls`."""
        if self._drain_waiters and not self.records:
            self.exited.notify_all()

    def wait_calls(self, timeout: float | None) -> bool:
        """Wait until every call submitted so far has resolved (the workers stay)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        with self.exited:
            self._drain_waiters += 1
            try:
                while self.records:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self.exited.wait(remaining)
            finally:
                self._drain_waiters -= 1
        return True

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call is pending and every process has exited."""
        import time

        if not self.owned_here():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.exited:
            while self.records or self.procs:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.exited.wait(remaining)
        return True

    def wait_ready(self, slot: int = 0) -> None:
        """Block until ``slot`` is ready; raise its StartError if it could not start."""
        with self.lock:
            proc = self.current.get(slot)
            if proc is not None and proc.ready:
                return
            err = self._last_start_error.pop(slot, None)
            if err is not None:  # it failed before we started waiting
                raise err
            event = self._ready_events.setdefault(slot, threading.Event())
        event.wait()
        with self.lock:
            self._ready_events.pop(slot, None)
            err = self._last_start_error.pop(slot, None)
        if err is not None:
            raise err

    def running_calls(self, slot: int, gen: int) -> list[CallRecord]:
        """The calls that process ``gen`` of ``slot`` runs now: the first ``capacity``
        of those sent to it (a worker runs its calls in the order they were sent); none
        once that process is no longer the slot's. Any thread."""
        with self.lock:
            state = self.scheduler.slots[slot]
            if state.gen != gen:
                return []
            records = self.records
            running = itertools.islice(state.outstanding, state.capacity)
            return [record for call_id in running if (record := records.get(call_id))]

    def stop_keeping_warm(self) -> None:
        """From now on start a slot's worker only when a call needs it (a worker handle
        after its first start: it restarts lazily, on the next call)."""
        with self.lock:
            self.scheduler.set_keep_warm(False)

    # -- events from the slots (SlotHost; loop thread) ----------------------------------

    def worker_ready(self, proc: WorkerSlot, capacity: int | None = None) -> None:
        with self.lock:
            self._last_start_error.pop(proc.slot, None)
            event = self._ready_events.get(proc.slot)
            deferred = self._apply(
                self.scheduler.worker_ready(proc.slot, proc.gen, self.loop.clock(), capacity)
            )
        if event is not None:
            event.set()
        self._resolve(deferred)

    def discard(self, proc: WorkerSlot) -> None:
        """Forget a slot process that never ran (killed or failed before launching)."""
        with self.lock:
            self.procs.pop((proc.slot, proc.gen), None)
            if self.current.get(proc.slot) is proc:
                del self.current[proc.slot]
            self.exited.notify_all()

    def start_failed(self, proc: WorkerSlot, error: BaseException) -> None:
        log.warning("offload: %s", error)
        if not proc.launched:  # nothing was launched, so no exit will be reported
            self.discard(proc)
        with self.lock:
            self._last_start_error[proc.slot] = error
            event = self._ready_events.get(proc.slot)
            deferred = self._apply(
                self.scheduler.start_failed(proc.slot, proc.gen, self.loop.clock(), error)
            )
        if event is not None:
            event.set()
        self._resolve(deferred)

    def on_results(self, proc: WorkerSlot, msgs: list[p.Result]) -> None:
        """Results read in one go from ``proc``: one lock round, one scheduling pass."""
        if proc.slot in self.independent and any(outcome.is_crash(msg) for msg in msgs):
            msgs = self._on_remote_crashes(proc, msgs)
            if not msgs:
                proc.flush()  # calls queued for this worker wait for no other result
                return
        with self.lock:
            answered = [
                msg for msg in msgs if self.scheduler.expects(proc.slot, proc.gen, msg.call_id)
            ]  # others were resolved already (timeout, kill) or are stray ids
            answered, given_back = self._take_back(proc, answered)
            if answered:
                records = self.records
                # A withdrawn call (cancelled after it was sent ahead) has no record
                # left: its answer only frees its place on the slot.
                expected = [
                    (record, msg)
                    for msg in answered
                    if (record := records.pop(msg.call_id, None)) is not None
                ]
                self._note_drained()
                deferred = self._apply(
                    self.scheduler.results(
                        proc.slot,
                        proc.gen,
                        [(msg.call_id, msg.elapsed) for msg in answered],
                        self.loop.clock(),
                    )
                )
                if given_back:
                    deferred += given_back
            self._promote(proc.slot)
        if not answered:
            proc.flush()
            if given_back is not None:  # only calls given back: now on other workers
                self._flush()
                self._resolve(given_back)
            return
        proc.flush()  # the calls waiting for this worker's results
        self._flush()  # and those just sent to any worker, before the results
        sinks: set[RawSink] = set()
        done = 0
        for record, msg in expected:
            sink = record.sink
            if sink is None:
                if msg.status == p.FAILED:  # a worker server's own error: a crash there?
                    self._save_crashed(
                        record,
                        outcome.result_error(
                            msg, call=outcome.describe(record), worker=proc.name, pid=proc.pid
                        ),
                        proc.slot,
                    )
                done += outcome.deliver(record, msg, worker=proc.name, pid=proc.pid)
            else:  # relayed: one write per sink for the whole batch
                done += 1
                sink.call_done(record.call_id, msg, flush=False)
                sinks.add(sink)
        for sink in sinks:
            sink.flush()
        with self._stats_lock:
            self.stats_done += done
            self.stats_failed += len(expected) - done
        self._resolve(deferred)
        if self.options.memory_limit is not None:
            self.check_memory(proc)

    def _take_back(
        self, proc: WorkerSlot, answered: list[p.Result]
    ) -> tuple[list[p.Result], list[Resolve] | None]:
        """The calls of ``answered`` that ``proc`` gave back, not started, when the
        scheduler asked for them (SKIPPED answers of calls it reclaims) go back to its
        queue, for a worker with room. Returns the other answers, and the resolutions
        to do once the lock is released (None if no call came back). Lock held."""
        records = self.records
        back = [
            msg.call_id
            for msg in answered
            if msg.status == p.SKIPPED
            and (record := records.get(msg.call_id)) is not None
            and record.reclaiming
        ]
        if not back:
            return answered, None
        deferred = self._apply(
            self.scheduler.reclaimed(proc.slot, proc.gen, back, self.loop.clock())
        )
        taken = set(back)
        return [msg for msg in answered if msg.call_id not in taken], deferred

    def _on_remote_crashes(self, proc: WorkerSlot, msgs: list[p.Result]) -> list[p.Result]:
        """The calls a worker server answered with the crash of the process that ran
        them go to the scheduler, which sends them again per their ``retries`` (the
        server has replaced that process) or fails them, and ``on_failure`` fires for
        each, as for a local worker's death; the other results are returned. A relayed
        call's answer is passed on as it is (it has no retries; its own client reports
        it)."""
        rest: list[p.Result] = []
        deferred: list[Resolve] = []
        crashed: list[tuple[str, p.Result]] = []  # for on_failure
        with self.lock:
            now = self.loop.clock()
            for msg in msgs:
                record = self.records.get(msg.call_id)
                if (
                    record is None
                    or record.sink is not None
                    or not outcome.is_crash(msg)
                    or not self.scheduler.expects(proc.slot, proc.gen, msg.call_id)
                ):
                    rest.append(msg)
                    continue
                if self.options.on_failure is not None:
                    crashed.append((outcome.describe(record), msg))
                deferred += self._apply(
                    self.scheduler.call_crashed(proc.slot, proc.gen, msg.call_id, now, msg)
                )
            self._promote(proc.slot)
        for call, msg in crashed:
            self._call_on_failure(
                outcome.result_error(msg, call=call, worker=proc.name, pid=proc.pid)
            )
        self._resolve(deferred)  # writes the calls sent again first
        return rest

    def on_progress(self, msg: p.Progress) -> None:
        record = self.records.get(msg.call_id)
        if record is None:
            return
        if record.sink is not None:
            record.sink.call_progress(msg)
            return
        try:
            value = loads(msg.payload, msg.buffers)
        except BaseException:  # noqa: BLE001
            log.warning(
                "offload: a progress report of %s could not be unpickled",
                outcome.describe(record),
            )
            return
        record.future._set_progress(value)

    def on_channel(self, msg: p.Message) -> None:
        """A channel message from a call: to the relay that sent the call, or to the
        channel's hub here (:mod:`offload.client.channels`)."""
        record = self.records.get(msg.call_id)  # type: ignore[attr-defined]
        if record is not None and record.sink is not None:
            record.sink.call_channel(msg)
            return
        from offload.client.channels import route

        route(msg)

    def send_channel(self, call_id: int, msgs: list[p.Message]) -> bool:
        """Send channel messages to the worker running ``call_id``, after what was sent
        to it already; False if the call is not on a worker (any more). Any thread."""
        entry = self.scheduler.calls.get(call_id)
        slot = entry.slot if entry is not None else None
        if slot is None:
            return False
        channel = getattr(self.current.get(slot), "channel", None)
        if channel is None:
            return False
        return bool(channel.enqueue(msgs) and channel.flush())

    def worker_failed(self, proc: WorkerSlot, reason: str, detail: str) -> None:
        """Kill a worker the engine gave up on (unresponsive, over memory)."""
        info = ExitInfo(proc.name, proc.pid, None, None, reason, "", detail)
        with self.lock:
            deferred = self._apply(
                self.scheduler.worker_failed(proc.slot, proc.gen, self.loop.clock(), info)
            )
        self._resolve(deferred)
        self._notify_failure(info)

    def check_memory(self, proc: WorkerSlot) -> None:
        limit = self.options.memory_limit
        if limit is None or proc.expected_exit:
            return
        rss = proc.rss()
        if rss <= limit:
            return
        with self.lock:
            slot = self.scheduler.slots[proc.slot]
            busy = slot.gen == proc.gen and bool(slot.outstanding)
        if busy:
            mib = 1 << 20
            self.worker_failed(
                proc,
                "memory",
                f"used {rss / mib:.0f} MiB, above its memory_limit of {limit / mib:.0f} MiB, "
                "and was killed",
            )
        else:
            with self.lock:
                deferred = self._apply(
                    self.scheduler.recycle(proc.slot, proc.gen, self.loop.clock())
                )
            self._resolve(deferred)

    def note_signalled(self, pid: int, signal_name: str) -> None:
        """``pid`` (a worker of this engine) was sent ``signal_name`` on the user's
        request (``Pool.kill``): should it die of it, its error says so rather than
        guess at a cause."""
        with self.lock:
            self._signalled[pid] = signal_name

    def process_exited(self, proc: WorkerSlot, info: ExitInfo) -> None:
        with self.lock:
            sent = self._signalled.pop(info.pid, None) if info.pid is not None else None
            if sent is not None and sent == info.signal and not info.detail:
                info = replace(info, detail=f"pool.kill() sent it {sent}")
            self.procs.pop((proc.slot, proc.gen), None)
            if self.current.get(proc.slot) is proc:
                del self.current[proc.slot]
            deferred: list[Resolve] = []
            unexpected = not proc.expected_exit
            if unexpected:
                if proc.ready:
                    deferred = self._apply(
                        self.scheduler.worker_died(proc.slot, proc.gen, self.loop.clock(), info)
                    )
                else:
                    err = outcome.start_failed_by_exit(
                        info, reexec=self.options.start_method == "reexec"
                    )
                    self._last_start_error[proc.slot] = err
                    event = self._ready_events.get(proc.slot)
                    if event is not None:
                        event.set()
                    deferred = self._apply(
                        self.scheduler.start_failed(proc.slot, proc.gen, self.loop.clock(), err)
                    )
            self.exited.notify_all()
        self._resolve(deferred)
        if unexpected and proc.ready:
            self._notify_failure(info)

    def _notify_failure(self, info: ExitInfo) -> None:
        if self.options.on_failure is not None:
            self._call_on_failure(outcome.crashed(info, "its calls"))

    def _call_on_failure(self, error: BaseException) -> None:
        """``on_failure(error)`` on a thread of its own (it may block or call back)."""
        callback = self.options.on_failure
        if callback is None:
            return

        def run() -> None:
            try:
                callback(error)
            except Exception:
                log.exception("offload: on_failure callback raised")

        threading.Thread(target=run, name="offload-on-failure", daemon=True).start()

    def _tick(self) -> None:
        with self.lock:
            self._timer = None
            self._timer_at = None
            deferred = self._apply(self.scheduler.tick(self.loop.clock()))
            self._promote_all()  # a remote call that timed out makes room for the next
            self._arm_timer()  # for the deadlines still ahead
        self._resolve(deferred)

    # -- carrying out actions ------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> list[Resolve]:
        """Carry out actions (lock held); return the resolutions to do after unlocking."""
        deferred: list[Resolve] = []
        for action in actions:
            match action:
                case SendCalls(slot=slot, gen=gen, call_ids=call_ids):
                    proc = self.procs.get((slot, gen))
                    slot_state = self.scheduler.slots[slot]
                    # A call sent to a worker with little else to do: whoever waits for
                    # it reads the answer itself (no hand-off from the loop thread). Deep
                    # pipelines are left to the loop, which reads their results in batches.
                    shallow = len(slot_state.outstanding) - len(call_ids) < 2 * slot_state.capacity
                    messages = []
                    calls = self.scheduler.calls
                    for call_id in call_ids:
                        record = self.records[call_id]
                        if record.queued_bytes:
                            self.budget.release(record)
                        if record.attempts:  # sent again after a failed attempt
                            _new_attempt(call_id)
                        # Running once its worker starts it (the first calls of its
                        # pipeline), not when it is sent ahead; see _promote.
                        if not record.started and calls[call_id].started_at is not None:
                            record.started = True
                            record.future._set_running()
                        if proc is not None and shallow:
                            record.future._set_reader(proc)
                            if call_id == self._waiting_call and proc.claim():
                                self._claimed = proc
                        messages.append(record.fields())
                        if record.sink is not None and record.started and not record.retries:
                            _forget_arguments(record)
                    if proc is not None:
                        proc.send_calls(messages)
                        # Write now if the worker may run out of work; otherwise the
                        # calls wait in its outbox for the next write (at the latest when
                        # its next result is read), so floods go out in batches.
                        if shallow:
                            self._unflushed.append(proc)
                case StartWorker(slot=slot, gen=gen):
                    if slot in self._started_slots:
                        self.restarts += 1
                    self._started_slots.add(slot)
                    proc = self.slot_factory(self, slot, gen, self.names[slot])
                    self.procs[(slot, gen)] = proc
                    self.current[slot] = proc
                    self.loop.call_soon(proc.start)
                case KillWorker(slot=slot, gen=gen, reason=reason):
                    proc = self.procs.get((slot, gen))
                    if proc is not None:
                        self._killed_pids[slot] = (gen, proc.pid)
                        proc.kill(reason)
                case KillCall(slot=slot, gen=gen, call_id=call_id):
                    proc = self.procs.get((slot, gen))
                    if proc is not None:
                        proc.kill_call(call_id)
                case StopWorker(slot=slot, gen=gen):
                    proc = self.procs.get((slot, gen))
                    if proc is not None:
                        proc.stop()
                case Resolve():
                    deferred.append(action)
        if actions or self.scheduler.wakeup_changed:
            self.scheduler.wakeup_changed = False
            self._arm_timer()
        return deferred

    def _promote(self, slot_index: int) -> None:
        """Mark running the calls a worker has started since they were sent ahead to it
        (the first ``capacity`` of its outstanding calls; lock held)."""
        slot = self.scheduler.slots[slot_index]
        records = self.records
        for i, call_id in enumerate(slot.outstanding):
            if i >= slot.capacity:
                break
            record = records.get(call_id)
            if record is not None and not record.started and not record.reclaiming:
                record.started = True
                record.future._set_running()

    def _promote_all(self) -> None:
        for index in range(len(self.scheduler.slots)):
            self._promote(index)

    def _arm_timer(self) -> None:
        when = self.scheduler.next_wakeup()
        if when is None or (self._timer_at is not None and self._timer_at <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._tick)

    def _flush(self) -> None:
        """Write the calls that _apply queued (engine lock released: the system calls
        then never hold up the other threads)."""
        unflushed = self._unflushed
        while unflushed:
            try:
                proc = unflushed.pop()
            except IndexError:  # another thread took the last one
                return
            proc.flush()

    def _resolve(self, resolutions: list[Resolve]) -> None:
        self._flush()
        for res in resolutions:
            with self.lock:
                record = self.records.pop(res.call_id, None)
                if record is not None:
                    self.budget.release(record)
                self._note_drained()
            if record is None:
                continue
            sink = record.sink
            if res.outcome is Outcome.CANCELLED:
                if sink is not None:
                    sink.call_done(res.call_id, concurrent.futures.CancelledError())
                else:
                    record.future._cancel_now(force=True)
                continue
            with self._stats_lock:
                self.stats_failed += 1
            error = self._error_for(record, res)
            if res.outcome is Outcome.CRASHED:
                self._save_crashed(record, error, res.slot)
            if sink is not None:
                sink.call_done(res.call_id, error)
            else:
                record.future._resolve_exception(error, task_raised=False)

    def _save_crashed(
        self, record: CallRecord, error: BaseException | None, slot: int | None
    ) -> None:
        """With ``OFFLOAD_DUMP_DIR`` set, save a call that crashed its worker (on
        ``slot``) for ``offload replay``; before its future fails, so that the file is
        there once it has."""
        if not isinstance(error, WorkerCrashed) or not os.environ.get("OFFLOAD_DUMP_DIR"):
            return
        from offload.client.dumps import save_crashed_call  # only ever on a crash

        remote = slot is not None and slot in self.independent
        where = self.names[slot] if remote and slot is not None else None
        try:
            description = outcome.describe(record)
        except Exception:  # noqa: BLE001 - an argument's __repr__ failing stops no dump
            description = record.target
        save_crashed_call(record, error, self.options, description, where=where)

    def _error_for(self, record: CallRecord, res: Resolve) -> OffloadError:
        other = self.records.get(res.cause) if isinstance(res.cause, int) else None
        return outcome.scheduler_error(
            res.outcome,
            call=outcome.describe(record),
            worker=self.names[res.slot] if res.slot is not None else self.label,
            pid=self._pid_hint(res),
            remote=res.slot is not None and res.slot in self.independent,
            timeout=record.timeout,
            cause=res.cause,
            other_call=outcome.describe(other) if other is not None else None,
            attempts=record.attempts,
            retries=record.retries,
        )

    def _pid_hint(self, res: Resolve) -> int | None:
        """The pid of the process the call ran on (it may be replaced already)."""
        if res.slot is None:
            return None
        killed = self._killed_pids.get(res.slot)
        if killed is not None and killed[0] == res.gen:
            return killed[1]
        proc = self.procs.get((res.slot, res.gen))
        return proc.pid if proc is not None else None
