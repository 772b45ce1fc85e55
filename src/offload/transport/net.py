"""Network addresses, listening and connecting sockets, TLS, and the authenticated
handshake over a real socket.

Addresses: ``host:port`` (IPv4 or a DNS name), ``[v6addr]:port``, ``unix:/path``.
A Unix socket is created inside a directory of mode 0700, so only its owner can reach it;
the abstract namespace is never used (any process of the network namespace could).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass

from offload.errors import AuthenticationError, ProtocolError
from offload.protocol.auth import (
    ClientHandshake,
    Sealer,
    ServerHandshake,
)

DEFAULT_PORT = 1111


@dataclass(frozen=True)
class TLS:
    """TLS settings (stdlib ``ssl``, TLS 1.2 or later).

    On a client: ``ca`` verifies the server's certificate (and its name), ``cert``/``key``
    are the client certificate when the server asks for one. On a server: ``cert``/``key``
    are its certificate, and ``ca`` makes client certificates mandatory.

    Attributes:
        ca: CA bundle file.
        cert: certificate chain file.
        key: private key file.
        server_hostname: the name to check in the server certificate (client side;
            default: the host of the address).
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_hostname: str | None = None

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext for connecting."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for accepting."""
        if not self.cert:
            raise ValueError("a TLS server needs cert= (and key=)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class Address:
    """A parsed listen/connect address."""

    family: socket.AddressFamily
    host: str  # or the socket path for AF_UNIX
    port: int

    @property
    def is_unix(self) -> bool:
        return self.family == socket.AF_UNIX

    def is_loopback(self) -> bool:
        """Whether only this machine can reach the address."""
        if self.is_unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            try:
                infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            except OSError:
                return False
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.host}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse ``host:port``, ``[v6]:port``, ``host`` or ``unix:PATH``.

    Raises:
        ValueError: malformed address.
    """
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a path, e.g. unix:/run/offload/sock")
        return Address(socket.AF_UNIX, os.path.abspath(path), 0)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unterminated IPv6 address in {text!r}")
        host = text[1:end]
        rest = text[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") else default_port
        return Address(socket.AF_INET6, host, _port(port))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(default_port)
    if ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets: [{host}]:{port_text}")
    family = socket.AF_INET
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            family = socket.AF_INET6
    except ValueError:
        pass  # a DNS name: resolved when used
    return Address(family, host or "127.0.0.1", _port(int(port_text)))


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


LISTEN_BACKLOG = 1024


def listen(address: Address, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening socket for ``address`` (a Unix socket goes in a 0700 directory).

    The backlog is long (the kernel caps it at ``net.core.somaxconn``) because a full
    accept queue drops new connection attempts, and a dropped SYN costs a legitimate
    client a retransmission timeout (1 s, then 3 s, 7 s...): under a burst of connections
    the queue must absorb them until the server has accepted (and shed) them.
    """
    if address.is_unix:
        directory = os.path.dirname(address.host) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"{directory} is readable or writable by others (mode {mode:o}); a Unix "
                "socket for offload must live in a directory of mode 0700"
            )
        try:
            os.unlink(address.host)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.host)
        os.chmod(address.host, 0o600)
    else:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    sock.listen(backlog)
    return sock


def bound_address(sock: socket.socket, address: Address) -> Address:
    """The address a listening socket really has (port 0 becomes the chosen port)."""
    if address.is_unix:
        return address
    name = sock.getsockname()
    return Address(
        address.family if sock.family != socket.AF_INET6 else socket.AF_INET6,
        address.host,
        int(name[1]),
    )


def connect(address: Address, timeout: float) -> socket.socket:
    """A connected stream socket (TCP_NODELAY for TCP).

    Raises:
        OSError: unreachable, refused, or ``timeout`` passed.
    """
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.host)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _exchange(
    sock: socket.socket, handshake: ClientHandshake | ServerHandshake, deadline: float
) -> bytes:
    """Run a handshake to completion over a blocking socket; return leftover bytes."""
    while True:
        out = handshake.data_to_send()
        if out:
            sock.sendall(out)
        if handshake.done:
            return handshake.leftover()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AuthenticationError("the handshake did not finish in time")
        sock.settimeout(remaining)
        try:
            data = sock.recv(4096)
        except TimeoutError as exc:
            raise AuthenticationError("the handshake did not finish in time") from exc
        try:
            handshake.receive_data(data)
        except AuthenticationError:
            refusal = handshake.data_to_send()  # a server's answer to a wrong proof
            if refusal:
                try:
                    sock.sendall(refusal)
                except OSError:
                    pass
            raise


def client_handshake(
    sock: socket.socket,
    token: bytes,
    timeout: float,
    sealed: bool,
    peer: str = "the server",
) -> tuple[Sealer | None, bytes]:
    """Prove the token, check the server's proof; (sealer for later frames, leftover).

    ``peer`` names the server in error messages.

    Raises:
        AuthenticationError: the server refused the token, did not prove it, timed out
            or hung up.
        NoWorkerAvailable: the server took the token but refused the client (at its
            connection limit, or shutting down).
        ProtocolError: the bytes are not an offload handshake.
    """
    handshake = ClientHandshake(token, peer=peer)
    try:
        leftover = _exchange(sock, handshake, time.monotonic() + timeout)
    except (OSError, ssl.SSLError) as exc:
        # Reset before the server said anything: it closed the connection with our hello
        # unread, as a server shedding silent connections under a flood does.
        shed = isinstance(exc, ConnectionResetError | BrokenPipeError) and not handshake.progress
        raise AuthenticationError(
            f"{peer} closed or broke the handshake: {exc}", shed=shed
        ) from exc
    send_key, receive_key = handshake.session_keys()
    return (Sealer(send_key, receive_key) if sealed else None), leftover


def server_handshake(
    sock: socket.socket, token: bytes, timeout: float, sealed: bool
) -> tuple[Sealer | None, bytes]:
    """Check the client's proof, then prove; (sealer for later frames, leftover).

    Raises:
        AuthenticationError: wrong token, timeout, or the client hung up.
        ProtocolError: the bytes are not an offload handshake.
    """
    handshake = ServerHandshake(token)
    try:
        leftover = _exchange(sock, handshake, time.monotonic() + timeout)
    except (OSError, ssl.SSLError) as exc:
        raise AuthenticationError(f"the client broke the handshake: {exc}") from exc
    receive_key, send_key = handshake.session_keys()
    return (Sealer(send_key, receive_key) if sealed else None), leftover


__all__ = [
    "DEFAULT_PORT",
    "TLS",
    "Address",
    "ProtocolError",
    "bound_address",
    "client_handshake",
    "connect",
    "listen",
    "parse_address",
    "server_handshake",
]
