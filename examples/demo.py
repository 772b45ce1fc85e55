"""A tour of offload's main job, one readable line per outcome.

Run with ``make demo``. Every call below runs in another process; every future resolves,
and every failure arrives as a typed error that says what happened.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time

import offload


def square(x: int) -> int:
    return x * x


def parse(text: str) -> int:
    return int(text)  # raises ValueError for "twelve"


def segfault() -> None:
    print("about to read address 0", file=sys.stderr, flush=True)
    ctypes.string_at(0)


def show(label: str, fut: offload.Future[object]) -> None:
    concurrent.futures.wait([fut])
    match fut.status():
        case offload.Success(value):
            print(f"{label:<28} -> {value!r}")
        case offload.Raised(exc):
            where = str(exc.__cause__).strip().splitlines()[-1]
            print(f"{label:<28} -> the task raised {exc!r} (worker said: {where})")
        case offload.Failed(error):
            print(f"{label:<28} -> {type(error).__name__}: {str(error).splitlines()[0]}")
        case other:
            print(f"{label:<28} -> {other}")


def main() -> None:
    print(f"offload {offload.__version__}: parent pid {os.getpid()}\n")
    with offload.spawn(name="demo-worker", stderr="devnull") as w:
        show("square(12)", w.submit(square, 12))
        show("lambda in a worker", w.submit(lambda: f"hello from pid {os.getpid()}"))
        show("parse('twelve')", w.submit(parse, "twelve"))

        crashed = w.submit(segfault)
        show("segfault()", crashed)
        error = crashed.exception()
        assert isinstance(error, offload.WorkerCrashed)
        print(
            f"{'':<28}    .signal={error.signal} .stderr_tail={error.stderr_tail.splitlines()[0]!r}"
        )
        show("square(3) after the crash", w.submit(square, 3))

        sleeper = w.submit(time.sleep, 30)
        while not sleeper.running():  # sent to the (restarted) worker
            time.sleep(0.01)
        sleeper.kill()
        show("time.sleep(30), then kill()", sleeper)

        slow = offload.task(time.sleep, timeout=0.2)
        started = time.perf_counter()
        timed_out = w.submit(slow, 30)
        show("time.sleep(30), timeout=0.2", timed_out)
        print(f"{'':<28}    (resolved after {time.perf_counter() - started:.2f} s)")

        show("square(4) on a fresh worker", w.submit(square, 4))
    remote()
    print("\nall futures resolved; no worker left behind.")


def remote() -> None:
    """The same calls through a worker server (``offload serve``) on loopback."""
    with tempfile.TemporaryDirectory() as tmp:
        token_file = os.path.join(tmp, "token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        serve = os.path.join(os.path.dirname(sys.executable), "offload")
        server = subprocess.Popen(
            [serve, "serve", "--listen", "127.0.0.1:0", "--token-file", token_file],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()  # "offload: serving on HOST:PORT (pid N)"
            found = re.search(r"serving on (\S+)", line)
            if found is None:
                raise RuntimeError(f"offload serve said {line!r}")
            address = found.group(1)
            print(f"\nworker server on {address} (pid {server.pid}), token in a 0600 file")
            with open(token_file) as f:
                token = f.read().strip()
            with offload.connect(address, token=token) as w:
                show("remote square(12)", w.submit(square, 12))
                show("remote segfault()", w.submit(segfault))
                show("remote square(3), after it", w.submit(square, 3))
        finally:
            server.terminate()  # SIGTERM: the server drains and exits
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
