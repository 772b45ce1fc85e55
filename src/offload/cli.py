"""The ``offload`` command: ``serve``, ``ping``, ``status`` and ``replay``.

Exit statuses of ``offload serve``: 0 after a clean stop (SIGTERM or Ctrl-C, every
running call finished within ``--drain-timeout``), 3 when calls had to be killed at the
drain deadline, 2 for a usage or configuration error (e.g. a non-loopback address with no
token), 1 when the server could not start (address in use, bad certificate).
``ping``/``status``: 0 on an answer, 1 otherwise. ``replay``: 0 when the call returned,
2 when FILE is no crash dump; otherwise, in this process, what the call did to it (1
with the traceback of an exception, or death by its signal), and with ``--worker`` 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from offload.errors import OffloadError


def _tls_from(args: argparse.Namespace) -> object | None:
    from offload.transport.net import TLS

    if not (args.tls_cert or args.tls_ca or args.tls_key):
        return None
    return TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _add_tls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", help="certificate chain (PEM)")
    parser.add_argument("--tls-key", help="private key (PEM)")
    parser.add_argument("--tls-ca", help="CA bundle: verify the peer's certificate")


def _log_warnings_to_stderr() -> None:
    """``offload serve`` is a program, not a library: its warnings (out of file
    descriptors, a client refused at the connection limit, a worker that crashed) go to
    stderr. The library's own logger stays silent unless configured."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))  # messages say "offload: "
    logging.getLogger("offload").addHandler(handler)


def serve(args: argparse.Namespace) -> int:
    from offload.client.options import check_server_args
    from offload.server.main import serve_until_signalled
    from offload.server.server import Server
    from offload.tokens import server_token
    from offload.transport.net import parse_address

    settings: dict[str, Any] = {
        "tls": _tls_from(args),
        "workers": args.workers,
        "preload": tuple(args.preload or ()),
        "isolation": args.isolation,
        "max_connections": args.max_connections,
        "max_unauthenticated": args.max_unauthenticated,
        "max_unauthenticated_per_source": args.max_unauthenticated_per_source,
        "handshake_timeout": args.handshake_timeout,
    }
    if args.busy_poll is not None:
        settings["busy_poll"] = args.busy_poll
    # Checked before server_token(), which may write a token file.
    check_server_args(listen=args.listen, drain_timeout=args.drain_timeout, **settings)
    _log_warnings_to_stderr()
    token = server_token(parse_address(args.listen), args.token_file)
    server = Server(args.listen, token=token, **settings)
    return serve_until_signalled(server, args.drain_timeout)


def _query(args: argparse.Namespace, status: bool) -> int:
    from offload.client.remote import RemoteTarget, query

    token = None
    if args.token_file:
        from offload.tokens import read_token_file

        token = read_token_file(args.token_file)
    target = RemoteTarget.parse(args.address, token, _tls_from(args), None)  # type: ignore[arg-type]
    try:
        hello, answer, elapsed = query(target, args.timeout, status=status)
    except (OffloadError, OSError) as exc:
        print(f"offload: {args.address}: {exc}", file=sys.stderr)
        return 1
    if status:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(
            f"pong from {args.address} ({hello.name}, pid {hello.pid}, offload "
            f"{hello.offload_version}) in {elapsed * 1e3:.2f} ms"
        )
    return 0


def _replay(args: argparse.Namespace) -> int:
    """``offload replay [--worker] FILE``: run a call saved by ``OFFLOAD_DUMP_DIR`` again
    (see :mod:`offload.replay`). In this process, whatever the call raises propagates:
    ``python -m pdb -m offload replay FILE`` stops there."""
    from offload import dumpfile
    from offload.replay import replay_here, replay_in_worker

    try:
        dump = dumpfile.read(args.file)
    except (OSError, ValueError) as exc:  # unreadable, or not a crash dump
        print(f"offload replay: {exc}", file=sys.stderr)
        return 2
    if not args.worker:
        return replay_here(dump)
    try:
        return replay_in_worker(dump, start_method=args.start_method)
    except (OffloadError, ValueError, TypeError) as exc:  # no worker could start
        print(f"offload replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``offload`` console script."""
    parser = argparse.ArgumentParser(prog="offload", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run a worker server")
    p_serve.add_argument(
        "--listen",
        default="127.0.0.1:1111",
        help="HOST:PORT, [V6]:PORT or unix:PATH (default 127.0.0.1:1111)",
    )
    p_serve.add_argument("--token-file", help="file holding the shared token (>= 32 bytes)")
    _add_tls(p_serve)
    p_serve.add_argument("--workers", type=int, default=None, help="calls run at once")
    p_serve.add_argument("--preload", nargs="*", help="modules the workers import at start")
    p_serve.add_argument("--isolation", choices=("pool", "process", "inline"), default="pool")
    p_serve.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="authenticated clients at once (past it, a client is told the server is full)",
    )
    p_serve.add_argument(
        "--max-unauthenticated",
        type=int,
        default=128,
        help=(
            "connections in their handshake at once (past it, the one that got least far "
            "is dropped, the oldest first)"
        ),
    )
    p_serve.add_argument(
        "--max-unauthenticated-per-source",
        type=int,
        default=32,
        help="of those, from one IPv4 address, IPv6 /64, or Unix socket (default 32)",
    )
    p_serve.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to authenticate",
    )
    p_serve.add_argument(
        "--busy-poll",
        type=float,
        default=None,
        metavar="SECONDS",
        help=(
            "after traffic, poll this long before sleeping while a worker is idle: lower "
            "latency for an otherwise idle CPU's time (default 0.0002; 0: off)"
        ),
    )
    p_serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds running calls get to finish on SIGTERM",
    )

    for name, help_text in (("ping", "check a server answers"), ("status", "a server's state")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("address")
        q.add_argument("--token-file", help="token file (else OFFLOAD_TOKEN / OFFLOAD_TOKEN_FILE)")
        q.add_argument("--timeout", type=float, default=10.0)
        _add_tls(q)

    p_replay = sub.add_parser(
        "replay",
        help="run a call saved in OFFLOAD_DUMP_DIR again (in this process, or a fresh worker)",
    )
    p_replay.add_argument("file", help="a crash dump (crash-*.offload-dump)")
    p_replay.add_argument(
        "--worker",
        action="store_true",
        help="run it in a fresh worker with the dumped options and print the outcome",
    )
    p_replay.add_argument(
        "--start-method",
        default=None,
        help="with --worker: start the worker this way instead (e.g. attach, to start it "
        "by hand under a debugger)",
    )

    args = parser.parse_args(argv)
    if args.command == "replay":  # the call's own errors propagate (pdb post mortem)
        return _replay(args)
    try:
        if args.command == "serve":
            return serve(args)
        return _query(args, status=args.command == "status")
    except (ValueError, OffloadError, OSError) as exc:  # configuration: bad address, token
        print(f"offload {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
