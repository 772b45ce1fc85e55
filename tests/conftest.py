"""Shared test fixtures, and the three tiers of tests.

Tiers: every test gets exactly one of the markers ``unit``, ``process`` and
``network`` (see ``TIERS``), from the table ``TIER_OF_FILE`` by the file it is in,
unless it carries one already (the contract suite marks its remote worker kind
``network``). ``make test-unit`` / ``test-process`` / ``test-network`` run one tier;
``make test`` runs them all. A ``unit`` test is checked as it runs: if a thread other
than offload's I/O loop starts a process or opens a socket, it fails (an audit hook,
``unit_tier_guard``).

Every test runs under ``no_leaks``: a test that leaves behind a child process
(running or zombie), a thread, or an open file descriptor fails at teardown.
The exceptions are what lives longer than one test on purpose: offload's
process-wide I/O loop, which is started lazily by the first test that needs it
and lives for the rest of the process (its thread, named ``offload-io...``, and the
fds it reports through ``offload.transport.loop.owned_fds()`` are ignored); the
forkserver templates; and processes a fixture shared by many tests declared with
``long_lived`` (a shared ``offload serve``: it and all its descendants are ignored).

Hung tests are handled by pytest-timeout (configured in pyproject.toml with
``timeout_method = "thread"``), which dumps the stack of every thread before
ending the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

if TYPE_CHECKING:
    import offload
    from sshd import SSHD

# How long teardown waits for the library's own background cleanup (reaping
# workers, joining helper threads, closing pipes) before calling it a leak.
LEAK_GRACE_SECONDS = 5.0
_POLL_SECONDS = 0.02
_IO_THREAD_PREFIX = "offload-io"
_HAVE_PROC_FD = os.path.isdir("/proc/self/fd")


# --------------------------------------------------------------------------- #
# Tiers
# --------------------------------------------------------------------------- #

TIERS = {
    "unit": "no processes, no sockets: the protocol, the scheduler, futures, option checks",
    "process": "real local worker processes: the contract suite, crashes, pools, lifecycle",
    "network": "sockets and real `offload serve` servers on 127.0.0.1 (and the I/O loop)",
}
DEFAULT_TIER = "process"
# The tier of each test file ("file::test" for one test of a file that has another);
# a file not listed here is in DEFAULT_TIER.
TIER_OF_FILE = {
    "test_channel_hub.py": "unit",  # a channel's hub driven by hand, no processes
    "test_engine.py": "unit",  # the engine driven by fake slots on a fake clock
    "test_future.py": "unit",
    "test_messages.py": "unit",
    "test_option_validation.py": "unit",
    "test_protocol.py": "unit",
    "test_large_frames.py": "unit",  # large frames received in place, sans-IO
    "test_public_api.py": "unit",
    "test_record.py": "unit",  # offload._record: dataclass-like records, no processes
    "test_public_api.py::test_worker_start_up_imports_stay_small": "process",  # runs python
    "test_outcome.py": "unit",
    "test_scheduler.py": "unit",
    "test_tokens.py": "unit",
    "test_thread_output.py": "unit",  # the streams of thread_output, no process
    "test_worker_units.py": "unit",
    # A worker loop on a socket pair, the test its client.
    "test_worker_units.py::test_a_call_waiting_behind_a_running_one_is_given_back_at_once": (
        "network"
    ),
    "test_cancel_and_options.py": "process",
    "test_conftest_self.py": "process",  # inner pytest runs whose tests start processes
    "test_contract.py": "process",  # its remote worker kind is marked network
    "test_crash_matrix.py": "process",
    "test_dumpfile.py": "unit",  # the crash-dump format and what a dump holds
    "test_crash_dumps.py": "process",  # OFFLOAD_DUMP_DIR, offload replay (subprocesses)
    "test_crash_dumps.py::test_a_crash_on_a_worker_server_is_dumped_in_the_client": "network",
    "test_docs_examples.py": "process",  # every ```python block of docs/, run as a script
    "test_docs_examples.py::test_example_with_a_server_runs": "network",  # + offload serve
    "test_lifecycle.py": "process",
    "test_lock.py": "process",  # lock holders are real processes
    "test_pool.py": "process",
    "test_pool_kill_reduce.py": "process",
    "test_process_reliability.py": "process",
    "test_progress.py": "process",
    "test_readme.py": "process",
    "test_shutdown_exit_fork.py": "process",
    "test_fork_imports.py": "process",
    "test_cold_imports.py": "process",  # fresh interpreters: what import offload loads
    "test_forkexec.py": "process",  # starting programs as Popen would, without subprocess
    "test_waiting.py": "process",  # every way of waiting for futures of real pools
    "test_by_value.py": "network",  # by-value functions, locally and through offload serve
    "test_stress.py": "process",
    "test_worker_api.py": "process",
    "test_actor.py": "network",  # actors listen on 127.0.0.1; one test runs offload serve
    "test_channels.py": "network",  # channels through local workers, offload serve, actors
    "test_mypy_plugin.py": "process",  # runs mypy
    "test_loop.py": "network",  # the I/O loop's channels over socket pairs
    "test_remote.py": "network",
    "test_large_data.py": "network",  # 64 MiB round trips; offload serve (TCP, TLS)
    "test_attach.py": "network",  # workers started by hand connect to 127.0.0.1
    "test_remote_security.py": "network",
    "test_remote_large_frames.py": "network",  # 64 MiB through offload serve: peak memory, MACs
    "test_remote_output.py": "network",  # real offload serve servers; their tasks print
    "test_remote_retries.py": "network",  # retries of calls crashed on offload serve
    "test_remote_retries.py::test_scheduler_retries_server_crashes": "unit",
    "test_ssh.py": "network",  # a real sshd on 127.0.0.1 per test
    "test_actor_ssh.py": "network",  # actors over ssh: a real sshd on 127.0.0.1 per test
    "test_channels_ssh.py": "network",  # channels over ssh: a real sshd on 127.0.0.1 per test
    "test_server_hardening.py": "network",
    "test_server_session.py": "network",  # a server session over socket pairs
}


def tier_of(path: Path, name: str) -> str:
    """The tier of test ``name`` (the function's name, without parameters) in ``path``."""
    return TIER_OF_FILE.get(f"{path.name}::{name}", TIER_OF_FILE.get(path.name, DEFAULT_TIER))


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: tier of tests: {what}")
    config.addinivalue_line("markers", "slow: a slow test (deselect with -m 'not slow')")
    config.addinivalue_line(
        "markers",
        "leak_grace(seconds): how long the no_leaks fixture waits for background "
        f"cleanup before reporting a leak (default {LEAK_GRACE_SECONDS:g})",
    )
    config.addinivalue_line(
        "markers",
        "requires(capability): test_contract.py runs the test only for the kinds of "
        "worker that have the capability, and skips it with a reason for the others",
    )
    _install_unit_guard()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test without a tier marker the tier of its file."""
    for item in items:
        if any(item.get_closest_marker(tier) is not None for tier in TIERS):
            continue
        name = getattr(item, "originalname", item.name)
        item.add_marker(tier_of(item.path, name))


# The unit tier's guard: an audit hook (added once, never removed: audit hooks cannot
# be) that notes the processes started and sockets made while a unit test runs.
_GUARDED_EVENTS = frozenset(
    {
        "os.exec",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "subprocess.Popen",
        "socket.__new__",  # socket(), socketpair(), accept(), fromfd()
    }
)
_guard: dict[str, Any] = {"installed": False, "on": False, "seen": []}


def _unit_audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _guard["on"] or event not in _GUARDED_EVENTS:
        return
    thread = threading.current_thread()
    if thread.name.startswith(_IO_THREAD_PREFIX):
        return  # the process-wide loop may still be finishing an earlier test's work
    _guard["seen"].append(f"{event}{args[:2]!r} in thread {thread.name}")


def _install_unit_guard() -> None:
    if not _guard.get("installed"):  # once per copy of this module (pytester makes more)
        sys.addaudithook(_unit_audit_hook)
        _guard["installed"] = True


@pytest.fixture(autouse=True)
def unit_tier_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """A ``unit`` test fails if it started a process or made a socket."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    _guard["seen"] = seen = []
    _guard["on"] = True
    try:
        yield
    finally:
        _guard["on"] = False
    if seen:
        pytest.fail(
            "a unit test must start no process and open no socket (or move its file, or "
            "it, to another tier in conftest.TIER_OF_FILE); it did:\n  " + "\n  ".join(seen),
            pytrace=False,
        )


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture
def spawn() -> Iterator[Callable[..., offload.Worker]]:
    """``offload.spawn`` whose workers are all shut down at teardown."""
    import offload

    workers: list[offload.Worker] = []

    def make(**options: Any) -> offload.Worker:
        worker = offload.spawn(**options)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.shutdown(wait=True, timeout=10)


# A real sshd on 127.0.0.1 (``sshd``) for the ssh tests, which skip without one.


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host and client keys of every test's sshd (``sshd.make_keys``)."""
    from sshd import make_keys

    directory = tmp_path_factory.mktemp("ssh-keys")
    make_keys(directory)
    return directory


@pytest.fixture
def sshd(ssh_keys: Path, tmp_path: Path) -> Iterator[SSHD]:
    """This test's own sshd; it fails if any session process is left behind at the end."""
    from sshd import SSHD

    server = SSHD(ssh_keys, tmp_path).start()
    try:
        yield server
    finally:
        left = server.stop()
    if left:
        pytest.fail("processes left behind on the ssh side:\n  " + "\n  ".join(left))


# --------------------------------------------------------------------------- #
# Leak detection
# --------------------------------------------------------------------------- #


@dataclass
class _Snapshot:
    children: set[int]
    threads: set[int]
    fds: set[int]  # fd numbers where /proc/self/fd exists
    fd_count: int  # fallback elsewhere


@dataclass
class _Leaks:
    children: list[psutil.Process] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    extra_fd_count: int = 0

    def __bool__(self) -> bool:
        return bool(self.children or self.threads or self.fds or self.extra_fd_count)


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _open_fds() -> set[int]:
    if not _HAVE_PROC_FD:
        return set()
    # The listing itself opens an fd that shows up in the result; it is closed
    # again by the time we look, so drop entries that no longer resolve.
    fds = {int(name) for name in os.listdir("/proc/self/fd")}
    return {fd for fd in fds if _fd_target(fd) is not None}


def _fd_count() -> int:
    try:
        return psutil.Process().num_fds()
    except (AttributeError, psutil.Error):  # num_fds() is POSIX-only
        return 0


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _snapshot() -> _Snapshot:
    return _Snapshot(
        children={p.pid for p in _children()},
        threads={t.ident for t in threading.enumerate() if t.ident is not None},
        fds=_open_fds(),
        fd_count=0 if _HAVE_PROC_FD else _fd_count(),
    )


def _loop_owned_fds() -> set[int]:
    """Fds belonging to offload's process-wide I/O loop, if it exists yet."""
    try:
        from offload.transport import loop
    except ImportError:
        return set()
    owned_fds = getattr(loop, "owned_fds", None)
    if owned_fds is None:
        return set()
    return {int(fd) for fd in owned_fds()}


def _forkserver_templates() -> set[int]:
    """offload's forkserver template processes: started once, shared, long-lived."""
    try:
        from offload.process import forkserver
    except ImportError:
        return set()
    return forkserver.template_pids()


# Pids of processes shared by many tests (see ``long_lived``).
_LONG_LIVED: set[int] = set()


def _long_lived_tree() -> set[int]:
    """The long-lived processes and all their descendants."""
    pids = set(_LONG_LIVED)
    for pid in _LONG_LIVED:
        try:
            pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return pids


@pytest.fixture(scope="session")
def long_lived() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with long_lived(pid): ...``: inside the block, the process ``pid`` (one a
    module- or session-scoped fixture started, shared by many tests) and all its
    descendants are no leak of the test that happens to be running. Leaving the block
    stops nothing: the fixture stops its process itself, inside it."""

    @contextlib.contextmanager
    def declare(pid: int) -> Iterator[None]:
        _LONG_LIVED.add(pid)
        try:
            yield
        finally:
            _LONG_LIVED.discard(pid)

    return declare


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _find_leaks(base: _Snapshot) -> _Leaks:
    leaks = _Leaks()
    # A new child that exited but was never waited for (a zombie) is a leak too:
    # the library must reap what it starts.
    shared = _forkserver_templates() | _long_lived_tree()
    leaks.children = [p for p in _children() if p.pid not in base.children and p.pid not in shared]
    leaks.threads = [
        t
        for t in threading.enumerate()
        if t.ident not in base.threads and t.is_alive() and not t.name.startswith(_IO_THREAD_PREFIX)
    ]
    owned = _loop_owned_fds()
    if _HAVE_PROC_FD:
        leaks.fds = sorted(_open_fds() - base.fds - owned)
    else:
        leaks.extra_fd_count = max(0, _fd_count() - base.fd_count - len(owned))
    return leaks


def _describe_process(proc: psutil.Process) -> str:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        cmdline = ""
    if not cmdline:  # zombies and kernel-ish processes have no command line
        try:
            cmdline = f"[{proc.name()}]"
        except psutil.Error:
            cmdline = "?"
    state = " (zombie)" if _is_zombie(proc) else ""
    return f"pid {proc.pid}{state}: {cmdline}"


def _kill_and_reap(procs: list[psutil.Process]) -> None:
    """SIGKILL exactly the given pids; reap those that are our direct children."""
    me = os.getpid()
    direct = []
    for proc in procs:
        try:
            if proc.ppid() == me:
                direct.append(proc.pid)
        except psutil.Error:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
    for pid in direct:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _report(leaks: _Leaks, child_lines: list[str]) -> str:
    lines = ["resource leak after test:"]
    if child_lines:
        lines.append("  leaked child processes (killed):")
        lines.extend(f"    {line}" for line in child_lines)
    if leaks.threads:
        lines.append("  leaked threads:")
        frames = sys._current_frames()
        for t in leaks.threads:
            lines.append(f"    {t.name} (ident {t.ident}, daemon={t.daemon}), where it is:")
            frame = frames.get(t.ident) if t.ident is not None else None
            stack = traceback.format_stack(frame) if frame is not None else ["(gone)\n"]
            lines.extend(f"      {row}" for entry in stack for row in entry.rstrip().splitlines())
    if leaks.fds:
        lines.append("  leaked file descriptors:")
        lines.extend(f"    fd {fd} -> {_fd_target(fd) or '?'}" for fd in leaks.fds)
    if leaks.extra_fd_count:
        lines.append(f"  leaked file descriptors: {leaks.extra_fd_count} more open than before")
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("leak_grace")
    grace = float(marker.args[0]) if marker is not None else LEAK_GRACE_SECONDS

    base = _snapshot()
    yield

    # Bounded wait for the library's own background cleanup; this is not test
    # synchronisation, and it returns at once when nothing is outstanding.
    deadline = time.monotonic() + grace
    leaks = _find_leaks(base)
    while leaks and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        leaks = _find_leaks(base)
    if not leaks:
        return

    child_lines = [_describe_process(p) for p in leaks.children]
    _kill_and_reap(leaks.children)
    pytest.fail(_report(leaks, child_lines), pytrace=False)
