"""``offload serve``: a worker server that runs authenticated clients' calls.

Theory of operation
-------------------
1. One thread, the :class:`~offload.server.gate.HandshakeGate`, accepts connections
   and drives every handshake at once, non-blocking, in one selector: a slow or silent
   peer costs an entry in a table, never a thread, and never blocks anyone. At most
   ``max_unauthenticated`` connections may be in their handshake at once, and at most
   ``max_unauthenticated_per_source`` from one source; past a limit the connection that
   got least far goes, the oldest first (a flood of silent connections sheds itself and
   cannot lock good clients out). Every handshake has a deadline. Out of file
   descriptors, the gate sheds pending handshakes and rests instead of spinning.
2. The handshake (TLS first when configured, then the token proof of
   :mod:`offload.protocol.auth`) must succeed before the server reads a single protocol
   frame; nothing is ever unpickled in the server process with ``isolation="pool"`` or
   ``"process"``: calls are relayed as bytes to child worker processes, and their results
   relayed back as bytes. A client that proved the token while the server is at
   ``max_connections`` (or stopping) gets a refusal that says so, not a silent close.
3. An authenticated connection becomes a :class:`Session`; its frames are MAC'd with
   session keys when there is no TLS. Calls run in the server's own pool of child
   processes (``pool``), in a fresh process each (``process``), or in the server
   process itself (``inline``, for debugging). A crash there fails that call with
   ``WorkerCrashed`` (sent to the client); the server lives on.
4. ``Kill`` from the client kills the process running that call. A client that vanishes
   has its calls killed after ``disconnect_grace`` seconds.
5. :meth:`Server.stop` drains: it stops accepting, lets running calls finish until the
   deadline, then kills what is left.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any

from offload import protocol as p
from offload.client.engine import Engine, RawSink
from offload.client.options import check_server_args, make_options
from offload.errors import OffloadError, WorkerKilled
from offload.protocol.auth import REFUSED_BUSY, REFUSED_STOPPING, check_token
from offload.serde import dumps
from offload.server.gate import HandshakeGate
from offload.transport.channel import Channel
from offload.transport.loop import get_loop
from offload.transport.net import (
    TLS,
    Address,
    bound_address,
    listen,
    parse_address,
)

log = logging.getLogger("offload")
ISOLATIONS = ("pool", "process", "inline")
BUSY_POLL = 0.0002  # seconds (see Server.busy_poll_budget)


class Server:
    """A worker server.

    Args:
        listen: ``host:port``, ``[v6]:port`` or ``unix:PATH``.
        token: the shared secret (at least 32 bytes). Required; ``offload serve`` makes
            one for loopback addresses when none is given.
        tls: TLS settings (certificate, key, and a CA to require client certificates).
        workers: calls run at once (worker processes for ``pool``).
        preload: modules the workers import at start.
        isolation: ``"pool"``, ``"process"`` or ``"inline"``.
        max_connections: authenticated clients at once; past it a client that proved
            the token is refused with a message that says so.
        max_unauthenticated: connections in their handshake at once.
        max_unauthenticated_per_source: of those, from one source (an IPv4 address, an
            IPv6 /64, or every peer of a Unix socket).
        handshake_timeout: seconds a connection has to authenticate.
        disconnect_grace: seconds before a vanished client's calls are killed.
        busy_poll: seconds the I/O loop keeps polling after traffic before it sleeps,
            while a worker is idle (0 turns it off); see :meth:`busy_poll_budget`.
        worker_options: further worker options for the child processes.

    Raises:
        TypeError: a setting of the wrong type (e.g. ``workers="2"``, ``token="..."``).
        ValueError: a setting with a bad value (e.g. ``workers=0``, ``busy_poll=nan``,
            a malformed ``listen`` address, no token); every setting and worker option
            is checked before anything starts.
        AuthenticationError: a token shorter than 32 bytes.
    """

    def __init__(
        self,
        listen: str = "127.0.0.1:1111",
        *,
        token: bytes,
        tls: TLS | None = None,
        workers: int | None = None,
        preload: tuple[str, ...] = (),
        isolation: str = "pool",
        max_connections: int = 64,
        max_unauthenticated: int = 128,
        max_unauthenticated_per_source: int = 32,
        handshake_timeout: float = 10.0,
        disconnect_grace: float = 5.0,
        busy_poll: float = BUSY_POLL,
        worker_options: dict[str, Any] | None = None,
    ) -> None:
        check_server_args(
            listen=listen,
            token=token,
            tls=tls,
            workers=workers,
            preload=preload,
            isolation=isolation,
            max_connections=max_connections,
            max_unauthenticated=max_unauthenticated,
            max_unauthenticated_per_source=max_unauthenticated_per_source,
            handshake_timeout=handshake_timeout,
            disconnect_grace=disconnect_grace,
            busy_poll=busy_poll,
            worker_options=worker_options,
        )
        self.address: Address = parse_address(listen)
        if token is None:
            raise ValueError("a worker server needs a token")
        self.token = check_token(token)
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}")
        self.tls = tls
        self.workers = workers or os.cpu_count() or 1
        self.isolation = isolation
        self.max_connections = max_connections
        self.max_unauthenticated = max_unauthenticated
        self.max_unauthenticated_per_source = max_unauthenticated_per_source
        self.handshake_timeout = handshake_timeout
        self.disconnect_grace = disconnect_grace
        if busy_poll < 0:
            raise ValueError("busy_poll must be >= 0 seconds")
        self.busy_poll = busy_poll
        self.loop = get_loop()
        options = dict(worker_options or {})
        options.setdefault("preload", preload)
        options.setdefault("name", "offload-server-worker")
        self._worker_options = make_options(**options)
        self._ssl = tls.server_context() if tls is not None else None
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._gate: HandshakeGate | None = None
        self._engine: Engine | None = None
        self._inline: _InlineRunner | None = None
        self.started_at = time.time()
        self.calls_served = 0
        self.calls_failed = 0

    def __repr__(self) -> str:
        state = "stopping" if self._stopping.is_set() else "serving"
        return (
            f"<Server {self.address} {state} isolation={self.isolation} slots={self.workers} "
            f"connections={len(self._sessions)} pending={self.pending} "
            f"served={self.calls_served}>"
        )

    @property
    def pending(self) -> int:
        """Connections in their handshake now."""
        gate = self._gate
        return gate.pending if gate is not None else 0

    # -- life ----------------------------------------------------------------------------

    def start(self) -> Address:
        """Bind, start the workers and the accept thread; return the bound address."""
        self._listener = listen(self.address)
        self.address = bound_address(self._listener, self.address)
        if self.isolation == "inline":
            self._inline = _InlineRunner(self.workers)
        else:
            options = self._worker_options
            if self.isolation == "process":
                from dataclasses import replace

                options = replace(options, max_tasks=1)
            names = [f"{options.name}-{i + 1}" for i in range(self.workers)]
            self._engine = Engine(
                options, self.workers, keep_warm=True, label="offload-server", names=names
            )
            self._engine.start()
        if self.busy_poll > 0 and self._engine is not None and self._ssl is None:
            self.loop.busy_poll = self.busy_poll_budget
        self._gate = HandshakeGate(
            self._listener,
            self.token,
            ssl_context=self._ssl,
            handshake_timeout=self.handshake_timeout,
            max_pending=self.max_unauthenticated,
            max_pending_per_source=self.max_unauthenticated_per_source,
            admit=self._admit,
            on_authenticated=self._start_session,
        )
        self._gate.start()
        log.info("offload: serving on %s (isolation=%s)", self.address, self.isolation)
        return self.address

    def serve_forever(self) -> None:
        """Block until :meth:`stop` finished."""
        self._stopped.wait()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop accepting, let running calls finish for up to ``timeout`` seconds, then
        kill what is left and close every connection.

        Returns:
            True if every call finished by itself, False if some had to be killed.
        """
        self._stopping.set()
        if self.loop.busy_poll == self.busy_poll_budget:
            self.loop.busy_poll = None
        if self._listener is not None:
            if self.address.is_unix:
                try:
                    os.unlink(self.address.host)
                except OSError:
                    pass
            if self._gate is None:
                self._listener.close()
        if self._gate is not None:
            # The gate closes the listener and every pending handshake on its own
            # thread, which owns them. Bounded: a drain must never hang on it.
            self._gate.stop(5.0)
        clean = True
        deadline = time.monotonic() + timeout
        for session in list(self._sessions):
            clean &= session.wait_idle(max(0.0, deadline - time.monotonic()))
        if self._engine is not None:
            self._engine.shutdown(
                wait=True,
                cancel_futures=True,
                timeout=0 if not clean else max(0.0, deadline - time.monotonic()),
            )
        if self._inline is not None:
            # Threads cannot be killed: after the deadline, stop waiting for them, and
            # tell the clients their calls die with the process.
            self._inline.shutdown(wait=clean)
            if not clean:
                for session in list(self._sessions):
                    session.abandon(
                        "the server reached its drain deadline while the call still ran "
                        "on one of its threads (isolation=inline)"
                    )
        for session in list(self._sessions):
            session.close()
        self._stopped.set()
        return clean

    # -- accepting -----------------------------------------------------------------------

    def _admit(self) -> tuple[int, int] | None:
        """The gate asks, for a client that proved the token: None to take it, else why
        not (a refusal the client turns into a clear error)."""
        if self._stopping.is_set():
            return REFUSED_STOPPING, 0
        if len(self._sessions) >= self.max_connections:
            log.warning(
                "offload: refusing a client: max_connections (%d) reached", self.max_connections
            )
            return REFUSED_BUSY, self.max_connections
        return None

    def _start_session(self, conn: socket.socket, sealer: Any, leftover: bytes) -> None:
        """Take over a connection the gate authenticated (and :meth:`_admit` took)."""
        with self._lock:
            session = Session(self, conn, sealer, leftover)
            self._sessions.add(session)
        session.start()

    def _forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    # -- calls ---------------------------------------------------------------------------

    @staticmethod
    def new_call_id() -> int:
        """A server-wide id for a relayed call (clients' own ids may collide)."""
        return Engine.new_call_id()

    def run(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        """Run a relayed call on this server's workers; its outcome goes to ``sink``.

        Raises:
            RuntimeError: the server is shutting down.
        """
        if self._inline is not None:
            self._inline.submit(call_id, call, sink)
            return
        assert self._engine is not None
        self._engine.submit_raw(call_id, call, sink)

    def kill(self, call_id: int) -> None:
        """Kill a relayed call (its process, with its process group); dropped if queued."""
        if self._engine is not None:
            self._engine.kill_call(call_id)
        elif self._inline is not None:
            self._inline.kill(call_id)

    def cancel(self, call_id: int) -> bool:
        """Drop a relayed call that has not started; False if it has."""
        if self._engine is not None:
            return self._engine.cancel(call_id)
        return self._inline is not None and self._inline.cancel(call_id)

    @property
    def inline_running(self) -> int:
        """Calls running on the server's own threads (``isolation="inline"``)."""
        return self._inline.busy if self._inline is not None else 0

    def busy_poll_budget(self) -> float:
        """How long the I/O loop polls before it sleeps (its
        :attr:`~offload.transport.loop.Loop.busy_poll` hook).

        A relayed call wakes this process twice (the call, then its result), and a
        client's next call comes soon after a result. Polling instead of sleeping for a
        moment after traffic saves those wake-ups, on a CPU that is idle anyway: only
        while a worker is idle (a busy worker needs its CPU), never while handshakes are
        under way (the gate's thread would wait for the interpreter lock), and never with TLS (each
        TLS connection is read on a thread of its own) or ``inline`` isolation.
        """
        engine = self._engine
        if engine is None or self.pending or engine.in_flight >= self.workers:
            return 0.0
        return self.busy_poll

    def status(self) -> dict[str, Any]:
        """The JSON-able state reported by ``offload status``."""
        busy = queued = 0
        if self._engine is not None:
            with self._engine.lock:
                counts = self._engine.scheduler.counts()
            busy, queued = counts.running, counts.queued
        elif self._inline is not None:
            busy = self._inline.busy
        offload_version, protocol_version, python_version = p.versions()
        return {
            "offload": offload_version,
            "protocol": protocol_version,
            "python": python_version,
            "pid": os.getpid(),
            "address": str(self.address),
            "isolation": self.isolation,
            "slots": self.workers,
            "busy": busy,
            "queued": queued,
            "calls_served": self.calls_served,
            "calls_failed": self.calls_failed,
            "connections": len(self._sessions),
            "uptime": round(time.time() - self.started_at, 3),
        }


class Session:
    """One authenticated client connection.

    Its calls go to the server's workers under server-wide ids (clients pick their own,
    which may collide); :attr:`calls` maps the client's ids to those, and the outcome
    of each comes back through :meth:`call_done` (the engine's
    :class:`~offload.client.engine.RawSink`), usually on the I/O loop thread.
    """

    def __init__(self, server: Server, sock: socket.socket, sealer: Any, leftover: bytes) -> None:
        self.server = server
        conn = p.Connection(
            "server",
            name=f"offload-server@{server.address}",
            pid=os.getpid(),
            slots=server.workers,
            max_message_size=server._worker_options.max_message_size,
        )
        conn.sealer = sealer
        self.channel = Channel(sock, conn, server.loop, threaded=isinstance(sock, ssl.SSLSocket))
        self.channel.on_messages = self._on_messages
        self.channel.on_close = self._on_close
        self._leftover = leftover
        # client's call id -> server-wide id, and back. Each entry is added by the
        # session's reader before the call is submitted and removed by call_done; a
        # dict operation is atomic, so only drain waiters need the lock.
        self.calls: dict[int, int] = {}
        self._client_ids: dict[int, int] = {}
        self._idle = threading.Condition()  # drain waiters (see wait_idle)
        self._draining = False
        self.closed = False

    def start(self) -> None:
        self.channel.start(initial=self._leftover)

    def __repr__(self) -> str:
        return f"<Session {self.channel!r} calls={len(self.calls)}>"

    def _on_messages(self, msgs: list[p.Message]) -> None:
        for msg in msgs:
            if type(msg) is p.Call:
                self._run(msg)
                continue
            match msg:
                case p.Kill(call_id=call_id):
                    call = self.calls.get(call_id)
                    if call is not None:
                        self.server.kill(call)
                case p.Cancel(call_id=call_id):
                    call = self.calls.get(call_id)
                    if call is not None and self.server.cancel(call):
                        self.call_done(call, concurrent.futures.CancelledError())
                case p.Ping(seq=seq):
                    self.channel.send(p.Pong(seq=seq))
                case p.StatusRequest():
                    self.channel.send(p.Status(json=json.dumps(self.server.status())))
                case p.Goodbye():
                    self.close()
                case p.Hello() | p.Pong():
                    pass
                case _:
                    self.channel.send(p.Failure(message=f"unexpected {type(msg).__name__}"))
                    self.close()

    def _run(self, call: p.Call) -> None:
        server = self.server
        call_id = server.new_call_id()
        client_id = call.call_id
        self.calls[client_id] = call_id
        self._client_ids[call_id] = client_id
        try:
            server.run(call_id, call, self)
        except RuntimeError:  # stopping
            self.call_done(call_id, OffloadError("the server is shutting down"))

    def call_progress(self, msg: p.Progress) -> None:
        """Relay a progress report of one of this session's calls."""
        client_id = self._client_ids.get(msg.call_id)
        if client_id is not None:
            self.channel.send(
                p.Progress(call_id=client_id, payload=msg.payload, buffers=msg.buffers)
            )

    def flush(self) -> None:
        """Write the outcomes queued with ``call_done(..., flush=False)``."""
        self.channel.flush()

    def call_done(
        self, call_id: int, outcome: p.Result | BaseException, *, flush: bool = True
    ) -> None:
        """Relay the outcome of one of this session's calls to the client (queued
        until :meth:`flush` with ``flush=False``)."""
        client_id = self._client_ids.pop(call_id, None)
        if client_id is None:
            return  # reported already (a kill racing the result)
        if self.calls.get(client_id) == call_id:
            self.calls.pop(client_id, None)
        if self._draining:
            with self._idle:
                self._idle.notify_all()
        server = self.server
        if isinstance(outcome, p.Result):
            server.calls_served += 1
            self.channel.enqueue((p.with_call_id(outcome, client_id),))
            if flush:
                self.channel.flush()
            return
        if isinstance(outcome, concurrent.futures.CancelledError):
            outcome = WorkerKilled("the call was cancelled on the server")
        server.calls_failed += 1
        try:
            data, buffers = dumps(outcome)
        except Exception:  # noqa: BLE001 - offload's own errors always pickle
            data, buffers = dumps(OffloadError(str(outcome)))
        self.channel.send(
            p.Result(
                call_id=client_id,
                status=p.FAILED,
                type_name=type(outcome).__name__,
                message=str(outcome),
                payload=data,
                buffers=tuple(buffers),
            )
        )

    def _on_close(self, error: BaseException | None) -> None:
        if error is not None:
            log.info("offload: a client broke the protocol: %s", error)
        self.closed = True
        if self.calls:
            # The client may come back; its calls die only if it stays away.
            self.server.loop.call_later(self.server.disconnect_grace, self._kill_orphans)
        else:
            self.server._forget(self)

    def _kill_orphans(self) -> None:
        for call_id in list(self.calls.values()):
            self.server.kill(call_id)
        self.server._forget(self)

    def wait_idle(self, timeout: float) -> bool:
        """Wait for this session's calls to finish; False if some still run."""
        deadline = time.monotonic() + timeout
        self._draining = True
        with self._idle:
            while self.calls:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def abandon(self, reason: str) -> None:
        """Fail every call of this session still running, with WorkerKilled."""
        for call_id in list(self._client_ids):
            self.call_done(call_id, WorkerKilled(reason))

    def close(self) -> None:
        """Close the connection (its calls follow the disconnect rule)."""
        if not self.channel.closed:
            self.server.loop.call_soon(self.channel.abort)


class _InlineRunner:
    """``isolation="inline"``: calls run on threads of the server process itself."""

    def __init__(self, workers: int) -> None:
        from offload.worker.runtime import Runtime

        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="offload-inline"
        )
        self._runtime = Runtime({"fd": -1, "name": "inline", "concurrency": workers})
        self._queued: dict[int, tuple[concurrent.futures.Future[None], RawSink]] = {}
        self.busy = 0

    def submit(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        def run() -> None:
            self._queued.pop(call_id, None)
            self.busy += 1
            try:
                result = self._runtime.timed_run(call)
            finally:
                self.busy -= 1
            sink.call_done(call_id, result)

        fut = self._pool.submit(run)
        self._queued[call_id] = (fut, sink)
        if fut.running() or fut.done():  # it started before it was filed
            self._queued.pop(call_id, None)

    def cancel(self, call_id: int) -> bool:
        """Drop a call that has not started; False if it has."""
        queued = self._queued.pop(call_id, None)
        return queued is not None and queued[0].cancel()

    def kill(self, call_id: int) -> None:
        """Drop a call that has not started, which then fails with WorkerKilled (a
        thread cannot be killed: a running call runs on)."""
        queued = self._queued.get(call_id)
        if queued is not None and self.cancel(call_id):
            queued[1].call_done(call_id, WorkerKilled("the call was killed before it started"))

    def shutdown(self, wait: bool) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)


def server_token(address: Address, token_file: str | None) -> bytes:
    """The token a server uses: ``token_file``, else ``OFFLOAD_TOKEN``; on a loopback
    address with neither, a new random token written to a fresh 0600 file (in a fresh
    0700 directory) whose path is printed on stderr. That directory is removed when the
    process exits (:func:`remove_generated_tokens`; :func:`serve_until_signalled` and an
    ``atexit`` hook call it).

    Tokens are read by the one rule of :func:`offload.protocol.auth.check_token`, the
    client's too: a text token without its surrounding white space (the file's final
    newline), a binary one byte for byte.

    Raises:
        ValueError: a non-loopback address and no token (the token is a shell on this
            machine; listening without one would hand that out to the network).
        AuthenticationError: a token shorter than 32 bytes, or a token file that others
            may read or write.
    """
    from offload.client.remote import TOKEN_ENV, read_token_file

    if token_file:
        return read_token_file(token_file)
    if os.environ.get(TOKEN_ENV):
        return check_token(os.environ[TOKEN_ENV])
    if not address.is_loopback():
        raise ValueError(
            f"refusing to listen on {address} without a token: pass --token-file FILE or "
            "set OFFLOAD_TOKEN (whoever holds the token can run any code on this machine)"
        )
    import atexit
    import sys
    import tempfile

    token = os.urandom(32).hex().encode()
    directory = tempfile.mkdtemp(prefix="offload-")  # mode 0700
    if not _generated_token_dirs:
        atexit.register(remove_generated_tokens)
    _generated_token_dirs.append(directory)
    path = os.path.join(directory, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    print(
        f"offload: no token given; wrote a new one to {path} (removed when this server exits)",
        file=sys.stderr,
        flush=True,
    )
    return token


# Directories of the tokens server_token() made, removed at exit: a token left behind
# in /tmp would open a later server on the same port to whoever can still read it.
_generated_token_dirs: list[str] = []


def remove_generated_tokens() -> None:
    """Remove the token files (and their directories) that :func:`server_token` made in
    this process. Idempotent."""
    import shutil

    while _generated_token_dirs:
        shutil.rmtree(_generated_token_dirs.pop(), ignore_errors=True)


def serve_until_signalled(server: Server, drain_timeout: float) -> int:
    """Start ``server``, serve until SIGTERM or SIGINT, drain; return the exit status
    (0: every call finished; 3: calls were killed at the drain deadline; 1: could not
    start). Removes the token :func:`server_token` generated before it returns."""
    try:
        return _serve_until_signalled(server, drain_timeout)
    finally:
        remove_generated_tokens()


def _serve_until_signalled(server: Server, drain_timeout: float) -> int:
    import select
    import signal
    import sys

    try:
        bound = server.start()
    except OSError as exc:
        print(f"offload serve: cannot listen on {server.address}: {exc}", file=sys.stderr)
        return 1
    print(f"offload: serving on {bound} (pid {os.getpid()})", flush=True)
    # The handler only sets a flag: it runs on the main thread between two bytecodes,
    # wherever that thread is, so it must take no lock (Event.set from a handler that
    # interrupts Event.wait on the same thread deadlocks). The wakeup fd ends the wait
    # at once: Python writes to it when any signal arrives.
    signalled: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        signalled.append(signum)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous = signal.set_wakeup_fd(wake_w)
    try:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        while not signalled:
            select.select([wake_r], [], [], 1.0)
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(previous)
        os.close(wake_r)
        os.close(wake_w)
    print(f"offload: draining (up to {drain_timeout:g} s): {server!r}", file=sys.stderr, flush=True)
    clean = server.stop(drain_timeout)
    outcome = "drained" if clean else "killed the calls still running at the deadline"
    print(f"offload: {outcome}; exiting", file=sys.stderr, flush=True)
    if not clean and server.inline_running:
        # Inline calls run on threads of this process, which the interpreter would wait
        # for at exit: ending the process is the only way to kill them (and os._exit
        # runs no atexit hook: the generated token goes now).
        remove_generated_tokens()
        sys.stdout.flush()
        os._exit(3)
    return 0 if clean else 3
