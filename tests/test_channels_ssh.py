"""Channels through workers started over ssh (``offload.SSH``), against a real sshd on
127.0.0.1 (:mod:`sshd`).

Over ssh a worker is an ``offload serve`` on the far side of a forwarded socket, which
relays the channel messages of a call to its child worker: both directions, the
back-pressure of ``maxsize`` across both hops, a producer that crashes there, and one
call streaming to another through a pool of two workers there. The
"remote" machine is this one, so "nothing left behind there" is checked by pid. The
tasks travel in ``channel_tasks``, shipped with ``SSH(ship=...)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import channel_tasks as ct
import offload
from crashes import wait_until
from offload import SSH
from sshd import MISSING, SSHD, have_sshd, python_wrapper, ssh_children

pytestmark = pytest.mark.skipif(not have_sshd(), reason=MISSING)

LIMIT = 60.0  # seconds any one result may take (a bound, not an expectation)


@pytest.fixture
def remote(sshd: SSHD, tmp_path: Path) -> SSH:
    """This virtualenv's Python over ssh, the remote cache in the test's directory."""
    python = python_wrapper(tmp_path / "python", tmp_path / "cache")
    return sshd.ssh(python=python, ship=("channel_tasks",))


def test_a_worker_over_ssh_streams_to_the_parent_within_maxsize(remote: SSH) -> None:
    maxsize, n = 4, 200
    with offload.spawn(where=remote, name="over-ssh") as w:
        tx, rx = offload.channel(maxsize=maxsize)
        fut = w.submit(ct.produce_reporting, tx, n)
        # Nothing consumed yet: across ssh and the server there, exactly maxsize go out.
        assert wait_until(lambda: (fut.progress() or 0) >= maxsize, LIMIT), fut
        assert fut.progress() == maxsize
        for consumed in range(1, n + 1):
            assert rx.recv(timeout=LIMIT) == consumed - 1
            # Reports lag sends: what it reported is a lower bound on what it sent.
            assert (fut.progress() or 0) <= consumed + maxsize
        assert list(rx) == []
        assert fut.result(LIMIT) == n
    assert not ssh_children()


def test_the_parent_streams_to_a_worker_over_ssh(remote: SSH) -> None:
    with offload.spawn(where=remote) as w:
        tx, rx = offload.channel(maxsize=8)
        fut = w.submit(ct.consume_sum, rx)
        with tx:
            for i in range(1000):
                tx.send(i, timeout=LIMIT)
        assert fut.result(LIMIT) == sum(range(1000))
        # Blobs too, and a round trip through one call (rx in, tx out).
        tx, rx = offload.channel(maxsize=4)
        back, back_rx = offload.channel(maxsize=4)
        fut = w.submit(ct.echo, rx, back)
        for i in range(50):
            tx.send(i, timeout=LIMIT)
            assert back_rx.recv(timeout=LIMIT) == 2 * i
        tx.close()
        assert fut.result(LIMIT) == 50 and list(back_rx) == []
    assert not ssh_children()


def test_a_producer_crashing_over_ssh_ends_the_stream_with_worker_crashed(remote: SSH) -> None:
    with offload.spawn(where=remote) as w:
        tx, rx = offload.channel(maxsize=16)
        fut = w.submit(ct.produce_then_die, tx, 5)
        got = []
        with pytest.raises(offload.WorkerCrashed):
            for item in rx:  # the items sent before the crash, then the typed error
                got.append(item)
        assert got == list(range(5))
        with pytest.raises(offload.WorkerCrashed):
            fut.result(LIMIT)
        assert w.call(pow, 2, 5) == 32  # the server there lives on, with a new worker
    assert not ssh_children()


def test_one_call_streams_to_another_through_a_pool_over_ssh(remote: SSH) -> None:
    with offload.Pool(hosts=[remote], workers_per_host=2) as pool:
        tx, rx = offload.channel(maxsize=8)
        consumer = pool.submit(ct.consume_sum, rx)
        producer = pool.submit(ct.produce, tx, 500)  # its items pass through here
        assert producer.result(LIMIT) == "produced"
        assert consumer.result(LIMIT) == sum(range(500))
    assert not ssh_children()
