"""Where the shared secret of remote workers comes from, on both sides.

A client and an ``offload serve`` server prove to each other that they hold the same
token (:mod:`offload.protocol.auth`). Both read it by the one rule of
:func:`~offload.protocol.auth.check_token`: a text token without the white space around
it (so ``open(path, "rb").read()`` of a token file works as is, final newline and all),
a binary token byte for byte, and never shorter than 32 bytes.

* A client (:func:`resolve_token`): the ``token`` argument, else ``OFFLOAD_TOKEN``, else
  the file named by ``OFFLOAD_TOKEN_FILE``.
* A server (:func:`server_token`): ``--token-file``, else ``OFFLOAD_TOKEN``; on a
  loopback address with neither, a fresh random token in a private file whose path is
  printed, removed when the process exits (:func:`remove_generated_tokens`).
* A token file (:func:`read_token_file`) must be private to its owner, as ``ssh``
  requires of a private key.
* Other files that hold secrets (crash dumps, saved actor handles, which carry a token)
  are written private and whole by :func:`write_private_file`.

This module imports nothing of offload's but :mod:`offload.errors` and
:mod:`offload.protocol.auth`, so the client, the server, the CLI and ``offload.program``
can all use it without importing each other.
"""

from __future__ import annotations

import os

from offload.errors import AuthenticationError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Protocol

    class ListenAddress(Protocol):
        """What :func:`server_token` needs of an address
        (:class:`offload.transport.net.Address` has it)."""

        def is_loopback(self) -> bool: ...


TOKEN_ENV = "OFFLOAD_TOKEN"
TOKEN_FILE_ENV = "OFFLOAD_TOKEN_FILE"


def resolve_token(token: bytes | str | None) -> bytes:
    """The token a client uses: the argument, else ``OFFLOAD_TOKEN``, else the file
    named by ``OFFLOAD_TOKEN_FILE``, read by the one rule both sides apply
    (:func:`~offload.protocol.auth.check_token`): a text token without the white space
    around it (``open(path, "rb").read()`` of a token file works as is, newline and
    all), a binary token byte for byte.

    Raises:
        AuthenticationError: no token anywhere, one shorter than 32 bytes, or a token
            file that others may read or write.
    """
    from offload.protocol.auth import check_token

    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if token is None and os.environ.get(TOKEN_FILE_ENV):
        token = read_token_file(os.environ[TOKEN_FILE_ENV])
    if token is None:
        raise AuthenticationError(
            "no token: pass token=..., or set OFFLOAD_TOKEN or OFFLOAD_TOKEN_FILE"
        )
    return check_token(token)


def read_token_file(path: str) -> bytes:
    """Read a token file (by the rule of :func:`resolve_token`).

    The file must be private to its owner: whoever can read the token can run any code
    on the server, and whoever can write it can make a client trust an impostor server
    (which then feeds it pickles). Like ``ssh`` with a private key, a token file that
    its group or others may read or write is refused.

    Raises:
        AuthenticationError: the file is readable or writable by its group or others,
            or holds a token shorter than 32 bytes.
        OSError: the file cannot be read.
    """
    import stat

    from offload.protocol.auth import check_token

    with open(path, "rb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise AuthenticationError(
                f"the token file {path} is open to others (mode {mode:04o}): whoever can "
                "read the token can run any code on the server. Make it private: "
                f"chmod 600 {path}"
            )
        data = f.read()
    try:
        return check_token(data)
    except AuthenticationError as exc:
        raise AuthenticationError(f"the token file {path}: {exc}") from None


def server_token(address: ListenAddress, token_file: str | None) -> bytes:
    """The token a server uses: ``token_file``, else ``OFFLOAD_TOKEN``; on a loopback
    address with neither, a new random token written to a fresh 0600 file (in a fresh
    0700 directory) whose path is printed on stderr. That directory is removed when the
    process exits (:func:`remove_generated_tokens`, which an ``atexit`` hook and
    ``offload serve``'s shutdown call).

    Tokens are read by the one rule of :func:`offload.protocol.auth.check_token`, the
    client's too: a text token without its surrounding white space (the file's final
    newline), a binary one byte for byte.

    Args:
        address: where the server will listen (an
            :class:`~offload.transport.net.Address`).
        token_file: the path given with ``--token-file``, or None.

    Raises:
        ValueError: a non-loopback address and no token (the token is a shell on this
            machine; listening without one would hand that out to the network).
        AuthenticationError: a token shorter than 32 bytes, or a token file that others
            may read or write.
        OSError: the token file cannot be read, or the new one cannot be written.
    """
    from offload.protocol.auth import check_token

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
    path = write_new_private_file(os.path.join(directory, "token"), token + b"\n")
    print(
        f"offload: no token given; wrote a new one to {path} (removed when this server exits)",
        file=sys.stderr,
        flush=True,
    )
    return token


def write_new_private_file(path: str, data: bytes) -> str:
    """Create ``path``, which must not exist yet, with mode 0600 (only its owner may
    read it) and write ``data`` to it; return ``path``. For files in a directory of
    our own making (``tempfile.mkdtemp``): nobody else can have put one there.

    Raises:
        OSError: the file exists already, or cannot be written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def write_private_file(path: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``path``, in order, with mode 0600, atomically: to a fresh
    hidden file in the same directory, renamed over ``path`` once whole (a reader never
    sees part of it), and removed on any failure.

    Raises:
        OSError: the file cannot be written or renamed.
    """
    import tempfile

    directory, name = os.path.split(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


# Directories of the tokens server_token() made, removed at exit: a token left behind
# in /tmp would open a later server on the same port to whoever can still read it.
_generated_token_dirs: list[str] = []


def remove_generated_tokens() -> None:
    """Remove the token files (and their directories) that :func:`server_token` made in
    this process. Idempotent; never raises."""
    import shutil

    while _generated_token_dirs:
        shutil.rmtree(_generated_token_dirs.pop(), ignore_errors=True)
