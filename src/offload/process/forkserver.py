"""The ``forkserver`` start method: a template process that forks workers on request.

Theory of operation
-------------------
1. The first worker that asks for ``start_method="forkserver"`` starts the template: a
   fresh interpreter that imports offload's worker loop and the ``preload`` modules
   once. A new worker is then one ``fork()`` of an already warm process away: no
   interpreter start, no imports — and, unlike ``fork``, nothing of the parent's threads
   or state is copied.
2. The control channel is one end of a socketpair the template inherits by number. No
   other process can reach it, so it needs no path on disk, no token and no listening
   socket (a filesystem socket in a 0700 directory would be the next best thing; the
   abstract namespace would be reachable by every process of the network namespace).
3. A request carries the worker's launch spec (a pickle: both ends are this program) and,
   as ``SCM_RIGHTS``, the worker's socket and its stderr/stdout pipe ends. The template
   forks; the child becomes the worker (:func:`offload.process.fork.become_worker`); the
   template answers with the child's pid.
4. The template reaps its children and reports every exit status. Exits are reported in
   the order they happen, on the same channel as the answers.
5. When the control channel ends (the parent exited or was killed), the template kills the
   process group of every worker it made, and exits.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from offload.process.child import ChildProcess, popen
from offload.process.fork import become_worker, output_pipes
from offload.process.spec import LaunchSpec
from offload.transport.loop import Loop, keep_open

ENV = "OFFLOAD_FORKSERVER"
_REQUEST = struct.Struct("!I")  # length of the pickled spec that follows
_REPLY = struct.Struct("!Bqq")  # kind, pid, value
_SPAWNED, _EXITED, _FAILED = 1, 2, 3


class ForkServer:
    """The parent's handle on one template process (one per interpreter + preload)."""

    def __init__(self, python: str, preload: tuple[str, ...], loop: Loop) -> None:
        """Start the template process for ``python`` with ``preload`` imported.

        Raises:
            OSError: the template could not be started.
        """
        self.loop = loop
        self.key = (python, preload)  # its entry in the table of templates
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = {
            "fd": theirs.fileno(),
            "preload": list(preload),
            "sys_path": [p for p in sys.path if p],
            "ppid": os.getpid(),
        }
        env = dict(os.environ)
        env[ENV] = pickle.dumps(settings).hex()
        try:
            self.popen = popen(
                [python, "-c", "from offload.process.forkserver import serve; serve()"],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        self.children: dict[int, ChildProcess] = {}
        self.early_exits: dict[int, int] = {}
        self._buf = b""
        self.alive = True
        keep_open(self.sock.fileno())  # shared by every pool; lives with the process
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "gone"
        preload = ",".join(self.key[1]) or "-"
        return (
            f"<ForkServer pid={self.popen.pid} {state} [python={self.key[0]} preload={preload}"
            f" | workers: {len(self.children)} running, {len(self.early_exits)} early exits]>"
        )

    def launch(
        self, spec: LaunchSpec, on_exit: Callable[[ChildProcess], Any]
    ) -> tuple[ChildProcess, socket.socket]:
        """Have the template fork a worker for ``spec``. Loop thread only."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        (err_r, err_w), out = output_pipes(spec)
        fds = [child_sock.fileno(), err_w] + ([out[1]] if out else [])
        try:
            payload = pickle.dumps(spec)
            socket.send_fds(self.sock, [_REQUEST.pack(len(payload)) + payload], fds)
            pid = self._wait_spawned()
        except BaseException:
            parent_sock.close()
            os.close(err_r)
            if out:
                os.close(out[0])
            raise
        finally:
            child_sock.close()
            os.close(err_w)
            if out:
                os.close(out[1])
        child = ChildProcess(
            pid,
            spec,
            self.loop,
            on_exit,
            stderr_fd=err_r,
            stdout_fd=out[0] if out else None,
            reap=None,
        )
        self.children[pid] = child
        code = self.early_exits.pop(pid, None)
        if code is not None:
            self.loop.call_soon(child.report_exit, code)
        return child, parent_sock

    def _wait_spawned(self) -> int:
        while True:
            for kind, pid, value in self._read(block=True):
                if kind == _SPAWNED:
                    return pid
                if kind == _FAILED:
                    raise OSError(
                        int(value), f"the forkserver could not fork: {os.strerror(int(value))}"
                    )

    def _read(self, block: bool) -> list[tuple[int, int, int]]:
        """Read replies; dispatch exit reports; return the spawn answers."""
        try:
            data = self.sock.recv(65536, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            self._lost()
            raise OSError("the forkserver exited")
        self._buf += data
        answers = []
        while len(self._buf) >= _REPLY.size:
            kind, pid, value = _REPLY.unpack_from(self._buf)
            self._buf = self._buf[_REPLY.size :]
            if kind == _EXITED:
                child = self.children.pop(pid, None)
                if child is not None:
                    child.report_exit(int(value))
                else:
                    self.early_exits[pid] = int(value)
            else:
                answers.append((kind, pid, value))
        return answers

    def _on_readable(self) -> None:
        try:
            self._read(block=False)
        except OSError:
            pass

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        _servers.pop(self.key, None)
        self.loop.remove_reader(self.sock.fileno())
        keep_open(self.sock.fileno(), False)
        self.sock.close()
        try:
            self.popen.wait(5.0)  # it exits right after its channel breaks
        except subprocess.TimeoutExpired:  # stopped, or stuck: never hold up the loop
            self.popen.kill()
            self.popen.wait()
        for pid, child in list(self.children.items()):
            child.kill()
            child.report_exit(-signal.SIGKILL)  # its parent, the template, is gone
            del self.children[pid]


_servers: dict[tuple[str, tuple[str, ...]], ForkServer] = {}
_servers_lock = threading.Lock()


def template_pids() -> set[int]:
    """Pids of the running template processes (long-lived, shared by every pool)."""
    return {server.popen.pid for server in list(_servers.values()) if server.alive}


def launch_via_forkserver(
    spec: LaunchSpec, loop: Loop, on_exit: Callable[[ChildProcess], Any]
) -> tuple[ChildProcess, socket.socket]:
    """Start a worker through the template for ``spec``'s interpreter and preload."""
    preload = spec.settings.preload
    key = (spec.python, preload)
    with _servers_lock:
        server = _servers.get(key)
        if server is None or not server.alive:
            server = ForkServer(spec.python, preload, loop)
            _servers[key] = server
    return server.launch(spec, on_exit)


def _reset_after_fork() -> None:
    global _servers_lock
    _servers.clear()  # a forked child has no forkserver of its own
    _servers_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


# -- the template process ----------------------------------------------------------------


def serve() -> None:
    """Main of the template process (``python -c "...; serve()"``). Never returns."""
    settings = pickle.loads(bytes.fromhex(os.environ.pop(ENV)))
    for entry in reversed(settings["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import offload.worker.loop  # noqa: F401 - warm: every worker needs it

    for module in settings["preload"]:
        __import__(module)
    control = socket.socket(fileno=settings["fd"])
    parent = settings["ppid"]
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: _shutdown(children, 0))
    children: set[int] = set()
    import select

    while True:
        if os.getppid() != parent:
            _shutdown(children, 0)
        try:
            ready, _, _ = select.select([control.fileno(), wake_r], [], [], 1.0)
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 4096)
            _report_exits(control, children)
        if control.fileno() in ready:
            try:
                msg, fds, _, _ = socket.recv_fds(control, 1 << 20, 4)
            except OSError:
                msg, fds = b"", []
            if not msg:
                _shutdown(children, 0)
            _spawn(control, msg, fds, children, (wake_r, wake_w))


def _spawn(
    control: socket.socket,
    msg: bytes,
    fds: list[int],
    children: set[int],
    wake: tuple[int, int],
) -> None:
    try:
        (size,) = _REQUEST.unpack_from(msg)
        spec: LaunchSpec = pickle.loads(msg[_REQUEST.size : _REQUEST.size + size])
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        control.sendall(_REPLY.pack(_FAILED, 0, exc.errno or 0))
        return
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sock_fd, err_w = fds[0], fds[1]
        out_w = fds[2] if len(fds) > 2 else None
        become_worker(spec, sock_fd, err_w, out_w, ppid=os.getppid())
    for fd in fds:
        os.close(fd)
    children.add(pid)
    control.sendall(_REPLY.pack(_SPAWNED, pid, 0))


def _report_exits(control: socket.socket, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            control.sendall(_REPLY.pack(_EXITED, pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            pass


def _shutdown(children: set[int], code: int) -> None:
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(code)
