"""The worker contract (SPEC sections 1-4) that every kind of worker must honour.

Every test that uses a worker runs once per kind: the start methods ``spawn``,
``forkserver``, ``fork`` and ``reexec`` (under pytest, the bundled plugin turns the re-run
pytest into the worker), and ``remote``: ``offload.connect`` to a real ``offload serve``
on 127.0.0.1, one server for the module (stopped at its end; ``conftest.long_lived``
keeps it and its worker processes out of every test's leak check). The remote kind is
in the ``network`` tier, the others in ``process``.

* Not every item applies to every kind: a test marked ``@pytest.mark.requires(X)`` is
  skipped, with the reason in ``LACKS``, for each kind that lacks capability ``X`` (a
  remote worker has no local process, takes no process options, is not started).
* Tests that leave the worker process alone share one module-scoped worker per kind
  (the ``worker`` fixture checks after each test that it is still the same, live
  process or connection, and replaces it if a test broke it).
* Tests that kill, crash, time out or recycle the process get their own worker from
  ``fresh`` (shut down at teardown): a replacement process started mid-test would
  otherwise count as a leaked child of that test.
* Parent death is checked with a script in ``tmp_path`` that SIGKILLs itself.

Synchronisation is through files, pipes and futures with bounded waits; the only polls
are bounded checks that a process has gone or a file has been written by the I/O loop.
Processes are only ever signalled by pid, and only those this module started.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

import contract_helpers as h
import offload
import remote_helpers

START_METHODS = ["spawn", "forkserver", "fork", "reexec"]
KINDS = [*START_METHODS, "remote"]
PRELOAD = ["contract_helpers"]
RESOLVE = 10.0  # every future must resolve well within this
GONE_LIMIT = 2.0  # a dead parent's worker must be gone within this
TESTS_DIR = str(Path(__file__).resolve().parent)
LINUX = sys.platform.startswith("linux")
SERVER_WORKERS = 2  # processes of the remote kind's server

# The capability table: what each kind of worker lacks, and why the items that need it
# do not apply. A test marked ``@pytest.mark.requires(CAPABILITY)`` is skipped, with the
# reason given here, for every kind that lacks the capability.
_NO_LOCAL_PROCESS = (
    "a remote worker's calls run in the processes of its `offload serve`: worker.pid is "
    "the server's pid, and those processes' group, parent and lifetime are the server's "
    "(a dead client's calls are killed by the server: test_remote.py)"
)
_NO_PROCESS_OPTIONS = (
    "env, cwd, initializer, max_tasks and preload set up a local worker process; connect() "
    "takes none of them (a server's processes are set up by `offload serve --preload "
    "...`); its stdout and stderr modes apply to what the server relays: "
    "test_remote_output.py"
)
_NOT_STARTED = (
    "a remote worker is connected to, not started: it has no start method (a server "
    "that cannot be reached: test_remote.py::test_connect_failing_fast_never_hangs)"
)
_NO_SERVER = "a local worker has no server: its calls run in worker.pid itself"
LACKS: dict[str, dict[str, str]] = {
    **{method: {"server": _NO_SERVER} for method in START_METHODS},
    "remote": {
        "local_process": _NO_LOCAL_PROCESS,
        "process_options": _NO_PROCESS_OPTIONS,
        "start_method": _NOT_STARTED,
    },
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every test that uses a worker once per kind (module-scoped, so the kinds run
    one after the other); the kinds that lack a capability the test requires get a
    skip mark with the table's reason, so none of their fixtures is set up."""
    if "kind" not in metafunc.fixturenames:
        return
    required = [m.args[0] for m in metafunc.definition.iter_markers("requires")]
    unknown = set(required) - {cap for lacks in LACKS.values() for cap in lacks}
    assert not unknown, f"requires() names capabilities not in LACKS: {sorted(unknown)}"
    params = []
    for kind in KINDS:
        marks: list[Any] = [pytest.mark.network] if kind == "remote" else []
        reasons = [LACKS[kind][cap] for cap in required if cap in LACKS[kind]]
        if reasons:
            marks.append(pytest.mark.skip(reason=f"{kind}: {reasons[0]}"))
        params.append(pytest.param(kind, marks=marks, id=kind))
    metafunc.parametrize("kind", params, indirect=True, scope="module")


# --------------------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def kind(request: pytest.FixtureRequest) -> str:
    """The kind of worker (a start method, or ``remote``)."""
    return str(request.param)


@dataclass(frozen=True)
class Server:
    """The remote kind's ``offload serve``: where it listens and its token."""

    address: str
    token: bytes
    pid: int


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, long_lived: Callable[[int], Any]
) -> Iterator[Server]:
    """A real ``offload serve`` on 127.0.0.1:0 (a port the system picks), its workers
    importing ``contract_helpers`` (``tests/`` on their ``PYTHONPATH``). Started only
    when a remote test needs it; stopped with SIGTERM at the end of the module, and it
    must exit with status 0."""
    workdir = tmp_path_factory.mktemp("contract-server")
    token_path, token = remote_helpers.write_token_file(workdir)
    pythonpath = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
    proc = remote_helpers.ServerProcess(
        workdir,
        [
            *("--listen", "127.0.0.1:0", "--token-file", str(token_path)),
            *("--workers", str(SERVER_WORKERS), "--preload", *PRELOAD),
        ],
        env=remote_helpers.clean_env(PYTHONPATH=pythonpath),
        name="contract",
    )
    proc.start()  # a server that does not listen in time is killed, and this raises
    try:
        with long_lived(proc.pid):
            yield Server(proc.address, token, proc.pid)
    finally:
        status = proc.stop()  # SIGTERM; killed (and this raises) if it does not exit
    assert status == 0, f"offload serve exited with status {status}:\n{proc.output()}"


def make_worker(request: pytest.FixtureRequest, kind: str, **options: Any) -> offload.Worker:
    """A worker of this kind: ``offload.spawn`` with the start method (and, unless given,
    ``preload``), or ``offload.connect`` to the module's server."""
    if kind == "remote":
        srv: Server = request.getfixturevalue("server")
        return offload.connect(srv.address, token=srv.token, **options)
    options.setdefault("preload", PRELOAD)  # forkserver: share the shared worker's template
    return offload.spawn(start_method=kind, **options)


def server_processes(server_pid: int) -> set[int]:
    """The live processes under the server (its workers)."""
    return {p.pid for p in psutil.Process(server_pid).children(recursive=True)}


def runs_on_the_server(w: offload.Worker, pid: int) -> bool:
    """Whether ``pid`` (a process that ran a call of the remote worker ``w``) is one of
    its server's processes: ``w.pid`` is the server's."""
    assert w.pid is not None
    return pid in server_processes(w.pid)


@pytest.fixture(scope="module")
def shared(request: pytest.FixtureRequest, kind: str) -> Iterator[list[offload.Worker]]:
    """One long-lived worker per kind, in a box so it can be replaced."""
    box = [make_worker(request, kind, name=f"shared-{kind}")]
    yield box
    box[0].shutdown(wait=True, timeout=10)


@pytest.fixture
def worker(
    shared: list[offload.Worker], kind: str, request: pytest.FixtureRequest
) -> Iterator[offload.Worker]:
    """The shared worker; every test must leave it usable (same live process, or for
    the remote kind the same live connection to the same server)."""
    w = shared[0]
    pid = w.pid
    assert pid is not None and w.alive
    yield w
    if not (w.alive and w.pid == pid):
        w.shutdown(wait=True, timeout=5)
        shared[0] = make_worker(request, kind, name=f"shared-{kind}")
        pytest.fail(f"the test left the shared worker broken (pid {pid} -> {w.pid}); restarted")


@pytest.fixture
def fresh(request: pytest.FixtureRequest, kind: str) -> Iterator[Callable[..., offload.Worker]]:
    """A new worker of this kind (``make_worker``); every one is shut down at teardown.
    Safe to call from another thread: the remote kind's server is started here, first
    (the thread that starts a server must outlive it: PR_SET_PDEATHSIG)."""
    if kind == "remote":
        request.getfixturevalue("server")
    made: list[offload.Worker] = []

    def make(**options: Any) -> offload.Worker:
        w = make_worker(request, kind, **options)
        made.append(w)
        return w

    yield make
    for w in made:
        w.shutdown(wait=True, timeout=5)


def works_after_losing(w: offload.Worker, kind: str, lost_pid: int) -> int:
    """After the process ``lost_pid`` died (crash, kill, timeout), the next call works, in
    another process: for a local kind the handle's new process, in a process group of
    its own; for the remote kind a process of the same server, over the same connection."""
    server_pid = w.pid
    new_pid = w.call(h.getpid)
    assert new_pid != lost_pid
    assert w.call(h.add, 1, 2) == 3
    assert w.alive
    if kind == "remote":
        assert w.pid == server_pid, "the connection to the server was lost"
        assert runs_on_the_server(w, new_pid)
    else:
        assert w.pid == new_pid
        assert os.getpgid(new_pid) == new_pid != os.getpgrp()
    return new_pid


def run_program(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``python *args`` in ``cwd`` (bounded), capturing its output."""
    return subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, timeout=30, cwd=cwd
    )


def square(x: int) -> int:
    """A module-level function of the test module (travels by reference)."""
    return x * x


# --------------------------------------------------------------------------------------- #
# Calls: every kind of callable
# --------------------------------------------------------------------------------------- #


def test_module_function(worker: offload.Worker) -> None:
    assert worker.call(h.add, 2, 3) == 5
    assert worker.call(square, 7) == 49
    assert worker.submit(h.add, 4, b=5).result(timeout=RESOLVE) == 9
    assert worker.call(h.getpid) != os.getpid()


@pytest.mark.requires("local_process")
def test_the_handle_pid_is_the_process_running_its_calls(worker: offload.Worker) -> None:
    assert worker.call(h.getpid) == worker.pid != os.getpid()
    assert worker.call(os.getpid) == worker.pid


@pytest.mark.requires("server")
def test_calls_run_in_the_servers_processes(worker: offload.Worker) -> None:
    """A remote worker's pid is its server's; each call runs in one of the server's
    worker processes, never in the server itself (its isolation is ``pool``)."""
    pids = {worker.call(h.getpid) for _ in range(4)} | {worker.call(os.getpid)}
    assert worker.pid not in pids
    assert all(runs_on_the_server(worker, pid) for pid in pids), pids


def test_lambda(worker: offload.Worker) -> None:
    total, pid = worker.call(lambda x, y=1: (x + y, os.getpid()), 41)
    assert total == 42
    assert pid != os.getpid()


def test_closure(worker: offload.Worker) -> None:
    offset = [100]

    def shifted(x: int) -> int:
        return x + offset[0]

    assert worker.call(shifted, 1) == 101


def test_partial(worker: offload.Worker) -> None:
    assert worker.call(functools.partial(h.add, 10), 5) == 15
    assert worker.call(functools.partial(lambda a, b: a * b, b=3), 4) == 12


def test_task_decorated_helper(worker: offload.Worker) -> None:
    assert isinstance(h.double, offload.Task)
    assert h.double(2) == 4  # still an ordinary local call
    assert worker.call(h.double, 21) == 42
    assert worker.submit(h.triple, 5).result(timeout=RESOLVE) == 15
    assert worker.call(h.double.options(timeout=30), 3) == 6


def test_call_by_registered_name_with_preload(worker: offload.Worker) -> None:
    assert worker.submit(h.TRIPLE_NAME, 5).result(timeout=RESOLVE) == 15
    assert worker.call("contract_helpers:double", 4) == 8


@pytest.mark.requires("process_options")
def test_call_by_name_without_preload(fresh: Callable[..., offload.Worker], kind: str) -> None:
    """True behaviour without ``preload``: a custom name is known only where the helper
    module was imported (``fork`` inherits the parent's registry; ``spawn``,
    ``forkserver`` and ``reexec`` -- whose re-run pytest turns into a worker before any
    test module is imported -- do not). A ``"module:qualname"`` name is imported on
    demand everywhere, which registers the module's other tasks too."""
    w = fresh(preload=())
    fut = w.submit(h.TRIPLE_NAME, 5)
    if kind == "fork":
        assert fut.result(timeout=RESOLVE) == 15
    else:
        err = fut.exception(timeout=RESOLVE)
        assert isinstance(err, offload.NoWorkerAvailable), repr(err)
        assert err.task == h.TRIPLE_NAME
    assert w.call("contract_helpers:double", 4) == 8
    assert w.call(h.TRIPLE_NAME, 5) == 15  # the import registered it


def test_unknown_name(worker: offload.Worker) -> None:
    err = worker.submit("contract.no-such-task", 1).exception(timeout=RESOLVE)
    assert isinstance(err, offload.NoWorkerAvailable), repr(err)
    assert err.task == "contract.no-such-task"


# --------------------------------------------------------------------------------------- #
# Exceptions and progress
# --------------------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("fn", "exc_type"),
    [(h.raise_value_error, ValueError), (h.raise_contract_error, h.ContractError)],
    ids=["builtin", "custom"],
)
def test_task_exception_comes_back_as_itself(
    worker: offload.Worker, fn: Callable[..., None], exc_type: type[BaseException]
) -> None:
    fut = worker.submit(fn, "boom", 7)
    err = fut.exception(timeout=RESOLVE)
    assert type(err) is exc_type
    assert err.args == ("boom", 7)
    cause = err.__cause__
    assert isinstance(cause, offload.RemoteTraceback), repr(cause)
    assert fn.__name__ in str(cause)
    assert isinstance(fut.status(), offload.Raised)
    with pytest.raises(exc_type) as info:
        worker.call(fn, "again")
    assert info.value.args == ("again",)
    assert isinstance(info.value.__cause__, offload.RemoteTraceback)


def test_progress_arrives_in_order(worker: offload.Worker, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    seen: list[int] = []
    fut = worker.submit(h.report_steps, 200, str(gate))
    fut.add_progress_callback(seen.append)
    gate.touch()  # the task reports only once the callback is attached
    assert fut.result(timeout=RESOLVE) == 200
    assert seen == list(range(200))
    assert fut.progress() == 199


# --------------------------------------------------------------------------------------- #
# Large data
# --------------------------------------------------------------------------------------- #


def test_64mib_bytes_round_trip(worker: offload.Worker) -> None:
    data = random.Random(64).randbytes(64 << 20)
    digest, back = worker.call(h.roundtrip, data)
    assert digest == hashlib.sha256(data).hexdigest()  # the argument arrived intact
    assert type(back) is bytes
    assert len(back) == len(data)
    assert back == data  # and so did the result


def test_numpy_array_round_trip(worker: offload.Worker) -> None:
    np = pytest.importorskip("numpy")
    arr = np.arange(8 << 20, dtype=np.float64).reshape(2048, -1)  # 64 MiB
    total, doubled = worker.call(h.numpy_roundtrip, arr)
    assert total == float(arr.sum())
    assert doubled.dtype == arr.dtype and doubled.shape == arr.shape
    assert np.array_equal(doubled, arr * 2)


# --------------------------------------------------------------------------------------- #
# Crashes, kill, timeout
# --------------------------------------------------------------------------------------- #


def crashed_pid(w: offload.Worker, kind: str, pid: int, err: offload.WorkerCrashed) -> int:
    """The pid of the process the crash names (``err.worker``, ``err.pid``): for a local
    kind the handle's own (``pid`` before the crash); for the remote kind one of the
    server's, named by the server (``pid``, the server, lives on: no ConnectionLost)."""
    assert err.pid is not None
    if kind == "remote":
        assert err.pid != pid, "the crash names the server itself"
        assert not isinstance(err, offload.ConnectionLost), repr(err)
        assert err.worker and err.worker != w.name, err.worker
    else:
        assert err.pid == pid
        assert err.worker == w.name
    return err.pid


def test_os_exit_is_a_crash(fresh: Callable[..., offload.Worker], kind: str) -> None:
    w = fresh()
    pid = w.pid
    assert pid is not None
    err = w.submit(h.os_exit, 3).exception(timeout=RESOLVE)
    assert isinstance(err, offload.WorkerCrashed), repr(err)
    assert err.reason == "exit"
    assert err.exitcode == 3
    assert err.signal is None
    works_after_losing(w, kind, crashed_pid(w, kind, pid, err))


def test_segfault_is_a_crash(fresh: Callable[..., offload.Worker], kind: str) -> None:
    w = fresh()
    pid = w.pid
    assert pid is not None
    err = w.submit(h.segfault).exception(timeout=RESOLVE)
    assert isinstance(err, offload.WorkerCrashed), repr(err)
    assert err.reason == "signal"
    assert err.signal == "SIGSEGV"
    assert "Segmentation fault" in err.stderr_tail, err.stderr_tail
    works_after_losing(w, kind, crashed_pid(w, kind, pid, err))


def running_pid(w: offload.Worker, kind: str, handle_pid: int, started: Path) -> int:
    """The pid of the process that ran ``h.block`` (it writes it to ``started``): for a
    local kind the handle's (``handle_pid``, read before the call: after a kill or
    timeout the handle is between processes), for the remote kind one of the server's."""
    assert h.wait_for(started, RESOLVE), "the call never started"
    pid = int(started.read_text())
    if kind == "remote":
        assert pid != handle_pid  # the server's pid
        assert runs_on_the_server(w, pid) or not psutil.pid_exists(pid)
    else:
        assert pid == handle_pid
    return pid


def test_kill_running_call(fresh: Callable[..., offload.Worker], kind: str, tmp_path: Path) -> None:
    w = fresh()
    handle_pid = w.pid
    assert handle_pid is not None
    started = tmp_path / "started"
    fut = w.submit(h.block, str(started))
    pid = running_pid(w, kind, handle_pid, started)
    begin = time.monotonic()
    assert fut.kill()
    err = fut.exception(timeout=2.0)
    assert time.monotonic() - begin < 2.0
    assert isinstance(err, offload.WorkerKilled), repr(err)
    works_after_losing(w, kind, pid)


def test_timeout(fresh: Callable[..., offload.Worker], kind: str, tmp_path: Path) -> None:
    w = fresh()
    handle_pid = w.pid
    assert handle_pid is not None
    started = tmp_path / "started"
    blocked = offload.task(h.block, timeout=0.3)
    begin = time.monotonic()
    err = w.submit(blocked, str(started)).exception(timeout=RESOLVE)
    assert isinstance(err, offload.TaskTimeout), repr(err)
    assert isinstance(err, TimeoutError)
    assert time.monotonic() - begin < 5.0
    works_after_losing(w, kind, running_pid(w, kind, handle_pid, started))


# --------------------------------------------------------------------------------------- #
# Worker options
# --------------------------------------------------------------------------------------- #


@pytest.fixture(scope="class")
def opts(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One worker per start method with every option set (for ``TestOptions``)."""
    base = tmp_path_factory.mktemp(f"opts-{kind}")
    err_file = base / "stderr.log"
    init_file = base / "init.log"
    name = f"ctr-{kind}"
    w = offload.spawn(
        start_method=kind,
        preload=PRELOAD,
        name=name,
        env={"X": "1"},
        stdout="devnull",
        stderr=str(err_file),
        initializer=h.record_init,
        initargs=(str(init_file), "once"),
    )
    try:
        first = w.call(h.init_calls)  # the very first call this process runs
        yield {
            "w": w,
            "pid": w.pid,
            "name": name,
            "err_file": err_file,
            "init_file": init_file,
            "first": first,
        }
    finally:
        w.shutdown(wait=True, timeout=5)


@pytest.mark.requires("process_options")
class TestOptions:
    """Each test checks one option of the ``opts`` worker."""

    @pytest.fixture(autouse=True)
    def same_process(self, opts: dict[str, Any]) -> Iterator[None]:
        yield
        assert opts["w"].pid == opts["pid"], "the options worker was restarted"

    def test_env(self, opts: dict[str, Any]) -> None:
        w = opts["w"]
        assert w.call(h.getenv, "X") == "1"
        assert w.call(h.getenv, "PATH") == os.environ.get("PATH")  # extends the parent's

    @pytest.mark.skipif(not LINUX, reason="/proc/<pid>/comm is Linux")
    def test_name_in_proc_comm(self, opts: dict[str, Any]) -> None:
        w = opts["w"]
        assert w.name == opts["name"]
        comm = Path(f"/proc/{w.pid}/comm").read_text().strip()
        assert comm == opts["name"][:15]

    @pytest.mark.skipif(not LINUX, reason="reads /proc/self/fd")
    def test_stdout_devnull(self, opts: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
        w = opts["w"]
        assert w.call(h.stdio_target, 1) == os.devnull
        w.call(h.write_stdio, "contract-out-marker", "contract-err-marker-1")
        assert "contract-out-marker" not in capfd.readouterr().out

    def test_stderr_to_file(self, opts: dict[str, Any]) -> None:
        w, err_file = opts["w"], opts["err_file"]
        w.call(h.write_stdio, "contract-out-marker", "contract-err-marker-2")
        # The I/O loop appends the worker's stderr to the file: bounded poll.
        deadline = time.monotonic() + RESOLVE
        while "contract-err-marker-2" not in _read(err_file):
            assert time.monotonic() < deadline, f"stderr file: {_read(err_file)!r}"
            time.sleep(0.01)
        assert "contract-out-marker" not in _read(err_file)

    def test_initializer_runs_once_before_first_call(self, opts: dict[str, Any]) -> None:
        w, pid = opts["w"], opts["pid"]
        assert opts["first"] == [(pid, "once")]
        for _ in range(3):
            assert w.call(h.init_calls) == [(pid, "once")]
        assert _read(opts["init_file"]).splitlines() == [f"{pid} once"]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.requires("process_options")
def test_max_tasks_recycles(fresh: Callable[..., offload.Worker]) -> None:
    w = fresh(max_tasks=2)
    pids = [w.call(h.getpid) for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3], pids
    assert len(set(pids)) == 2


CWD_PROGRAM = textwrap.dedent(
    """
    import os, sys
    import offload

    offload.init()  # reexec: the re-run program becomes the worker here
    try:
        with offload.spawn(start_method={method!r}, cwd={cwd!r}) as w:
            print("cwd", w.call(os.getcwd), flush=True)
    except offload.StartError as exc:
        print("StartError", exc, flush=True)
    """
)


@pytest.mark.requires("process_options")
def test_cwd(fresh: Callable[..., offload.Worker], kind: str, tmp_path: Path) -> None:
    """``cwd=`` sets the worker's directory. For ``reexec`` this runs a real program
    (``python program.py`` started from its own directory, as users do), because under
    pytest the outcome would depend on how pytest itself was invoked."""
    wd = tmp_path / "wd"
    wd.mkdir()
    if kind != "reexec":
        w = fresh(cwd=str(wd))
        assert os.path.samefile(w.call(h.getcwd), wd)
        assert os.getcwd() != str(wd)
        return
    (tmp_path / "program.py").write_text(CWD_PROGRAM.format(method=kind, cwd=str(wd)))
    done = run_program(["program.py"], cwd=tmp_path)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert out.startswith("cwd "), out
    assert os.path.samefile(out.split(None, 1)[1].strip(), wd)


START_FAILURE_PROGRAM = textwrap.dedent(
    """
    import os, threading
    import offload

    offload.init()
    outcome = []

    def start():
        try:
            offload.spawn(start_method={method!r}, cwd={cwd!r})
            outcome.append("started")
        except offload.StartError:
            outcome.append("StartError")
        except BaseException as exc:
            outcome.append(type(exc).__name__ + ": " + str(exc))

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join({limit})
    print(outcome[0] if outcome else "hang", flush=True)
    os._exit(0)  # do not wait for a hung thread
    """
)
START_FAILURE_LIMIT = 5.0


@pytest.mark.requires("start_method")
def test_start_failure_raises_not_hangs(kind: str, tmp_path: Path) -> None:
    """A worker that cannot start (here: its cwd does not exist) makes ``spawn`` raise
    ``StartError`` promptly. Run in a script: a hang must not take this process along."""
    missing = str(tmp_path / "missing")
    (tmp_path / "program.py").write_text(
        START_FAILURE_PROGRAM.format(method=kind, cwd=missing, limit=START_FAILURE_LIMIT)
    )
    done = run_program([str(tmp_path / "program.py")], cwd=tmp_path)
    assert done.stdout.decode().strip() == "StartError", done.stderr.decode()[-2000:]


# --------------------------------------------------------------------------------------- #
# Process group, creating thread, parent death
# --------------------------------------------------------------------------------------- #


@pytest.mark.requires("local_process")
def test_own_process_group(worker: offload.Worker) -> None:
    pid = worker.pid
    assert pid is not None
    assert os.getpgid(pid) == pid
    assert os.getpgid(pid) != os.getpgrp()
    assert worker.call(os.getpgrp) == pid


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG and /proc/self/task are Linux")
def test_worker_outlives_its_creating_thread(fresh: Callable[..., offload.Worker]) -> None:
    """PR_SET_PDEATHSIG fires when the *thread* that forked the worker exits: a worker
    (or a connection) made by a short-lived thread must not die with that thread."""
    made: list[offload.Worker] = []
    info: dict[str, Any] = {}

    def create() -> None:
        w = fresh()
        made.append(w)
        info["pid"] = w.pid
        info["first"] = w.call(h.add, 1, 1)

    thread = threading.Thread(target=create, name="contract-creator")
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert made, "the creating thread failed"
    w = made[0]
    # join() returns slightly before the OS thread is gone; wait for that (bounded).
    tid = thread.native_id
    deadline = time.monotonic() + RESOLVE
    while os.path.exists(f"/proc/self/task/{tid}"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert info["first"] == 2
    # A worker that had died would have been replaced by this call (or failed it).
    assert w.call(h.add, 2, 2) == 4
    assert w.alive and w.pid == info["pid"], "the worker died with its creating thread"


PARENT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import offload

    offload.init()  # reexec: the re-run script becomes the worker here
    w = offload.spawn(start_method={method!r}, name="orphan-check")
    assert w.call(os.getpid) == w.pid
    print(w.pid, flush=True)
    sys.stdin.readline()  # the test has looked at our processes
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _read_line(stream: Any, limit: float) -> str:
    ready, _, _ = select.select([stream], [], [], limit)
    assert ready, "the script printed nothing in time"
    return str(stream.readline().decode())


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.requires("local_process")
def test_worker_dies_with_its_parent(kind: str, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(method=kind))
    log = tmp_path / "script-stderr.log"
    descendants: list[psutil.Process] = []
    with (
        log.open("wb") as err,
        subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=tmp_path,
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = _read_line(proc.stdout, 30.0)
            assert line.strip().isdigit(), f"{line!r}; stderr: {_read(log)}"
            worker_pid = int(line)
            descendants = psutil.Process(proc.pid).children(recursive=True)
            worker = next(p for p in descendants if p.pid == worker_pid)
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert proc.wait(timeout=30) == -signal.SIGKILL
            deadline = time.monotonic() + GONE_LIMIT
            while _alive(worker) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not _alive(worker), f"worker {worker_pid} outlived its parent by 2 s"
            while any(_alive(p) for p in descendants) and time.monotonic() < deadline:
                time.sleep(0.01)
            left = [p.pid for p in descendants if _alive(p)]
            assert not left, f"processes of the dead parent still alive after 2 s: {left}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            for p in descendants:  # only processes the script started
                if _alive(p):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass


REEXEC_PROGRAM = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests_dir!r})
    import contract_helpers  # registers its tasks, before init() as in a real program
    import offload

    offload.init()
    with offload.spawn(start_method="reexec") as w:
        print(w.call(contract_helpers.TRIPLE_NAME, 5), w.call(contract_helpers.double, 4))
    """
)


def test_reexec_program_knows_the_tasks_it_imports(tmp_path: Path) -> None:
    """Outside pytest, a reexec worker re-runs the program's imports up to ``init()``,
    so a custom task name registered there works without ``preload``."""
    script = tmp_path / "program.py"
    script.write_text(REEXEC_PROGRAM.format(tests_dir=TESTS_DIR))
    done = run_program([str(script)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["15", "8"]
