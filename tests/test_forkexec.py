"""offload.process.forkexec: a spawned worker is started as ``subprocess.Popen`` would
start it, without importing subprocess.

Both ways are held to the same behaviour: ``start_process`` (``fork_exec`` directly, on
the Python versions it knows) and ``_start_with_popen`` (any other version). Real
processes; failures are compared with what ``subprocess.Popen`` itself raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.crashes import wait_until

from offload.process import forkexec
from offload.process.child import reap_pid

LINUX = sys.platform.startswith("linux")
KNOWN = sys.version_info[:2] in forkexec._ARGUMENTS


def _popen_way(argv: list[str], **kwargs: Any) -> forkexec.Started:
    return forkexec._start_with_popen(argv, **kwargs)


WAYS: dict[str, Callable[..., forkexec.Started]] = {
    "fork_exec": forkexec.start_process,
    "popen": _popen_way,
}

# The child reports what it was started with on the descriptor it was passed.
REPORT = """
import json, os, sys
fd = int(sys.argv[1])
mask = os.umask(0)
report = {
    "stdin": sys.stdin.read(),
    "sid": os.getsid(0),
    "pid": os.getpid(),
    "umask": mask,
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "stdout": os.readlink("/proc/self/fd/1") if os.path.exists("/proc/self/fd") else "",
    "open": [],
}
if os.path.exists("/proc/self/fd"):
    for name in os.listdir("/proc/self/fd"):
        try:
            report["open"].append(os.readlink("/proc/self/fd/" + name))
        except OSError:
            pass  # the descriptor listdir used, closed already
print("out", flush=True)
print("err", file=sys.stderr, flush=True)
os.write(fd, json.dumps(report).encode())
"""


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _finish(started: forkexec.Started) -> tuple[int | None, bytes, bytes]:
    """Read the child's stdout and stderr to their end, close them, reap the child:
    its exit code and the two outputs."""
    out = b""
    if started.stdout_fd is not None:
        out = _read_all(started.stdout_fd)
        os.close(started.stdout_fd)
    err = _read_all(started.stderr_fd)
    os.close(started.stderr_fd)
    codes: list[int | None] = []

    def reaped() -> bool:
        codes.append(started.reap())
        return codes[-1] is not None

    assert wait_until(reaped, 30)  # its pipes are closed: it is exiting
    return codes[-1], out, err


def _run_report(
    way: str, tmp_path: Path, *, stdout: str, umask: int = -1
) -> tuple[dict[str, Any], forkexec.Started, int | None, bytes, bytes]:
    if way == "fork_exec" and not KNOWN:
        pytest.skip(f"fork_exec's arguments are not known for {sys.version_info[:2]}")
    read_end, write_end = os.pipe()
    unpassed_r, unpassed_w = os.pipe()
    os.set_inheritable(unpassed_w, True)  # inheritable, yet not passed: must be closed
    targets = {
        "passed": os.readlink(f"/proc/self/fd/{write_end}") if LINUX else "",
        "unpassed": os.readlink(f"/proc/self/fd/{unpassed_w}") if LINUX else "",
    }
    try:
        env = {"PATH": os.environ.get("PATH", ""), "OFFLOAD_FORKEXEC_TEST": "1"}
        started = WAYS[way](
            [sys.executable, "-c", REPORT, str(write_end)],
            env=env,
            cwd=str(tmp_path),
            umask=umask,
            pass_fds=(write_end,),
            stdout=stdout,
            reap=reap_pid,
        )
    finally:
        os.close(write_end)
        os.close(unpassed_w)
    try:
        report = json.loads(_read_all(read_end) or b"{}")
    finally:
        os.close(read_end)
        os.close(unpassed_r)
    code, out, err = _finish(started)
    report.update(targets)
    return report, started, code, out, err


@pytest.mark.parametrize("way", sorted(WAYS))
def test_starts_the_program_as_popen_would(way: str, tmp_path: Path) -> None:
    report, started, code, out, err = _run_report(way, tmp_path, stdout="pipe", umask=0o027)
    assert code == 0, err.decode()
    assert out == b"out\n"
    assert err == b"err\n"
    assert report["pid"] == started.pid
    assert report["sid"] == started.pid  # a new session, led by the worker
    assert report["stdin"] == ""  # /dev/null
    assert report["umask"] == 0o027
    assert Path(report["cwd"]).resolve() == tmp_path.resolve()
    assert report["env"].get("OFFLOAD_FORKEXEC_TEST") == "1"
    # Exactly the environment given (Python may add LC_CTYPE: PEP 538).
    assert set(report["env"]) <= {"PATH", "OFFLOAD_FORKEXEC_TEST", "LC_CTYPE"}
    if LINUX:
        assert report["passed"] in report["open"]
        assert report["unpassed"] not in report["open"]


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("stdout", ["inherit", "devnull"])
def test_stdout_not_through_a_pipe(way: str, stdout: str, tmp_path: Path) -> None:
    report, started, code, _, err = _run_report(way, tmp_path, stdout=stdout)
    assert code == 0, err.decode()
    assert started.stdout_fd is None
    if LINUX:
        mine = os.readlink("/proc/self/fd/1")
        assert report["stdout"] == (os.devnull if stdout == "devnull" else mine)


def _popen_error(argv: list[str], cwd: str | None) -> OSError:
    with pytest.raises(OSError) as caught:
        subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return caught.value


def _start_error(way: str, argv: list[str], cwd: str | None) -> OSError:
    if way == "fork_exec" and not KNOWN:
        pytest.skip(f"fork_exec's arguments are not known for {sys.version_info[:2]}")
    with pytest.raises(OSError) as caught:
        WAYS[way](
            argv,
            env=dict(os.environ),
            cwd=cwd,
            umask=-1,
            pass_fds=(),
            stdout="inherit",
            reap=reap_pid,
        )
    return caught.value


def _same_error(mine: OSError, popen: OSError) -> None:
    assert type(mine) is type(popen)
    assert (mine.errno, mine.strerror, mine.filename) == (
        popen.errno,
        popen.strerror,
        popen.filename,
    )
    assert str(mine) == str(popen)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_a_missing_program_raises_what_popen_raises(way: str, tmp_path: Path) -> None:
    argv = [str(tmp_path / "no-such-python"), "-c", "pass"]
    mine = _start_error(way, argv, None)
    _same_error(mine, _popen_error(argv, None))
    assert isinstance(mine, FileNotFoundError)
    assert mine.filename == argv[0]


@pytest.mark.parametrize("way", sorted(WAYS))
def test_a_missing_working_directory_raises_what_popen_raises(way: str, tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "pass"]
    missing = str(tmp_path / "missing")
    mine = _start_error(way, argv, missing)
    _same_error(mine, _popen_error(argv, missing))
    assert isinstance(mine, FileNotFoundError)
    assert mine.filename == missing


@pytest.mark.parametrize("way", sorted(WAYS))
def test_a_program_is_found_on_the_path_of_its_environment(way: str, tmp_path: Path) -> None:
    if way == "fork_exec" and not KNOWN:
        pytest.skip(f"fork_exec's arguments are not known for {sys.version_info[:2]}")
    (tmp_path / "offload-test-python").symlink_to(sys.executable)
    started = WAYS[way](
        ["offload-test-python", "-c", "print('found')"],
        env={"PATH": str(tmp_path)},
        cwd=None,
        umask=-1,
        pass_fds=(),
        stdout="pipe",
        reap=reap_pid,
    )
    code, out, err = _finish(started)
    assert (code, out) == (0, b"found\n"), err.decode()


@pytest.mark.parametrize("way", sorted(WAYS))
def test_an_illegal_environment_name_raises_value_error(way: str) -> None:
    if way == "fork_exec" and not KNOWN:
        pytest.skip(f"fork_exec's arguments are not known for {sys.version_info[:2]}")
    with pytest.raises(ValueError, match="illegal environment variable name"):
        WAYS[way](
            [sys.executable, "-c", "pass"],
            env={"A=B": "1"},
            cwd=None,
            umask=-1,
            pass_fds=(),
            stdout="inherit",
            reap=reap_pid,
        )


def test_a_spawn_pool_starts_its_workers_without_subprocess() -> None:
    # The reason for the module: a fresh program's spawn pool never imports subprocess.
    code = (
        "import sys, offload\n"
        "pool = offload.Pool(2, start_method='spawn')\n"
        "assert pool.submit(abs, -1).result(timeout=60) == 1\n"
        "pool.shutdown()\n"
        "print('subprocess' in sys.modules, 'locale' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    # 3.10's fork_exec imports subprocess itself (it reads subprocess._USE_VFORK).
    expected = "False" if KNOWN and sys.version_info >= (3, 11) else "True"
    assert out[0] == expected
