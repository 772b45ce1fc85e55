"""Mutual authentication by shared token, and per-frame integrity after it (sans-IO).

Theory of operation
-------------------
Nothing is unpickled, on either side, before the peer has proved the token. The
handshake frames are fixed-layout bytes (no pickle, no length-prefixed free text), at most
:data:`MAX_PREAUTH_FRAME` bytes each::

    1. client -> server   CLIENT_HELLO  magic "OFLD" | version u16 | client nonce (32)
    2. server -> client   CHALLENGE     magic "OFLD" | version u16 | server nonce (32)
    3. client -> server   CLIENT_PROOF  HMAC-SHA256(token, "offload/v1/client-proof" | cn | sn)
    4. server: compares in constant time; on a wrong proof it closes without a word.
    5. server -> client   SERVER_PROOF  HMAC-SHA256(token, "offload/v1/server-proof" | cn | sn)
    6. client: compares in constant time; an impostor server (no token) fails here, before
       the client reads anything it would unpickle.

The server proves nothing before the client has: an unauthenticated prober only ever sees
a random nonce. Both nonces are fresh, so no proof can be replayed into another session.
The labels separate the two proofs (a reflected client proof is not a server proof).

Session keys (one per direction) are derived from the token and both nonces. Without TLS,
every later frame carries ``BLAKE2b-256(key=session key, sequence number | body)``
(:class:`Sealer`; keyed BLAKE2b is a MAC by design, RFC 7693, and costs a third of an
HMAC-SHA256 on a small frame), so injected, altered, reordered or replayed frames are
rejected; with TLS the record layer already does this and the MAC is skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from hashlib import blake2b

from offload.errors import AuthenticationError, ProtocolError

MAGIC = b"OFLD"
AUTH_VERSION = 2  # 2: frames sealed with keyed BLAKE2b
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_PREAUTH_FRAME = 4096
MIN_TOKEN_SIZE = 32

_HELLO = struct.Struct(f"!4sH{NONCE_SIZE}s")  # client hello and challenge share a layout
_CLIENT_PROOF_LABEL = b"offload/v1/client-proof"
_SERVER_PROOF_LABEL = b"offload/v1/server-proof"
_SESSION_LABEL = b"offload/v1/session"
_SEQ = struct.Struct("!Q")  # a frame's sequence number, as its MAC covers it


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def check_token(token: bytes) -> bytes:
    """Validate a shared token (at least 32 bytes).

    Raises:
        AuthenticationError: the token is too short to be a secret.
    """
    if not isinstance(token, bytes) or len(token) < MIN_TOKEN_SIZE:
        raise AuthenticationError(
            f"a token must be at least {MIN_TOKEN_SIZE} random bytes "
            f"(got {len(token) if isinstance(token, bytes) else type(token).__name__})"
        )
    return token


class _Handshake:
    """Shared machinery: an input buffer of fixed-size frames and an output buffer."""

    def __init__(self, token: bytes) -> None:
        self._token = check_token(token)
        self._in = bytearray()
        self._out = bytearray()
        self.done = False
        self.client_nonce = b""
        self.server_nonce = b""

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer (an empty chunk means it closed)."""
        if not data:
            if not self.done:
                raise AuthenticationError("the peer closed the connection during the handshake")
            return
        self._in += data
        if len(self._in) > MAX_PREAUTH_FRAME:
            raise ProtocolError("handshake frame larger than 4 KiB")
        self._advance()

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def leftover(self) -> bytes:
        """Bytes received after the handshake (the first protocol frames)."""
        return bytes(self._in)

    def _take(self, n: int) -> bytes | None:
        if len(self._in) < n:
            return None
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    def _advance(self) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def session_keys(self) -> tuple[bytes, bytes]:
        """(client-to-server key, server-to-client key) once the handshake is done."""
        assert self.done
        master = _mac(self._token, _SESSION_LABEL, self.client_nonce, self.server_nonce)
        return _mac(master, b"client->server"), _mac(master, b"server->client")


def _parse_hello(frame: bytes, who: str) -> bytes:
    magic, version, nonce = _HELLO.unpack(frame)
    if magic != MAGIC:
        raise ProtocolError(f"the {who} does not speak the offload protocol")
    if version != AUTH_VERSION:
        raise ProtocolError(
            f"the {who} speaks offload handshake version {version}; this side speaks "
            f"{AUTH_VERSION} (upgrade both sides to the same offload release)"
        )
    return bytes(nonce)


class ClientHandshake(_Handshake):
    """The client's side: proves the token first, then checks the server's proof."""

    def __init__(self, token: bytes) -> None:
        super().__init__(token)
        self.client_nonce = os.urandom(NONCE_SIZE)
        self._out += _HELLO.pack(MAGIC, AUTH_VERSION, self.client_nonce)
        self._state = "challenge"

    def _advance(self) -> None:
        if self._state == "challenge":
            frame = self._take(_HELLO.size)
            if frame is None:
                return
            self.server_nonce = _parse_hello(frame, "server")
            self._out += _mac(
                self._token, _CLIENT_PROOF_LABEL, self.client_nonce, self.server_nonce
            )
            self._state = "server-proof"
        if self._state == "server-proof":
            proof = self._take(MAC_SIZE)
            if proof is None:
                return
            expected = _mac(self._token, _SERVER_PROOF_LABEL, self.client_nonce, self.server_nonce)
            if not hmac.compare_digest(proof, expected):
                raise AuthenticationError(
                    "the server did not prove the token: it is not the server you meant "
                    "(or it has another token)"
                )
            self._state = "done"
            self.done = True


class ServerHandshake(_Handshake):
    """The server's side: reveals a nonce, checks the client's proof, then proves."""

    def __init__(self, token: bytes) -> None:
        super().__init__(token)
        self.server_nonce = os.urandom(NONCE_SIZE)
        self._state = "hello"

    def _advance(self) -> None:
        if self._state == "hello":
            frame = self._take(_HELLO.size)
            if frame is None:
                return
            self.client_nonce = _parse_hello(frame, "client")
            self._out += _HELLO.pack(MAGIC, AUTH_VERSION, self.server_nonce)
            self._state = "client-proof"
        if self._state == "client-proof":
            proof = self._take(MAC_SIZE)
            if proof is None:
                return
            expected = _mac(self._token, _CLIENT_PROOF_LABEL, self.client_nonce, self.server_nonce)
            if not hmac.compare_digest(proof, expected):
                raise AuthenticationError("the client did not prove the token")
            self._out += _mac(
                self._token, _SERVER_PROOF_LABEL, self.client_nonce, self.server_nonce
            )
            self._state = "done"
            self.done = True


class Sealer:
    """Per-frame MACs over an implicit sequence number, one direction each.

    Args:
        send_key: key for frames this side sends.
        receive_key: key for frames this side receives.
    """

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self._send_key = send_key
        self._receive_key = receive_key
        self._send_seq = 0
        self._receive_seq = 0

    def seal(self, body_chunks: list[bytes | bytearray | memoryview]) -> bytes:
        """The MAC to append to the frame made of ``body_chunks``."""
        mac = blake2b(_SEQ.pack(self._send_seq), key=self._send_key, digest_size=MAC_SIZE)
        for chunk in body_chunks:
            mac.update(chunk)
        self._send_seq += 1
        return mac.digest()

    def open(self, body: memoryview, mac: bytes) -> None:
        """Check a received frame.

        Raises:
            ProtocolError: the MAC does not match (altered, injected, replayed or
                reordered frame).
        """
        expected = blake2b(
            _SEQ.pack(self._receive_seq), key=self._receive_key, digest_size=MAC_SIZE
        )
        expected.update(body)
        if not hmac.compare_digest(expected.digest(), mac):
            raise ProtocolError(
                f"frame {self._receive_seq} failed its integrity check (altered, injected "
                "or replayed)"
            )
        self._receive_seq += 1
