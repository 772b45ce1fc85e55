"""``offload serve`` under load it must shed, and the token rules (SPEC section 7).

* Out of file descriptors (``RLIMIT_NOFILE`` 40, 60 idle connections): the accept loop
  rests instead of spinning (the server's CPU time over a window stays small), says so
  once, and a good client is still served.
* An idle-connection flood from one local process: handshakes cost no thread each, the
  limits (per source too) shed the connections that got least far first, and a good
  client is served within a few seconds while the flood lasts.
* Tokens: the README's own ``token=open(path, "rb").read()`` against the file that
  ``offload serve`` writes; a raw binary token that ends in a newline byte; a wrong token
  is an AuthenticationError that says the token did not match; a token file others may
  read is refused; the token directory the server made is gone when it exits.
* ``--max-connections`` reached: the client is told the server is at its limit.

Every server is a real ``offload serve`` on 127.0.0.1; every wait is bounded. Deadlines
("served within N s") are generous correctness bounds, not performance measurements.
"""

from __future__ import annotations

import os
import pickle
import re
import resource
import select
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

import offload
import remote_helpers as h
from offload.protocol.auth import ClientHandshake, ServerHandshake

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="reads /proc/PID/fd and /proc/PID/task"
)

README_TOKEN = 'open("{path}", "rb").read()'  # how the README reads a token file
SERVED_WITHIN = 5.0  # a good client's connect + call, while the server is under load
CLOSE_LIMIT = 2.0  # a connection the server drops at once is gone within this


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


class LimitedServer(h.ServerProcess):
    """An ``offload serve`` process started with a low ``RLIMIT_NOFILE``."""

    def __init__(self, workdir: Path, args: list[str], *, nofile: int, name: str) -> None:
        super().__init__(workdir, args, name=name)
        self.nofile = nofile

    def spawn(self) -> subprocess.Popen[bytes]:
        nofile = self.nofile

        def preexec() -> None:
            h.die_with_parent()
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                h.serve_command(*self.args),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.workdir,
                preexec_fn=preexec,  # noqa: PLW1509 - prctl and setrlimit only
            )
        self.pid = self.proc.pid
        return self.proc


@pytest.fixture
def servers() -> Iterator[list[h.ServerProcess]]:
    """Servers a test starts; stopped with SIGTERM at teardown (killed if they hang)."""
    procs: list[h.ServerProcess] = []
    yield procs
    for proc in procs:
        if proc.proc is not None and proc.proc.poll() is None:
            try:
                proc.stop(limit=30)
            finally:
                proc.kill()


def base_args(token_path: Path, *extra: str) -> list[str]:
    return ["--listen", "127.0.0.1:0", "--token-file", str(token_path), "--workers", "1", *extra]


def start(
    servers: list[h.ServerProcess], workdir: Path, args: list[str], name: str = "server"
) -> h.ServerProcess:
    proc = h.ServerProcess(workdir, args, name=name)
    servers.append(proc)
    return proc.start()


def call_pid(address: str, token: bytes | str, limit: float = SERVED_WITHIN) -> tuple[int, float]:
    """A good client: connect, call os.getpid, shut down; (pid, seconds it took)."""
    started = time.monotonic()
    worker = offload.connect(address, token=token, start_timeout=limit)
    try:
        pid = worker.submit(os.getpid).result(timeout=limit)
        elapsed = time.monotonic() - started
    finally:
        worker.shutdown(wait=True, timeout=10)
    return pid, elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def wait_for(predicate: Callable[[], bool], limit: float, what: str) -> None:
    """Poll (bounded) another process's state until ``predicate()`` holds."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(0.02)


def open_idle(port: int, count: int, socks: list[socket.socket]) -> None:
    for _ in range(count):
        socks.append(socket.create_connection((h.HOST, port), timeout=5))


def private_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # after the write: the umask never widens or narrows it
    return path


# --------------------------------------------------------------------------- #
# 7. Out of file descriptors: no spin, shed, log once, a good client is served
# --------------------------------------------------------------------------- #


def test_out_of_file_descriptors_no_spin_and_a_good_client_is_served(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    token_path, token = h.write_token_file(tmp_path)
    # A long handshake deadline: the idle connections stay until the server sheds them.
    proc = LimitedServer(
        tmp_path, base_args(token_path, "--handshake-timeout", "60"), nofile=40, name="nofile"
    )
    servers.append(proc)
    proc.start()
    call_pid(proc.address, token, limit=20)  # warm (the first call starts the worker)
    window = 2.0
    with h.many_sockets() as socks:
        open_idle(proc.port, 60, socks)  # more than the server has descriptors for
        before = cpu_seconds(proc.pid)
        time.sleep(window)  # the measurement window itself, not synchronisation
        used = cpu_seconds(proc.pid) - before
        assert used < 0.3 * window, (
            f"the server burnt {used:.2f} s of CPU in {window:g} s holding 60 idle "
            f"connections at RLIMIT_NOFILE 40 (an accept loop spinning on EMFILE)"
        )
        pid, elapsed = call_pid(proc.address, token)
        assert pid in h.server_resources(proc.pid).children
        assert elapsed < SERVED_WITHIN, elapsed
        assert fd_count(proc.pid) <= 40
    status = proc.stop()
    assert status == 0, proc.output()
    warnings = proc.stderr().count("out of file descriptors")
    assert warnings == 1, f"logged {warnings} times (want once):\n{proc.output()}"


# --------------------------------------------------------------------------- #
# 8. Idle-connection floods: no thread per handshake, per-source limits, a good client
# --------------------------------------------------------------------------- #


def test_handshakes_cost_no_thread_each(tmp_path: Path, servers: list[h.ServerProcess]) -> None:
    token_path, token = h.write_token_file(tmp_path)
    proc = start(servers, tmp_path, base_args(token_path, "--handshake-timeout", "60"))
    call_pid(proc.address, token, limit=20)
    base = h.stable_resources(proc.pid)
    with h.many_sockets() as socks:
        open_idle(proc.port, 30, socks)
        # Every one of them accepted (an fd each in the server), none a thread.
        wait_for(lambda: fd_count(proc.pid) >= base.fds + 30, 5, "30 accepted connections")
        assert thread_count(proc.pid) <= base.threads, (
            f"{thread_count(proc.pid)} threads with 30 pending handshakes (baseline {base.threads})"
        )
        _, elapsed = call_pid(proc.address, token)
        assert elapsed < SERVED_WITHIN


def test_per_source_limit_sheds_the_oldest_idle_connections(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    per_source, extra = 8, 12
    token_path, token = h.write_token_file(tmp_path)
    args = base_args(token_path, "--handshake-timeout", "60")
    args += ["--max-unauthenticated", "100", "--max-unauthenticated-per-source", str(per_source)]
    proc = start(servers, tmp_path, args)
    call_pid(proc.address, token, limit=20)
    with h.many_sockets() as socks:
        open_idle(proc.port, per_source + extra, socks)
        deadline = time.monotonic() + CLOSE_LIMIT
        closed = [h.peer_closed(s, max(0.01, deadline - time.monotonic()))[0] for s in socks]
        assert closed[:extra] == [True] * extra, closed
        assert closed[extra + 1 :].count(True) == 0, f"newer connections were dropped: {closed}"
        _, elapsed = call_pid(proc.address, token)
        assert elapsed < SERVED_WITHIN


def test_a_talking_client_outlives_a_silent_flood(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    """Past a limit, the connections that got least far in their handshake go first:
    one that sent its hello (and got the challenge) stays while silent ones are shed,
    though it is the oldest of all."""
    token_path, token = h.write_token_file(tmp_path)
    args = base_args(token_path, "--handshake-timeout", "60", "--max-unauthenticated", "8")
    proc = start(servers, tmp_path, args)
    call_pid(proc.address, token, limit=20)
    with h.RawClient(proc.port) as raw, h.many_sockets() as socks:
        hs = ClientHandshake(token)
        raw.sendall(hs.data_to_send())
        hs.receive_data(h.recv_exactly(raw.sock, 38))  # the challenge: it is talking
        open_idle(proc.port, 30, socks)
        deadline = time.monotonic() + CLOSE_LIMIT
        closed = [h.peer_closed(s, max(0.01, deadline - time.monotonic()))[0] for s in socks]
        assert closed[:20].count(False) == 0, "silent connections over the cap stayed"
        raw.sendall(hs.data_to_send())  # the proof, after 30 newer connections came
        hs.receive_data(h.recv_exactly(raw.sock, 32))
        assert hs.done, "the talking client was shed before the silent ones"


FLOODER = r"""
import collections, select, socket, sys, time

# Idle connections as fast as non-blocking connects go, paced at RATE a second (well
# past what a thread per connection kept up with; well within what one selector does),
# holding at most HOLD; until our stdin closes, or LIMIT seconds.
port, rate, hold, limit = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = collections.deque()
opened = 0
started = time.monotonic()
while time.monotonic() - started < limit:
    ahead = opened - rate * (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead / rate)
    sock = socket.socket()
    sock.setblocking(False)
    sock.connect_ex(("127.0.0.1", port))
    opened += 1
    socks.append(sock)
    if len(socks) > hold:
        socks.popleft().close()
    if opened == 500:
        print("flooding", flush=True)
    if opened % 50 == 0 and select.select([sys.stdin], [], [], 0)[0]:
        break  # the test closed our stdin
print(f"opened {opened} in {time.monotonic() - started:.1f} s", flush=True)
for sock in socks:
    sock.close()
"""
FLOOD_RATE = 6000  # connections a second
FLOOD_LASTS = 1.5  # seconds of good clients (at least three) while the flood goes on


def test_idle_connection_flood_a_good_client_is_served(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    token_path, token = h.write_token_file(tmp_path)
    proc = start(servers, tmp_path, base_args(token_path))
    call_pid(proc.address, token, limit=20)
    base = h.stable_resources(proc.pid)
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(proc.port), str(FLOOD_RATE), "2000", "30"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=h.die_with_parent,  # noqa: PLW1509 - it only calls prctl()
    )
    assert flooder.stdin is not None and flooder.stdout is not None
    try:
        ready, _, _ = select.select([flooder.stdout], [], [], 20)
        assert ready, "the flooder did not get going"
        line = flooder.stdout.readline().decode()
        assert line.strip() == "flooding", line
        times: list[float] = []
        started = time.monotonic()
        while len(times) < 3 or time.monotonic() - started < FLOOD_LASTS:
            _, elapsed = call_pid(proc.address, token)
            times.append(round(elapsed, 3))
            threads = thread_count(proc.pid)
            assert threads <= base.threads + 2, f"{threads} threads under the flood"
            if len(times) >= 10:
                break
            time.sleep(0.2)  # spreads the good clients over the flood (not a wait)
        assert max(times) < SERVED_WITHIN, times
        assert flooder.poll() is None, "the flood ended before the good clients were served"
    finally:
        try:  # closing its stdin (communicate does) stops the flood
            tail = flooder.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            flooder.kill()
            tail = flooder.communicate()[0].decode()
    match = re.search(r"opened (\d+)", tail)
    assert match and int(match.group(1)) > 500, tail
    now, _ = h.wait_settled(proc.pid, base, 15)
    assert now.fds <= base.fds and now.threads <= base.threads, (now, base)


def test_a_client_shed_before_the_handshake_tries_again(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    """Under a flood the server closes silent connections, and a good client whose hello
    was not read yet can be one of them (seen in CI): it connects again, a few times."""
    token_path, token = h.write_token_file(tmp_path)
    proc = start(servers, tmp_path, base_args(token_path))
    with h.SheddingProxy(proc.port, shed=3) as proxy:
        pid, _ = call_pid(proxy.address, token)
    assert proxy.error is None, proxy.error
    assert proxy.accepted == 4  # three closed unread, the fourth served
    assert psutil.Process(pid).ppid() == proc.pid  # the server's worker ran it


def test_a_client_shed_every_time_gives_up_saying_how_often_it_tried() -> None:
    with (
        h.SheddingProxy(0, shed=6, forward=False) as proxy,
        pytest.raises(offload.AuthenticationError, match=r"handshake.*\(6 attempts\)"),
    ):
        offload.connect(proxy.address, token=b"t" * 32, start_timeout=20)
    assert proxy.accepted == 6


def test_a_shed_connection_says_so_and_a_refusal_does_not() -> None:
    """``AuthenticationError.shed`` (documented): True when the server closed the
    connection before its challenge, False (the class default) for a refusal; it
    survives pickling, as every offload error's fields do."""
    with (
        h.SheddingProxy(0, shed=6, forward=False) as proxy,
        pytest.raises(offload.AuthenticationError) as shed,
    ):
        offload.connect(proxy.address, token=b"t" * 32, start_timeout=20)
    assert proxy.accepted == 6
    assert shed.value.shed is True
    assert pickle.loads(pickle.dumps(shed.value)).shed is True
    assert offload.AuthenticationError("wrong token").shed is False


# --------------------------------------------------------------------------- #
# 9. Tokens
# --------------------------------------------------------------------------- #


def test_the_readme_token_example_against_a_server_generated_token_file(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = h.ServerProcess(
        tmp_path, ["--listen", "127.0.0.1:0", "--workers", "1"], env=h.clean_env(TMPDIR=str(tmpdir))
    )
    servers.append(proc)
    proc.start()
    match = re.search(r"wrote a new one to (\S+)", proc.stderr())
    assert match, proc.output()
    path = match.group(1)
    assert Path(path).parent.parent == tmpdir
    # The README's example, verbatim (the file's trailing newline included).
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert README_TOKEN.format(path="/etc/offload/token") in readme
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the example leaves it to the GC
        token = open(path, "rb").read()  # noqa: SIM115 - as README_TOKEN says
    assert token.endswith(b"\n")
    w = offload.connect(proc.address, token=token, start_timeout=20)
    try:
        assert w.call(os.getpid) in h.server_resources(proc.pid).children
    finally:
        w.shutdown(wait=True, timeout=10)
    # The same as text, and through the command line's --token-file.
    call_pid(proc.address, Path(path).read_text(), limit=20)
    ping = subprocess.run(
        [sys.executable, "-m", "offload.cli", "ping", proc.address, "--token-file", path],
        capture_output=True,
        timeout=60,
        env=h.clean_env(),
        check=False,
    )
    assert ping.returncode == 0, ping.stderr
    assert proc.stop() == 0, proc.output()
    # 9: what the server generated goes with it.
    assert not Path(path).exists(), "the generated token file outlived the server"
    assert list(tmpdir.iterdir()) == [], list(tmpdir.iterdir())


def test_a_binary_token_that_ends_in_a_newline_byte(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    # 32 raw bytes (0xff makes them binary: never valid UTF-8) whose last byte is "\n".
    token = b"\xff" + os.urandom(30) + b"\n"
    path = private_file(tmp_path / "token", token)
    proc = start(servers, tmp_path, base_args(path))
    pid, _ = call_pid(proc.address, token, limit=20)
    assert pid in h.server_resources(proc.pid).children
    call_pid(proc.address, path.read_bytes(), limit=20)  # open(path, "rb").read()


def test_one_token_rule_for_files_bytes_and_text() -> None:
    from offload.protocol.auth import check_token

    text = os.urandom(32).hex()
    for form in (text, text + "\n", f"  {text}\r\n", text.encode() + b"\n"):
        assert check_token(form) == text.encode(), form
    raw = b"\x00" + os.urandom(30) + b"\n"
    assert check_token(raw) == raw  # binary: byte for byte, its "\n" included
    with pytest.raises(offload.AuthenticationError, match="at least 32"):
        check_token(text[:31] + "\n")


def _handshake_pair(
    client_token: bytes, server_token: bytes
) -> tuple[ClientHandshake, ServerHandshake]:
    """A client and a server handshake, run in memory up to the client's proof."""
    client = ClientHandshake(client_token, peer="the worker server S")
    server = ServerHandshake(server_token)
    server.receive_data(client.data_to_send())  # hello
    client.receive_data(server.data_to_send())  # challenge
    return client, server


def test_refusals_in_the_handshake_are_told_apart_from_proofs() -> None:
    """Sans-IO: what a refused client is told, and that only an exact refusal frame is
    taken for one."""
    from offload.protocol.auth import REFUSED_BUSY, REFUSED_STOPPING, refusal

    token = os.urandom(32).hex().encode()
    # A wrong proof: the server raises and answers with REFUSAL(TOKEN).
    client, server = _handshake_pair(os.urandom(32).hex().encode(), token)
    with pytest.raises(offload.AuthenticationError):
        server.receive_data(client.data_to_send())
    with pytest.raises(offload.AuthenticationError, match="the token did not match"):
        client.receive_data(server.data_to_send())
    # A good proof, but the server is full: the refusal replaces its proof.
    client, server = _handshake_pair(token, token)
    server.receive_data(client.data_to_send())
    assert server.done
    server.refuse(REFUSED_BUSY, 7)
    with pytest.raises(
        offload.NoWorkerAvailable, match=r"at its connection limit \(max-connections 7\)"
    ):
        client.receive_data(server.data_to_send())
    # A refusal in place of the challenge.
    client = ClientHandshake(token, peer="S")
    with pytest.raises(offload.NoWorkerAvailable, match="shutting down"):
        client.receive_data(refusal(REFUSED_STOPPING))
    # Not quite a refusal (padding set) where the proof goes: no proof, no refusal.
    client, server = _handshake_pair(token, token)
    server.receive_data(client.data_to_send())
    forged = refusal(REFUSED_BUSY, 1)[:-1] + b"\x01"
    with pytest.raises(offload.AuthenticationError, match="did not prove the token"):
        client.receive_data(forged)
    # And the server's genuine proof is always a proof.
    client, server = _handshake_pair(token, token)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.done


def test_a_wrong_token_says_the_token_did_not_match(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    token_path, token = h.write_token_file(tmp_path)
    proc = start(servers, tmp_path, base_args(token_path))
    call_pid(proc.address, token, limit=20)
    wrong = os.urandom(32).hex()
    for attempt in (wrong, wrong + "\n"):
        with pytest.raises(offload.AuthenticationError) as info:
            offload.connect(proc.address, token=attempt, start_timeout=5)
        text = str(info.value)
        assert "did not match" in text, text
        assert proc.address in text, text
        assert wrong not in text and token.decode() not in text
    _, elapsed = call_pid(proc.address, token)
    assert elapsed < SERVED_WITHIN


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o620])
def test_a_token_file_others_may_read_or_write_is_refused_by_the_server(
    tmp_path: Path, mode: int
) -> None:
    path = private_file(tmp_path / "token", os.urandom(32).hex().encode() + b"\n", mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    proc = h.ServerProcess(tmp_path, base_args(path))
    popen = proc.spawn()
    try:
        deadline = time.monotonic() + 30
        while popen.poll() is None and "serving on" not in proc.stdout():
            assert time.monotonic() < deadline, "offload serve neither served nor exited"
            time.sleep(0.05)  # bounded poll of another process
        assert "serving on" not in proc.stdout(), f"it served with a {mode:04o} token file"
        status = popen.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr()
    assert status == 2, proc.output()
    assert "Traceback" not in err, err
    assert f"chmod 600 {path}" in err and f"{mode:04o}" in err, err


def test_a_token_file_others_may_read_is_refused_by_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = private_file(tmp_path / "token", os.urandom(32).hex().encode() + b"\n", 0o644)
    monkeypatch.delenv("OFFLOAD_TOKEN", raising=False)
    monkeypatch.setenv("OFFLOAD_TOKEN_FILE", str(path))
    with pytest.raises(offload.AuthenticationError, match="chmod 600"):
        offload.connect("127.0.0.1:1", start_timeout=5)
    ping = subprocess.run(
        [sys.executable, "-m", "offload.cli", "ping", "127.0.0.1:1", "--token-file", str(path)],
        capture_output=True,
        timeout=60,
        env=h.clean_env(),
        check=False,
    )
    assert ping.returncode != 0
    assert b"chmod 600" in ping.stderr, ping.stderr


def test_the_generated_token_is_removed_when_the_server_is_refused_its_port(
    tmp_path: Path,
) -> None:
    """Also when the server cannot listen (exit status 1), its token directory goes."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with socket.socket() as taken:
        taken.bind((h.HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = h.ServerProcess(
            tmp_path,
            ["--listen", f"127.0.0.1:{port}", "--workers", "1"],
            env=h.clean_env(TMPDIR=str(tmpdir)),
        )
        popen = proc.spawn()
        try:
            status = popen.wait(timeout=60)
        finally:
            proc.kill()
    assert status == 1, proc.output()
    assert "wrote a new one" in proc.stderr(), proc.output()
    assert list(tmpdir.iterdir()) == [], list(tmpdir.iterdir())


# --------------------------------------------------------------------------- #
# 11. max-connections
# --------------------------------------------------------------------------- #


def test_max_connections_reached_says_so(tmp_path: Path, servers: list[h.ServerProcess]) -> None:
    token_path, token = h.write_token_file(tmp_path)
    proc = start(servers, tmp_path, base_args(token_path, "--max-connections", "1"))
    first = offload.connect(proc.address, token=token, start_timeout=20)
    try:
        assert first.call(os.getpid) in h.server_resources(proc.pid).children
        started = time.monotonic()
        with pytest.raises(offload.NoWorkerAvailable) as info:
            offload.connect(proc.address, token=token, start_timeout=5)
        assert time.monotonic() - started < SERVED_WITHIN
        text = str(info.value)
        assert "at its connection limit (max-connections 1)" in text, text
        assert proc.address in text, text
        # The refused client took nothing from the one being served.
        assert first.call(os.getpid) in h.server_resources(proc.pid).children
    finally:
        first.shutdown(wait=True, timeout=10)
    # A slot frees when a client leaves.
    deadline = time.monotonic() + 10
    while True:
        try:
            call_pid(proc.address, token)
            break
        except offload.NoWorkerAvailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # the server forgets the session once its close is read


def test_the_operator_tools_say_the_server_is_full(
    tmp_path: Path, servers: list[h.ServerProcess]
) -> None:
    token_path, token = h.write_token_file(tmp_path)
    proc = start(servers, tmp_path, base_args(token_path, "--max-connections", "1"))
    with offload.connect(proc.address, token=token, start_timeout=20) as first:
        first.call(os.getpid)
        ping = subprocess.run(
            [
                sys.executable,
                "-m",
                "offload.cli",
                "ping",
                proc.address,
                "--token-file",
                str(token_path),
            ],
            capture_output=True,
            timeout=60,
            env=h.clean_env(),
            check=False,
        )
    assert ping.returncode == 1, ping
    assert b"at its connection limit (max-connections 1)" in ping.stderr, ping.stderr
