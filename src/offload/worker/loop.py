"""The worker's main loop: the code that runs a worker process.

Theory of operation
-------------------
The parent starts the worker with one end of a socketpair, and its
:class:`~offload.worker.settings.WorkerSettings` (the socket's number among them) in
the ``OFFLOAD_WORKER`` environment variable (``spawn``, ``reexec``) or directly (``fork``,
``forkserver``). That socket carries only protocol frames; the worker's stdout and
stderr are separate, so nothing a task prints can corrupt the channel.

1. The worker applies its settings (``sys.path``, process title, faulthandler, the
   lifeline's signal handlers and subreaping), imports the ``preload`` modules and sends
   its :class:`Hello`.
2. Calls run one at a time on the main thread, which also reads the socket, when
   nothing must be answered while a call runs (``concurrency=1``, no heartbeat): calls
   that arrive meanwhile wait in the socket buffer, until a watcher thread reads them
   once the call has run long, to answer a Cancel of a call waiting behind it at once
   (:meth:`WorkerLoop.watch`: the client takes such calls back for another worker).
   Otherwise a reader thread decodes
   frames: ``Call`` messages go to a FIFO queue that ``concurrency`` executor threads
   drain (the main thread is one of them, so tasks that install signal handlers work),
   and ``Ping`` is answered at once by the reader.
3. Each call is run by :class:`~offload.worker.execution.Execution` and answered with
   its ``Result`` as soon as it is ready. Calls *start* in the order they arrived: the
   client relies on that to know which calls were running when a worker dies. A call
   cancelled before it started is skipped. Channel messages go to the ends of the calls
   that hold them (:mod:`offload.worker.channels`): routed by the reader thread, or,
   inline, read by a call's end that waits for items or credits (:meth:`pump_channels`;
   what else it reads waits in :attr:`WorkerLoop.deferred` for the loop).
4. ``Shutdown`` is queued behind the calls already received, so they finish first; the
   worker then runs what was registered with :meth:`WorkerLoop.before_exit` (an actor's
   listener drains its other clients), says ``Goodbye`` and exits with status 0.
   :meth:`WorkerLoop.request_stop` does the same from inside the process (a holder of an
   actor's handle other than its creator asked it to shut down).
5. End of file on the socket means the parent is gone (or gave up on us): the worker
   dies with its whole process group (:mod:`offload.worker.lifeline`) -- unless it was
   started with ``shutdown_on="explicit"`` (an actor that outlives its creator): it then
   lets go of its standard output and error (nobody reads the pipes any more) and lives
   on until :meth:`WorkerLoop.request_stop`.

The worker imports nothing from the client side.
"""

from __future__ import annotations

import _thread
import os
import sys
from _queue import SimpleQueue
from collections import deque
from time import monotonic

from offload import protocol as p
from offload.errors import ProtocolError
from offload.serde import dumps
from offload.worker import lifeline
from offload.worker.execution import Execution, flush_stdio
from offload.worker.settings import SETTINGS_ENV, WorkerSettings, decode_settings

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

# Reads go into one preallocated buffer: allocating a fresh 256 KiB bytes object per
# read costs an mmap/munmap pair, more than the rest of a small call's round trip.
_READ_SIZE = 1 << 18
_IOV_MAX = 1024  # buffers one writev takes at most (Linux)
_STOP = object()  # tells an executor thread to return
_CHANNEL_MESSAGES = (p.ChannelData, p.ChannelCredit, p.ChannelClose)


# Calls that waited behind others this long (seconds) are checked for a Cancel that
# arrived meanwhile before they start (see WorkerLoop.inline_loop).
CANCEL_CHECK = 0.001
# While a call runs longer than this (seconds), an inline worker that has run a call
# (or has calls sent ahead) reads its socket this often on another thread, so that a
# call the client takes back (to run it on an idle worker) is answered SKIPPED at once,
# not after the long call (see WorkerLoop.watch).
WATCH_PERIOD = 0.02
WATCH_IDLE = 0.25  # the longest it sleeps while no call runs (backing off from 0.02)


class WorkerLoop:
    """One worker process's loop: reads calls, runs them, sends their results.

    Owns the socket to the client (``settings.fd``), the protocol connection, the queue
    of calls and the set of cancelled call ids.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.fd = settings.fd
        self.name = settings.name
        self.concurrency = settings.concurrency
        self.conn = p.Connection(
            "worker",
            name=self.name,
            pid=os.getpid(),
            slots=self.concurrency,
            max_message_size=settings.max_message_size,
        )
        self.execution = Execution(
            name=self.name, report=self._report, max_message_size=settings.max_message_size
        )
        self.execution.make_ends = self._make_ends  # channel ends of its calls, on first use
        self.shared: Any = None  # large buffers through shared memory (see _write)
        if settings.shared_memory:
            from offload.transport.shared import SharedMemory, receive_into

            self.shared = self.conn.sharing = SharedMemory(settings.shared_memory)
            self._receive_into = receive_into
        self.queue: SimpleQueue[Any] = SimpleQueue()
        self.cancelled: set[int] = set()
        # Threaded mode: the calls in ``queue`` that no executor has taken yet, and
        # those of them answered SKIPPED already (a Cancel; the executor drops them).
        self._claim_lock = _thread.allocate_lock()
        self._untaken: set[int] = set()
        self._skipped: set[int] = set()
        # Inline mode: messages read and not handled yet (read between calls, or by a
        # call's channel end waiting for its items: see pump_channels).
        self.deferred: deque[p.Message] = deque()
        # Inline mode: held by whoever reads the socket or takes from ``deferred`` (the
        # loop, a call's channel end, the watcher).
        self._pump_lock = _thread.allocate_lock()
        self._call_started = 0.0  # inline: when the running call started (0.0: none)
        self._watcher: Any = None  # inline: the watcher thread, once started (see watch)
        # Adopted orphans' zombies, when this worker is a subreaper (see run_worker).
        self.reaper: lifeline.OrphanReaper | None = None
        self._nonblocking: Any = None  # see read_ready
        self._read_buf = bytearray(_READ_SIZE)
        self._read_view = memoryview(self._read_buf)
        self._send_lock = _thread.allocate_lock()
        self._closed = False
        self._exit_hooks: list[Callable[[], object]] = []
        self.stop_requested = False
        self._stopped = False  # the end of the input was turned into a Shutdown
        self._leaving = False  # all done: Goodbye sent or being sent, exit status 0 next
        # Held until request_stop(): an explicit worker whose client is gone waits on it.
        self._stop_lock = _thread.allocate_lock()
        self._stop_lock.acquire()

    def __repr__(self) -> str:
        mode = "inline" if self.inline else f"{self.concurrency} threads"
        state = "closed" if self._closed else "open"
        return (
            f"<WorkerLoop {self.name} pid={os.getpid()} fd={self.fd} {state} [{mode} | "
            f"calls: {self.queue.qsize()} queued, {len(self.cancelled)} cancelled]>"
        )

    # -- output --------------------------------------------------------------------------

    def send(self, msg: p.Message) -> None:
        """Send one message; safe from any thread. Does nothing once the channel broke."""
        with self._send_lock:
            if self._closed:
                return
            self._write(self.conn.send(msg))

    def _write(self, chunks: list[Any]) -> None:
        if self.shared is not None and type(chunks[0]) is int:
            self._write_shared(chunks)
            return
        views = [memoryview(c).cast("B") for c in chunks]
        while views:
            try:
                n = os.writev(self.fd, views[:_IOV_MAX])
            except InterruptedError:
                continue
            except OSError:
                self._closed = True  # parent gone; the reader will notice EOF
                return
            while n and views:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    def send_many(self, msgs: list[p.Message]) -> None:
        """Send messages in one write; safe from any thread."""
        with self._send_lock:
            if self._closed:
                return
            chunks: list[Any] = []
            for msg in msgs:
                chunks += self.conn.send(msg)
            self._write(chunks)

    def _make_ends(self) -> Any:
        """The channel ends of this worker's calls (made when the first one arrives)."""
        from offload.worker.channels import Ends

        return Ends(self.send_many, pump=self.pump_channels if self.inline else None)

    def pump_channels(self, timeout: float | None) -> None:
        """Inline mode, from a call's channel end waiting for items or credits: read
        what arrives within ``timeout`` seconds, route the channel messages, and leave
        the rest (calls, cancels, shutdown) to :meth:`inline_loop`, in order."""
        import select

        with self._pump_lock:  # one reader at a time (a task may have threads)
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                return
            self._take_in(self.read_batch())

    def _write_shared(self, chunks: list[Any]) -> None:
        """:meth:`_write` of a frame that begins with descriptors of shared memory."""
        from offload.transport.shared import send_chunks

        try:
            while chunks:
                chunks = send_chunks(self._socket(), chunks, 0, _IOV_MAX)
        except OSError:
            self._closed = True  # parent gone; the reader will notice EOF

    def _report(self, call_id: int, value: Any) -> None:
        """``offload.report(value)`` in a running call: send it as the call's progress."""
        data, buffers = dumps(value)
        self.send(p.Progress(call_id=call_id, payload=data, buffers=tuple(buffers)))

    def say_hello(self) -> None:
        """Send this worker's Hello (the first frame on the channel)."""
        self._write(self.conn.hello())

    def say_goodbye(self) -> None:
        """Send Goodbye after the last result, and send nothing more."""
        self._leaving = True  # from here the end of the input is no news (see die)
        with self._send_lock:
            if not self._closed:
                self._write(self.conn.send(p.Goodbye(reason="shutdown")))
            self._closed = True

    def die(self) -> NoReturn:
        """The client is gone or broke the protocol: end this worker and its process
        group now (:func:`offload.worker.lifeline.die`); but with status 0 once it is
        leaving on purpose (:meth:`say_goodbye`)."""
        if self._leaving:
            # The main thread is exiting with status 0 (its calls done, its Goodbye
            # written) and the client, which closes the connection when it reads the
            # Goodbye, won the race to the reader. A worker started by hand shows this
            # status to whoever started it: a graceful end is 0.
            os._exit(0)
        self._closed = True
        lifeline.die()

    # -- input ---------------------------------------------------------------------------

    @property
    def inline(self) -> bool:
        """Run calls on the thread that reads the socket (no thread hand-off per call).

        Possible when calls run one at a time and nothing must be answered while a call
        runs (no heartbeat): parent death during a call is then caught by the
        parent-death signal, and calls that arrive meanwhile wait in the socket buffer.
        Not for a worker started by hand (its connection is authenticated, so sealed):
        its caller is not its parent, and only reading tells it the caller is gone.
        """
        return self.concurrency == 1 and not self.settings.heartbeat and self.conn.sealer is None

    def read_batch(self, timeout: float | None = None) -> list[p.Message]:
        """Block until at least one frame arrives; return the complete messages.

        Ends the process (:meth:`die`) when the client is gone, breaks the protocol, or
        sends nothing for ``timeout`` seconds.
        """
        while True:
            if timeout is not None:
                import select

                ready, _, _ = select.select([self.fd], [], [], timeout)
                if not ready:
                    self.die()  # no heartbeat from the client
            # The rest of a large frame is read straight into its own memory.
            target = self.conn.receive_buffer()
            buf = self._read_buf if target is None else target
            try:
                n = os.readv(self.fd, [buf]) if self.shared is None else self._receive(0, buf)
            except InterruptedError:
                continue
            except (OSError, ProtocolError):
                n = 0
            if not n and self.stop_requested:
                # Our own reading side was shut (request_stop): the client is still
                # there, and the results of the calls read already still go to it.
                return self._client_gone()
            if n and target is not None:
                self.conn.received_into(n)
                if self.conn.receive_buffer() is not None:
                    continue  # not whole yet
            else:
                self.conn.receive_data(self._read_view[:n] if n else b"")
            batch: list[p.Message] = []
            try:
                ended = self.conn.next_events(batch) is p.CLOSED
            except ProtocolError:
                self.die()
            if ended:
                return batch + self._client_gone()
            if batch:
                return batch

    def _client_gone(self) -> list[p.Message]:
        """The input ended: the client closed its end, or :meth:`request_stop` shut our
        reading side. A requested stop becomes a Shutdown (behind the calls read
        already); otherwise the worker dies with its process group, or, started with
        ``shutdown_on="explicit"``, outlives its client until a stop is requested."""
        if not self.stop_requested:
            if self.settings.shutdown_on != "explicit":
                self.die()  # the client closed the connection
            self._closed = True  # nothing more can be sent to the client
            if self.shared is not None:
                with self._send_lock:  # not while a send copies into a segment
                    self.shared.close()  # the client's segments: this process lives on
            lifeline.outlive_parent()
            self._stop_lock.acquire()  # until request_stop()
        self._stopped = True
        return [p.Shutdown()]

    def request_stop(self) -> None:
        """End this worker from inside as the client's Shutdown would: the calls received
        already finish, the exit hooks run, then the process exits with status 0.
        Thread-safe; idempotent."""
        if self.stop_requested:
            return
        self.stop_requested = True
        self._stop_lock.release()  # an explicit worker whose client is gone waits on it
        import _socket

        try:
            self._socket().shutdown(_socket.SHUT_RD)  # the reader sees the end at once
        except OSError:
            pass  # the client's end is gone already: the reader has seen it

    def before_exit(self, hook: Callable[[], object]) -> None:
        """Run ``hook()`` when the worker stops on purpose (Shutdown or
        :meth:`request_stop`), after its last call and before its Goodbye."""
        self._exit_hooks.append(hook)

    def run_exit_hooks(self) -> None:
        """Run the :meth:`before_exit` hooks, each once; one that raises does not stop
        the others."""
        hooks, self._exit_hooks = self._exit_hooks, []
        for hook in hooks:
            try:
                hook()
            except BaseException as exc:  # noqa: BLE001 - the exit goes on
                print(
                    f"offload: an exit hook of worker {self.name} failed: {exc!r}", file=sys.stderr
                )

    def read_loop(self) -> None:
        """Reader thread (threaded mode): route frames to the executors. Returns only
        once the input ended on purpose (see :meth:`_client_gone`)."""
        timeout = None
        heartbeat = self.settings.heartbeat
        if heartbeat and self.settings.shutdown_on == "heartbeat_timeout":
            timeout = heartbeat[1]
        while not self._stopped:
            for msg in self.read_batch(timeout):
                self.handle(msg)

    def inline_loop(self) -> None:
        """Inline mode: read and run calls on this thread; returns on Shutdown.

        Calls sent ahead arrive in batches; before a call that waited behind others
        for over CANCEL_CHECK seconds, the socket is read without blocking, so that a
        Cancel the client sent while earlier calls ran wins over running the call it
        names. (Not before each call: a pipeline of tiny calls would pay a system call
        per call, about 7% of its throughput, for a window of a millisecond.)"""
        pending = self.deferred
        lock = self._pump_lock
        read_at = 0.0
        while True:
            with lock:  # the watcher may take a call back from ``pending`` meanwhile
                if not pending:
                    pending.extend(self._noting_cancels(self.read_batch()))
                    read_at = monotonic()
                msg = pending.popleft()
                if isinstance(msg, p.Call):
                    self._call_started = monotonic()
                    behind = bool(pending)
            if isinstance(msg, p.Call):
                if behind and self._watcher is None:  # calls are sent ahead already
                    self._start_watcher()
                # Each result goes back as soon as it is ready: holding it to share a
                # write with the next call's would make it wait for that call, however
                # long it runs.
                self.run_call(msg)
                self._call_started = 0.0
                if self._watcher is None:  # after the first result, not before it
                    self._start_watcher()
                if pending and monotonic() - read_at > CANCEL_CHECK:
                    with lock:
                        pending.extend(self._noting_cancels(self.read_ready()))
                    read_at = monotonic()
            elif isinstance(msg, p.Shutdown):
                return
            else:
                self.handle(msg)

    def _start_watcher(self) -> None:
        import threading

        self._watcher = threading.Thread(
            target=self.watch, name="offload-worker-watch", daemon=True
        )
        self._watcher.start()

    def watch(self) -> None:
        """Inline mode, on a thread of its own from the first call on: while a call
        has run for WATCH_PERIOD, read what arrived every WATCH_PERIOD seconds. A Cancel
        of a call still waiting in :attr:`deferred` takes it out and answers SKIPPED now
        (the client may then run it on another worker); channel messages go to their
        ends; everything else waits in :attr:`deferred` for the loop, in order. While
        no call runs it wakes less and less often, down to once every WATCH_IDLE."""
        from time import sleep

        lock = self._pump_lock
        pause = WATCH_PERIOD
        while not self._leaving:
            sleep(pause)
            started = self._call_started
            if not started:
                pause = min(2 * pause, WATCH_IDLE)
                continue
            pause = WATCH_PERIOD
            if monotonic() - started < WATCH_PERIOD:
                continue
            if not lock.acquire(False):  # the loop or a channel end is reading
                continue
            try:
                if self._call_started == started:  # still the same call
                    self._take_in(self.read_ready())
            finally:
                lock.release()

    def _take_in(self, batch: list[p.Message]) -> None:
        """Messages read while a call runs (inline mode, the pump lock held; see
        :meth:`watch` and :meth:`pump_channels`): channel messages go to their ends, a
        Cancel of a call waiting in :attr:`deferred` takes it out and is answered
        SKIPPED now, and the rest waits in :attr:`deferred` for the loop, in order."""
        pending = self.deferred
        for msg in batch:
            if type(msg) in _CHANNEL_MESSAGES:
                ends = self.execution.ends
                if ends is not None:  # else no call here ever had a channel end
                    ends.route(msg)
            elif isinstance(msg, p.Cancel):
                for i, waiting in enumerate(pending):
                    if isinstance(waiting, p.Call) and waiting.call_id == msg.call_id:
                        del pending[i]
                        self.send(p.Result(call_id=msg.call_id, status=p.SKIPPED))
                        break
                else:  # started already (its result follows), or unknown
                    pending.append(msg)
            else:
                pending.append(msg)

    def _noting_cancels(self, batch: list[p.Message]) -> list[p.Message]:
        """``batch``, after noting its Cancels (one read with its call must win)."""
        for msg in batch:
            if isinstance(msg, p.Cancel):
                self.cancelled.add(msg.call_id)
        return batch

    def read_ready(self) -> list[p.Message]:
        """The complete messages that arrived already, without blocking ([] if none;
        the end of the connection is left for :meth:`read_batch` to find)."""
        import _socket  # only once calls come in batches: not on every worker's start-up

        sock = self._socket()
        target = self.conn.receive_buffer()  # the rest of a large frame, if one is under way
        buf = self._read_buf if target is None else target
        try:
            if self.shared is None:
                n = sock.recv_into(buf, 0, _socket.MSG_DONTWAIT)
            else:
                n = self._receive(_socket.MSG_DONTWAIT, buf)
        except (OSError, ProtocolError):  # nothing there, or gone: read_batch will see
            return []
        if not n:
            return []
        if target is not None:
            self.conn.received_into(n)
        else:
            self.conn.receive_data(self._read_view[:n])
        batch: list[p.Message] = []
        try:
            self.conn.next_events(batch)
        except ProtocolError:
            self.die()
        return batch

    def _receive(self, flags: int, buf: bytearray | memoryview) -> int:
        """Read into ``buf``, with the descriptors of shared memory that come with the
        bytes.

        Raises:
            OSError: as ``recv_into``.
            ProtocolError: descriptors were lost.
        """
        return self._receive_into(self._nonblocking or self._socket(), buf, flags, self.shared)

    def _socket(self) -> Any:
        """The C socket type over the channel's fd (the ``socket`` package costs a worker
        start-up time): reads with MSG_DONTWAIT leave the fd blocking for the blocking
        reads. Kept for the life of the process, so it never closes the fd."""
        sock = self._nonblocking
        if sock is None:
            import _socket

            sock = self._nonblocking = _socket.socket(fileno=self.fd)
        return sock

    def handle(self, msg: p.Message) -> None:
        """Act on one message from the client (threaded mode: on the reader thread)."""
        match msg:
            case p.Call():
                with self._claim_lock:
                    self._untaken.add(msg.call_id)
                self.queue.put(msg)
            case p.Ping(seq=seq):
                self.send(p.Pong(seq=seq))
            case p.Cancel(call_id=call_id):
                with self._claim_lock:
                    waiting = call_id in self._untaken
                    if waiting:  # no executor has it: answered now, dropped when taken
                        self._untaken.discard(call_id)
                        self._skipped.add(call_id)
                if waiting:
                    self.send(p.Result(call_id=call_id, status=p.SKIPPED))
            case p.Shutdown():
                for _ in range(self.concurrency):  # one per executor thread, behind the calls
                    self.queue.put(_STOP)
            case p.Goodbye():
                self.die()  # the client said goodbye
            case p.ChannelData() | p.ChannelCredit() | p.ChannelClose():
                ends = self.execution.ends
                if ends is not None:  # else no call here ever had a channel end
                    ends.route(msg)
            case _:
                pass  # Hello (handled by Connection) and Pong

    # -- execution -----------------------------------------------------------------------

    def execute_loop(self) -> None:
        """Executor thread: run queued calls in arrival order until told to stop."""
        while True:
            call = self.queue.get()
            if call is _STOP:
                return
            with self._claim_lock:
                call_id = call.call_id
                if call_id in self._skipped:  # answered SKIPPED when it was cancelled
                    self._skipped.discard(call_id)
                    continue
                self._untaken.discard(call_id)
            self.run_call(call)

    def run_call(self, call: p.Call) -> None:
        """Run ``call`` and send its result; a call cancelled before it started is
        answered SKIPPED instead (the client then knows it never ran)."""
        if call.call_id in self.cancelled:
            self.cancelled.discard(call.call_id)
            self.send(p.Result(call_id=call.call_id, status=p.SKIPPED))
            return
        self.send(self.execution.run(call))
        if self.reaper is not None:
            self.reaper.reap()


_this_worker: WorkerLoop | None = None


def this_worker() -> WorkerLoop | None:
    """The loop of this worker process (None outside a worker): for code that a call
    runs in the worker to host more there (an actor's listener, see
    :mod:`offload.server.host`)."""
    return _this_worker


def run_worker(
    settings: WorkerSettings | None = None, *, sealer: Any = None, leftover: bytes = b""
) -> NoReturn:
    """Run this process as a worker until told to stop; never returns.

    Args:
        settings: the worker settings; read from ``OFFLOAD_WORKER`` when omitted.
        sealer: the session's :class:`~offload.protocol.auth.Sealer`, for a worker
            whose channel is a connection it authenticated (started by hand, see
            :mod:`offload.worker.attach`); None over a private socketpair.
        leftover: bytes that arrived with the end of that authentication.

    Raises:
        KeyError: no settings given and ``OFFLOAD_WORKER`` is not set.
    """
    if settings is None:
        settings = decode_settings(os.environ.pop(SETTINGS_ENV))
    os.set_inheritable(settings.fd, False)  # tasks' subprocesses must not hold it
    for entry in reversed(settings.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import faulthandler

    faulthandler.enable()
    _set_title(settings.name)
    global _this_worker
    loop = _this_worker = WorkerLoop(settings)
    loop.conn.sealer = sealer
    if leftover:
        loop.conn.receive_data(leftover)
    if lifeline.become_subreaper():
        loop.reaper = lifeline.OrphanReaper()
    lifeline.install_signal_handlers(settings.ppid)
    if sys.stdout is not None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    for module in settings.preload:
        __import__(module)
    loop.say_hello()

    if settings.shutdown_on != "explicit":
        lifeline.set_parent_death_signal(settings.ppid)
    if loop.inline:
        loop.inline_loop()
    else:
        import threading

        threading.Thread(target=loop.read_loop, name="offload-worker-reader", daemon=True).start()
        helpers = [
            threading.Thread(target=loop.execute_loop, name=f"offload-exec-{i}", daemon=True)
            for i in range(1, loop.concurrency)
        ]
        for t in helpers:
            t.start()
        loop.execute_loop()  # returns on Shutdown
        for t in helpers:
            t.join()
    loop.run_exit_hooks()
    flush_stdio()
    loop.say_goodbye()
    os._exit(0)


def _set_title(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass
