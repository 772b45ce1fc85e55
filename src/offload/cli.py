"""The ``offload`` command: ``serve``, ``ping`` and ``status``.

Exit statuses of ``offload serve``: 0 after a clean stop (SIGTERM or Ctrl-C, every
running call finished within ``--drain-timeout``), 3 when calls had to be killed at the
drain deadline, 2 for a usage or configuration error (e.g. a non-loopback address with no
token), 1 when the server could not start (address in use, bad certificate).
``ping``/``status``: 0 on an answer, 1 otherwise.
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

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return _query(args, status=args.command == "status")
    except (ValueError, OffloadError, OSError) as exc:  # configuration: bad address, token
        print(f"offload {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
