"""``offload.Lock``: a named lock shared by every process of one user on one machine.

Theory of operation:

1. A name maps to one file in a per-user lock directory (:func:`lock_directory`): a
   readable prefix of the name (``[A-Za-z0-9._-]``, at most 64 characters) and a hash
   of the whole name, so that a name with ``/``, ``..``, NUL, any length or any script
   is a safe, unique file name.
2. Each acquire opens that file anew and takes ``flock(LOCK_EX)`` on it. flock locks
   belong to the *open file description*, so two Lock objects (or two threads using
   one object) in one process exclude each other exactly as two processes do, and the
   kernel releases the lock when the holder's last descriptor closes: when it releases,
   exits or is killed, even by SIGKILL.
3. The holder writes its pid into the file (the diagnostic of :class:`LockTimeout`) and
   truncates it again on release. Lock files are never deleted: deleting one while
   another process waits on it would let a third process lock a new file of the same
   name and hold the "same" lock at once. Should something else delete or replace the
   file (a /tmp cleaner), an acquire notices that the path no longer names the file it
   locked and starts over.
4. Waiting with a timeout polls ``LOCK_NB`` with exponential back-off from 0.1 ms to
   at most 5 ms. A blocking flock cannot be interrupted from another thread, so a
   helper thread that waits in it could not be called off when the timeout passes: it
   would stay blocked (a thread and a descriptor leaked), then take the lock that
   nobody wants any more. Polling costs at most 200 non-blocking system calls a second
   per waiter and answers within 5 ms of a release. Waiting without a timeout blocks
   in flock itself (no polling at all; Ctrl-C still interrupts the main thread).

Fork: the descriptors of locks are registered the moment they are opened (under a lock
that ``os.fork`` waits for), and a forked child closes its copies at once: it never
holds its parent's lock, and cannot keep it held after the parent dies. Descriptors
are close-on-exec, so a program the holder starts does not inherit the lock.

Security: the default directory is ``$XDG_RUNTIME_DIR/offload/locks``, else
``/run/user/<uid>/offload/locks``, else ``/tmp/offload-<uid>/locks``. Every directory
offload creates there is 0700; each is opened without following symlinks and checked
(owned by this user, no access for group or others) before use, and lock files are
opened with ``O_NOFOLLOW``, so another user can neither read the names of the locks nor
redirect a lock file through a symlink. A squatted ``/tmp/offload-<uid>`` is refused with
a PermissionError, not used.

Scope: one machine. flock over NFS is emulated, or not, depending on the client, so the
lock is not a distributed lock; two machines never exclude each other. Processes that
should share a lock must resolve the same directory: the same ``XDG_RUNTIME_DIR`` (a
worker inherits its parent's), or an explicit ``directory=``.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import threading
import time
import warnings
from typing import Any

from offload.errors import LockTimeout

__all__ = ["Lock", "lock_directory", "lock_file_name"]

_PREFIX_LIMIT = 64
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_FIRST_DELAY = 0.0001  # seconds: the first poll comes quickly (most locks are short)
_MAX_DELAY = 0.005  # the back-off's cap: the latency after a release, at most
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

# The descriptors of every lock file this process has open (held or being acquired).
# A forked child closes its copies of them (see _after_fork_in_child). Opening and
# registering happen under _fork_guard, which os.fork waits for, so no descriptor is
# ever open in a child without being registered.
_open_fds: set[int] = set()
# Reentrant: a garbage-collected Lock may close its descriptor (__del__) on a thread
# that is opening another under the guard.
_fork_guard = threading.RLock()
_generation = 0  # bumped in every forked child: older Lock states are the parent's


def _before_fork() -> None:
    _fork_guard.acquire()


def _after_fork_in_parent() -> None:
    _fork_guard.release()


def _after_fork_in_child() -> None:
    global _fork_guard, _generation
    _generation += 1
    # Closing the child's copies leaves the parent's locks as they are (the parent's
    # descriptors still refer to the same open file descriptions); an explicit
    # LOCK_UN here would release them for the parent too.
    for fd in _open_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _open_fds.clear()
    _fork_guard = threading.RLock()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def lock_file_name(name: str) -> str:
    """The file name of lock ``name``: a sanitised prefix and a hash of the whole name.

    >>> lock_file_name("resize-cache")  # doctest: +ELLIPSIS
    'resize-cache-...lock'
    """
    import hashlib

    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    prefix = "".join(c if c in _SAFE else "_" for c in name[:_PREFIX_LIMIT]).lstrip(".")
    return f"{prefix}-{digest}.lock" if prefix else f"{digest}.lock"


def _check_private(fd: int, path: str) -> None:
    """Refuse a directory that is not this user's alone.

    Raises:
        PermissionError: owned by another user, or open to group or others.
    """
    st = os.fstat(fd)
    uid = os.geteuid()
    if st.st_uid != uid:
        raise PermissionError(
            f"offload.Lock refuses the lock directory {path}: it belongs to uid "
            f"{st.st_uid}, not to this user ({uid}); someone else may have created it "
            "to interfere. Remove it, or pass Lock(..., directory=...)"
        )
    if st.st_mode & 0o077:
        raise PermissionError(
            f"offload.Lock refuses the lock directory {path}: its mode is "
            f"{stat.S_IMODE(st.st_mode):04o}; other users could see or replace the lock "
            f"files. Make it private (chmod 700 {path}), or pass Lock(..., directory=...)"
        )


def _open_private_subdir(parent_fd: int, parent: str, name: str) -> int:
    """Open (creating it 0700 if missing) the directory ``name`` in ``parent_fd``,
    without following a symlink, and check that it is private.

    Raises:
        PermissionError: it is not this user's alone (see :func:`_check_private`).
        OSError: it cannot be created or opened (e.g. it is a symlink: ELOOP/ENOTDIR).
    """
    path = os.path.join(parent, name)
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        _check_private(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _usable_runtime_dir(path: str) -> bool:
    """Whether ``path`` is a per-user runtime directory of this user (XDG rules)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (
        os.path.isabs(path)
        and stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & 0o077
    )


def lock_directory() -> str:
    """The default directory of lock files for this user (see the module docstring).

    Returns:
        ``$XDG_RUNTIME_DIR/offload/locks`` when that variable names this user's private
        runtime directory, else ``/run/user/<uid>/offload/locks`` when that exists, else
        ``/tmp/offload-<uid>/locks``. The path may not exist yet.
    """
    uid = os.geteuid()
    for base in (os.environ.get("XDG_RUNTIME_DIR", ""), f"/run/user/{uid}"):
        if base and _usable_runtime_dir(base):
            return os.path.join(base, "offload", "locks")
    return os.path.join("/tmp", f"offload-{uid}", "locks")  # made private: _open_lock_dir


def _open_lock_dir(directory: str | None) -> tuple[int, str]:
    """Open the lock directory (creating what is missing); return (fd, path).

    The default directory is opened one level at a time from a trusted root (the
    runtime directory, or ``/tmp``), each level created 0700 if missing, opened with
    O_NOFOLLOW and checked to be this user's alone. A ``directory`` given by the caller
    is created if missing (0700) and used as it is.

    Raises:
        PermissionError: a default directory is not this user's alone.
        OSError: it cannot be created or opened.
    """
    if directory is not None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return os.open(directory, _DIR_FLAGS), directory
    path = lock_directory()
    base, first = os.path.split(os.path.dirname(path))  # ("/run/user/1000", "offload")
    fd = os.open(base, _DIR_FLAGS)  # the root: /tmp (sticky) or the runtime directory
    try:
        sub = _open_private_subdir(fd, base, first)
    finally:
        os.close(fd)
    try:
        return _open_private_subdir(sub, os.path.join(base, first), "locks"), path
    finally:
        os.close(sub)


def _open_lock_file(directory: str | None, file_name: str) -> tuple[int, str]:
    """Open (creating it 0600) a lock file; return (fd, path). The descriptor is
    registered for forks (see _after_fork_in_child); close it with :func:`_close`.

    Raises:
        PermissionError: the lock directory is not this user's alone.
        OSError: it cannot be created or opened, or the file is a symlink (ELOOP) or
            not a regular file.
    """
    with _fork_guard:
        dir_fd, where = _open_lock_dir(directory)
        try:
            fd = os.open(file_name, _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        _open_fds.add(fd)
    path = os.path.join(where, file_name)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        _close(fd)
        raise OSError(errno.EINVAL, f"offload.Lock: {path} is not a regular file")
    return fd, path


def _flock(fd: int, deadline: float | None) -> bool:
    """flock ``fd`` exclusively before ``deadline`` (None: wait for ever); False if the
    deadline passed first (see the module docstring for why it polls)."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the kernel wakes us: no polling
        return True
    delay = _FIRST_DELAY
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_DELAY)


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {timeout!r}")
    return None if math.isinf(timeout) else float(timeout)


def _holder_pid(fd: int) -> int | None:
    """The pid the holder wrote into the lock file, if it is a live process."""
    try:
        pid = int(os.pread(fd, 32, 0).split(b"\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a holder that died (the lock is free, or just taken again)
    except PermissionError:
        pass  # alive, another user's (a shared directory)
    return pid


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


class Lock:
    """A lock named ``name``, shared by every process of this user on this machine.

    ::

        with offload.Lock("resize-cache", timeout=10):
            ...                     # no other process (or thread) is in here

    Any process can use it: the caller, a task in a worker, an unrelated program. It is
    an flock on a file in a private per-user directory (see :mod:`offload.lock`), so
    the kernel releases it when its holder dies, even by SIGKILL.

    * Not reentrant, like :class:`threading.Lock`: a thread that holds this object and
      acquires it again gets RuntimeError (instead of waiting for itself for ever);
      ``acquire(blocking=False)`` just returns False.
    * Thread-safe: threads that share one Lock object, or use Lock objects of the same
      name, exclude each other as processes do. Any thread may release it.
    * Fork: a forked child does not hold its parent's lock (``locked_here()`` is False
      there and ``release()`` raises), and the parent keeps it.
    * One machine only: processes on different machines never exclude each other, and
      lock files on NFS are not supported.
    * Pickling a Lock (e.g. passing it to a task) gives an unheld Lock of the same name,
      timeout and directory.

    Args:
        name: any string; ``"a/b"``, very long and non-ASCII names are fine (the file
            name is a sanitised prefix and a hash of it).
        timeout: how long ``with lock:`` and ``acquire()`` wait, in seconds; None (or
            ``math.inf``) waits for ever.
        directory: where the lock file lives (created if missing); by default a private
            per-user directory (:func:`lock_directory`). Processes that share a lock
            must use the same directory.

    Raises:
        TypeError: ``name`` is not a string, or ``timeout`` not a number.
        ValueError: ``name`` is empty, or ``timeout`` is negative.
    """

    def __init__(
        self,
        name: str,
        timeout: float | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"a Lock's name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("a Lock's name must not be empty")
        self.name = name
        self.timeout = _check_timeout(timeout)
        self.directory = None if directory is None else os.fspath(directory)
        self.file_name = lock_file_name(name)
        # The state of this object, guarded by _state: the descriptor holding the lock
        # (None: not held by this object), the thread that acquired it, the fork
        # generation it was acquired in (a child's copy of the object holds nothing).
        self._state = threading.Lock()
        self._fd: int | None = None
        self._owner: int | None = None
        self._gen = -1
        self._path = ""

    # -- acquiring -----------------------------------------------------------------------

    def acquire(self, timeout: float | None = None, *, blocking: bool = True) -> bool:
        """Wait for the lock and take it.

        Args:
            timeout: seconds to wait; None means the Lock's own ``timeout`` (and with
                that None, for ever); ``math.inf`` waits for ever; 0 tries once.
            blocking: False tries once and returns at once.

        Returns:
            True once held; False when the timeout passed or, with ``blocking=False``,
            the lock is held elsewhere.

        Raises:
            RuntimeError: the calling thread holds this Lock object already (it is not
                reentrant; waiting would wait for ever).
            ValueError: a ``timeout`` with ``blocking=False``, or a negative one.
            TypeError: a ``timeout`` that is not a number (``acquire(False)``: use
                ``blocking=False``).
            PermissionError: the lock directory is not this user's alone.
            OSError: the lock file cannot be created or opened.
        """
        if not blocking:
            if timeout is not None:
                raise ValueError("a non-blocking acquire takes no timeout")
            wait: float | None = 0.0
        else:
            wait = self.timeout if timeout is None else _check_timeout(timeout)
        return self._acquire(wait, blocking)[0]

    def _acquire(self, wait: float | None, blocking: bool) -> tuple[bool, int | None]:
        """Acquire within ``wait`` seconds (None: for ever): (acquired, the pid that
        held it when it was not)."""
        with self._state:
            again = self._held_here() and self._owner == threading.get_ident()
        if again:
            if not blocking:
                return False, os.getpid()
            raise RuntimeError(
                f"{self!r} is already held by this thread; offload.Lock is not "
                "reentrant (acquiring it again would wait for ever)"
            )
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            fd, path = _open_lock_file(self.directory, self.file_name)
            try:
                got = _flock(fd, deadline)
                holder = None if got else _holder_pid(fd)
                renamed = got and not _still_named(fd, path)
            except BaseException:
                _close(fd)
                raise
            if not got:
                _close(fd)
                return False, holder
            if renamed:  # the file was deleted or replaced meanwhile: lock the new one
                _close(fd)
                continue
            break
        _write_pid(fd)
        with self._state:
            self._fd = fd
            self._owner = threading.get_ident()
            self._gen = _generation
            self._path = path
        return True, None

    # -- releasing -----------------------------------------------------------------------

    def release(self) -> None:
        """Release the lock (from any thread of the process that acquired it).

        Raises:
            RuntimeError: this Lock object does not hold the lock (never acquired,
                released already, or acquired by the parent of this forked process).
        """
        with self._state:
            fd = self._fd if self._held_here() else None
            self._fd = None
            self._owner = None
        if fd is None:  # (repr takes _state: not under it)
            raise RuntimeError(f"release of an offload.Lock that is not held: {self!r}")
        try:
            os.ftruncate(fd, 0)  # no stale pid for the next waiter to report
        except OSError:
            pass
        # Unlock explicitly before closing: a descriptor inherited by a child forked
        # at this moment would otherwise keep the lock held.
        fcntl.flock(fd, fcntl.LOCK_UN)
        _close(fd)

    def _held_here(self) -> bool:
        return self._fd is not None and self._gen == _generation

    # -- state ---------------------------------------------------------------------------

    def locked_here(self) -> bool:
        """Whether this Lock object holds the lock (in this process)."""
        with self._state:
            return self._held_here()

    def locked(self) -> bool:
        """Whether any process (or Lock object) holds the lock right now.

        A snapshot: it may change at once. It briefly takes a shared flock, so a
        non-blocking acquire elsewhere at that very moment may fail.

        Raises:
            PermissionError: the lock directory is not this user's alone.
            OSError: the lock file cannot be created or opened.
        """
        if self.locked_here():
            return True
        fd, _ = _open_lock_file(self.directory, self.file_name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
        finally:
            _close(fd)

    @property
    def path(self) -> str:
        """The lock file's path: where it was last opened, else where it would be now."""
        if self._path:
            return self._path
        directory = self.directory if self.directory is not None else lock_directory()
        return os.path.join(directory, self.file_name)

    def __repr__(self) -> str:
        with self._state:
            if self._held_here():
                thread = next(
                    (t.name for t in threading.enumerate() if t.ident == self._owner), "?"
                )
                state = f"held by this process (pid {os.getpid()}, thread {thread})"
            else:
                state = "not held here"
        timeout = "" if self.timeout is None else f" timeout={self.timeout:g}"
        return f"<offload.Lock {self.name!r} {state}{timeout} file={self.path}>"

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Lock:
        """Acquire, waiting at most the Lock's ``timeout``.

        Raises:
            LockTimeout: (also a TimeoutError) not acquired within the timeout; it names
                the lock and the pid that held it, when known.
            RuntimeError, PermissionError, OSError: as :meth:`acquire`.
        """
        got, holder = self._acquire(self.timeout, True)
        if not got:
            who = "by an unknown process"
            if holder is not None:
                comm = _process_name(holder)
                who = f"by pid {holder}" + (f" ({comm})" if comm else "")
            raise LockTimeout(
                f"offload.Lock {self.name!r} was not acquired within {self.timeout:g} s: "
                f"it is held {who} [file {self.path}]",
                name=self.name,
                timeout=self.timeout or 0.0,
                holder_pid=holder,
                path=self.path,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- lifetime ------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy in another process is a fresh, unheld Lock of the same name.
        return (_rebuild, (self.name, self.timeout, self.directory))

    def __del__(self) -> None:
        # A held Lock dropped without release(): release it, as a file dropped without
        # close() is closed, and say so.
        fd = getattr(self, "_fd", None)
        if fd is None or getattr(self, "_gen", -1) != _generation:
            return
        self._fd = None
        _close(fd)
        try:
            warnings.warn(
                f"offload.Lock {self.name!r} was garbage-collected while held; released",
                ResourceWarning,
                stacklevel=2,
            )
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing to tell
            pass


def _still_named(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file that ``fd`` has open (nobody deleted or
    replaced it)."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (mine.st_dev, mine.st_ino)


def _write_pid(fd: int) -> None:
    # Diagnostics only (LockTimeout names the holder): a failure to write is no reason
    # to fail the acquire.
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass


def _rebuild(name: str, timeout: float | None, directory: str | None) -> Lock:
    return Lock(name, timeout, directory=directory)


def _close(fd: int) -> None:
    """Close a lock file's descriptor and forget it (under the fork guard, so that a
    child never closes a number already reused for another file)."""
    with _fork_guard:
        _open_fds.discard(fd)
        try:
            os.close(fd)
        except OSError:
            pass
