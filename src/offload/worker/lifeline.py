"""A worker's lifeline: it dies with its parent, and takes what its tasks started along.

Theory of operation
-------------------
A worker must never outlive the client that started it, and neither may the processes
its tasks started. Four things see to it:

1. **End of file on the channel.** The worker's loop (:mod:`offload.worker.loop`) reads
   the socket to its parent; EOF, or a protocol error, means the parent is gone or gave
   up on us, and the loop calls :func:`die`.
2. **The parent-death signal** (Linux, :func:`set_parent_death_signal`): the kernel sends
   :data:`PARENT_DEATH_SIGNAL` when the parent dies, which also covers a parent dying
   while the worker runs a call on its only thread (the loop reads nothing then).
3. **The process-group kill** (:func:`die`): a worker leads its own process group (it is
   started in a new session), so one ``killpg`` ends it and every subprocess its tasks
   started that stayed in the group, at once.
4. **Subreaping** (Linux, :func:`become_subreaper`): the orphans of a task's subprocesses
   (a double-forked daemon) become the worker's children instead of init's, so they stay
   its descendants, and the parent finds and kills them with the worker. Their zombies
   are reaped after calls (:class:`OrphanReaper`), never one that a ``Popen`` or a
   ``multiprocessing`` process of the task will wait for.

A SIGTERM from anyone else (the parent is alive: it asked us to stop) ends the worker
by that signal, so its exit status says so; the parent then kills the rest of the group.
"""

from __future__ import annotations

import _signal  # not `signal`: it imports enum, which costs a worker ~2 ms at start-up
import _thread
import os
import sys

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn

# The parent-death signal. Not SIGTERM: a SIGTERM may come from anyone (and the parent
# is then alive to clean up after us), while this one means the parent is gone, so the
# worker must take its whole process group along itself. The kernel sends it when the
# parent *thread* that forked us exits, which can be a moment before the parent process
# is gone and getppid() changes, so the signal itself must say it.
PARENT_DEATH_SIGNAL = _signal.SIGHUP

_clock = __import__("time").perf_counter
_REAP_INTERVAL = 0.1  # seconds between looks for adopted orphans' zombies
_REAP_BACKOFF = 5.0  # ... while a zombie that someone will wait for lingers


def die() -> NoReturn:
    """The parent is gone: end this worker and everything it started, now.

    Kills the whole process group when this process leads it (a worker always does),
    else just exits with status 1.
    """
    try:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), _signal.SIGKILL)
    finally:
        os._exit(1)


def outlive_parent() -> None:
    """The parent is gone and this worker lives on (``shutdown_on="explicit"``): point
    standard output and error at ``/dev/null``. Their pipes were read by the parent;
    with nobody reading, a print would fail with a broken pipe (or block on a full one).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    finally:
        os.close(devnull)


def install_signal_handlers(parent_pid: int) -> None:
    """Die with the process group on the parent-death signal; on SIGTERM, die of it.

    Args:
        parent_pid: the parent's pid (0: unknown); a SIGTERM that arrives after the
            parent changed counts as the parent's death.
    """

    def on_parent_death(signum: int, frame: Any) -> None:
        die()  # take the whole process group along

    def on_sigterm(signum: int, frame: Any) -> None:
        if parent_pid and os.getppid() != parent_pid:
            die()
        # Someone asked us to stop: die of SIGTERM, so the exit status says so (the
        # parent then kills the rest of the process group).
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGTERM)

    _signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    _signal.signal(_signal.SIGTERM, on_sigterm)


def set_parent_death_signal(parent_pid: int) -> None:
    """Linux: have the kernel signal us when the parent dies (backup for EOF).

    If the parent is already gone (``getppid()`` is no longer ``parent_pid``), die now:
    the signal was never going to come.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        _prctl()(pr_set_pdeathsig, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
    except (OSError, AttributeError, ImportError):
        return
    if parent_pid and os.getppid() != parent_pid:
        die()


def become_subreaper() -> bool:
    """Linux: adopt the orphans of our descendants (PR_SET_CHILD_SUBREAPER), so that a
    task's double-forked daemons stay our descendants and die with us when killed.

    Returns:
        Whether this process is now a subreaper.
    """
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36
    try:
        return _prctl()(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    except (OSError, AttributeError, ImportError):
        return False


_prctl_function: Callable[..., int] | None = None


def _prctl() -> Callable[..., int]:
    """libc's prctl(), through ``_ctypes`` directly: the ``ctypes`` package costs a
    worker about a millisecond more to import, on every start."""
    global _prctl_function
    if _prctl_function is not None:
        return _prctl_function
    import _ctypes

    ct: Any = _ctypes  # the private C half of ctypes; its stubs describe the public one

    class CInt(ct._SimpleCData):  # type: ignore[misc]
        _type_ = "i"

    class Function(ct.CFuncPtr):  # type: ignore[misc]
        _flags_ = ct.FUNCFLAG_CDECL
        _restype_ = CInt

    class Libc:
        _handle = ct.dlopen(None, 2)  # RTLD_NOW, the running program's symbols

    function: Callable[..., int] = Function(("prctl", Libc()))
    _prctl_function = function
    return function


class OrphanReaper:
    """Reaps the zombies of orphans this worker adopted as a child subreaper.

    Call :meth:`reap` after each call: it is cheap when there is nothing to do (at most
    one ``waitid`` probe per 0.1 s) and safe from several threads (one reaps at a time,
    the others skip).
    """

    def __init__(self) -> None:
        self._next = 0.0  # when to look for zombies next
        self._lock = _thread.allocate_lock()

    def __repr__(self) -> str:
        return f"<OrphanReaper next look in {max(0.0, self._next - _clock()):.3f} s>"

    def reap(self) -> None:
        """Reap the zombie children that nothing in this process will wait for.

        Not a live ``subprocess.Popen`` (nor one ``subprocess`` keeps to reap later) and
        not a ``multiprocessing`` child. A task that forks with ``os.fork`` and waits for
        the child in a later call loses its status; nothing else does.
        """
        now = _clock()
        if now < self._next or not self._lock.acquire(False):
            return
        try:
            self._next = now + _REAP_INTERVAL
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except OSError:  # no children at all (ChildProcessError)
                return
            if info is None:
                return
            claimed = _claimed_pids()
            for pid in _zombie_children():
                if pid not in claimed:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except OSError:
                        pass
            if info.si_pid in claimed:
                # A zombie someone will wait for hides others from the probe: look
                # less often while it lingers (the scan above is not free).
                self._next = now + _REAP_BACKOFF
        finally:
            self._lock.release()


def _zombie_children() -> list[int]:
    """Pids of this process's children that have exited and are not reaped (Linux)."""
    zombies = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(b"/proc/%s/stat" % pid, "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state == b"Z":
                zombies.append(int(pid))
    return zombies


def _claimed_pids() -> set[int]:
    """Pids of children that a Popen or a multiprocessing process object of this process
    will wait for (so an orphan reaper must leave their zombies alone)."""
    import gc

    classes: list[type] = []
    claimed: set[int] = set()
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None:
        classes.append(subprocess.Popen)
        # Popens dropped unwaited: subprocess reaps them on its next start.
        claimed.update(proc.pid for proc in list(getattr(subprocess, "_active", None) or ()))
    popen_fork = sys.modules.get("multiprocessing.popen_fork")
    if popen_fork is not None:
        classes.append(popen_fork.Popen)  # also the spawn and forkserver ones
    if classes:
        kinds = tuple(classes)
        for obj in gc.get_objects():
            if isinstance(obj, kinds) and getattr(obj, "returncode", None) is None:
                pid = getattr(obj, "pid", None)
                if isinstance(pid, int):
                    claimed.add(pid)
    return claimed
