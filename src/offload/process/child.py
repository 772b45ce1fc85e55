"""Watching, killing and reaping a started worker process: :class:`ChildProcess`.

How a worker is started is the start methods' business (:mod:`offload.process.launch`);
once started, every worker is the same here. It leads its own process group (it was
started in a new session: killing the group kills the task's subprocesses too, and a
Ctrl-C in the terminal reaches only the parent), and its stderr is always a pipe read by
the I/O loop: the bytes are passed on as the ``stderr`` option says, and the last 64 KiB
are kept for crash reports. Its exit is observed through a pidfd on Linux (a waiter
thread elsewhere), and the process is reaped as soon as it exits.

Neither depends on the program's SIGCHLD disposition: a program that ignores SIGCHLD
(``signal.signal(SIGCHLD, SIG_IGN)``) has its children reaped by the kernel, so a reap
finds nothing (ECHILD) and the exit status is lost. The exit is then reported all the
same, with the status inferred from the worker's stderr (faulthandler's "Fatal Python
error: Segmentation fault" and the like), from the signal offload sent it, or else as
:class:`~offload.errors.UnknownExitStatus` — never as a clean exit.

Killing a worker (:meth:`ChildProcess.terminate`) sends SIGTERM to its process group and
to every descendant found (a task's subprocess may have left the group), then, after a
short grace, SIGKILL to the group and to every descendant found at any point of the kill
— also when the worker itself died of the SIGTERM at once, which reparents its children
out of its tree. Workers make themselves child subreapers (Linux), so a task's
double-forked daemons stay their descendants and are found too.

Also here, because every start method needs it: :func:`popen`, which never overlaps a
fork by another thread (the popen/fork lock), and :func:`reap_pid`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from offload.errors import UnknownExitStatus
from offload.process.spec import LaunchSpec
from offload.transport.loop import Loop, Timer

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    import subprocess
    from typing import IO, Any

log = logging.getLogger("offload")
TAIL_LIMIT = 64 * 1024
KILL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL

# subprocess.Popen waits for its error pipe to close, which happens when the new child
# execs. A fork in another thread meanwhile (multiprocessing's "fork" start method, a
# user's os.fork) copies that pipe into a process that never execs, and Popen would
# then wait as long as that process lives: forever, for a pool worker. So forks wait
# for a Popen in progress to finish, and Popen for a fork in progress.
_popen_lock = threading.RLock()

# faulthandler's first line for each fatal signal (and Py_FatalError, which aborts).
_FATAL_ERRORS = {
    "Segmentation fault": signal.SIGSEGV,
    "Floating point exception": signal.SIGFPE,
    "Aborted": signal.SIGABRT,
    "Bus error": signal.SIGBUS,
    "Illegal instruction": signal.SIGILL,
}
_FATAL_PREFIX = "Fatal Python error: "


_fork_holds = threading.local()  # how many forks in progress on this thread hold it


def _before_fork() -> None:
    _popen_lock.acquire()
    _fork_holds.count = getattr(_fork_holds, "count", 0) + 1


def _after_fork_in_parent() -> None:
    # Nothing to release for a fork that began before this module was imported (a
    # thread may import it while another forks).
    if getattr(_fork_holds, "count", 0):
        _fork_holds.count -= 1
        _popen_lock.release()


def _after_fork_in_child() -> None:
    global _popen_lock
    _popen_lock = threading.RLock()
    _fork_holds.count = 0


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen``, never overlapping a fork by another thread (see above)."""
    import subprocess  # not at the top: spawning workers does without it (forkexec)

    with _popen_lock:
        return subprocess.Popen(argv, **kwargs)


def popen_lock() -> threading.RLock:
    """The popen/fork lock (see above): hold it while starting a process that execs
    without :func:`popen` (:func:`offload.process.forkexec.start_process`)."""
    return _popen_lock


class _Sink:
    """Where a worker's stdout/stderr bytes go: passed through, prefixed, or a file."""

    def __init__(self, mode: str, name: str, fd: int) -> None:
        self.mode = mode
        self.prefix = f"[{name}] ".encode()
        self.fd = fd
        self.file: IO[bytes] | None = None
        self.partial = b""
        if mode not in ("inherit", "devnull", "prefix"):
            self.file = open(mode, "ab", buffering=0)  # noqa: SIM115 - closed in close()

    def write(self, data: bytes) -> None:
        if self.mode == "devnull":
            return
        if self.file is not None:
            self.file.write(data)
            return
        if self.mode == "prefix":
            data = self.partial + data
            lines = data.split(b"\n")
            self.partial = lines.pop()
            if len(self.partial) > TAIL_LIMIT:  # a line that never ends: bounded pieces
                lines.append(self.partial)
                self.partial = b""
            data = b"".join(self.prefix + line + b"\n" for line in lines)
        _write_all(self.fd, data)

    def close(self) -> None:
        if self.mode == "prefix" and self.partial:
            _write_all(self.fd, self.prefix + self.partial + b"\n")
            self.partial = b""
        if self.file is not None:
            self.file.close()


# The same sink passes on what a worker server relays of a remote call's output
# (offload.client.output), as the caller's stdout/stderr options say.
OutputSink = _Sink


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return
        view = view[n:]


class ChildProcess:
    """A started worker process.

    Attributes:
        pid: its process id (also its process-group id).
        name: the worker's name.
        returncode: None while it runs; its exit status (negative: the signal) after;
            an :class:`~offload.errors.UnknownExitStatus` when the status was lost and
            could not be inferred (the program ignores SIGCHLD).
        exit_note: how ``returncode`` was found when it is a guess ("" when it is the
            status the kernel reported).
        output_hook: when set, ``hook(stream, data)`` is offered each chunk read from
            stdout (1) or stderr (2) before it is passed on, and returns True when it
            took it (a worker server relays its calls' output to its clients).
    """

    def __init__(
        self,
        pid: int,
        spec: LaunchSpec,
        loop: Loop,
        on_exit: Callable[[ChildProcess], Any],
        *,
        stderr_fd: int | None,
        stdout_fd: int | None,
        reap: Callable[[], int | None] | None,
    ) -> None:
        """``reap()`` collects the exit status without blocking (None: still running;
        an :class:`UnknownExitStatus` when the process is gone but its status is lost);
        None when another process reaps it and calls :meth:`report_exit` (forkserver)."""
        self.pid = pid
        self.name = spec.name
        self.loop = loop
        self.returncode: int | None = None
        self.exit_note = ""
        # Descendants found during a kill (psutil.Process objects: they notice pid
        # reuse), kept until the final SIGKILL: once the worker is dead, its children
        # are no longer its descendants.
        self._doomed: dict[int, Any] = {}
        self._signalled = 0  # the last signal the kill sent the worker (0: none)
        self._on_exit = on_exit
        self._reap = reap
        self._tail = bytearray()
        self._pipes: dict[int, tuple[int, _Sink, bool]] = {}
        self._kill_timer: Timer | None = None
        self._pidfd: int | None = None
        self.exited = threading.Event()
        # Offered every chunk read from stdout (1) or stderr (2) first, on the loop
        # thread: True when it took the chunk (a worker server relays a call's output to
        # its client), False to pass it on as the mode says. The stderr tail keeps it
        # either way.
        self.output_hook: Callable[[int, bytes], bool] | None = None
        if stderr_fd is not None:
            self._watch_pipe(stderr_fd, _Sink(spec.stderr, spec.name, 2), keep_tail=True)
        if stdout_fd is not None:
            self._watch_pipe(stdout_fd, _Sink(spec.stdout, spec.name, 1), keep_tail=False)
        if reap is not None:
            self._watch_exit()

    def __repr__(self) -> str:
        if self.returncode is not None:
            state = f"exited {self.returncode}"
            if self.returncode < 0:
                state += f" ({_signal_name(-self.returncode)})"
            if self.exit_note:
                state += f" ({self.exit_note})"
        elif self._signalled:
            state = f"running, killed with {signal.Signals(self._signalled).name}"
        else:
            state = "running"
        return (
            f"<ChildProcess {self.name} pid={self.pid} {state} [pipes: {len(self._pipes)} "
            f"open | descendants to kill: {len(self._doomed)}]>"
        )

    # -- output pipes --------------------------------------------------------------------

    def _watch_pipe(self, fd: int, sink: _Sink, keep_tail: bool) -> None:
        os.set_blocking(fd, False)
        self._pipes[fd] = (fd, sink, keep_tail)
        self.loop.add_reader(fd, lambda: self._read_pipe(fd))

    def _read_pipe(self, fd: int) -> None:
        _, sink, keep_tail = self._pipes[fd]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_pipe(fd)
                return
            if keep_tail:
                self._tail += data
                if len(self._tail) > TAIL_LIMIT:
                    del self._tail[: len(self._tail) - TAIL_LIMIT]
            hook = self.output_hook
            if hook is not None and hook(sink.fd, data):
                continue
            try:
                sink.write(data)
            except OSError:
                log.warning("offload: could not pass on output of %s", self.name)

    def _close_pipe(self, fd: int) -> None:
        entry = self._pipes.pop(fd, None)
        if entry is None:
            return
        _, sink, _ = entry
        self.loop.remove_reader(fd)
        sink.close()
        os.close(fd)

    def watch_output(self, fd: int, mode: str, *, initial: bytes = b"") -> None:
        """Pass on another pipe of the process's output as ``mode`` says (like its
        stdout), from now on; ``initial`` is what was read from it already. The pipe is
        the loop's from now on (closed at its end or the process's). Any thread.

        For a process whose stdout was read by hand first (the ``ssh`` of a worker
        started over ssh answers on it before its output is just output)."""
        sink = _Sink(mode, self.name, 1)
        if initial:
            sink.write(initial)

        def watch() -> None:
            if self.returncode is not None:  # exited meanwhile: what is left, then close
                os.set_blocking(fd, False)
                self._pipes[fd] = (fd, sink, False)
                self._read_pipe(fd)
                self._close_pipe(fd)
                return
            self._watch_pipe(fd, sink, keep_tail=False)

        self.loop.call_soon(watch)

    def drain_output(self) -> None:
        """Read whatever the process has written so far (it has exited: nothing more
        comes from it, though grandchildren may still hold the pipe)."""
        for fd in list(self._pipes):
            self._read_pipe(fd)

    def stderr_tail(self) -> str:
        """The last (at most 64 KiB) text written to stderr."""
        return self._tail.decode("utf-8", "replace")

    def forget_tail(self) -> None:
        """Start the stderr tail afresh (a worker server, once a call is answered: the
        next call's crash report holds only what that call wrote). Loop thread."""
        self._tail.clear()

    # -- exit ----------------------------------------------------------------------------

    def _watch_exit(self) -> None:
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self._pidfd = pidfd_open(self.pid)
            except OSError:
                self._pidfd = None
        if self._pidfd is not None:
            self.loop.add_reader(self._pidfd, self._on_pidfd)
        else:
            threading.Thread(
                target=self._wait_thread, name=f"offload-wait-{self.pid}", daemon=True
            ).start()

    def _on_pidfd(self) -> None:
        # The worker is a zombie now, so its pid still names its process group: end
        # whatever the task left running in it before the id can be reused. (Its
        # children are no longer its descendants: they were reparented before it
        # became a zombie.)
        self._kill_leftovers()
        assert self._reap is not None
        try:
            code = self._reap()
        except OSError as exc:  # never leave a readable pidfd behind: it would spin
            log.warning("offload: could not reap %s (pid %s): %s", self.name, self.pid, exc)
            code = UnknownExitStatus()
        if code is None:
            return
        assert self._pidfd is not None
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._exited(code)

    def _wait_thread(self) -> None:
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        except ChildProcessError:
            pass  # reaped by the kernel already (SIGCHLD ignored): it has exited
        except OSError:
            log.warning("offload: could not wait for %s (pid %s)", self.name, self.pid)
        self._kill_leftovers()
        assert self._reap is not None
        try:
            code = self._reap()
        except OSError:
            code = UnknownExitStatus()
        self.loop.call_soon(self._exited, code if code is not None else UnknownExitStatus())

    def report_exit(self, code: int) -> None:
        """The process exited with ``code`` (reaped elsewhere). Loop thread."""
        self._kill_leftovers()
        self._exited(code)

    def _kill_leftovers(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _exited(self, code: int | None) -> None:
        if self.exited.is_set():
            return
        self.drain_output()
        if code is None:
            code = -signal.SIGKILL
        elif isinstance(code, UnknownExitStatus):
            code = self._infer_status()
        self.returncode = code
        if self._kill_timer is not None and not self._doomed:
            self._kill_timer.cancel()
            self._kill_timer = None
        # Otherwise the timer stays: at the end of the grace it SIGKILLs the descendants
        # that the SIGTERM did not end (the worker is dead, they are not).
        # Grandchildren may keep the pipes open; they are no longer this worker's output.
        for fd in list(self._pipes):
            self._close_pipe(fd)
        self.exited.set()
        self._on_exit(self)

    def _infer_status(self) -> int:
        """The exit status was lost (the program ignores SIGCHLD, so the kernel reaped
        the worker): the best guess from what it printed and what offload sent it."""
        tail = self.stderr_tail()
        at = tail.rfind(_FATAL_PREFIX)
        if at >= 0:
            # faulthandler (on in every worker) reports a fatal signal, then the process
            # dies of it; any other fatal error aborts.
            what = tail[at + len(_FATAL_PREFIX) :].split("\n", 1)[0].strip()
            sig = _FATAL_ERRORS.get(what, signal.SIGABRT)
            self.exit_note = (
                f"exit status lost (this program ignores SIGCHLD); {sig.name} inferred "
                f"from the worker's stderr"
            )
            return -sig
        if self._signalled:
            sig = signal.Signals(self._signalled)
            self.exit_note = (
                f"exit status lost (this program ignores SIGCHLD); {sig.name} assumed: "
                f"offload sent it"
            )
            return -sig
        self.exit_note = "exit status lost: this program ignores SIGCHLD"
        return UnknownExitStatus()

    # -- killing -------------------------------------------------------------------------

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (and stragglers that left it)."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            # No such group yet: a forked worker stopped (or slow) before its setsid()
            # still sits in its parent's group. The worker itself must get the signal.
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self, grace: float = KILL_GRACE) -> None:
        """SIGTERM the process group and every descendant now, SIGKILL them after
        ``grace`` seconds (even when the worker itself is gone by then). Thread-safe."""

        def start() -> None:
            if self.returncode is not None or self._kill_timer is not None:
                return
            self._find_descendants()
            self._signalled = signal.SIGTERM
            # The group's members get the group's signals; the others one by one.
            self._signal_doomed(signal.SIGTERM, outside_group=True)
            self.signal_group(signal.SIGTERM)
            # A stopped process must see the SIGTERM.
            self._signal_doomed(signal.SIGCONT, outside_group=True)
            self.signal_group(signal.SIGCONT)
            self._kill_timer = self.loop.call_later(grace, self._grace_over)

        self.loop.call_soon(start)

    def _grace_over(self) -> None:
        self._kill_timer = None
        self.kill()

    def kill(self) -> None:
        """SIGKILL the process group, and every descendant found now or earlier in the
        kill (those that left the group, or were orphaned when the worker died)."""
        if self.returncode is None:
            self._find_descendants()
            self._signalled = signal.SIGKILL
        self.signal_group(signal.SIGKILL)
        self._signal_doomed(signal.SIGKILL)
        if self.returncode is not None:
            self._doomed.clear()  # nothing can be added any more: the worker is gone

    def _find_descendants(self) -> None:
        """Remember the worker's descendants as they are now (while it lives)."""
        try:
            import psutil

            found = psutil.Process(self.pid).children(recursive=True)
        except Exception:  # noqa: BLE001 - the process may be gone already
            return
        for proc in found:
            self._doomed.setdefault(proc.pid, proc)

    def _signal_doomed(self, sig: int, outside_group: bool = False) -> None:
        for pid, proc in list(self._doomed.items()):
            try:
                if outside_group and os.getpgid(pid) == self.pid:
                    continue
                proc.send_signal(sig)  # psutil: refuses a pid reused since it was found
            except Exception:  # noqa: BLE001 - gone (psutil.NoSuchProcess) or not ours
                self._doomed.pop(pid, None)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def signal_if_ours(pid: int, sig: int, still_ours: Callable[[], bool]) -> bool:
    """Send ``sig`` to process ``pid`` if ``still_ours()`` holds once the process is
    pinned; True if it was sent.

    ``still_ours()`` says whether ``pid`` still names our worker: it does until the
    worker is reaped (a zombie keeps its pid), after which the number may name someone
    else's process. On Linux the process is pinned by a pidfd first and checked after,
    so the signal reaches the process that was checked, never a newcomer with a reused
    pid; elsewhere the check and ``kill`` are as close together as they can be.
    """
    pidfd: int | None = None
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (ESRCH), or no pidfds in this kernel
            pidfd = None
    try:
        if not still_ours():
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def reap_pid(pid: int) -> int | None:
    """Collect ``pid``'s exit status without blocking: None while it runs; an
    :class:`UnknownExitStatus` when it is gone but the kernel reaped it (the program
    ignores SIGCHLD), where ``Popen.poll()`` would say 0."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return UnknownExitStatus()
    return os.waitstatus_to_exitcode(status) if done else None
