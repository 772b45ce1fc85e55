"""The error messages, made in one place (:mod:`offload.client.outcome`), without any
process: each sentence from what happened."""

from __future__ import annotations

import pytest

import offload
from offload import protocol as p
from offload.client import outcome
from offload.client.scheduler import Outcome
from offload.client.slot import ExitInfo
from offload.serde import dumps


def _info(**changes: object) -> ExitInfo:
    fields: dict[str, object] = {
        "name": "w1",
        "pid": 42,
        "exitcode": None,
        "signal": "SIGKILL",
        "reason": "signal",
        "stderr_tail": "",
        "detail": "",
        "remote": False,
    }
    fields.update(changes)
    return ExitInfo(**fields)  # type: ignore[arg-type]


def test_describe_call_is_short() -> None:
    text = outcome.describe_call(len, ("a" * 100, 1, 2, 3, 4), {"k": [1] * 50})
    assert text.startswith("len('aaaa")
    assert "..." in text and len(text) < 200


def test_crash_by_signal_names_worker_pid_call_cause_and_stderr() -> None:
    err = outcome.crashed(_info(stderr_tail="MemoryError\nlast words\n"), "f(1)")
    assert isinstance(err, offload.WorkerCrashed)
    text = str(err)
    assert text.startswith("worker w1 (pid 42) was killed by SIGKILL while running f(1); ")
    assert "out-of-memory" in text  # the likely cause of a SIGKILL nobody sent
    assert "last words" in text
    assert (err.pid, err.signal, err.reason, err.worker) == (42, "SIGKILL", "signal", "w1")


def test_crash_by_exit_says_the_status_and_when_nothing_was_written() -> None:
    err = outcome.crashed(_info(signal=None, reason="exit", exitcode=7), "f()")
    assert "exited with status 7 while running f()" in str(err)
    assert str(err).endswith("it wrote nothing to stderr")
    assert err.exitcode == 7


def test_a_detail_replaces_the_guess() -> None:
    info = _info(detail="its exit status is lost: this program ignores SIGCHLD")
    assert "ignores SIGCHLD" in str(outcome.crashed(info, "f()"))


def test_unresponsive_and_memory_say_what_the_engine_saw() -> None:
    info = _info(signal=None, reason="memory", detail="used 900 MiB, above its memory_limit")
    err = outcome.crashed(info, "f()")
    assert "worker w1 (pid 42) used 900 MiB, above its memory_limit while running f()" in str(err)
    assert err.reason == "memory"


def test_a_remote_crash_is_a_connection_lost() -> None:
    info = _info(name="gpu1:1111", signal=None, reason="unresponsive", remote=True)
    err = outcome.crashed(info, "f()")
    assert isinstance(err, offload.ConnectionLost)
    assert str(err) == "worker server gpu1:1111 (pid 42) lost its connection while running f()"


def test_death_before_the_handshake() -> None:
    err = outcome.start_failed_by_exit(
        _info(signal=None, reason="exit", exitcode=1, stderr_tail="ImportError: x\n"),
        reexec=True,
    )
    assert isinstance(err, offload.StartError)
    assert "exited with status 1 before finishing its handshake" in str(err)
    assert "call offload.init() first" in str(err) and "ImportError: x" in str(err)


@pytest.mark.parametrize(
    ("result", "remote", "expected"),
    [
        (
            Outcome.TIMEOUT,
            False,
            "f() did not finish within its timeout of 2 s; worker w1 (pid 42)",
        ),
        (Outcome.TIMEOUT, True, "it was killed on the worker server w1"),
        (Outcome.KILLED, False, "f() was killed on worker w1 (pid 42)"),
        (Outcome.KILLED, True, "f() was killed on the worker server w1"),
        (Outcome.COLLATERAL, False, "because g() on the same worker timed out or was killed"),
    ],
)
def test_errors_the_engine_decides(result: Outcome, remote: bool, expected: str) -> None:
    err = outcome.scheduler_error(
        result,
        call="f()",
        worker="w1",
        pid=42,
        remote=remote,
        timeout=2.0,
        cause=None,
        other_call="g()",
    )
    assert expected in str(err)
    assert isinstance(err, offload.ExecutionError)


def test_a_start_failure_gives_each_call_its_own_copy() -> None:
    cause = offload.StartError("exec failed", worker="w1")
    kwargs = {"call": "f()", "worker": "w1", "pid": None, "remote": False, "timeout": None}
    one = outcome.scheduler_error(Outcome.START_FAILED, cause=cause, **kwargs)  # type: ignore[arg-type]
    two = outcome.scheduler_error(Outcome.START_FAILED, cause=cause, **kwargs)  # type: ignore[arg-type]
    assert str(one) == str(two) == "exec failed"
    assert one is not two and one is not cause


def _result(status: int, value: object = None, **fields: object) -> p.Result:
    payload, buffers = dumps(value)
    values: dict[str, object] = {
        "call_id": 1,
        "status": status,
        "elapsed": 0.0,
        "type_name": "",
        "message": "",
        "traceback": "",
        "payload": payload,
        "buffers": tuple(buffers),
    }
    values.update(fields)
    return p.Result(**values)  # type: ignore[arg-type]


def test_results_that_are_not_values() -> None:
    kwargs = {"call": "f()", "worker": "w1", "pid": 42}
    raised = outcome.result_error(
        _result(p.RAISED, KeyError("k"), traceback="tb text"),
        **kwargs,  # type: ignore[arg-type]
    )
    assert type(raised) is KeyError
    assert isinstance(raised.__cause__, offload.RemoteTraceback)
    bad = outcome.result_error(_result(p.BAD_RESULT, message="cannot pickle lock"), **kwargs)  # type: ignore[arg-type]
    assert isinstance(bad, offload.SerializationError) and bad.direction == "result"
    unknown = outcome.result_error(_result(p.UNKNOWN_TASK, type_name="resize"), **kwargs)  # type: ignore[arg-type]
    assert isinstance(unknown, offload.NoWorkerAvailable) and unknown.task == "resize"
    assert "knows no task named 'resize'" in str(unknown)
    strange = outcome.result_error(_result(99), **kwargs)  # type: ignore[arg-type]
    assert isinstance(strange, offload.ProtocolError)


def test_an_exception_that_cannot_travel_is_a_remote_error() -> None:
    err = outcome.task_exception(
        _result(p.RAISED, None, type_name="Weird", message="odd", traceback="tb")
    )
    assert isinstance(err, offload.RemoteError)
    assert err.type_name == "Weird"
