"""``offload serve --isolation inline``: calls run on threads of the server process.

For debugging, and to measure the server without its worker processes: a call that
crashes takes the server with it, and a running call cannot be killed (a thread cannot
be), only one still waiting for a thread. The :class:`InlineRunner` offers the
server's sessions the same relay interface as the engine of child workers
(:class:`~offload.server.session.Runner`): ``submit_raw``, ``cancel``, ``kill_call``.

A call runs through an :class:`~offload.worker.execution.Execution`, as in a worker
process. It still carries its client's id, which may collide with another client's: an
``offload.report(value)`` finds its call's session by the server-wide id of the call
running on the reporting thread instead, and the session relabels the progress for its
client like a worker's. What a call prints on its thread goes to its client too, once
the serving process routes its output (:mod:`offload.server.thread_output`).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from offload import protocol as p
from offload.client.slot import RawSink
from offload.errors import WorkerKilled
from offload.serde import dumps
from offload.server.thread_output import routed
from offload.worker.execution import Execution


class InlineRunner:
    """Runs relayed calls on ``threads`` threads of this process.

    Calls start in the order they arrived (one FIFO queue feeds the threads).

    Args:
        threads: calls run at once.
        max_message_size: results that pickle to more than this fail (``BAD_RESULT``),
            as in a worker process.
        gate: a lock (or semaphore) each call holds while it runs, shared with the
            other doors of this process's calls (see ``Execution.gate``); None: none.
        on_thread_start: called on each of its threads when it starts.
    """

    def __init__(
        self,
        threads: int,
        *,
        max_message_size: int,
        gate: Any = None,
        on_thread_start: Callable[[], object] | None = None,
    ) -> None:
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="offload-inline", initializer=on_thread_start
        )
        self._execution = Execution(
            name="inline", report=self._report, max_message_size=max_message_size
        )
        self._execution.gate = gate
        self._execution.make_ends = self._make_ends
        # Calls waiting for a thread (call_id -> its job and sink), and calls running
        # (call_id -> sink). Dict operations are atomic: each entry is added and removed
        # by the one thread that owns that step of the call.
        self._queued: dict[int, tuple[concurrent.futures.Future[None], RawSink]] = {}
        self._running: dict[int, RawSink] = {}
        self._on_thread = threading.local()  # .call_id: the server-wide id running here
        self._closed = threading.Event()

    def __repr__(self) -> str:
        state = " closed" if self._closed.is_set() else ""
        return (
            f"<InlineRunner threads={self.threads} running={len(self._running)} "
            f"queued={len(self._queued)}{state}>"
        )

    @property
    def busy(self) -> int:
        """Calls running now."""
        return len(self._running)

    def submit_raw(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        """Run ``call`` on a thread under ``call_id``; its Result goes to ``sink``.

        Raises:
            RuntimeError: after :meth:`shutdown`.
        """

        def run() -> None:
            self._queued.pop(call_id, None)
            self._running[call_id] = sink
            on_thread = self._on_thread
            on_thread.call_id = call_id
            try:
                # What it prints on this thread is its caller's (see thread_output).
                with routed(sink, call_id):
                    result = self._execution.run(call)  # under the client's id: relabelled later
            finally:
                on_thread.call_id = None
                self._running.pop(call_id, None)
            sink.call_done(call_id, result)

        job = self._pool.submit(run)
        self._queued[call_id] = (job, sink)
        if job.running() or job.done():  # it started before it was filed
            self._queued.pop(call_id, None)

    def _report(self, client_id: int, value: object) -> None:
        """``offload.report(value)`` in a running call (on the call's thread): pickled
        here, as a worker would, and passed to the call's session under the call's
        server-wide id (``client_id`` may be another client's too).

        Raises:
            Whatever pickling ``value`` raises (in the call, as in a worker).
        """
        call_id: int | None = getattr(self._on_thread, "call_id", None)
        if call_id is not None and (sink := self._running.get(call_id)) is not None:
            data, buffers = dumps(value)
            sink.call_progress(p.Progress(call_id=call_id, payload=data, buffers=tuple(buffers)))

    def _make_ends(self) -> Any:
        """The channel ends of the calls run here: they talk under the server-wide id
        of the call running on their thread, through its session."""
        from offload.worker.channels import Ends

        def call_key() -> int:
            return int(self._on_thread.call_id)

        return Ends(self._send_channel_out, call_key=call_key)

    def _send_channel_out(self, msgs: list[p.Message]) -> None:
        for msg in msgs:
            sink = self._running.get(msg.call_id)  # type: ignore[attr-defined]
            if sink is not None:
                sink.call_channel(msg)

    def send_channel(self, call_id: int, msgs: list[p.Message]) -> bool:
        """Channel messages from a call's client, under the server-wide id."""
        ends = self._execution.ends
        if ends is None or call_id not in self._running:
            return False
        for msg in msgs:
            ends.route(msg)
        return True

    def cancel(self, call_id: int) -> bool:
        """Drop a call that has not started; False if it has."""
        queued = self._queued.pop(call_id, None)
        return queued is not None and queued[0].cancel()

    def kill_call(self, call_id: int) -> bool:
        """Drop a call that has not started, which then fails with WorkerKilled. A
        thread cannot be killed: a running call runs on (False)."""
        queued = self._queued.get(call_id)
        if queued is None or not self.cancel(call_id):
            return False
        queued[1].call_done(call_id, WorkerKilled("the call was killed before it started"))
        return True

    def shutdown(self, *, wait: bool) -> None:
        """Drop the calls still waiting for a thread; with ``wait``, wait for the
        running ones to end."""
        self._closed.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)
