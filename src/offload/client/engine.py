"""The driver: carries out the scheduler's decisions with real processes and sockets.

:class:`Engine` owns a :class:`~offload.client.scheduler.Scheduler`, the
:class:`WorkerProcess` of each slot and a record per call. Every stimulus (a submission
from a user thread; a result, an exit or a timer from the I/O loop) is handled the same
way: under the engine lock, feed the scheduler, then carry out its actions. Sends happen
under the lock so a slot's calls reach its worker in the order the scheduler decided;
resolving futures (which runs user callbacks) happens after the lock is released.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from offload import protocol as p
from offload.client.future import Future
from offload.client.options import WorkerOptions, env_for_worker, settings_for_worker
from offload.client.scheduler import (
    Action,
    CallEntry,
    KillCall,
    KillWorker,
    Outcome,
    Resolve,
    Scheduler,
    SendCalls,
    StartWorker,
    StopWorker,
)
from offload.errors import (
    ConnectionLost,
    NoWorkerAvailable,
    OffloadError,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    StartError,
    TaskTimeout,
    WorkerCrashed,
    WorkerKilled,
    _tail_excerpt,
    describe_exit,
    likely_cause,
)
from offload.process.child import KILL_GRACE, ChildProcess, LaunchSpec, launch
from offload.serde import culprit, dumps, function_reference, loads, type_name
from offload.transport.channel import Channel, in_dispatch
from offload.transport.loop import Loop, Timer, get_loop

if TYPE_CHECKING:
    from offload.protocol.messages import CallFields
from offload.worker.runtime import INIT_KIND

log = logging.getLogger("offload")
log.addHandler(logging.NullHandler())  # a library stays quiet unless configured
# How long a waiting thread reads a worker's socket itself before leaving it to the
# loop thread: long enough for a short call's answer, short enough that a result
# resolved another way (timeout, kill) is noticed without delay worth measuring.
PUMP_WINDOW = 0.002
# After the kill grace, how long an abort waits for killed processes to be reported
# gone (a pidfd fires at once; this only bounds a process that cannot be reaped).
ABORT_MARGIN = 5.0
# Pickled arguments of the calls waiting in the parent's queue, in bytes, beyond which
# submit() waits for calls to go out to workers: a flood of submissions of large
# arguments must not hold them all in memory at once (a single call always gets in).
MAX_QUEUED_BYTES = 64 << 20
_call_ids = itertools.count(1)


def describe_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(arg, key=value)``, shortened, for error messages."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = 40
    r.maxother = 40
    name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", None) or repr(fn)
    parts = [r.repr(a) for a in args[:4]]
    if len(args) > 4:
        parts.append("...")
    parts += [f"{k}={r.repr(v)}" for k, v in list(kwargs.items())[:4]]
    return f"{name}({', '.join(parts)})"


@dataclass(slots=True, kw_only=True)
class CallRecord(CallEntry):
    """One call: the scheduler's fields (CallEntry, which only the scheduler writes) and
    the driver's: its future and what to send. One object per call, so that a flood of
    queued calls gives the garbage collector as little as possible to walk."""

    future: Future[Any]
    kind: int
    target: str
    payload: bytes
    buffers: tuple[Any, ...]
    function: bytes = b""
    fn: Any = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Relayed calls (a server passing a client's call on): the sink gets the worker's
    # Result message itself, never unpickled here, or the error the call failed with;
    # progress goes to it as is. The future stays pending (nobody waits on it).
    sink: RawSink | None = None
    queued_bytes: int = 0  # what it counts in Engine.queued_bytes while in the parent's queue
    started: bool = False  # its future is RUNNING (it stays so when the call is requeued)

    def fields(self) -> CallFields:
        """The fields of the Call to send, in wire order (the frame is made from them
        when the call is sent: a queued call carries no message)."""
        return (
            self.call_id,
            self.kind,
            self.timeout or 0.0,
            self.target,
            self.function,
            self.payload,
            self.buffers,
        )

    def describe(self) -> str:
        if self.sink is not None:
            return self.target or "a relayed call"
        return describe_call(self.fn, self.args, self.kwargs)


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a worker process ended, for error messages."""

    name: str
    pid: int | None
    exitcode: int | None
    signal: str | None
    reason: str  # "exit" | "signal" | "unresponsive" | "memory" | "disconnected"
    stderr_tail: str
    detail: str = ""
    remote: bool = False  # a connection to a worker server, not a local process

    def crashed(self, call: str, message: str | None = None) -> WorkerCrashed:
        """A WorkerCrashed (ConnectionLost for a server) naming ``call`` in one sentence."""
        if self.remote:
            what = self.detail or "lost its connection"
            return ConnectionLost(
                f"worker server {self.name} (pid {self.pid}) {what} while running {call}",
                pid=self.pid,
                reason=self.reason,  # type: ignore[arg-type]
                worker=self.name,
            )
        if message is None:
            if self.reason == "signal":
                how = f"was killed by {self.signal}"
            elif self.reason == "exit":
                how = f"exited with status {self.exitcode}"
            else:
                how = self.detail or f"failed ({self.reason})"
            message = f"worker {self.name} (pid {self.pid}) {how} while running {call}"
            hint = self.detail if self.reason in ("signal", "exit") and self.detail else ""
            hint = hint or likely_cause(self.signal, self.exitcode)
            if self.reason in ("signal", "exit") and hint:
                message += f"; {hint}"
        tail = _tail_excerpt(self.stderr_tail)
        message += f"; last stderr: {tail}" if tail else "; it wrote nothing to stderr"
        return WorkerCrashed(
            message,
            pid=self.pid,
            exitcode=self.exitcode,
            signal=self.signal,
            reason=self.reason,  # type: ignore[arg-type]
            stderr_tail=self.stderr_tail,
            worker=self.name,
        )


class RawSink(Protocol):
    """Where the outcome of relayed calls goes (see :meth:`Engine.submit_raw`)."""

    def call_done(
        self, call_id: int, outcome: p.Result | BaseException, *, flush: bool = True
    ) -> None:
        """Call ``call_id`` ended: the worker's Result message, or the error it failed
        with (an OffloadError; CancelledError when it was dropped unstarted). With
        ``flush=False`` the outcome may wait for :meth:`flush` (the engine passes a
        batch of results on that way, then flushes once)."""

    def flush(self) -> None:
        """Pass on the outcomes that ``call_done(..., flush=False)`` held back."""

    def call_progress(self, msg: p.Progress) -> None:
        """A progress report of one of the calls, as the worker sent it."""


class SlotProcess(Protocol):
    """What the engine needs of whatever fills a slot: a local :class:`WorkerProcess`
    or a connection to a worker server (:class:`offload.client.remote.RemoteProcess`)."""

    slot: int
    gen: int
    name: str
    ready: bool
    expected_exit: bool
    channel: Channel | None

    @property
    def pid(self) -> int | None: ...
    @property
    def child(self) -> ChildProcess | None: ...
    def start(self) -> None: ...
    def send_calls(self, calls: list[CallFields]) -> None: ...
    def flush(self) -> None: ...
    def pump(self, future: Future[Any]) -> None: ...
    def stop(self) -> None: ...
    def kill(self, reason: str = "") -> None: ...
    def kill_call(self, call_id: int) -> None: ...
    def rss(self) -> int: ...


class WorkerProcess:
    """One worker process of a slot: its child process, its channel, its timers.

    Lives on the I/O loop: every method but :meth:`send_calls`, :meth:`kill` and
    :meth:`stop` runs on the loop thread.
    """

    def __init__(self, engine: Engine, slot: int, gen: int, name: str) -> None:
        self.engine = engine
        self.slot = slot
        self.gen = gen
        self.name = name
        self.loop = engine.loop
        self.child: ChildProcess | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.expected_exit = False  # stopped or killed on purpose
        self.kill_reason = ""
        self.protocol_error: BaseException | None = None
        self.internal_error: BaseException | None = None  # offload failed, not the worker
        self.channel_closed = False
        self._timers: list[Timer] = []
        self._last_seen = 0.0
        self._ping_seq = 0

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def __repr__(self) -> str:
        state = "ready" if self.ready else "exiting" if self.expected_exit else "starting"
        return f"<WorkerProcess {self.name} pid={self.pid} slot={self.slot} gen={self.gen} {state}>"

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the process (loop thread)."""
        if self.expected_exit:  # killed before it was even launched
            self.engine.discard(self)
            return
        opts = self.engine.options
        spec = LaunchSpec(
            name=self.name,
            start_method=opts.start_method,
            python=opts.python,
            env=env_for_worker(opts),
            cwd=opts.cwd,
            umask=opts.umask,
            stdout=opts.stdout,
            stderr=opts.stderr,
            settings=settings_for_worker(opts),
        )
        try:
            self.child, sock = launch(spec, self.loop, self._on_exit)
        except Exception as exc:  # noqa: BLE001 - whatever stops a launch is a StartError
            self.expected_exit = True
            self.engine.start_failed(
                self,
                StartError(f"worker {self.name} could not be started: {exc}", worker=self.name),
            )
            return
        if self.expected_exit:  # killed while it was being launched
            self.child.terminate()
        try:
            conn = p.Connection(
                "client",
                name=self.engine.label,
                pid=os.getpid(),
                max_message_size=opts.max_message_size,
            )
            self.channel = Channel(sock, conn, self.loop)
            self.channel.on_messages = self._on_messages
            self.channel.on_close = self._on_channel_close
            self.channel.start()
        except Exception as exc:  # noqa: BLE001 - whatever it is, the start failed
            if self.channel is None:
                sock.close()
            self._fail_start(f"worker {self.name} could not be set up: {type_name(exc)}: {exc}")
            return
        self._timers.append(self.loop.call_later(opts.start_timeout, self._start_timed_out))
        log.info("offload: started worker %s (pid %s)", self.name, self.child.pid)

    def _start_timed_out(self) -> None:
        if self.ready or self.expected_exit:
            return
        timeout = self.engine.options.start_timeout
        self._fail_start(
            f"worker {self.name} (pid {self.pid}) did not finish its handshake within "
            f"{timeout:g} s (start_timeout)"
            + (
                "; with start_method='reexec' the program must call offload.init() first"
                if self.engine.options.start_method == "reexec"
                else ""
            )
        )

    def _fail_start(self, message: str, cause: BaseException | None = None) -> None:
        self.expected_exit = True
        tail = self.child.stderr_tail() if self.child else ""
        excerpt = _tail_excerpt(tail)
        err: OffloadError
        if isinstance(cause, ProtocolError):
            err = cause
        else:
            err = StartError(
                message + (f"; last stderr: {excerpt}" if excerpt else ""),
                worker=self.name,
                pid=self.pid,
                exitcode=self.child.returncode if self.child else None,
                stderr_tail=tail,
            )
        self.kill()
        self.engine.start_failed(self, err)

    # -- messages ------------------------------------------------------------------------

    def _on_messages(self, msgs: list[p.Message]) -> None:
        try:
            self._handle_messages(msgs)
        except Exception as exc:  # an error here must not strand futures
            # A defect on this side (a callback of ours, not the user's: theirs are
            # caught where they run). Nothing can tell which of the worker's calls it
            # concerned any more, so the worker goes, and its calls fail typed.
            log.exception("offload: handling the messages of worker %s failed", self.name)
            if self.internal_error is None:
                self.internal_error = exc
                self.engine.worker_failed(self, "disconnected", self._exit_detail(None))

    def _handle_messages(self, msgs: list[p.Message]) -> None:
        self._last_seen = self.loop.clock()
        results: list[p.Result] = []
        for msg in msgs:
            if isinstance(msg, p.Result) and msg.call_id != 0:
                results.append(msg)
            else:
                self._on_message(msg)
        if results:
            self.engine.on_results(self, results)

    def _on_message(self, msg: p.Message) -> None:
        match msg:
            case p.Result():  # call id 0: the initializer
                self._initialized(msg)
            case p.Progress():
                self.engine.on_progress(msg)
            case p.Hello():
                self._handshake_done()
            case p.Pong() | p.Goodbye():
                pass
            case _:
                self._protocol_violation(
                    ProtocolError(f"worker {self.name} sent an unexpected {type(msg).__name__}")
                )

    def _handshake_done(self) -> None:
        opts = self.engine.options
        if opts.initializer is None:
            self._became_ready()
            return
        try:
            data, buffers = dumps((opts.initializer, opts.initargs, {}))
        except Exception as exc:  # noqa: BLE001 - any pickling failure is a start failure
            self._fail_start(f"the initializer of {self.name} could not be pickled: {exc}")
            return
        assert self.channel is not None
        self.channel.send(
            p.Call(
                call_id=0,
                kind=INIT_KIND,
                timeout=0.0,
                target="initializer",
                payload=data,
                buffers=tuple(buffers),
            )
        )

    def _initialized(self, msg: p.Result) -> None:
        if msg.status == p.OK:
            self._became_ready()
            return
        detail = msg.traceback.strip() or f"{msg.type_name}: {msg.message}"
        self._fail_start(f"the initializer of worker {self.name} raised:\n{detail}")

    def _became_ready(self) -> None:
        self.ready = True
        opts = self.engine.options
        if opts.heartbeat is not None:
            self._last_seen = self.loop.clock()
            self._timers.append(self.loop.call_later(opts.heartbeat[0], self._heartbeat))
        if opts.memory_limit is not None:
            self._timers.append(self.loop.call_later(0.05, self._check_memory))
        self.engine.worker_ready(self)

    def _protocol_violation(self, exc: BaseException) -> None:
        self.protocol_error = exc
        self.kill_reason = ""
        assert self.child is not None
        self.child.kill()

    def _on_channel_close(self, error: BaseException | None) -> None:
        self.channel_closed = True
        if error is not None:
            if not self.ready and isinstance(error, ProtocolError):
                self._fail_start(str(error), error)
                return
            self._protocol_violation(error)
        # Otherwise the process is exiting; _on_exit reports it once it is gone.

    # -- timers --------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        if self.child is None or self.child.returncode is not None or self.expected_exit:
            return
        interval, timeout = self.engine.options.heartbeat or (0.0, 0.0)
        if self.loop.clock() - self._last_seen > timeout:
            self.engine.worker_failed(
                self,
                "unresponsive",
                f"did not answer heartbeats for {timeout:g} s and was killed",
            )
            return
        self._ping_seq += 1
        assert self.channel is not None
        self.channel.send(p.Ping(seq=self._ping_seq))
        self._timers.append(self.loop.call_later(interval, self._heartbeat))

    def _check_memory(self) -> None:
        if self.child is None or self.child.returncode is not None or self.expected_exit:
            return
        self.engine.check_memory(self)
        self._timers.append(self.loop.call_later(0.05, self._check_memory))

    def rss(self) -> int:
        """Resident memory of the worker process in bytes (0 if unknown)."""
        try:
            import psutil

            return int(psutil.Process(self.pid).memory_info().rss)
        except Exception:  # noqa: BLE001 - gone or inaccessible
            return 0

    # -- calls ---------------------------------------------------------------------------

    def send_calls(self, calls: list[CallFields]) -> None:
        """Queue calls for the worker (engine lock held: it orders them); :meth:`flush`
        writes them."""
        if self.channel is not None:
            self.channel.enqueue_calls(calls)

    def flush(self) -> None:
        """Write the queued calls (after the engine lock is released)."""
        if self.channel is not None:
            self.channel.flush()

    def pump(self, future: Future[Any]) -> None:
        """Let a thread waiting on ``future`` read this worker's answers itself for a
        moment: a short call's result then skips the hand-off from the loop thread."""
        channel = self.channel
        if channel is not None:
            channel.pump(future.done, PUMP_WINDOW)

    # -- ending --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to exit once its calls are done."""
        self.expected_exit = True
        if self.channel is not None:
            self.channel.send(p.Shutdown())

    def kill_call(self, call_id: int) -> None:
        """Drop a call sent ahead that has not started (the worker skips it)."""
        if self.channel is not None:
            self.channel.send(p.Cancel(call_id=call_id))

    def kill(self, reason: str = "") -> None:
        """Kill the process group now: SIGTERM, then SIGKILL after a short grace."""
        self.expected_exit = True
        self.kill_reason = reason
        if self.child is not None:
            self.child.terminate()

    def _exit_detail(self, child: ChildProcess | None) -> str:
        if self.protocol_error is not None:
            return f"it broke the protocol ({self.protocol_error})"
        if self.internal_error is not None:
            exc = self.internal_error
            return (
                f"was killed because offload failed handling its messages ({type_name(exc)}: {exc})"
            )
        return child.exit_note if child is not None else ""

    def _on_exit(self, child: ChildProcess) -> None:
        for timer in self._timers:
            timer.cancel()
        if self.channel is not None:
            self.channel.drain()  # results written just before the exit still count
            self.channel.close()
        exitcode = child.returncode
        signal_name, reason = describe_exit(exitcode)
        info = ExitInfo(
            name=self.name,
            pid=child.pid,
            exitcode=exitcode if reason == "exit" else None,
            signal=signal_name,
            reason=reason,
            stderr_tail=child.stderr_tail(),
            detail=self._exit_detail(child),
        )
        log_fn = log.info if self.expected_exit else log.warning
        log_fn(
            "offload: worker %s (pid %s) %s",
            self.name,
            child.pid,
            f"exited with status {exitcode}" if reason == "exit" else f"killed by {signal_name}",
        )
        self.engine.process_exited(self, info)


class Engine:
    """Runs calls on ``slots`` worker processes with the given options.

    Args:
        options: the worker options.
        slots: number of worker processes.
        keep_warm: keep every slot started (pools) or start on demand (handles).
        max_start_failures: see :class:`Scheduler`.
        label: a name for this engine in logs (the pool or worker name).
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
        remotes: dict[int, Any] | None = None,
        loop: Loop | None = None,
    ) -> None:
        self.options = options
        # slot -> RemoteTarget: that slot is a connection to a worker server.
        self.remotes: dict[int, Any] = dict(remotes or {})
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
        )
        for index in self.remotes:
            self.scheduler.slots[index].independent = True
        self.lock = threading.Lock()
        self.records: dict[int, CallRecord] = {}
        self.procs: dict[tuple[int, int], SlotProcess] = {}  # (slot, gen) -> process
        self.current: dict[int, SlotProcess] = {}  # slot -> its newest process
        self.exited = threading.Condition(self.lock)
        self.stats_done = 0
        self.stats_failed = 0
        self.restarts = 0
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._ready_events: dict[int, threading.Event] = {}
        self._waiting_call = 0  # a call whose submitter will block on it (lock held)
        self._killed_pids: dict[int, tuple[int, int | None]] = {}  # slot -> (gen, pid)
        self._started_slots: set[int] = set()  # a later start there is a restart
        self._claimed: Channel | None = None  # channel that submitter now reads
        self._unflushed: list[SlotProcess] = []  # calls queued on them, not yet written
        self._last_start_error: dict[int, OffloadError] = {}
        self._drain_waiters = 0  # threads in wait_calls (lock held to change)
        self.queued_bytes = 0  # pickled arguments of queued calls (see MAX_QUEUED_BYTES)
        self._room = threading.Condition(self.lock)  # queued_bytes went down
        self._room_waiters = 0
        # The process that made this engine: its workers, sockets and threads exist
        # only there. A forked child that inherited the object must not touch them.
        self.owner_pid = os.getpid()
        self._forks = _forks  # how many forks deep this process is (see owned_here)
        _live_engines.add(self)

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
        future: Future[Any] = Future()
        call_id = next(_call_ids)
        target = ""
        kind = p.BY_VALUE
        function = b""
        try:
            if isinstance(fn, str):
                kind = p.BY_NAME
                target = fn
                data, buffers = dumps((args, kwargs))
            else:
                target = getattr(fn, "__qualname__", "") + "(...)"
                function = function_reference(fn)
                if function:
                    data, buffers = dumps((args, kwargs))
                else:
                    data, buffers = dumps((fn, args, kwargs))
        except BaseException as exc:  # noqa: BLE001 - SystemExit from __reduce__ included
            what = culprit((fn, args, kwargs))
            err = SerializationError(
                f"an argument of {describe_call(fn, args, kwargs)} could not be pickled: "
                f"{what}: {type_name(exc)}: {exc}",
                direction="argument",
                type_name=what,
            )
            err.__cause__ = exc
            future._resolve_exception(err, task_raised=False)
            return future
        size = len(data) + len(function)
        if buffers:
            size += sum(b.nbytes for b in buffers)
        if size > self.options.max_message_size:
            future._resolve_exception(
                SerializationError(
                    f"the arguments of {describe_call(fn, args, kwargs)} pickle to {size} "
                    f"bytes, more than max_message_size ({self.options.max_message_size})",
                    direction="argument",
                    type_name=type_name(args[0]) if args else None,
                ),
                task_raised=False,
            )
            return future
        record = CallRecord(
            call_id=call_id,
            timeout=timeout,
            retries=retries,
            future=future,
            kind=kind,
            target=target,
            function=function,
            payload=data,
            buffers=tuple(buffers) if buffers else (),
            fn=fn,
            args=args,
            kwargs=kwargs,
            queued_bytes=size,
        )
        self._schedule_new(record, wait=wait)
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
            future=Future(),
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
        future._owner = self
        future._call_id = record.call_id
        self.check_owner()
        with self.lock:
            if record.queued_bytes:
                self._wait_for_room(record.queued_bytes)
            if self.scheduler.closed:
                raise RuntimeError("cannot submit after shutdown")
            self.queued_bytes += record.queued_bytes
            self.records[record.call_id] = record
            self._waiting_call = record.call_id if wait else 0
            deferred = self._apply(self.scheduler.submit_entry(record, self.loop.clock()))
            claimed, self._claimed = self._claimed, None
        self._resolve(deferred)
        if claimed is not None:
            claimed.pump_claimed(future.done, PUMP_WINDOW)

    def _wait_for_room(self, size: int) -> None:
        """Wait (lock held) until a call of ``size`` bytes fits under MAX_QUEUED_BYTES.
        Never where waiting could block the delivery of the results that make room (on
        the I/O thread, in a callback): there the call goes over the limit."""
        while (
            self.queued_bytes
            and self.queued_bytes + size > MAX_QUEUED_BYTES
            and not self.scheduler.closed
            and not in_dispatch()
        ):
            self._room_waiters += 1
            try:
                self._room.wait()
            finally:
                self._room_waiters -= 1

    def _unqueue(self, record: CallRecord) -> None:
        """``record`` left the parent's queue (sent, resolved or cancelled; lock held)."""
        self.queued_bytes -= record.queued_bytes
        record.queued_bytes = 0
        if self._room_waiters:
            self._room.notify_all()

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
            if record is not None and record.queued_bytes:
                self._unqueue(record)
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
            if self._room_waiters:
                self._room.notify_all()  # their submit() raises: shut down
        self._resolve(deferred)
        if not wait:
            return
        if not self.wait_idle(timeout):
            self.abort()

    def abort(self) -> None:
        """End everything now: queued calls are cancelled, running ones fail with
        WorkerKilled, every process (also those stopping gracefully) is killed, and no
        process starts again. Returns once they have exited (SIGTERM, the kill grace,
        then SIGKILL), or, should one never be reported gone, after a bound."""
        with self.lock:
            deferred = self._apply(self.scheduler.abort(self.loop.clock()))
            procs = list(self.procs.values())
        self._resolve(deferred)
        for proc in procs:
            proc.kill("shutdown")
        if not self.wait_idle(KILL_GRACE + ABORT_MARGIN):
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
        return self._forks == _forks

    def check_owner(self) -> None:
        """Raise unless this process made the engine.

        Raises:
            RuntimeError: called in a process forked from the one that made it.
        """
        if self._forks != _forks:
            raise RuntimeError(
                f"{self.label or 'this offload object'} was made in process {self.owner_pid}, "
                f"the parent of this forked process ({os.getpid()}); its workers belong to "
                "the parent and cannot be used here: make a new offload.Pool or "
                "offload.spawn() in the child"
            )

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

    # -- events from worker processes (loop thread) --------------------------------------

    def worker_ready(self, proc: SlotProcess, capacity: int | None = None) -> None:
        with self.lock:
            self._last_start_error.pop(proc.slot, None)
            event = self._ready_events.get(proc.slot)
            deferred = self._apply(
                self.scheduler.worker_ready(proc.slot, proc.gen, self.loop.clock(), capacity)
            )
        if event is not None:
            event.set()
        self._resolve(deferred)

    def discard(self, proc: SlotProcess) -> None:
        """Forget a slot process that never ran (killed or failed before launching)."""
        with self.lock:
            self.procs.pop((proc.slot, proc.gen), None)
            if self.current.get(proc.slot) is proc:
                del self.current[proc.slot]
            self.exited.notify_all()

    def start_failed(self, proc: SlotProcess, error: OffloadError) -> None:
        log.warning("offload: %s", error)
        if proc.child is None:  # nothing was launched, so no exit will be reported
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

    def on_results(self, proc: SlotProcess, msgs: list[p.Result]) -> None:
        """Results read in one go from ``proc``: one lock round, one scheduling pass."""
        with self.lock:
            expected = [
                (self.records.pop(msg.call_id), msg)
                for msg in msgs
                if self.scheduler.expects(proc.slot, proc.gen, msg.call_id)
            ]  # others were resolved already (timeout, kill) or are stray ids
            if not expected:
                proc.flush()
                return
            self._note_drained()
            deferred = self._apply(
                self.scheduler.results(
                    proc.slot,
                    proc.gen,
                    [(msg.call_id, msg.elapsed) for _, msg in expected],
                    self.loop.clock(),
                )
            )
            self._promote(proc.slot)
        proc.flush()  # the calls waiting for this worker's results
        self._flush()  # and those just sent to any worker, before the results
        sinks: set[RawSink] = set()
        for record, msg in expected:
            sink = record.sink
            if sink is None:
                self._deliver(record, msg, proc)
            else:  # relayed: one write per sink for the whole batch
                self.stats_done += 1
                sink.call_done(record.call_id, msg, flush=False)
                sinks.add(sink)
        for sink in sinks:
            sink.flush()
        self._resolve(deferred)
        if self.options.memory_limit is not None:
            self.check_memory(proc)

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
                "offload: a progress report of %s could not be unpickled", record.describe()
            )
            return
        record.future._set_progress(value)

    def worker_failed(self, proc: SlotProcess, reason: str, detail: str) -> None:
        """Kill a worker the engine gave up on (unresponsive, over memory)."""
        info = ExitInfo(proc.name, proc.pid, None, None, reason, "", detail)
        with self.lock:
            deferred = self._apply(
                self.scheduler.worker_failed(proc.slot, proc.gen, self.loop.clock(), info)
            )
        self._resolve(deferred)
        self._notify_failure(info)

    def check_memory(self, proc: SlotProcess) -> None:
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

    def process_exited(self, proc: SlotProcess, info: ExitInfo) -> None:
        with self.lock:
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
                    err = StartError(
                        f"worker {proc.name} (pid {info.pid}) "
                        + (
                            f"exited with status {info.exitcode}"
                            if info.reason == "exit"
                            else f"was killed by {info.signal}"
                        )
                        + " before finishing its handshake"
                        + (
                            "; with start_method='reexec' the program must be able to run "
                            "again and call offload.init() first"
                            if self.options.start_method == "reexec"
                            else ""
                        )
                        + (
                            f"; last stderr: {_tail_excerpt(info.stderr_tail)}"
                            if info.stderr_tail.strip()
                            else ""
                        ),
                        worker=proc.name,
                        pid=info.pid,
                        exitcode=info.exitcode,
                        stderr_tail=info.stderr_tail,
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
        callback = self.options.on_failure
        if callback is None:
            return
        error = info.crashed("its calls")

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
                            self._unqueue(record)
                        # Running once its worker starts it (the first calls of its
                        # pipeline), not when it is sent ahead; see _promote.
                        if not record.started and calls[call_id].started_at is not None:
                            record.started = True
                            record.future._set_running()
                        if proc is not None and shallow:
                            record.future._pump = proc
                            channel = proc.channel
                            if call_id == self._waiting_call and channel and channel.claim():
                                self._claimed = channel
                        messages.append(record.fields())
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
                    target = self.remotes.get(slot)
                    if target is None:
                        proc = WorkerProcess(self, slot, gen, self.names[slot])
                    else:
                        from offload.client.remote import RemoteProcess

                        proc = RemoteProcess(self, slot, gen, self.names[slot], target)
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
            if record is not None and not record.started:
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
                if record is not None and record.queued_bytes:
                    self._unqueue(record)
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
            self.stats_failed += 1
            error = self._error_for(record, res)
            if sink is not None:
                sink.call_done(res.call_id, error)
            else:
                record.future._resolve_exception(error, task_raised=False)

    def _error_for(self, record: CallRecord, res: Resolve) -> OffloadError:
        call = record.describe()
        name = self.names[res.slot] if res.slot is not None else self.label
        cause = res.cause
        remote = res.slot is not None and res.slot in self.remotes
        if res.outcome is Outcome.TIMEOUT and remote:
            return TaskTimeout(
                f"{call} did not finish within its timeout of {record.timeout:g} s; it was "
                f"killed on the worker server {name}",
                timeout=record.timeout or 0.0,
                pid=self._pid_hint(res),
                worker=name,
            )
        if res.outcome is Outcome.KILLED and remote:
            return WorkerKilled(
                f"{call} was killed on the worker server {name}",
                pid=self._pid_hint(res),
                worker=name,
            )
        if res.outcome is Outcome.TIMEOUT:
            pid = self._pid_hint(res)
            return TaskTimeout(
                f"{call} did not finish within its timeout of {record.timeout:g} s; worker "
                f"{name} (pid {pid}) was killed and will be replaced",
                timeout=record.timeout or 0.0,
                pid=pid,
                worker=name,
            )
        if res.outcome is Outcome.KILLED:
            pid = self._pid_hint(res)
            return WorkerKilled(
                f"{call} was killed on worker {name} (pid {pid})", pid=pid, worker=name
            )
        if res.outcome is Outcome.COLLATERAL:
            pid = self._pid_hint(res)
            other = self.records.get(cause) if isinstance(cause, int) else None
            why = (
                f"because {other.describe()} on the same worker"
                if other
                else "because another call on it"
            )
            return WorkerCrashed(
                f"worker {name} (pid {pid}) was killed while running {call}, {why} timed out "
                "or was killed",
                pid=pid,
                signal="SIGKILL",
                reason="signal",
                worker=name,
            )
        if res.outcome is Outcome.START_FAILED:
            if isinstance(cause, OffloadError):
                return clone_error(cause)
            return StartError(f"no worker could start to run {call}", worker=name)
        assert isinstance(cause, ExitInfo)
        return cause.crashed(call)

    def _pid_hint(self, res: Resolve) -> int | None:
        """The pid of the process the call ran on (it may be replaced already)."""
        if res.slot is None:
            return None
        killed = self._killed_pids.get(res.slot)
        if killed is not None and killed[0] == res.gen:
            return killed[1]
        proc = self.procs.get((res.slot, res.gen))
        return proc.pid if proc is not None else None

    def _deliver(self, record: CallRecord, msg: p.Result, proc: SlotProcess) -> None:
        """Resolve the future of a (not relayed) call with the worker's Result."""
        future = record.future
        status = msg.status
        if status == p.OK:
            try:
                value = loads(msg.payload, msg.buffers)
            except BaseException as exc:  # noqa: BLE001 - SystemExit from __setstate__ too
                err = SerializationError(
                    f"the result of {record.describe()} could not be unpickled: "
                    f"{type_name(exc)}: {exc}",
                    direction="result",
                )
                err.__cause__ = exc
                self.stats_failed += 1
                future._resolve_exception(err, task_raised=False)
                return
            self.stats_done += 1
            future._resolve_value(value)
            return
        self.stats_failed += 1
        if status == p.RAISED:
            future._resolve_exception(self._task_exception(record, msg), task_raised=True)
        elif status == p.BAD_ARGUMENT:
            future._resolve_exception(
                SerializationError(
                    f"{record.describe()}: {msg.message}",
                    direction="argument",
                    type_name=msg.type_name,
                ),
                task_raised=False,
            )
        elif status == p.BAD_RESULT:
            future._resolve_exception(
                SerializationError(
                    f"{record.describe()}: {msg.message}",
                    direction="result",
                    type_name=msg.type_name,
                ),
                task_raised=False,
            )
        elif status == p.FAILED:  # decided by a worker server: one of offload's errors
            try:
                error = loads(msg.payload, msg.buffers)
            except BaseException:  # noqa: BLE001
                error = None
            if not isinstance(error, BaseException):
                error = RemoteError(msg.message, type_name=msg.type_name, traceback=msg.traceback)
            future._resolve_exception(error, task_raised=False)
        elif status == p.UNKNOWN_TASK:
            future._resolve_exception(
                NoWorkerAvailable(
                    f"worker {proc.name} (pid {proc.pid}) knows no task named "
                    f"{msg.type_name!r}; register it with @offload.task(name=...) in a module "
                    "the worker imports (preload=...)",
                    task=msg.type_name,
                ),
                task_raised=False,
            )
        else:
            future._resolve_exception(
                ProtocolError(f"worker {proc.name} sent an unknown result status {status}"),
                task_raised=False,
            )

    @staticmethod
    def _task_exception(record: CallRecord, msg: p.Result) -> BaseException:
        exc: BaseException | None = None
        if msg.payload:
            try:
                loaded = loads(msg.payload, msg.buffers)
                if isinstance(loaded, BaseException):
                    exc = loaded
            except BaseException:  # noqa: BLE001 - falls back to RemoteError
                exc = None
        if exc is None:
            exc = RemoteError(msg.message, type_name=msg.type_name, traceback=msg.traceback)
        exc.__cause__ = RemoteTraceback(msg.traceback)
        return exc


def clone_error(err: OffloadError) -> OffloadError:
    """A fresh copy of ``err`` (each future gets its own exception object)."""
    rebuild, args = err.__reduce__()[:2]
    copy: OffloadError = rebuild(*args)
    return copy


# -- interpreter exit --------------------------------------------------------------------

_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_forks = 0  # forks between the interpreter's start and this process
# At exit, how long the workers of each engine get to exit after its calls are done.
EXIT_STOP_TIMEOUT = 5.0


def _finish_at_exit() -> None:
    """At interpreter exit, every call already submitted runs to completion (as with
    ``ProcessPoolExecutor``), its done-callbacks run, then the workers stop.

    Runs from ``threading._shutdown`` (before ``atexit`` and before daemon threads such
    as the I/O loop are frozen), so results still arrive. A pool or handle that was
    never shut down, a ``delegate()`` call, a ``shutdown(wait=False)``: nothing
    submitted vanishes. Ctrl-C while waiting kills what still runs.
    """
    engines = [engine for engine in list(_live_engines) if engine.owned_here()]
    if not engines:
        return
    try:
        for engine in engines:
            engine.wait_calls(None)
        for engine in engines:
            engine.shutdown(wait=True, cancel_futures=False, timeout=EXIT_STOP_TIMEOUT)
    except BaseException:
        for engine in engines:
            engine.abort()
        raise
    # The loop thread may still be running the last done-callbacks: wait for it.
    loop = engines[0].loop
    if not loop.in_loop():
        try:
            loop.run_sync(lambda: None)
        except Exception:  # noqa: BLE001 - a loop that is gone has nothing left to run
            pass


def _forget_engines_in_child() -> None:
    # A forked child's inherited engines are the parent's: none of them is waited for
    # at the child's exit, and none of them may be used there.
    global _live_engines, _forks
    _live_engines = weakref.WeakSet()
    _forks += 1


os.register_at_fork(after_in_child=_forget_engines_in_child)
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]
