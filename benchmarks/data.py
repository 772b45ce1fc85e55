"""Large data: round trips of 64 MiB to a local worker and over loopback.

Each round trip sends 64 MiB to a worker that returns it (``numpy.asarray`` of an
array, ``bytes`` of a bytes object: both give back the very object they received), so
128 MiB move per round trip; rates are 128 MiB over the median round trip.

Floors, measured in the same run, in this process:

* ``memcpy, warm buffer``: 64 MiB copied into a preallocated buffer already touched
  (the machine's copy rate). The NumPy section's floor: a received array is a view of
  a shared-memory segment that stays mapped, so nothing but warm copies happens.
* ``bytes(b) / arr.copy(), fresh``: 64 MiB copied into a new object, page faults
  included. The ``bytes`` section's floor: a received ``bytes`` must be a new object
  (its bytes live inside it), so every ``bytes`` that arrives costs one such copy,
  however it travelled; the warm-buffer row is shown beside it.
* the loopback section's floor: 64 MiB sent to a process that sends them back, through
  one plain TCP connection on 127.0.0.1 (read into a preallocated buffer, no framing).

Ray (installed in the venv) runs as a contender when ``ray.init`` works here: its
shared-memory object store is the reference the issue quotes (about 550 MB/s for bytes
and 6 300 MB/s for NumPy on the issue's machine).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks import NOT_INSTALLED, failure
from benchmarks.report import Row

SIZE = 64 << 20
MOVED = 2 * SIZE / 1e6  # MB per round trip
MEMCPY = "memcpy, warm buffer (in-process)"
FRESH_BYTES = "bytes(b), fresh (in-process)"
FRESH_ARRAY = "arr.copy(), fresh (in-process)"
OFFLOAD = "offload"
RAY = "Ray (object store)"
RAW_TCP = "raw TCP socket, loopback (floor)"
OFFLOAD_TCP = "offload serve, plain TCP"
OFFLOAD_TLS = "offload serve, TLS"


def _samples(fn: Callable[[], Any], reps: int, warmup: int = 2) -> list[float]:
    """Seconds per MB moved (the report shows the inverse: MB/s), one per round trip.

    Garbage is collected between round trips, outside the timing: a finished offload
    future sits in a reference cycle today (future ↔ its waiters), which keeps its
    result, and the worker's segment under it, until the collector runs; the worker
    would otherwise fill a fresh segment (new pages) for most results.
    """
    for _ in range(warmup):
        gc.collect()
        fn()
    out = []
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) / MOVED)
    return out


def _copy_samples(fn: Callable[[], Any], reps: int) -> list[float]:
    """Seconds per MB of one in-process 64 MiB copy (the report shows MB/s)."""
    return [s * MOVED / (SIZE / 1e6) for s in _samples(fn, reps)]


def _row(system: str, make: Callable[[], list[float]], note: str = "") -> Row:
    try:
        return Row(system, make(), note)
    except ImportError as exc:
        return Row(system, None, f"{NOT_INSTALLED}: {exc.name}")
    except Exception as exc:  # noqa: BLE001 - a contender that fails reports why
        return Row(system, None, failure(exc))


def run_local(reps: int) -> tuple[list[Row], list[Row]]:
    """(NumPy rows, bytes rows): the in-process floors, offload, Ray."""
    import numpy as np

    data = os.urandom(SIZE)
    arr = np.frombuffer(data, dtype=np.float64).copy()
    warm = bytearray(SIZE)
    warm_view = memoryview(warm)

    def warm_copy() -> None:
        warm_view[:] = data

    memcpy = _row(MEMCPY, lambda: _copy_samples(warm_copy, reps))
    view = memoryview(data)  # bytes(data) would be data itself
    fresh_bytes = _row(FRESH_BYTES, lambda: _copy_samples(lambda: bytes(view), reps))
    fresh_array = _row(FRESH_ARRAY, lambda: _copy_samples(arr.copy, reps))

    import offload

    w = offload.spawn()
    try:
        w.call(np.asarray, arr[:16])  # numpy imported in the worker before timing
        mine_array = _row(OFFLOAD, lambda: _samples(lambda: w.call(np.asarray, arr), reps))
        mine_bytes = _row(OFFLOAD, lambda: _samples(lambda: w.call(bytes, data), reps))
    finally:
        w.shutdown(timeout=30)
    ray_array, ray_bytes = _ray(arr, data, reps)
    return (
        [memcpy, fresh_array, mine_array, ray_array],
        [fresh_bytes, memcpy, mine_bytes, ray_bytes],
    )


def _ray(arr: Any, data: bytes, reps: int) -> tuple[Row, Row]:
    try:
        import ray
    except ImportError:
        return Row(RAY, None, NOT_INSTALLED), Row(RAY, None, NOT_INSTALLED)
    try:
        ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - Ray that cannot start here reports why
        why = failure(exc)
        return Row(RAY, None, why), Row(RAY, None, why)
    try:
        echo = ray.remote(_identity)

        def call(value: Any) -> Any:
            return ray.get(echo.remote(value))

        return (
            _row(RAY, lambda: _samples(lambda: call(arr), reps)),
            _row(RAY, lambda: _samples(lambda: call(data), reps)),
        )
    finally:
        ray.shutdown()


def _identity(x: Any) -> Any:
    return x


def run_remote(reps: int) -> list[Row]:
    """64 MiB of bytes over loopback: a raw TCP echo (the floor), offload serve plain
    and TLS."""
    from benchmarks import remote

    data = os.urandom(SIZE)
    rows = [_row(RAW_TCP, lambda: _raw_tcp(data, reps))]
    import offload

    with tempfile.TemporaryDirectory(prefix="offload-bench-data-") as tmp:
        token_path, token = remote._token_file(tmp)
        base = remote.serve_command(token_path, 1)
        for system, tls_args in ((OFFLOAD_TCP, None), (OFFLOAD_TLS, "tls")):
            server = None
            try:
                tls = None
                argv = list(base)
                if tls_args:
                    cert, key = remote._certificate(tmp)
                    argv += ["--tls-cert", cert, "--tls-key", key]
                    tls = offload.TLS(ca=cert)
                server = remote._Server(
                    system, argv, remote._SERVING, os.path.join(tmp, f"{system}.err")
                )
                with offload.connect(server.address, token=token, tls=tls) as w:
                    rows.append(
                        _row(system, lambda w=w: _samples(lambda: w.call(bytes, data), reps))
                    )
            except Exception as exc:  # noqa: BLE001 - a server that fails reports why
                rows.append(Row(system, None, failure(exc)))
            finally:
                if server is not None:
                    server.stop()
    return rows


_ECHO = """
import socket, sys
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
buf = memoryview(bytearray(1 << 20))
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    conn.sendall(buf[:n])
"""


def _raw_tcp(data: bytes, reps: int) -> list[float]:
    """64 MiB to an echo process over one TCP connection on 127.0.0.1, and back."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        back = memoryview(bytearray(SIZE))

        def round_trip() -> None:
            sender = threading.Thread(target=sock.sendall, args=(data,))
            sender.start()
            got = 0
            while got < SIZE:
                got += sock.recv_into(back[got:])
            sender.join()

        try:
            return _samples(round_trip, reps)
        finally:
            sock.close()
    finally:
        proc.wait(timeout=10)
