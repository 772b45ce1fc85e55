"""Remote workers over loopback TCP: ``offload serve`` against local calls, Pyro5 and rpyc.

``offload serve --listen 127.0.0.1:0 --token-file F --workers 2`` runs as a subprocess
(a second one with ``--tls-cert/--tls-key`` for TLS); its address is read from the line
``offload: serving on HOST:PORT (pid N)`` it prints. The token file (32 random bytes as
hex text, mode 0600) and the self-signed certificate (made with ``cryptography``) live in
a temporary directory removed at the end; the servers are stopped with SIGTERM.

Two measurements: the round trip of ``abs(-1)`` through ``offload.connect`` (TCP and
TLS), against the same call to a local ``offload.spawn()`` worker and to Pyro5 and rpyc
servers on the same loopback (those run the call in the server process itself; offload's
server hands it to one of its worker processes: one more hop, so a third server with
``--isolation inline`` shows offload on the same footing, and a fourth with
``--busy-poll 0`` shows the server sleeping between messages instead of polling for a
moment after traffic, its default); and the throughput of
``offload.Pool(hosts=[address])`` over many tiny calls submitted at once.
"""

from __future__ import annotations

import datetime
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import ROOT, Skipped, require
from benchmarks.pool_throughput import Submitter, offload_submit, run_submit, submit_all
from benchmarks.report import Row
from benchmarks.roundtrip import Contender, measure

LOCAL = "offload local (spawn)"
CONNECT = "offload connect"
CONNECT_TLS = "offload connect (TLS)"
CONNECT_INLINE = "offload connect, --isolation inline"
CONNECT_NO_POLL = "offload connect, --busy-poll 0"
LOCAL_POOL = "offload Pool(workers=2), local"
HOSTS_POOL = "offload Pool(hosts=[server])"
HOSTS_POOL_TLS = "offload Pool(hosts=[server]), TLS"
IN_SERVER = "the call runs in the server process"

_SERVING = re.compile(r"serving on (\S+) \(pid (\d+)\)")
_READY = re.compile(r"READY (\S+)")
START_LIMIT = 30.0  # seconds a server has to print its address


class _Server:
    """A server subprocess that prints its address on the first line of its stdout."""

    def __init__(
        self, what: str, argv: list[str], pattern: re.Pattern[str], stderr_path: str
    ) -> None:
        self.what = what
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT
            )
        try:
            line = self._first_line(START_LIMIT)
            match = pattern.search(line)
            if match is None:
                raise RuntimeError(f"{what} printed {line.strip()[:80]!r}, not its address")
        except BaseException:
            self.stop(kill=True)
            raise
        self.address = match.group(1)

    def _first_line(self, limit: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.perf_counter() + limit
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(f"{self.what} printed no address within {limit:g} s")
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(self._why_it_ended())
                buf += chunk
        return buf.decode(errors="replace")

    def _why_it_ended(self) -> str:
        try:
            status = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        try:
            with open(self.stderr_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        last = lines[-1][:120] if lines else "no message"
        return f"{self.what} exited (status {status}) before serving: {last}"

    def stop(self, kill: bool = False) -> int | None:
        """SIGTERM (or SIGKILL), then close stdin (RPC servers exit at EOF) and wait;
        kill if it lingers. Returns the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def _offload_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "offload")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "offload.cli"]


def serve_command(token_path: str, workers: int) -> list[str]:
    """The command line of an ``offload serve`` on a free loopback port, with the token
    file ``token_path`` and ``workers`` worker processes; more options go after it."""
    return [
        *_offload_command(),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        token_path,
        "--workers",
        str(workers),
    ]


def _token_file(tmp: str) -> tuple[str, str]:
    """A token file as ``offload serve`` wants it: 32 random bytes as hex text, 0600."""
    token = os.urandom(32).hex()
    path = os.path.join(tmp, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path, token


def _certificate(tmp: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (and localhost) and its key (0600)."""
    require("cryptography")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offload benchmark")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(tmp, "cert.pem")
    key_path = os.path.join(tmp, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _needs(server: _Server | BaseException) -> _Server:
    """The server, or the reason it could not start (raised: the row reports it)."""
    if isinstance(server, BaseException):
        raise server
    return server


# -- contenders ------------------------------------------------------------------------


def _local() -> Contender:
    import offload

    w = offload.spawn()
    return Contender(LOCAL, lambda: w.call(abs, -1), lambda: w.shutdown(timeout=5))


def _connect(server: _Server | BaseException, token: str, tls: Any) -> Callable[[], Contender]:
    def make() -> Contender:
        import offload

        w = offload.connect(_needs(server).address, token=token, tls=tls)
        return Contender(CONNECT, lambda: w.call(abs, -1), lambda: w.shutdown(timeout=5))

    return make


def _pyro5(server: _Server | BaseException) -> Callable[[], Contender]:
    def make() -> Contender:
        api: Any = require("Pyro5.api")
        proxy = api.Proxy(_needs(server).address)
        proxy._pyroBind()
        call = proxy.abs
        return Contender("Pyro5", lambda: call(-1), proxy._pyroRelease)

    return make


def _rpyc(server: _Server | BaseException) -> Callable[[], Contender]:
    def make() -> Contender:
        rpyc: Any = require("rpyc")
        host, port = _needs(server).address.rsplit(":", 1)
        conn = rpyc.connect(host, int(port))
        call = conn.root.abs  # one remote lookup; then one round trip per call
        return Contender("rpyc", lambda: call(-1), conn.close)

    return make


def _hosts_pool(server: _Server | BaseException, token: str, tls: Any) -> Callable[[], Submitter]:
    def make() -> Submitter:
        import offload

        pool = offload.Pool(hosts=[_needs(server).address], token=token, tls=tls)
        return Submitter(
            HOSTS_POOL, submit_all(pool), lambda: pool.shutdown(timeout=5), "server: 2 workers"
        )

    return make


# -- the section ---------------------------------------------------------------------------


def _start(
    servers: list[_Server], what: str, argv: list[str], pattern: re.Pattern[str], tmp: str
) -> _Server | BaseException:
    stderr_path = os.path.join(tmp, f"{what.replace(' ', '-')}.stderr")
    try:
        server = _Server(what, argv, pattern, stderr_path)
    except Exception as exc:  # noqa: BLE001 - reported in the rows that need it
        return exc
    servers.append(server)
    return server


def run(
    calls: int, warmup: int, rounds: int, *, pool_calls: int, reps: int, limit: float
) -> tuple[list[Row], list[Row], list[str]]:
    """(round-trip rows, pool throughput rows, notes)."""
    notes: list[str] = []
    servers: list[_Server] = []
    with tempfile.TemporaryDirectory(prefix="offload-bench-remote-") as tmp:
        try:
            token_path, token = _token_file(tmp)
            serve = serve_command(token_path, 2)
            tcp = _start(servers, "offload serve", serve, _SERVING, tmp)
            inline = _start(
                servers, "offload serve (inline)", [*serve, "--isolation", "inline"], _SERVING, tmp
            )
            no_poll = _start(
                servers, "offload serve (no busy poll)", [*serve, "--busy-poll", "0"], _SERVING, tmp
            )
            tls: Any = None
            tls_server: _Server | BaseException
            try:
                cert, key = _certificate(tmp)
            except Skipped as exc:
                tls_server = exc
            else:
                import offload

                tls = offload.TLS(ca=cert)
                argv = [*serve, "--tls-cert", cert, "--tls-key", key]
                tls_server = _start(servers, "offload serve (TLS)", argv, _SERVING, tmp)
            rpc: dict[str, _Server | BaseException] = {}
            for module, what in (("Pyro5", "pyro5"), ("rpyc", "rpyc")):
                try:
                    require(module)
                except Skipped as exc:
                    rpc[what] = exc
                    continue
                argv = [sys.executable, "-m", "benchmarks.rpc_servers", what]
                rpc[what] = _start(servers, f"{module} server", argv, _READY, tmp)

            round_trip = measure(
                [
                    (LOCAL, _local),
                    (CONNECT, _connect(tcp, token, None)),
                    (CONNECT_TLS, _connect(tls_server, token, tls)),
                    (CONNECT_INLINE, _connect(inline, token, None)),
                    (CONNECT_NO_POLL, _connect(no_poll, token, None)),
                    ("Pyro5", _pyro5(rpc["pyro5"])),
                    ("rpyc", _rpyc(rpc["rpyc"])),
                ],
                calls,
                warmup,
                rounds,
            )
            for row in round_trip:
                if row.system in ("Pyro5", "rpyc", CONNECT_INLINE) and row.samples:
                    row.note = IN_SERVER
                if row.system == CONNECT_NO_POLL and row.samples:
                    row.note = "the server sleeps between messages"
            throughput = run_submit(
                pool_calls,
                reps,
                limit,
                [
                    (LOCAL_POOL, offload_submit("spawn")),
                    (HOSTS_POOL, _hosts_pool(tcp, token, None)),
                    (HOSTS_POOL_TLS, _hosts_pool(tls_server, token, tls)),
                ],
            )
        finally:
            for server in servers:
                status = server.stop()
                if status != 0 and server.what.startswith("offload"):
                    notes.append(f"{server.what} exited with status {status} after SIGTERM")
    return round_trip, throughput, notes
