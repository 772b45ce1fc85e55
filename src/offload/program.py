"""``offload.init()``: the program as its own worker (Procord, zng, Docker's spawn).

Call it first thing in ``main``:

* In a process that offload started as a worker with ``start_method="reexec"``, it runs
  the worker loop and never returns.
* With ``--offload-server`` (or ``OFFLOAD_SERVER=1``, or ``server=True``) the program
  becomes a worker server on ``--offload-host``/``--offload-port`` (default
  127.0.0.1:1111) serving every task it registered; it never returns.
* With ``--offload-host HOST`` (and ``--offload-port``), :func:`offload.delegate` sends
  calls to that server instead of starting local processes.

offload's own options are removed from ``sys.argv`` so the program's argument parser
never sees them. Each has an environment variable and a keyword argument:
``--offload-host``/``OFFLOAD_HOST``/``host``, ``--offload-port``/``OFFLOAD_PORT``/``port``,
``--offload-server``/``OFFLOAD_SERVER``/``server``,
``--offload-token-file``/``OFFLOAD_TOKEN_FILE``/``token_file`` (or ``OFFLOAD_TOKEN``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from offload.worker.settings import SETTINGS_ENV

_VALUE_OPTIONS = ("--offload-host", "--offload-port", "--offload-token-file")
_FLAG_OPTIONS = ("--offload-server",)


def is_worker_process() -> bool:
    """Whether this process was started as an offload worker."""
    return SETTINGS_ENV in os.environ


def _take_options(argv: list[str]) -> dict[str, str | bool]:
    """Remove offload's options from ``argv`` (in place); return them."""
    found: dict[str, str | bool] = {}
    kept: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUE_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            found[name[len("--offload-") :].replace("-", "_")] = value
        elif arg in _FLAG_OPTIONS:
            found[arg[len("--offload-") :]] = True
        else:
            kept.append(arg)
        i += 1
    argv[:] = kept
    return found


def init(
    argv: list[str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    server: bool | None = None,
    token_file: str | None = None,
    **delegate_options: Any,
) -> None:
    """Make this program able to act as its own worker; call it first in ``main``.

    Args:
        argv: the argument list to take offload's options from (default ``sys.argv``,
            edited in place).
        host: as ``--offload-host``: send :func:`offload.delegate` calls to the worker
            server on this host. These keywords win over the command line, which wins
            over the environment.
        port: as ``--offload-port`` (default 1111).
        server: as ``--offload-server``: become a worker server for this program's
            tasks; ``init`` then never returns.
        token_file: as ``--offload-token-file``: the file holding the shared token.
        **delegate_options: default worker options for :func:`offload.delegate` (e.g.
            ``start_method="reexec"``; ``OFFLOAD_START_METHOD`` when not given).

    Raises:
        TypeError, ValueError: an unknown or invalid option.
        AuthenticationError: a remote mode without a usable token.
    """
    if is_worker_process():
        from offload.worker.loop import run_worker

        run_worker()
    from offload.client.options import check_init_args, parse_port

    check_init_args(host, port, server, token_file)
    args = _take_options(sys.argv if argv is None else argv)
    env = os.environ
    host = host or str(args.get("host") or env.get("OFFLOAD_HOST") or "") or None
    if port is None:
        port_text = str(args.get("port") or "")
        option = "--offload-port"
        if not port_text:
            port_text, option = env.get("OFFLOAD_PORT") or "", "OFFLOAD_PORT"
        port = parse_port(option, port_text) if port_text else 1111
    if server is None:
        server = bool(args.get("server")) or env.get("OFFLOAD_SERVER", "") not in ("", "0")
    token_file = token_file or str(args.get("token_file") or "") or None
    token_file = token_file or env.get("OFFLOAD_TOKEN_FILE") or None

    from offload.client.options import make_options
    from offload.client.worker import set_delegate_defaults

    options = dict(delegate_options)
    env_method = env.get("OFFLOAD_START_METHOD")
    if env_method and "start_method" not in options:
        options["start_method"] = env_method
    if server:
        _serve(host or "127.0.0.1", port, token_file)  # never returns
    if host is not None:
        from offload.tokens import read_token_file, resolve_token

        token = read_token_file(token_file) if token_file else None
        options["where"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        options["token"] = resolve_token(token)
    checked = {k: v for k, v in options.items() if k not in ("token", "tls")}
    make_options(**checked)  # validate now, not at the first delegate()
    set_delegate_defaults(**options)


def _serve(host: str, port: int, token_file: str | None) -> None:
    """Become a worker server for this program's tasks; exits the process."""
    from offload.server.main import serve_until_signalled
    from offload.server.server import Server
    from offload.tokens import server_token
    from offload.transport.net import parse_address

    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    token = server_token(parse_address(listen), token_file)
    # Workers re-run this program, so they know every task it registers at import.
    server = Server(listen, token=token, worker_options={"start_method": "reexec"})
    sys.exit(serve_until_signalled(server, drain_timeout=30.0))
