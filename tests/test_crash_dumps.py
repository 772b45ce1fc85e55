"""Crash dumps and ``offload replay`` (SPEC section 11, issue #14 item 5).

With ``OFFLOAD_DUMP_DIR`` set, a call that crashed its worker is saved there; ``offload
replay FILE`` runs it again in its own process (checked here by running it as a
subprocess and reading how that process ended), ``offload replay --worker FILE`` in a
fresh worker (checked by the typed error it prints).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import crashes
import debug_tasks
import offload
from offload import dumpfile

RESOLVE_TIMEOUT = 30.0
REPLAY_TIMEOUT = 60.0


def _env() -> dict[str, str]:
    """The replays' environment: no dump directory of their own, no token."""
    return {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}


def replay(path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m offload replay [ARGS] PATH`` in a subprocess, from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "offload", "replay", *args, str(path)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=REPLAY_TIMEOUT,
        check=False,
    )


def the_dump(directory: Path) -> Path:
    files = sorted(directory.glob("*" + dumpfile.SUFFIX))
    assert len(files) == 1, files
    return files[0]


def test_a_segfaulting_call_is_dumped_and_replays_to_the_same_segfault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dumps = tmp_path / "dumps"
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(dumps))
    with offload.spawn(name="crashy") as w:
        err = w.submit(crashes.segfault).exception(timeout=RESOLVE_TIMEOUT)
        assert isinstance(err, offload.WorkerCrashed) and err.signal == "SIGSEGV"
        # The dump is written before the future fails: it is there now.
        path = the_dump(dumps)
        assert w.call(crashes.identity, 5) == 5  # the handle goes on, on a new process
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in dumps.iterdir() if p.name.startswith(".")]  # no temporary left
    dump = dumpfile.read(str(path))
    header = dump.header
    assert header["format"] == dumpfile.FORMAT
    assert header["offload_version"] == offload.__version__
    assert header["call"]["kind"] == "function"
    assert header["call"]["description"] == "segfault()"
    assert header["worker"]["name"] == "crashy"
    assert header["worker"]["signal"] == "SIGSEGV"
    assert header["worker"]["pid"] == err.pid
    assert header["error"]["type"] == "WorkerCrashed"
    assert "Segmentation fault" in header["error"]["stderr_tail"]
    assert header["options"]["start_method"] == "spawn"
    # The header is one line of JSON right after the magic line (``head -2`` shows it).
    with open(path, "rb") as f:
        assert f.readline() == b"offload-crash-dump 1\n"
        assert json.loads(f.readline())["call"]["id"] == header["call"]["id"]

    here = replay(path, cwd=tmp_path)
    assert here.returncode == -signal.SIGSEGV, here.stderr
    assert "Fatal Python error: Segmentation fault" in here.stderr  # faulthandler
    assert "segfault() crashed worker crashy" in here.stderr

    fresh = replay(path, "--worker", cwd=tmp_path)
    assert fresh.returncode == 1, fresh.stderr
    assert fresh.stdout.startswith("WorkerCrashed: "), fresh.stdout
    assert "killed by SIGSEGV" in fresh.stdout


def test_replay_brings_back_a_call_by_name_its_initializer_preload_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(tmp_path))
    with offload.spawn(
        preload=("debug_tasks",),
        initializer=debug_tasks.remember,
        initargs=(7,),
        env={debug_tasks.EXTRA_ENV: "4"},
    ) as w:
        # By name: the worker finds the task in its registry (preload imported it).
        err = w.submit("debug-exit-with-remembered", 2).exception(timeout=RESOLVE_TIMEOUT)
    assert isinstance(err, offload.WorkerCrashed) and err.exitcode == 13, err
    path = the_dump(tmp_path)
    header = dumpfile.read(str(path)).header
    assert header["call"]["kind"] == "by_name"
    assert header["call"]["target"] == "debug-exit-with-remembered"
    assert header["options"]["env"] == {debug_tasks.EXTRA_ENV: "4"}
    assert header["options"]["preload"] == ["debug_tasks"]
    assert header["options"]["initializer"] == "remember"

    here = replay(path, cwd=tmp_path)
    assert here.returncode == 13, here.stderr  # 7 (initializer) + 4 (env) + 2 (argument)
    assert "running the initializer remember" in here.stderr

    fresh = replay(path, "--worker", cwd=tmp_path)
    assert fresh.returncode == 1, fresh.stderr
    assert fresh.stdout.startswith("WorkerCrashed: "), fresh.stdout
    assert "exited with status 13" in fresh.stdout


def test_replay_of_a_lambda_with_a_large_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(tmp_path))
    data = b"x" * (1 << 20) + b"y" * 42  # out of band: a buffer of its own in the dump
    offset = 3
    with offload.spawn() as w:
        fut = w.submit(lambda blob: debug_tasks.exit_with_size(blob, offset), data)
        err = fut.exception(timeout=RESOLVE_TIMEOUT)
    expected = len(data) % 100 + offset
    assert isinstance(err, offload.WorkerCrashed) and err.exitcode == expected, err
    path = the_dump(tmp_path)
    dump = dumpfile.read(str(path))
    assert [len(b) for b in dump.buffers()] == [len(data)]

    here = replay(path, cwd=tmp_path)
    assert here.returncode == expected, here.stderr
    fresh = replay(path, "--worker", cwd=tmp_path)
    assert f"exited with status {expected}" in fresh.stdout, fresh.stdout + fresh.stderr


def test_replay_of_a_call_that_returns_prints_its_value(tmp_path: Path) -> None:
    # Written by hand (a call that crashed once and no longer does, say): replay runs
    # it, prints the repr of its value and exits 0.
    from offload.serde import dumps, function_reference

    payload, buffers = dumps(((21,), {}))
    dump = dumpfile.Dump(
        {"call": {"kind": "function", "target": "identity"}, "sys_path": sys.path},
        [("function", function_reference(crashes.identity)), ("payload", payload)]
        + [("buffer", bytes(b)) for b in buffers],
    )
    path = Path(dumpfile.write(str(tmp_path), "by-hand", dump))
    here = replay(path, cwd=tmp_path)
    assert (here.returncode, here.stdout) == (0, "21\n"), here.stderr
    fresh = replay(path, "--worker", cwd=tmp_path)
    assert (fresh.returncode, fresh.stdout) == (0, "21\n"), fresh.stderr


def test_replay_lets_the_exception_of_the_call_reach_pdb(tmp_path: Path) -> None:
    from offload.serde import dumps, function_reference

    payload, _ = dumps(((), {}))
    dump = dumpfile.Dump(
        {"call": {"kind": "function", "target": "raise_error"}, "sys_path": sys.path},
        [("function", function_reference(crashes.raise_error)), ("payload", payload)],
    )
    path = Path(dumpfile.write(str(tmp_path), "raises", dump))
    plain = replay(path, cwd=tmp_path)
    assert plain.returncode == 1
    assert "in raise_error" in plain.stderr  # the call's own frame, in the traceback
    # The line the docs give: pdb stops in the call's frame, post mortem.
    debugged = subprocess.run(
        [sys.executable, "-m", "pdb", "-m", "offload", "replay", str(path)],
        cwd=tmp_path,
        env=_env(),
        input="continue\nwhere\nquit\n",  # run; at the exception: the stack; leave
        capture_output=True,
        text=True,
        timeout=REPLAY_TIMEOUT,
        check=False,
    )
    assert "Entering post mortem debugging" in debugged.stdout, debugged.stdout
    assert "raise_error()" in debugged.stdout.split("Entering post mortem")[1]


def test_replay_refuses_what_is_not_a_dump(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dump"
    path.write_bytes(b"hello\n")
    result = replay(path, cwd=tmp_path)
    assert result.returncode == 2
    assert "is not an offload crash dump" in result.stderr


def test_a_dump_that_cannot_be_written_does_not_stop_the_future(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(blocker / "dumps"))
    with offload.spawn() as w:
        err = w.submit(crashes.os_exit).exception(timeout=RESOLVE_TIMEOUT)
        assert isinstance(err, offload.WorkerCrashed)
        assert w.call(crashes.identity, 1) == 1
    assert blocker.read_text() == "not a directory"


def test_calls_that_do_not_crash_their_worker_are_not_dumped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(tmp_path))
    with offload.spawn() as w:
        assert isinstance(w.submit(crashes.raise_error).exception(RESOLVE_TIMEOUT), Exception)
        fut = w.submit(crashes.sleep)
        assert crashes.wait_until(fut.running, RESOLVE_TIMEOUT)
        fut.kill()
        assert isinstance(fut.exception(RESOLVE_TIMEOUT), offload.WorkerKilled)
    assert list(tmp_path.iterdir()) == []


def test_a_crash_on_a_worker_server_is_dumped_in_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import remote_helpers as h
    import remote_tasks

    token_path, token = h.write_token_file(tmp_path)
    tests_dir = str(Path(__file__).parent)
    server = h.ServerProcess(
        tmp_path,
        ["--listen", "127.0.0.1:0", "--token-file", str(token_path)],
        env=h.clean_env(PYTHONPATH=tests_dir),
    ).start()
    dumps = tmp_path / "dumps"
    monkeypatch.setenv(dumpfile.DUMP_DIR_ENV, str(dumps))
    try:
        w = offload.connect(server.address, token=token)
        try:
            err = w.submit(remote_tasks.segfault).exception(timeout=RESOLVE_TIMEOUT)
        finally:
            w.shutdown()
    finally:
        assert server.stop() == 0, server.output()
    assert isinstance(err, offload.WorkerCrashed) and err.signal == "SIGSEGV", err
    path = the_dump(dumps)
    header = dumpfile.read(str(path)).header
    assert header["worker"]["remote"] is True
    assert header["worker"]["signal"] == "SIGSEGV"
    assert header["options"]["where"] == server.address
    fresh = replay(path, "--worker", cwd=tmp_path)  # in a local worker this time
    assert fresh.stdout.startswith("WorkerCrashed: "), fresh.stdout + fresh.stderr
    assert "killed by SIGSEGV" in fresh.stdout
