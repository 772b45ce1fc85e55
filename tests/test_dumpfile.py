"""The crash-dump file format and what a dump holds (no processes: ``OFFLOAD_DUMP_DIR``
end to end is in ``test_crash_dumps.py``)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

import crashes
import debug_tasks
from offload import dumpfile
from offload import protocol as p
from offload.client.dumps import save_crashed_call
from offload.client.future import Future
from offload.client.options import make_options
from offload.client.slot import CallRecord
from offload.errors import WorkerCrashed
from offload.replay import decode_call, describe
from offload.serde import dumps, function_reference


def test_a_dump_reads_back_as_written_with_mode_0600_and_no_temporary_left(
    tmp_path: Path,
) -> None:
    dump = dumpfile.Dump(
        {"call": {"kind": "inline"}, "note": "é"},
        [("payload", b"\x80\x05abc"), ("buffer", b"x" * 100_000), ("buffer", b"")],
    )
    path = Path(dumpfile.write(str(tmp_path / "new"), "one", dump))
    assert path.name == "one" + dumpfile.SUFFIX
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # made for it, private
    assert [q.name for q in path.parent.iterdir()] == [path.name]
    back = dumpfile.read(str(path))
    assert back.blobs == dump.blobs
    assert back.header["note"] == "é"
    assert back.header["blobs"] == [["payload", 5], ["buffer", 100_000], ["buffer", 0]]
    assert back.buffers() == (b"x" * 100_000, b"")
    assert back.blob("payload") == b"\x80\x05abc" and back.blob("function") == b""


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"something else\n", "is not an offload crash dump"),
        (b"offload-crash-dump 99\n{}\n", "of format 99; this offload reads format 1"),
        (b"offload-crash-dump 1\n{not json\n", "header of the crash dump is damaged"),
        (b'offload-crash-dump 1\n{"blobs": [["payload", 10]]}\nabc', "truncated"),
    ],
)
def test_what_is_not_a_whole_dump_is_refused(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=complaint):
        dumpfile.read(str(path))


def _record(fn: object, *args: object) -> CallRecord:
    function = function_reference(fn)
    payload, buffers = dumps((args, {}))
    return CallRecord(
        call_id=7,
        timeout=2.5,
        retries=0,
        future=Future(),
        kind=p.BY_VALUE,
        target="exit_with_size(...)",
        function=function,
        payload=payload,
        buffers=tuple(buffers),
    )


def _crash() -> WorkerCrashed:
    return WorkerCrashed(
        "worker w (pid 12) was killed by SIGSEGV",
        pid=12,
        signal="SIGSEGV",
        reason="signal",
        stderr_tail="Fatal Python error: Segmentation fault\n",
        worker="w",
    )


def test_a_crashed_call_is_saved_as_it_travelled_with_its_report_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(tmp_path))
    data = bytearray(b"z" * (1 << 20))  # large: an out-of-band buffer
    record = _record(debug_tasks.exit_with_size, data, 1)
    options = make_options(
        name="w",
        start_method="forkserver",
        env={"A": "1"},
        preload=("json",),
        initializer=debug_tasks.remember,
        initargs=(3,),
    )
    path = save_crashed_call(record, _crash(), options, "exit_with_size(b'zz...', 1)")
    assert path is not None
    dump = dumpfile.read(path)
    header = dump.header
    assert header["call"] == {
        "id": 7,
        "kind": "function",
        "target": "exit_with_size(...)",
        "description": "exit_with_size(b'zz...', 1)",
        "timeout": 2.5,
    }
    assert header["worker"] == {
        "name": "w",
        "pid": 12,
        "exitcode": None,
        "signal": "SIGSEGV",
        "reason": "signal",
        "remote": False,
    }
    assert header["error"]["type"] == "WorkerCrashed"
    assert header["error"]["stderr_tail"].startswith("Fatal Python error")
    assert header["options"]["start_method"] == "forkserver"
    assert header["options"]["env"] == {"A": "1"}
    assert header["options"]["preload"] == ["json"]
    assert header["options"]["initializer"] == "remember"
    assert dump.blob("initializer")
    # The very bytes that were sent, and they unpickle into the call.
    assert dump.blob("payload") == record.payload
    assert dump.buffers() == tuple(bytes(b) for b in record.buffers)
    fn, args, kwargs = decode_call(dump)
    assert fn is debug_tasks.exit_with_size
    assert args == (data, 1) and kwargs == {}
    assert "exit_with_size(b'zz...', 1) crashed worker w (pid 12, SIGSEGV" in describe(dump)


def test_without_the_variable_nothing_is_saved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dumpfile.DUMP_DIR_ENV, raising=False)
    record = _record(crashes.identity, 1)
    assert save_crashed_call(record, _crash(), make_options(), "identity(1)") is None


def test_a_dump_that_cannot_be_written_is_logged_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(blocker / "sub"))
    record = _record(crashes.identity, 1)
    with caplog.at_level(logging.WARNING, logger="offload"):
        assert save_crashed_call(record, _crash(), make_options(), "identity(1)") is None
    assert "could not save the call identity(1)" in caplog.text


def test_a_call_by_name_is_looked_up_in_the_registry() -> None:
    payload, _ = dumps(((4,), {}))
    dump = dumpfile.Dump(
        {"call": {"kind": "by_name", "target": "debug-exit-with-remembered"}},
        [("payload", payload)],
    )
    fn, args, kwargs = decode_call(dump)
    assert fn is debug_tasks.exit_with_remembered
    assert (args, kwargs) == ((4,), {})
    unknown = dumpfile.Dump({"call": {"kind": "by_name", "target": "nobody-knows"}}, [])
    with pytest.raises(LookupError, match="no task named 'nobody-knows'"):
        decode_call(unknown)
