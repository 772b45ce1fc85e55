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
   ``max_connections`` (or stopping) gets a refusal that says so, not a silent close
   (:meth:`Server._admit`).
3. An authenticated connection becomes a :class:`~offload.server.session.Session`
   (``session.py``); its frames are MAC'd with session keys when there is no TLS. Calls
   run in the server's own pool of child processes (``pool``, an
   :class:`~offload.client.engine.Engine`), in a fresh process each (``process``), or
   in the server process itself (``inline``, for debugging: ``inline.py``). A crash
   there fails that call with ``WorkerCrashed`` (sent to the client); the server lives
   on. What a call's process prints goes to that call's client (``relay.py``); what the
   workers print outside any call goes to the server's own stdout and stderr.
4. ``Kill`` from the client kills the process running that call. A client that vanishes
   has its calls killed after ``disconnect_grace`` seconds.
5. :meth:`Server.stop` drains: it stops accepting, lets running calls finish until the
   deadline, then kills what is left. The process around it (signals, exit status) is
   ``main.py``.

The server owns the listener (through the gate), the registry of sessions, admission
and the drain; each session owns its client's calls.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from offload import protocol as p
from offload._record import replace
from offload.client.engine import Engine
from offload.client.options import check_server_args, make_options
from offload.protocol.auth import REFUSED_BUSY, REFUSED_STOPPING, check_token
from offload.server.gate import HandshakeGate
from offload.server.inline import InlineRunner
from offload.server.relay import RelayingSlot
from offload.server.session import Runner, Session, Tally
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
        self._lock = threading.Lock()  # guards _sessions
        self._sessions: set[Session] = set()
        self._stopping = threading.Event()
        self._stopped = False  # stop() finished
        self._gate: HandshakeGate | None = None
        # What runs the calls: an engine of child workers, or (inline) the runner.
        self._engine: Engine | None = None
        self._inline: InlineRunner | None = None
        self._runner: Runner | None = None
        self._tally = Tally()
        self.started_at = time.time()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "draining" if self._stopping.is_set() else "serving"
        busy, queued = self._load()
        return (
            f"<Server {self.address} {state} isolation={self.isolation} slots={self.workers} "
            f"sessions={len(self._sessions)} busy={busy} queued={queued} "
            f"pending={self.pending} served={self.calls_served} failed={self.calls_failed}>"
        )

    @property
    def pending(self) -> int:
        """Connections in their handshake now."""
        gate = self._gate
        return gate.pending if gate is not None else 0

    @property
    def calls_served(self) -> int:
        """Calls answered with a worker's Result (a value or the call's own error)."""
        return self._tally.served

    @property
    def calls_failed(self) -> int:
        """Calls failed by the server (killed, cancelled, worker crashed, stopping)."""
        return self._tally.failed

    # -- life ----------------------------------------------------------------------------

    def start(self) -> Address:
        """Bind, start the workers and the accept thread; return the bound address.

        Raises:
            OSError: the address cannot be listened on.
        """
        self._listener = listen(self.address)
        self.address = bound_address(self._listener, self.address)
        if self.isolation == "inline":
            self._inline = self._runner = self._inline_runner()
        else:
            options = self._worker_options
            if self.isolation == "process":
                options = replace(options, max_tasks=1)
            names = [f"{options.name}-{i + 1}" for i in range(self.workers)]
            self._engine = self._runner = Engine(
                options,
                self.workers,
                keep_warm=True,
                label="offload-server",
                names=names,
                slot_factory=RelayingSlot,
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

    def _inline_runner(self) -> InlineRunner:
        """What runs the calls with ``isolation="inline"`` (a host of calls in its own
        process, :mod:`offload.server.host`, runs them its way)."""
        return InlineRunner(self.workers, max_message_size=self._worker_options.max_message_size)

    def hello_name(self) -> str:
        """The name this server gives itself in its Hello (clients name it so in errors)."""
        return f"offload-server@{self.address}"

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
        for session in self._registered():
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
                for session in self._registered():
                    session.abandon(
                        "the server reached its drain deadline while the call still ran "
                        "on one of its threads (isolation=inline)"
                    )
        for session in self._registered():
            session.close()
        self._stopped = True
        return clean

    # -- sessions ------------------------------------------------------------------------

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
        assert self._runner is not None  # the gate starts after the runner
        session = Session(
            conn,
            sealer,
            leftover,
            runner=self._runner,
            loop=self.loop,
            tally=self._tally,
            name=self.hello_name(),
            slots=self.workers,
            max_message_size=self._worker_options.max_message_size,
            disconnect_grace=self.disconnect_grace,
            status=self.status,
            on_gone=self._forget,
        )
        with self._lock:
            self._sessions.add(session)
        session.start()

    def _forget(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def _registered(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    # -- state ---------------------------------------------------------------------------

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

    def _load(self) -> tuple[int, int]:
        """(calls running, calls waiting) on this server's workers or threads."""
        if self._engine is not None:
            with self._engine.lock:
                counts = self._engine.scheduler.counts()
            return counts.running, counts.queued
        if self._inline is not None:
            return self._inline.busy, 0
        return 0, 0

    def status(self) -> dict[str, Any]:
        """The JSON-able state reported by ``offload status``."""
        busy, queued = self._load()
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
