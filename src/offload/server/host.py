"""Calls served in this very process: an actor's listener, and a worker's whose handle
travelled to another process.

Theory of operation
-------------------
1. A handle that travels (pickled into another worker's call, written to a file) is an
   address and a token. Whoever holds it connects to that address and proves the token,
   as a client of ``offload serve`` does; the other end is a :class:`Host`: a
   :class:`~offload.server.server.Server` with ``isolation="inline"`` (the same hardened
   front door, sessions and drain) whose calls run on threads of *this* process, where
   the actor's instance (or the worker's state) lives.
2. The calls of a process come through several doors: the channel to its creator (the
   worker loop) and every connection of the listener. One gate (a lock, or a semaphore
   of ``concurrency`` permits) is shared by all of them (``Execution.gate``), so
   "``concurrency`` calls at once" holds whoever sent them. Each door starts its calls
   in the order they arrived, so each client's calls stay in its order.
3. :func:`control` calls (a holder's ``shutdown()`` or ``kill()``) do not queue behind
   the calls: the runner recognises them by their function's reference, before
   unpickling anything, and runs them at once on a thread of their own.
4. A spawned actor (:func:`start_actor`, its worker's initializer) builds its instance,
   then its listener; the creator asks :func:`hosted_address` where that listens. When
   the worker stops on purpose (its creator's ``shutdown()``, or a holder's), the
   listener drains first (``WorkerLoop.before_exit``). A plain worker starts its listener
   the first time its handle is pickled (:func:`listen_here`, called by name: the client
   side never imports this module).
5. ``Actor.serve`` hosts an instance in the calling process: :func:`serve_actor`.

Everything here runs in the process that hosts the calls.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from offload import protocol as p
from offload.client.slot import RawSink
from offload.serde import function_reference
from offload.server.inline import InlineRunner
from offload.server.server import Server
from offload.server.thread_output import install as install_output_routing
from offload.tasks import task
from offload.worker import lifeline
from offload.worker.actor import bind_thread, set_process_actor
from offload.worker.execution import Execution
from offload.worker.loop import WorkerLoop, this_worker

# Seconds a stopping host lets its clients' calls finish before it stops waiting.
DRAIN_TIMEOUT = 10.0
# The name client code calls listen_here by (see offload.client.worker).
LISTEN_TASK = "offload.server.host:listen_here"

_serving = threading.local()  # .host: the Host whose listener runs calls on this thread
_process_host: Host | None = None  # the listener of this worker process, if it has one


def make_gate(concurrency: int) -> Any:
    """The gate of a process's calls: ``concurrency`` of them hold it at once."""
    if concurrency == 1:
        return threading.Lock()
    return threading.BoundedSemaphore(concurrency)


class HostRunner(InlineRunner):
    """Runs a host's calls on its threads, through the shared gate; :func:`control`
    calls run at once, on a thread of their own."""

    def __init__(self, host: Host, threads: int, *, max_message_size: int, gate: Any) -> None:
        super().__init__(
            threads, max_message_size=max_message_size, gate=gate, on_thread_start=host.bind
        )
        self._host = host
        self._control = Execution(name=host.name, max_message_size=max_message_size)

    def __repr__(self) -> str:
        return f"<HostRunner {self._host.name} threads={self.threads} running={self.busy}>"

    def submit_raw(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        """Run ``call`` in its turn (a :func:`control` call: now).

        Raises:
            RuntimeError: after shutdown.
        """
        if call.function and call.function in _urgent_references():
            threading.Thread(
                target=self._run_urgent,
                args=(call_id, call, sink),
                name="offload-control",
                daemon=True,
            ).start()
            return
        super().submit_raw(call_id, call, sink)

    def _run_urgent(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        self._host.bind()
        sink.call_done(call_id, self._control.run(call))


class Host(Server):
    """A listener whose authenticated clients' calls run in this process.

    Args:
        listen: the address to listen on (``127.0.0.1:0`` picks a free port).
        token: the token clients must prove (at least 32 bytes).
        name: the name clients see (in errors about this host's calls).
        concurrency: calls it runs at once (threads), within the shared ``gate``.
        gate: the gate shared with this process's other doors (:func:`make_gate`).
        max_message_size: the largest frame accepted or sent.
        instance: the actor its calls go to (None for a plain worker).
        worker: the loop of this worker process, when the host lives in one.

    Raises:
        TypeError, ValueError: a malformed ``listen`` address or ``name``.
        AuthenticationError: a token shorter than 32 bytes.
    """

    def __init__(
        self,
        listen: str,
        *,
        token: bytes,
        name: str,
        concurrency: int,
        gate: Any,
        max_message_size: int,
        instance: object = None,
        worker: WorkerLoop | None = None,
    ) -> None:
        super().__init__(
            listen,
            token=token,
            workers=concurrency,
            isolation="inline",
            worker_options={"name": name, "max_message_size": max_message_size},
        )
        self.name = name
        self.gate = gate
        self.instance = instance
        self.worker = worker
        if worker is not None:
            # In a worker process, what a holder's call prints on its thread goes to that
            # holder (thread_output), not to the creator through the worker's pipes.
            install_output_routing()
        self.stopped = threading.Event()  # set once stop() has finished
        self._stop_lock = threading.Lock()

    def _inline_runner(self) -> InlineRunner:
        return HostRunner(
            self,
            self.workers,
            max_message_size=self._worker_options.max_message_size,
            gate=self.gate,
        )

    def hello_name(self) -> str:
        """Clients name this host after the actor or worker it serves."""
        return self.name

    def bind(self) -> None:
        """Calls that run on this thread are this host's (each of its threads)."""
        _serving.host = self
        if self.instance is not None:
            bind_thread(self.instance)

    def stop(self, timeout: float = DRAIN_TIMEOUT) -> bool:
        """Stop listening and let the clients' calls finish for up to ``timeout``
        seconds. Idempotent (the first caller stops it; later ones return at once).

        Returns:
            True if every call finished by itself.
        """
        if not self._stop_lock.acquire(blocking=False):
            return True
        try:
            return super().stop(timeout)
        finally:
            self.stopped.set()

    def handle_control(self, request: str) -> None:
        """A holder's ``shutdown()`` or ``kill()`` (``request``), on a control thread."""
        worker = self.worker
        if worker is not None:
            # The process ends: say why on stderr, which the creator (if it is still
            # there) quotes in the error its own calls fail with.
            what = "shut down" if request == "shutdown" else "killed"
            print(
                f"offload: {self.name} was {what} through a handle held by another process",
                file=sys.stderr,
                flush=True,
            )
            if request == "kill":
                lifeline.die()
            worker.request_stop()  # the calls received finish; then the exit hooks
            return
        timeout = DRAIN_TIMEOUT if request == "shutdown" else 0.0
        # Not on this thread: the drain waits for this very call to be answered.
        threading.Thread(
            target=self.stop, args=(timeout,), name="offload-host-stop", daemon=True
        ).start()


def control(request: str) -> None:
    """Run by a holder of an actor's handle: ``"shutdown"`` (the actor finishes the calls
    it has received, then ends) or ``"kill"`` (it ends now). Jumps the queue.

    Raises:
        LookupError: not called through a host.
        ValueError: an unknown request.
    """
    host: Host | None = getattr(_serving, "host", None)
    if host is None:
        raise LookupError("no actor is hosted behind this connection")
    if request not in ("shutdown", "kill"):
        raise ValueError(f"unknown control request {request!r}")
    host.handle_control(request)


_urgent: frozenset[bytes] = frozenset()


def _urgent_references() -> frozenset[bytes]:
    global _urgent
    if not _urgent:
        _urgent = frozenset({function_reference(control)})
    return _urgent


@dataclass(frozen=True)
class ActorStart:
    """What a spawned actor's worker needs to become the actor (the argument of
    :func:`start_actor`, pickled by the creator)."""

    cls: type
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token: bytes = field(repr=False)
    name: str
    listen: str
    concurrency: int
    max_message_size: int
    initializer: Any = None
    initargs: tuple[Any, ...] = ()


def start_actor(start: ActorStart) -> None:
    """The initializer of an actor's worker: run the user's initializer, build the
    instance, make it this process's actor and open its listener.

    Raises:
        RuntimeError: not in a worker process.
        OSError: the listen address cannot be listened on.
        Exception: whatever the user's initializer or the class's constructor raises
            (the creator's ``spawn`` raises StartError with its traceback).
    """
    global _process_host
    worker = this_worker()
    if worker is None:
        raise RuntimeError("start_actor runs in a worker process")
    if start.initializer is not None:
        start.initializer(*start.initargs)
    instance = start.cls(*start.args, **start.kwargs)
    set_process_actor(instance)
    gate = make_gate(start.concurrency)
    worker.execution.gate = gate
    host = Host(
        start.listen,
        token=start.token,
        name=start.name,
        concurrency=start.concurrency,
        gate=gate,
        max_message_size=start.max_message_size,
        instance=instance,
        worker=worker,
    )
    host.start()
    _process_host = host
    worker.before_exit(host.stop)


def hosted_address() -> str:
    """The address this worker's listener listens on.

    Raises:
        LookupError: it has none.
    """
    if _process_host is None:
        raise LookupError("this worker has no listener")
    return str(_process_host.address)


@task(name=LISTEN_TASK)
def listen_here(token: bytes, listen: str = "127.0.0.1:0") -> str:
    """Open this worker's listener (once), for the holders of its pickled handle; its
    address. From then on this worker's calls, from its creator and from them, pass one
    gate of ``concurrency`` permits.

    Raises:
        RuntimeError: not in a worker process.
        OSError: ``listen`` cannot be listened on.
    """
    global _process_host
    worker = this_worker()
    if worker is None:
        raise RuntimeError("listen_here runs in a worker process")
    if _process_host is None:
        gate = make_gate(worker.concurrency)
        worker.execution.gate = gate
        host = Host(
            listen,
            token=token,
            name=worker.name,
            concurrency=worker.concurrency,
            gate=gate,
            max_message_size=worker.settings.max_message_size,
            worker=worker,
        )
        host.start()
        _process_host = host
        worker.before_exit(host.stop)
    return str(_process_host.address)


def serve_actor(
    instance: object,
    *,
    listen: str,
    token: bytes,
    name: str,
    concurrency: int,
    max_message_size: int,
) -> Host:
    """Host ``instance`` in this process (``Actor.serve``): its listener, started.

    Raises:
        OSError: ``listen`` cannot be listened on.
        ValueError: a malformed address.
    """
    host = Host(
        listen,
        token=token,
        name=name,
        concurrency=concurrency,
        gate=make_gate(concurrency),
        max_message_size=max_message_size,
        instance=instance,
    )
    host.start()
    return host
