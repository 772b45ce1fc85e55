"""Large frames through ``offload serve``: one copy on the server, MACs still enforced.

* A 64 MiB round trip (plain TCP and TLS) raises the server process's peak resident
  memory by about one frame: the client's argument is let go once the worker has it,
  before the 64 MiB result arrives, and neither is ever copied whole inside the server.
* On plain TCP a large frame is received in place and its MAC checked as it arrives; a
  bit flipped anywhere in it (start, middle, MAC) drops the connection and nothing of
  it is unpickled, while the same frame sealed right runs (the control).

How fast this goes is measured by ``python -m benchmarks --only data``, not here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import offload
import remote_helpers as h
from offload import protocol as p
from offload.protocol.connection import HEADER

SIZE = 64 << 20
BIG = 2 << 20  # a buffer that makes a call's frame large (received in place)
SLACK = 24 << 20  # what the server may take beyond one 64 MiB frame (code, buffers)
CLOSE_LIMIT = 5.0

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="peak memory from /proc (Linux)"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote-large-frames")


@pytest.fixture(scope="module")
def token_file(workdir: Path) -> tuple[Path, bytes]:
    return h.write_token_file(workdir)


@pytest.fixture(scope="module")
def pki(workdir: Path) -> h.PKI:
    return h.make_pki(workdir / "pki")


def _serve(workdir: Path, token_file: Path, *extra: str, name: str) -> h.ServerProcess:
    args = ["--listen", "127.0.0.1:0", "--token-file", str(token_file), "--workers", "1"]
    return h.ServerProcess(workdir, [*args, *extra], name=name).start()


@pytest.fixture(scope="module")
def plain(
    workdir: Path, token_file: tuple[Path, bytes], long_lived: Callable[[int], Any]
) -> Iterator[h.ServerProcess]:
    server = _serve(workdir, token_file[0], name="plain")
    with long_lived(server.pid):  # its workers start after it listens: no test's leak
        yield server
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def tls_server(
    workdir: Path, token_file: tuple[Path, bytes], pki: h.PKI, long_lived: Callable[[int], Any]
) -> Iterator[h.ServerProcess]:
    tls_args = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    server = _serve(workdir, token_file[0], *tls_args, name="tls")
    with long_lived(server.pid):
        yield server
    assert server.stop() == 0, server.output()


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.parametrize("kind", ["plain", "tls"])
def test_a_64_mib_round_trip_holds_one_frame_on_the_server(
    kind: str,
    plain: h.ServerProcess,
    tls_server: h.ServerProcess,
    token_file: tuple[Path, bytes],
    pki: h.PKI,
) -> None:
    server = plain if kind == "plain" else tls_server
    tls = offload.TLS(ca=str(pki.ca)) if kind == "tls" else None
    data = os.urandom(SIZE)
    with offload.connect(server.address, token=token_file[1], tls=tls) as w:
        assert w.call(len, b"warm") == 4  # the server's code paths, imported and run
        try:
            with open(f"/proc/{server.pid}/clear_refs", "w") as f:
                f.write("5")  # restart the peak (VmHWM) from the current RSS
        except OSError:
            pytest.skip("this kernel cannot reset a process's peak memory")
        before = _status_kib(server.pid, "VmRSS")
        assert w.call(bytes, data) == data
        peak = _status_kib(server.pid, "VmHWM")
    grown = (peak - before) << 10
    assert grown <= SIZE + SLACK, (
        f"the server's peak memory rose by {grown / (1 << 20):.0f} MiB for a 64 MiB "
        "argument and result: it held more than one frame at once"
    )


def _large_marker_call(marker: Path) -> p.Call:
    """A call whose payload creates ``marker`` when unpickled, in a large frame."""
    call = h.marker_call(marker)
    return p.Call(
        call_id=call.call_id,
        kind=call.kind,
        timeout=0.0,
        target=call.target,
        payload=call.payload,
        buffers=(os.urandom(BIG),),
    )


def test_a_large_frame_sealed_right_runs(
    plain: h.ServerProcess, token_file: tuple[Path, bytes], tmp_path: Path
) -> None:
    """The control for the next test: the same frame, untouched, is unpickled."""
    marker = tmp_path / "MARKER"
    with h.RawClient(plain.port, timeout=30.0) as raw:
        raw.open(token_file[1])
        raw.sendall(raw.frame(_large_marker_call(marker)))
        raw.recv_result(1, limit=60.0)
    assert marker.exists()


@pytest.mark.parametrize("where", ["body-start", "body-middle", "mac"])
def test_a_tampered_large_frame_drops_the_connection_and_never_runs(
    plain: h.ServerProcess, token_file: tuple[Path, bytes], tmp_path: Path, where: str
) -> None:
    marker = tmp_path / "MARKER"
    with h.RawClient(plain.port, timeout=30.0) as raw:
        raw.open(token_file[1])
        frame = bytearray(raw.frame(_large_marker_call(marker)))
        index = {"body-start": HEADER.size, "body-middle": len(frame) // 2, "mac": -1}[where]
        frame[index] ^= 0x01
        try:
            raw.sendall(bytes(frame))
        except OSError:
            pass  # the server may close before it has taken all of it
        closed, _ = raw.closed_by_peer(CLOSE_LIMIT)
        assert closed, "the server kept a connection that sent a forged large frame"
    assert not marker.exists(), "a forged large frame was unpickled"
    with offload.connect(plain.address, token=token_file[1]) as w:
        assert w.call(len, b"still serving") == 13
