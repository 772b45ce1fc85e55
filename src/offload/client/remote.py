"""Remote workers: a connection to an ``offload serve`` server, standing in a slot of an
engine like a local process does (:class:`RemoteSlot`, a
:class:`~offload.client.slot.WorkerSlot`).

What the process running a call prints comes back as ``Output`` messages before the
call's Result, and is passed on as the caller's ``stdout``/``stderr`` options say
(:mod:`offload.client.output`).

The server runs each call in a process of its own, so one call can be killed (``Kill``)
without touching the others: remote slots are *independent* in the scheduler. A lost
connection or a silent heartbeat fails the calls that were running there with
:class:`~offload.ConnectionLost` (retried elsewhere when ``retries`` allows); the slot then
reconnects with back-off, so a server that comes back is used again. A call whose process
crashed on the server comes back as a Result carrying ``WorkerCrashed`` while the slot
lives on; the engine sends it again per ``retries`` too (``Scheduler.call_crashed``).

Nothing the server sends is unpickled before it has proved the token
(:mod:`offload.protocol.auth`).
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from offload import protocol as p
from offload.client.slot import PUMP_WINDOW, ChannelSlot, ExitInfo
from offload.errors import AuthenticationError, NoWorkerAvailable, OffloadError, ProtocolError
from offload.tokens import resolve_token
from offload.transport.channel import Channel
from offload.transport.loop import Timer
from offload.transport.net import TLS, Address, client_handshake, connect, parse_address

# A server sheds connections that stay silent under a flood (offload.server.gate): a
# connection it closed before its challenge is tried again, this many times in all,
# pausing this long (doubling) in between, within start_timeout.
_SHED_ATTEMPTS = 6
_SHED_PAUSE = 0.01

if TYPE_CHECKING:
    import socket

    from offload.client.output import RelayedOutput
    from offload.client.slot import SlotHost
    from offload.protocol.auth import Sealer
    from offload.protocol.messages import CallFields

DEFAULT_HEARTBEAT = (5.0, 30.0)


@dataclass(frozen=True)
class RemoteTarget:
    """Where a remote slot connects, and how."""

    address: Address
    token: bytes
    tls: TLS | None = None
    heartbeat: tuple[float, float] = DEFAULT_HEARTBEAT

    @classmethod
    def parse(
        cls,
        address: str,
        token: bytes | str | None,
        tls: TLS | None,
        heartbeat: tuple[float, float] | None,
    ) -> RemoteTarget:
        return cls(
            parse_address(address), resolve_token(token), tls, heartbeat or DEFAULT_HEARTBEAT
        )

    def __repr__(self) -> str:  # never show the token
        return f"RemoteTarget({self.address}, tls={self.tls is not None})"


class RemoteSlot(ChannelSlot):
    """One connection to a worker server, in an engine slot (a
    :class:`~offload.client.slot.WorkerSlot`): the server's pool runs the calls, each in
    a process of its own, so they die one by one (``kill_call``), not with the slot."""

    def __init__(
        self, host: SlotHost, slot: int, gen: int, name: str, target: RemoteTarget
    ) -> None:
        self.host = host
        self.slot = slot
        self.gen = gen
        self.name = name or str(target.address)
        self.target = target
        self.loop = host.loop
        self.channel: Channel | None = None
        self.ready = False
        self.expected_exit = False
        self.kill_reason = ""
        self.server_pid: int | None = None
        self._sent: set[int] = set()
        self._timers: list[Timer] = []
        self._last_seen = 0.0
        self._ping_seq = 0
        self._lost_reason = "disconnected"
        self._lost_detail = ""
        self._finished = False
        self._output: RelayedOutput | None = None  # made at the first Output
        # The name the caller knows this worker by (the server's Hello renames the slot
        # for errors): the ``prefix`` of relayed output, as a local worker's name is.
        self._output_name = self.name

    @property
    def pid(self) -> int | None:
        """The server's pid (its calls run in its child processes)."""
        return self.server_pid

    @property
    def local_pid(self) -> int | None:
        """None: no local process fills this slot."""
        return None

    @property
    def alive(self) -> bool:
        """Whether the connection is up (the handshake done, the channel open)."""
        return self.ready and self.channel is not None and not self.channel.closed

    @property
    def launched(self) -> bool:
        """False: a connection that failed to start reports nothing more (one that
        started reports its close through ``process_exited``)."""
        return False

    def __repr__(self) -> str:
        state = "ready" if self.ready else "closing" if self.expected_exit else "connecting"
        return (
            f"<RemoteSlot {self.target.address} pid={self.server_pid} slot={self.slot} "
            f"{state} sent={len(self._sent)}>"
        )

    # -- connecting ----------------------------------------------------------------------

    def start(self) -> None:
        """Connect on a thread of its own (the loop never waits for the network)."""
        threading.Thread(target=self._connect, name="offload-connect", daemon=True).start()

    def _connect(self) -> None:
        target = self.target
        deadline = time.monotonic() + self.host.options.start_timeout
        pause = _SHED_PAUSE
        for attempt in range(1, _SHED_ATTEMPTS + 1):
            timeout = max(0.001, deadline - time.monotonic())
            try:
                sock = connect(target.address, timeout)
            except OSError as exc:
                self._start_failed(
                    NoWorkerAvailable(f"cannot reach the worker server {target.address}: {exc}")
                )
                return
            try:
                sock, sealer, leftover = authenticate(target, sock, timeout)
                break
            except (ssl.SSLError, ssl.CertificateError) as exc:
                sock.close()
                error: OffloadError = AuthenticationError(
                    f"TLS with {target.address} failed: {exc}"
                )
            except OffloadError as exc:  # refusals included (NoWorkerAvailable)
                sock.close()
                error = exc
            except OSError as exc:
                sock.close()
                error = AuthenticationError(f"the handshake with {target.address} failed: {exc}")
            # A server under a flood of idle connections sheds the silent ones: a client
            # whose hello was not read yet can be among them. Try again, a few times.
            shed = isinstance(error, AuthenticationError) and error.shed
            if (
                not shed
                or attempt == _SHED_ATTEMPTS
                or self.expected_exit
                or time.monotonic() + pause >= deadline
            ):
                if shed and attempt > 1:
                    error.args = (f"{error.message} ({attempt} attempts)",)
                self._start_failed(error)
                return
            time.sleep(pause)
            pause *= 2
        sock.settimeout(None)
        conn = p.Connection(
            "client",
            name=self.host.label,
            pid=os.getpid(),
            max_message_size=self.host.options.max_message_size,
        )
        conn.sealer = sealer
        self.channel = Channel(sock, conn, self.loop, threaded=target.tls is not None)
        self.channel.on_messages = self._on_messages
        self.channel.on_close = self._on_close
        try:
            self.channel.start(initial=leftover)
        except (OSError, ValueError):
            # Aborted on the loop thread meanwhile (the slot was stopped or killed while
            # connecting, or the ssh under it ended): its close was reported already.
            if not self.channel.closed:
                raise

    def _start_failed(self, error: OffloadError) -> None:
        self.expected_exit = True
        self._finished = True
        self.loop.call_soon(self._report_start_failure, error)

    # What a connection that ends tells the engine; a slot kind that runs more than a
    # connection (a worker server started over ssh) overrides them to end the rest first.

    def _report_start_failure(self, error: BaseException) -> None:
        self.host.start_failed(self, error)

    def _report_exit(self, info: ExitInfo) -> None:
        self.host.process_exited(self, info)

    # -- messages ------------------------------------------------------------------------

    def _on_messages(self, msgs: list[p.Message]) -> None:
        self._last_seen = self.loop.clock()
        results: list[p.Result] = []
        for msg in msgs:
            match msg:
                case p.Result():
                    self._sent.discard(msg.call_id)
                    results.append(msg)
                    if self._output is not None:
                        self._output.call_ended(msg.call_id)
                case p.Output():
                    self._relay_output(msg)
                case p.Progress():
                    self.host.on_progress(msg)
                case p.ChannelData() | p.ChannelCredit() | p.ChannelClose():
                    self.host.on_channel(msg)
                case p.Hello():
                    self._handshake_done(msg)
                case p.Pong() | p.Status():
                    pass
                case p.Failure(message=message):
                    self._lost_detail = f"closed the connection: {message}"
                case p.Goodbye():
                    self._lost_detail = "shut down"
                case _:
                    self._lost_detail = f"broke the protocol (sent {type(msg).__name__})"
                    if self.channel is not None:
                        self.channel.abort()
        if results:
            self.host.on_results(self, results)

    def _relay_output(self, msg: p.Output) -> None:
        """Pass on what a call printed on the server, as our options say."""
        output = self._output
        if output is None:
            from offload.client.output import RelayedOutput

            output = self._output = RelayedOutput(*self.output_modes())
        output.write(msg, self._output_name)

    def output_modes(self) -> tuple[str, str]:
        """The (stdout, stderr) modes the output of this slot's calls is passed on
        with: the caller's options."""
        opts = self.host.options
        return opts.stdout, opts.stderr

    def _handshake_done(self, hello: p.Hello) -> None:
        self.server_pid = hello.pid
        if hello.name:
            self.name = hello.name
        self.ready = True
        interval, _ = self.target.heartbeat
        self._last_seen = self.loop.clock()
        self._timers.append(self.loop.call_later(interval, self._heartbeat))
        self.host.worker_ready(self, max(1, hello.slots))

    def _heartbeat(self) -> None:
        if self._finished or self.channel is None:
            return
        interval, timeout = self.target.heartbeat
        if self.loop.clock() - self._last_seen > timeout:
            self._lost_reason = "unresponsive"
            self._lost_detail = f"did not answer heartbeats for {timeout:g} s"
            self.channel.abort()
            return
        self._ping_seq += 1
        self.channel.send(p.Ping(seq=self._ping_seq))
        self._timers.append(self.loop.call_later(interval, self._heartbeat))

    def _on_close(self, error: BaseException | None) -> None:
        if self._output is not None:
            self._output.close()
        if self._finished:
            return
        self._finished = True
        for timer in self._timers:
            timer.cancel()
        if not self.ready:
            if isinstance(error, OffloadError):
                self._report_start_failure(error)
            else:
                self._report_start_failure(
                    NoWorkerAvailable(
                        f"the worker server {self.target.address} closed the connection "
                        "during the handshake"
                    ),
                )
            return
        if error is not None and not self._lost_detail:
            self._lost_detail = f"broke the protocol ({error})"
        info = ExitInfo(
            name=self.name,
            pid=self.server_pid,
            exitcode=None,
            signal=None,
            reason=self._lost_reason,
            stderr_tail="",
            detail=self._lost_detail,
            remote=True,
        )
        self._report_exit(info)

    # -- calls ---------------------------------------------------------------------------

    def send_calls(self, calls: list[CallFields]) -> None:
        """Queue calls (their fields, in wire order) for the server; :meth:`flush`
        writes them."""
        if self.channel is not None:
            self._sent.update(fields[0] for fields in calls)
            self.channel.enqueue_calls(calls)

    def pump(self, future: Any) -> None:
        """Read the server's answers on the waiting thread for a moment."""
        channel = self.channel
        if channel is not None and not channel.threaded:
            channel.pump(future.done, PUMP_WINDOW)

    def kill_call(self, call_id: int) -> None:
        """Ask the server to kill the process running ``call_id``."""
        self._sent.discard(call_id)
        if self.channel is not None:
            self.channel.send(p.Kill(call_id=call_id))

    def kill(self, reason: str = "") -> None:
        """Kill every call this connection sent, then close it."""
        self.expected_exit = True
        self.kill_reason = reason
        channel = self.channel
        if channel is None:
            return
        for call_id in list(self._sent):
            channel.send(p.Kill(call_id=call_id))
        channel.send(p.Goodbye(reason=reason or "killed"))
        self.loop.call_soon(channel.abort)

    def stop(self) -> None:
        """Close the connection once its calls are done (they are: the engine asks then)."""
        self.expected_exit = True
        channel = self.channel
        if channel is None:
            return
        channel.send(p.Goodbye(reason="shutdown"))
        self.loop.call_soon(channel.abort)

    def rss(self) -> int:
        """Remote processes are not measured here."""
        return 0


def authenticate(
    target: RemoteTarget, sock: socket.socket, timeout: float
) -> tuple[socket.socket, Sealer | None, bytes]:
    """TLS (when configured) and the token handshake on a connected socket: the socket
    to use from now on, the sealer of later frames (None with TLS) and the bytes read
    past the handshake.

    Raises:
        ssl.SSLError, AuthenticationError, NoWorkerAvailable (refused), VersionMismatch,
        ProtocolError, OSError.
    """
    if target.tls is not None:
        hostname = target.tls.server_hostname or (
            None if target.address.is_unix else target.address.host
        )
        # wrap_socket takes the fd over (the plain socket is detached): from here on,
        # a failure must close the TLS socket, or its fd stays open until collected.
        sock = target.tls.client_context().wrap_socket(sock, server_hostname=hostname)
    try:
        sealer, leftover = client_handshake(
            sock,
            target.token,
            timeout,
            sealed=target.tls is None,
            peer=f"the worker server {target.address}",
        )
    except BaseException:
        sock.close()
        raise
    return sock, sealer, leftover


def query(
    target: RemoteTarget, timeout: float, *, status: bool
) -> tuple[p.Hello, dict[str, Any], float]:
    """Connect, authenticate and ask once: (server Hello, status JSON or {}, round trip s).

    For operators' ``offload ping`` and ``offload status``; no engine, no threads.

    Raises:
        AuthenticationError, NoWorkerAvailable (refused: at its connection limit or
        shutting down), VersionMismatch, ProtocolError, OSError.
    """
    import json
    import time

    sock = connect(target.address, timeout)
    try:
        sock, sealer, leftover = authenticate(target, sock, timeout)
        conn = p.Connection("client", name="offload-cli", pid=os.getpid())
        conn.sealer = sealer
        started = time.perf_counter()
        request: p.Message = p.StatusRequest() if status else p.Ping(seq=1)
        sock.sendall(b"".join(bytes(c) for c in conn.hello() + conn.send(request)))
        if leftover:
            conn.receive_data(leftover)
        hello: p.Hello | None = None
        answer: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while True:
            msg = conn.next_event()
            if msg is p.NEED_DATA:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the server did not answer in time")
                sock.settimeout(remaining)
                data = sock.recv(65536)
                conn.receive_data(data)  # b"" (the server closed) ends the loop
                continue
            if msg is p.CLOSED:
                raise ProtocolError("the server closed the connection")
            if isinstance(msg, p.Hello):
                hello = msg
            elif isinstance(msg, p.Status):
                answer = json.loads(msg.json)
                break
            elif isinstance(msg, p.Pong):
                break
        elapsed = time.perf_counter() - started
        assert hello is not None
        return hello, answer, elapsed
    finally:
        try:
            sock.close()
        except OSError:
            pass
