"""What a remote task prints reaches its caller (SPEC section 4's ``stdout``/``stderr``
options, for workers of ``offload serve``): in order per stream, before the call's
result, in every mode; never another client's; bounded on the server when a client does
not read; and a remote crash's ``stderr_tail`` holds what the crashing call wrote. Also
workers over ssh, ``Pool(hosts=...)``, and actors (local and over ssh) printing to their
creator.

Servers are real ``offload serve`` processes on 127.0.0.1 (their stdout and stderr go to
files, :class:`remote_helpers.ServerProcess`), with ``tests/`` on ``PYTHONPATH`` so
their workers import :mod:`output_tasks` by reference. The client's own output is read
with ``capfd`` (the file descriptors, where a remote call's output is written).
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import crashes
import offload
import output_tasks as ot
from remote_helpers import ServerProcess, clean_env, die_with_parent, write_token_file
from sshd import MISSING, SSHD, have_sshd, python_wrapper

TESTS_DIR = Path(__file__).resolve().parent
WAIT = 30.0  # seconds a test waits for a server or a task at most

ServeFactory = Callable[..., ServerProcess]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of servers and client scripts: ``tests/`` importable."""
    env = clean_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    return env


@pytest.fixture
def token_file(tmp_path: Path) -> tuple[Path, str]:
    path, token = write_token_file(tmp_path)
    return path, token.decode()


@pytest.fixture
def serve(tmp_path: Path, token_file: tuple[Path, str]) -> Iterator[ServeFactory]:
    """Start ``offload serve`` processes; each is stopped (SIGTERM, by pid) at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, workers: int = 1, **env: str) -> ServerProcess:
        server = ServerProcess(
            tmp_path,
            [
                "--listen",
                "127.0.0.1:0",
                "--token-file",
                str(token_file[0]),
                "--workers",
                str(workers),
                *args,
            ],
            env=server_env(**env),
            name=f"server-{len(started)}",
        )
        started.append(server)
        return server.start()

    yield start
    codes = []
    for server in started:
        try:
            codes.append(server.stop())
        finally:
            server.kill()
    assert codes == [0] * len(started), [server.output() for server in started]


def lines_of(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def numbers(text: str, label: str) -> list[int]:
    """The numbers printed after ``label`` in ``text``, in order."""
    return [int(n) for n in re.findall(re.escape(label) + r"(\d+)", text)]


@pytest.mark.parametrize("isolation", ["pool", "process", "inline"])
def test_remote_print_arrives_in_order_before_the_result(
    serve: ServeFactory,
    token_file: tuple[Path, str],
    capfd: pytest.CaptureFixture[str],
    isolation: str,
) -> None:
    server = serve("--isolation", isolation)
    with offload.connect(server.address, token=token_file[1]) as w:
        assert w.call(ot.numbered_lines, "first", 200) == 200
        # Read as soon as the result is back: the output came before it.
        out, err = capfd.readouterr()
        assert lines_of(out, "first") == [f"first out {i}" for i in range(200)]
        assert lines_of(err, "first") == [f"first err {i}" for i in range(200)]
        assert w.call(ot.numbered_lines, "second", 3) == 3
        out, err = capfd.readouterr()
        assert lines_of(out, "out") == [f"second out {i}" for i in range(3)]
        assert lines_of(err, "err") == [f"second err {i}" for i in range(3)]
    server.stop()
    # The client got it; the server's own output did not.
    assert "first out" not in server.stdout() + server.stderr(), server.output()


@pytest.mark.parametrize("isolation", ["pool", "inline"])
def test_prefix_mode_names_the_worker_and_ends_unfinished_lines(
    serve: ServeFactory,
    token_file: tuple[Path, str],
    capfd: pytest.CaptureFixture[str],
    isolation: str,
) -> None:
    server = serve("--isolation", isolation)
    with offload.connect(
        server.address,
        token=token_file[1],
        name="remote-printer",
        stdout="prefix",
        stderr="prefix",
    ) as w:
        assert w.call(ot.numbered_lines, "pre", 3) == 3
        assert w.call(ot.unfinished_line, "no newline") == "no newline"
        assert w.call(ot.numbered_lines, "post", 1) == 1
        name = w.name
    out, err = capfd.readouterr()
    assert name == "remote-printer"
    prefix = "[remote-printer] "  # the name the caller knows it by, as for a local worker
    assert out.splitlines() == [
        *(f"{prefix}pre out {i}" for i in range(3)),
        f"{prefix}no newline",  # written out when its call's result came
        f"{prefix}post out 0",
    ], out
    assert err.splitlines() == [*(f"{prefix}pre err {i}" for i in range(3)), f"{prefix}post err 0"]


def test_file_and_devnull_modes(
    serve: ServeFactory,
    token_file: tuple[Path, str],
    capfd: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    server = serve()
    log = tmp_path / "client-stdout.log"
    log.write_text("before\n")
    with offload.connect(
        server.address, token=token_file[1], stdout=str(log), stderr="devnull"
    ) as w:
        assert w.call(ot.numbered_lines, "filed", 5) == 5
        assert w.call(ot.numbered_lines, "again", 1) == 1
    out, err = capfd.readouterr()
    assert "filed" not in out + err and "again" not in out + err
    assert log.read_text().splitlines() == [
        "before",  # a path is appended to
        *(f"filed out {i}" for i in range(5)),
        "again out 0",
    ]
    server.stop()
    assert "filed" not in server.stdout() + server.stderr()  # devnull: dropped everywhere


def test_remote_crash_stderr_tail_is_the_crashing_calls_last_output(
    serve: ServeFactory, token_file: tuple[Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    server = serve()  # one worker process runs both calls
    with offload.connect(server.address, token=token_file[1]) as w:
        w.call(ot.write_stderr, "an earlier call wrote this\n")
        fut = w.submit(ot.last_words_then_exit, "the last words of the call\n", 3)
        with pytest.raises(offload.WorkerCrashed) as info:
            fut.result(WAIT)
        err = info.value
        assert not isinstance(err, offload.ConnectionLost), err
        assert err.exitcode == 3, err
        assert "the last words of the call" in err.stderr_tail, err.stderr_tail
        assert "the last words of the call" in str(err)
        assert "an earlier call" not in err.stderr_tail, err.stderr_tail
        assert w.call(ot.pid) > 0  # the server replaced the worker
    _, client_err = capfd.readouterr()
    # The output also came through as it was written (before the crash was reported).
    assert lines_of(client_err, "wrote this") == ["an earlier call wrote this"]
    assert lines_of(client_err, "last words") == ["the last words of the call"]


def test_output_outside_any_call_stays_in_the_servers_log(
    serve: ServeFactory, token_file: tuple[Path, str], capfd: pytest.CaptureFixture[str]
) -> None:
    server = serve("--preload", "output_tasks", OUTPUT_TASKS_ANNOUNCE="1")
    with offload.connect(server.address, token=token_file[1]) as w:
        pid = w.call(ot.pid)
    announced = f"output_tasks imported in {pid}"
    out, _ = capfd.readouterr()
    assert announced not in out
    server.stop()
    assert announced in server.stdout(), server.output()


@pytest.mark.parametrize("isolation", ["pool", "inline"])
def test_two_clients_each_get_only_their_own_output(
    serve: ServeFactory, token_file: tuple[Path, str], tmp_path: Path, isolation: str
) -> None:
    # Inline, the calls of both clients run at once on two threads of one process that
    # share its stdout: the thread that writes tells whose a write is.
    server = serve("--isolation", isolation, workers=2)
    errors: list[BaseException] = []

    def client(tag: str) -> None:
        try:
            with offload.connect(
                server.address,
                token=token_file[1],
                stdout=str(tmp_path / f"{tag}.out"),
                stderr="devnull",
            ) as w:
                futs = [w.submit(ot.numbered_lines, f"{tag}{n}", 50) for n in range(4)]
                assert [f.result(WAIT) for f in futs] == [50] * 4
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(tag,)) for tag in ("alpha", "beta")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert not errors, errors
    for tag, other in (("alpha", "beta"), ("beta", "alpha")):
        text = (tmp_path / f"{tag}.out").read_text()
        assert other not in text, text[:300]
        # Each call's lines, in order. Two calls of a client may run at once on the two
        # workers, and "inherit" and file modes pass bytes on as they come (a print is
        # two writes with PYTHONUNBUFFERED): their lines may be spliced, never reordered.
        for n in range(4):
            assert numbers(text, f"{tag}{n} out ") == list(range(50)), text[:300]


def test_pool_over_hosts_relays_output(
    serve: ServeFactory, token_file: tuple[Path, str], tmp_path: Path
) -> None:
    servers = [serve(), serve()]
    log = tmp_path / "pool.out"
    with offload.Pool(
        hosts=[s.address for s in servers],
        token=token_file[1],
        stdout=str(log),
        stderr="devnull",
    ) as pool:
        assert list(pool.map(ot.numbered_lines, [f"p{i}" for i in range(6)], [2] * 6)) == [2] * 6
    text = log.read_text()
    for i in range(6):  # (lines of calls on the two servers may be spliced, see above)
        assert numbers(text, f"p{i} out ") == [0, 1], text


class _Sink:
    """A session as the relay sees it: it records what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[int, int, bytes]] = []

    def call_output(self, call_id: int, stream: int, data: bytes) -> None:
        self.got.append((call_id, stream, data))


class _Engine:
    """An engine as the relay sees it: the calls a worker process runs now."""

    loop = None

    def __init__(self) -> None:
        self.running: list[SimpleNamespace] = []

    def running_calls(self, slot: int, gen: int) -> list[SimpleNamespace]:
        return self.running


def test_output_goes_to_a_client_only_when_it_is_surely_its_own() -> None:
    """The routing rule of a server's worker (no process: the engine is a stand-in)."""
    from offload.server.relay import RelayingSlot

    engine, alpha, beta = _Engine(), _Sink(), _Sink()
    slot = RelayingSlot(engine, 0, 1, "offload-server-worker-1")  # type: ignore[arg-type]
    engine.running = [SimpleNamespace(call_id=7, sink=alpha)]
    assert slot.relay(1, b"mine\n")
    # concurrency > 1: calls of one client at once go to it, under the oldest call's id
    engine.running = [
        SimpleNamespace(call_id=8, sink=alpha),
        SimpleNamespace(call_id=9, sink=alpha),
    ]
    assert slot.relay(2, b"ours\n")
    assert alpha.got == [(7, 1, b"mine\n"), (8, 2, b"ours\n")]
    # ... of two clients at once: nobody's, so the server's own output
    engine.running = [
        SimpleNamespace(call_id=10, sink=alpha),
        SimpleNamespace(call_id=11, sink=beta),
    ]
    assert not slot.relay(1, b"whose?\n")
    engine.running = []  # outside any call (start-up, preload)
    assert not slot.relay(1, b"starting\n")
    engine.running = [SimpleNamespace(call_id=12, sink=None)]  # a call of the server's own
    assert not slot.relay(1, b"own\n")
    assert len(alpha.got) == 2 and beta.got == []


@pytest.mark.skipif(not have_sshd(), reason=MISSING)
def test_a_worker_over_ssh_relays_its_calls_output_with_its_name(
    sshd: SSHD, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    python = python_wrapper(tmp_path / "python", tmp_path / "cache")
    where = sshd.ssh(python=python, ship=("output_tasks",))
    with offload.spawn(where=where, name="far", stderr=str(tmp_path / "far.err")) as w:
        assert w.call(ot.numbered_lines, "ssh", 3) == 3
        out, _ = capfd.readouterr()  # before its result, as for a server of one's own
        assert lines_of(out, "ssh out") == [f"[far] ssh out {i}" for i in range(3)]
    lines = (tmp_path / "far.err").read_text().splitlines()
    assert lines_of("\n".join(lines), "ssh err") == [f"ssh err {i}" for i in range(3)]


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_an_actors_output_reaches_its_creator(
    where: str, request: pytest.FixtureRequest, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An actor's process prints to its creator as a worker's does: a local one as its
    options say, one over ssh with its name in front (through ssh's own pipes, so the
    output may come just after the result: a bounded wait)."""
    options: dict[str, object] = {"name": "printer"}
    if where == "ssh":
        if not have_sshd():
            pytest.skip(MISSING)
        sshd: SSHD = request.getfixturevalue("sshd")
        python = python_wrapper(tmp_path / "python", tmp_path / "cache")
        options["where"] = sshd.ssh(python=python, ship=("output_tasks",))
    else:
        options["stdout"] = options["stderr"] = "prefix"
    seen = {"out": "", "err": ""}

    def printed() -> bool:
        out, err = capfd.readouterr()
        seen["out"] += out
        seen["err"] += err
        return "on stderr" in seen["err"] and "said hello" in seen["out"]

    printer = ot.Printer.options(**options).spawn("said")
    try:
        assert printer.say("hello").result(WAIT) == "hello"
        assert crashes.wait_until(printed, WAIT), seen
    finally:
        printer.shutdown()
    assert lines_of(seen["out"], "said hello") == ["[printer] said hello"]
    assert lines_of(seen["err"], "said hello") == ["[printer] said hello on stderr"]


def test_a_travelled_handles_calls_print_to_their_holder(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Calls through a handle that travelled run on threads of the actor's listener: what
    they print goes to the holder, in order and before the result, with the holder's
    options (a holder's handle has the defaults: ``inherit``), not to the creator
    through the actor's pipes (whose ``prefix`` would name it)."""
    printer = ot.Printer.options(name="printer", stdout="prefix", stderr="prefix").spawn("said")
    seen = {"out": "", "err": ""}

    def read() -> None:
        out, err = capfd.readouterr()
        seen["out"] += out
        seen["err"] += err

    try:
        holder = pickle.loads(pickle.dumps(printer))  # a holder's handle: the listener
        assert holder.numbered("held", 50).result(WAIT) == 50
        read()  # at once: the holder's output came before its result
        assert lines_of(seen["out"], "held") == [f"said held {i}" for i in range(50)]
        assert lines_of(seen["err"], "held") == [f"said held err {i}" for i in range(50)]
        # The creator's own calls still print through the actor's pipes, as it says.
        assert printer.say("by the creator").result(WAIT) == "by the creator"
        assert crashes.wait_until(lambda: read() or "by the creator on" in seen["err"], WAIT)
        holder.close()
    finally:
        printer.shutdown()
    read()
    assert lines_of(seen["out"], "by the creator") == ["[printer] said by the creator"]
    assert "[printer] said held" not in seen["out"] + seen["err"]  # never twice


CLIENT_SCRIPT = """
import sys
import offload
import output_tasks as ot

address, token, done = sys.argv[1:4]
with offload.connect(address, token=token, stderr="devnull") as w:
    written = w.call(ot.flood, 64, done)
print(f"RESULT {written}", flush=True)
"""


def test_a_client_that_does_not_read_holds_up_no_call(
    serve: ServeFactory, token_file: tuple[Path, str], tmp_path: Path
) -> None:
    """A flood of output to a client that stops reading (its stdout is a pipe nobody
    reads, so its I/O loop blocks writing and it stops reading its connection): the
    server drops what does not fit, the task runs to its end, other calls are answered,
    and the client learns how much it lost."""
    server = serve(workers=2)
    done = tmp_path / "flood.done"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, server.address, token_file[1], str(done)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=server_env(),
        preexec_fn=die_with_parent,  # noqa: PLW1509 - it only calls prctl()
    )
    try:
        # The task printed its 64 MiB and finished although its client reads nothing.
        assert crashes.wait_until(done.exists, WAIT), server.output()
        with offload.connect(server.address, token=token_file[1]) as w:
            assert w.call(ot.pid) > 0  # the server answers another client meanwhile
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    lines = out.splitlines()
    assert lines[-1] == f"RESULT {64 * 1024 * 1024}".encode()
    notes = [line for line in lines if b"output were dropped" in line]
    assert len(notes) == 1, lines[-5:]
    dropped = int(notes[0].split()[1])
    assert dropped > 0
    # Every byte was either passed on, as written, or counted in the note.
    received = out.replace(b"\n" + notes[0] + b"\n", b"", 1).removesuffix(lines[-1] + b"\n")
    assert received.strip(b"x\n") == b""
    assert len(received) + dropped == 64 * 1024 * 1024
