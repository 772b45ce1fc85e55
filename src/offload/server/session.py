"""One authenticated client of the worker server: its calls, relayed and answered.

A :class:`Session` starts once the :class:`~offload.server.gate.HandshakeGate` has
authenticated a connection and the server admitted it. From then on:

1. It reads the client's frames (sealed with the session keys when there is no TLS) on
   the I/O loop's thread, or on a reader thread of its own for TLS.
2. Each ``Call`` is filed under a server-wide id (clients pick their own ids, which may
   collide) and handed, still pickled, to the server's :class:`Runner`: the engine of
   child workers (:meth:`Engine.submit_raw <offload.client.engine.Engine.submit_raw>`)
   or the :class:`~offload.server.inline.InlineRunner`. The session is the call's
   :class:`~offload.client.slot.RawSink`.
3. Outcomes and progress come back through :meth:`Session.call_done` and
   :meth:`Session.call_progress`, relabelled with the client's id and queued on the
   channel's outbox; the engine passes a batch of results with ``flush=False`` and
   flushes once, so a batch is one write to the client. Writes never block: what the
   client does not read stays on the outbox (:attr:`Session.queued_bytes`) and nobody
   waits for it.
   What a call prints comes through :meth:`Session.call_output` (from
   :mod:`offload.server.relay`) and goes to the client as ``Output`` messages, before
   the call's Result. At most :data:`OUTPUT_BACKLOG` bytes of answers may wait for a
   client that does not read: past it, output is dropped (never waited for), and a
   line on the same stream says how much before the call's Result.
4. ``Kill`` and ``Cancel`` go to the runner under the server-wide id; ``Ping`` and
   ``StatusRequest`` are answered at once. Channel messages (``ChannelData``,
   ``ChannelCredit``, ``ChannelClose``) are relayed both ways at once, relabelled like
   results; credits bound them, so none waits here.
5. When the client goes away with calls still running, they are killed only after
   ``disconnect_grace`` seconds; then the session tells the server it is gone.

Nothing here imports the server: a session gets what it needs (the runner, the loop, the
status report, a :class:`Tally` of outcomes) as arguments.
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
from collections.abc import Callable
from typing import Any, Protocol

from offload import protocol as p
from offload.client.engine import Engine
from offload.client.slot import RawSink
from offload.errors import OffloadError, WorkerKilled
from offload.serde import dumps
from offload.transport.channel import Channel
from offload.transport.loop import Loop

log = logging.getLogger("offload")

_new_call_id = Engine.new_call_id  # server-wide ids, shared with the engine's own calls
# Bytes of answers queued for a client past which its calls' output is dropped: a client
# that does not read costs the server this much memory for output, not what a call
# prints in a loop. (Results are never dropped.)
OUTPUT_BACKLOG = 1 << 20


class Runner(Protocol):
    """What runs a server's relayed calls: the engine of its child workers
    (:class:`~offload.client.engine.Engine`) or the
    :class:`~offload.server.inline.InlineRunner`."""

    def submit_raw(self, call_id: int, call: p.Call, sink: RawSink) -> None:
        """Run ``call`` (still pickled) under ``call_id``; its outcome goes to ``sink``.

        Raises:
            RuntimeError: the runner was shut down.
        """

    def cancel(self, call_id: int) -> bool:
        """Drop the call if it has not started; False if it has. The sink is not told."""

    def kill_call(self, call_id: int) -> bool:
        """Kill the call (or drop it if it has not started); it fails with WorkerKilled.
        False if the call is not known (or, inline, runs on and cannot be killed)."""

    def send_channel(self, call_id: int, msgs: list[p.Message]) -> bool:
        """Pass channel messages on to the call (already under its server-wide id);
        False if it is not running (any more)."""


class Tally:
    """Counts of the calls a server answered, kept by all its sessions (outcomes arrive
    on several threads: the loop's, TLS readers', inline runner threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.served = 0
        self.failed = 0

    def add(self, *, ok: bool) -> None:
        """Count one answered call: a Result from a worker (``ok``) or a failure."""
        with self._lock:
            if ok:
                self.served += 1
            else:
                self.failed += 1

    def __repr__(self) -> str:
        return f"<Tally served={self.served} failed={self.failed}>"


class Session:
    """One authenticated client connection.

    Its calls go to the runner under server-wide ids; :attr:`calls` maps the client's ids
    to those, and the outcome of each comes back through :meth:`call_done` (it is the
    :class:`~offload.client.slot.RawSink` of its calls), usually on the I/O loop's thread.

    Args:
        sock: the authenticated connection (TLS-wrapped when TLS is on).
        sealer: seals and checks frames with the session keys (None with TLS).
        leftover: bytes the gate read past the handshake: the first frames.
        runner: where calls run.
        loop: the I/O loop that reads the connection and runs timers.
        tally: the server's counts of answered calls.
        name: this server's name in its Hello.
        slots: calls the server runs at once (told to the client in the Hello).
        max_message_size: the largest frame accepted or sent.
        disconnect_grace: seconds before a vanished client's calls are killed.
        status: the server's status report (answers ``StatusRequest``).
        on_gone: called once the session is closed and none of its calls is left to
            wait for (the server forgets it).
    """

    def __init__(
        self,
        sock: socket.socket,
        sealer: Any,
        leftover: bytes,
        *,
        runner: Runner,
        loop: Loop,
        tally: Tally,
        name: str,
        slots: int,
        max_message_size: int,
        disconnect_grace: float,
        status: Callable[[], dict[str, Any]],
        on_gone: Callable[[Session], None],
    ) -> None:
        self.peer = _peer_of(sock)
        self._runner = runner
        self._loop = loop
        self._tally = tally
        self._disconnect_grace = disconnect_grace
        self._status = status
        self._on_gone = on_gone
        conn = p.Connection(
            "server", name=name, pid=os.getpid(), slots=slots, max_message_size=max_message_size
        )
        conn.sealer = sealer
        self.channel = Channel(sock, conn, loop, threaded=isinstance(sock, ssl.SSLSocket))
        self.channel.on_messages = self._on_messages
        self.channel.on_close = self._on_close
        self._leftover = leftover
        # client's call id -> server-wide id, and back. Each entry is added by the
        # session's reader before the call is submitted and removed by call_done; a
        # dict operation is atomic, so only drain waiters need the lock.
        self.calls: dict[int, int] = {}
        self._client_ids: dict[int, int] = {}
        # (server-wide call id, stream) -> bytes of output dropped (client not reading).
        self._dropped: dict[tuple[int, int], int] = {}
        self._idle = threading.Condition()  # drain waiters (see wait_idle)
        self._draining = False
        self.closed = False

    def start(self) -> None:
        """Send the server's Hello and start reading the client's frames."""
        self.channel.start(initial=self._leftover)

    def __repr__(self) -> str:
        state = " closed" if self.closed else " draining" if self._draining else ""
        return (
            f"<Session {self.peer}{state} calls={len(self.calls)} "
            f"queued={self.queued_bytes}B {self.channel!r}>"
        )

    @property
    def queued_bytes(self) -> int:
        """Bytes of answers the client has not read yet (a reading for diagnostics)."""
        return self.channel.pending_output if not self.channel.closed else 0

    # -- from the client -----------------------------------------------------------------

    def _on_messages(self, msgs: list[p.Message]) -> None:
        for msg in msgs:
            if type(msg) is p.Call:
                self.handle_call(msg)
                continue
            match msg:
                case p.Kill(call_id=client_id):
                    call_id = self.calls.get(client_id)
                    if call_id is not None:
                        self._runner.kill_call(call_id)
                case p.Cancel(call_id=client_id):
                    call_id = self.calls.get(client_id)
                    if call_id is not None and self._runner.cancel(call_id):
                        self.call_done(call_id, concurrent.futures.CancelledError())
                case p.ChannelData() | p.ChannelCredit() | p.ChannelClose():
                    # Relayed at once, never held: the client sends no more than the
                    # call's end granted, so nothing piles up here.
                    call_id = self.calls.get(msg.call_id)
                    if call_id is not None:  # else its call ended: late, dropped
                        self._runner.send_channel(call_id, [msg.with_call_id(call_id)])
                case p.Ping(seq=seq):
                    self.channel.send(p.Pong(seq=seq))
                case p.StatusRequest():
                    self.channel.send(p.Status(json=json.dumps(self._status())))
                case p.Goodbye():
                    self.close()
                case p.Hello() | p.Pong():
                    pass
                case _:
                    self.channel.send(p.Failure(message=f"unexpected {type(msg).__name__}"))
                    self.close()

    def handle_call(self, call: p.Call) -> None:
        """File the client's call under a server-wide id and hand it to the runner."""
        call_id = _new_call_id()
        client_id = call.call_id
        self.calls[client_id] = call_id
        self._client_ids[call_id] = client_id
        try:
            self._runner.submit_raw(call_id, call, self)
        except RuntimeError:  # the runner was shut down: the server is stopping
            self.call_done(call_id, OffloadError("the server is shutting down"))

    # -- to the client (the RawSink) -----------------------------------------------------

    def call_progress(self, msg: p.Progress) -> None:
        """Relay a progress report of one of this session's calls."""
        client_id = self._client_ids.get(msg.call_id)
        if client_id is not None:
            self.channel.send(
                p.Progress(call_id=client_id, payload=msg.payload, buffers=msg.buffers)
            )

    def call_output(self, call_id: int, stream: int, data: bytes) -> None:
        """Relay what one of this session's calls wrote to ``stream`` (loop thread).

        Never blocks: past :data:`OUTPUT_BACKLOG` bytes queued for the client, the bytes
        are dropped and counted; the count goes to the client before the call's Result.
        """
        client_id = self._client_ids.get(call_id)
        channel = self.channel
        if client_id is None or channel.closed:  # the client is gone: nobody to tell
            return
        if channel.pending_output > OUTPUT_BACKLOG:
            key = (call_id, stream)
            self._dropped[key] = self._dropped.get(key, 0) + len(data)
            return
        if self._dropped:
            self._note_dropped(call_id, client_id)
        channel.send(p.Output(call_id=client_id, stream=stream, data=data))

    def _note_dropped(self, call_id: int, client_id: int) -> None:
        """Tell the client how much of a call's output was dropped (queued only)."""
        for stream in (p.STDOUT, p.STDERR):
            dropped = self._dropped.pop((call_id, stream), 0)
            if dropped:
                note = (
                    f"\n[offload: {dropped} bytes of this call's output were dropped: the "
                    f"client did not read them in time]\n"
                )
                self.channel.enqueue(
                    (p.Output(call_id=client_id, stream=stream, data=note.encode()),)
                )

    def call_channel(self, msg: p.Message) -> None:
        """Relay a channel message of one of this session's calls to the client."""
        client_id = self._client_ids.get(msg.call_id)  # type: ignore[attr-defined]
        if client_id is not None:
            self.channel.send(msg.with_call_id(client_id))  # type: ignore[attr-defined]

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
        if self._dropped:
            self._note_dropped(call_id, client_id)
        if isinstance(outcome, p.Result):
            self._tally.add(ok=True)
            self.channel.enqueue((p.with_call_id(outcome, client_id),))
            if flush:
                self.channel.flush()
            return
        if isinstance(outcome, concurrent.futures.CancelledError):
            outcome = WorkerKilled("the call was cancelled on the server")
        self._tally.add(ok=False)
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

    # -- the end -------------------------------------------------------------------------

    def _on_close(self, error: BaseException | None) -> None:
        if error is not None:
            log.info("offload: a client broke the protocol: %s", error)
        self.closed = True
        if self.calls:
            # The client may come back; its calls die only if it stays away.
            self._loop.call_later(self._disconnect_grace, self._kill_orphans)
        else:
            self._on_gone(self)

    def _kill_orphans(self) -> None:
        for call_id in list(self.calls.values()):
            self._runner.kill_call(call_id)
        self._on_gone(self)

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
            self._loop.call_soon(self.channel.abort)


def _peer_of(sock: socket.socket) -> str:
    """Where a connection comes from, for reprs and logs: ``host:port``, or ``unix``."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix"
