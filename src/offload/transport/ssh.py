"""``offload.SSH``: where and how to reach a machine with the system ``ssh`` client.

:class:`SSH` is a plain record (frozen, validated when made, picklable), given as
``where=offload.SSH(...)`` or in ``Pool(hosts=[...])``. What is done with it, starting a
worker server over ssh, is :mod:`offload.client.ssh`; this module only knows the record
and the ``ssh`` command line it stands for (:func:`ssh_argv`), so the option checks can
import it without importing the client.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# ssh options offload always sets. The user's ``ssh_options`` come first on the command
# line, and ssh keeps the first value it is given for an option, so theirs win.
_FIXED_OPTIONS = (
    "-T",  # no pty: the remote side's stdio are pipes (EOF on stdin is how it dies)
    "-x",  # no X11 forwarding
    "-o",
    "BatchMode=yes",  # never prompt: a refused key is an error, not a hang
    "-o",
    "ExitOnForwardFailure=yes",  # a forward that cannot be set up fails the start
    "-o",
    "ServerAliveInterval=15",  # a dead network ends ssh (and so the remote side)
    "-o",
    "ServerAliveCountMax=4",
)


def _bad(option: str, accepts: str, value: object) -> str:
    return f"SSH {option} must be {accepts}, got {type(value).__name__} {value!r}"


def _check_name(option: str, value: object, *, none: bool = False) -> str | None:
    """A host or user name: a non-empty str that cannot be read as an ssh option."""
    accepts = "a non-empty str" + (" or None" if none else "")
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise TypeError(_bad(option, accepts, value))
    if not value or value.startswith("-") or any(c.isspace() or c == "\0" for c in value):
        raise ValueError(_bad(option, accepts + " (no white space, not starting with '-')", value))
    return value


def _check_words(option: str, value: object, *, modules: bool) -> tuple[str, ...]:
    accepts = "an iterable of module names (str)" if modules else "an iterable of str"
    if isinstance(value, str) and modules:
        value = (value,)
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(_bad(option, accepts, value))
    words = tuple(value)
    for word in words:
        if not isinstance(word, str):
            raise TypeError(_bad(option, accepts, value))
        if not word or "\0" in word:
            raise ValueError(_bad(option, accepts + " (not empty, no NUL)", value))
        if modules and not all(part.isidentifier() for part in word.split(".")):
            raise ValueError(f"SSH ship: {word!r} is not a module name (like 'mypkg' or 'a.b')")
    return words


@dataclass(frozen=True)
class SSH:
    """A machine reached with the system ``ssh`` client, for ``where=`` and ``Pool(hosts=)``.

    offload starts a worker server there (``offload serve`` on a Unix socket, forwarded
    to this machine by ssh, authenticated with a fresh token sent over ssh's stdin). If
    that machine's ``python`` cannot import this very version of offload, offload's
    package is copied into a cache directory there (``~/.cache/offload``, or
    ``$XDG_CACHE_HOME/offload``), and so are the local packages named in ``ship``.
    Everything started there dies when the ssh connection ends.

    Args:
        host: the host name or address (as ``ssh`` takes it; a ``Host`` of your ssh
            configuration works).
        user: the login name (default: ssh's).
        port: the ssh port; None (the default) leaves it to ssh, so a ``Port`` of your
            ssh configuration applies (else 22).
        python: the interpreter to run there (a command name or a path); it must be the
            same Python major.minor as this one.
        identity: a private key file (``ssh -i``).
        ssh_options: more arguments for ``ssh``, e.g. ``("-o", "ProxyJump=bastion")``;
            they take precedence over offload's own ``-o`` options.
        ship: names of local modules or packages to copy there as well (a dotted name
            ships its top-level package), for code that travels by reference.

    Raises:
        TypeError: a field of the wrong type.
        ValueError: a field with a bad value (an empty host, a port out of range, a
            host or user that starts with ``-``).
    """

    host: str
    user: str | None = None
    port: int | None = None
    python: str = "python3"
    identity: str | None = None
    ssh_options: tuple[str, ...] = ()
    ship: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        _check_name("host", self.host)
        _check_name("user", self.user, none=True)
        if self.user is not None and "@" in self.user:
            raise ValueError(_bad("user", "a login name without '@'", self.user))
        port = self.port
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
            raise TypeError(_bad("port", "an int from 1 to 65535 or None", port))
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(_bad("port", "an int from 1 to 65535 or None", port))
        if not isinstance(self.python, str):
            raise TypeError(_bad("python", "a command name or path (str)", self.python))
        if not self.python.strip() or any(c in self.python for c in "\0\n"):
            raise ValueError(_bad("python", "a command name or path (str)", self.python))
        identity = self.identity
        if isinstance(identity, os.PathLike):
            identity = os.fspath(identity)
        if identity is not None and not isinstance(identity, str):
            raise TypeError(_bad("identity", "a path (str or os.PathLike) or None", identity))
        if identity is not None and (not identity or "\0" in identity):
            raise ValueError(_bad("identity", "a path (str or os.PathLike) or None", identity))
        put("identity", identity)
        put("ssh_options", _check_words("ssh_options", self.ssh_options, modules=False))
        put("ship", _check_words("ship", self.ship, modules=True))

    def __str__(self) -> str:
        """``ssh://user@host:port`` (the parts given), how workers there are named."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{user}{host}{port}"

    def __repr__(self) -> str:
        shown = [repr(self.host)]
        defaults = SSH.__dataclass_fields__
        for name in ("user", "port", "python", "identity", "ssh_options", "ship"):
            value = getattr(self, name)
            if value != defaults[name].default:
                shown.append(f"{name}={value!r}")
        return f"offload.SSH({', '.join(shown)})"


def ssh_argv(ssh: SSH, command: str, *, forward: tuple[str, str] | None = None) -> list[str]:
    """The ``ssh`` command line that runs ``command`` (a shell command line) on ``ssh``'s
    host, with a Unix socket forwarded from ``forward[0]`` here to ``forward[1]`` there."""
    argv = ["ssh", *ssh.ssh_options, *_FIXED_OPTIONS]
    if ssh.port is not None:  # else ssh's own: the Port of the user's ssh configuration
        argv += ["-p", str(ssh.port)]
    if ssh.user:
        argv += ["-l", ssh.user]
    if ssh.identity:
        argv += ["-i", ssh.identity]
    if forward is not None:
        argv += ["-L", f"{forward[0]}:{forward[1]}"]
    return [*argv, "--", ssh.host, command]


def remote_python_command(python: str, code: str) -> str:
    """The remote shell command line that runs ``code`` with ``python`` (exec'd: no
    shell stays between sshd and Python)."""
    import shlex

    return f"exec {shlex.quote(python)} -c {shlex.quote(code)}"
