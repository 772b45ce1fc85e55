"""A worker started by hand: ``python -m offload.worker --connect HOST:PORT --token-file F``.

The other end is a caller that waits for it (``start_method="attach"``, see
:mod:`offload.client.attach`, which prints this very command). Steps:

1. Read the token (``--token-file``, else ``OFFLOAD_TOKEN`` / ``OFFLOAD_TOKEN_FILE``).
2. Connect and prove the token, then check the caller's proof
   (:mod:`offload.protocol.auth`): nothing is unpickled before both proofs passed, so a
   process that merely listens on that port cannot feed this worker pickles. Only then
   are the settings decoded that the caller wrote beside the token file (``settings``,
   read before connecting, private to its owner like the token; ``--settings F`` names
   another; without one, default settings).
3. Run the ordinary worker loop (:func:`offload.worker.loop.run_worker`) over that
   connection, its frames sealed with the session keys. The worker dies when the
   connection closes (the caller is gone or killed it), as any worker does when its
   parent goes.

Nothing here imports the client side.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from offload.worker.settings import WorkerSettings, decode_settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line of a worker started by hand.

    Raises:
        SystemExit: a usage error (argparse prints it).
    """
    parser = argparse.ArgumentParser(
        prog="python -m offload.worker",
        description="Start an offload worker by hand and attach it to a caller that waits "
        "for it (start_method='attach' prints this command).",
    )
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", help="the caller")
    parser.add_argument(
        "--token-file", help="the caller's token (else OFFLOAD_TOKEN / OFFLOAD_TOKEN_FILE)"
    )
    parser.add_argument(
        "--settings",
        help="the worker settings file (default: 'settings' beside the token file)",
    )
    parser.add_argument("--name", help="the worker's name (default: the caller's choice)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to connect and authenticate"
    )
    return parser.parse_args(argv)


def _read_settings(args: argparse.Namespace) -> str | None:
    """The text of the settings file the caller wrote (None: there is none), read before
    connecting (the caller removes it once a worker is in) from a file private to its
    owner, as the token's is. It is decoded (unpickled) only once the caller proved the
    token (:func:`_settings`).

    Raises:
        AuthenticationError: the file is open to its group or others.
        OSError: the file cannot be read.
    """
    path = args.settings
    if path is None and args.token_file:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.token_file)), "settings")
        path = beside if os.path.exists(beside) else None
    if path is None:
        return None
    import stat

    from offload.errors import AuthenticationError

    with open(path) as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise AuthenticationError(
                f"the settings file {path} is open to others (mode {mode:04o}); the worker "
                f"unpickles it: make it private (chmod 600 {path})"
            )
        return f.read().strip()


def _settings(text: str | None, args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings: decoded from the file's text, else defaults.

    Raises:
        ValueError, TypeError: the text is no settings record.
    """
    if text is None:
        settings = WorkerSettings(name="offload-worker-attached")
    else:
        settings = decode_settings(text)
    if args.name:
        settings = settings.replace(name=args.name)
    return settings


def main(argv: list[str] | None = None) -> NoReturn:
    """Connect to the caller, authenticate, and run as its worker; never returns.

    Exits with status 2 on a usage error and 1 when the caller cannot be reached or
    authenticated (the reason goes to stderr).
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from offload.errors import OffloadError
    from offload.tokens import read_token_file, resolve_token
    from offload.transport.net import client_handshake, connect, parse_address
    from offload.worker.loop import run_worker

    try:
        token = read_token_file(args.token_file) if args.token_file else resolve_token(None)
        settings_text = _read_settings(args)
        address = parse_address(args.connect)
        sock = connect(address, args.timeout)
        try:
            sealer, leftover = client_handshake(
                sock, token, args.timeout, sealed=True, peer=f"the caller at {args.connect}"
            )
            settings = _settings(settings_text, args)  # the caller proved the token
        except BaseException:
            sock.close()
            raise
    except (OffloadError, OSError, ValueError, TypeError) as exc:
        print(f"offload worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    sock.settimeout(None)
    print(
        f"offload worker: {settings.name} (pid {os.getpid()}) attached to {args.connect}",
        file=sys.stderr,
        flush=True,
    )
    # Its parent is whoever started it, not the caller: ppid 0 (the end of the
    # connection is what tells it the caller is gone).
    run_worker(settings.replace(fd=sock.detach(), ppid=0), sealer=sealer, leftover=leftover)
