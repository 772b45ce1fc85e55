"""Loopback servers of the RPC peers, each exposing ``abs`` (run in the server process).

``python -m benchmarks.rpc_servers pyro5|rpyc`` prints ``READY <address>`` on stdout once
it accepts connections, and exits when its stdin reaches end of file (the parent closed
it, or died), so that it never outlives the benchmark.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any


def _exit_at_eof() -> None:
    def watch() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, name="exit-at-eof", daemon=True).start()


def pyro5() -> None:
    import Pyro5.api

    @Pyro5.api.expose
    class Calc:
        def abs(self, x: Any) -> Any:
            return abs(x)

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    uri = daemon.register(Calc, "calc")
    print(f"READY {uri}", flush=True)
    daemon.requestLoop()


def rpyc() -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    class Calc(rpyc.Service):  # type: ignore[misc]
        def exposed_abs(self, x: Any) -> Any:
            return abs(x)

    server = ThreadedServer(Calc, hostname="127.0.0.1", port=0)
    print(f"READY 127.0.0.1:{server.port}", flush=True)
    server.start()


SERVERS = {"pyro5": pyro5, "rpyc": rpyc}

if __name__ == "__main__":
    _exit_at_eof()
    SERVERS[sys.argv[1]]()
