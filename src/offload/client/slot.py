"""The slot interface: the vocabulary every kind of worker shares with the engine.

A *slot* is a place for one worker in an engine (a worker handle has one, a pool has
``workers`` of them plus one per host). What fills it is a kind of worker: a local child
process (:class:`offload.client.local.LocalSlot`), a connection to a worker server
(:class:`offload.client.remote.RemoteSlot`); an actor or a worker over ssh is a new file
that implements :class:`WorkerSlot`, with no change to the engine.

The two sides talk through two protocols, so neither imports the other:

* :class:`WorkerSlot` is what the engine asks of a slot: start, send calls (under the
  engine lock, which fixes their order) and write them (after it), let a waiting thread
  read its own answer, stop, kill, drop one call.
* :class:`SlotHost` is what a slot reports to the engine, on the I/O loop's thread:
  ready (with how many calls it runs at once), could not start, results, progress, gave
  up on it (unresponsive, over memory), exited (with an :class:`ExitInfo`), never ran.

A slot kind is made by a :data:`SlotFactory` that the pool or worker handle gives the
engine: ``factory(host, index, gen, name)``. The engine never knows which kind it runs.

Also here: :class:`CallRecord` (one per call, shared by the scheduler and the engine)
and :class:`RawSink` (where a worker server's relayed calls end).
"""

from __future__ import annotations

from collections.abc import Callable

from offload import protocol as p
from offload._record import field, record  # not dataclasses: see offload._record
from offload.client.scheduler import CallEntry

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any, Literal, Protocol, TypeAlias

    from offload.client.future import Future
    from offload.client.options import WorkerOptions
    from offload.protocol.messages import CallFields
    from offload.transport.channel import Channel
    from offload.transport.loop import Loop

    ExitReason: TypeAlias = Literal["exit", "signal", "unresponsive", "memory", "disconnected"]
else:
    Protocol = object  # the protocols below are for type checkers only

# How long a waiting thread reads a worker's socket itself before leaving it to the
# loop thread: long enough for a short call's answer, short enough that a result
# resolved another way (timeout, kill) is noticed without delay worth measuring.
PUMP_WINDOW = 0.002


@record(frozen=True, slots=True)
class ExitInfo:
    """How a worker ended, as its slot saw it (errors are made from it in
    :mod:`offload.client.outcome`).

    Attributes:
        name: the worker's name.
        pid: its pid (a worker server's, for a remote slot), if known.
        exitcode: its exit status, when it exited.
        signal: the signal that killed it ("SIGSEGV"), when one did.
        reason: "exit" | "signal" | "unresponsive" | "memory" | "disconnected".
        stderr_tail: the last (at most 64 KiB) it wrote to stderr.
        detail: what the slot knows beyond that (a broken protocol, a lost status).
        remote: a connection to a worker server, not a local process.
        stderr_seen: its stderr was read here (not so for a worker started by hand:
            an empty ``stderr_tail`` then says nothing).
    """

    name: str
    pid: int | None
    exitcode: int | None
    signal: str | None
    reason: str
    stderr_tail: str
    detail: str = ""
    remote: bool = False
    stderr_seen: bool = True


@record(slots=True, kw_only=True)
class CallRecord(CallEntry):
    """One call: the scheduler's fields (CallEntry, which only the scheduler writes) and
    the engine's: its future and what to send. One object per call, so that a flood of
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


class RawSink(Protocol):
    """Where the outcome of relayed calls goes (see ``Engine.submit_raw``)."""

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

    def call_channel(self, msg: p.Message) -> None:
        """A channel message (ChannelData, ChannelClose, ChannelCredit) of one of the
        calls, as the worker sent it."""

    def call_output(self, call_id: int, stream: int, data: bytes) -> None:
        """Bytes the process running call ``call_id`` wrote to ``stream`` (1: stdout,
        2: stderr) while it ran (loop thread; must not block)."""


class WorkerSlot(Protocol):
    """What the engine asks of whatever fills a slot.

    ``start``, ``kill_call`` and the timers run on the I/O loop; ``send_calls`` runs with
    the engine lock held (it fixes the order of calls), ``flush``, ``kill`` and ``stop``
    from any thread.
    """

    slot: int  # its index in the engine
    gen: int  # which process of that slot (events of older ones are stale)
    name: str
    ready: bool  # handshake (and initializer) done: it takes calls
    expected_exit: bool  # stopped or killed on purpose: its end is no failure

    @property
    def pid(self) -> int | None:
        """Its process's pid (a worker server's for a remote slot), if any."""

    @property
    def local_pid(self) -> int | None:
        """The pid of a live local process filling the slot (None for a remote one)."""

    @property
    def alive(self) -> bool:
        """Whether its process (or connection) is up."""

    @property
    def launched(self) -> bool:
        """Whether, after reporting that it could not start, it will still report its
        end (a local process that was launched exits later; a connection does not)."""

    def start(self) -> None:
        """Start the worker (loop thread); report ready or start failed."""

    def send_calls(self, calls: list[CallFields]) -> None:
        """Queue these calls in this order (engine lock held)."""

    def flush(self) -> None:
        """Write what :meth:`send_calls` queued."""

    def pump(self, future: Future[Any]) -> None:
        """Let a thread waiting on ``future`` read the answers itself for a moment."""

    def claim(self) -> bool:
        """Reserve the reading of the next answers for the submitting thread, which
        will block on its call (engine lock held); False where that cannot be done."""

    def pump_claimed(self, done: Callable[[], bool], window: float) -> None:
        """The claiming thread reads answers until ``done()`` or ``window`` seconds."""

    def stop(self) -> None:
        """Exit once the calls sent are done (graceful)."""

    def kill(self, reason: str = "") -> None:
        """End the worker now (its calls are resolved by the engine)."""

    def kill_call(self, call_id: int) -> None:
        """Drop one call: a server kills it; a local worker skips it if not started."""

    def rss(self) -> int:
        """Resident memory in bytes (0 where unknown)."""


class SlotHost(Protocol):
    """What a slot reports to (and reads from) the engine that runs it."""

    options: WorkerOptions
    loop: Loop
    label: str

    def worker_ready(self, proc: WorkerSlot, capacity: int | None = None) -> None:
        """``proc`` finished its handshake; ``capacity`` calls run there at once."""

    def start_failed(self, proc: WorkerSlot, error: BaseException) -> None:
        """``proc`` could not start (a StartError, an AuthenticationError, ...)."""

    def on_results(self, proc: WorkerSlot, msgs: list[p.Result]) -> None:
        """Results read in one go from ``proc``."""

    def on_progress(self, msg: p.Progress) -> None:
        """A progress report of one call."""

    def on_channel(self, msg: p.Message) -> None:
        """A channel message of one call (ChannelData, ChannelClose, ChannelCredit)."""

    def worker_failed(self, proc: WorkerSlot, reason: str, detail: str) -> None:
        """The slot gives up on ``proc`` (unresponsive, over memory): kill it."""

    def check_memory(self, proc: WorkerSlot) -> None:
        """Time to compare ``proc``'s memory with ``memory_limit``."""

    def process_exited(self, proc: WorkerSlot, info: ExitInfo) -> None:
        """``proc`` is gone (its process exited or its connection closed)."""

    def discard(self, proc: WorkerSlot) -> None:
        """``proc`` never ran (killed or failed before anything was started)."""


class ChannelSlot:
    """What the slot kinds whose worker talks over a
    :class:`~offload.transport.channel.Channel` share: writing what was queued, and a
    waiting thread reading its own answer."""

    channel: Channel | None = None

    def flush(self) -> None:
        """Write the queued calls (after the engine lock is released)."""
        channel = self.channel
        if channel is not None:
            channel.flush()

    def claim(self) -> bool:
        """See :meth:`offload.transport.channel.Channel.claim`."""
        channel = self.channel
        return channel is not None and channel.claim()

    def pump_claimed(self, done: Callable[[], bool], window: float) -> None:
        """See :meth:`offload.transport.channel.Channel.pump_claimed`."""
        channel = self.channel
        if channel is not None:
            channel.pump_claimed(done, window)


SlotFactory = Callable[[SlotHost, int, int, str], WorkerSlot]
"""``factory(host, index, gen, name)``: the worker for slot ``index``, generation
``gen``, named ``name``; started by the engine on the I/O loop."""
