"""Every option of spawn, Pool, connect, init and serve is validated when the object is
made: ``TypeError`` for a wrong type (a float where an int is needed, a bool anywhere a
number is needed), ``ValueError`` for a wrong value, each naming the option.

Almost everything here runs no process: the constructors must fail before they make one.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import offload
from offload.client import options as o
from offload.client.options import WorkerOptions, make_options

TOKEN = b"t" * 32


class Index:
    """An int-like object that is not an int (like a NumPy integer)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def _named(exc: BaseException, option: str) -> None:
    assert re.search(rf"\b{re.escape(option)}\b", str(exc)), (option, str(exc))


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if a constructor gets as far as making an engine (threads,
    processes, connections)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an engine was made although an option was invalid")

    import offload.client.pool
    import offload.client.worker

    monkeypatch.setattr(offload.client.pool, "Engine", refuse)
    monkeypatch.setattr(offload.client.worker, "Engine", refuse)
    yield


# -- worker options ------------------------------------------------------------------------

BAD_TYPES: list[tuple[str, Any]] = [
    ("name", 123),
    ("name", b"bytes"),
    ("start_method", 1),
    ("python", None),
    ("python", 3),
    ("preload", 5),
    ("preload", [1]),
    ("preload", b"mod"),
    ("initializer", "not callable"),
    ("initargs", 5),
    ("initargs", "ab"),
    ("env", ["A=1"]),
    ("env", {"A": 1}),
    ("env", {1: "a"}),
    ("cwd", 1),
    ("cwd", b"/tmp"),
    ("umask", 0.5),
    ("umask", "022"),
    ("umask", True),
    ("stdout", 3),
    ("stderr", None),
    ("concurrency", 2.5),
    ("concurrency", 2.0),
    ("concurrency", True),
    ("concurrency", "2"),
    ("max_tasks", 1.5),
    ("max_tasks", False),
    ("memory_limit", 1e9),
    ("memory_limit", "1G"),
    ("start_timeout", "30"),
    ("start_timeout", True),
    ("heartbeat", 5),
    ("heartbeat", "5,30"),
    ("heartbeat", ("1", "2")),
    ("max_message_size", 1e6),
    ("max_message_size", True),
    ("on_failure", "print"),
    ("shutdown_on", None),
    ("where", 1111),
    ("where", ("host", 1111)),
]

BAD_VALUES: list[tuple[str, Any]] = [
    ("name", ""),
    ("name", "a\0b"),
    ("start_method", "threads"),
    ("python", ""),
    ("preload", ["not-a-module"]),
    ("preload", ["a..b"]),
    ("env", {"": "x"}),
    ("env", {"A=B": "x"}),
    ("env", {"A\0": "x"}),
    ("env", {"A": "x\0y"}),
    ("cwd", ""),
    ("umask", -1),
    ("umask", 0o1000),
    ("stdout", ""),
    ("stderr", "bad\0path"),
    ("concurrency", 0),
    ("concurrency", -3),
    ("max_tasks", 0),
    ("memory_limit", 0),
    ("memory_limit", -1),
    ("start_timeout", 0),
    ("start_timeout", -1.0),
    ("start_timeout", math.nan),
    ("start_timeout", math.inf),
    ("heartbeat", (1.0,)),
    ("heartbeat", (1.0, 2.0, 3.0)),
    ("heartbeat", (0, 5)),
    ("heartbeat", (5, 5)),
    ("heartbeat", (10, 5)),
    ("heartbeat", (1, math.nan)),
    ("max_message_size", 0),
    ("max_message_size", 1023),
    ("shutdown_on", "never"),
    ("shutdown_on", "explicit"),
    ("shutdown_on", "heartbeat_timeout"),  # without a heartbeat
    ("where", ""),
    ("where", "host:notaport"),
    ("where", "host:70000"),
    ("where", "[::1"),
    ("where", "unix:"),
]


@pytest.mark.parametrize(("option", "value"), BAD_TYPES)
def test_wrong_type_is_a_type_error(option: str, value: Any) -> None:
    with pytest.raises(TypeError) as info:
        make_options(**{option: value})
    _named(info.value, option)


@pytest.mark.parametrize(("option", "value"), BAD_VALUES)
def test_wrong_value_is_a_value_error(option: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        make_options(**{option: value})
    _named(info.value, option)


def test_messages_say_what_is_accepted() -> None:
    with pytest.raises(TypeError, match=r"name must be a non-empty str or None, got int 123"):
        make_options(name=123)
    with pytest.raises(TypeError, match=r"concurrency must be an int >= 1, got float 2\.5"):
        make_options(concurrency=2.5)
    with pytest.raises(ValueError, match=r"concurrency must be an int >= 1, got 0"):
        make_options(concurrency=0)
    with pytest.raises(ValueError, match=r"start_timeout must be a finite .* got nan"):
        make_options(start_timeout=math.nan)
    with pytest.raises(ValueError, match=r"umask must be an int from 0 to 0o777"):
        make_options(umask=-1)
    with pytest.raises(ValueError, match=r"the port is not a number"):
        make_options(where="host:notaport")


def test_the_dataclass_itself_validates() -> None:
    """Not only make_options: WorkerOptions(...) and replace() check too (a record of
    offload._record, not a dataclass: a fresh program's first pool imports no dataclasses)."""
    from offload._record import replace

    with pytest.raises(TypeError, match="concurrency"):
        WorkerOptions(concurrency=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks"):
        replace(WorkerOptions(), max_tasks=0)


def test_unknown_option_is_a_type_error_listing_the_options() -> None:
    with pytest.raises(TypeError, match=r"unknown worker option\(s\): concurency .*concurrency"):
        make_options(concurency=2)


GOOD: list[tuple[str, Any, Any]] = [
    # option, value given, value stored
    ("name", "w1", "w1"),
    ("name", None, None),
    ("start_method", "spawn", "spawn"),
    ("start_method", "reexec", "reexec"),
    ("python", "/usr/bin/python3", "/usr/bin/python3"),
    ("python", Path("/usr/bin/python3"), "/usr/bin/python3"),
    ("preload", "json", ("json",)),
    ("preload", ["json", "os.path"], ("json", "os.path")),
    ("preload", (m for m in ["json"]), ("json",)),
    ("initializer", print, print),
    ("initializer", None, None),
    ("initargs", [1, 2], (1, 2)),
    ("initargs", (1,), (1,)),
    ("env", {"A": "1", "B_2": ""}, {"A": "1", "B_2": ""}),
    ("env", None, None),
    ("cwd", "/tmp", "/tmp"),
    ("cwd", Path("/tmp"), "/tmp"),
    ("cwd", "does/not/exist/yet", "does/not/exist/yet"),  # checked at start: StartError
    ("umask", 0, 0),
    ("umask", 0o777, 0o777),
    ("umask", None, None),
    ("stdout", "inherit", "inherit"),
    ("stdout", "devnull", "devnull"),
    ("stderr", "prefix", "prefix"),
    ("stderr", Path("/tmp/w.log"), "/tmp/w.log"),
    ("concurrency", 1, 1),
    ("concurrency", Index(4), 4),
    ("max_tasks", None, None),
    ("max_tasks", 1, 1),
    ("memory_limit", 1 << 30, 1 << 30),
    ("memory_limit", None, None),
    ("start_timeout", 1, 1.0),
    ("start_timeout", 0.5, 0.5),
    ("heartbeat", None, None),
    ("heartbeat", [1, 5], (1.0, 5.0)),
    ("heartbeat", (0.2, 1.0), (0.2, 1.0)),
    ("max_message_size", 1024, 1024),
    ("on_failure", print, print),
    ("shutdown_on", "parent_exit", "parent_exit"),
    ("where", None, None),
    ("where", "gpu1:1111", "gpu1:1111"),
    ("where", "[::1]:1111", "[::1]:1111"),
    ("where", "unix:/run/offload/sock", "unix:/run/offload/sock"),
]


@pytest.mark.parametrize(("option", "value", "stored"), GOOD)
def test_good_values_are_accepted_and_normalised(option: str, value: Any, stored: Any) -> None:
    opts = make_options(**{option: value})
    assert getattr(opts, option) == stored
    assert type(getattr(opts, option)) is type(stored)


def test_fork_methods_need_os_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    if hasattr(os, "fork"):
        assert make_options(start_method="fork").start_method == "fork"
        assert make_options(start_method="forkserver").start_method == "forkserver"
        monkeypatch.delattr(os, "fork")
    for method in ("fork", "forkserver"):
        with pytest.raises(ValueError, match="start_method"):
            make_options(start_method=method)


def test_heartbeat_timeout_with_a_heartbeat_is_accepted() -> None:
    opts = make_options(shutdown_on="heartbeat_timeout", heartbeat=(1, 5))
    assert opts.shutdown_on == "heartbeat_timeout"


def test_env_is_copied() -> None:
    env = {"A": "1"}
    opts = make_options(env=env)
    env["A"] = "2"
    assert opts.env == {"A": "1"}


# -- the public constructors: no process, no engine ----------------------------------------


@pytest.mark.usefixtures("no_engine")
@pytest.mark.parametrize(
    ("kwargs", "error", "option"),
    [
        ({"name": 123}, TypeError, "name"),
        ({"concurrency": 2.5}, TypeError, "concurrency"),
        ({"start_timeout": math.nan}, ValueError, "start_timeout"),
        ({"umask": -1}, ValueError, "umask"),
        ({"env": {"": "x"}}, ValueError, "env"),
        ({"token": 123}, TypeError, "token"),
        ({"tls": "yes"}, TypeError, "tls"),
        ({"where": "host:x"}, ValueError, "where"),
    ],
)
def test_spawn_validates(kwargs: dict[str, Any], error: type[Exception], option: str) -> None:
    with pytest.raises(error) as info:
        offload.spawn(**kwargs)
    _named(info.value, option)


SSH_HOST = offload.SSH("h")


@pytest.mark.usefixtures("no_engine")
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "option"),
    [
        (("2",), {}, TypeError, "workers"),
        ((2.0,), {}, TypeError, "workers"),
        ((True,), {}, TypeError, "workers"),
        ((-1,), {}, ValueError, "workers"),
        ((0,), {}, ValueError, "worker"),  # neither a worker nor a host
        ((1,), {"name": 123}, TypeError, "name"),
        ((1,), {"concurrency": 2.5}, TypeError, "concurrency"),
        ((1,), {"start_timeout": math.nan}, ValueError, "start_timeout"),
        ((1,), {"umask": -1}, ValueError, "umask"),
        ((1,), {"env": {"": "x"}}, ValueError, "env"),
        ((1,), {"hosts": "gpu1:1111"}, TypeError, "hosts"),
        ((1,), {"hosts": 5}, TypeError, "hosts"),
        ((1,), {"hosts": [1111]}, TypeError, "hosts"),
        ((1,), {"hosts": ["gpu1:port"]}, ValueError, "hosts"),
        ((1,), {"token": 5}, TypeError, "token"),
        ((1,), {"tls": {"ca": "x"}}, TypeError, "tls"),
        ((1,), {"tls": offload.TLS(cert=5)}, TypeError, "tls.cert"),  # type: ignore[arg-type]
        ((1,), {"tls": offload.TLS(key="k.pem")}, ValueError, "tls"),
        ((1,), {"where": "gpu1:1111"}, ValueError, "hosts"),
        # workers_per_host is for hosts started over ssh (offload.SSH), checked as an int.
        ((1,), {"workers_per_host": 8}, ValueError, "workers_per_host"),
        ((1,), {"hosts": [SSH_HOST], "workers_per_host": "8"}, TypeError, "workers_per_host"),
        ((1,), {"hosts": [SSH_HOST], "workers_per_host": 0}, ValueError, "workers_per_host"),
    ],
)
def test_pool_validates(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], option: str
) -> None:
    with pytest.raises(error) as info:
        offload.Pool(*args, **kwargs)
    _named(info.value, option)


def test_pool_with_a_bad_name_raises_at_once_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: ``Pool(1, name=123)`` was accepted, and its first call died in
    the I/O thread with a future that never resolved."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    import offload.client.pool
    from offload.client.engine import Engine

    made: list[object] = []

    def engine(*args: Any, **kwargs: Any) -> Engine:
        made.append(args)
        return Engine(*args, **kwargs)

    monkeypatch.setattr(offload.client.pool, "Engine", engine)
    with pytest.raises(TypeError, match=r"name must be a non-empty str or None, got int 123"):
        offload.Pool(1, name=123)
    assert made == []
    assert {p.pid for p in me.children(recursive=True)} <= before


def test_pool_workers_given_as_a_str() -> None:
    with pytest.raises(TypeError, match=r"workers must be an int >= 0 or None, got str '2'"):
        offload.Pool("2")  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_engine")
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "option"),
    [
        ((1111,), {}, TypeError, "address"),
        ((None,), {}, TypeError, "address"),
        (("",), {}, ValueError, "address"),
        (("host:port",), {}, ValueError, "address"),
        (("127.0.0.1:1",), {"token": 123}, TypeError, "token"),
        (("127.0.0.1:1",), {"token": TOKEN, "tls": object()}, TypeError, "tls"),
        (("127.0.0.1:1",), {"token": TOKEN, "heartbeat": (5, 1)}, ValueError, "heartbeat"),
        (("127.0.0.1:1",), {"token": TOKEN, "start_timeout": -1}, ValueError, "start_timeout"),
        (("127.0.0.1:1",), {"token": TOKEN, "name": 1}, TypeError, "name"),
        (("127.0.0.1:1",), {"token": TOKEN, "on_failure": 1}, TypeError, "on_failure"),
        (
            ("127.0.0.1:1",),
            {"token": TOKEN, "max_message_size": 1.5},
            TypeError,
            "max_message_size",
        ),
    ],
)
def test_connect_validates(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], option: str
) -> None:
    with pytest.raises(error) as info:
        offload.connect(*args, **kwargs)
    _named(info.value, option)


# -- offload.init ---------------------------------------------------------------------------


@pytest.fixture
def clean_init_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OFFLOAD_HOST", "OFFLOAD_PORT", "OFFLOAD_SERVER", "OFFLOAD_START_METHOD"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_init_env")
@pytest.mark.parametrize(
    ("kwargs", "error", "option"),
    [
        ({"port": "1111"}, TypeError, "port"),
        ({"port": True}, TypeError, "port"),
        ({"port": 70000}, ValueError, "port"),
        ({"host": 5}, TypeError, "host"),
        ({"host": ""}, ValueError, "host"),
        ({"server": "yes"}, TypeError, "server"),
        ({"token_file": 5}, TypeError, "token_file"),
        ({"concurrency": 0}, ValueError, "concurrency"),
    ],
)
def test_init_validates(kwargs: dict[str, Any], error: type[Exception], option: str) -> None:
    with pytest.raises(error) as info:
        offload.init(argv=[], **kwargs)
    _named(info.value, option)


@pytest.mark.usefixtures("clean_init_env")
def test_init_port_from_the_command_line_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="--offload-port must be a port number"):
        offload.init(argv=["prog", "--offload-port", "abc"])
    monkeypatch.setenv("OFFLOAD_PORT", "99999")
    with pytest.raises(ValueError, match="OFFLOAD_PORT must be a port number"):
        offload.init(argv=["prog"])


# -- the worker server -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "option"),
    [
        ({"listen": 1111}, TypeError, "listen"),
        ({"listen": "host:port"}, ValueError, "listen"),
        ({"token": "a str token" * 4}, TypeError, "token"),
        ({"token": None}, ValueError, "token"),
        ({"tls": "yes"}, TypeError, "tls"),
        ({"tls": offload.TLS(ca="ca.pem")}, ValueError, "cert"),
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": "2"}, TypeError, "workers"),
        ({"workers": 2.0}, TypeError, "workers"),
        ({"preload": 5}, TypeError, "preload"),
        ({"preload": ("bad-name",)}, ValueError, "preload"),
        ({"isolation": "thread"}, ValueError, "isolation"),
        ({"isolation": None}, TypeError, "isolation"),
        ({"max_connections": 0}, ValueError, "max_connections"),
        ({"max_connections": 1.5}, TypeError, "max_connections"),
        ({"max_unauthenticated": 0}, ValueError, "max_unauthenticated"),
        ({"max_unauthenticated_per_source": 0}, ValueError, "max_unauthenticated_per_source"),
        ({"max_unauthenticated_per_source": 1.0}, TypeError, "max_unauthenticated_per_source"),
        ({"handshake_timeout": 0}, ValueError, "handshake_timeout"),
        ({"handshake_timeout": math.nan}, ValueError, "handshake_timeout"),
        ({"disconnect_grace": -1}, ValueError, "disconnect_grace"),
        ({"busy_poll": -1.0}, ValueError, "busy_poll"),
        ({"busy_poll": math.inf}, ValueError, "busy_poll"),
        ({"busy_poll": "0"}, TypeError, "busy_poll"),
        ({"worker_options": ["x"]}, TypeError, "worker_options"),
        ({"worker_options": {"concurrency": 0}}, ValueError, "concurrency"),
        ({"worker_options": {"nope": 1}}, TypeError, "nope"),
    ],
)
def test_server_validates(kwargs: dict[str, Any], error: type[Exception], option: str) -> None:
    from offload.server.server import Server

    args = {"listen": "127.0.0.1:0", "token": TOKEN, **kwargs}
    with pytest.raises(error) as info:
        Server(**args)
    _named(info.value, option)


def test_server_with_good_settings_is_made_without_starting() -> None:
    from offload.server.server import Server

    server = Server(
        "127.0.0.1:0",
        token=TOKEN,
        workers=2,
        preload=("json",),
        isolation="process",
        max_connections=1,
        handshake_timeout=0.5,
        disconnect_grace=0,
        busy_poll=0,
        worker_options={"concurrency": 2},
    )
    assert server.workers == 2


def test_server_short_token_is_still_an_authentication_error() -> None:
    from offload.server.server import Server

    with pytest.raises(offload.AuthenticationError):
        Server("127.0.0.1:0", token=b"short")


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--workers", "0"], "workers"),
        (["--max-connections", "0"], "max_connections"),
        (["--max-unauthenticated", "-1"], "max_unauthenticated"),
        (["--max-unauthenticated-per-source", "0"], "max_unauthenticated_per_source"),
        (["--handshake-timeout", "nan"], "handshake_timeout"),
        (["--busy-poll", "-1"], "busy_poll"),
        (["--drain-timeout", "-5"], "drain_timeout"),
        (["--drain-timeout", "inf"], "drain_timeout"),
        (["--listen", "127.0.0.1:port"], "listen"),
        (["--preload", "not-a-module"], "preload"),
    ],
)
def test_serve_command_rejects_bad_arguments_before_making_a_token(
    argv: list[str],
    option: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from offload import cli, tokens

    monkeypatch.delenv("OFFLOAD_TOKEN", raising=False)

    def no_token(*args: Any) -> bytes:
        raise AssertionError("server_token() ran: the arguments were not checked first")

    monkeypatch.setattr(tokens, "server_token", no_token)
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("offload serve: ")
    _named(ValueError(err), option)


# -- the helpers, directly ------------------------------------------------------------------


def test_check_int_bounds_and_none() -> None:
    assert o.check_int("n", 3, minimum=1) == 3
    assert o.check_int("n", None, minimum=1, none=True) is None
    with pytest.raises(TypeError, match="n must be an int >= 1, got NoneType None"):
        o.check_int("n", None, minimum=1)
    with pytest.raises(ValueError, match="n must be an int from 1 to 3, got 4"):
        o.check_int("n", 4, minimum=1, maximum=3)


def test_check_seconds() -> None:
    assert o.check_seconds("t", 0, zero=True) == 0.0
    assert o.check_seconds("t", None, none=True) is None
    with pytest.raises(ValueError, match=r"t must be a finite number of seconds > 0, got 0"):
        o.check_seconds("t", 0)
    with pytest.raises(TypeError, match="got bool False"):
        o.check_seconds("t", False, zero=True)
