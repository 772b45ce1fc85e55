"""Helpers for ``test_remote_security.py`` (an importable module, not a test file).

* :class:`ServerProcess`: a real ``offload serve`` process on 127.0.0.1, port 0, whose
  stdout/stderr go to files (no pipes to drain), stopped with SIGTERM.
* :func:`server_resources` / :func:`wait_settled`: threads, fds and children of the server
  process, read from ``/proc`` and psutil, compared with a baseline.
* :class:`RawClient`: a hand-driven client socket that speaks exactly as much of the
  protocol as a test wants (the token handshake with ``ClientHandshake``, sealed frames
  with ``Connection``), and can then break it.
* :class:`FakeServer`: a one-connection server on a thread, driven by a test's script
  (for the client-side cases: stray results, unknown messages, impostors).
* :class:`RecordingProxy`: forwards one connection and records what the client sent.
* :func:`make_pki`: a throw-away CA, server certificate (SAN IP 127.0.0.1) and client
  certificate.
* Marker pickles: unpickling them creates a file, so "was this ever unpickled?" is a
  question the file system answers.

Every wait here is bounded in time and every loop in count.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from offload import protocol as p
from offload.errors import ProtocolError
from offload.protocol.auth import ClientHandshake, Sealer, ServerHandshake
from offload.protocol.connection import HEADER, MAC_SIZE

HOST = "127.0.0.1"
_POLL = 0.02


def die_with_parent() -> None:
    """``preexec_fn`` for servers a test starts: they get SIGTERM when the test process
    dies, so a run ended abruptly (a pytest-timeout) leaves no server behind."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def serve_command(*args: str) -> list[str]:
    """The argv that runs ``offload serve ARGS`` in a fresh interpreter."""
    return [sys.executable, "-m", "offload.cli", "serve", *args]


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any offload token variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
    env.update(extra)
    return env


def write_token_file(directory: Path, name: str = "token") -> tuple[Path, bytes]:
    """A fresh 32-byte random token as hex text in a 0600 file: (path, token bytes)."""
    token = os.urandom(32).hex().encode()
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    return path, token


_SERVING = re.compile(r"offload: serving on (\S+):(\d+) \(pid (\d+)\)")


class ServerProcess:
    """A real ``offload serve`` process (stdout and stderr go to files in ``workdir``)."""

    def __init__(
        self,
        workdir: Path,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        name: str = "server",
    ) -> None:
        self.workdir = workdir
        self.args = args
        self.env = clean_env() if env is None else env
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pid = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to listen."""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                serve_command(*self.args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.workdir,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - it only calls prctl()
            )
        self.pid = self.proc.pid
        return self.proc

    def start(self, limit: float = 20.0) -> ServerProcess:
        """Start and wait (bounded) for the ``serving on HOST:PORT`` line."""
        proc = self.spawn()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            match = _SERVING.search(self.stdout())
            if match:
                self.port = int(match.group(2))
                assert int(match.group(3)) == proc.pid, self.output()
                return self
            if proc.poll() is not None:
                raise RuntimeError(
                    f"offload serve exited with status {proc.returncode} before "
                    f"listening:\n{self.output()}"
                )
            time.sleep(_POLL)
        self.kill()
        raise RuntimeError(f"offload serve did not listen within {limit} s:\n{self.output()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}--- stderr ---\n{self.stderr()}"

    def stop(self, limit: float = 30.0) -> int:
        """SIGTERM the pid we started and wait (bounded); its exit status. A server that
        does not exit in time is killed, and that is an error."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"offload serve did not exit within {limit} s of SIGTERM:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the server and every process it started; reap it.

        The server goes first, as when its machine is lost: killed after its workers,
        it could still see one die and answer a call with that worker's crash."""
        proc = self.proc
        if proc is None:
            return
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if proc.poll() is None:
            proc.kill()
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# --------------------------------------------------------------------------- #
# The server's resources
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Resources:
    threads: int
    fds: int
    children: frozenset[int]

    def within(self, base: Resources) -> bool:
        """No more threads or fds than ``base``, and as many children."""
        return (
            self.threads <= base.threads
            and self.fds <= base.fds
            and len(self.children) == len(base.children)
        )


def server_resources(pid: int) -> Resources:
    """Threads (``/proc/PID/task``), fds (``/proc/PID/fd``) and live (non-zombie)
    descendants of a process."""
    threads = len(os.listdir(f"/proc/{pid}/task"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    children = set()
    with contextlib.suppress(psutil.Error):
        for kid in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if kid.status() != psutil.STATUS_ZOMBIE:
                    children.add(kid.pid)
    return Resources(threads, fds, frozenset(children))


def stable_resources(pid: int, limit: float = 5.0) -> Resources:
    """The server's resources once two reads 0.2 s apart agree (bounded)."""
    deadline = time.monotonic() + limit
    last = server_resources(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = server_resources(pid)
        if now == last:
            return now
        last = now
    return last


def wait_settled(pid: int, base: Resources, limit: float) -> tuple[Resources, float]:
    """Wait (bounded) until the server is back within ``base``; (last reading, seconds
    waited)."""
    started = time.monotonic()
    deadline = started + limit
    now = server_resources(pid)
    while not now.within(base) and time.monotonic() < deadline:
        time.sleep(_POLL)
        now = server_resources(pid)
    return now, time.monotonic() - started


# --------------------------------------------------------------------------- #
# Marker pickles: unpickling one creates a file
# --------------------------------------------------------------------------- #


class OpenMarker:
    """Unpickles as ``open(path, "w")``: the file exists once anything unpickled it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class ShellMarker:
    """Unpickles as ``os.system("touch PATH")``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def marker_pickle(path: str | os.PathLike[str], *, shell: bool = False) -> bytes:
    marker: Any = ShellMarker(path) if shell else OpenMarker(path)
    return pickle.dumps(marker, protocol=5)


def marker_call(path: str | os.PathLike[str], call_id: int = 1, *, shell: bool = False) -> p.Call:
    """A Call whose payload creates ``path`` when it is unpickled."""
    return p.Call(
        call_id=call_id,
        kind=p.BY_VALUE,
        timeout=0.0,
        target="marker",
        payload=marker_pickle(path, shell=shell),
    )


def getpid_call(call_id: int) -> p.Call:
    """A well-formed ``os.getpid()`` call (the payload the real client would send)."""
    payload = pickle.dumps((os.getpid, (), {}), protocol=5)
    return p.Call(call_id=call_id, kind=p.BY_VALUE, timeout=0.0, target="getpid", payload=payload)


# --------------------------------------------------------------------------- #
# A hand-driven client
# --------------------------------------------------------------------------- #


def peer_closed(sock: socket.socket, limit: float) -> tuple[bool, bytes]:
    """Read (bounded) until the peer closes: (closed?, everything it sent meanwhile)."""
    got = bytearray()
    deadline = time.monotonic() + limit
    for _ in range(100_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, bytes(got)
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False, bytes(got)
        except OSError:  # ECONNRESET: closed with our bytes unread
            return True, bytes(got)
        if not data:
            return True, bytes(got)
        got += data
    return False, bytes(got)


class RawClient:
    """A client socket driven by hand. Everything it sends is kept in :attr:`sent`."""

    def __init__(self, port: int, *, timeout: float = 5.0, tls: Any = None) -> None:
        """``tls``: an :class:`offload.TLS` to speak TLS (then frames are not sealed)."""
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.client_context().wrap_socket(sock, server_hostname=HOST)
        self.sock = sock
        self.sealed = tls is None
        self.sent = bytearray()
        self.conn: p.Connection | None = None

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def sendall(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def handshake(self, token: bytes, limit: float = 5.0) -> None:
        """Prove ``token`` and check the server's proof (raises AuthenticationError)."""
        hs = ClientHandshake(token)
        deadline = time.monotonic() + limit
        for _ in range(1000):
            out = hs.data_to_send()
            if out:
                self.sendall(out)
            if hs.done:
                break
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            hs.receive_data(self.sock.recv(4096))
        else:  # pragma: no cover - the handshake is three messages
            raise AssertionError("handshake did not finish")
        send_key, receive_key = hs.session_keys()
        self.conn = p.Connection("client", name="raw-client", pid=os.getpid())
        if self.sealed:
            self.conn.sealer = Sealer(send_key, receive_key)
        if hs.leftover():
            self.conn.receive_data(hs.leftover())

    def open(self, token: bytes) -> p.Hello:
        """Handshake, exchange Hellos; the server's Hello."""
        self.handshake(token)
        assert self.conn is not None
        self.sendall(self.frame_chunks(self.conn.hello()))
        msg = self.recv()
        assert isinstance(msg, p.Hello), msg
        return msg

    @staticmethod
    def frame_chunks(chunks: list[Any]) -> bytes:
        return b"".join(bytes(c) for c in chunks)

    def frame(self, msg: p.Message) -> bytes:
        """``msg`` as the bytes of one sealed frame (consumes a sequence number)."""
        assert self.conn is not None
        return self.frame_chunks(self.conn.send(msg))

    def sealed_body(self, body: bytes) -> bytes:
        """A correctly sealed frame around an arbitrary body."""
        assert self.conn is not None and self.conn.sealer is not None
        mac = self.conn.sealer.seal([body])
        return HEADER.pack(len(body) + MAC_SIZE) + body + mac

    def send(self, msg: p.Message) -> None:
        self.sendall(self.frame(msg))

    def recv(self, limit: float = 5.0) -> p.Message | p.Sentinel:
        """The next message, or ``CLOSED`` (also when the peer reset or broke framing)."""
        assert self.conn is not None
        deadline = time.monotonic() + limit
        for _ in range(100_000):
            try:
                msg = self.conn.next_event()
            except ProtocolError:
                return p.CLOSED
            if msg is not p.NEED_DATA:
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the server in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no message from the server in time") from None
            except OSError:
                data = b""
            self.conn.receive_data(data)
        raise TimeoutError("too many reads")

    def recv_result(self, call_id: int, limit: float = 10.0) -> p.Result:
        """Skip other messages until the Result for ``call_id``."""
        deadline = time.monotonic() + limit
        for _ in range(1000):
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, p.Result) and msg.call_id == call_id:
                return msg
            if msg is p.CLOSED:
                raise ConnectionError("the server closed the connection")
        raise TimeoutError(f"no Result for call {call_id}")

    def closed_by_peer(self, limit: float) -> tuple[bool, bytes]:
        return peer_closed(self.sock, limit)


# --------------------------------------------------------------------------- #
# A fake server (one connection, on a thread)
# --------------------------------------------------------------------------- #


_L = TypeVar("_L", bound="OneShotListener")


class OneShotListener:
    """A listener on 127.0.0.1:0 whose thread serves one connection (subclasses define
    ``_run``). Use as a context manager; the thread is joined, bounded, on exit."""

    thread_name = "one-shot-listener"

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(1)
        self.listener.settimeout(limit)
        self.port = self.listener.getsockname()[1]
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self: _L) -> _L:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(self.limit + 5)
        assert not self.thread.is_alive(), f"{self.thread_name} thread did not finish"

    def _run(self) -> None:
        raise NotImplementedError  # pragma: no cover - subclasses serve the connection


class FakeServer(OneShotListener):
    """Listens on 127.0.0.1:0, accepts one connection, runs ``script(sock)`` on it on a
    thread, then closes. Use as a context manager; exceptions of the script are kept in
    :attr:`error` (and the listener refuses later connections: it is closed after one)."""

    thread_name = "fake-server"

    def __init__(self, script: Callable[[socket.socket], None], *, limit: float = 20.0) -> None:
        self.script = script
        self.done = threading.Event()
        super().__init__(limit)

    def _run(self) -> None:
        try:
            try:
                sock, _ = self.listener.accept()
            finally:
                self.listener.close()
            with sock:
                sock.settimeout(self.limit)
                self.script(sock)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            self.done.set()


def recv_exactly(sock: socket.socket, n: int, limit: float = 10.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + limit
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"got {len(buf)} of {n} bytes")
        sock.settimeout(remaining)
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


class ServerSide:
    """The server's end of a fake-server connection, after a real ``ServerHandshake``."""

    def __init__(self, sock: socket.socket, token: bytes) -> None:
        self.sock = sock
        hs = ServerHandshake(token)
        deadline = time.monotonic() + 10
        for _ in range(1000):
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
            if hs.done:
                break
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            hs.receive_data(sock.recv(4096))
        receive_key, send_key = hs.session_keys()
        self.conn = p.Connection("server", name="fake-server", pid=os.getpid(), slots=1)
        self.conn.sealer = Sealer(send_key, receive_key)
        if hs.leftover():
            self.conn.receive_data(hs.leftover())

    def send(self, msg: p.Message) -> None:
        self.sock.sendall(b"".join(bytes(c) for c in self.conn.send(msg)))

    def send_hello(self) -> None:
        self.sock.sendall(b"".join(bytes(c) for c in self.conn.hello()))

    def send_sealed_body(self, body: bytes) -> None:
        assert self.conn.sealer is not None
        mac = self.conn.sealer.seal([body])
        self.sock.sendall(HEADER.pack(len(body) + MAC_SIZE) + body + mac)

    def recv(self, limit: float = 10.0) -> p.Message | p.Sentinel:
        deadline = time.monotonic() + limit
        for _ in range(100_000):
            msg = self.conn.next_event()
            if msg is not p.NEED_DATA:
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the client sent nothing in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            self.conn.receive_data(data)
        raise TimeoutError("too many reads")

    def recv_call(self, limit: float = 10.0) -> p.Call:
        deadline = time.monotonic() + limit
        for _ in range(1000):
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, p.Call):
                return msg
            if msg is p.CLOSED:
                raise ConnectionError("the client closed before calling")
        raise TimeoutError("no Call")


# --------------------------------------------------------------------------- #
# A recording proxy
# --------------------------------------------------------------------------- #


class RecordingProxy(OneShotListener):
    """Forwards one connection to ``127.0.0.1:upstream_port`` and records the bytes the
    client sent (``client_bytes``) and the bytes the server sent (``server_bytes``)."""

    thread_name = "recording-proxy"

    def __init__(self, upstream_port: int, *, limit: float = 20.0) -> None:
        self.upstream_port = upstream_port
        self.client_bytes = bytearray()
        self.server_bytes = bytearray()
        super().__init__(limit)

    def _run(self) -> None:
        try:
            try:
                client, _ = self.listener.accept()
            finally:
                self.listener.close()
            self._forward(client)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def _forward(self, client: socket.socket) -> None:
        """Relay ``client`` to the upstream server until either side closes."""
        with client, socket.create_connection((HOST, self.upstream_port), 5) as upstream:
            self._pump(client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        client.setblocking(False)
        upstream.setblocking(False)
        peers = {client: (upstream, self.client_bytes), upstream: (client, self.server_bytes)}
        deadline = time.monotonic() + self.limit
        for _ in range(1_000_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select(list(peers), [], [], min(remaining, 0.5))
            for sock in readable:
                other, record = peers[sock]
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    return  # either side closing ends the session
                record += data
                other.setblocking(True)
                other.settimeout(5)
                other.sendall(data)
                other.setblocking(False)


class SheddingProxy(RecordingProxy):
    """Closes the first ``shed`` connections at once, unread, as a server shedding
    silent connections under a flood does; then forwards the next one to
    ``127.0.0.1:upstream_port`` (unless ``forward`` is false: then it is done)."""

    thread_name = "shedding-proxy"

    def __init__(
        self, upstream_port: int, shed: int, *, forward: bool = True, limit: float = 20.0
    ) -> None:
        self.shed = shed
        self.forward = forward
        self.accepted = 0
        super().__init__(upstream_port, limit=limit)
        self.listener.listen(8)

    def _run(self) -> None:
        try:
            try:
                while True:
                    client, _ = self.listener.accept()
                    self.accepted += 1
                    if self.accepted > self.shed:
                        break
                    client.close()
                    if self.accepted == self.shed and not self.forward:
                        return
            finally:
                self.listener.close()
            self._forward(client)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc


# --------------------------------------------------------------------------- #
# A throw-away PKI
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PKI:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_pki(directory: Path) -> PKI:
    """A CA, a server certificate for IP 127.0.0.1 and a client certificate, all signed
    by the CA. Uses ``cryptography`` when installed, else the ``openssl`` command."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            import pytest

            pytest.skip("neither the cryptography package nor the openssl command is available")
        return _pki_openssl(directory)
    return _pki_cryptography(directory)


def _pki_paths(directory: Path) -> PKI:
    return PKI(
        ca=str(directory / "ca.pem"),
        server_cert=str(directory / "server.pem"),
        server_key=str(directory / "server.key"),
        client_cert=str(directory / "client.pem"),
        client_key=str(directory / "client.key"),
    )


def _pki_cryptography(directory: Path) -> PKI:  # pragma: no cover - when installed
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    paths = _pki_paths(directory)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: str) -> None:
        Path(path).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(path, 0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("offload test CA"))
        .issuer_name(name("offload test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    Path(paths.ca).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(cn: str, usage: Any, san: Any, cert_path: str, key_path: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, key_path)

    leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        paths.server_cert,
        paths.server_key,
    )
    leaf(
        "offload test client",
        ExtendedKeyUsageOID.CLIENT_AUTH,
        None,
        paths.client_cert,
        paths.client_key,
    )
    return paths


def _pki_openssl(directory: Path) -> PKI:
    paths = _pki_paths(directory)

    def run(*args: str) -> None:
        subprocess.run(
            ["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30
        )

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    run(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=offload test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    leaves = (
        ("server", "/CN=127.0.0.1", "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1"),
        ("client", "/CN=offload test client", "extendedKeyUsage=clientAuth"),
    )
    for stem, subject, extensions in leaves:
        ext = directory / f"{stem}.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
            f"{extensions}\n"
        )
        run("req", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", subject)
        run(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.pem", "-days", "1", "-extfile", ext.name,
        )  # fmt: skip
    for key in ("ca.key", "server.key", "client.key"):
        os.chmod(directory / key, 0o600)
    return paths


# --------------------------------------------------------------------------- #
# Small things
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def many_sockets() -> Iterator[list[socket.socket]]:
    """A list to put sockets in; every one is closed on exit."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def u64(n: int) -> bytes:
    return struct.pack("!Q", n)
