"""Hostile peers against ``offload serve`` and ``offload.connect`` (SPEC section 7).

Every hostile input runs against a real ``offload serve`` process (module-scoped where
the case allows) and is followed by the same three checks:

* a good client still gets in and is served at once: ``connect(...).call(os.getpid)``
  takes < 1 s and returns the pid of one of the server's workers;
* the server's threads (``/proc/PID/task``), fds (``/proc/PID/fd``) and child processes
  come back to the baseline taken after it had served one good client, within a bounded
  settle time (the servers here run with a 3 s handshake deadline);
* nothing the attacker sent was ever unpickled: its payloads are marker pickles whose
  ``__reduce__`` creates a file (``open(path, "w")`` or ``os.system("touch path")``),
  and the file never appears. A positive control shows the same payload, sent by an
  authenticated client, does create its file.

The client side is attacked with fake servers (a thread in this process): stray
results, unknown messages, an impostor without the token.

No test sleeps to let something happen: each waits for a condition it can read (the
kernel's socket queues in ``/proc/net/tcp``, the server's ``status`` counters, a callback
run by offload's I/O loop), bounded by a deadline.
"""

from __future__ import annotations

import os
import pickle
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import offload
import remote_helpers as h
from offload import protocol as p
from offload.protocol.auth import (
    AUTH_VERSION,
    MAGIC,
    NONCE_SIZE,
    REFUSED_TOKEN,
    ClientHandshake,
    refusal,
)
from offload.protocol.connection import DEFAULT_MAX_MESSAGE_SIZE, HEADER, MAC_SIZE
from offload.transport.loop import get_loop

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"), reason="reads /proc/PID/task and /proc/PID/fd"
)

HANDSHAKE_TIMEOUT = 3.0  # the module servers' handshake deadline (seconds)
SETTLE = HANDSHAKE_TIMEOUT + 4.0  # bound on the wait for the server's own cleanup
GOOD_CLIENT_LIMIT = 1.0  # a good client must be served within this after each attack
CLOSE_LIMIT = 2.0  # a connection the server must drop at once is gone within this
# What the server answers a wrong proof with (a constant: it tells a prober nothing the
# missing server proof would not), so that a client with the wrong token is told so.
TOKEN_REFUSAL = refusal(REFUSED_TOKEN)


# --------------------------------------------------------------------------- #
# Servers
# --------------------------------------------------------------------------- #


@dataclass
class Served:
    """A running server and what a good client needs to use it."""

    proc: h.ServerProcess
    token: bytes
    tls: offload.TLS | None
    baseline: h.Resources

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return self.proc.port

    @property
    def address(self) -> str:
        return self.proc.address


def probe(srv: Served) -> tuple[float, int]:
    """A real client: connect, call os.getpid; (seconds for both, the pid)."""
    started = time.monotonic()
    worker = offload.connect(srv.address, token=srv.token, tls=srv.tls, start_timeout=5)
    try:
        pid = worker.call(os.getpid)
        elapsed = time.monotonic() - started
    finally:
        worker.shutdown(wait=True, timeout=10)
    return elapsed, pid


def assert_serves(srv: Served) -> float:
    elapsed, pid = probe(srv)
    assert elapsed < GOOD_CLIENT_LIMIT, f"a good client took {elapsed:.3f} s"
    assert pid in h.server_resources(srv.pid).children, "the call did not run in a worker"
    return elapsed


def assert_settles(srv: Served, limit: float = SETTLE) -> None:
    now, waited = h.wait_settled(srv.pid, srv.baseline, limit)
    assert now.within(srv.baseline), (
        f"the server did not return to its baseline within {waited:.1f} s: "
        f"threads {now.threads} (baseline {srv.baseline.threads}), fds {now.fds} "
        f"(baseline {srv.baseline.fds}), children {sorted(now.children)} "
        f"(baseline {sorted(srv.baseline.children)})"
    )


def assert_recovers(srv: Served, *markers: Path) -> None:
    """The three checks every hostile case ends with."""
    assert_serves(srv)
    assert_settles(srv)
    for marker in markers:
        assert not marker.exists(), f"an attacker's pickle was unpickled: {marker} exists"
    assert srv.proc.proc is not None and srv.proc.proc.poll() is None, "the server exited"


_POLL = 0.01


def wait_until(predicate: Callable[[], bool], limit: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail after ``limit`` seconds (for conditions
    of another process or of the kernel, which nothing here can be told about)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"waited {limit:g} s for {what}"
        time.sleep(_POLL)


def tcp_queues(local_port: int, remote_port: int = 0) -> tuple[int, int] | None:
    """``(tx_queue, rx_queue)`` of the TCP socket on 127.0.0.1:``local_port`` whose peer
    is 127.0.0.1:``remote_port`` (0: the listening socket, whose rx_queue is its accept
    queue), from ``/proc/net/tcp``; None if there is no such socket."""
    loopback = "0100007F"
    local = f"{loopback}:{local_port:04X}"
    remote = f"{loopback}:{remote_port:04X}" if remote_port else "00000000:0000"
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


def accept_queue_empty(port: int) -> bool:
    """Whether the server listening on ``port`` has accepted every connection made."""
    return tcp_queues(port) == (0, 0)


def server_read_everything(port: int, sock: socket.socket) -> bool:
    """Whether every byte sent on ``sock`` (a client of the server on ``port``) has left
    it and been read by the server (both kernel queues between them are empty)."""
    client_port = sock.getsockname()[1]
    return tcp_queues(client_port, port) == (0, 0) and tcp_queues(port, client_port) == (0, 0)


def server_status(srv: Served) -> dict[str, Any]:
    """The server's ``offload status`` record."""
    from offload.client.remote import RemoteTarget, query

    target = RemoteTarget.parse(srv.address, srv.token, srv.tls, (5.0, 30.0))
    _, status, _ = query(target, 5.0, status=True)
    return status


def calls_finished(srv: Served) -> int:
    """How many calls the server has finished, served or failed."""
    status = server_status(srv)
    return int(status["calls_served"]) + int(status["calls_failed"])


def assert_ran_nothing_since(srv: Served, finished: int) -> None:
    """The server has run no call since its finished count was ``finished``, and runs
    none now. Asked once the server has handled what the attacker sent (it closed the
    connection, or read every byte), so a call it had taken would show here, running,
    queued or finished: the status is answered by the loop that handled those bytes."""
    status = server_status(srv)
    assert status["busy"] == 0 and status["queued"] == 0, status
    now = int(status["calls_served"]) + int(status["calls_failed"])
    assert now == finished, f"the server ran {now - finished} call(s): {status}"


def loop_caught_up(limit: float = 5.0) -> None:
    """Wait until offload's I/O loop has run everything queued before now: whatever this
    process's clients had read by then, they have handled."""
    done = threading.Event()
    get_loop().call_soon_from_anywhere(done.set)
    assert done.wait(limit), f"the I/O loop ran no callback within {limit:g} s"


def start_served(
    workdir: Path,
    token_file: Path,
    token: bytes,
    *extra: str,
    tls: offload.TLS | None = None,
    name: str = "server",
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Served:
    args = [
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        str(token_file),
        "--workers",
        "1",
        "--handshake-timeout",
        str(handshake_timeout),
        *extra,
    ]
    proc = h.ServerProcess(workdir, args, name=name).start()
    srv = Served(proc, token, tls, h.Resources(0, 0, frozenset()))
    try:
        assert_serves_cold(srv)
        srv.baseline = h.stable_resources(proc.pid)
    except BaseException:
        proc.kill()
        raise
    return srv


def assert_serves_cold(srv: Served) -> None:
    """The first good client (its time includes the client's own warm-up)."""
    elapsed, pid = probe(srv)
    assert elapsed < 10, elapsed
    assert pid in h.server_resources(srv.pid).children


def stop_served(srv: Served) -> None:
    status = srv.proc.stop()
    output = srv.proc.output()
    assert status == 0, f"offload serve exited with status {status}:\n{output}"
    assert srv.token.decode() not in output, "the token appeared in the server's output"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote-security")


@pytest.fixture(scope="module")
def token_file(workdir: Path) -> tuple[Path, bytes]:
    return h.write_token_file(workdir)


@pytest.fixture(scope="module")
def pki(workdir: Path) -> h.PKI:
    return h.make_pki(workdir / "pki")


@pytest.fixture(scope="module")
def plain(workdir: Path, token_file: tuple[Path, bytes]) -> Iterator[Served]:
    """The shared plain-TCP server (token + per-frame MACs)."""
    path, token = token_file
    srv = start_served(workdir, path, token, name="plain")
    yield srv
    stop_served(srv)


@pytest.fixture(scope="module")
def tls_server(workdir: Path, token_file: tuple[Path, bytes], pki: h.PKI) -> Iterator[Served]:
    """The shared TLS server (client certificates required, and the token)."""
    path, token = token_file
    tls = offload.TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    srv = start_served(
        workdir,
        path,
        token,
        "--tls-cert",
        pki.server_cert,
        "--tls-key",
        pki.server_key,
        "--tls-ca",
        pki.ca,
        tls=tls,
        name="tls",
    )
    yield srv
    stop_served(srv)


@pytest.fixture
def fresh_servers(tmp_path: Path) -> Iterator[list[h.ServerProcess]]:
    """Servers a test starts for itself; stopped (SIGTERM, status 0) at teardown."""
    procs: list[h.ServerProcess] = []
    yield procs
    failures = []
    for proc in procs:
        if proc.proc is None:
            continue
        if proc.proc.poll() is not None:
            continue  # it exited during the test (the test checked why)
        status = proc.stop()
        if status != 0:
            failures.append(f"status {status}:\n{proc.output()}")
    assert not failures, failures


# --------------------------------------------------------------------------- #
# Positive controls: the harness can tell "ran" from "did not run"
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shell", [False, True], ids=["open-marker", "shell-marker"])
def test_control_authenticated_marker_pickle_runs(
    plain: Served, tmp_path: Path, shell: bool
) -> None:
    # The very payload the hostile cases send does create its file when an authenticated
    # client sends it properly: "the file never appears" below means "never unpickled".
    marker = tmp_path / "MARKER"
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        raw.send(h.marker_call(marker, call_id=7, shell=shell))
        result = raw.recv_result(7)
        # Unpickling ran (the marker exists); the payload is no (fn, args, kwargs) tuple.
        assert result.status in (p.BAD_ARGUMENT, p.OK), result
        raw.send(h.getpid_call(8))
        assert raw.recv_result(8).status == p.OK
    assert marker.exists()
    assert_recovers(plain)


# --------------------------------------------------------------------------- #
# Before authentication: nothing is unpickled, nothing is answered
# --------------------------------------------------------------------------- #


def _send_then_half_close(port: int, data: bytes) -> tuple[bool, bytes]:
    with socket.create_connection((h.HOST, port), timeout=5) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return True, b""  # the server already hung up on us
        return h.peer_closed(sock, CLOSE_LIMIT)


def _http_request() -> bytes:
    return b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"


PREAUTH_INPUTS: dict[str, Callable[[Path], bytes]] = {
    "pickle": h.marker_pickle,
    "pickle-shell": lambda m: h.marker_pickle(m, shell=True),
    "pickle-framed": lambda m: h.u64(len(h.marker_pickle(m))) + h.marker_pickle(m),
    "pickle-after-hello": lambda m: (
        MAGIC + struct.pack("!H", AUTH_VERSION) + os.urandom(NONCE_SIZE) + h.marker_pickle(m)
    ),
    "garbage": lambda m: os.urandom(1000),
    "garbage-100k": lambda m: os.urandom(100_000),
    "http": lambda m: _http_request(),
    "short-hello": lambda m: MAGIC + struct.pack("!H", AUTH_VERSION) + b"\x00" * 5,
    "wrong-version-hello": lambda m: MAGIC + struct.pack("!H", 999) + os.urandom(NONCE_SIZE),
    "huge-length-prefix": lambda m: h.u64(2**63) + h.marker_pickle(m),
    "zeros": lambda m: b"\x00" * 64,
}


@pytest.mark.parametrize("kind", list(PREAUTH_INPUTS))
def test_preauth_bytes_are_dropped_unanswered(plain: Served, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    closed, answer = _send_then_half_close(plain.port, PREAUTH_INPUTS[kind](marker))
    assert closed, "the server kept a connection open after bytes that are no handshake"
    if kind == "pickle-after-hello":
        # A valid hello earns at most the server's random challenge, and the pickle
        # behind it, taken as a wrong proof, the constant token refusal: nothing more.
        challenge = answer.removesuffix(TOKEN_REFUSAL)
        assert challenge == b"" or (len(challenge) == 38 and challenge.startswith(MAGIC)), answer
    else:
        assert answer == b"", f"an unauthenticated peer got an answer: {answer[:64]!r}"
    assert_recovers(plain, marker)


def test_tls_client_hello_on_the_plain_port(plain: Served) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((h.HOST, plain.port), timeout=5) as raw:
        started = time.monotonic()
        with (
            pytest.raises((ssl.SSLError, OSError)),
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.recv(1)
        assert time.monotonic() - started < CLOSE_LIMIT
    assert_recovers(plain)


def test_tls_client_on_the_plain_port_gets_authentication_error(plain: Served, pki: h.PKI) -> None:
    tls = offload.TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    with pytest.raises(offload.AuthenticationError):
        offload.connect(plain.address, token=plain.token, tls=tls, start_timeout=5)
    assert_recovers(plain)


def test_wrong_token_is_refused_and_its_pickles_never_run(plain: Served, tmp_path: Path) -> None:
    wrong = os.urandom(32).hex().encode()
    started = time.monotonic()
    with pytest.raises(offload.AuthenticationError) as info:
        offload.connect(plain.address, token=wrong, start_timeout=5)
    assert time.monotonic() - started < CLOSE_LIMIT
    for secret in (wrong, plain.token):
        assert secret.decode() not in str(info.value)

    # The same by hand: a wrong proof with marker frames pipelined right behind it.
    marker = tmp_path / "MARKER"
    with h.RawClient(plain.port) as raw:
        hs = ClientHandshake(wrong)
        raw.sendall(hs.data_to_send())
        challenge = h.recv_exactly(raw.sock, 38)
        hs.receive_data(challenge)
        conn = p.Connection("client")
        tail = b"".join(bytes(c) for c in conn.hello() + conn.send(h.marker_call(marker)))
        try:
            raw.sendall(hs.data_to_send() + tail + tail)
        except OSError:
            pass
        closed, answer = raw.closed_by_peer(CLOSE_LIMIT)
    assert closed
    assert answer in (b"", TOKEN_REFUSAL), "the server proved itself to a client that did not"
    assert_recovers(plain, marker)


def test_replayed_session_is_refused(plain: Served, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with h.RecordingProxy(plain.port) as proxy:
        worker = offload.connect(proxy.address, token=plain.token, start_timeout=5)
        try:
            assert worker.call(os.system, f"echo ran >> {log}") == 0
        finally:
            worker.shutdown(wait=True, timeout=10)
    assert proxy.error is None, proxy.error
    assert log.read_text().splitlines() == ["ran"]
    recorded = bytes(proxy.client_bytes)
    assert len(recorded) > 38 + 32, "the proxy did not see a whole session"

    # Replay every byte the real client sent, in one write, then at the client's pace.
    recorded_challenge = bytes(proxy.server_bytes[:38])
    for paced in (False, True):
        challenge = b""
        with h.RawClient(plain.port) as raw:
            try:
                if paced:
                    raw.sendall(recorded[:38])
                    challenge = h.recv_exactly(raw.sock, 38)
                    raw.sendall(recorded[38:])
                else:
                    raw.sendall(recorded)
            except OSError:
                pass
            closed, answer = raw.closed_by_peer(CLOSE_LIMIT)
        assert closed
        challenge += answer
        # At most a fresh challenge (another nonce than the recorded one) and the token
        # refusal (the recorded proof is wrong for this challenge), never a proof.
        challenge = challenge.removesuffix(TOKEN_REFUSAL)
        assert len(challenge) in (0, 38), challenge
        if challenge:
            assert challenge.startswith(MAGIC) and challenge != recorded_challenge
    assert_recovers(plain)
    assert log.read_text().splitlines() == ["ran"], "a replayed call ran again"


@pytest.mark.parametrize("then", ["close", "silence"])
def test_truncated_handshake(plain: Served, then: str) -> None:
    hello = ClientHandshake(plain.token).data_to_send()
    with socket.create_connection((h.HOST, plain.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(hello[:20])
        if then == "close":
            sock.shutdown(socket.SHUT_WR)
            closed, answer = h.peer_closed(sock, CLOSE_LIMIT)
        else:
            assert_serves(plain)  # while the silent one waits
            closed, answer = h.peer_closed(sock, HANDSHAKE_TIMEOUT + 3)
            # Dropped at the handshake deadline, not earlier, not much later.
            assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.5
        assert closed and answer == b""
    assert_recovers(plain)


def test_silent_connection_is_dropped_at_the_handshake_deadline(plain: Served) -> None:
    with socket.create_connection((h.HOST, plain.port), timeout=5) as sock:
        started = time.monotonic()
        assert_serves(plain)
        closed, answer = h.peer_closed(sock, HANDSHAKE_TIMEOUT + 3)
        waited = time.monotonic() - started
    assert closed and answer == b""
    assert HANDSHAKE_TIMEOUT - 0.5 <= waited <= HANDSHAKE_TIMEOUT + 3
    assert_recovers(plain)


def _slowloris(port: int, data: bytes, srv: Served) -> float:
    """Send ``data`` one byte per 0.5 s until the server hangs up; seconds it took."""
    with socket.create_connection((h.HOST, port), timeout=5) as sock:
        started = time.monotonic()
        probed = False
        for byte in data[: int((HANDSHAKE_TIMEOUT + 3) / 0.5)]:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if not probed and time.monotonic() - started > 1.0:
                assert_serves(srv)  # the dribbling peer blocks nobody
                probed = True
            closed, _ = h.peer_closed(sock, 0.5)
            if closed:
                break
        else:
            closed, _ = h.peer_closed(sock, 2.0)
            assert closed, "the server waited on a slowloris past its handshake deadline"
        return time.monotonic() - started


def test_slowloris_handshake(plain: Served) -> None:
    hello = ClientHandshake(plain.token).data_to_send()
    assert len(hello) == 38  # 19 s at 2 bytes/s: longer than the deadline
    took = _slowloris(plain.port, hello, plain)
    assert took <= HANDSHAKE_TIMEOUT + 1.5, f"the slowloris lasted {took:.1f} s"
    assert_recovers(plain)


def _open_silent(port: int, count: int, socks: list[socket.socket]) -> None:
    for _ in range(count):
        socks.append(socket.create_connection((h.HOST, port), timeout=5))


@pytest.mark.parametrize("server", ["plain", "tls"])
def test_300_silent_connections(plain: Served, tls_server: Served, server: str) -> None:
    srv = plain if server == "plain" else tls_server
    with h.many_sockets() as socks:
        _open_silent(srv.port, 300, socks)
        wait_until(lambda: accept_queue_empty(srv.port), 10.0, "the server to accept all 300")
        assert_serves(srv)
    assert_recovers(srv)


@pytest.mark.parametrize(
    "tls",
    [
        False,
        True,
    ],
    ids=["plain", "tls"],
)
def test_over_the_cap_the_oldest_unauthenticated_connection_is_evicted(
    tmp_path: Path, pki: h.PKI, fresh_servers: list[h.ServerProcess], tls: bool
) -> None:
    # A long handshake deadline, so "closed within 2 s" can only mean "evicted".
    cap, extra_conns = 16, 24
    token_path, token = h.write_token_file(tmp_path)
    tls_args: list[str] = []
    client_tls = None
    if tls:
        tls_args = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
        tls_args += ["--tls-ca", pki.ca]
        client_tls = offload.TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    args = ["--listen", "127.0.0.1:0", "--token-file", str(token_path), "--workers", "1"]
    args += ["--handshake-timeout", "30", "--max-unauthenticated", str(cap), *tls_args]
    proc = h.ServerProcess(tmp_path, args, name="evict")
    fresh_servers.append(proc)
    proc.start()
    srv = Served(proc, token, client_tls, h.Resources(0, 0, frozenset()))
    assert_serves_cold(srv)
    srv.baseline = h.stable_resources(proc.pid)
    with h.many_sockets() as socks:
        _open_silent(srv.port, cap + extra_conns, socks)
        deadline = time.monotonic() + 2.0
        evicted = [h.peer_closed(s, max(0.01, deadline - time.monotonic()))[0] for s in socks]
        assert evicted[:extra_conns] == [True] * extra_conns, (
            f"{evicted[:extra_conns].count(False)} of the {extra_conns} oldest connections "
            f"over the cap of {cap} are still open"
        )
        assert evicted[-cap + 1 :].count(True) == 0, "newer connections were dropped"
        # Handshakes cost no thread (one selector runs them all); this bound is loose.
        bound = srv.baseline.threads + cap + 2
        wait_until(
            lambda: h.server_resources(proc.pid).threads <= bound,
            2.0,
            f"at most {bound} server threads for {cap} pending handshakes",
        )
        assert_serves(srv)
    assert_settles(srv)


@pytest.mark.parametrize("server", ["plain", "tls"])
def test_2000_connect_close_cycles(plain: Served, tls_server: Served, server: str) -> None:
    srv = plain if server == "plain" else tls_server
    deadline = time.monotonic() + 40
    linger_rst = struct.pack("ii", 1, 0)
    done = 0
    for i in range(2000):
        if time.monotonic() > deadline:
            break
        sock = socket.create_connection((h.HOST, srv.port), timeout=5)
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_rst)  # RST on close
        sock.close()
        done += 1
    assert done == 2000, f"only {done} cycles in the time limit"
    assert_recovers(srv)


def _calls_served(srv: Served) -> int:
    return int(server_status(srv)["calls_served"])


@pytest.mark.parametrize("server", ["plain", "tls"])
def test_a_client_that_stops_reading_does_not_hold_up_the_server(
    plain: Served, tls_server: Served, server: str
) -> None:
    """A client sends calls with large results and never reads them: its socket fills,
    and what it does not take waits in the server for it, while the server goes on
    serving everyone else. (The server's I/O thread used to block writing to it.)"""
    srv = plain if server == "plain" else tls_server
    payload = pickle.dumps((bytes, (2_000_000,), {}), protocol=5)
    calls = 20  # 40 MB of results: far more than the sockets between us hold
    before = _calls_served(srv)
    with h.RawClient(srv.port, tls=srv.tls) as raw:
        raw.open(srv.token)
        for i in range(1, calls + 1):
            raw.send(
                p.Call(call_id=i, kind=p.BY_VALUE, timeout=0.0, target="bytes", payload=payload)
            )
        # Results made, most of them not taken.
        wait_until(lambda: _calls_served(srv) >= before + calls, 30.0, "the server to run them")
        assert_serves(srv)
        assert_serves(srv)
    assert_recovers(srv)  # the client left: its queued results are dropped


def test_tls_calls_move_large_arguments_and_results_both_ways(tls_server: Served) -> None:
    """Over TLS, a pool writes calls while its reader takes results, and the server
    likewise: one TLS object used from several threads, which OpenSSL allows only one
    at a time (the channel's TLS lock), with writes the socket cannot take retried."""
    blob = b"x" * 100_000
    with offload.Pool(
        hosts=[tls_server.address], token=tls_server.token, tls=tls_server.tls
    ) as pool:
        for _ in range(2):
            futures = [pool.submit(bytes, blob) for _ in range(500)]
            assert all(f.result(60) == blob for f in futures)
    assert_recovers(tls_server)


# --------------------------------------------------------------------------- #
# After authentication: frames are integrity-checked, the framing is hostile-proof
# --------------------------------------------------------------------------- #


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _shorter_by_one(frame: bytes) -> bytes:
    """``frame`` with a length prefix one less than its length."""
    (length,) = HEADER.unpack_from(frame)
    return HEADER.pack(length - 1) + frame[HEADER.size :]


def unsealed_frame(msg: p.Message) -> bytes:
    """``msg`` framed as if the connection had no MACs."""
    conn = p.Connection("client")
    return b"".join(bytes(c) for c in conn.send(msg))


def _skip_a_sequence_number(raw: h.RawClient, marker: Path) -> bytes:
    raw.frame(h.getpid_call(9))  # sealed with the next sequence number, never sent
    return raw.frame(h.marker_call(marker))


TAMPERINGS: dict[str, Callable[[h.RawClient, Path], bytes]] = {
    "mac-bit": lambda raw, m: _flip(raw.frame(h.marker_call(m)), -1),
    "mac-first-bit": lambda raw, m: _flip(raw.frame(h.marker_call(m)), -MAC_SIZE),
    "body-bit": lambda raw, m: _flip(raw.frame(h.marker_call(m)), 8 + 1),
    # One less in the length prefix (flipping its low bit made it one more whenever the
    # frame's length was even, and a frame one byte short of its length just waits).
    "length-bit": lambda raw, m: _shorter_by_one(raw.frame(h.marker_call(m))),
    "no-mac": lambda raw, m: unsealed_frame(h.marker_call(m)),
    "zero-mac": lambda raw, m: raw.frame(h.marker_call(m))[:-MAC_SIZE] + b"\x00" * MAC_SIZE,
    "skipped-sequence-number": _skip_a_sequence_number,
}


@pytest.mark.parametrize("kind", list(TAMPERINGS))
def test_tampered_frame_drops_the_connection_and_never_runs(
    plain: Served, tmp_path: Path, kind: str
) -> None:
    marker = tmp_path / "MARKER"
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        raw.send(h.getpid_call(1))  # the connection works before the tampering
        assert raw.recv_result(1).status == p.OK
        finished = calls_finished(plain)
        try:
            raw.sendall(TAMPERINGS[kind](raw, marker))
        except OSError:
            pass
        closed, _ = raw.closed_by_peer(CLOSE_LIMIT)
        assert closed, "the server kept a connection that sent a forged frame"
    assert_ran_nothing_since(plain, finished)  # the forged call was never taken
    assert_recovers(plain, marker)


def test_replayed_frame_within_a_session_is_rejected(plain: Served) -> None:
    log_calls = 0
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        frame = raw.frame(h.getpid_call(1))
        raw.sendall(frame)
        assert raw.recv_result(1).status == p.OK
        log_calls += 1
        try:
            raw.sendall(frame)  # the same bytes again: a stale sequence number
        except OSError:
            pass
        closed, answer = raw.closed_by_peer(CLOSE_LIMIT)
        assert closed
        assert raw.conn is not None
        raw.conn.receive_data(answer)
        replies = []
        for _ in range(10):
            try:
                reply = raw.conn.next_event()
            except offload.ProtocolError:
                break
            if reply is p.NEED_DATA or reply is p.CLOSED:
                break
            replies.append(reply)
        assert not any(isinstance(m, p.Result) for m in replies), "the replayed call ran"
    assert log_calls == 1
    assert_recovers(plain)


@pytest.mark.parametrize("then", ["close", "silence"])
def test_truncated_frame_after_auth(plain: Served, tmp_path: Path, then: str) -> None:
    marker = tmp_path / "MARKER"
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        frame = raw.frame(h.marker_call(marker))
        raw.sendall(frame[: len(frame) - 10])
        if then == "close":
            raw.sock.shutdown(socket.SHUT_WR)
            closed, _ = raw.closed_by_peer(CLOSE_LIMIT)
            assert closed
        else:
            assert_serves(plain)  # the half-sent frame holds up nobody
            finished = calls_finished(plain)
            wait_until(
                lambda: server_read_everything(plain.port, raw.sock),
                CLOSE_LIMIT,
                "the server to read the half frame",
            )
            assert_ran_nothing_since(plain, finished)  # it waits for the rest
            assert not marker.exists()
    assert_recovers(plain, marker)


@pytest.mark.parametrize(
    "length",
    [2**63, 2**64 - 1, DEFAULT_MAX_MESSAGE_SIZE + MAC_SIZE + 1, MAC_SIZE - 1, 0],
    ids=["2**63", "2**64-1", "max+1", "shorter-than-mac", "zero"],
)
def test_hostile_length_prefix_after_auth(plain: Served, tmp_path: Path, length: int) -> None:
    marker = tmp_path / "MARKER"
    rss_before = psutil.Process(plain.pid).memory_info().rss
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        try:
            raw.sendall(h.u64(length) + h.marker_pickle(marker) + os.urandom(4096))
        except OSError:
            pass
        closed, _ = raw.closed_by_peer(CLOSE_LIMIT)
        assert closed, f"the server waited for the body of a {length}-byte frame"
    grown = psutil.Process(plain.pid).memory_info().rss - rss_before
    assert grown < 64 << 20, f"the server's memory grew by {grown >> 20} MiB"
    assert_recovers(plain, marker)


def _truncated_call_body() -> bytes:
    body = b"".join(bytes(c) for c in p.encode_body(h.getpid_call(1)))
    return body[:12]


MALFORMED_BODIES: dict[str, Callable[[], bytes]] = {
    "unknown-type-200": lambda: bytes([200]) + os.urandom(16),
    "unknown-type-0": lambda: b"\x00" * 9,
    "unknown-type-255": lambda: b"\xff",
    "empty-body": lambda: b"",
    "truncated-call": _truncated_call_body,
    "call-field-past-end": lambda: (
        bytes([p.Call.TAG]) + struct.pack("!QQd", 1, 0, 0.0) + struct.pack("!I", 2**31)
    ),
    "impossible-buffer-count": lambda: (
        b"".join(bytes(c) for c in p.encode_body(h.getpid_call(1)))[:-4] + b"\xff\xff\xff\xff"
    ),
    "stray-bytes-after-message": lambda: bytes([p.Ping.TAG]) + h.u64(1) + b"junk",
}


@pytest.mark.parametrize("kind", list(MALFORMED_BODIES))
def test_malformed_sealed_frame_drops_the_connection(plain: Served, kind: str) -> None:
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        try:
            raw.sendall(raw.sealed_body(MALFORMED_BODIES[kind]()))
        except OSError:
            pass
        closed, _ = raw.closed_by_peer(CLOSE_LIMIT)
        assert closed, "the server kept a connection that sent a malformed frame"
    assert_recovers(plain)


@pytest.mark.parametrize(
    "msg",
    [
        p.Result(call_id=1, status=p.OK, payload=pickle.dumps(1)),
        p.Status(json="{}"),
        p.Progress(call_id=1, payload=b"x"),
    ],
    ids=lambda m: type(m).__name__,
)
def test_message_the_server_does_not_take_ends_the_session(plain: Served, msg: p.Message) -> None:
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        raw.send(msg)
        # A Failure naming the message, then the close; or just the close.
        for _ in range(5):
            reply = raw.recv(CLOSE_LIMIT)
            if reply is p.CLOSED:
                break
            assert isinstance(reply, p.Failure), reply
        else:
            pytest.fail("the server kept talking after an unexpected message")
    assert_recovers(plain)


def test_garbage_call_payload_fails_that_call_only(plain: Served) -> None:
    with h.RawClient(plain.port) as raw:
        raw.open(plain.token)
        for call_id, payload in enumerate(
            [os.urandom(200), b"\x80\x05garbage", b"", pickle.dumps(42)], start=1
        ):
            raw.send(
                p.Call(call_id=call_id, kind=p.BY_VALUE, timeout=0.0, target="x", payload=payload)
            )
            result = raw.recv_result(call_id)
            assert result.status == p.BAD_ARGUMENT, result
        raw.send(h.getpid_call(99))  # the same connection lives on
        result = raw.recv_result(99)
        assert result.status == p.OK
        assert pickle.loads(result.payload) in h.server_resources(plain.pid).children
    assert_recovers(plain)


class FailsToUnpickle:
    """Pickles fine here; unpickling it in the worker raises ValueError."""

    def __reduce__(self) -> tuple[object, ...]:
        return (int, ("not a number",))


def test_argument_that_fails_to_unpickle_is_a_serialization_error(plain: Served) -> None:
    worker = offload.connect(plain.address, token=plain.token, start_timeout=5)
    try:
        with pytest.raises(offload.SerializationError) as info:
            worker.submit(str, FailsToUnpickle()).result(timeout=10)
        assert info.value.direction == "argument"
        assert worker.call(os.getpid) in h.server_resources(plain.pid).children
    finally:
        worker.shutdown(wait=True, timeout=10)
    assert_recovers(plain)


# --------------------------------------------------------------------------- #
# TLS port
# --------------------------------------------------------------------------- #


def test_tls_good_client(tls_server: Served) -> None:
    assert_recovers(tls_server)


@pytest.mark.parametrize("kind", ["offload-hello", "pickle", "pickle-shell", "http", "garbage"])
def test_plain_bytes_on_the_tls_port(tls_server: Served, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "MARKER"
    data = {
        "offload-hello": lambda: ClientHandshake(tls_server.token).data_to_send(),
        "pickle": lambda: h.marker_pickle(marker),
        "pickle-shell": lambda: h.marker_pickle(marker, shell=True),
        "http": _http_request,
        "garbage": lambda: os.urandom(1000),
    }[kind]()
    closed, answer = _send_then_half_close(tls_server.port, data)
    assert closed
    assert MAGIC not in answer, "the TLS port spoke the offload handshake in clear"
    assert_recovers(tls_server, marker)


def test_plain_client_on_the_tls_port_gets_authentication_error(tls_server: Served) -> None:
    with pytest.raises(offload.AuthenticationError):
        offload.connect(tls_server.address, token=tls_server.token, start_timeout=5)
    assert_recovers(tls_server)


def test_tls_without_client_certificate_is_refused(tls_server: Served, pki: h.PKI) -> None:
    with pytest.raises(offload.AuthenticationError):
        offload.connect(
            tls_server.address,
            token=tls_server.token,
            tls=offload.TLS(ca=pki.ca),
            start_timeout=5,
        )
    assert_recovers(tls_server)


def test_tls_client_rejects_a_server_its_ca_did_not_sign(
    tls_server: Served, tmp_path: Path
) -> None:
    other = h.make_pki(tmp_path / "other-pki")
    with pytest.raises(offload.AuthenticationError):
        offload.connect(
            tls_server.address,
            token=tls_server.token,
            tls=offload.TLS(ca=other.ca, cert=other.client_cert, key=other.client_key),
            start_timeout=5,
        )
    assert_recovers(tls_server)


def test_tls_client_checks_the_server_name(tls_server: Served, pki: h.PKI) -> None:
    tls = offload.TLS(
        ca=pki.ca, cert=pki.client_cert, key=pki.client_key, server_hostname="not-this-server"
    )
    with pytest.raises(offload.AuthenticationError):
        offload.connect(tls_server.address, token=tls_server.token, tls=tls, start_timeout=5)
    assert_recovers(tls_server)


def test_tls_with_a_wrong_token_is_refused(tls_server: Served) -> None:
    wrong = os.urandom(32).hex().encode()
    with pytest.raises(offload.AuthenticationError):
        offload.connect(tls_server.address, token=wrong, tls=tls_server.tls, start_timeout=5)
    assert_recovers(tls_server)


def _tls_client_context(pki: h.PKI) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


@pytest.mark.parametrize("stage", ["before-tls", "after-tls"])
def test_silent_tls_connection_is_dropped_at_the_deadline(
    tls_server: Served, pki: h.PKI, stage: str
) -> None:
    with socket.create_connection((h.HOST, tls_server.port), timeout=5) as raw:
        started = time.monotonic()
        if stage == "after-tls":
            ctx = _tls_client_context(pki)
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert_serves(tls_server)
                closed, answer = h.peer_closed(tls, HANDSHAKE_TIMEOUT + 3)
        else:
            assert_serves(tls_server)
            closed, answer = h.peer_closed(raw, HANDSHAKE_TIMEOUT + 3)
        waited = time.monotonic() - started
    assert closed and answer == b""
    assert waited <= HANDSHAKE_TIMEOUT + 3
    assert_recovers(tls_server)


def test_slowloris_tls_handshake(tls_server: Served, pki: h.PKI) -> None:
    # A real ClientHello, dribbled one byte per 0.5 s: the deadline covers TLS too.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _tls_client_context(pki).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = outgoing.read()
    assert len(client_hello) > 2 * (HANDSHAKE_TIMEOUT + 3)
    took = _slowloris(tls_server.port, client_hello, tls_server)
    assert took <= HANDSHAKE_TIMEOUT + 1.5, f"the TLS slowloris lasted {took:.1f} s"
    assert_recovers(tls_server)


# --------------------------------------------------------------------------- #
# The client against fake servers
# --------------------------------------------------------------------------- #


def _wait_client_gone(sock: socket.socket) -> None:
    try:
        h.peer_closed(sock, 15)
    except OSError:
        pass


@pytest.mark.parametrize("then", ["real-result", "unknown-message", "unknown-message-type-0"])
def test_client_survives_stray_result_and_unknown_message(tmp_path: Path, then: str) -> None:
    token = os.urandom(32).hex().encode()
    marker = tmp_path / "MARKER"

    def script(sock: socket.socket) -> None:
        side = h.ServerSide(sock, token)
        side.send_hello()
        hello = side.recv()
        assert isinstance(hello, p.Hello), hello
        call = side.recv_call()
        # A result for a call the client never made, carrying a marker pickle.
        side.send(
            p.Result(call_id=call.call_id + 1000, status=p.OK, payload=h.marker_pickle(marker))
        )
        if then == "real-result":
            side.send(p.Result(call_id=call.call_id, status=p.OK, payload=pickle.dumps(42)))
        elif then == "unknown-message":
            side.send_sealed_body(bytes([200]) + b"hostile")
        else:
            side.send_sealed_body(b"\x00" * 9)
        _wait_client_gone(sock)

    with h.FakeServer(script) as fake:
        worker = offload.connect(fake.address, token=token, start_timeout=5)
        try:
            fut = worker.submit(os.getpid)
            if then == "real-result":
                assert fut.result(timeout=10) == 42
            else:
                with pytest.raises((offload.ConnectionLost, offload.ProtocolError)):
                    fut.result(timeout=10)
                # The handle still answers every later call, with an error, not a hang.
                later = worker.submit(os.getpid)
                with pytest.raises(offload.OffloadError):
                    later.result(timeout=15)
            assert "token" not in repr(worker)
        finally:
            worker.shutdown(wait=True, timeout=10)
    assert fake.error is None or isinstance(fake.error, OSError), fake.error
    assert not marker.exists(), "the client unpickled a result for a call it never made"


IMPOSTORS = ["random-proof", "reflected-proof", "no-proof", "garbage-challenge", "silent-proof"]


@pytest.mark.parametrize("kind", IMPOSTORS)
def test_impostor_server_is_refused_before_anything_is_unpickled(tmp_path: Path, kind: str) -> None:
    token = os.urandom(32).hex().encode()
    marker = tmp_path / "MARKER"

    def bait() -> bytes:
        conn = p.Connection("server", name="impostor", pid=1, slots=1)
        msgs: list[p.Message] = [
            p.Result(call_id=1, status=p.OK, payload=h.marker_pickle(marker)),
            p.Result(call_id=1, status=p.RAISED, payload=h.marker_pickle(marker, shell=True)),
            p.Progress(call_id=1, payload=h.marker_pickle(marker)),
            p.ChannelData(call_id=1, channel_id=1, kind=p.OBJECT, payload=h.marker_pickle(marker)),
        ]
        chunks = conn.hello()
        for msg in msgs:
            chunks += conn.send(msg)
        return b"".join(bytes(c) for c in chunks)

    def script(sock: socket.socket) -> None:
        hello = h.recv_exactly(sock, 38)
        assert hello.startswith(MAGIC)
        try:
            if kind == "garbage-challenge":
                sock.sendall(os.urandom(38) + bait())
            else:
                sock.sendall(MAGIC + struct.pack("!H", AUTH_VERSION) + os.urandom(NONCE_SIZE))
                proof = h.recv_exactly(sock, 32)
                if kind == "random-proof":
                    sock.sendall(os.urandom(32) + bait())
                elif kind == "reflected-proof":
                    sock.sendall(proof + bait())
                elif kind == "no-proof":
                    sock.sendall(bait())
                # silent-proof: never answers; the client's start_timeout ends it
        except OSError:
            return
        _wait_client_gone(sock)

    started = time.monotonic()
    with h.FakeServer(script) as fake:
        expected: tuple[type[BaseException], ...] = (offload.AuthenticationError,)
        if kind == "garbage-challenge":
            expected = (offload.AuthenticationError, offload.ProtocolError)
        with pytest.raises(expected):
            offload.connect(fake.address, token=token, start_timeout=3)
    assert time.monotonic() - started < 10
    assert fake.error is None or isinstance(fake.error, OSError), fake.error
    loop_caught_up()  # the client has closed; anything it had read, it has handled
    assert not marker.exists(), "the client unpickled what an impostor sent"


def test_version_mismatch_names_both_sides(tmp_path: Path) -> None:
    token = os.urandom(32).hex().encode()

    def script(sock: socket.socket) -> None:
        side = h.ServerSide(sock, token)
        side.send(
            p.Hello(
                role="server",
                offload_version="0.0.1-other",
                protocol_version=p.PROTOCOL_VERSION + 1,
                python_version="2.7",
                pid=1,
                name="old-server",
                slots=1,
            )
        )
        _wait_client_gone(sock)

    with h.FakeServer(script) as fake, pytest.raises(offload.VersionMismatch) as info:
        offload.connect(fake.address, token=token, start_timeout=5)
    text = str(info.value)
    assert "0.0.1-other" in text and offload.__version__ in text
    assert "2.7" in text


# --------------------------------------------------------------------------- #
# The token: where it comes from, where it must never show
# --------------------------------------------------------------------------- #


def test_cli_serve_starts(tmp_path: Path, fresh_servers: list[h.ServerProcess]) -> None:
    token_path, token = h.write_token_file(tmp_path)
    proc = h.ServerProcess(tmp_path, ["--listen", "127.0.0.1:0", "--token-file", str(token_path)])
    fresh_servers.append(proc)
    proc.start()
    srv = Served(proc, token, None, h.Resources(0, 0, frozenset()))
    assert_serves_cold(srv)


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_non_loopback_without_token_is_refused(tmp_path: Path, listen: str) -> None:
    proc = h.ServerProcess(tmp_path, ["--listen", listen])
    popen = proc.spawn()
    try:
        status = popen.wait(timeout=30)
    finally:
        proc.kill()
    assert status == 2, proc.output()
    err = proc.stderr()
    assert "without a token" in err and "--token-file" in err, err
    assert "Traceback" not in err, err
    assert "serving on" not in proc.stdout()
    assert list(tmp_path.glob("offload-*")) == [], "it wrote a token for a public address"


def test_loopback_without_token_writes_a_private_token_file(
    tmp_path: Path, fresh_servers: list[h.ServerProcess]
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = h.ServerProcess(
        tmp_path,
        ["--listen", "127.0.0.1:0", "--workers", "1"],
        env=h.clean_env(TMPDIR=str(tmpdir)),
    )
    fresh_servers.append(proc)
    proc.start()
    err = proc.stderr()
    files = list(tmpdir.glob("offload-*/token"))
    assert len(files) == 1, err
    token_path = files[0]
    assert str(token_path) in err, "the path of the new token file was not printed"
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_path.parent.stat().st_mode) & 0o077 == 0
    token = token_path.read_bytes().strip()
    assert len(token) >= 32
    assert token.decode() not in proc.output(), "the token itself was printed"
    srv = Served(proc, token, None, h.Resources(0, 0, frozenset()))
    assert_serves_cold(srv)
    with pytest.raises(offload.AuthenticationError):
        offload.connect(proc.address, token=os.urandom(32).hex(), start_timeout=5)


def _proc_text(pid: int, what: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_token_never_in_ps_environ_or_output(plain: Served, tmp_path: Path) -> None:
    pids = [plain.pid, *h.server_resources(plain.pid).children]
    for pid in pids:
        assert plain.token not in _proc_text(pid, "cmdline"), f"token in argv of pid {pid}"
        assert plain.token not in _proc_text(pid, "environ"), f"token in environ of {pid}"
    for line in psutil.Process(plain.pid).cmdline():
        assert plain.token.decode() not in line
    assert plain.token.decode() not in plain.proc.output()


def test_client_handle_repr_hides_the_token(plain: Served) -> None:
    worker = offload.connect(plain.address, token=plain.token.decode(), start_timeout=5)
    try:
        worker.call(os.getpid)
        for text in (repr(worker), str(worker)):
            assert plain.token.decode() not in text
            assert repr(plain.token) not in text
    finally:
        worker.shutdown(wait=True, timeout=10)


@pytest.mark.parametrize("case", ["short-token-file", "short-env-token", "missing-token-file"])
def test_bad_token_configuration_is_a_clear_error(tmp_path: Path, case: str) -> None:
    env = h.clean_env()
    args = ["--listen", "127.0.0.1:0"]
    if case == "short-token-file":
        path = tmp_path / "short"
        path.write_text("0123456789abcdef\n")
        path.chmod(0o600)
        args += ["--token-file", str(path)]
    elif case == "short-env-token":
        env["OFFLOAD_TOKEN"] = "0123456789abcdef"
    else:
        args += ["--token-file", str(tmp_path / "does-not-exist")]
    proc = h.ServerProcess(tmp_path, args, env=env)
    popen = proc.spawn()
    try:
        status = popen.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr()
    assert "serving on" not in proc.stdout()
    assert "Traceback" not in err, err
    assert status == 2, err
    assert "token" in err
