"""Starting a program as ``subprocess.Popen`` does, without importing :mod:`subprocess`.

Theory of operation
-------------------
A fresh program's first ``spawn`` pool starts its workers before anything else of
``subprocess`` is needed, and importing it (with :mod:`locale`, :mod:`fcntl` and the
``Popen`` class) costs that program several milliseconds, about a twentieth of the
whole program's time to its first result. :func:`start_process` does what ``Popen``
does for a worker's command line, with the C function ``Popen`` itself calls
(``_posixsubprocess.fork_exec``):

1. open the standard streams: stdin from ``/dev/null``; stderr into a pipe; stdout
   inherited, to ``/dev/null`` or into a pipe;
2. open the *error pipe* (close-on-exec): the child writes why it failed
   (``"OSError:<errno in hex>:<message>"``) if anything fails before its ``exec``;
3. ``fork_exec``: the child moves the streams to 0, 1 and 2, closes every descriptor
   but those passed, starts a new session, sets its umask and execs;
4. read the error pipe to its end: nothing means the ``exec`` happened; otherwise reap
   the child and raise the error ``Popen`` would (``FileNotFoundError`` naming the
   program, or the working directory when ``chdir`` failed).

``fork_exec`` takes other arguments in each Python version: the ones known here are
3.10 to 3.13; any other version starts the process with ``subprocess.Popen`` itself.
(3.10's ``fork_exec`` imports :mod:`subprocess` all the same, to read a setting of it.)
The caller holds the popen/fork lock (:func:`offload.process.child.popen_lock`) for the
whole call, as :func:`offload.process.child.popen` does. This module imports nothing of
offload's.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

# How many arguments fork_exec takes, by version: 3.11 added process_group and
# allow_vfork.
_ARGUMENTS = {(3, 10): 21, (3, 11): 23, (3, 12): 23, (3, 13): 23}
_ERROR_PIPE_LIMIT = 50_000  # what Popen reads of the child's error at most


class Started:
    """A started process: its pid, the parent's ends of its output pipes, and how to
    reap it.

    Attributes:
        pid: the process id.
        stderr_fd: the read end of the stderr pipe.
        stdout_fd: the read end of the stdout pipe (None: stdout was not a pipe).
        reap: reaps the process if it has exited: its exit code (negative: killed by
            that signal), or None while it runs or when someone else reaped it.
    """

    __slots__ = ("pid", "reap", "stderr_fd", "stdout_fd")

    def __init__(
        self,
        pid: int,
        stderr_fd: int,
        stdout_fd: int | None,
        reap: Callable[[], int | None],
    ) -> None:
        self.pid = pid
        self.stderr_fd = stderr_fd
        self.stdout_fd = stdout_fd
        self.reap = reap

    def __repr__(self) -> str:
        return f"<Started pid={self.pid} stderr_fd={self.stderr_fd} stdout_fd={self.stdout_fd}>"


def start_process(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    umask: int,
    pass_fds: tuple[int, ...],
    stdout: str,
    reap: Callable[[int], int | None],
) -> Started:
    """Start ``argv`` in a new session, as ``subprocess.Popen(argv, stdin=DEVNULL,
    stderr=PIPE, stdout=..., pass_fds=..., env=..., cwd=..., umask=...,
    start_new_session=True)`` would.

    Args:
        stdout: ``"inherit"``, ``"devnull"`` or ``"pipe"``.
        umask: the child's umask (-1: the parent's).
        reap: reaps a pid without blocking (``Started.reap`` calls it).

    Raises:
        OSError: as ``Popen``: the program or the working directory does not exist,
            is not executable, the system is out of processes or descriptors...
        ValueError: an environment variable's name contains ``=``.
    """
    count = _ARGUMENTS.get(sys.version_info[:2])
    if count is None:
        return _start_with_popen(
            argv, env=env, cwd=cwd, umask=umask, pass_fds=pass_fds, stdout=stdout, reap=reap
        )
    import _posixsubprocess

    fork_exec: Any = _posixsubprocess.fork_exec  # its arguments depend on the version

    env_list = []
    for key, value in env.items():
        name = os.fsencode(key)
        if b"=" in name:
            raise ValueError("illegal environment variable name")
        env_list.append(name + b"=" + os.fsencode(value))
    executable = os.fsencode(argv[0])
    if os.path.dirname(executable):
        executable_list: tuple[bytes, ...] = (executable,)
    else:  # searched in the child's PATH, as execvpe would
        executable_list = tuple(
            os.path.join(os.fsencode(folder), executable) for folder in os.get_exec_path(env)
        )
    sys.audit("subprocess.Popen", argv[0], argv, cwd, env)

    parent_fds: list[int] = []  # closed if the start fails
    child_fds: list[int] = []  # the child's ends: closed in the parent once it started
    try:
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        child_fds.append(devnull)
        err_read, err_write = os.pipe()
        parent_fds.append(err_read)
        child_fds.append(err_write)
        out_read, out_write = -1, -1
        if stdout == "pipe":
            out_read, out_write = os.pipe()
            parent_fds.append(out_read)
            child_fds.append(out_write)
        elif stdout == "devnull":
            out_write = devnull
        errpipe_read, errpipe_write = os.pipe()
        try:
            try:
                keep = tuple(sorted({*pass_fds, errpipe_write}))
                common = (
                    argv,
                    executable_list,
                    True,  # close_fds
                    keep,
                    cwd,
                    env_list,
                    devnull,  # stdin
                    -1,
                    out_read,
                    out_write,
                    err_read,
                    err_write,
                    errpipe_read,
                    errpipe_write,
                    True,  # restore_signals
                    True,  # start_new_session
                )
                ids = (None, None, None, umask, None)  # gid, groups, uid, umask, preexec_fn
                if count == 21:
                    pid = fork_exec(*common, *ids)
                else:
                    pid = fork_exec(*common, -1, *ids, True)  # process_group, allow_vfork
            finally:
                os.close(errpipe_write)
            _close_all(child_fds)
            child_fds = []
            error = _read_error_pipe(errpipe_read)
        finally:
            os.close(errpipe_read)
        if error:
            _reap_failed(pid)
            raise _child_error(error, argv[0], cwd)
    except BaseException:
        _close_all(parent_fds + child_fds)
        raise
    return Started(
        pid,
        err_read,
        out_read if out_read >= 0 else None,
        lambda: reap(pid),
    )


def _close_all(fds: list[int]) -> None:
    for fd in dict.fromkeys(fds):  # devnull may be there twice
        try:
            os.close(fd)
        except OSError:
            pass


def _read_error_pipe(fd: int) -> bytes:
    data = bytearray()
    while True:
        part = os.read(fd, _ERROR_PIPE_LIMIT)
        data += part
        if not part or len(data) > _ERROR_PIPE_LIMIT:
            return bytes(data)


def _reap_failed(pid: int) -> None:
    """Reap a child that failed before its exec (it exits at once)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # a program that ignores SIGCHLD: the kernel reaped it


def _child_error(data: bytes, program: str, cwd: str | None) -> Exception:
    """The exception ``Popen`` raises for the child's report ``data``."""
    import builtins

    try:
        name, hex_errno, raw = data.split(b":", 2)
        message = raw.decode()
    except ValueError:
        return RuntimeError(f"bad exception data from child: {data!r}")
    kind = getattr(builtins, name.decode("ascii", "replace"), None)
    if not (isinstance(kind, type) and issubclass(kind, Exception)):
        return RuntimeError(message)
    if issubclass(kind, OSError) and hex_errno:
        number = int(hex_errno, 16)
        filename: str | None = program
        if message == "noexec:chdir" or (message == "noexec" and sys.version_info < (3, 13)):
            message, filename = "", cwd  # it failed in chdir(cwd), before its exec
        elif message == "noexec":  # 3.13: before its exec, elsewhere than in chdir
            message, filename = "", None
        if number:
            message = os.strerror(number)
        return kind(number, message) if filename is None else kind(number, message, filename)
    return kind(message)


def _start_with_popen(
    argv: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | None,
    umask: int,
    pass_fds: tuple[int, ...],
    stdout: str,
    reap: Callable[[int], int | None],
) -> Started:
    """:func:`start_process` on a Python whose ``fork_exec`` is not known here."""
    import subprocess

    out: int | None = None
    if stdout == "pipe":
        out = subprocess.PIPE
    elif stdout == "devnull":
        out = subprocess.DEVNULL
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        env=env,
        cwd=cwd,
        umask=umask,
        start_new_session=True,
    )

    def reap_popen() -> int | None:
        code = reap(process.pid)
        if code is not None:
            process.returncode = code  # reaped: the Popen must never wait for the pid again
        return code

    # The caller owns the pipes' descriptors from here on (the Popen must not close them).
    stderr_fd = _take_fd(process.stderr)
    assert stderr_fd is not None  # stderr=PIPE
    return Started(process.pid, stderr_fd, _take_fd(process.stdout), reap_popen)


def _take_fd(pipe: Any) -> int | None:
    if pipe is None:
        return None
    fd = os.dup(pipe.fileno())
    pipe.close()
    return fd
