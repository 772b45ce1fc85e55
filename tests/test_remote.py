"""Remote workers end to end (SPEC sections 5 and 7): real ``offload serve`` processes,
``offload.connect``, ``Pool(hosts=...)``, the Procord model (``offload.init`` with
``--offload-host`` / ``--offload-server``), the ``offload`` command, and failures of the
network, the server and the client.

Servers are real processes started with ``PYTHONPATH`` including ``tests/`` (so their
workers import :mod:`remote_tasks` by reference), on 127.0.0.1, [::1], unix sockets in
``tmp_path`` or addresses inside the test's own network namespaces; every one is stopped
by pid with a bounded wait and its exit status checked. Tasks write their pid to a file
and wait for a release file (bounded), so the tests synchronise on files, never on sleeps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

import crashes
import offload
import remote_tasks as rt
from offload.protocol import PROTOCOL_VERSION, PYTHON_VERSION, Hello
from offload.protocol.auth import Sealer, ServerHandshake
from offload.protocol.codec import encode_body
from remote_helpers import die_with_parent

TESTS_DIR = Path(__file__).resolve().parent
WAIT = 15.0  # seconds the test waits for something a server or a task does
STOP_WAIT = 20.0  # seconds a server gets to exit after SIGTERM
BANNER = re.compile(rb"offload: serving on (?P<address>\S+) \(pid (?P<pid>\d+)\)")
OFFLOAD_ENV = ("OFFLOAD_HOST", "OFFLOAD_PORT", "OFFLOAD_SERVER", "OFFLOAD_TOKEN")
OFFLOAD_ENV_ALL = (*OFFLOAD_ENV, "OFFLOAD_TOKEN_FILE", "OFFLOAD_START_METHOD")


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def wait_until(predicate: Callable[[], bool], limit: float = WAIT) -> bool:
    return crashes.wait_until(predicate, limit)


def read_pid(path: Path, limit: float = WAIT) -> int:
    """The pid a task wrote to ``path`` (written atomically by the task)."""
    assert wait_until(path.exists, limit), f"no task wrote {path.name} within {limit:g} s"
    return int(path.read_text())


def gone(pid: int) -> bool:
    """The process is dead (a zombie counts: its parent reaps it, not us)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def parent_of(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None


def time_until_gone(pid: int, limit: float) -> float | None:
    """Seconds until ``pid`` is dead, or None if it still lives after ``limit``."""
    start = time.monotonic()
    if wait_until(lambda: gone(pid), limit):
        return time.monotonic() - start
    return None


@contextlib.contextmanager
def released(path: Path) -> Iterator[Path]:
    """Touch ``path`` on the way out, so held calls end even when the test fails (and
    the worker or pool around them can shut down at once)."""
    try:
        yield path
    finally:
        path.touch()


def child_env(**extra: str) -> dict[str, str]:
    """The environment for servers and scripts: ``tests/`` importable, no OFFLOAD_*."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLOAD_ENV_ALL}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env.update(extra)
    return env


def offload_command(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the real ``offload`` command (``python -m offload.cli``)."""
    return subprocess.run(
        [sys.executable, "-m", "offload.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        check=False,
    )


def ipv6_unavailable() -> str | None:
    """Why IPv6 loopback cannot be used here, or None when it can."""
    if not socket.has_ipv6:
        return "this Python has no IPv6 support"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"cannot bind [::1]: {exc}"
    return None


def skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    pytest.skip(reason)


class ServerProcess:
    """One ``offload serve`` (or a Procord program in server mode) run as a real process.

    The constructor waits (bounded) for the ``offload: serving on ADDR (pid N)`` line.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in _close()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only calls prctl; see remote_helpers
        )
        self.pid = self.proc.pid
        try:
            line = self._banner(WAIT)
        except BaseException:
            self.kill()
            raise
        match = BANNER.search(line)
        assert match is not None, f"unexpected banner {line!r}"
        assert int(match["pid"]) == self.pid, line
        self.address = match["address"].decode()
        self.port = 0 if self.address.startswith("unix:") else int(self.address.rsplit(":", 1)[1])

    def _banner(self, limit: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        data = b""
        deadline = time.monotonic() + limit
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.argv[:6]} printed no banner within {limit:g} s; "
                    f"stdout {data!r}; stderr: {self.log()}"
                )
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(5)
                    raise AssertionError(
                        f"the server exited with status {self.proc.returncode} before "
                        f"listening; stdout {data!r}; stderr: {self.log()}"
                    )
                data += chunk
        return data.split(b"\n", 1)[0]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, expect: int | None = 0) -> int:
        """SIGTERM, bounded wait, and (unless ``expect`` is None) check the status."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            log = self.log()  # before kill() closes it
            self.kill()
            raise AssertionError(
                f"server pid {self.pid} did not exit within {STOP_WAIT:g} s of SIGTERM; "
                f"stderr: {log}"
            ) from None
        self._close()
        if expect is not None:
            assert code == expect, f"server exit status {code}, expected {expect}: {self.log()}"
        return code

    def kill(self) -> None:
        """SIGKILL (after SIGCONT, in case it was stopped) and reap."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
                os.kill(self.pid, signal.SIGCONT)
        self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is one of this server's worker processes."""
        return parent_of(pid) == self.pid


def wait_concurrent(address: str, token: str, count: int, scratch: Path) -> None:
    """Wait (bounded) until the server at ``address`` runs ``count`` calls at once.

    A server prints its banner before its worker processes are up; calls sent while one
    is still starting may queue behind a running call (see
    ``test_server_does_not_queue_a_call_behind_a_running_one``). Tests that need several
    calls running on one server at once wait for this first."""
    with offload.connect(address, token=token) as w:
        for attempt in range(30):
            meeting = scratch / f"meet-{os.getpid()}-{time.monotonic_ns()}-{attempt}"
            meeting.mkdir()
            futs = [w.submit(rt.rendezvous, str(meeting), count, 0.5) for _ in range(count)]
            if all(f.result(WAIT) for f in futs):
                return
    raise AssertionError(f"the server at {address} never ran {count} calls at once")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """A token file: 32 random bytes as hex text, mode 0600."""
    path = tmp_path / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


@pytest.fixture
def token(token_file: Path) -> str:
    return token_file.read_text().strip()


ServeFactory = Callable[..., ServerProcess]


@pytest.fixture
def serve(tmp_path: Path, token_file: Path, token: str) -> Iterator[ServeFactory]:
    """Start ``offload serve`` processes; teardown kills (by pid) any still running."""
    started: list[ServerProcess] = []

    def start(
        listen: str = "127.0.0.1:0",
        *extra: str,
        workers: int = 2,
        token_path: Path | None = None,
        prefix: Sequence[str] = (),
        argv: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        concurrent: bool = False,
    ) -> ServerProcess:
        """Start a server; with ``concurrent``, also wait until it runs ``workers``
        calls at once (its workers are all up)."""
        if argv is None:
            argv = [
                *prefix,
                sys.executable,
                "-m",
                "offload.cli",
                "serve",
                "--listen",
                listen,
                "--token-file",
                str(token_path or token_file),
                "--workers",
                str(workers),
                *extra,
            ]
        server = ServerProcess(
            argv, tmp_path / f"server-{len(started)}.log", child_env(**(env or {}))
        )
        started.append(server)
        if concurrent:
            wait_concurrent(server.address, token, workers, tmp_path)
        return server

    yield start
    for server in started:
        if server.running:
            server.kill()
        else:
            server._close()


# --------------------------------------------------------------------------- #
# 1. connect(): values, lambdas, exceptions, crashes, kill, timeout, progress
# --------------------------------------------------------------------------- #


class _RecordingSink:
    """A RawSink that records what the engine hands it (in place of a server session)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.cond = threading.Condition()
        self.outcomes: dict[int, Any] = {}
        self.held: set[int] = set()  # passed on with flush=False, not flushed yet
        self.batched = 0

    def call_done(self, call_id: int, outcome: Any, *, flush: bool = True) -> None:
        with self.cond:
            self.outcomes[call_id] = outcome
            if flush:
                self.held.clear()  # a flush writes what was held back too
            else:
                self.held.add(call_id)
                self.batched += 1
            self.cond.notify_all()

    def flush(self) -> None:
        with self.cond:
            self.held.clear()
            self.cond.notify_all()

    def call_progress(self, msg: Any) -> None:
        pass

    def settled(self) -> bool:
        return len(self.outcomes) == self.expected and not self.held


def test_relayed_results_are_passed_on_in_batches_and_always_flushed() -> None:
    """A server relays its workers' results through a sink: the engine passes each batch
    it reads with flush=False and flushes the sink once after it (one write per batch
    to the client instead of one per result), and never leaves a result held back."""
    from offload import protocol as p
    from offload.client.engine import Engine
    from offload.client.local import LocalSlot
    from offload.client.options import make_options
    from offload.serde import dumps

    calls = 2000
    sink = _RecordingSink(calls)
    engine = Engine(make_options(), 1, keep_warm=True, label="relay-test", slot_factory=LocalSlot)
    engine.start()
    try:
        ids = []
        for i in range(calls):
            call_id = engine.new_call_id()
            ids.append(call_id)
            payload, _ = dumps((abs, (-i,), {}))
            call = p.Call(
                call_id=call_id, kind=p.BY_VALUE, timeout=0.0, target="abs(...)", payload=payload
            )
            engine.submit_raw(call_id, call, sink)
        with sink.cond:
            assert sink.cond.wait_for(sink.settled, timeout=20), (
                f"{len(sink.outcomes)} of {calls} results, {len(sink.held)} held back"
            )
        assert all(isinstance(sink.outcomes[c], p.Result) for c in ids)
        assert [sink.outcomes[c].status for c in ids] == [p.OK] * calls
        assert sink.batched > 0  # results were read several at a time and batched
    finally:
        engine.shutdown(wait=True, cancel_futures=True, timeout=10)


def test_connect_returns_values_and_lambdas_travel(serve: ServeFactory, token: str) -> None:
    server = serve()
    factor = 3
    with offload.connect(server.address, token=token) as w:
        assert w.address == server.address
        assert w.pid == server.pid  # a remote worker's pid is its server's
        assert w.alive
        assert w.call(rt.add, 2, 3) == 5
        assert w.call(lambda x: x * 2, 21) == 42
        assert w.submit(lambda: factor * 14).result(WAIT) == 42  # a closure, by value
        pid = w.call(rt.getpid)
        assert pid != os.getpid()
        assert server.owns(pid), "the call did not run in a worker of the server"
    server.stop(expect=0)


def test_connect_task_exception_comes_back_as_itself(serve: ServeFactory, token: str) -> None:
    server = serve()
    with offload.connect(server.address, token=token) as w:
        fut = w.submit(rt.fail, "remote boom", 7)
        with pytest.raises(rt.TaskError) as info:
            fut.result(WAIT)
        assert type(info.value) is rt.TaskError
        assert info.value.args == ("remote boom", 7)
        cause = info.value.__cause__
        assert isinstance(cause, offload.RemoteTraceback)
        assert "TaskError" in str(cause)
        assert "in fail" in str(cause)
        assert isinstance(fut.status(), offload.Raised)
        assert w.call(rt.add, 1, 1) == 2  # the worker is fine
    server.stop(expect=0)


def test_connect_segfault_on_server_is_worker_crashed(
    serve: ServeFactory, token: str, token_file: Path
) -> None:
    server = serve()
    with offload.connect(server.address, token=token) as w:
        fut = w.submit(rt.segfault)
        with pytest.raises(offload.WorkerCrashed) as info:
            fut.result(WAIT)
        err = info.value
        assert not isinstance(err, offload.ConnectionLost), err  # the server did not die
        assert err.signal == "SIGSEGV", err
        assert err.reason == "signal", err
        assert "Segmentation fault" in err.stderr_tail, err.stderr_tail[-500:]
        assert "SIGSEGV" in str(err)
        assert err.pid is not None
        assert server.owns(err.pid) or gone(err.pid)
        # The server lives on: the next call works, and it still answers operators.
        assert server.running
        assert w.call(rt.add, 20, 22) == 42
    status = offload_command("status", server.address, "--token-file", str(token_file))
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["calls_failed"] >= 1
    assert state["busy"] == 0
    server.stop(expect=0)


def test_connect_kill_kills_the_call_on_the_server(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    server = serve()
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        fut = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
        pid = read_pid(tmp_path / "pid")
        assert server.owns(pid)
        killed_at = time.monotonic()
        assert fut.kill() is True
        with pytest.raises(offload.WorkerKilled):
            fut.result(WAIT)
        assert wait_until(lambda: gone(pid), killed_at + 2.0 - time.monotonic()), (
            f"the killed call's process {pid} still runs on the server 2 s after kill()"
        )
        assert isinstance(fut.status(), offload.Failed)
        assert fut.kill() is False  # already finished
        assert w.call(rt.add, 1, 2) == 3  # the server replaced its worker
    server.stop(expect=0)


def test_inline_server_kills_a_call_still_waiting_for_a_thread(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    """With ``--isolation inline`` a call that waits for the server's only thread can be
    withdrawn (a running one cannot be killed); the server then forgets it and drains
    cleanly."""
    server = serve("127.0.0.1:0", "--isolation", "inline", "--drain-timeout", "5", workers=1)
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        first = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
        assert read_pid(tmp_path / "pid") == server.pid  # it holds the only thread
        second = w.submit(rt.add, 1, 2)  # sent ahead to the server, where it waits
        assert not second.running()  # it has not started: killing it cancels it
        assert second.kill() is True
        with pytest.raises(concurrent.futures.CancelledError):
            second.result(WAIT)
        release.touch()
        assert first.result(WAIT) == server.pid
        assert w.call(rt.add, 2, 3) == 5
    assert server.stop(expect=0) == 0  # no call left behind to wait for at the drain


def test_connect_per_call_timeout(serve: ServeFactory, token: str, tmp_path: Path) -> None:
    server = serve()
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        started = time.monotonic()
        fut = w.submit(offload.task(rt.hold, timeout=0.5), str(tmp_path / "pid"), str(release))
        with pytest.raises(offload.TaskTimeout) as info:
            fut.result(WAIT)
        elapsed = time.monotonic() - started
        assert isinstance(info.value, TimeoutError)
        assert info.value.timeout == 0.5
        assert 0.4 <= elapsed < 5.0, elapsed
        pid = read_pid(tmp_path / "pid", 1.0)  # the call had started on the server
        assert time_until_gone(pid, 2.0) is not None, f"timed-out call {pid} still runs"
        assert w.call(rt.add, 2, 2) == 4
    server.stop(expect=0)


@pytest.mark.parametrize("isolation", ["pool", "inline"])
def test_connect_progress_reports_arrive_through_the_server(
    serve: ServeFactory, token: str, tmp_path: Path, isolation: str
) -> None:
    """``offload.report`` reaches the client from a worker of the server and from a call
    on the server's own threads (``--isolation inline``) alike."""
    server = serve("127.0.0.1:0", "--isolation", isolation)
    seen: list[Any] = []
    go = tmp_path / "go"
    with offload.connect(server.address, token=token) as w:
        fut = w.submit(rt.report_steps, 5, str(go))
        fut.add_progress_callback(seen.append)
        assert fut.progress() is None
        go.touch()
        assert fut.result(WAIT) == 5
        assert fut.progress() == 4
        assert seen == [0, 1, 2, 3, 4]
    server.stop(expect=0)


# --------------------------------------------------------------------------- #
# 2. Addresses: IPv6, unix sockets, DNS names
# --------------------------------------------------------------------------- #


def test_ipv6_loopback_address(serve: ServeFactory, token: str, token_file: Path) -> None:
    reason = ipv6_unavailable()
    if reason is not None:
        skip(f"IPv6 loopback unavailable: {reason}")
    server = serve("[::1]:0")
    assert server.address.startswith("[::1]:"), server.address
    with offload.connect(server.address, token=token) as w:
        assert w.call(rt.add, 40, 2) == 42
    ping = offload_command("ping", server.address, "--token-file", str(token_file))
    assert ping.returncode == 0, ping.stderr
    server.stop(expect=0)


def test_unix_socket_address(
    serve: ServeFactory, token: str, token_file: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "sock"  # created by the server, mode 0700
    path = directory / "offload.sock"
    server = serve(f"unix:{path}")
    assert server.address == f"unix:{path}"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    with offload.connect(f"unix:{path}", token=token) as w:
        assert w.call(rt.add, 1, 41) == 42
        assert w.call(lambda: "by value") == "by value"
    status = offload_command("status", f"unix:{path}", "--token-file", str(token_file))
    assert status.returncode == 0, status.stderr
    server.stop(expect=0)
    assert not path.exists(), "the server left its socket file behind"


def test_dns_name_address(serve: ServeFactory, token: str) -> None:
    server = serve("localhost:0")
    with offload.connect(f"localhost:{server.port}", token=token) as w:
        assert w.call(rt.add, 2, 40) == 42
    with offload.Pool(hosts=[f"localhost:{server.port}"], token=token) as pool:
        assert pool.submit(rt.add, 3, 4).result(WAIT) == 7
    server.stop(expect=0)


# --------------------------------------------------------------------------- #
# 3. Failures: server killed or stopped, client killed, server restarted
# --------------------------------------------------------------------------- #


def test_server_sigkilled_mid_call_is_connection_lost(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    server = serve()
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        fut = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
        task_pid = read_pid(tmp_path / "pid")
        started = time.monotonic()
        os.kill(server.pid, signal.SIGKILL)
        err = fut.exception(WAIT)
        elapsed = time.monotonic() - started
        assert isinstance(err, offload.ConnectionLost), repr(err)
        assert elapsed < 2.0, f"ConnectionLost took {elapsed:.2f} s"
        assert err.reason == "disconnected", err
        assert server.address in str(err) or str(server.port) in str(err), str(err)
    server.kill()
    assert server.proc.returncode == -signal.SIGKILL
    # SPEC 4: a worker never outlives its creator, not even when it is SIGKILLed.
    assert time_until_gone(task_pid, 5.0) is not None, (
        f"the SIGKILLed server's worker {task_pid} lives on"
    )


def test_server_sigstopped_mid_call_is_unresponsive(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    server = serve()
    release = tmp_path / "release"
    try:
        with (
            offload.connect(server.address, token=token, heartbeat=(0.2, 1.0)) as w,
            released(release),
        ):
            assert w.call(rt.add, 1, 1) == 2
            fut = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
            read_pid(tmp_path / "pid")
            started = time.monotonic()
            os.kill(server.pid, signal.SIGSTOP)
            err = fut.exception(WAIT)
            elapsed = time.monotonic() - started
            assert isinstance(err, offload.ConnectionLost), repr(err)
            assert err.reason == "unresponsive", err
            assert elapsed < 2.5, f"the heartbeat noticed after {elapsed:.2f} s"
    finally:
        os.kill(server.pid, signal.SIGCONT)
    release.touch()  # the orphaned call finishes, so the drain is clean
    server.stop(expect=0)


CLIENT_SCRIPT = """
import sys

import offload
import remote_tasks

address, token_file, pid_path, release = sys.argv[1:]
with open(token_file) as f:
    token = f.read().strip()
w = offload.connect(address, token=token)
fut = w.submit(remote_tasks.hold, pid_path, release)
fut.result(60)  # never comes: the test SIGKILLs this process
"""


@pytest.mark.leak_grace(10)
def test_client_sigkilled_mid_call_server_kills_the_call(
    serve: ServeFactory, token_file: Path, tmp_path: Path
) -> None:
    server = serve()
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    pid_path = tmp_path / "pid"
    with open(tmp_path / "client.log", "wb") as log:
        client = subprocess.Popen(
            [
                sys.executable,
                str(script),
                server.address,
                str(token_file),
                str(pid_path),
                str(tmp_path / "never"),  # never created: the call holds until killed
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        try:
            task_pid = read_pid(pid_path)
            assert server.owns(task_pid)
        finally:
            client.kill()
            client.wait(10)
    started = time.monotonic()
    took = time_until_gone(task_pid, 8.0)
    assert took is not None, (
        f"the vanished client's call (pid {task_pid}) still runs 8 s after it died"
    )
    elapsed = time.monotonic() - started
    # The server waits its disconnect grace (5 s) for the client to come back first.
    assert elapsed >= 3.0, f"the orphaned call was killed after only {elapsed:.2f} s"
    server.stop(expect=0)


def test_pool_reconnects_to_a_restarted_server(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    first = serve()
    port = first.port
    with offload.Pool(hosts=[first.address], token=token) as pool:
        assert pool.submit(rt.add, 1, 2).result(WAIT) == 3
        first.kill()
        second = serve(f"127.0.0.1:{port}")
        assert second.port == port
        value: Any = None
        errors: list[BaseException] = []
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                value = pool.submit(rt.pid_and_value, "again").result(WAIT)
                break
            except offload.OffloadError as exc:
                errors.append(exc)
        assert value is not None, f"the pool never used the restarted server: {errors[-3:]}"
        pid, text = value
        assert text == "again"
        assert second.owns(pid)
    second.stop(expect=0)


# --------------------------------------------------------------------------- #
# 4. Pools across servers
# --------------------------------------------------------------------------- #


def wait_ready(pool: offload.Pool, slots: int) -> None:
    """Wait (bounded) until every slot of ``pool`` is connected and idle."""
    assert wait_until(lambda: pool.stats().idle == slots), pool.stats()


def test_pool_runs_calls_on_both_servers(serve: ServeFactory, token: str, tmp_path: Path) -> None:
    a, b = serve(concurrent=True), serve(concurrent=True)
    release = tmp_path / "release"
    with offload.Pool(hosts=[a.address, b.address], token=token) as pool, released(release):
        wait_ready(pool, 2)
        # Four held calls fill the four slots (two per server): both servers must run some.
        futs = [pool.submit(rt.hold, str(tmp_path / f"pid{i}"), str(release)) for i in range(4)]
        pids = [read_pid(tmp_path / f"pid{i}") for i in range(4)]
        release.touch()
        assert [f.result(WAIT) for f in futs] == pids
        owners = {a.pid if a.owns(pid) else b.pid if b.owns(pid) else None for pid in pids}
        assert owners == {a.pid, b.pid}, (pids, a.pid, b.pid)
        assert pool.stats().failed == 0
    a.stop(expect=0)
    b.stop(expect=0)


def test_pool_mixes_local_and_remote_workers(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    a = serve(concurrent=True)
    release = tmp_path / "release"
    with offload.Pool(workers=1, hosts=[a.address], token=token) as pool, released(release):
        wait_ready(pool, 2)
        futs = [pool.submit(rt.hold, str(tmp_path / f"pid{i}"), str(release)) for i in range(3)]
        pids = [read_pid(tmp_path / f"pid{i}") for i in range(3)]
        parents = sorted(parent_of(pid) or 0 for pid in pids)
        local = pool.worker_pids()
        release.touch()
        assert [f.result(WAIT) for f in futs] == pids
        assert parents == sorted([os.getpid(), a.pid, a.pid]), (parents, os.getpid(), a.pid)
        assert len(local) == 1
        assert local[0] in pids
    a.stop(expect=0)


def _server_running(pid: int, *servers: ServerProcess) -> ServerProcess:
    owners = [s for s in servers if s.owns(pid)]
    assert len(owners) == 1, f"task pid {pid} runs under none of the servers"
    return owners[0]


def test_pool_retries_a_lost_hosts_call_on_the_other_host(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    a, b = serve(), serve()
    release = tmp_path / "release"
    with offload.Pool(hosts=[a.address, b.address], token=token) as pool, released(release):
        wait_ready(pool, 2)
        fut = pool.submit(
            offload.task(rt.hold_once, retries=1),
            str(tmp_path / "marker"),
            str(tmp_path / "pid"),
            str(release),
        )
        first_pid = read_pid(tmp_path / "pid")
        lost = _server_running(first_pid, a, b)
        other = b if lost is a else a
        lost.kill()
        retried_pid = fut.result(WAIT)  # re-run on the other server: returns at once
        assert other.owns(retried_pid), (retried_pid, other.pid)
        assert other.running
        assert pool.submit(rt.add, 1, 2).result(WAIT) == 3
    other.stop(expect=0)


def test_pool_lost_host_without_retries_is_connection_lost(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    a, b = serve(), serve()
    release = tmp_path / "release"
    with offload.Pool(hosts=[a.address, b.address], token=token) as pool, released(release):
        wait_ready(pool, 2)
        fut = pool.submit(rt.hold, str(tmp_path / "pid"), str(release))
        lost = _server_running(read_pid(tmp_path / "pid"), a, b)
        other = b if lost is a else a
        lost.kill()
        err = fut.exception(WAIT)
        assert isinstance(err, offload.ConnectionLost), repr(err)
        pid = pool.submit(rt.getpid).result(WAIT)  # the pool goes on, on the other host
        assert other.owns(pid)
    other.stop(expect=0)


def test_pool_map_over_hosts(serve: ServeFactory, token: str) -> None:
    a, b = serve(), serve()
    with offload.Pool(hosts=[a.address, b.address], token=token) as pool:
        results = list(pool.map(rt.square, range(100)))
        assert [value for value, _ in results] == [x * x for x in range(100)]
        for _, pid in results:
            assert a.owns(pid) or b.owns(pid)
        chunked = list(pool.map(rt.square, range(20), chunksize=3))
        assert [value for value, _ in chunked] == [x * x for x in range(20)]
        unordered = sorted(v for v, _ in pool.imap_unordered(rt.square, range(30)))
        assert unordered == sorted(x * x for x in range(30))
    a.stop(expect=0)
    b.stop(expect=0)


SLOW_START = """
import os
import time

# Imported (--preload) by each worker of the server at start: the first worker starts at
# once, the others wait (bounded) until the test creates the gate file.
_dir = os.environ["SLOW_START_DIR"]
try:
    os.close(os.open(os.path.join(_dir, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
except FileExistsError:
    open(os.path.join(_dir, f"waiting-{os.getpid()}"), "w").close()
    _deadline = time.monotonic() + 20.0
    while not os.path.exists(os.path.join(_dir, "gate")) and time.monotonic() < _deadline:
        time.sleep(0.01)
"""


def test_server_does_not_queue_a_call_behind_a_running_one(
    serve: ServeFactory, token: str, token_file: Path, tmp_path: Path
) -> None:
    modules, gate = tmp_path / "modules", tmp_path / "gate"
    modules.mkdir()
    gate.mkdir()
    (modules / "slow_start.py").write_text(SLOW_START)
    pythonpath = os.pathsep.join([str(TESTS_DIR), str(modules)])
    server = serve(
        "127.0.0.1:0",
        "--preload",
        "slow_start",
        workers=3,
        env={"PYTHONPATH": pythonpath, "SLOW_START_DIR": str(gate)},
    )
    assert wait_until(lambda: len(list(gate.glob("waiting-*"))) == 2), list(gate.iterdir())
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        held = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
        read_pid(tmp_path / "pid")  # running on the one worker that is up
        quick = w.submit(rt.add, 1, 2)
        later = w.submit(rt.add, 3, 4)

        # The server handles a connection's messages in order: once it reports a queued
        # call, it has placed `quick` (queued too, or sent behind `held`).
        def queued() -> int:
            done = offload_command("status", server.address, "--token-file", str(token_file))
            assert done.returncode == 0, done.stderr
            return int(json.loads(done.stdout)["queued"])

        assert wait_until(lambda: queued() >= 1), "the server never queued a call"
        (gate / "gate").touch()  # the two other workers come up
        assert later.result(WAIT) == 7
        # Two workers are idle now: `quick` must not wait for `held` (30 s).
        assert quick.result(5.0) == 3
        assert not held.done()
    assert held.result(WAIT) > 0
    server.stop(expect=0)


# --------------------------------------------------------------------------- #
# 5. The Procord model: one program, client and server
# --------------------------------------------------------------------------- #

PROCORD_SCRIPT = """
import json
import os
import sys

import offload


@offload.task(name="crunch")
def crunch(x):
    return x * 2, os.getpid()


def main():
    offload.init()
    print("ARGV " + json.dumps(sys.argv[1:]), flush=True)
    value, pid = offload.delegate(crunch, 21).result(30)
    print(f"RESULT {value} {pid} {os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
"""


def _run_procord_client(
    script: Path, args: Sequence[str], env: dict[str, str]
) -> tuple[list[str], int, int, int]:
    """Run the program as a client; (its argv[1:], value, server-side pid, own pid)."""
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    argv = next(json.loads(line[5:]) for line in lines if line.startswith("ARGV "))
    _, value, pid, own = next(line for line in lines if line.startswith("RESULT ")).split()
    return argv, int(value), int(pid), int(own)


def test_procord_program_as_server_and_client(
    serve: ServeFactory, token_file: Path, token: str, tmp_path: Path
) -> None:
    script = tmp_path / "procord.py"
    script.write_text(PROCORD_SCRIPT)
    server = serve(
        argv=[
            sys.executable,
            str(script),
            "--offload-server",
            "--offload-port",
            "0",
            "--offload-token-file",
            str(token_file),
        ]
    )
    assert server.address == f"127.0.0.1:{server.port}"
    ping = offload_command("ping", f"127.0.0.1:{server.port}", "--token-file", str(token_file))
    assert ping.returncode == 0, ping.stderr
    assert "pong" in ping.stdout

    # Command-line options, removed from sys.argv wherever they are.
    argv, value, pid, own = _run_procord_client(
        script,
        [
            "first",
            "--offload-host",
            "127.0.0.1",
            "second",
            f"--offload-port={server.port}",
            "--offload-token-file",
            str(token_file),
            "third",
        ],
        child_env(),
    )
    assert argv == ["first", "second", "third"]
    assert value == 42
    assert pid != own
    assert server.owns(pid), "delegate() did not run the call on the server"

    # The same through OFFLOAD_* environment variables.
    env = child_env(
        OFFLOAD_HOST="127.0.0.1", OFFLOAD_PORT=str(server.port), OFFLOAD_TOKEN_FILE=str(token_file)
    )
    argv, value, pid, own = _run_procord_client(script, ["--verbose"], env)
    assert argv == ["--verbose"]
    assert value == 42
    assert pid != own
    assert server.owns(pid)

    # Its registered task answers by name to any client.
    with offload.connect(server.address, token=token) as w:
        value, pid = w.call("crunch", 50)
        assert value == 100
        assert server.owns(pid)
    server.stop(expect=0)


# --------------------------------------------------------------------------- #
# 6. The offload command and the version check
# --------------------------------------------------------------------------- #


def test_ping_and_status(serve: ServeFactory, token_file: Path) -> None:
    server = serve()
    ping = offload_command("ping", server.address, "--token-file", str(token_file))
    assert ping.returncode == 0, ping.stderr
    assert "pong" in ping.stdout
    status = offload_command("status", server.address, "--token-file", str(token_file))
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert {"offload", "slots", "busy", "calls_served", "uptime"} <= state.keys(), state
    assert state["offload"] == offload.__version__
    assert state["slots"] == 2
    assert state["busy"] == 0
    assert state["calls_served"] == 0
    assert state["uptime"] >= 0
    server.stop(expect=0)


def test_busy_polling_stops_when_the_server_goes_idle(serve: ServeFactory, token: str) -> None:
    """After traffic the server polls for a moment before it sleeps (``--busy-poll``);
    once idle it must use next to no CPU."""
    server = serve("127.0.0.1:0", "--busy-poll", "0.05")
    proc = psutil.Process(server.pid)
    with offload.connect(server.address, token=token) as w:
        for _ in range(50):
            assert w.call(abs, -1) == 1
        before = sum(proc.cpu_times()[:2])
        threading.Event().wait(1.0)  # an idle second is what this test observes
        used = sum(proc.cpu_times()[:2]) - before
    assert used < 0.3, f"an idle server used {used:.2f} s of CPU in 1 s"
    server.stop(expect=0)


def test_busy_poll_must_not_be_negative(token: str) -> None:
    from offload.server.server import Server

    with pytest.raises(ValueError, match="busy_poll"):
        Server("127.0.0.1:0", token=token.encode(), busy_poll=-1.0)


def test_wrong_token_is_refused(serve: ServeFactory, tmp_path: Path) -> None:
    server = serve()
    wrong = tmp_path / "wrong-token"
    fd = os.open(wrong, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    for command in ("ping", "status"):
        done = offload_command(command, server.address, "--token-file", str(wrong))
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "pong" not in done.stdout
        assert done.stderr.strip()
    with pytest.raises(offload.AuthenticationError):
        offload.connect(server.address, token=wrong.read_text().strip())
    with offload.Pool(hosts=[server.address], token=wrong.read_text().strip()) as pool:
        err = pool.submit(rt.add, 1, 2).exception(WAIT)
        assert isinstance(err, offload.AuthenticationError), repr(err)
    assert server.running
    server.stop(expect=0)


FAKE_VERSION = "0.0.0.fake"


def _fake_server(listener: socket.socket, token: bytes, clients: int, errors: list[str]) -> None:
    """Accept ``clients`` connections; prove the token, then send a sealed Hello that
    claims offload FAKE_VERSION, and wait (bounded) for the client to hang up."""
    try:
        for _ in range(clients):
            sock, _ = listener.accept()
            with sock:
                sock.settimeout(WAIT)
                handshake = ServerHandshake(token)
                while not handshake.done:
                    data = sock.recv(4096)
                    if not data:
                        raise ConnectionError("the client hung up during the handshake")
                    handshake.receive_data(data)
                    sock.sendall(handshake.data_to_send())
                client_key, server_key = handshake.session_keys()
                sealer = Sealer(server_key, client_key)
                hello = Hello(
                    role="server",
                    offload_version=FAKE_VERSION,
                    protocol_version=PROTOCOL_VERSION,
                    python_version=PYTHON_VERSION,
                    pid=os.getpid(),
                    name="fake-server",
                    slots=1,
                )
                body = b"".join(bytes(chunk) for chunk in encode_body(hello))
                mac = sealer.seal([body])
                sock.sendall(struct.pack("!Q", len(body) + len(mac)) + body + mac)
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(repr(exc))


def test_version_mismatch_names_both_versions(token: str, token_file: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(WAIT)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        errors: list[str] = []
        thread = threading.Thread(
            target=_fake_server, args=(listener, token.encode(), 2, errors), daemon=True
        )
        thread.start()
        try:
            with pytest.raises(offload.VersionMismatch) as info:
                offload.connect(address, token=token)
            message = str(info.value)
            assert offload.__version__ in message, message
            assert FAKE_VERSION in message, message
            assert info.value.remote[0] == FAKE_VERSION
            assert info.value.local[0] == offload.__version__
            ping = offload_command("ping", address, "--token-file", str(token_file))
            assert ping.returncode == 1, ping.stdout
            assert FAKE_VERSION in ping.stderr, ping.stderr
        finally:
            thread.join(WAIT + 5)
        assert not thread.is_alive()
        assert errors == []


CONNECT_RACE = """
import os
import socket
import sys
import threading

handled = threading.Event()
finished = threading.Event()


def in_engine(frame, name):
    return frame.f_code.co_name == name and frame.f_code.co_filename.endswith("engine.py")


def other_threads(frame, event, arg):
    if event == "return" and in_engine(frame, "start_failed"):
        handled.set()  # the failed connection has been fully handled


def main_thread(frame, event, arg):
    if event == "call" and in_engine(frame, "wait_ready"):
        handled.wait(5.0)  # the failure wins the race, as it may on a busy machine


def watchdog():
    if not finished.wait(10.0):
        print(f"connect() hung (failure handled first: {handled.is_set()})", flush=True)
        os._exit(3)


threading.Thread(target=watchdog, daemon=True).start()
threading.setprofile(other_threads)  # offload's I/O loop and connect threads start later
sys.setprofile(main_thread)
import offload

refuser = socket.socket()  # bound, not listening: connecting to it is refused at once
refuser.bind(("127.0.0.1", 0))
try:
    offload.connect("127.0.0.1:%d" % refuser.getsockname()[1], token="x" * 64)
except offload.NoWorkerAvailable as exc:
    print("refused:", exc, flush=True)
finished.set()
"""


def test_connect_failing_fast_never_hangs(tmp_path: Path) -> None:
    """A connection refused at once must raise NoWorkerAvailable, whichever thread wins.

    The script delays the main thread at the entry of ``Engine.wait_ready`` until the
    I/O thread has handled the failure (``Engine.start_failed`` returned): the order a
    busy machine produces now and then (seen here: ``connect()`` with a wrong token
    hanging for good under load, until ``wait_ready`` checked for an earlier failure)."""
    script = tmp_path / "connect_race.py"
    script.write_text(CONNECT_RACE)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert "refused:" in done.stdout, done.stdout


def test_drain_exit_status_3_when_calls_are_killed(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    server = serve("127.0.0.1:0", "--drain-timeout", "0.5")
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        fut = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
        task_pid = read_pid(tmp_path / "pid")
        server.stop(expect=3)
        err = fut.exception(WAIT)
        assert isinstance(err, offload.ExecutionError), repr(err)
    assert time_until_gone(task_pid, 5.0) is not None


def test_inline_server_ends_at_the_drain_deadline_and_fails_the_running_call(
    serve: ServeFactory, token: str, tmp_path: Path
) -> None:
    """A call on one of an inline server's own threads cannot be killed: at the drain
    deadline the server ends anyway (status 3), and the call fails with WorkerKilled
    rather than hanging the drain until the call ends."""
    server = serve("127.0.0.1:0", "--isolation", "inline", "--drain-timeout", "0.5", workers=1)
    release = tmp_path / "release"
    with offload.connect(server.address, token=token) as w, released(release):
        fut = w.submit(rt.hold, str(tmp_path / "pid"), str(release))
        read_pid(tmp_path / "pid")
        started = time.monotonic()
        server.stop(expect=3)
        assert time.monotonic() - started < 5.0
        err = fut.exception(WAIT)
        assert isinstance(err, offload.WorkerKilled), repr(err)
        assert "drain deadline" in str(err)


# --------------------------------------------------------------------------- #
# 7. Several machines: network namespaces joined by veth pairs
# --------------------------------------------------------------------------- #


class Namespaces:
    """Two network namespaces, each a "machine" at 10.211.N.2 reached over a veth pair
    whose root side is 10.211.N.1. Servers started inside are stopped (by pid) before the
    namespaces are deleted."""

    def __init__(self, tmp_path: Path, token_file: Path) -> None:
        tag = os.getpid() % 100000
        self.tmp_path = tmp_path
        self.token_file = token_file
        self.token = token_file.read_text().strip()
        self.names = [f"offload-test-{tag}-{side}" for side in "ab"]
        self.links = [f"oft{tag}{side}0" for side in "ab"]
        self.peers = [f"oft{tag}{side}1" for side in "ab"]
        self.subnets = self._free_subnets()
        self.hosts = [f"10.211.{n}.2" for n in self.subnets]
        self.servers: list[ServerProcess] = []
        self._made_ns: list[str] = []
        self._made_links: list[str] = []

    @staticmethod
    def _free_subnets() -> list[int]:
        """Two 10.211.N.0/24 subnets no interface of this machine uses (another test run
        may have namespaces of its own), starting from one picked by our pid."""
        shown = subprocess.run(
            ["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        used = {int(n) for n in re.findall(r"inet 10\.211\.(\d+)\.", shown)}
        start = os.getpid() % 200
        free = [n for n in [*range(start, 250), *range(1, start)] if n > 0 and n not in used]
        return free[:2]

    @staticmethod
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)

    def create(self) -> None:
        for i in range(2):
            name, link, peer = self.names[i], self.links[i], self.peers[i]
            self.ip("netns", "add", name)
            self._made_ns.append(name)
            self.ip("link", "add", link, "type", "veth", "peer", "name", peer)
            self._made_links.append(link)
            self.ip("link", "set", peer, "netns", name)
            self.ip("addr", "add", f"10.211.{self.subnets[i]}.1/24", "dev", link)
            self.ip("link", "set", link, "up")
            self.ip("netns", "exec", name, "ip", "addr", "add", f"{self.hosts[i]}/24", "dev", peer)
            self.ip("netns", "exec", name, "ip", "link", "set", peer, "up")
            self.ip("netns", "exec", name, "ip", "link", "set", "lo", "up")

    def serve(self, i: int, *extra: str) -> ServerProcess:
        argv = [
            "ip",
            "netns",
            "exec",
            self.names[i],
            sys.executable,
            "-m",
            "offload.cli",
            "serve",
            "--listen",
            f"{self.hosts[i]}:0",
            "--token-file",
            str(self.token_file),
            "--workers",
            "2",
            *extra,
        ]
        server = ServerProcess(argv, self.tmp_path / f"ns-server-{i}.log", child_env())
        self.servers.append(server)
        wait_concurrent(server.address, self.token, 2, self.tmp_path)
        return server

    def destroy(self) -> None:
        for server in self.servers:  # every process in a namespace dies before it
            if server.running:
                server.kill()
            else:
                server._close()
        for link in self._made_links:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.ip("link", "del", link)
        for name in self._made_ns:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.ip("netns", "del", name)


@pytest.fixture
def namespaces(tmp_path: Path, token_file: Path) -> Iterator[Namespaces]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        skip("network namespaces need root")
    if shutil.which("ip") is None:
        skip("no `ip` command (iproute2)")
    ns = Namespaces(tmp_path, token_file)
    try:
        try:
            ns.create()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", "") or ""
            skip(f"cannot create network namespaces: {exc} {detail.strip()}")
        yield ns
    finally:
        ns.destroy()


@pytest.mark.leak_grace(10)
def test_pool_across_two_machines_survives_a_link_going_down(
    namespaces: Namespaces, token: str, tmp_path: Path
) -> None:
    a, b = namespaces.serve(0), namespaces.serve(1)
    assert a.address.startswith(namespaces.hosts[0]), a.address
    assert b.address.startswith(namespaces.hosts[1]), b.address
    release = tmp_path / "release"
    with (
        offload.Pool(hosts=[a.address, b.address], token=token, heartbeat=(0.5, 2.0)) as pool,
        released(release),
    ):
        wait_ready(pool, 2)
        pids = {pid for _, pid in pool.map(rt.square, range(40), chunksize=1)}
        assert any(a.owns(pid) for pid in pids)
        assert any(b.owns(pid) for pid in pids)

        # Fill all four slots: calls 0 and 1 may be retried, 2 and 3 may not.
        futs = []
        for i in range(4):
            args = (str(tmp_path / f"pid{i}"), str(release))
            if i < 2:
                futs.append(
                    pool.submit(
                        offload.task(rt.hold_once, retries=1), str(tmp_path / f"mark{i}"), *args
                    )
                )
            else:
                futs.append(pool.submit(rt.hold, *args))
        pids_held = [read_pid(tmp_path / f"pid{i}") for i in range(4)]
        on_a = [i for i, pid in enumerate(pids_held) if a.owns(pid)]
        assert len(on_a) == 2, f"expected two calls per machine, got {on_a} on A"
        # (The pool spreads calls over the least loaded host: A runs calls 0 and 2.)
        assert sorted(i < 2 for i in on_a) == [False, True], f"calls {on_a} run on A"

        started = time.monotonic()
        namespaces.ip("link", "set", namespaces.links[0], "down")  # machine A drops off
        release.touch()  # B's calls finish; A's results can no longer arrive
        outcomes: dict[int, Any] = {}
        for i, fut in enumerate(futs):
            err = fut.exception(WAIT)
            outcomes[i] = err if err is not None else fut.result()
        elapsed = time.monotonic() - started
        assert elapsed < 6.0, f"the lost machine's calls took {elapsed:.2f} s to resolve"
        for i, outcome in outcomes.items():
            if i not in on_a:
                assert outcome == pids_held[i], (i, outcome)
            elif i < 2:  # retries=1: re-run on machine B
                assert isinstance(outcome, int), (i, outcome)
                assert b.owns(outcome), (i, outcome, b.pid)
            else:
                assert isinstance(outcome, offload.ConnectionLost), (i, outcome)
                assert outcome.reason == "unresponsive", outcome
        assert pool.submit(rt.add, 2, 3).result(WAIT) == 5  # B still serves the pool
        pool.shutdown(wait=True, timeout=10)
    b.stop(expect=0)
    # A's calls finished inside A (released) although their answers could not get out.
    a.stop(expect=0)
