"""A local child process in an engine slot: :class:`LocalSlot`.

It launches the worker (:func:`offload.process.launch.launch`, any start method), runs
the handshake and the initializer over the socketpair, watches heartbeats and memory,
and reports to the engine (a :class:`~offload.client.slot.SlotHost`) on the I/O loop:
ready, results, progress, and how the process ended (an ExitInfo built from its exit
status, its stderr and what this side saw: a broken protocol, a failure of ours).
"""

from __future__ import annotations

import logging
import os

from offload import protocol as p
from offload.client import outcome
from offload.client.options import env_for_worker, settings_for_worker
from offload.client.slot import PUMP_WINDOW, ChannelSlot, ExitInfo, SlotHost
from offload.errors import OffloadError, ProtocolError, describe_exit
from offload.process.child import ChildProcess
from offload.process.launch import LaunchSpec, launch
from offload.serde import dumps, type_name
from offload.transport.channel import Channel
from offload.transport.loop import Timer
from offload.worker.settings import SHARED_MEMORY

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

    from offload.client.future import Future
    from offload.protocol.messages import CallFields

log = logging.getLogger("offload")


class LocalSlot(ChannelSlot):
    """One worker process of a slot: its child process, its channel, its timers.

    Lives on the I/O loop: every method but :meth:`send_calls`, :meth:`kill` and
    :meth:`stop` runs on the loop thread.
    """

    # Read the worker's stdout through a pipe whatever the ``stdout`` option (a worker
    # server's slots relay it to the client whose call printed it).
    pipe_stdout = False
    # Buffers this large go through shared memory between this process and the worker,
    # both ways (offload.transport.shared); 0: none do.
    shared_memory = SHARED_MEMORY

    def __init__(self, host: SlotHost, slot: int, gen: int, name: str) -> None:
        self.host = host
        self.slot = slot
        self.gen = gen
        self.name = name
        self.loop = host.loop
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
        """The worker process's pid (None before it was launched)."""
        return self.child.pid if self.child is not None else None

    @property
    def local_pid(self) -> int | None:
        """The pid while the process runs."""
        child = self.child
        return child.pid if child is not None and child.returncode is None else None

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.child is not None and self.child.returncode is None

    @property
    def launched(self) -> bool:
        """Whether a process was launched (its exit will be reported)."""
        return self.child is not None

    def __repr__(self) -> str:
        state = "ready" if self.ready else "exiting" if self.expected_exit else "starting"
        return f"<LocalSlot {self.name} pid={self.pid} slot={self.slot} gen={self.gen} {state}>"

    # -- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the process (loop thread)."""
        if self.expected_exit:  # killed before it was even launched
            self.host.discard(self)
            return
        opts = self.host.options
        spec = LaunchSpec(
            name=self.name,
            start_method=opts.start_method,
            python=opts.python,
            env=env_for_worker(opts),
            cwd=opts.cwd,
            umask=opts.umask,
            stdout=opts.stdout,
            stderr=opts.stderr,
            pipe_stdout=self.pipe_stdout,
            settings=settings_for_worker(opts).replace(shared_memory=self.shared_memory),
        )
        try:
            self.child, sock = launch(spec, self.loop, self._on_exit)
        except Exception as exc:  # noqa: BLE001 - whatever stops a launch is a StartError
            self.expected_exit = True
            self.host.start_failed(
                self,
                outcome.start_failed(
                    f"worker {self.name} could not be started: {exc}", worker=self.name
                ),
            )
            return
        if self.expected_exit:  # killed while it was being launched
            self.child.terminate()
        try:
            conn = p.Connection(
                "client",
                name=self.host.label,
                pid=os.getpid(),
                max_message_size=opts.max_message_size,
            )
            self.channel = Channel(sock, conn, self.loop)
            self.channel.share_memory(spec.settings.shared_memory)
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
        opts = self.host.options
        self._fail_start(
            outcome.handshake_timeout(
                self.name, self.pid, opts.start_timeout, reexec=opts.start_method == "reexec"
            )
        )

    def _fail_start(self, message: str, cause: BaseException | None = None) -> None:
        self.expected_exit = True
        err: OffloadError
        if isinstance(cause, ProtocolError):
            err = cause
        else:
            err = outcome.start_failed(
                message,
                worker=self.name,
                pid=self.pid,
                exitcode=self.child.returncode if self.child else None,
                stderr_tail=self.child.stderr_tail() if self.child else "",
            )
        self.kill()
        self.host.start_failed(self, err)

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
                self.host.worker_failed(self, "disconnected", self._exit_detail(None))

    def _handle_messages(self, msgs: list[p.Message]) -> None:
        self._last_seen = self.loop.clock()
        results: list[p.Result] = []
        for msg in msgs:
            if isinstance(msg, p.Result) and msg.call_id != 0:
                results.append(msg)
            else:
                self._on_message(msg)
        if results:
            self.host.on_results(self, results)

    def _on_message(self, msg: p.Message) -> None:
        match msg:
            case p.Result():  # call id 0: the initializer
                self._initialized(msg)
            case p.Progress():
                self.host.on_progress(msg)
            case p.ChannelData() | p.ChannelCredit() | p.ChannelClose():
                self.host.on_channel(msg)
            case p.Hello():
                self._handshake_done()
            case p.Pong() | p.Goodbye():
                pass
            case _:
                self._protocol_violation(
                    ProtocolError(f"worker {self.name} sent an unexpected {type(msg).__name__}")
                )

    def _handshake_done(self) -> None:
        opts = self.host.options
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
                kind=p.INIT_KIND,
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
        opts = self.host.options
        if opts.heartbeat is not None:
            self._last_seen = self.loop.clock()
            self._timers.append(self.loop.call_later(opts.heartbeat[0], self._heartbeat))
        if opts.memory_limit is not None:
            self._timers.append(self.loop.call_later(0.05, self._check_memory))
        self.host.worker_ready(self)

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
        interval, timeout = self.host.options.heartbeat or (0.0, 0.0)
        if self.loop.clock() - self._last_seen > timeout:
            self.host.worker_failed(
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
        self.host.check_memory(self)
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
        self.host.process_exited(self, info)
