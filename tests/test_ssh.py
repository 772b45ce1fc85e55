"""Workers and worker servers started over ssh (``offload.SSH``), against a real sshd.

Each test gets its own ``sshd`` on 127.0.0.1 (:mod:`sshd`), whose session processes
must all be gone at the end of the test: the "remote" machine is this one, so "nothing
left behind there" is checked by pid. The remote interpreter is a wrapper script
(:func:`sshd.python_wrapper`) that puts the remote cache into the test's directory;
"offload is not installed there" is the base interpreter with ``-S``. Tasks travel in
``ssh_tasks``, shipped with ``SSH(ship=...)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

import crashes
import offload
import ssh_tasks
from offload import SSH
from offload.client.options import check_pool_args, make_options
from sshd import MISSING, SSHD, have_sshd, python_wrapper, ssh_children, wait_gone

pytestmark = pytest.mark.skipif(not have_sshd(), reason=MISSING)

RESULT_LIMIT = 60.0  # seconds any one result may take (a bound, not an expectation)


@pytest.fixture
def remote(sshd: SSHD, tmp_path: Path) -> SSH:
    """This virtualenv's Python over ssh, the remote cache in the test's directory."""
    python = python_wrapper(tmp_path / "python", tmp_path / "cache")
    return sshd.ssh(python=python, ship=("ssh_tasks",))


def _socket_dirs(ssh: psutil.Process) -> list[str]:
    """The directories of the socket that ``ssh`` forwards, here and there (both on this
    machine): only this test's, so that ssh tests running beside it (CI runs two Python
    versions' suites at once) cannot make it fail."""
    argv = ssh.cmdline()
    forward = argv[argv.index("-L") + 1]
    return [os.path.dirname(path) for path in forward.split(":", 1)]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's temporary directory, for the test only: the local ends of the
    forwarded sockets are made there, where no other test's are."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


# -- the record ------------------------------------------------------------------------------


def test_the_port_is_passed_only_when_given_so_the_users_ssh_config_applies() -> None:
    from offload.transport.ssh import ssh_argv

    default = ssh_argv(SSH("h1"), "true")
    assert "-p" not in default  # ssh's own: a Port of ~/.ssh/config, else 22
    given = ssh_argv(SSH("h1", port=2222), "true")
    assert given[given.index("-p") + 1] == "2222"
    assert given[-3:] == ["--", "h1", "true"]


def test_ssh_record_is_validated_picklable_and_shows_itself() -> None:
    ssh = SSH("h1", user="me", port=2222, ssh_options=["-o", "X=1"], ship="mypkg")
    assert ssh.ssh_options == ("-o", "X=1") and ssh.ship == ("mypkg",)
    assert pickle.loads(pickle.dumps(ssh)) == ssh
    assert (
        repr(ssh)
        == "offload.SSH('h1', user='me', port=2222, ssh_options=('-o', 'X=1'), ship=('mypkg',))"
    )
    assert str(ssh) == "ssh://me@h1:2222"
    assert str(SSH("::1")) == "ssh://[::1]"
    with pytest.raises(TypeError, match="host"):
        SSH(123)  # type: ignore[arg-type]
    for bad in ("", "-oProxyCommand=x", "a b"):
        with pytest.raises(ValueError, match="host"):
            SSH(bad)
    with pytest.raises(ValueError, match="port"):
        SSH("h", port=0)
    with pytest.raises(TypeError, match="port"):
        SSH("h", port=True)
    with pytest.raises(ValueError, match="user"):
        SSH("h", user="a@b")
    with pytest.raises(ValueError, match="not a module name"):
        SSH("h", ship=["not a module"])
    with pytest.raises(TypeError, match="ssh_options"):
        SSH("h", ssh_options="-v")


def test_ssh_is_accepted_as_where_and_as_pool_hosts() -> None:
    assert make_options(where=SSH("h")).where == SSH("h")
    workers, hosts = check_pool_args(None, [SSH("h1"), "h2:1111"], None, None, workers_per_host=2)
    assert workers == 0 and hosts == [SSH("h1"), "h2:1111"]
    with pytest.raises(ValueError, match="workers_per_host"):
        check_pool_args(None, ["h2:1111"], None, None, workers_per_host=2)
    with pytest.raises(ValueError, match="workers_per_host"):
        check_pool_args(None, [SSH("h1")], None, None, workers_per_host=0)
    with pytest.raises(TypeError, match="hosts\\[0\\]"):
        check_pool_args(None, [("h", 22)], None, None)


def test_bootstrap_refuses_another_python_version(tmp_path: Path) -> None:
    # The bootstrap by itself (no ssh): a client of another Python gets a clear error.
    from offload.client.ssh import LOADER, _bootstrap_source

    boot = _bootstrap_source()
    request = {"nonce": "n", "python": [3, 0], "packages": [], "entry": "x:y", "socket": ""}
    data = b"%d\n" % len(boot) + boot + json.dumps(request).encode() + b"\n"
    done = subprocess.run(
        [sys.executable, "-c", LOADER], input=data, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 1
    line = done.stdout.decode().strip()
    assert line.startswith("@offload:n error ")
    assert "the client runs 3.0" in json.loads(line.split(" ", 2)[2])


# -- one worker ------------------------------------------------------------------------------


def test_spawn_over_ssh_runs_calls(remote: SSH) -> None:
    with offload.spawn(where=remote, name="over-ssh") as w:
        assert w.call(pow, 2, 10) == 1024
        worker_pid = w.call(ssh_tasks.pid)
        assert w.pid is not None
        assert psutil.Process(worker_pid).ppid() == w.pid  # a worker of the remote server
        assert w.address == str(remote)
        assert "over-ssh" in repr(w)
    assert not ssh_children()


def test_timeout_and_kill_of_a_running_call_over_ssh(remote: SSH) -> None:
    with offload.spawn(where=remote) as w:
        sleepy = offload.Task(ssh_tasks.report_and_sleep, register=False, timeout=0.5)
        with pytest.raises(offload.TaskTimeout):
            w.submit(sleepy, 60).result(timeout=RESULT_LIMIT)
        fut = w.submit(ssh_tasks.report_and_sleep, 60)
        started = crashes.started_event(fut)
        assert started.wait(RESULT_LIMIT)
        fut.kill()
        with pytest.raises(offload.WorkerKilled):
            fut.result(timeout=RESULT_LIMIT)
        assert w.call(pow, 3, 2) == 9  # the server lives on
        server = w.pid
        w.kill()  # the server and its ssh go; the next call starts them again
        assert w.call(pow, 2, 2) == 4
        assert w.pid != server
        assert len(ssh_children()) == 1


def test_killing_ssh_is_connection_lost_and_leaves_nothing_behind(remote: SSH) -> None:
    w = offload.spawn(where=remote, name="doomed")
    try:
        fut = w.submit(ssh_tasks.report_and_sleep, 120)
        started = crashes.started_event(fut)
        assert started.wait(RESULT_LIMIT)
        assert w.pid is not None
        server = psutil.Process(w.pid)
        remote_procs = [server, *server.children(recursive=True)]
        assert len(remote_procs) >= 2  # the server and its worker
        (ssh,) = ssh_children()
        socket_dirs = _socket_dirs(ssh)
        assert all(os.path.isdir(d) for d in socket_dirs)
        os.kill(ssh.pid, signal.SIGKILL)
        with pytest.raises(offload.ConnectionLost, match="ssh") as info:
            fut.result(timeout=RESULT_LIMIT)
        assert info.value.worker
        assert wait_gone([p.pid for p in remote_procs], RESULT_LIMIT) == []
    finally:
        w.shutdown()
    assert not ssh_children()
    assert not [d for d in socket_dirs if os.path.exists(d)]  # here and there


def test_start_remote_runs_any_entry_point_behind_a_forwarded_socket(remote: SSH) -> None:
    import socket

    from offload.client.ssh import start_remote
    from offload.transport.loop import get_loop

    ended = threading.Event()
    launch = start_remote(
        remote,
        "ssh_tasks:echo_server",
        {"greeting": "hi "},
        name="echo",
        loop=get_loop(),
        timeout=RESULT_LIMIT,
        on_exit=lambda _: ended.set(),
    )
    try:
        assert launch.ready_text == "echo"
        assert launch.address.startswith("unix:")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(RESULT_LIMIT)
            sock.connect(launch.address.removeprefix("unix:"))
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert data == b"hi " + launch.token
    finally:
        launch.close()
    assert ended.wait(RESULT_LIMIT)  # the entry point returned: the bootstrap and ssh ended
    assert launch.exited


# -- pools -----------------------------------------------------------------------------------


def test_pool_over_ssh_runs_calls_on_both_workers_of_a_host(remote: SSH, tmp_path: Path) -> None:
    fifo = tmp_path / "meet"
    os.mkfifo(fifo)
    with offload.Pool(hosts=[remote], workers_per_host=2) as pool:
        reader = pool.submit(ssh_tasks.meet, str(fifo), "read")
        writer = pool.submit(ssh_tasks.meet, str(fifo), "write")
        pids = {reader.result(timeout=RESULT_LIMIT), writer.result(timeout=RESULT_LIMIT)}
        assert len(pids) == 2  # they ran at the same time, in two worker processes
        assert pool.stats().workers == 1
    assert not ssh_children()


def test_a_pool_starts_a_dropped_ssh_host_again(remote: SSH) -> None:
    with offload.Pool(hosts=[remote], workers_per_host=1) as pool:
        fut = pool.submit(ssh_tasks.report_and_sleep, 120)
        started = crashes.started_event(fut)
        assert started.wait(RESULT_LIMIT)
        (ssh,) = ssh_children()
        os.kill(ssh.pid, signal.SIGKILL)
        with pytest.raises(offload.ConnectionLost):
            fut.result(timeout=RESULT_LIMIT)
        assert pool.submit(pow, 2, 5).result(timeout=RESULT_LIMIT) == 32  # over a new ssh
        (again,) = ssh_children()
        assert again.pid != ssh.pid
    assert not ssh_children()


def test_pool_mixes_local_workers_and_ssh_hosts(remote: SSH) -> None:
    with offload.Pool(workers=1, hosts=[remote], workers_per_host=1) as pool:
        results = list(pool.map(abs, range(-20, 0)))
        assert results == list(range(20, 0, -1))
    assert not ssh_children()


# -- the bootstrap ---------------------------------------------------------------------------


def test_bootstrap_copies_offload_into_an_empty_cache_once(
    sshd: SSHD, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    python = python_wrapper(tmp_path / "python", cache, isolated=True)
    where = sshd.ssh(python=python, ship=("ssh_tasks",))
    caplog.set_level(logging.INFO, logger="offload")

    with offload.spawn(where=where) as w:
        first = w.call(ssh_tasks.module_file, "offload")
        assert w.call(ssh_tasks.module_file, "cloudpickle").startswith(str(cache))
    copied = " ".join(r.getMessage() for r in caplog.records if "copied" in r.getMessage())
    assert "offload-" in copied and "cloudpickle-" in copied and "ssh_tasks-" in copied
    (package_dir,) = (cache / "offload").glob("offload-*")
    assert first.startswith(str(package_dir))
    listing = sorted(os.listdir(cache / "offload"))
    inode = package_dir.stat().st_ino

    caplog.clear()
    with offload.spawn(where=where) as w:  # a warm cache: nothing is copied
        assert w.call(ssh_tasks.module_file, "offload") == first
    assert not [r for r in caplog.records if "copied" in r.getMessage()]
    assert sorted(os.listdir(cache / "offload")) == listing
    assert package_dir.stat().st_ino == inode


def test_two_starts_at_once_fill_the_cache_once(sshd: SSHD, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    python = python_wrapper(tmp_path / "python", cache, isolated=True)
    where = sshd.ssh(python=python, ship=("ssh_tasks",))
    # Two hosts that are the same machine: two bootstraps copy into one empty cache.
    with offload.Pool(hosts=[where, where], workers_per_host=1) as pool:
        files = set(pool.map(ssh_tasks.module_file, ["offload"] * 8, chunksize=1))
    entries = sorted(os.listdir(cache / "offload"))
    assert [e for e in entries if e.startswith("offload-")] == [Path(next(iter(files))).parts[-3]]
    assert not [e for e in entries if e.startswith(".tmp-")]  # no half copy left behind
    assert len(files) == 1


def test_ship_a_local_package(sshd: SSHD, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src" / "shipped_pkg_for_ssh"
    source.mkdir(parents=True)
    (source / "__init__.py").write_text("def where():\n    return __file__\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    import shipped_pkg_for_ssh  # type: ignore[import-not-found]

    try:
        cache = tmp_path / "cache"
        python = python_wrapper(tmp_path / "python", cache)
        where = sshd.ssh(python=python, ship=("shipped_pkg_for_ssh",))
        with offload.spawn(where=where) as w:
            remote_file = w.call(shipped_pkg_for_ssh.where)
        assert remote_file.startswith(str(cache / "offload" / "shipped_pkg_for_ssh-"))
    finally:
        sys.modules.pop("shipped_pkg_for_ssh", None)


def test_output_before_the_handshake_is_relayed_with_the_name(
    sshd: SSHD, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    python = python_wrapper(tmp_path / "python", tmp_path / "cache", say="hello from the login")
    with offload.spawn(where=sshd.ssh(python=python), name="chatty") as w:
        assert w.call(pow, 2, 2) == 4
    err = capfd.readouterr().err
    # Once from its stdout (read by hand before the handshake), once from its stderr.
    assert err.count("[chatty] hello from the login") == 2


# -- failures to start -----------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("case", "quoted"),
    [
        ("wrong port", "Connection refused"),
        ("refused key", "Permission denied"),
        ("no python", "not found"),
    ],
)
def test_start_failures_are_start_errors_quoting_ssh(
    sshd: SSHD, ssh_keys: Path, private_tmp: Path, case: str, quoted: str
) -> None:
    if case == "wrong port":
        where = sshd.ssh(port=_closed_port())
    elif case == "refused key":
        where = sshd.ssh(identity=str(ssh_keys / "other_key"))
    else:
        where = sshd.ssh(python="no-such-python3")
    with pytest.raises(offload.StartError, match=quoted) as info:
        offload.spawn(where=where, name="failing")
    assert quoted in info.value.stderr_tail
    assert "failing" in str(info.value)
    assert not ssh_children()
    # The local end's directory is gone (the remote one is never made: ssh or the
    # remote shell fails before the bootstrap runs).
    assert not list(private_tmp.glob("offload-ssh-*"))
