"""The server's front door: accepting connections and running every handshake on one
thread, without blocking on any of them.

Theory of operation
-------------------
One thread (``offload-server-accept``) waits in one selector on the listening socket, a
wake-up socket and every connection that has not proved the token yet. Each of those is
non-blocking and driven by a sans-IO :class:`~offload.protocol.auth.ServerHandshake`
(after a non-blocking TLS handshake, with TLS), so a silent, slow or hostile peer costs
an entry in a table, not a thread, and never holds up anyone else. An idle-connection
flood used to start a thread per connection; the accept loop fell behind, the kernel's
accept queue filled and legitimate clients' connection attempts were dropped (their
retransmissions took 5 to 28 s).

Limits, all enforced here, in the only thread that touches these sockets (so a
connection is closed by the thread that owns it, and its fd number cannot be reused
under anyone):

* every handshake has a deadline (``handshake_timeout`` from the accept);
* at most ``max_pending`` connections in their handshake, and at most
  ``max_pending_per_source`` from one source (an IPv4 address, an IPv6 /64, or all of a
  Unix socket's peers). Past a limit, the connection that got least far in its handshake
  goes, the oldest first: a silent connection before one that sent a hello, so a flood
  of idle connections sheds itself and a client that is talking gets through;
* out of file descriptors (EMFILE/ENFILE) in ``accept``: the listening socket stays
  readable, so retrying at once would spin. The gate sheds a quarter of the pending
  connections (least progress first), stops watching the listening socket for a
  moment (longer, up to a second, while there is nothing left to shed), and logs it
  once a minute at most.

A handshake that succeeds is handed over (blocking socket, sealer, leftover bytes) to
``on_authenticated``; ``admit`` decides just before whether the server takes the client,
else the client gets a REFUSAL frame that says why (at the connection limit, shutting
down) instead of the server's proof. A wrong proof gets REFUSAL(TOKEN). Nothing is
unpickled here: the handshake is fixed-layout bytes.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable

from offload.errors import AuthenticationError, ProtocolError
from offload.protocol.auth import Sealer, ServerHandshake

log = logging.getLogger("offload")

ACCEPT_BATCH = 256  # accepts per wake-up, so pending handshakes get their turn too
BACKOFF_MIN = 0.05  # seconds the listening socket rests after running out of fds
BACKOFF_MAX = 1.0
WARN_INTERVAL = 60.0  # at most one "out of file descriptors" warning per this many s
_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE

#: ``admit()`` answers None to take a client, or (refusal code, detail) to refuse it.
Admit = Callable[[], "tuple[int, int] | None"]
#: ``on_authenticated(sock, sealer, leftover)`` takes over an authenticated connection.
OnAuthenticated = Callable[[socket.socket, "Sealer | None", bytes], None]


class _Marker:
    """Selector data for the gate's own sockets."""


_LISTENER = _Marker()
_WAKER = _Marker()


class _Pending:
    """One connection in its handshake."""

    __slots__ = (
        "closed",
        "conn",
        "deadline",
        "events",
        "got_bytes",
        "handshake",
        "key",
        "out",
        "source",
        "tls",
        "tls_done",
    )

    def __init__(
        self, key: int, conn: socket.socket, *, source: str, deadline: float, tls: bool
    ) -> None:
        self.key = key
        self.conn = conn
        self.source = source
        self.deadline = deadline
        # Made at the first byte: most of a flood never sends one, and a handshake
        # costs a random nonce (a system call).
        self.handshake: ServerHandshake | None = None
        self.out = b""
        self.events = 0  # selector events watched; 0: not registered (yet)
        self.got_bytes = False
        self.tls = tls
        self.tls_done = not tls
        self.closed = False

    @property
    def progress(self) -> int:
        """How far the handshake got (0: not a byte yet): shedding takes the least
        progressed first."""
        if not self.got_bytes:
            return 0
        done = int(self.tls and self.tls_done)
        handshake = self.handshake
        return 1 + done + (handshake.progress if handshake is not None else 0)


def source_of(family: int, address: object) -> str:
    """The source a per-source limit counts a connection under: its IPv4 address, its
    IPv6 /64 (one host commonly holds a whole /64), or ``""`` for a Unix socket."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return ""
    host = str(address[0])
    if family == socket.AF_INET6:
        try:
            ip = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return host
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class HandshakeGate:
    """Accepts connections on ``listener`` and authenticates them on one thread.

    Args:
        listener: a listening socket (the gate makes it non-blocking and closes it when
            it stops).
        token: the shared token.
        ssl_context: a server TLS context, or None for plain TCP/Unix connections.
        handshake_timeout: seconds from the accept for TLS and the token handshake.
        max_pending: connections in their handshake at once.
        max_pending_per_source: of those, from one source (see :func:`source_of`).
        admit: asked once a client proved the token: None to take it, else the refusal
            (code, detail) it gets.
        on_authenticated: takes over an authenticated connection (a blocking socket, the
            sealer for its frames without TLS, the bytes received past the handshake).
    """

    def __init__(
        self,
        listener: socket.socket,
        token: bytes,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
        max_pending: int,
        max_pending_per_source: int,
        admit: Admit,
        on_authenticated: OnAuthenticated,
    ) -> None:
        if max_pending < 1 or max_pending_per_source < 1:
            raise ValueError("the limits on unauthenticated connections must be >= 1")
        self._listener = listener
        self._family = listener.family  # read once: the property costs an enum lookup
        self._tcp = self._family in (socket.AF_INET, socket.AF_INET6)
        self._token = token
        self._ssl = ssl_context
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self._admit = admit
        self._on_authenticated = on_authenticated
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._per_source: collections.Counter[str] = collections.Counter()
        self._keys = itertools.count(1)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listening = False
        self._resume_at: float | None = None
        self._backoff = BACKOFF_MIN
        self._last_warning = -WARN_INTERVAL
        self._exhausted_since_warning = 0
        # Counters, for operators and tests.
        self.accepted = 0
        self.authenticated = 0
        self.refused = 0
        self.evicted = 0
        self.expired = 0
        self.shed = 0
        self.fd_exhaustions = 0

    @property
    def pending(self) -> int:
        """Connections in their handshake now."""
        return len(self._pending)

    def start(self) -> None:
        """Start the gate's thread."""
        self._listener.setblocking(False)
        self._selector.register(self._wake_r, _READ, _WAKER)
        self._watch_listener()
        self._thread = threading.Thread(target=self._run, name="offload-server-accept", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop every pending connection, close the listening socket;
        wait (bounded) for the thread to end."""
        self._stopping = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (a wake-up is pending anyway) or closed (stopped)
            pass

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._turn()
                except Exception:  # a bug must neither stop the gate nor spin it
                    log.exception("offload: the server's accept thread failed; going on")
                    self._pause_listener(BACKOFF_MAX)
        finally:
            self._close_all()

    def _turn(self) -> None:
        """Wait for sockets (or the next deadline), then serve them."""
        events = self._selector.select(self._timeout())
        for key, _ in events:
            data = key.data
            if data is _LISTENER:
                self._accept_batch()
            elif data is _WAKER:
                self._drain_waker()
            elif isinstance(data, _Pending) and not data.closed:
                self._service(data)
            if self._stopping:
                return
        now = time.monotonic()
        self._expire(now)
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
            self._watch_listener()

    def _timeout(self) -> float | None:
        when = None
        if self._pending:
            when = next(iter(self._pending.values())).deadline  # accept order = deadlines
        if self._resume_at is not None:
            when = self._resume_at if when is None else min(when, self._resume_at)
        return None if when is None else max(0.0, when - time.monotonic())

    def _drain_waker(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except OSError:
            pass

    def _close_all(self) -> None:
        for pc in list(self._pending.values()):
            self._drop(pc)
        if self._listening:
            self._selector.unregister(self._listener)
            self._listening = False
        self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- accepting -----------------------------------------------------------------------

    def _watch_listener(self) -> None:
        if not self._listening and not self._stopping:
            self._selector.register(self._listener, _READ, _LISTENER)
            self._listening = True

    def _pause_listener(self, seconds: float) -> None:
        if self._listening:
            self._selector.unregister(self._listener)
            self._listening = False
        self._resume_at = time.monotonic() + seconds

    def _accept_batch(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while queued: next one
            except OSError as exc:
                if self._stopping:
                    return
                if exc.errno in _FD_EXHAUSTED:
                    self._out_of_fds(exc)
                else:
                    log.warning("offload: accept failed: %s", exc)
                    self._pause_listener(BACKOFF_MIN)  # whatever it is, never spin on it
                return
            self._backoff = BACKOFF_MIN
            self.accepted += 1
            self._admit_connection(sock, address)

    def _out_of_fds(self, exc: OSError) -> None:
        """Accept failed for want of file descriptors: shed, rest, log (rarely)."""
        self.fd_exhaustions += 1
        shed = self._shed(max(1, len(self._pending) // 4))
        if shed:
            pause = BACKOFF_MIN
        else:  # nothing of ours to free: wait longer each time, up to BACKOFF_MAX
            pause = self._backoff
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        self._pause_listener(pause)
        now = time.monotonic()
        self._exhausted_since_warning += 1
        if now - self._last_warning >= WARN_INTERVAL:
            log.warning(
                "offload: out of file descriptors accepting connections (%s; %d time(s) "
                "since the last warning): shed %d unauthenticated connection(s), pausing "
                "accept for %g s (raise the open-files limit, ulimit -n, if this is load "
                "and not an attack)",
                exc.strerror or exc,
                self._exhausted_since_warning,
                shed,
                pause,
            )
            self._last_warning = now
            self._exhausted_since_warning = 0

    def _admit_connection(self, sock: socket.socket, address: object) -> None:
        conn = sock
        try:
            sock.setblocking(False)
            source = source_of(self._family, address)
            if self._per_source[source] >= self.max_pending_per_source:
                self._make_room(source)
            if len(self._pending) >= self.max_pending:
                self._make_room(None)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.info("offload: dropped a new connection: %s", exc)
            _close(conn)
            return
        key = next(self._keys)
        pc = _Pending(
            key,
            conn,
            source=source,
            deadline=time.monotonic() + self.handshake_timeout,
            tls=self._ssl is not None,
        )
        self._pending[key] = pc
        self._per_source[source] += 1
        # A client sends its hello right after connecting: it is often here already.
        # Reading now serves it at once, and a peer that already left (much of a
        # flood) goes without ever being registered with the selector.
        self._service(pc)

    def _make_room(self, source: str | None) -> None:
        """Drop pending connections until one more fits: under the limit for
        ``source``, or under the overall limit (``source`` None)."""

        def full() -> bool:
            if source is None:
                return len(self._pending) >= self.max_pending
            return self._per_source[source] >= self.max_pending_per_source

        for _ in range(2 * len(self._pending) + 1):  # bounded: see _drop_one
            if not full() or not self._drop_one(source):
                return

    def _shed(self, count: int) -> int:
        """Drop up to ``count`` pending connections, least progressed and oldest first
        (one that turns out to have closed counts too: it freed its fd). Returns how
        many went."""
        before = len(self._pending)
        goal = max(0, before - count)
        for _ in range(2 * before + 1):  # bounded: see _drop_one
            if len(self._pending) <= goal or not self._drop_one(None):
                break
        shed = before - len(self._pending)
        self.shed += shed
        return shed

    def _drop_one(self, source: str | None) -> bool:
        """One step toward room: drop the connection (of ``source``, or any) that got
        least far, the oldest first. One not heard from yet first gets a turn (its hello
        may be waiting unread behind a burst of accepts), and only goes if it really is
        silent. False when there is no candidate at all.

        Each step closes a connection, or turns one that had not been heard from into
        one that has: so at most twice as many steps as pending connections."""
        victim = _least_progressed(self._pending.values(), source)
        if victim is None:
            return False
        if not victim.got_bytes:
            self._service(victim)
            if victim.closed or victim.got_bytes:
                return True  # it went by itself (or authenticated), or it talks
        self.evicted += 1
        self._drop(victim)
        return True

    def _expire(self, now: float) -> None:
        while self._pending:
            pc = next(iter(self._pending.values()))
            if pc.deadline > now:
                return
            self.expired += 1
            log.info("offload: dropped a connection at its handshake deadline")
            self._drop(pc)

    # -- one connection ------------------------------------------------------------------

    def _service(self, pc: _Pending) -> None:
        try:
            self._step(pc)
        except Exception:  # one odd connection must not stop the gate
            log.exception("offload: a handshake failed unexpectedly")
            self._drop(pc)

    def _step(self, pc: _Pending) -> None:
        """Move the handshake as far as the socket allows now."""
        for _ in range(64):  # bounded: each turn reads, writes or ends
            if pc.closed:
                return
            if not pc.tls_done:
                if not self._tls_handshake(pc):
                    return
                continue
            if pc.out:
                if not self._write(pc):
                    return
                continue
            handshake = pc.handshake
            if handshake is not None and handshake.refused:
                self._drop(pc, answered=True)
                return
            if handshake is not None and handshake.done:
                self._finish(pc)
                return
            if not self._read(pc):
                return
        # Out of turns with more to do (never seen: a handshake is a few frames): be
        # woken again rather than forgotten until the deadline.
        if not pc.closed and not pc.events:
            self._want(pc, _WRITE if pc.out else _READ)

    def _tls_handshake(self, pc: _Pending) -> bool:
        assert isinstance(pc.conn, ssl.SSLSocket)
        if not pc.got_bytes:
            # Has the peer said anything yet? (A TLS "want read" cannot tell: it means
            # "not a whole record yet" as much as "nothing at all".)
            try:
                peeked = socket.socket.recv(pc.conn, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                self._want(pc, _READ)
                return False
            except OSError as exc:
                log.info("offload: rejected a connection (TLS): %s", exc)
                self._drop(pc)
                return False
            if not peeked:
                self._drop(pc)  # closed before a ClientHello
                return False
            pc.got_bytes = True
        try:
            pc.conn.do_handshake()
        except ssl.SSLWantReadError:
            self._want(pc, _READ)
            return False
        except ssl.SSLWantWriteError:
            self._want(pc, _WRITE)
            return False
        except (OSError, ValueError) as exc:
            log.info("offload: rejected a connection (TLS): %s", exc)
            self._drop(pc)
            return False
        pc.tls_done = True
        self._want(pc, _READ)
        return True

    def _read(self, pc: _Pending) -> bool:
        """Read once and feed the handshake; False when there is nothing to read now (or
        the connection is gone)."""
        try:
            data = pc.conn.recv(4096)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            self._want(pc, _READ)
            return False
        except ssl.SSLWantWriteError:
            self._want(pc, _WRITE)
            return False
        except (OSError, ValueError) as exc:
            log.info("offload: rejected a connection: %s", exc)
            self._drop(pc)
            return False
        if not data and pc.handshake is None:
            self._drop(pc)  # gone before a byte: no handshake, no error to make
            return False
        pc.got_bytes = True
        handshake = pc.handshake
        if handshake is None:
            handshake = pc.handshake = ServerHandshake(self._token)
        try:
            handshake.receive_data(data)
        except (AuthenticationError, ProtocolError) as exc:
            log.info("offload: rejected a connection: %s", exc)
            pc.out += handshake.data_to_send()  # the refusal after a wrong proof, if any
            if not (handshake.refused and pc.out):
                self._drop(pc)
                return False
            return True
        if handshake.done:
            verdict = self._admit()
            if verdict is not None:
                code, detail = verdict
                handshake.refuse(code, detail)
                self.refused += 1
        pc.out += handshake.data_to_send()
        return True

    def _write(self, pc: _Pending) -> bool:
        """Write what is due; False while the socket cannot take it (or it failed)."""
        try:
            sent = pc.conn.send(pc.out)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            self._want(pc, _WRITE)
            return False
        except ssl.SSLWantReadError:
            self._want(pc, _READ)
            return False
        except (OSError, ValueError) as exc:
            log.info("offload: a connection failed in its handshake: %s", exc)
            self._drop(pc)
            return False
        pc.out = pc.out[sent:]
        if pc.out:
            self._want(pc, _WRITE)
            return False
        self._want(pc, _READ)
        return True

    def _want(self, pc: _Pending, events: int) -> None:
        if pc.events != events and not pc.closed:
            if pc.events:
                self._selector.modify(pc.conn, events, pc)
            else:
                self._selector.register(pc.conn, events, pc)
            pc.events = events

    def _forget(self, pc: _Pending) -> None:
        pc.closed = True
        if pc.events:
            pc.events = 0
            try:
                self._selector.unregister(pc.conn)
            except (KeyError, ValueError):
                pass
        if self._pending.pop(pc.key, None) is not None:
            self._per_source[pc.source] -= 1
            if self._per_source[pc.source] <= 0:
                del self._per_source[pc.source]

    def _drop(self, pc: _Pending, *, answered: bool = False) -> None:
        """Close a pending connection. ``answered``: a refusal went out; read what the
        peer sent meanwhile first, so the close is a FIN after the refusal, not a reset
        that could destroy it before the client reads it."""
        if pc.closed:
            return
        self._forget(pc)
        if answered:
            try:
                for _ in range(16):
                    if not socket.socket.recv(pc.conn, 65536, socket.MSG_DONTWAIT):
                        break
            except OSError:
                pass
        _close(pc.conn)

    def _finish(self, pc: _Pending) -> None:
        """Hand an authenticated connection over."""
        self._forget(pc)
        handshake = pc.handshake
        assert handshake is not None and handshake.done
        conn = pc.conn
        try:
            if self._tcp:  # set here, not at the accept: most of a flood never gets here
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(True)
            receive_key, send_key = handshake.session_keys()
            sealer = Sealer(send_key, receive_key) if self._ssl is None else None
            self.authenticated += 1
            self._on_authenticated(conn, sealer, handshake.leftover())
        except Exception:  # the gate lives on; this client is dropped
            log.exception("offload: could not start a session for a client")
            _close(conn)


def _least_progressed(pending: Iterable[_Pending], source: str | None) -> _Pending | None:
    """Of ``pending`` (in accept order), those of ``source`` (or all): the oldest of the
    ones that got least far."""
    best: _Pending | None = None
    best_progress = 0
    for pc in pending:
        if source is not None and pc.source != source:
            continue
        progress = pc.progress
        if best is None or progress < best_progress:
            best, best_progress = pc, progress
            if progress == 0:
                break  # nothing gets less far; it is the oldest such
    return best


def _close(sock: socket.socket) -> None:
    """Close a connection this thread owns (no other thread holds it, so no shutdown is
    needed to wake anyone: the close sends the FIN)."""
    try:
        sock.close()
    except OSError:
        pass
