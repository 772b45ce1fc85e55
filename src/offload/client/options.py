"""Worker options (SPEC section 4) and the arguments of the public constructors,
validated in one place when the object is made.

Every option of ``spawn``, ``Pool``, ``connect``, ``delegate``/``init`` and ``serve`` is
checked here, before any process, thread or socket exists, so a bad value fails at once
with an error that names the option and what it accepts instead of failing later inside
the I/O thread.

Rules, the same for every option:

* ``TypeError`` for a value of the wrong type: ``name=123``, ``concurrency=2.5`` (a float
  where an int is needed), ``workers="2"``. ``bool`` never passes as an int or a number.
* ``ValueError`` for a value of the right type that is out of range or malformed:
  ``concurrency=0``, ``start_timeout=nan``, ``umask=-1``, ``env={"": "x"}``,
  ``where="host:notaport"``.

The state of the file system (whether ``cwd``, ``python`` or a ``stdout`` file's directory
exist) is not checked here: it is checked each time a worker process starts, and a worker
that cannot start is a :class:`~offload.StartError` (which ``spawn`` raises at once).
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import sys
from collections.abc import Callable, Iterable, Mapping

from offload._lazy import instance_of
from offload._record import field, fields, record, replace  # not dataclasses: see there
from offload.worker.settings import WorkerSettings

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any, ClassVar, TypeVar

    # Imported where used: a program with only local workers never needs them (net
    # imports ssl).
    from offload.transport.net import Address
    from offload.transport.ssh import SSH

START_METHODS = ("spawn", "forkserver", "fork", "reexec", "attach")
STDIO_MODES = ("inherit", "devnull", "prefix")
SHUTDOWN_ON = ("parent_exit", "heartbeat_timeout", "explicit")
ISOLATIONS = ("pool", "process", "inline")
MIN_MESSAGE_SIZE = 1024

_names = itertools.count(1)


def next_worker_name() -> str:
    """``offload-worker-N``, N counting up in this process."""
    return f"offload-worker-{next(_names)}"


# -- checks for one value ------------------------------------------------------------------


def _got(value: object) -> str:
    """``int 123``: a value's type and (shortened) repr, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def check_int(
    option: str,
    value: object,
    *,
    minimum: int,
    maximum: int | None = None,
    none: bool = False,
    accepts: str | None = None,
) -> int | None:
    """``value`` as an int in ``[minimum, maximum]`` (or None when ``none``).

    Anything with ``__index__`` (e.g. NumPy integers) is an int; ``bool`` and ``float``
    are not.

    Raises:
        TypeError: not an int (or None when allowed).
        ValueError: out of range.
    """
    if accepts is None:
        accepts = (
            f"an int >= {minimum}" if maximum is None else (f"an int from {minimum} to {maximum}")
        )
        if none:
            accepts += " or None"
    if value is None and none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}") from None
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(f"{option} must be {accepts}, got {number!r}")
    return number


def check_seconds(
    option: str, value: object, *, zero: bool = False, none: bool = False
) -> float | None:
    """``value`` as a finite number of seconds, > 0 (>= 0 with ``zero``), or None when
    ``none``.

    Raises:
        TypeError: not a real number (``bool`` is not one).
        ValueError: NaN, infinite, or not positive.
    """
    accepts = f"a finite number of seconds {'>= 0' if zero else '> 0'}"
    if none:
        accepts += " or None"
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        import numbers  # only for other real numbers (Fraction, NumPy's), not at start-up

        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise ValueError(f"{option} must be {accepts}, got {value!r}")
    return number


def check_str(option: str, value: object, *, accepts: str = "a non-empty str") -> str:
    """``value`` as a non-empty str without NUL characters.

    Raises:
        TypeError: not a str.
        ValueError: empty, or contains NUL.
    """
    if not isinstance(value, str):
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    if not value or "\0" in value:
        raise ValueError(f"{option} must be {accepts} (not empty, no NUL), got {value!r}")
    return value


def check_path(option: str, value: object, *, none: bool = False) -> str | None:
    """``value`` (a str or ``os.PathLike``) as a str path; not empty, no NUL.

    Raises:
        TypeError: neither a str nor a PathLike (nor None when allowed).
        ValueError: empty, or contains NUL.
    """
    accepts = "a path (str or os.PathLike)" + (" or None" if none else "")
    if value is None and none:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):  # also bytes paths: offload passes paths as text
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    return check_str(option, value, accepts=accepts)


def check_choice(option: str, value: object, choices: Iterable[str]) -> str:
    """``value``, one of ``choices``.

    Raises:
        TypeError: not a str.
        ValueError: not one of ``choices``.
    """
    names = tuple(choices)
    accepts = "one of " + ", ".join(repr(c) for c in names)
    if not isinstance(value, str):
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    if value not in names:
        raise ValueError(f"{option} must be {accepts}, got {value!r}")
    return value


def check_callable(option: str, value: object) -> None:
    """Raises ``TypeError`` unless ``value`` is callable or None."""
    if value is not None and not callable(value):
        raise TypeError(f"{option} must be a callable or None, got {_got(value)}")


def check_modules(option: str, value: object) -> tuple[str, ...]:
    """Module names (one str, or an iterable of them) as a tuple.

    Raises:
        TypeError: not a str or an iterable of str.
        ValueError: a name that is not a dotted Python module name.
    """
    accepts = "a module name or an iterable of module names (str)"
    if isinstance(value, str):
        value = (value,)
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    names = tuple(value)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{option} must be {accepts}; it holds {_got(name)}")
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{option}: {name!r} is not a module name (like 'numpy' or 'a.b')")
    return names


def check_address(option: str, value: object) -> Address:
    """A worker server's address, parsed.

    Raises:
        TypeError: not a str.
        ValueError: malformed (the message says why).
    """
    accepts = "a str address: 'host:port', '[v6]:port' or 'unix:PATH'"
    if not isinstance(value, str):
        raise TypeError(f"{option} must be {accepts}, got {_got(value)}")
    if not value.strip() or "\0" in value:
        raise ValueError(f"{option} must be {accepts}, got {value!r}")
    from offload.transport.net import parse_address

    try:
        return parse_address(value)
    except ValueError as exc:
        why = "the port is not a number" if "invalid literal" in str(exc) else str(exc)
        raise ValueError(f"{option} must be {accepts}, got {value!r} ({why})") from None


def check_token(option: str, value: object) -> None:
    """A token argument: bytes, str (its UTF-8 bytes) or None (from the environment).
    Its length is checked where it is used (``AuthenticationError``).

    Raises:
        TypeError: another type.
    """
    if value is not None and not isinstance(value, (bytes, str)):
        raise TypeError(f"{option} must be bytes, a str or None, got {type(value).__name__}")


def check_tls(option: str, value: object) -> None:
    """A ``tls`` argument: an :class:`offload.TLS` or None, its files given as paths.

    Raises:
        TypeError: not a TLS, or one of its fields has the wrong type.
        ValueError: a file name that is empty or contains NUL.
    """
    if value is None:
        return
    from offload.transport.net import TLS

    if not isinstance(value, TLS):
        raise TypeError(f"{option} must be an offload.TLS or None, got {_got(value)}")
    for name in ("ca", "cert", "key"):
        check_path(f"{option}.{name}", getattr(value, name), none=True)
    if value.server_hostname is not None:
        check_str(f"{option}.server_hostname", value.server_hostname)
    if value.key is not None and value.cert is None:
        raise ValueError(f"{option}: key= needs cert= (the certificate it belongs to)")


# -- worker options ------------------------------------------------------------------------


def _check_env(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    accepts = "a mapping of str to str (environment variables) or None"
    if not isinstance(value, Mapping):
        raise TypeError(f"env must be {accepts}, got {_got(value)}")
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"env must be {accepts}; got {key!r}: {item!r}")
        if not key or "=" in key or "\0" in key:
            raise ValueError(
                f"env: {key!r} is not a variable name (names are non-empty, without '=' or NUL)"
            )
        if "\0" in item:
            raise ValueError(f"env[{key!r}] contains a NUL character")
        env[key] = item
    return env


def _check_stdio(option: str, value: object) -> str:
    if isinstance(value, str) and value in STDIO_MODES:
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            f"{option} must be 'inherit', 'devnull', 'prefix' or a file path (str or "
            f"os.PathLike), got {_got(value)}"
        )
    path = check_path(option, value)
    assert path is not None
    return path


def _check_heartbeat(value: object) -> tuple[float, float] | None:
    if value is None:
        return None
    accepts = "None or (interval, timeout) in seconds, with 0 < interval < timeout"
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"heartbeat must be {accepts}, got {_got(value)}")
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"heartbeat must be {accepts}, got {value!r}")
    interval = check_seconds("heartbeat interval", pair[0])
    timeout = check_seconds("heartbeat timeout", pair[1])
    assert interval is not None and timeout is not None
    if not interval < timeout:
        raise ValueError(f"heartbeat must be {accepts}, got {value!r}")
    return interval, timeout


def _check_start_method(value: object) -> str:
    method = check_choice("start_method", value, START_METHODS)
    if method in ("fork", "forkserver") and (not hasattr(os, "fork") or sys.platform == "win32"):
        raise ValueError(
            f"start_method={method!r} needs os.fork(), which {sys.platform} does not have; "
            "use 'spawn' or 'reexec'"
        )
    return method


def _check_where(value: object) -> str | SSH | None:
    if value is None:
        return None
    if instance_of(value, "offload.transport.ssh", "SSH"):
        from offload.transport.ssh import SSH  # loaded already: value is one

        assert isinstance(value, SSH)
        return value  # an SSH record checked itself when made
    if not isinstance(value, str):
        raise TypeError(
            f"where must be None (a local worker), a worker server's address as a str "
            f"('host:port', '[v6]:port' or 'unix:PATH') or an offload.SSH(...), "
            f"got {_got(value)}"
        )
    check_address("where", value)
    return value


@record(frozen=True)
class WorkerOptions:
    """Every option a worker takes; see :func:`offload.spawn`.

    Validated (and normalised: PathLike to str, lists to tuples, ``env`` copied) when
    made; see the module documentation for the rules.

    ``start_method``: ``"spawn"`` (a fresh interpreter), ``"forkserver"`` (forked from a
    preloaded, single-threaded template), ``"fork"`` (forks the caller) or ``"reexec"``
    (re-runs the program, which calls :func:`offload.init` first). ``"fork"`` forks
    while offload's I/O thread runs, and any thread of the caller may hold a lock the
    child then never sees released; on Python 3.12 and later ``os.fork()`` says so with
    ``DeprecationWarning: This process (pid=N) is multi-threaded, use of fork() may
    lead to deadlocks in the child`` (hidden by Python's default filters outside
    ``__main__``; dropped silently where warnings are errors). Prefer ``"forkserver"``
    for the same fast starts without forking threads. ``"attach"`` starts nothing: it
    prints the command that starts a worker by hand (for debugging, see
    :mod:`offload.client.attach`) and waits ``start_timeout`` for it to connect.

    Raises:
        TypeError: an option of the wrong type (the message names it and what it accepts).
        ValueError: an option of the right type with a bad value.
    """

    name: str | None = None
    start_method: str = "spawn"
    python: str = field(default_factory=lambda: sys.executable)
    preload: tuple[str, ...] = ()
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    umask: int | None = None
    stdout: str = "inherit"
    stderr: str = "inherit"
    concurrency: int = 1
    max_tasks: int | None = None
    memory_limit: int | None = None
    start_timeout: float = 30.0
    heartbeat: tuple[float, float] | None = None
    max_message_size: int = 1 << 30
    on_failure: Callable[[BaseException], Any] | None = None
    shutdown_on: str = "parent_exit"
    where: Any = None
    # Whether the worker can be reached by address after its creator is gone (actors:
    # see ActorOptions), which shutdown_on="explicit" needs.
    reachable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        def put(option: str, value: object) -> None:
            object.__setattr__(self, option, value)

        if self.name is not None:
            check_str("name", self.name, accepts="a non-empty str or None")
        put("start_method", _check_start_method(self.start_method))
        put("python", check_path("python", self.python))
        put("preload", check_modules("preload", self.preload))
        check_callable("initializer", self.initializer)
        if not isinstance(self.initargs, (tuple, list)):
            raise TypeError(f"initargs must be a tuple or a list, got {_got(self.initargs)}")
        put("initargs", tuple(self.initargs))
        put("env", _check_env(self.env))
        put("cwd", check_path("cwd", self.cwd, none=True))
        put(
            "umask",
            check_int(
                "umask",
                self.umask,
                minimum=0,
                none=True,
                maximum=0o777,
                accepts="an int from 0 to 0o777 or None",
            ),
        )
        put("stdout", _check_stdio("stdout", self.stdout))
        put("stderr", _check_stdio("stderr", self.stderr))
        put("concurrency", check_int("concurrency", self.concurrency, minimum=1))
        put("max_tasks", check_int("max_tasks", self.max_tasks, minimum=1, none=True))
        put(
            "memory_limit",
            check_int(
                "memory_limit",
                self.memory_limit,
                minimum=1,
                none=True,
                accepts="an int > 0 (bytes) or None",
            ),
        )
        put("start_timeout", check_seconds("start_timeout", self.start_timeout))
        put("heartbeat", _check_heartbeat(self.heartbeat))
        put(
            "max_message_size",
            check_int("max_message_size", self.max_message_size, minimum=MIN_MESSAGE_SIZE),
        )
        check_callable("on_failure", self.on_failure)
        shutdown_on = check_choice("shutdown_on", self.shutdown_on, SHUTDOWN_ON)
        if shutdown_on == "explicit" and not self.reachable:
            raise ValueError(
                "shutdown_on='explicit' is for actors: a worker that outlives its creator "
                "must be reachable by address, which an actor is (SPEC section 8); write "
                "MyActor.options(shutdown_on='explicit', handle_file=...).spawn(...), or "
                "use 'parent_exit' or 'heartbeat_timeout'"
            )
        if shutdown_on == "heartbeat_timeout" and self.heartbeat is None:
            raise ValueError("shutdown_on='heartbeat_timeout' needs heartbeat=(interval, timeout)")
        put("where", _check_where(self.where))

    def with_name(self, name: str | None) -> WorkerOptions:
        """A copy with ``name`` set (or a fresh default name)."""
        return replace(self, name=name or next_worker_name())


@record(frozen=True)
class ActorOptions(WorkerOptions):
    """The options of an actor (SPEC section 8): the worker options, plus where it
    listens for the other holders of its handle and where its handle is written.

    An actor's state lives in its one process, so the options that replace a worker's
    process on purpose (``max_tasks``, ``memory_limit``) are refused, and so is a worker
    server as ``where``: its calls run in processes of the server's choosing.
    ``shutdown_on="explicit"`` is allowed: an actor is reachable by address. An
    ``offload.SSH`` as ``where`` runs the actor on that machine, for as long as its ssh
    connection lasts: ``shutdown_on="explicit"`` and ``listen`` are refused with it.

    Raises:
        TypeError: an option of the wrong type.
        ValueError: an option with a bad value, or one that an actor cannot have.
    """

    listen: str = "127.0.0.1:0"
    handle_file: str | None = None
    reachable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        state_lost = "an actor's state lives in its one process, which is never replaced"
        if self.max_tasks is not None:
            raise ValueError(f"max_tasks does not apply to an actor: {state_lost}")
        if self.memory_limit is not None:
            raise ValueError(f"memory_limit does not apply to an actor: {state_lost}")
        if isinstance(self.where, str):
            raise ValueError(
                f"an actor cannot run on the worker server {self.where!r} (a server runs "
                "each call in a process of its choosing); start it locally (where=None)"
            )
        if instance_of(self.where, "offload.transport.ssh", "SSH"):
            if self.shutdown_on == "explicit":
                raise ValueError(
                    "shutdown_on='explicit' cannot apply to an actor over ssh: its process "
                    "ends with the ssh connection that started it (the remote side is "
                    "killed when that connection closes, so nothing is left behind), and "
                    "that connection ends with its creator. For an actor that outlives "
                    "its creator there, run a program on that machine that calls "
                    "MyActor.serve(listen=...) or spawns it with shutdown_on='explicit'"
                )
            if self.listen != "127.0.0.1:0":
                raise ValueError(
                    f"listen={self.listen!r} does not apply to an actor over ssh: it "
                    "listens on a Unix socket that ssh forwards to this machine (its "
                    "address), so its handle works for processes on this machine"
                )
        check_address("listen", self.listen)
        object.__setattr__(
            self, "handle_file", check_path("handle_file", self.handle_file, none=True)
        )


def make_actor_options(**kwargs: Any) -> ActorOptions:
    """Build :class:`ActorOptions` from keyword arguments.

    Raises:
        TypeError: an unknown option, or an option of the wrong type.
        ValueError: an option with a bad value, or one an actor cannot have.
    """
    return _build(ActorOptions, "actor", kwargs)


def make_options(**kwargs: Any) -> WorkerOptions:
    """Build :class:`WorkerOptions` from keyword arguments.

    Raises:
        TypeError: an unknown option, or an option of the wrong type.
        ValueError: an option with a bad value.
    """
    return _build(WorkerOptions, "worker", kwargs)


if TYPE_CHECKING:
    _Options = TypeVar("_Options", bound=WorkerOptions)


def _build(cls: type[_Options], kind: str, kwargs: Mapping[str, Any]) -> _Options:
    """``cls(**kwargs)``, with a TypeError that names the ``kind`` of option (``"worker"``,
    ``"actor"``) and lists them all for a name that is not one of them."""
    unknown = set(kwargs) - set(fields(cls))
    if unknown:
        raise TypeError(
            f"unknown {kind} option(s): {', '.join(sorted(unknown))} (the options are: "
            f"{', '.join(fields(cls))})"
        )
    return cls(**kwargs)


# -- the constructors' own arguments -------------------------------------------------------


def check_pool_args(
    workers: object,
    hosts: object,
    token: object,
    tls: object,
    where: object = None,
    *,
    workers_per_host: object = None,
) -> tuple[int, list[str | SSH]]:
    """Validate ``Pool(workers, hosts=..., token=..., tls=..., workers_per_host=...)``;
    return (local workers, hosts: addresses and SSH records). ``workers=None`` is the
    CPU count, or 0 when hosts are given. ``where`` (the pool's ``where=`` worker
    option) must be None: a pool's servers are its ``hosts``.

    Raises:
        TypeError, ValueError: as for the worker options.
    """
    if hosts is None:
        host_list: list[str | SSH] = []
    else:
        accepts = (
            "an iterable of worker server addresses ('host:port' str) and offload.SSH(...) "
            "records, or None"
        )
        if isinstance(hosts, (str, bytes, Mapping)) or not isinstance(hosts, Iterable):
            raise TypeError(f"hosts must be {accepts}, got {_got(hosts)}")
        host_list = list(hosts)
        for i, host in enumerate(host_list):
            if instance_of(host, "offload.transport.ssh", "SSH"):
                continue
            if not isinstance(host, str):
                raise TypeError(
                    f"hosts[{i}] must be a worker server address ('host:port' str) or an "
                    f"offload.SSH(...), got {_got(host)}"
                )
            check_address(f"hosts[{i}]", host)
    check_int("workers_per_host", workers_per_host, minimum=1, none=True)
    if workers_per_host is not None and not any(
        instance_of(h, "offload.transport.ssh", "SSH") for h in host_list
    ):
        raise ValueError(
            "workers_per_host applies to hosts started over ssh (offload.SSH(...)); a "
            "worker server given by address runs as many workers as it was started with"
        )
    count = check_int("workers", workers, minimum=0, none=True)
    if count is None:
        count = 0 if host_list else (os.cpu_count() or 1)
    if count + len(host_list) < 1:
        raise ValueError("a pool needs at least one worker or host (workers=0 and no hosts)")
    check_token("token", token)
    check_tls("tls", tls)
    if where is not None:
        raise ValueError(
            f"a Pool takes its worker servers as hosts=[...], not where={where!r}; "
            f"write Pool(hosts=[{where!r}])"
        )
    return count, host_list


def check_connect_args(address: object, token: object, tls: object) -> None:
    """Validate ``connect(address, token=..., tls=...)``.

    Raises:
        TypeError, ValueError: as for the worker options.
    """
    check_address("address", address)
    check_token("token", token)
    check_tls("tls", tls)


def check_server_args(
    *,
    listen: object,
    token: object = ...,
    tls: object = None,
    workers: object = None,
    preload: object = (),
    isolation: object = "pool",
    max_connections: object = 64,
    max_unauthenticated: object = 128,
    max_unauthenticated_per_source: object = 32,
    handshake_timeout: object = 10.0,
    disconnect_grace: object = 5.0,
    busy_poll: object = 0.0,
    worker_options: object = None,
    drain_timeout: object = 30.0,
) -> None:
    """Validate the settings of a worker server (``Server(...)`` and ``offload serve``).

    ``token`` left out (``...``) is not checked (``offload serve`` finds it later).

    Raises:
        TypeError, ValueError: as for the worker options (``token=None`` is a
            ValueError: a server needs one).
    """
    check_address("listen", listen)
    if token is None:
        raise ValueError("a worker server needs a token")
    if token is not ... and not isinstance(token, bytes):
        raise TypeError(f"token must be bytes, got {type(token).__name__}")
    check_tls("tls", tls)
    from offload.transport.net import TLS  # a server imports it anyway

    if isinstance(tls, TLS) and tls.cert is None:
        raise ValueError("tls: a TLS server needs cert= (and key=)")
    check_int("workers", workers, minimum=1, none=True)
    check_modules("preload", preload)
    check_choice("isolation", isolation, ISOLATIONS)
    check_int("max_connections", max_connections, minimum=1)
    check_int("max_unauthenticated", max_unauthenticated, minimum=1)
    check_int("max_unauthenticated_per_source", max_unauthenticated_per_source, minimum=1)
    check_seconds("handshake_timeout", handshake_timeout)
    check_seconds("disconnect_grace", disconnect_grace, zero=True)
    check_seconds("busy_poll", busy_poll, zero=True)
    check_seconds("drain_timeout", drain_timeout, zero=True)
    if worker_options is not None:
        if not isinstance(worker_options, Mapping):
            raise TypeError(
                f"worker_options must be a mapping of worker options or None, got "
                f"{_got(worker_options)}"
            )
        make_options(**dict(worker_options))


def check_init_args(host: object, port: object, server: object, token_file: object) -> None:
    """Validate the keywords of ``offload.init(host=, port=, server=, token_file=)``.

    Raises:
        TypeError, ValueError: as for the worker options.
    """
    if host is not None:
        check_str("host", host, accepts="a host name or address (str) or None")
    check_int("port", port, minimum=0, maximum=65535, none=True)
    if server is not None and not isinstance(server, bool):
        raise TypeError(f"server must be a bool or None, got {_got(server)}")
    check_path("token_file", token_file, none=True)


def parse_port(option: str, text: str) -> int:
    """A port number given as text (a command-line option or environment variable).

    Raises:
        ValueError: not an int from 0 to 65535.
    """
    try:
        port = int(text)
    except ValueError:
        raise ValueError(f"{option} must be a port number (0 to 65535), got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{option} must be a port number (0 to 65535), got {text!r}")
    return port


def settings_for_worker(options: WorkerOptions) -> WorkerSettings:
    """The settings a worker process reads at start-up (the launch adds its socket,
    name, parent and ``sys.path``)."""
    return WorkerSettings(
        concurrency=options.concurrency,
        max_message_size=options.max_message_size,
        preload=tuple(options.preload),
        heartbeat=options.heartbeat,
        shutdown_on=options.shutdown_on,
    )


def env_for_worker(options: WorkerOptions) -> dict[str, str]:
    """Extra environment variables for the worker (extends the parent's; validated when
    the options were made)."""
    return dict(options.env or {})
