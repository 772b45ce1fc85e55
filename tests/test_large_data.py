"""Large arguments and results: 64 MiB of NumPy, ``bytes`` and ``bytearray`` come back
bit-exact from a worker of every start method and from ``offload serve`` (plain TCP and
TLS); between local processes they travel through shared memory, and a worker
SIGKILLed mid-transfer leaves no segment behind (no descriptor, no mapping, nothing in
/dev/shm).

The speed of all this is measured by ``python -m benchmarks --only data``, not here.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import large_data_tasks as t
import offload
import remote_helpers as h
from crashes import wait_until
from offload.errors import ProtocolError
from offload.serde import dumps, loads

SIZE = 64 << 20
WAIT = 120.0
TESTS_DIR = Path(__file__).resolve().parent
START_METHODS = ["spawn", "forkserver", "fork", "reexec"]


@pytest.fixture(scope="module")
def payloads() -> dict[str, Any]:
    """64 MiB each of random bytes, a bytearray and a float64 array (NaNs included:
    compared by their bytes)."""
    data = os.urandom(SIZE)
    return {
        "bytes": data,
        "bytearray": bytearray(data[::-1]),
        "numpy": np.frombuffer(data, dtype=np.float64).reshape(1024, -1)[::-1].copy(),
    }


def same(a: Any, b: Any) -> bool:
    """Bit-exact: the same type, and the same bytes (and shape and dtype for arrays)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    return bool(a == b)


def no_segments_left() -> bool:
    gc.collect()
    return t.segments_in_maps() == 0 and t.segment_fds() == 0


# --------------------------------------------------------------------------------------- #
# Round trips
# --------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("method", START_METHODS)
def test_a_local_round_trip_is_bit_exact(method: str, payloads: dict[str, Any]) -> None:
    offload.init()  # reexec: the re-run program becomes the worker here
    w = offload.spawn(start_method=method)
    try:
        for kind, value in payloads.items():
            back = w.call(t.echo, value)
            assert same(back, value), kind
            if kind == "numpy":
                # The array is a view of the worker's segment, mapped here: no copy.
                assert t.segments_in_maps() >= 1
                assert back.flags.writeable
                back[0, 0] = 1.0  # its own: writing it changes nothing elsewhere
            del back
        pair = w.call(t.echo, (payloads["bytes"], payloads["bytes"]))
        assert pair[0] is pair[1]  # one object sent once comes back as one object
        assert same(pair[0], payloads["bytes"])
    finally:
        w.shutdown(timeout=30)
    assert wait_until(no_segments_left, 10.0)


def test_memoryview_and_pickle_buffer_arguments_arrive_whole() -> None:
    data = bytearray(os.urandom(1 << 20))
    with offload.spawn() as w:
        view = w.call(t.echo, memoryview(data)[8:])
        assert type(view) is memoryview and bytes(view) == bytes(data[8:])
        shaped = memoryview(np.arange(1 << 16, dtype=np.int32).reshape(256, 256))
        back = w.call(t.echo, shaped)
        assert (back.format, back.shape) == (shaped.format, shaped.shape)
        assert back.tobytes() == shaped.tobytes()
        buf = w.call(t.echo, pickle.PickleBuffer(data))
        assert bytes(memoryview(buf)) == bytes(data)
        del view, back, buf
    assert wait_until(no_segments_left, 10.0)


def test_small_and_nested_values_keep_their_types() -> None:
    big = os.urandom(1 << 21)
    value = {"a": [b"x" * 100, bytearray(b"y" * 100), (big, [bytearray(big)])]}
    data, buffers = dumps(value)
    assert len(data) < 4096 and len(buffers) == 2  # the big ones went out of band
    back = loads(data, [bytes(b) for b in buffers])
    assert back == value
    assert type(back["a"][2][1][0]) is bytearray and type(back["a"][2][0]) is bytes
    tiny, none = dumps(((1, "x"), {"k": b"v"}))
    assert none == [] and tiny[0] == 0x80  # the tiny-call path: plain pickle, untouched


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("large-data")


@pytest.fixture(scope="module", params=["tcp", "tls"])
def server(
    request: pytest.FixtureRequest, server_dir: Path, long_lived: Callable[[int], Any]
) -> Iterator[dict[str, Any]]:
    """``offload serve`` (one worker) on 127.0.0.1, plain or TLS: connect() arguments.
    Shared by the module's tests: its workers (started after it listens) are no test's
    leak."""
    kind = request.param
    workdir = server_dir / kind
    workdir.mkdir()
    token_path, token = h.write_token_file(workdir)
    args = ["--listen", "127.0.0.1:0", "--token-file", str(token_path), "--workers", "1"]
    tls = None
    if kind == "tls":
        pki = h.make_pki(workdir / "pki")
        args += ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
        args += ["--tls-ca", pki.ca]
        tls = offload.TLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    env = h.clean_env(PYTHONPATH=os.pathsep.join([str(TESTS_DIR), *sys.path]))
    srv = h.ServerProcess(workdir, args, env=env).start()
    try:
        with long_lived(srv.pid):
            yield {"address": srv.address, "token": token.decode(), "tls": tls}
    finally:
        srv.stop()


def test_a_remote_round_trip_is_bit_exact(server: dict[str, Any], payloads: dict[str, Any]) -> None:
    with offload.connect(**server) as w:
        for kind, value in payloads.items():
            back = w.call(t.echo, value)
            assert same(back, value), kind
            del back


# --------------------------------------------------------------------------------------- #
# SIGKILL mid-transfer: nothing left behind
# --------------------------------------------------------------------------------------- #


def _running(path: str) -> int:
    """The pid the task running on the other end of the FIFO ``path`` writes."""
    with open(path) as f:
        return int(f.readline())


def _killed(fut: offload.Future[Any]) -> bool:
    with pytest.raises(offload.WorkerCrashed, match="SIGKILL"):
        fut.result(WAIT)
    return True


def test_a_worker_killed_holding_a_large_argument_leaves_no_segment(
    tmp_path: Path, payloads: dict[str, Any]
) -> None:
    shm = t.dev_shm()
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    w = offload.spawn()
    try:
        held = w.submit(t.hold, fifo, payloads["numpy"])
        pid = _running(fifo)
        queued = w.submit(t.echo, payloads["bytes"])  # its segment is still in the socket
        assert t.segments_in_maps(pid) >= 1  # the worker maps the client's segment
        assert t.segments_in_maps() >= 1  # and the client its own
        os.kill(pid, signal.SIGKILL)
        assert _killed(held)
        queued.exception(WAIT)  # it may run again on a new worker, or fail: either way
    finally:
        w.shutdown(timeout=30)
    assert wait_until(no_segments_left, 10.0)
    assert t.dev_shm() == shm


def test_a_worker_killed_after_sending_a_large_value_leaves_no_segment(tmp_path: Path) -> None:
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    got: list[Any] = []
    w = offload.spawn()
    try:
        fut = w.submit(t.report_then_hold, fifo, SIZE)
        fut.add_progress_callback(got.append)
        pid = _running(fifo)
        assert wait_until(lambda: bool(got), 10.0)
        os.kill(pid, signal.SIGKILL)
        assert _killed(fut)
        assert type(got[0]) is bytes and len(got[0]) == SIZE
    finally:
        w.shutdown(timeout=30)
    got.clear()
    assert wait_until(no_segments_left, 10.0)


def test_a_killed_worker_leaves_no_segment_while_a_result_array_still_lives(
    tmp_path: Path, payloads: dict[str, Any]
) -> None:
    w = offload.spawn()
    try:
        back = w.call(t.echo, payloads["numpy"])
        pid = w.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not _alive(pid), 10.0)
        # The worker is gone; its segment lives on, mapped, as long as the array does.
        assert same(back, payloads["numpy"])
        assert t.segments_in_maps() >= 1
        del back
    finally:
        w.shutdown(timeout=30)
    assert wait_until(no_segments_left, 10.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------- #
# The frame codec (sans-IO): shared buffers are references, descriptors go first
# --------------------------------------------------------------------------------------- #


class _Board:
    """A stand-in for both ends' shared memory: segments are byte strings in a dict,
    "descriptors" are their numbers."""

    threshold = 1 << 18

    def __init__(self) -> None:
        self.segments: dict[int, bytes] = {}
        self.sent: set[int] = set()

    def export(self, view: memoryview) -> tuple[int, int]:
        number = len(self.segments) + 1
        self.segments[number] = bytes(view)
        return number | (1 << 63), 1000 + number

    def attach(self, ref: int, size: int) -> memoryview:
        return memoryview(self.segments[ref & ~(1 << 63)])[:size]


def test_the_codec_frames_shared_buffers_as_references() -> None:
    from offload import protocol as p

    board = _Board()
    big, small = os.urandom(1 << 20), os.urandom(1000)
    sender = p.Connection("worker")
    sender.sharing = board
    chunks = sender.send(p.Result(call_id=7, status=0, payload=b"x", buffers=(big, small)))
    assert chunks[0] == 1001  # the descriptor, before any byte of the frame
    frame = b"".join(bytes(c) for c in chunks[1:])
    assert len(frame) < 2000  # the megabyte is not in it
    receiver = p.Connection("client")
    receiver.sharing = board
    receiver.state = p.State.OPEN
    receiver.receive_data(frame)
    msg = receiver.next_event()
    assert isinstance(msg, p.Result)
    assert [bytes(b) for b in msg.buffers] == [big, small]
    plain = p.Connection("client")
    plain.state = p.State.OPEN
    plain.receive_data(frame)
    with pytest.raises(ProtocolError, match="shared memory"):
        plain.next_event()  # a connection without shared memory refuses the reference
