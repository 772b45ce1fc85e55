"""The worker's pieces with no process: settings encoding and running one call
(:mod:`offload.worker.settings`, :mod:`offload.worker.execution`)."""

from __future__ import annotations

import os
import pickle
import socket
import threading
from typing import Any, NoReturn

import pytest

import offload
from offload import protocol as p
from offload.serde import dumps, function_reference, loads
from offload.worker.execution import Execution
from offload.worker.settings import WorkerSettings, decode_settings, encode_settings

# -- settings ----------------------------------------------------------------------------


def _settings() -> WorkerSettings:
    return WorkerSettings(
        fd=7,
        name="offload-worker-3",
        ppid=4121,
        sys_path=("/src", "/lib"),
        concurrency=4,
        max_message_size=1 << 20,
        preload=("json",),
        heartbeat=(1.0, 5.0),
        shutdown_on="heartbeat_timeout",
    )


def test_settings_survive_encoding() -> None:
    settings = _settings()
    text = encode_settings(settings)
    assert all(c in "0123456789abcdef" for c in text)  # an environment variable's value
    assert decode_settings(text) == settings
    assert decode_settings(encode_settings(WorkerSettings())) == WorkerSettings()


def test_decoding_ignores_fields_it_does_not_know() -> None:
    fields = {**_settings().as_dict(), "from_a_newer_version": 1}
    assert decode_settings(pickle.dumps(fields).hex()) == _settings()


def test_decoding_refuses_what_is_not_settings() -> None:
    with pytest.raises(TypeError, match="must be a dict"):
        decode_settings(pickle.dumps([1, 2]).hex())
    with pytest.raises(ValueError):
        decode_settings("not hex")


def test_settings_are_immutable_and_replace_makes_copies() -> None:
    settings = _settings()
    with pytest.raises(AttributeError, match="immutable"):
        settings.fd = 3  # type: ignore[misc]
    changed = settings.replace(fd=3, sys_path=["/x"])
    assert (changed.fd, changed.sys_path, settings.fd) == (3, ("/x",), 7)
    assert changed != settings
    with pytest.raises(TypeError, match="no field nope"):
        settings.replace(nope=1)
    assert pickle.loads(pickle.dumps(settings)) == settings  # forkserver requests
    assert "name='offload-worker-3'" in repr(settings)


# -- execution ---------------------------------------------------------------------------


def _call(fn: Any, *args: Any, call_id: int = 1, **kwargs: Any) -> p.Call:
    data, buffers = dumps((fn, args, kwargs))
    return p.Call(
        call_id=call_id,
        kind=p.BY_VALUE,
        timeout=0.0,
        target="",
        payload=data,
        buffers=tuple(buffers),
    )


def _fails(message: str) -> None:
    raise KeyError(message)


def _unpicklable() -> threading.Lock:
    return threading.Lock()


def _reports(n: int) -> int:
    for i in range(n):
        offload.report(i)
    return n


def test_a_value_comes_back_with_the_time_it_took() -> None:
    result = Execution(name="t").run(_call(divmod, 7, 2, call_id=5))
    assert (result.call_id, result.status) == (5, p.OK)
    assert loads(result.payload, result.buffers) == (3, 1)
    assert 0.0 < result.elapsed < 10.0


def test_a_function_sent_by_reference_runs() -> None:
    data, buffers = dumps(((-3,), {}))
    call = p.Call(
        call_id=2,
        kind=p.BY_VALUE,
        timeout=0.0,
        target="",
        payload=data,
        buffers=tuple(buffers),
        function=function_reference(abs),
    )
    execution = Execution(name="t")
    for _ in range(2):  # the second time from the cache
        result = execution.run(call)
        assert loads(result.payload, result.buffers) == 3


def test_a_raised_exception_comes_back_with_its_traceback() -> None:
    result = Execution(name="t").run(_call(_fails, "boom"))
    assert result.status == p.RAISED
    assert result.type_name == "KeyError"
    assert result.message == "'boom'"
    assert "_fails" in result.traceback
    assert "Execution.run" not in result.traceback.splitlines()[1]  # the task's frames first
    exc = loads(result.payload, result.buffers)
    assert isinstance(exc, KeyError) and exc.args == ("boom",)
    assert result.elapsed > 0.0


def test_an_unpicklable_result_is_a_bad_result() -> None:
    result = Execution(name="t").run(_call(_unpicklable))
    assert result.status == p.BAD_RESULT
    assert "could not be pickled" in result.message
    assert "lock" in result.message
    assert result.elapsed > 0.0


def test_a_result_above_the_message_size_limit_is_a_bad_result() -> None:
    result = Execution(name="t", max_message_size=1000).run(_call(bytes, 5000))
    assert result.status == p.BAD_RESULT
    assert "exceeds max_message_size (1000 bytes)" in result.message


def test_arguments_that_cannot_be_unpickled_are_a_bad_argument() -> None:
    call = p.Call(call_id=3, kind=p.BY_VALUE, timeout=0.0, target="", payload=b"garbage")
    result = Execution(name="t").run(call)
    assert result.status == p.BAD_ARGUMENT
    assert "could not be unpickled in the worker" in result.message


def test_an_unknown_task_name() -> None:
    data, _ = dumps(((), {}))
    call = p.Call(call_id=4, kind=p.BY_NAME, timeout=0.0, target="no-such-task", payload=data)
    result = Execution(name="t").run(call)
    assert (result.status, result.type_name) == (p.UNKNOWN_TASK, "no-such-task")


def test_progress_goes_to_the_report_callback_with_the_call_id() -> None:
    seen: list[tuple[int, Any]] = []
    execution = Execution(name="t", report=lambda call_id, value: seen.append((call_id, value)))
    result = execution.run(_call(_reports, 3, call_id=9))
    assert loads(result.payload, result.buffers) == 3
    assert seen == [(9, 0), (9, 1), (9, 2)]
    offload.report("outside a call")  # does nothing
    assert len(seen) == 3
    dropped = Execution(name="t").run(_call(_reports, 2))  # no callback: progress dropped
    assert dropped.status == p.OK
    assert "progress reported" in repr(execution)


# -- the loop's bookkeeping (no socket: nothing here reads or writes) --------------------


def test_the_loop_skips_calls_cancelled_before_they_start() -> None:
    from offload.worker.loop import WorkerLoop

    loop = WorkerLoop(WorkerSettings(name="w", concurrency=2, heartbeat=(1.0, 5.0)))
    assert not loop.inline
    loop.cancelled.add(1)  # as an inline loop notes a Cancel read with its call
    loop.handle(p.Shutdown())
    assert "w pid=" in repr(loop) and "2 threads" in repr(loop)
    assert "2 queued, 1 cancelled" in repr(loop)  # one stop per thread
    loop.run_call(_call(divmod, 7, 2, call_id=1))  # cancelled: skipped (SKIPPED sent)
    assert not loop.cancelled
    assert WorkerLoop(WorkerSettings(name="w")).inline


# -- calls given back while another runs (a socketpair; the test is the client) ---------

_gate = threading.Event()
_running = threading.Event()


def _hold() -> str:
    """A call that runs until the test opens ``_gate`` (in this process)."""
    _running.set()
    assert _gate.wait(30.0)
    return "held"


class _Client:
    """The client's end of a worker loop's socketpair, speaking the protocol."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = p.Connection("client", name="test", pid=os.getpid())
        self.pending: list[p.Message] = []
        self.sock.sendall(b"".join(bytes(c) for c in self.conn.hello()))

    def send(self, *msgs: p.Message) -> None:
        self.sock.sendall(b"".join(bytes(c) for m in msgs for c in self.conn.send(m)))

    def next(self, timeout: float = 10.0) -> p.Message:
        self.sock.settimeout(timeout)
        while not self.pending:
            self.conn.receive_data(self.sock.recv(1 << 16))
            self.conn.next_events(self.pending)
            self.pending = [m for m in self.pending if not isinstance(m, p.Hello)]
        return self.pending.pop(0)


@pytest.mark.parametrize("mode", ["inline", "threaded"])
def test_a_call_waiting_behind_a_running_one_is_given_back_at_once(mode: str) -> None:
    """A Cancel of a call that waits behind a running one is answered SKIPPED while that
    call still runs (inline: the watcher thread reads; threaded: the reader thread), and
    the call never runs; a Cancel of a call that has started changes nothing."""
    from offload.worker import loop as worker_loop

    a, b = socket.socketpair()
    threaded = {"concurrency": 1, "heartbeat": (1.0, 60.0)} if mode == "threaded" else {}
    loop = worker_loop.WorkerLoop(WorkerSettings(name="w", fd=a.fileno(), **threaded))
    assert loop.inline is (mode == "inline")
    assert loop._watcher is None  # started with the first call that has one behind it

    def gone() -> NoReturn:  # not the worker's exit: this is the test's own process
        raise AssertionError("the worker loop saw its client go")

    loop.die = gone  # type: ignore[method-assign]
    loop.say_hello()
    client = _Client(b)
    _gate.clear()
    _running.clear()
    if loop.inline:
        runner = threading.Thread(target=loop.inline_loop)
    else:
        reader = threading.Thread(target=loop.read_loop)
        reader.start()
        runner = threading.Thread(target=loop.execute_loop)
    try:
        # Both in one write: the loop has the second waiting when it starts the first.
        client.send(_call(_hold, call_id=1), _call(divmod, 7, 2, call_id=2))
        runner.start()
        assert _running.wait(10.0)
        client.send(p.Cancel(call_id=2))
        skipped = client.next()
        assert isinstance(skipped, p.Result) and (skipped.call_id, skipped.status) == (
            2,
            p.SKIPPED,
        )
        assert runner.is_alive() and not _gate.is_set()  # call 1 still runs
        client.send(p.Cancel(call_id=1))  # too late: it runs on
        _gate.set()
        held = client.next()
        assert isinstance(held, p.Result) and (held.call_id, held.status) == (1, p.OK)
        assert loads(held.payload, held.buffers) == "held"
        client.send(_call(divmod, 9, 2, call_id=3), p.Shutdown())
        third = client.next()  # call 2 never ran: the next answer is call 3's
        assert isinstance(third, p.Result) and third.call_id == 3
        runner.join(10.0)
        assert not runner.is_alive()
        assert (loop._watcher is not None) is loop.inline
    finally:
        _gate.set()
        if runner.is_alive():  # a failed assertion above: stop the loop first
            client.send(p.Shutdown())
            runner.join(10.0)
        if not loop.inline:
            loop.request_stop()  # the reader sees the end of its input, on purpose
            reader.join(10.0)
            assert not reader.is_alive()
        loop._leaving = True  # the watcher thread returns
        if loop._watcher is not None:
            loop._watcher.join(10.0)
        if loop._nonblocking is not None:
            loop._nonblocking.detach()  # the loop's socket object must not close ``a``
        a.close()
        b.close()
